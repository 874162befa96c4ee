"""Run Triton kernels under the interpreter in a child process.

triton picks interpreter-or-compiled when it is first imported, and the shared conftest imports
transformers (hence triton) before test modules load, so the interpreter runs need a fresh process
started with TRITON_INTERPRET=1, whatever the test order.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_interpreted(script: str, cases: dict, workdir: Path) -> dict:
    """Run `script` (argv: cases path, results path) on `cases`; returns what it saved."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed; Triton interpreter tests need it")
    cases_path, results_path = workdir / "cases.pt", workdir / "results.pt"
    torch.save(cases, cases_path)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(cases_path), str(results_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0:
        pytest.fail(f"interpreter child failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return torch.load(results_path)
