"""Tests for the fused MoE expert computation: torch reference and Triton kernels.

As in ``test_topk_gating.py``, the CPU comparisons against the Triton kernels
run in a child process started with ``TRITON_INTERPRET=1``, because triton may
already have been imported in compiled mode (tests/conftest.py imports
transformers, which imports torch._dynamo, which imports triton).
"""

from __future__ import annotations


import pytest
import torch
from torch import Tensor

from kernels import select_kernels
from kernels.fused_moe import expert_pair_outputs_ref, fused_moe_ref
from kernels.fused_moe_torch import fused_moe_torch
from tests.kernels.interpreter import run_interpreted

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")

# Runs in the child: {case_id: args} -> {case_id: (fused_moe(*args), w_gate_up strides)}.
CHILD_SCRIPT = """
import sys, torch
from tests.kernels.interpreter import run_interpreted
from kernels import select_kernels
ops = select_kernels("cpu", "triton")
cases = torch.load(sys.argv[1])
results = {name: (ops.fused_moe(*args), args[1].stride()) for name, args in cases.items()}
torch.save(results, sys.argv[2])
"""

BF16_TOL = {"atol": 5e-2, "rtol": 5e-2}


def make_case(
    tokens: int, experts: int, top_k: int, hidden: int, inter: int,
    dtype: torch.dtype = torch.float32, bank: bool = True, drop: float = 0.0, seed: int = 0,
    device: str = "cpu",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Random ``(x, w_gate_up, w_down, topk_ids, topk_weights)``.

    With ``bank`` the weights are views into one ``[E, 3*I*H]`` buffer, as the
    engine stores them (expert stride 3*I*H). A ``drop`` fraction of the ids is -1.
    Values are drawn on CPU, so they do not depend on ``device``.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)  # [T, H]
    params = torch.randn(experts, 3 * inter * hidden, generator=gen)  # [E, P]
    params[:, : 2 * inter * hidden] /= hidden**0.5
    params[:, 2 * inter * hidden :] /= inter**0.5
    params = params.to(device=device, dtype=dtype)
    w_gate_up = params[:, : 2 * inter * hidden].view(experts, 2 * inter, hidden)  # [E, 2I, H]
    w_down = params[:, 2 * inter * hidden :].view(experts, hidden, inter)  # [E, H, I]
    if not bank:
        w_gate_up, w_down = w_gate_up.contiguous(), w_down.contiguous()
    ids = torch.rand(tokens, experts, generator=gen).argsort(dim=1)[:, :top_k]  # [T, K] distinct
    ids[torch.rand(ids.shape, generator=gen) < drop] = -1
    weights = torch.rand(tokens, top_k, generator=gen) + 0.1  # [T, K] float32
    return x.to(device), w_gate_up, w_down, ids.to(device), weights.to(device)


def naive_moe(x, w_gate_up, w_down, topk_ids, topk_weights) -> Tensor:
    """Per-token, per-slot float64 loop: ``[T, H]`` float64."""
    inter = w_down.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            if e < 0:
                continue
            h = w_gate_up[e].double() @ x[t].double()  # [2I]
            gate, up = h[:inter], h[inter:]
            act = gate * torch.sigmoid(gate) * up  # [I]
            out[t] += float(topk_weights[t, k]) * (w_down[e].double() @ act)
    return out


# (T, E, K, H, I, options): several shapes, strided bank views, -1 ids, T=1,
# experts without tokens, > 64 slots (larger BLOCK_M), all-dropped, empty.
SHAPES = {
    "decode": (1, 4, 2, 64, 32, {}),
    "odd": (7, 6, 2, 40, 24, {"drop": 0.2}),
    "wide-k": (33, 8, 3, 72, 48, {"drop": 0.1}),
    "many-slots": (80, 4, 2, 32, 16, {}),
    "sparse-experts": (5, 16, 2, 16, 16, {"bank": False}),
    "all-dropped": (3, 4, 2, 16, 16, {"drop": 1.0}),
    "empty": (0, 4, 2, 16, 16, {}),
}


