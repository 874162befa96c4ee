"""Tests for router gating: torch reference, Triton kernel, and kernel dispatch.

On CPU the Triton kernel runs under the Triton interpreter, which triton picks
when it is first imported (its own ``tl.max`` etc. are built then). The shared
``tests/conftest.py`` pulls in transformers -> torch._dynamo -> triton before
this module is collected, so setting ``TRITON_INTERPRET`` here would be too
late. The interpreter comparisons therefore run in one child process started
with ``TRITON_INTERPRET=1``, whatever the test order or prior imports.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.kernels.interpreter import run_interpreted
from kernels import KernelOps, select_kernels
from kernels.fused_moe_torch import fused_moe_torch
from kernels.topk_gating import topk_gating_ref

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")

# Runs in the child: loads {case_id: args}, saves {case_id: topk_gating(*args)}.
CHILD_SCRIPT = """
import sys, torch
from kernels import select_kernels
ops = select_kernels("cpu", "triton")
cases = torch.load(sys.argv[1])
torch.save({name: ops.topk_gating(*args) for name, args in cases.items()}, sys.argv[2])
"""


def naive_gating(logits: torch.Tensor, top_k: int, renormalize: bool):
    """Per-row float64 softmax + sort, independent of torch.softmax/topk."""
    weights, ids = [], []
    for row in logits.double().tolist():
        peak = max(row)
        exps = [math.exp(v - peak) for v in row]
        total = sum(exps)
        probs = [v / total for v in exps]
        best = sorted(range(len(row)), key=lambda e: -probs[e])[:top_k]
        picked = [probs[e] for e in best]
        scale = sum(picked) if renormalize else 1.0
        weights.append([p / scale for p in picked])
        ids.append(best)
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(ids, dtype=torch.int64)


def tie_free_logits(tokens: int, experts: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """``[T, E]`` logits whose 16 largest values per row are distinct in ``dtype``.

    float32 uses plain ``randn`` (ties are vanishingly unlikely). Lower precisions
    plant 16 exactly representable values above a clamped ``randn`` background,
    so top-k for k <= 15 is tie-free for any E.
    """
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.float32:
        return torch.randn(tokens, experts, generator=gen)
    logits = (torch.randn(tokens, experts, generator=gen) * 0.5).clamp(-2.0, 2.0)  # [T, E]
    planted = min(experts, 16)
    cols = torch.rand(tokens, experts, generator=gen).argsort(dim=1)[:, :planted]  # [T, M]
    values = 2.5 + 0.25 * torch.arange(planted, dtype=torch.float32)  # [M], exact in bf16/fp16
    logits.scatter_(1, cols, values.expand(tokens, planted))
    return logits.to(dtype)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GATING_SHAPES = [(1, 8, 2), (5, 3, 3), (37, 60, 4), (9, 128, 8), (4, 1, 1)]  # (T, E, K)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GATING_SHAPES)
def test_reference_matches_naive(shape, dtype, renormalize):
    tokens, experts, top_k = shape
    logits = tie_free_logits(tokens, experts, dtype)
    weights, ids = topk_gating_ref(logits, top_k, renormalize)
    want_w, want_ids = naive_gating(logits, top_k, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert weights.shape == ids.shape == (tokens, top_k)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights.double(), want_w, rtol=1e-5, atol=1e-7)


def test_reference_is_torch_topk_of_softmax():
    logits = torch.randn(16, 10, generator=torch.Generator().manual_seed(0)).bfloat16()
    want_w, want_ids = torch.topk(torch.softmax(logits.float(), -1), 3)
    weights, ids = topk_gating_ref(logits, 3, renormalize=False)
    assert torch.equal(weights, want_w) and torch.equal(ids, want_ids)


def test_reference_renormalized_rows_sum_to_one():
    weights, _ = topk_gating_ref(tie_free_logits(6, 12, torch.float32), 4, renormalize=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(6))


@pytest.mark.parametrize("top_k", [0, 9])
def test_reference_rejects_bad_top_k(top_k):
    with pytest.raises(ValueError, match="top_k"):
        topk_gating_ref(torch.randn(2, 8), top_k, renormalize=False)


def interpreter_cases() -> dict[str, tuple]:
    """``{case_id: (logits, top_k, renormalize)}`` for the interpreter comparison."""
    cases = {}
    for tokens, experts, top_k in GATING_SHAPES:
        for dtype in DTYPES:
            logits = tie_free_logits(tokens, experts, dtype, seed=tokens + experts)
            for renorm in (False, True):
                cases[f"{tokens}x{experts}-k{top_k}-{dtype}-{renorm}"] = (logits, top_k, renorm)
    wide = tie_free_logits(20, 16, torch.float32, seed=5)  # [20, 16]
    cases["strided"] = (wide[:, ::2], 2, True)  # [20, 8], column stride 2
    cases["empty"] = (torch.zeros(0, 8), 2, False)
    return cases


CASES = interpreter_cases()


@pytest.fixture(scope="module")
def interpreted_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_interpreted(CHILD_SCRIPT, CASES, tmp_path_factory.mktemp("topk_gating"))


@pytest.mark.parametrize("case_id", list(CASES))
def test_triton_matches_reference_interpreted(interpreted_results, case_id):
    logits, top_k, renormalize = CASES[case_id]
    weights, ids = interpreted_results[case_id]
    want_w, want_ids = topk_gating_ref(logits, top_k, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert weights.shape == ids.shape == (logits.shape[0], top_k)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w)


@requires_cuda
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("shape", [(1, 8, 2), (1000, 64, 6), (333, 256, 8), (64, 3000, 4)])
def test_triton_matches_reference_cuda(shape, renormalize):
    pytest.importorskip("triton", reason="triton is not installed")
    from kernels.topk_gating_triton import topk_gating_triton

    tokens, experts, top_k = shape
    logits = tie_free_logits(tokens, experts, torch.bfloat16, seed=2).cuda()
    weights, ids = topk_gating_triton(logits, top_k, renormalize)
    want_w, want_ids = topk_gating_ref(logits, top_k, renormalize)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w)


def test_select_auto_on_cpu_is_torch():
    ops = select_kernels("cpu")
    assert isinstance(ops, KernelOps)
    assert ops.backend == "torch"
    assert ops.fused_moe.func is fused_moe_torch and ops.topk_gating is topk_gating_ref
    assert select_kernels(torch.device("cpu"), "torch").backend == "torch"


def test_select_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        select_kernels("cpu", "triton")


def test_select_triton_on_cpu_with_interpreter(monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ops = select_kernels("cpu", "triton")
    assert ops.backend == "triton"
    assert ops.topk_gating.__name__ == "topk_gating_triton"
    assert ops.fused_moe.__name__ == "fused_moe_triton"


def test_select_auto_on_cuda_uses_triton_when_importable(monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # the choice only; nothing runs on the GPU
    assert select_kernels("cuda:0").backend == "triton"
    monkeypatch.setattr("kernels.dispatch._triton_importable", lambda: False)
    assert select_kernels("cuda:0").backend == "torch"
    with pytest.raises(ValueError, match="cannot be imported"):
        select_kernels("cuda", "triton")


def test_select_unknown_backend_raises():
    with pytest.raises(ValueError, match="auto, torch, triton"):
        select_kernels("cpu", "cutlass")


def test_kernel_ops_is_frozen():
    ops = select_kernels("cpu", "torch")
    with pytest.raises(AttributeError):
        ops.backend = "triton"  # type: ignore[misc]
