"""The C kernels for float32 CPU decode (kernels/cpu_native.py) against their torch references."""

from __future__ import annotations

import pytest
import torch

from cluster.layers import apply_rope_rolled, rope_table, signed_sin
from kernels import cpu_attention, cpu_native, select_kernels
from kernels.fused_moe import expert_pair_outputs_ref, fused_moe_ref
from kernels.linear import linear_ref
from kernels.norm import rms_norm_ref



def _built():
    """The compiled library, opened directly: load()'s self-check would turn a wrong kernel into a
    skip here."""
    try:
        return cpu_native._open(cpu_native.build()), ""
    except cpu_native.NativeBuildError as e:
        return None, str(e)


LIB, WHY = _built()
needs_lib = pytest.mark.skipif(LIB is None, reason=f"the C kernels cannot be built here: {WHY}")


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@needs_lib
@pytest.mark.parametrize("m, k, n", [(1, 5, 1), (1, 512, 1030), (3, 100, 33), (8, 1000, 300), (2, 64, 40000),
                                     (7, 130, 50), (16, 300, 70)])  # rows four at a time (ms_dot4) and the rest
@pytest.mark.parametrize("bias", [False, True])
def test_linear(threads, m, k, n, bias):
    g = torch.Generator().manual_seed(m * k + n)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    got = cpu_native.linear_native(x, w, b, lib=LIB)
    torch.testing.assert_close(got, linear_ref(x, w, b), atol=1e-4, rtol=1e-4)
    # each row's dot products do not depend on the other rows: a row alone gets the same bits
    assert torch.equal(cpu_native.linear_native(x[-1:], w, b, lib=LIB), got[-1:])
    assert torch.equal(cpu_native.linear_native(x[:1], w, b, lib=LIB), got[:1])
    wide = torch.randn(m, k + 7, generator=g)
    wide[:, :k] = x  # rows k + 7 floats apart
    assert torch.equal(cpu_native.linear_native(wide[:, :k], w, b, lib=LIB), got)


@needs_lib
def test_linear_bits_do_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 512, generator=g), torch.randn(4000, 512, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_native.linear_native(x, w, lib=LIB)
        torch.set_num_threads(2)
        assert torch.equal(cpu_native.linear_native(x, w, lib=LIB), one)
    finally:
        torch.set_num_threads(before)


@needs_lib
@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("top_k", [1, 2, 3, 4])  # few experts: rows split; more: whole experts per thread
@pytest.mark.parametrize("h, inter", [(24, 16), (64, 512)])  # one thread; several
def test_moe(threads, tokens, top_k, h, inter):
    e = 6
    g = torch.Generator().manual_seed(top_k * h + tokens)
    w_gate_up, w_down = torch.randn(e, 2 * inter, h, generator=g) * 0.2, torch.randn(e, h, inter, generator=g) * 0.2
    x = torch.randn(tokens, h, generator=g)
    for drop in (False, True):
        ids = torch.stack([torch.randperm(e, generator=g)[:top_k] for _ in range(tokens)])
        if drop:
            ids[0, 0] = -1  # an expert on another shard: skipped
        weights = torch.rand(tokens, top_k, generator=g)
        got = cpu_native.moe_native(x, w_gate_up, w_down, ids, weights, lib=LIB)
        want = fused_moe_ref(x, w_gate_up, w_down, ids, weights)
        torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=1e-5)
        strided = torch.stack([x, x], dim=2).reshape(tokens, 2 * h)[:, ::2]  # x, column stride 2: copied, kept alive
        assert torch.equal(cpu_native.moe_native(strided, w_gate_up, w_down, ids, weights, lib=LIB), got)
        # experts are added in ascending id whatever the order of a token's slots: the same bits
        assert torch.equal(cpu_native.moe_native(x, w_gate_up, w_down, ids.flip(1), weights.flip(1), lib=LIB), got)


