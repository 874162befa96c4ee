"""The built-in demo model: cache location, one-time atomic creation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import experts.tiny
from cluster.demo import DEMO_NAME, demo_model_dir, ensure_demo_model


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MOE_SERVE_CACHE", str(tmp_path))
    return tmp_path


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOE_SERVE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo_model_dir() == tmp_path / "home" / ".cache" / "moe-serve" / DEMO_NAME
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_model_dir() == tmp_path / "xdg" / "moe-serve" / DEMO_NAME
    monkeypatch.setenv("MOE_SERVE_CACHE", str(tmp_path / "mine"))
    assert demo_model_dir() == tmp_path / "mine" / "demo-olmoe-v1"


def test_demo_is_created_once(cache: Path) -> None:
    messages: list[str] = []
    path = ensure_demo_model(messages.append)
    assert path == cache / "demo-olmoe-v1"
    assert len(messages) == 1 and messages[0].startswith("creating demo model in ")
    # Only the finished model is left: no staging directories.
    assert [p.name for p in cache.iterdir()] == [DEMO_NAME]

    mtimes = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    assert ensure_demo_model(messages.append) == path
    assert len(messages) == 1
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == mtimes

    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "olmoe"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_experts"]) == (128, 4, 16)
    assert (config["num_experts_per_tok"], config["moe_intermediate_size"]) == (4, 128)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (8, 4)
    assert config["max_position_embeddings"] == 2048
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        assert model(torch.tensor([[72, 105]])).logits.shape == (1, 2, 259)


def test_incomplete_dir_is_rebuilt(cache: Path) -> None:
    (cache / DEMO_NAME).mkdir()
    (cache / DEMO_NAME / "model.safetensors").write_bytes(b"partial")
    path = ensure_demo_model()
    assert (path / "config.json").is_file()
    assert (path / "model.safetensors").stat().st_size > 1000
    assert [p.name for p in cache.iterdir()] == [DEMO_NAME]


def test_failed_build_leaves_nothing_loadable(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(family: str, out_dir: Path, **kwargs: object) -> Path:
        (Path(out_dir) / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(experts.tiny, "make_tiny", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_demo_model()
    assert list(cache.iterdir()) == []
