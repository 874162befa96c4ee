"""Tiny random checkpoints and the byte tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from experts.tiny import FAMILIES, build_tiny_model, make_tiny, olmoe_bench_config, tiny_config_kwargs
from experts.tokenizer_build import (
    BYTE_VOCAB_SIZE,
    EOS_TOKEN_ID,
    IM_END_TOKEN_ID,
    IM_START_TOKEN_ID,
    write_byte_tokenizer,
)

SAMPLE_TEXT = "Hello, wörld! 日本語 🙂 \t tabs  and\n\nnewlines, \x00 control, ends with space "


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_roundtrips_through_from_pretrained(tmp_path: Path, family: str) -> None:
    out = make_tiny(family, tmp_path / family)
    assert (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert_same_state(build_tiny_model(family), reloaded)

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family
    assert config["vocab_size"] == BYTE_VOCAB_SIZE
    assert config["eos_token_id"] == config["pad_token_id"] == EOS_TOKEN_ID
    assert config["bos_token_id"] is None
    assert config["hidden_size"] == 64 and config["num_hidden_layers"] == 2
    assert config["num_experts_per_tok"] == 2
    assert config["initializer_range"] == 0.1
    # transformers 5 writes qwen3_moe's expert count as num_local_experts.
    assert config.get("num_experts", config.get("num_local_experts")) == 8
    if family == "mixtral":
        assert config["intermediate_size"] == 32 and config["sliding_window"] is None
    else:
        assert config["moe_intermediate_size"] == 32
        assert config["norm_topk_prob"] is (family == "qwen3_moe")
    if family == "qwen2_moe":
        assert config["shared_expert_intermediate_size"] == 48
    assert AutoTokenizer.from_pretrained(out).eos_token_id == EOS_TOKEN_ID


def test_shards_write_index_and_several_files(tmp_path: Path) -> None:
    out = make_tiny("qwen2_moe", tmp_path / "m", shards=3)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shard_files) >= 3
    assert not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == set(shard_files)
    # Per-expert Hugging Face layout on disk.
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in index["weight_map"]
    assert_same_state(build_tiny_model("qwen2_moe"), AutoModelForCausalLM.from_pretrained(out))


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    first = file_bytes(make_tiny("mixtral", tmp_path / "a", seed=3, shards=2))
    second = file_bytes(make_tiny("mixtral", tmp_path / "b", seed=3, shards=2))
    assert first == second
    other = file_bytes(make_tiny("mixtral", tmp_path / "c", seed=4, shards=2))
    weights = [name for name in first if name.endswith(".safetensors")]
    assert weights and all(first[n] != other[n] for n in weights)


def test_bfloat16_is_a_cast_of_the_float32_weights(tmp_path: Path) -> None:
    out = make_tiny("olmoe", tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert_same_state(build_tiny_model("olmoe").to(torch.bfloat16), reloaded)


def test_make_tiny_leaves_caller_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    make_tiny("olmoe", tmp_path / "m")
    assert torch.equal(torch.rand(4), expected)


def test_overrides_replace_config_keys(tmp_path: Path) -> None:
    out = make_tiny("mixtral", tmp_path / "m", num_experts=4, num_hidden_layers=1)
    config = AutoConfig.from_pretrained(out)
    assert config.num_local_experts == 4 and config.num_hidden_layers == 1
    kwargs = tiny_config_kwargs("olmoe", num_local_experts=6)
    assert kwargs["num_experts"] == 6 and "num_local_experts" not in kwargs
    with pytest.raises(ValueError, match="only one"):
        tiny_config_kwargs("olmoe", num_experts=4, num_local_experts=4)


def test_bad_arguments_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mixtral, qwen2_moe, qwen3_moe, olmoe"):
        make_tiny("llama", tmp_path / "x")
    with pytest.raises(ValueError, match="dtype"):
        make_tiny("olmoe", tmp_path / "x", dtype="int8")
    with pytest.raises(ValueError, match="shards"):
        make_tiny("olmoe", tmp_path / "x", shards=0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "junk").write_text("x")
    with pytest.raises(FileExistsError):
        make_tiny("olmoe", tmp_path / "full")


@pytest.mark.parametrize("family", FAMILIES)
def test_random_logits_are_peaked(family: str) -> None:
    # initializer_range 0.1 keeps top-2 logit gaps well above float rounding.
    model = build_tiny_model(family)
    ids = torch.randint(0, 256, (16, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        top2 = model(ids).logits.topk(2, dim=-1).values
    gaps = (top2[..., 0] - top2[..., 1]).flatten()
    assert gaps.median() > 0.05
    assert (gaps < 1e-3).float().mean() < 0.03


def test_bench_preset_is_about_250m_params() -> None:
    kwargs = tiny_config_kwargs("olmoe", **olmoe_bench_config())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("olmoe", **kwargs))
    params = sum(p.numel() for p in model.parameters())
    assert 240e6 < params < 280e6
    assert model.config.vocab_size == 50304 and model.config.num_experts == 32


def test_byte_tokenizer_roundtrips_utf8(tmp_path: Path) -> None:
    assert write_byte_tokenizer(tmp_path) == BYTE_VOCAB_SIZE == 259
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ids = raw.encode(SAMPLE_TEXT, add_special_tokens=False).ids
    assert ids == list(SAMPLE_TEXT.encode("utf-8"))
    assert raw.decode(ids, skip_special_tokens=False) == SAMPLE_TEXT
    all_bytes = bytes(range(256)).decode("latin-1")
    assert raw.decode(raw.encode(all_bytes).ids) == all_bytes
    assert raw.encode("<|im_start|>x").ids == [IM_START_TOKEN_ID, ord("x")]
    assert raw.token_to_id("<|endoftext|>") == EOS_TOKEN_ID == 256
    assert raw.token_to_id("<|im_start|>") == IM_START_TOKEN_ID == 257
    assert raw.token_to_id("<|im_end|>") == IM_END_TOKEN_ID == 258


def test_byte_tokenizer_loads_with_transformers(tmp_path: Path) -> None:
    write_byte_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == BYTE_VOCAB_SIZE
    assert tok.eos_token_id == tok.pad_token_id == EOS_TOKEN_ID and tok.bos_token is None
    ids = tok(SAMPLE_TEXT)["input_ids"]
    assert ids == list(SAMPLE_TEXT.encode("utf-8"))
    assert tok.decode(ids) == SAMPLE_TEXT
    assert tok.encode("<|im_end|>") == [IM_END_TOKEN_ID]
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_make_tiny_prints_nothing(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    messages: list[str] = []
    make_tiny("qwen3_moe", tmp_path / "m", shards=2, progress=messages.append)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert messages and all(isinstance(m, str) for m in messages)
