"""Float32 CPU kernels in C for decode-sized inputs (cpu_native.c, cpu_moe.c, cpu_attention.c,
cpu_sample.c), beside their torch references.

At batch 1 a decode step is ~90 small projections plus ~100 small ops per layer; in torch each
projection of one row took a copy, two transposes and MKL's matrix product, and each op 2-10 us of
dispatch, more with the caches cold from the weights streamed in between. The C kernels stream each
weight row once per step for all of x's rows, on all of torch's threads, with one call per
projection, per RMSNorm, per few tokens' MoE layer and per decode token's attention half.

The C files are compiled together on first use with the system C compiler (`$CC`, else `cc`) for
this CPU (`-march=native`) into the user cache (`$MOE_SERVE_CACHE/kernels`, else
`~/.cache/moe-serve/kernels`), keyed by the sources, the flags and the CPU's features, and loaded
with ctypes. Where that fails (no compiler, a read-only cache) or `MOE_SERVE_NATIVE_KERNELS=0` is
set, `load()` returns None and the torch paths run instead; a loaded library is checked once
against the references.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from kernels.fused_moe import fused_moe_ref
from kernels.linear import linear_ref
from kernels.norm import rms_norm_ref

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = tuple(HERE / f for f in ("cpu_native.c", "cpu_moe.c", "cpu_attention.c", "cpu_sample.c"))  # + cpu_native.h
HEADER = HERE / "cpu_native.h"
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-std=gnu11", "-shared", "-fPIC")
ENV_SWITCH = "MOE_SERVE_NATIVE_KERNELS"

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "ms_linear": [_P, _I, _P, _P, _P, _I, _I, _I, ctypes.c_int],
    "ms_moe": [_P, _I, _P, _I, _P, _I, _P, _P, _I, _I, _I, _I, _P, _P, _P, ctypes.c_int],
    "ms_pair_outputs": [_P, _I, _P, _I, _P, _I, _P, _P, _I, _I, _I, _I, _P, _P, _P, ctypes.c_int],
    "ms_rms_norm": [_P, _I, _P, _F, _P, _I, _I],
    "ms_attend_causal": [_P, _I, _P, _P, _I, _I, _I, _I, _I, _F, _P, _I, _P, ctypes.c_int],
    "ms_rope": [_P, _I, _I, _I, _I, _P, _P],
    "ms_sample_rows": [_P, _I, _I, _P, _P, _P, _P, _P, _P, ctypes.c_int],
    "ms_attention_block": [_P, _P, _P, _I, _I, _P, _P, _F, _P, _P, _P, _P, ctypes.c_int, _F, _P, _P, _P, _P, _I,
                           _I, _I, _I, _I, _F, _P, _P, ctypes.c_int],
}


class NativeBuildError(RuntimeError):
    """The C kernels could not be compiled or loaded here."""


def cache_dir() -> Path:
    root = os.environ.get("MOE_SERVE_CACHE")
    return (Path(root) if root else Path.home() / ".cache/moe-serve") / "kernels"


def _cpu_features() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    return next((ln for ln in lines if ln.startswith(("flags", "Features"))), os.uname().machine)


def build(compiler: str | None = None, out_dir: Path | None = None) -> Path:
    """Compile the C sources (once per source text, compiler, flags and CPU) and return the shared
    library's path."""
    cc = compiler or os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise NativeBuildError(f"no C compiler: {cc!r} is not on PATH (set CC to one)")
    texts = [p.read_text() for p in (*SOURCES, HEADER)]
    key = hashlib.sha256("\0".join([*texts, cc, *FLAGS, _cpu_features()]).encode()).hexdigest()[:16]
    out_dir = out_dir or cache_dir()
    lib = out_dir / f"moe_cpu_{key}.so"
    if lib.is_file():
        return lib
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)  # other processes may build at once
        os.close(fd)
    except OSError as e:
        raise NativeBuildError(f"cannot write the kernel cache {out_dir}: {e}") from e
    names = ", ".join(p.name for p in SOURCES)
    log.info("compiling %s into %s", names, lib)
    proc = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"], capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise NativeBuildError(f"{cc} failed on {names}: {proc.stderr.strip()[-2000:]}")
    os.replace(tmp, lib)
    return lib