def all_cases() -> dict[str, tuple]:
    cases = {}
    for name, (t, e, k, h, i, opts) in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            cases[f"{name}-{dtype}"] = make_case(t, e, k, h, i, dtype=dtype, seed=t + e, **opts)
    x, *rest = make_case(6, 5, 2, 24, 20, seed=3)
    cases["strided-x"] = (torch.cat([x, x], dim=1)[:, ::2], *rest)  # x column stride 2
    cases["expert-bank"] = expert_bank_case()
    return cases


def expert_bank_case() -> tuple:
    """The engine's own ExpertBank layout: one row per expert, views into it."""
    from experts.expert_bank import ExpertBank
    x, w_gate_up, w_down, ids, weights = make_case(9, 6, 2, 40, 24, seed=5)
    bank = ExpertBank.empty(0, tuple(range(6)), 6, 40, 24, torch.float32)
    for e in range(6):
        bank.set_expert(e, w_gate_up[e, :24], w_gate_up[e, 24:], w_down[e])
    return x, bank.w_gate_up, bank.w_down, ids, weights


CASES = all_cases()


def tolerance(dtype: torch.dtype) -> dict:
    return BF16_TOL if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-4}


@pytest.mark.parametrize("case_id", list(CASES))
def test_reference_matches_naive(case_id):
    x, w_gate_up, w_down, ids, weights = CASES[case_id]
    out = fused_moe_ref(x, w_gate_up, w_down, ids, weights)
    assert out.dtype == x.dtype and out.shape == x.shape
    want = naive_moe(x, w_gate_up, w_down, ids, weights)
    torch.testing.assert_close(out.double(), want, **tolerance(x.dtype))


def test_case_weights_are_strided_bank_views():
    _, w_gate_up, w_down, _, _ = CASES["odd-torch.float32"]
    hidden, inter = 40, 24
    assert w_gate_up.stride(0) == w_down.stride(0) == 3 * inter * hidden
    assert w_gate_up.untyped_storage().data_ptr() == w_down.untyped_storage().data_ptr()


def test_reference_rejects_bad_shapes():
    x, w_gate_up, w_down, ids, weights = make_case(2, 4, 2, 16, 8)
    with pytest.raises(ValueError, match="w_down"):
        fused_moe_ref(x, w_gate_up, w_down.transpose(1, 2), ids, weights)
    with pytest.raises(ValueError, match="same shape"):
        fused_moe_ref(x, w_gate_up, w_down, ids, weights[:, :1])


@pytest.fixture(scope="module")
def interpreted_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_interpreted(CHILD_SCRIPT, CASES, tmp_path_factory.mktemp("fused_moe"))


@pytest.mark.parametrize("case_id", list(CASES))
def test_triton_matches_reference_interpreted(interpreted_results, case_id):
    x, w_gate_up, w_down, ids, weights = CASES[case_id]
    out, child_strides = interpreted_results[case_id]
    assert child_strides == w_gate_up.stride()  # the child saw the same (strided) views
    assert out.dtype == x.dtype and out.shape == x.shape
    want = fused_moe_ref(x, w_gate_up, w_down, ids, weights)
    torch.testing.assert_close(out, want, **tolerance(x.dtype))


@pytest.mark.parametrize("block_m", [16, 64])
def test_align_slots_by_expert(block_m):
    pytest.importorskip("triton", reason="triton is not installed")
    from kernels.fused_moe_triton import align_slots_by_expert

    ids = torch.tensor([[2, 0], [2, -1], [0, 2], [5, 2]])  # [T=4, K=2], experts 1, 3, 4 unused
    sorted_slots, block_expert = align_slots_by_expert(ids, num_experts=6, block_m=block_m)
    assert sorted_slots.numel() == block_expert.numel() * block_m
    flat = ids.reshape(-1)
    seen = []
    for b, expert in enumerate(block_expert.tolist()):
        block = sorted_slots[b * block_m : (b + 1) * block_m]
        real = block[block < flat.numel()].tolist()
        assert expert >= 0 or not real
        assert all(int(flat[s]) == expert for s in real)
        seen += real
    assert sorted(seen) == [s for s in range(flat.numel()) if flat[s] >= 0]
    assert [e for e in block_expert.tolist() if e >= 0] == [0, 2, 5]


