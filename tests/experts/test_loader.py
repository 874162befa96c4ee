"""Checkpoint loading: sharded reads, per-expert lazy loads, and clear errors on broken checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from experts.checkpoint import Checkpoint
from experts.config import load_spec
from experts.errors import CheckpointError
from experts.loader import load_dense, load_experts


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_same_weights(tiny_model):
    single, sharded = tiny_model("qwen2_moe"), tiny_model("qwen2_moe", shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    spec = load_spec(single)
    a = load_experts(Checkpoint(single), spec, 1, [3, 5], torch.float32)
    b = load_experts(Checkpoint(sharded), spec, 1, [3, 5], torch.float32)
    assert torch.equal(a.buffer, b.buffer)
    da, db = load_dense(Checkpoint(single), spec, torch.float32), load_dense(Checkpoint(sharded), spec, torch.float32)
    assert torch.equal(da.layers[1].qkv, db.layers[1].qkv)


def test_expert_bank_rows_are_the_hf_matrices(tiny_model):
    path = tiny_model("mixtral")
    spec = load_spec(path)
    bank = load_experts(Checkpoint(path), spec, 0, [6, 2], torch.float32)
    raw = load_file(path / "model.safetensors")
    p = "model.layers.0.block_sparse_moe.experts.6."
    i = spec.expert_intermediate
    assert torch.equal(bank.w_gate_up[0][:i], raw[p + "w1.weight"])
    assert torch.equal(bank.w_gate_up[0][i:], raw[p + "w3.weight"])
    assert torch.equal(bank.w_down[0], raw[p + "w2.weight"])
    assert bank.buffer[0].is_contiguous() and bank.buffer.shape == (2, spec.expert_numel)
    assert bank.slot_of[6] == 0 and bank.slot_of[2] == 1 and bank.slot_of[0] == -1


def test_lazy_expert_load_reads_only_its_experts(tiny_model, monkeypatch):
    path = tiny_model("olmoe")
    spec = load_spec(path)
    ckpt = Checkpoint(path)
    names = []
    real = Checkpoint.view
    monkeypatch.setattr(Checkpoint, "view", lambda self, n, *a, **k: names.append(n) or real(self, n, *a, **k))
    load_experts(ckpt, spec, 1, [4], torch.float32)
    assert len(names) == 3 and all(".experts.4." in n and "layers.1." in n for n in names)


def test_views_lie_over_the_mapped_file_and_hold_its_values(tiny_model, tmp_path):
    path = copy_model(tiny_model("mixtral"), tmp_path / "m")
    spec, ckpt = load_spec(path), Checkpoint(path)
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    shape = (spec.hidden_size, spec.expert_intermediate)
    view = ckpt.view(name, shape)
    assert torch.equal(view, load_file(path / "model.safetensors")[name])
    assert ckpt.view(name, shape).data_ptr() == view.data_ptr()  # the same bytes twice: no copy
    view.add_(1.0)  # a private mapping: the file keeps its values
    assert torch.equal(Checkpoint(path).view(name, shape), load_file(path / "model.safetensors")[name])
    with pytest.raises(CheckpointError, match=r"expected shape \[1, 2\]"):
        ckpt.view(name, (1, 2))


def test_a_file_that_cannot_be_mapped_is_read_as_copies(tiny_model, tmp_path, monkeypatch, caplog):
    import experts.checkpoint as checkpoint

    path = tiny_model("olmoe")
    spec = load_spec(path)
    want = load_experts(Checkpoint(path), spec, 1, [2, 5], torch.float32)

    def refuse(p):
        raise OSError("Cannot allocate memory")

    monkeypatch.setattr(checkpoint, "_map", refuse)
    ckpt = Checkpoint(path)
    assert torch.equal(load_experts(ckpt, spec, 1, [2, 5], torch.float32).buffer, want.buffer)
    assert "cannot map safetensors file (Cannot allocate memory)" in caplog.text
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    stacked = torch.stack([ckpt.view(name, tuple(ckpt.shape(name)))] * 3)
    save_file({"stacked": stacked}, tmp_path / "s.safetensors")
    ckpt = Checkpoint(tmp_path)
    assert torch.equal(ckpt.view_row("stacked", 1, tuple(stacked.shape[1:])), stacked[1])  # a row, copied


def test_fused_3d_expert_layout_is_read_row_by_row(tiny_model, tmp_path):
    path = copy_model(tiny_model("olmoe"), tmp_path / "m")
    spec = load_spec(path)
    want = load_experts(Checkpoint(path), spec, 0, [1, 7], torch.float32)
    raw = load_file(path / "model.safetensors")
    for layer in range(spec.num_layers):
        pre = f"model.layers.{layer}.mlp.experts."
        gu = [torch.cat([raw.pop(f"{pre}{e}.gate_proj.weight"), raw.pop(f"{pre}{e}.up_proj.weight")])
              for e in range(spec.num_experts)]
        down = [raw.pop(f"{pre}{e}.down_proj.weight") for e in range(spec.num_experts)]
        raw[pre + "gate_up_proj"], raw[pre + "down_proj"] = torch.stack(gu), torch.stack(down)
    save_file(raw, path / "model.safetensors")
    got = load_experts(Checkpoint(path), spec, 0, [1, 7], torch.float32)
    assert torch.equal(got.buffer, want.buffer)


def break_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("breakage, message", [
    (lambda p: (p / "config.json").unlink(), "missing config.json"),
    (lambda p: (p / "config.json").write_text("{not json"), "corrupt JSON"),
    (lambda p: break_config(p, model_type="llama"), "unknown model_type 'llama'"),
    (lambda p: break_config(p, num_experts_per_tok=99), "num_experts_per_tok 99"),
])
def test_bad_config_errors(tiny_model, tmp_path, breakage, message):
    path = copy_model(tiny_model("olmoe"), tmp_path / "m")
    breakage(path)
    with pytest.raises(CheckpointError, match=message):
        load_spec(path)


def test_missing_and_misshaped_tensors(tiny_model, tmp_path):
    path = copy_model(tiny_model("qwen3_moe"), tmp_path / "m")
    raw = load_file(path / "model.safetensors")
    del raw["model.layers.1.self_attn.q_norm.weight"]
    raw["model.layers.0.mlp.experts.2.up_proj.weight"] = torch.zeros(3, 3)
    save_file(raw, path / "model.safetensors")
    spec, ckpt = load_spec(path), Checkpoint(path)
    with pytest.raises(CheckpointError, match="missing tensor model.layers.1.self_attn.q_norm.weight"):
        load_dense(ckpt, spec, torch.float32)
    with pytest.raises(CheckpointError, match=r"experts.2.up_proj.weight: expected shape \[32, 64\]"):
        load_experts(ckpt, spec, 0, [2], torch.float32)


def test_corrupt_and_missing_files(tiny_model, tmp_path):
    path = copy_model(tiny_model("mixtral"), tmp_path / "m")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors file"):
        Checkpoint(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        Checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "nowhere")


def test_missing_shard_named_by_index(tiny_model, tmp_path):
    path = copy_model(tiny_model("mixtral", shards=3), tmp_path / "m")
    victim = sorted(path.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard file\\(s\\) {victim.name}"):
        Checkpoint(path)


def test_expert_ids_out_of_range(tiny_model):
    path = tiny_model("olmoe")
    with pytest.raises(ValueError, match="expert ids \\[8\\] out of range"):
        load_experts(Checkpoint(path), load_spec(path), 0, [1, 8], torch.float32)