def _open(path: Path) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise NativeBuildError(f"cannot load {path}: {e}") from e
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    lib.ms_moe.restype = lib.ms_pair_outputs.restype = ctypes.c_int64
    return lib


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernels, checked against the references; None where they cannot run here."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    try:
        lib = _open(build())
    except NativeBuildError as e:
        log.warning("native CPU kernels unavailable, using torch's: %s", e)
        return None
    if not _agrees(lib):
        log.warning("native CPU kernels disagree with the torch references here; using torch's")
        return None
    return lib


def linear_native(x: Tensor, w: Tensor, bias: Tensor | None = None, lib: ctypes.CDLL | None = None) -> Tensor:
    """`linear_ref` for float32 CPU x [T, in] (rows may be strided), w [out, in] contiguous."""
    lib = lib or load()
    m, k = x.shape
    n = w.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    lib.ms_linear(x.data_ptr(), x.stride(0), w.data_ptr(), None if bias is None else bias.data_ptr(),
                  y.data_ptr(), m, n, k, torch.get_num_threads())
    return y


def moe_native(x: Tensor, w_gate_up: Tensor, w_down: Tensor, topk_ids: Tensor, topk_weights: Tensor,
               lib: ctypes.CDLL | None = None) -> Tensor:
    """`fused_moe_ref` for a few float32 CPU tokens x [T, H] (cpu_moe.c) over banks w_gate_up
    [E, 2I, H] and w_down [E, H, I] whose experts' matrices are each contiguous: each expert once on
    its tokens, in ascending id order, negative ids skipped."""
    lib = lib or load()
    t, h = x.shape
    inter = w_down.shape[2]
    x, ids, weights = x.contiguous(), topk_ids.to(torch.int64).contiguous(), topk_weights.float().contiguous()
    threads, e, pairs = torch.get_num_threads(), w_gate_up.shape[0], ids.numel()
    out = torch.empty(t, h, dtype=torch.float32)
    scratch = torch.empty(max(threads, 1) * t * (h + inter) + 2 * t * inter + pairs, dtype=torch.float32)
    index = _pair_index(pairs, e)
    bad = lib.ms_moe(x.data_ptr(), t, w_gate_up.data_ptr(), w_gate_up.stride(0), w_down.data_ptr(),
                     w_down.stride(0), ids.data_ptr(), weights.data_ptr(), ids.shape[-1], h, inter, e,
                     out.data_ptr(), scratch.data_ptr(), index.data_ptr(), threads)
    if bad >= 0:  # checked in C before anything is read
        raise ValueError(f"expert id {bad} out of range for {w_gate_up.shape[0]} experts")
    return out


def _pair_index(pairs: int, experts: int) -> Tensor:
    """The int64 buffer cpu_moe.c's counting sort of `pairs` (token, expert) pairs over `experts` uses."""
    return torch.empty(3 * pairs + 2 * experts + 2, dtype=torch.int64)


def pair_outputs_native(x: Tensor, w_gate_up: Tensor, w_down: Tensor, pair_row: Tensor, pair_expert: Tensor,
                        lib: ctypes.CDLL | None = None) -> Tensor:
    """`expert_pair_outputs_ref` for float32 CPU x [n, H] (cpu_moe.c): [P, H], row p the unweighted
    output of bank row pair_expert[p] on x[pair_row[p]], over banks w_gate_up [E, 2I, H] and w_down
    [E, H, I] whose experts' matrices are each contiguous; each expert once on its pairs."""
    lib = lib or load()
    n, h = x.shape
    p, inter = pair_row.numel(), w_down.shape[2]
    x, rows, ex = x.contiguous(), pair_row.to(torch.int64).contiguous(), pair_expert.to(torch.int64).contiguous()
    threads = torch.get_num_threads()
    out = torch.empty(p, h, dtype=torch.float32)
    scratch = torch.empty(max(threads, 2) * p * inter, dtype=torch.float32)
    index = _pair_index(p, w_gate_up.shape[0])
    bad = lib.ms_pair_outputs(x.data_ptr(), n, w_gate_up.data_ptr(), w_gate_up.stride(0), w_down.data_ptr(),
                              w_down.stride(0), rows.data_ptr(), ex.data_ptr(), p, h, inter, w_gate_up.shape[0],
                              out.data_ptr(), scratch.data_ptr(), index.data_ptr(), threads)
    if bad >= 0:  # checked in C before anything is read
        raise ValueError(f"pair {bad}: bank row {int(ex[bad])} of {w_gate_up.shape[0]} on x row {int(rows[bad])} "
                         f"of {n}: out of range")
    return out