@needs_lib
@pytest.mark.parametrize("pairs", [1, 5, 24])
@pytest.mark.parametrize("experts", [2, 3, 6])  # rows split among the threads; whole experts per thread
@pytest.mark.parametrize("h, inter", [(24, 16), (64, 512)])  # one thread; several
def test_pair_outputs(threads, pairs, experts, h, inter):
    """An expert shard's unweighted outputs per (row, expert) pair: each row the reference's, and the
    same bits whatever the other pairs are (a row alone, or after the pairs are shuffled)."""
    g = torch.Generator().manual_seed(pairs * experts + h)
    w_gate_up, w_down = torch.randn(6, 2 * inter, h, generator=g) * 0.2, torch.randn(6, h, inter, generator=g) * 0.2
    x = torch.randn(7, h, generator=g)
    rows, ex = torch.randint(0, 7, (pairs,), generator=g), torch.randint(0, experts, (pairs,), generator=g)
    got = cpu_native.pair_outputs_native(x, w_gate_up, w_down, rows, ex, lib=LIB)
    want = expert_pair_outputs_ref(x, w_gate_up, w_down, rows, ex)
    torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=1e-5)
    perm = torch.randperm(pairs, generator=g)
    assert torch.equal(cpu_native.pair_outputs_native(x, w_gate_up, w_down, rows[perm], ex[perm], lib=LIB), got[perm])
    assert torch.equal(cpu_native.pair_outputs_native(x, w_gate_up, w_down, rows[-1:], ex[-1:], lib=LIB), got[-1:])


@needs_lib
def test_pair_outputs_of_many_pairs():
    """Prefill-sized calls too: the kernel keeps its pair index in a buffer it is given, not on the stack."""
    g = torch.Generator().manual_seed(7)
    w_gate_up, w_down = torch.randn(5, 16, 12, generator=g), torch.randn(5, 12, 8, generator=g)
    x = torch.randn(40, 12, generator=g)
    rows, ex = torch.randint(0, 40, (20000,), generator=g), torch.randint(0, 5, (20000,), generator=g)
    torch.testing.assert_close(cpu_native.pair_outputs_native(x, w_gate_up, w_down, rows, ex, lib=LIB),
                               expert_pair_outputs_ref(x, w_gate_up, w_down, rows, ex), atol=1e-4, rtol=1e-5)


@needs_lib
def test_out_of_range_inputs_are_refused_before_the_c_call():
    w_gate_up, w_down = torch.randn(2, 8, 4), torch.randn(2, 4, 4)
    with pytest.raises(ValueError, match="expert id 2 out of range for 2 experts"):
        cpu_native.moe_native(torch.randn(1, 4), w_gate_up, w_down, torch.tensor([[0, 2]]), torch.ones(1, 2), lib=LIB)
    for rows, ex in (([0, 1], [1, 2]), ([0, 3], [1, 1]), ([0, 0], [-1, 0])):  # bank row 2 of 2; x row 3 of 3; -1
        with pytest.raises(ValueError, match="out of range"):
            cpu_native.pair_outputs_native(torch.randn(3, 4), w_gate_up, w_down, torch.tensor(rows), torch.tensor(ex),
                                           lib=LIB)
    cache = torch.zeros(10, 1, 16)
    for first, keys, n in ((5, 6, 1), (-1, 3, 1), (0, 2, 3)):
        with pytest.raises(ValueError, match="do not fit a cache of 10 slots"):
            cpu_attention.attend_native(torch.zeros(n, 1, 16), cache, cache, first, keys, 1.0, torch.empty(n, 16), lib=LIB)


@needs_lib
def test_moe_with_every_expert_dropped_is_zero():
    w_gate_up, w_down = torch.randn(2, 8, 4), torch.randn(2, 4, 4)
    got = cpu_native.moe_native(torch.randn(2, 4), w_gate_up, w_down, torch.tensor([[-1, -1], [-1, -1]]),
                                torch.ones(2, 2), lib=LIB)
    assert torch.equal(got, torch.zeros(2, 4))


