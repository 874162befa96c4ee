"""The `moe-serve` command line, run as a user runs it (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from cluster.config import EngineConfig
from cluster.demo import ensure_demo_model
from cluster.engine import LLMEngine
from cluster.sampling_params import SamplingParams


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_make_tiny_then_generate_streams_the_engine_output(tmp_path):
    out = tmp_path / "qwen"
    res = cli("make-tiny", "--family", "qwen2_moe", "--out", str(out), "--shards", "2")
    assert res.returncode == 0, res.stderr
    assert (out / "model.safetensors.index.json").is_file()
    res = cli("generate", "--model", str(out), "--prompt", "def f(x):", "--max-tokens", "12",
              "--temperature", "0")
    assert res.returncode == 0, res.stderr
    engine = LLMEngine(EngineConfig(model=str(out)))
    want = engine.generate(["def f(x):"], SamplingParams(max_tokens=12, temperature=0.0))[0]
    assert res.stdout == want.text + "\n"
    assert f"finish_reason={want.finish_reason}" in res.stderr


def test_generate_without_model_uses_demo_model():
    res = cli("generate", "--prompt", "def add(a, b):", "--max-tokens", "8", "--temperature", "0")
    assert res.returncode == 0, res.stderr
    engine = LLMEngine(EngineConfig(model=str(ensure_demo_model())))
    want = engine.generate(["def add(a, b):"], SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert res.stdout == want.text + "\n" and want.token_ids


def test_bad_arguments_give_clear_errors(tmp_path):
    res = cli("generate", "--model", str(tmp_path), "--prompt", "x")
    assert res.returncode == 2 and "missing config.json" in res.stderr
    res = cli("make-tiny", "--family", "gpt2", "--out", str(tmp_path / "m"))
    assert res.returncode == 2 and "unknown MoE family 'gpt2'" in res.stderr
    res = cli("generate", "--prompt", "x", "--temperature", "-1")
    assert res.returncode == 2 and "temperature must be in [0, 100]" in res.stderr
    if not torch.cuda.is_available():  # a GPU asked for where there is none: one line, not a traceback
        for command in ("generate", "calibrate"):
            res = cli(command, *(["--prompt", "x"] if command == "generate" else []), "--device", "cuda")
            assert res.returncode == 2 and "sees no CUDA GPU" in res.stderr and "Traceback" not in res.stderr


def test_several_prompts_run_as_one_batch_and_print_in_order(tmp_path):
    prompts = ["def add(a, b):", "import os\n", "class A:"]
    args = [a for p in prompts for a in ("--prompt", p)]
    res = cli("generate", *args, "--max-tokens", "6", "--temperature", "0", "--record-trace", str(tmp_path / "t.jsonl"))
    assert res.returncode == 0, res.stderr
    engine = LLMEngine(EngineConfig(model=str(ensure_demo_model())))
    want = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0))
    assert res.stdout == "".join(f"--- [{i}] {p!r}\n{w.text}\n" for i, (p, w) in enumerate(zip(prompts, want)))
    from router.traces import read_trace

    assert len({r.request for r in read_trace(tmp_path / "t.jsonl")}) == 3  # one request per prompt


def test_generate_with_an_expert_cache_prints_what_the_cache_did():
    """The run's totals: the same counters as an engine running the same requests with the same cache."""
    prompts = ["def add(a, b):", "class A:"]
    res = cli("generate", *[a for p in prompts for a in ("--prompt", p)], "--max-tokens", "8", "--temperature", "0",
              "--expert-cache", "0.5", "--expert-cache-policy", "lru", "--expert-cache-schedule", "load")
    assert res.returncode == 0, res.stderr
    engine = LLMEngine(EngineConfig(model=str(ensure_demo_model()), expert_cache_fraction=0.5,
                                    expert_cache_policy="lru", expert_cache_schedule="load"))
    engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0))
    stats = engine.model.experts.stats
    assert engine.cache_totals == stats and stats.misses > 0
    assert f"[{stats.describe()}]" in res.stderr.splitlines()