def rms_norm_native(x: Tensor, weight: Tensor, eps: float, lib: ctypes.CDLL | None = None) -> Tensor:
    """`rms_norm_ref` for float32 CPU x [..., D] (2-D rows may be strided) and a contiguous weight [D]."""
    lib = lib or load()
    d = x.shape[-1]
    if x.dim() != 2 or x.stride(1) != 1:
        return rms_norm_native(x.reshape(-1, d).contiguous(), weight, eps, lib).view(x.shape)
    out = torch.empty(x.shape, dtype=torch.float32)
    lib.ms_rms_norm(x.data_ptr(), x.stride(0), weight.data_ptr(), eps, out.data_ptr(), x.shape[0], d)
    return out


def sample_native(logits: Tensor, temperatures: list[float], top_ks: list[int], top_ps: list[float],
                  uniforms: list[float], lib: ctypes.CDLL | None = None) -> list[int]:
    """One token per row of float32 CPU logits [R, V], drawn at uniforms[r] from softmax(row /
    temperatures[r]) kept to its top_ks[r] largest (0: all; ties with the k-th kept, as HF does) and
    to the smallest set of the largest whose mass reaches top_ps[r] (1: all), in token order
    (cpu_sample.c). cluster/sampler.py's torch path draws the same tokens, except among tokens tied
    with the k-th, of which its topk keeps exactly k."""
    lib = lib or load()
    rows = logits.contiguous()
    r, v = rows.shape
    threads = max(torch.get_num_threads(), 1)
    scratch = torch.empty(threads * 2 * v, dtype=torch.float32)
    out = (ctypes.c_int64 * r)()
    lib.ms_sample_rows(rows.data_ptr(), r, v, (ctypes.c_float * r)(*temperatures), (ctypes.c_int64 * r)(*top_ks),
                       (ctypes.c_float * r)(*top_ps), (ctypes.c_double * r)(*uniforms), scratch.data_ptr(), out,
                       threads)
    return list(out)


def _agrees(lib: ctypes.CDLL) -> bool:
    from kernels.cpu_attention import attend_native, attention_ref, rope_native  # imports this module

    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 40, generator=g), torch.randn(70, 40, generator=g), torch.randn(70, generator=g)
    gu, dn = torch.randn(4, 2 * 24, 40, generator=g), torch.randn(4, 40, 24, generator=g)
    ids, wts = torch.tensor([[2, 0]]), torch.tensor([[0.7, 0.3]])
    q, kc, vc = torch.randn(4, 16, generator=g), torch.randn(20, 2, 16, generator=g), torch.randn(20, 2, 16, generator=g)
    cos, sin = torch.randn(2, 1, 16, generator=g), torch.randn(2, 1, 16, generator=g)
    close = functools.partial(torch.allclose, atol=1e-4, rtol=1e-4)
    return (close(linear_native(x, w, b, lib), linear_ref(x, w, b))
            and close(moe_native(x[:2], gu, dn, ids.repeat(2, 1), wts.repeat(2, 1), lib),
                      fused_moe_ref(x[:2], gu, dn, ids.repeat(2, 1), wts.repeat(2, 1)))
            and close(rms_norm_native(x, b[:40], 1e-6, lib), rms_norm_ref(x, b[:40], 1e-6))
            and close(attend_native(q[None], kc, vc, 3, 9, 0.25, torch.empty(1, 64), lib),
                      attention_ref(q[None], kc, vc, 3, 9, 0.25))
            and close(rope_native(kc[:2].clone(), cos, sin, lib), kc[:2] * cos + kc[:2].roll(8, -1) * sin))