CUDA_SHAPES = [
    (1, 64, 8, 2048, 1408),  # decode
    (300, 16, 2, 1000, 700),  # ragged H and I
    (1024, 8, 2, 512, 768),  # prefill
]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_triton_matches_reference_cuda(shape, dtype):
    pytest.importorskip("triton", reason="triton is not installed")
    from kernels.fused_moe_triton import fused_moe_triton

    case = make_case(*shape, dtype=dtype, drop=0.05, seed=7, device="cuda")
    x, w_gate_up, w_down, ids, weights = case
    assert w_gate_up.stride(0) == 3 * shape[3] * shape[4]  # bank views on the GPU
    out = fused_moe_triton(x, w_gate_up, w_down, ids, weights)
    want = fused_moe_ref(x, w_gate_up, w_down, ids, weights)
    tol = BF16_TOL if dtype == torch.bfloat16 else {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(out, want, **tol)


@pytest.mark.parametrize("case_id", list(CASES))
def test_cpu_production_path_matches_reference(case_id):
    """select_kernels' torch path on CPU (fused_moe_torch: the reference's loop through the start-up
    linear, weight-major or oneDNN for float32, and its single-token shortcut)."""
    x, w_gate_up, w_down, ids, weights = CASES[case_id]
    ops = select_kernels("cpu", "torch", x.dtype)
    want = naive_moe(x, w_gate_up, w_down, ids, weights)
    got = ops.fused_moe(x, w_gate_up, w_down, ids, weights)
    assert got.dtype == x.dtype
    torch.testing.assert_close(got.double(), want, **tolerance(x.dtype))


@pytest.mark.parametrize("tokens", [1, 3, 64])  # the single-token shortcut, small and large expert rows
def test_pair_outputs_with_the_cpu_linear_are_the_bits_of_the_fused_path(tokens):
    """A shard (pair outputs, weighted and summed by the caller) and the in-process engine's torch
    path (fused) compute each expert on the same rows through the same linear: identical bits. (A
    single float32 token in-process goes through the C kernel where it is built, which adds its
    experts in its own order: close, not the same bits.)"""
    from experts.expert_bank import ExpertBank
    e, h, i, k = 6, 24, 16, 2
    g = torch.Generator().manual_seed(tokens)
    bank = ExpertBank.empty(0, tuple(range(e)), e, h, i, torch.float32)
    for row in range(e):
        bank.set_expert(row, torch.randn(i, h, generator=g), torch.randn(i, h, generator=g),
                        torch.randn(h, i, generator=g))
    x = torch.randn(tokens, h, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    ops = select_kernels("cpu", "torch", torch.float32)
    fused = fused_moe_torch(x, bank.w_gate_up, bank.w_down, ids, weights, linear=ops.linear)
    torch.testing.assert_close(ops.fused_moe(x, bank.w_gate_up, bank.w_down, ids, weights), fused,
                               atol=1e-4, rtol=1e-5)
    pairs = expert_pair_outputs_ref(x, bank.w_gate_up, bank.w_down, torch.arange(tokens).repeat_interleave(k),
                                    ids.reshape(-1), ops.linear).view(tokens, k, h)
    order = torch.argsort(ids, dim=1, stable=True)  # summed in ascending expert id, as the fused loop adds
    parts = torch.take_along_dim(pairs * weights[..., None], order[..., None], dim=1)
    total = parts[:, 0].clone()
    for j in range(1, k):
        total += parts[:, j]
    assert torch.equal(total, fused)
    torch.testing.assert_close(fused.double(), naive_moe(x, bank.w_gate_up, bank.w_down, ids, weights),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("drop", [0.0, 0.5])
def test_one_token_path_is_the_bits_of_the_reference(dtype, drop):
    """Batch-1 decode skips the grouping ops (fused_moe_torch._one_token); the experts still run in
    ascending id order through the same linear, so the sum is the reference's, bit for bit, also
    with -1 ids (experts on other shards). (The C kernel that replaces it for float32 where it is
    built is tested in test_cpu_native.py.)"""
    ops = select_kernels("cpu", "torch", dtype)
    for seed in range(6):
        x, w_gate_up, w_down, ids, weights = make_case(1, 8, 4, 48, 32, dtype=dtype, drop=drop, seed=seed)
        assert torch.equal(fused_moe_torch(x, w_gate_up, w_down, ids, weights, linear=ops.linear),
                           fused_moe_ref(x, w_gate_up, w_down, ids, weights, ops.linear))
