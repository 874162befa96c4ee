"""The built-in demo model: shipped complete, loadable by transformers and the engine, learned routing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

import cluster
import cluster.demo
from cluster.config import EngineConfig
from cluster.demo import DEMO_NAME, DemoModelMissing, ensure_demo_model
from cluster.engine import LLMEngine
from cluster.sampling_params import SamplingParams
from experts.tokenizer import load_tokenizer

MAX_BYTES = 20 * 1024 * 1024

# Held out by construction: written for this test, not part of the standard library.
SNIPPET = '''
import os
from dataclasses import dataclass


@dataclass
class Interval:
    start: int
    stop: int

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def overlaps(self, other: "Interval") -> bool:
        return self.start < other.stop and other.start < self.stop


def merge(intervals: list[Interval]) -> list[Interval]:
    """Merge overlapping intervals; the result is sorted by start."""
    result: list[Interval] = []
    for item in sorted(intervals, key=lambda i: i.start):
        if result and result[-1].stop >= item.start:
            result[-1] = Interval(result[-1].start, max(result[-1].stop, item.stop))
        else:
            result.append(item)
    return result


def read_lines(path: str, encoding: str = "utf-8") -> list[str]:
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    with open(path, encoding=encoding) as f:
        return [line.rstrip("\\n") for line in f]


class Counter(dict):
    def add(self, key, count=1):
        self[key] = self.get(key, 0) + count
        return self[key]

    def most_common(self, n=None):
        items = sorted(self.items(), key=lambda kv: kv[1], reverse=True)
        return items if n is None else items[:n]
'''


@pytest.fixture(scope="module")
def demo_dir() -> Path:
    return ensure_demo_model()


@pytest.fixture(scope="module")
def hf_demo(demo_dir: Path) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def test_shipped_inside_the_package_and_small(demo_dir: Path) -> None:
    assert demo_dir == Path(cluster.__file__).resolve().parent / "demo_model"
    assert ensure_demo_model(progress=lambda message: None) == demo_dir
    assert "stdlib" in DEMO_NAME
    assert sum(p.stat().st_size for p in demo_dir.iterdir()) <= MAX_BYTES
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["model_type"] == "olmoe" and config["architectures"] == ["OlmoeForCausalLM"]
    assert config["num_experts"] >= 8 and config["num_experts_per_tok"] == 2


def test_missing_files_name_the_path_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(cluster.demo, "demo_model_dir", lambda: tmp_path)
    with pytest.raises(DemoModelMissing, match="model.safetensors") as err:
        ensure_demo_model()
    assert str(tmp_path) in str(err.value) and "scripts/train_demo.py" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)  # the CLI prints these as one line


def test_tokenizer_round_trips_python_source(demo_dir: Path) -> None:
    tok = load_tokenizer(demo_dir)
    config = json.loads((demo_dir / "config.json").read_text())
    assert tok is not None and tok.vocab_size == config["vocab_size"]
    assert tok.eos_token_id == config["eos_token_id"] == tok.tok.token_to_id("<|endoftext|>")
    assert "<|im_start|>" in tok.chat_template
    for text in (SNIPPET, Path(cluster.demo.__file__).read_text(), "x = 'naïve ☃'\r\n\tif x:\n        pass  # \x00"):
        assert tok.decode(tok.encode(text)) == text
    # Learned merges: Python source packs several bytes per token (raw bytes would be 1.0).
    assert len(SNIPPET.encode()) / len(tok.encode(SNIPPET)) > 2.5
    assert len(tok.encode("<|im_start|>user\nhi<|im_end|>")) == 5


def test_engine_greedy_matches_transformers(demo_dir: Path, hf_demo: PreTrainedModel) -> None:
    engine = LLMEngine(EngineConfig(model=str(demo_dir), kv_cache_tokens=256))
    prompt = engine.tokenize("def fibonacci(n):\n")
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    ours = engine.generate([prompt], params)[0].token_ids
    with torch.no_grad():
        ref = hf_demo.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):]
    assert list(ours) == ref.tolist()


def routing_stats(model: PreTrainedModel, ids: list[int]) -> tuple[float, float]:
    """(min over layers of popularity entropy / log E, mean held-out best-transition accuracy * E).

    Top-1 transitions layer l -> l+1 are fit on the first half of the tokens and scored on the
    second; an accuracy ratio of 1.0 is what a uniform, independent router scores.
    """
    with torch.no_grad():
        logits = model.model(input_ids=torch.tensor([ids]), output_router_logits=True).router_logits
    top_k, num_experts = model.config.num_experts_per_tok, model.config.num_experts
    chosen = torch.stack([layer.topk(top_k, dim=-1).indices for layer in logits])  # [L, T, k]
    counts = torch.stack([torch.bincount(c.flatten(), minlength=num_experts) for c in chosen]).double()
    probs = counts / counts.sum(dim=1, keepdim=True)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1) / math.log(num_experts)
    top1, half = chosen[..., 0], len(ids) // 2
    ratios = []
    for src, dst in zip(top1[:-1], top1[1:]):
        table = torch.zeros(num_experts, num_experts).index_put_(
            (src[:half], dst[:half]), torch.ones(half), accumulate=True)
        hits = (table.argmax(dim=1)[src[half:]] == dst[half:]).double().mean()
        ratios.append(hits.item() * num_experts)
    return entropy.min().item(), sum(ratios) / len(ratios)


def held_out_loss(model: PreTrainedModel, ids: list[int]) -> float:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()


def test_trained_with_balanced_predictable_routing(demo_dir: Path, hf_demo: PreTrainedModel) -> None:
    """Trained: far below the untrained model's loss on held-out code. Its routing uses every expert
    (the aux loss balances it) and is predictable from layer to layer, what the route predictors use.
    (An untrained model routes by token id alone, unbalanced; loss is what tells the two apart.)"""
    ids = load_tokenizer(demo_dir).encode(SNIPPET)
    assert len(ids) >= 200
    config = AutoConfig.from_pretrained(demo_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untrained = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert held_out_loss(hf_demo, ids) < held_out_loss(untrained, ids) - 3.0
    entropy, transition = routing_stats(hf_demo, ids)
    assert entropy >= 0.75 and transition >= 3.0, (entropy, transition)
