"""The built-in demo model: a small OLMoE with learned routing, shipped inside the package.

It was trained on the Python standard library's source by ``scripts/train_demo.py`` (see
``cluster/demo_model/README.md``); its routing is real, so the router's speculation and the expert
cache have something to learn from, and ``transformers`` loads it as any OLMoE checkpoint.

Invariants:
  * ``demo_model_dir()`` is a fixed path next to this module; nothing is created at run time;
  * ``ensure_demo_model()`` returns that path only when every required file is present.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

DEMO_NAME = "demo-olmoe-stdlib-v1"
DEMO_FAMILY = "olmoe"
REQUIRED_FILES: tuple[str, ...] = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
REGENERATE = "python scripts/train_demo.py --out cluster/demo_model"


class DemoModelMissing(FileNotFoundError):
    """The shipped demo checkpoint is incomplete (e.g. a broken install)."""


def demo_model_dir() -> Path:
    """Where the shipped demo checkpoint lives (inside the installed ``cluster`` package)."""
    return Path(__file__).resolve().parent / "demo_model"


def ensure_demo_model(progress: Callable[[str], None] | None = None) -> Path:
    """Return the demo checkpoint directory; DemoModelMissing names what is absent and the fix.

    ``progress`` is accepted for callers that report set-up steps; nothing needs building, so it
    is not called.
    """
    target = demo_model_dir()
    missing = [name for name in REQUIRED_FILES if not (target / name).is_file()]
    if missing:
        raise DemoModelMissing(
            f"built-in demo model is incomplete: {target} lacks {', '.join(missing)} "
            f"(broken install?); reinstall moe-serve or regenerate it from a source checkout "
            f"with `{REGENERATE}`")
    return target
