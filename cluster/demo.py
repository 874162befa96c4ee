"""The built-in demo model: a small random OLMoE checkpoint created on first use.

Invariants:
  * ``demo_model_dir()`` is a pure function of the environment;
  * the directory at ``demo_model_dir()`` is either absent or a complete
    checkpoint: it is built in a temporary sibling and renamed into place in
    one step, so a crash leaves at most a stray temporary directory (whose
    name never matches) and never a half-written model;
  * the contents are deterministic, so concurrent builders produce identical
    checkpoints and whichever rename lands first wins.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEMO_NAME = "demo-olmoe-v1"
DEMO_FAMILY = "olmoe"
DEMO_SEED = 0
# Bump DEMO_NAME whenever these change, so old caches are not reused.
DEMO_OVERRIDES: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 128,
    "intermediate_size": 128,
    "max_position_embeddings": 2048,
}


def cache_root() -> Path:
    """``$MOE_SERVE_CACHE``, else ``$XDG_CACHE_HOME/moe-serve``, else ``~/.cache/moe-serve``."""
    explicit = os.environ.get("MOE_SERVE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "moe-serve"


def demo_model_dir() -> Path:
    """Where the demo checkpoint lives (it may not exist yet)."""
    return cache_root() / DEMO_NAME


def _is_complete(model_dir: Path) -> bool:
    """A demo directory counts as built once it holds ``config.json``."""
    return (model_dir / "config.json").is_file()


def ensure_demo_model(progress: Callable[[str], None] | None = None) -> Path:
    """Return the demo checkpoint directory, building it first if needed."""
    target = demo_model_dir()
    if _is_complete(target):
        return target

    # Imported here so that resolving the path does not load torch/transformers.
    from experts.tiny import make_tiny

    if progress is not None:
        progress(f"creating demo model in {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}.tmp-", dir=target.parent))
    try:
        make_tiny(DEMO_FAMILY, staging, seed=DEMO_SEED, **DEMO_OVERRIDES)
        # mkdtemp creates 0700; the finished cache entry is world-readable.
        staging.chmod(0o755)
        _discard_incomplete(target)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process renamed its identical build into place first.
            if not _is_complete(target):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _discard_incomplete(target: Path) -> None:
    """Remove ``target`` if it exists without ``config.json`` (e.g. left by hand).

    It is first renamed aside so the removal can never hit a directory that
    another process has just completed under the target name.
    """
    if not target.exists() or _is_complete(target):
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}.stale-", dir=target.parent))
    try:
        os.replace(target, aside / "old")
    except FileNotFoundError:
        pass
    shutil.rmtree(aside, ignore_errors=True)