@needs_lib
@pytest.mark.parametrize("shape", [(1, 512), (7, 48), (5, 3, 64), (2, 1000)])
def test_rms_norm(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x, w = torch.randn(*shape, generator=g) * 7, torch.randn(shape[-1], generator=g)
    torch.testing.assert_close(cpu_native.rms_norm_native(x, w, 1e-6, lib=LIB), rms_norm_ref(x, w, 1e-6))
    rows = torch.randn(shape[0], 3 * shape[-1], generator=g)[:, shape[-1]:2 * shape[-1]]  # strided rows
    if len(shape) == 2:
        torch.testing.assert_close(cpu_native.rms_norm_native(rows, w, 1e-5, lib=LIB), rms_norm_ref(rows, w, 1e-5))


@needs_lib
@pytest.mark.parametrize("nh, nkv", [(8, 8), (8, 2), (4, 1)])
@pytest.mark.parametrize("keys, queries", [(1, 1), (7, 1), (7, 7), (300, 1), (300, 5)])
def test_attend(threads, nh, nkv, keys, queries):
    g = torch.Generator().manual_seed(nh * nkv + keys + queries)
    d, slots, first = 64, 400, 37
    q = torch.randn(queries, nh, d, generator=g)
    k_cache, v_cache = torch.randn(slots, nkv, d, generator=g), torch.randn(slots, nkv, d, generator=g)
    out = torch.full((queries, nh * d), float("nan"))
    got = cpu_attention.attend_native(q, k_cache, v_cache, first, keys, 0.125, out, lib=LIB)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, cpu_attention.attention_ref(q, k_cache, v_cache, first, keys, 0.125),
                               atol=1e-5, rtol=1e-5)
    strided = torch.randn(queries, nh + 3, d, generator=g)[:, :nh]  # rows (nh + 3) d floats apart
    strided.copy_(q)
    assert torch.equal(cpu_attention.attend_native(strided, k_cache, v_cache, first, keys, 0.125,
                                                torch.empty(queries, nh * d), lib=LIB), got)
    # each query sees the keys up to its own: the last one alone gets the same
    alone = cpu_attention.attend_native(q[-1:], k_cache, v_cache, first, keys, 0.125, torch.empty(1, nh * d), lib=LIB)
    assert torch.equal(alone, got[-1:])


@needs_lib
def test_rope_in_place_on_a_view_of_the_qkv_rows():
    d, nh, nkv, t = 64, 4, 2, 5
    cos, sin = rope_table(d, 10000.0, 64)
    pos = torch.tensor([0, 3, 9, 10, 63])
    cos, sin = cos[pos][:, None, :], signed_sin(sin)[pos][:, None, :]
    qkv = torch.randn(t, (nh + 2 * nkv) * d, generator=torch.Generator().manual_seed(1))
    q = qkv[:, :nh * d].reshape(t, nh, d)  # rows (nh + 2 nkv) d floats apart
    k = qkv[:, nh * d:(nh + nkv) * d].reshape(t, nkv, d)
    want_q, want_k = apply_rope_rolled(q, cos, sin), apply_rope_rolled(k, cos, sin)
    v_before = qkv[:, (nh + nkv) * d:].clone()
    assert cpu_attention.rope_native(q, cos, sin, lib=LIB) is q and cpu_attention.rope_native(k, cos, sin, lib=LIB) is k
    torch.testing.assert_close(q, want_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k, want_k, atol=1e-6, rtol=1e-6)
    assert torch.equal(qkv[:, (nh + nkv) * d:], v_before)  # v untouched
    with pytest.raises(ValueError, match="heads packed"):
        cpu_attention.rope_native(q.transpose(0, 1), cos, sin, lib=LIB)


@needs_lib
def test_load_passes_its_check_where_it_builds():
    assert cpu_native.load() is not None


@needs_lib
def test_the_cpu_float32_ops_use_the_kernels_and_others_do_not():
    ops = select_kernels("cpu", "torch", torch.float32)
    assert ops.attend is not None and ops.rope_in_place is not None and ops.rms_norm is not rms_norm_ref
    other = select_kernels("cpu", "torch", torch.bfloat16)
    assert other.attend is None and other.rope_in_place is None and other.rms_norm is rms_norm_ref


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(cpu_native.ENV_SWITCH, "0")
    cpu_native.load.cache_clear()
    try:
        assert cpu_native.load() is None
        ops = select_kernels("cpu", "torch", torch.float32)
        assert ops.attend is None and ops.rms_norm is rms_norm_ref
    finally:
        monkeypatch.delenv(cpu_native.ENV_SWITCH)
        cpu_native.load.cache_clear()


def test_a_missing_compiler_is_named(tmp_path):
    with pytest.raises(cpu_native.NativeBuildError, match="no-such-cc"):
        cpu_native.build(compiler="no-such-cc", out_dir=tmp_path)


@needs_lib
def test_built_once_per_source_and_cpu(tmp_path):
    first = cpu_native.build(out_dir=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cpu_native.build(out_dir=tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind


def test_a_compile_error_is_reported(tmp_path, monkeypatch):
    bad = tmp_path / "bad.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(cpu_native, "SOURCES", (bad,))
    if cpu_native.shutil.which("cc") is None:
        pytest.skip("no C compiler")
    with pytest.raises(cpu_native.NativeBuildError, match="failed on bad.c"):
        cpu_native.build(compiler="cc", out_dir=tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
