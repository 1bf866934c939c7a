"""cuda backend of ops.int4_gemm: the Marlin-style kernel of csrc/int4_gemm.h (sm_80 and newer).

The kernel reads the weight in its own tile layout, produced once per weight and activation
dtype by :func:`repack_int4` (plain torch ops on the weight's device; layout documented in
csrc/int4_gemm.h and below). The result is cached on the Int4Weight object, so the first
``ops.int4_gemm(..., backend="cuda")`` call repacks and later calls reuse it.

Runner usage: the model calls ``ops.prepare_int4`` once per INT4 layer right after loading, which
(when this backend is selected) runs :func:`repack_in_place`: the repacked words replace qweight
(no second copy), before any CUDA-graph capture or torch.compile tracing, so nothing is allocated
or converted in the decode loop. A plain ``repack_int4(w, dtype)`` instead keeps both layouts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import backends
from ..int4 import Int4Weight
from .common import DTYPE_CODE, NoKernelError, check_aligned, ext, ptr, stream
from .gemm_configs import Choice, check_int4_shape, choose

#: Nibble of a repacked word that holds K offset o (0..7) of the thread's 8 values: the pair
#: (o = 2r, 2r + 1) sits in nibbles (r, r + 4), i.e. in the low bits of the two 16-bit halves of
#: q >> 4r, which is what the kernel's lop3 magic-number conversion extracts.
NIBBLE_POS = (0, 4, 1, 5, 2, 6, 3, 7)
#: Magic bias of the int4 -> float conversion: MAGIC + v is exactly representable (1024 in fp16,
#: 128 in bf16, whose 7 mantissa bits still hold 0..15).
MAGIC = {torch.float16: 1024.0, torch.bfloat16: 128.0}
_CACHE_ATTR = "_cuda_int4_packed"


class Int4Packed(NamedTuple):
    """The repacked weight of one Int4Weight for one activation dtype."""

    qpacked: torch.Tensor  # int32 [N / 32, (Kp / 32) * 128], Kp = K rounded up to 32
    scale_zero: torch.Tensor  # dtype [K / G, N / 32, 8, 8]: 4 scales then 4 (MAGIC + zero) per lane group
    group_size: int
    n: int
    k: int
    dtype: torch.dtype


def repack_int4(w: Int4Weight, dtype: torch.dtype = torch.bfloat16) -> Int4Packed:
    """Repack ``w`` into the cuda kernel's tile layout for activations of ``dtype`` (cached on ``w``).

    Layout (nt = n // 32, kc = k // 32, lane = 4 g + t, i = n8 tile within the 32 columns):
      * qpacked[nt, (kc * 32 + lane) * 4 + i] holds q[32 nt + 8 i + g, 32 kc + 8 t + o] for
        o = 0..7 in nibble NIBBLE_POS[o]; K positions past K are 0.
      * scale_zero[grp, nt, g, i] = round_dtype(s[32 nt + 8 i + g, grp]) and
        scale_zero[grp, nt, g, 4 + i] = MAGIC[dtype] + z[same], z = 8 when symmetric.
    Raises NoKernelError (ValueError) for shapes the kernel does not support.
    """
    if dtype not in MAGIC:
        raise TypeError(f"repack_int4: dtype={dtype}; expected torch.float16 or torch.bfloat16")
    cache = w.__dict__.setdefault(_CACHE_ATTR, {})
    hit = cache.get(dtype)
    if hit is not None and hit.qpacked.device == w.qweight.device:
        return hit
    if any(p.qpacked.data_ptr() == w.qweight.data_ptr() for p in cache.values()):  # see repack_in_place
        raise NoKernelError(f"int4_gemm: the weight was repacked in place for {list(cache)}; x is {dtype}")
    n, k = w.shape
    g_size = w.group_size
    check_int4_shape(n, k, g_size)
    kp = -(-k // 32) * 32
    kc = kp // 32
    q = w.qweight
    if kp != k:
        q = torch.nn.functional.pad(q, (0, (kp - k) // 8))
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=q.device)
    nib = ((q.unsqueeze(-1) >> shifts) & 15).to(torch.int64)  # [N, Kp/8, 8], value o at index o
    pos = torch.tensor(NIBBLE_POS, dtype=torch.int64, device=q.device) * 4
    words = (nib << pos).sum(-1)  # [N, Kp/8] in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    # n = 32 nt + 8 i + g, word index = 4 kc + t  ->  [nt, kc, g, t, i]
    words = words.reshape(n // 32, 4, 8, kc, 4).permute(0, 3, 2, 4, 1).contiguous()
    qpacked = words.reshape(n // 32, kc * 128)

    ng = k // g_size
    s = w.scales.to(dtype)
    z = w.zeros.to(torch.float32) if w.zeros is not None else torch.full(s.shape, 8.0, device=s.device)
    zz = (z + MAGIC[dtype]).to(dtype)  # exact: 1024 + z in fp16, 128 + z in bf16

    def lay(a: torch.Tensor) -> torch.Tensor:  # [N, ng] -> [ng, nt, g, i]
        return a.t().reshape(ng, n // 32, 4, 8).permute(0, 1, 3, 2)

    scale_zero = torch.cat([lay(s), lay(zz)], dim=-1).contiguous()
    packed = Int4Packed(qpacked, scale_zero, g_size, n, k, dtype)
    cache[dtype] = packed
    return packed


def repack_in_place(w: Int4Weight, dtype: torch.dtype) -> Int4Weight:
    """Repack ``w`` once, at load, in place of its layout: an Int4Weight whose qweight is the kernel's
    words (a [N, K/8] view of qpacked: the same bytes when K % 32 == 0), the repack cached on it, so
    the plain layout is freed (no second copy) and nothing is repacked at the first call. Only this
    backend reads it (Int4Linear then calls int4_gemm with backend="cuda"). The cuda backend's
    load-time hook (backends.Impl.prepare, called by ops.prepare_int4)."""
    packed = repack_int4(w, dtype)
    if packed.qpacked.numel() != w.qweight.numel():  # K padded to 32: both layouts stay
        return w
    out = Int4Weight(packed.qpacked.view(w.qweight.shape), w.scales, w.zeros, w.group_size, w.perm)
    out.__dict__[_CACHE_ATTR] = {dtype: packed}
    return out


def plan(x: torch.Tensor, packed: Int4Packed, capability: tuple[int, int] = (9, 0), sms: int = 132) -> Choice:
    """Checks beyond ops.int4_gemm's, then the configuration; NoKernelError before any launch."""
    m, k = x.shape
    check_int4_shape(packed.n, k, packed.group_size)
    if x.dtype != packed.dtype:
        raise NoKernelError(f"int4_gemm: x is {x.dtype} but the weight was repacked for {packed.dtype}")
    check_aligned("int4_gemm", 16, x=x, qpacked=packed.qpacked, scale_zero=packed.scale_zero)
    return choose("int4_gemm", capability, m, packed.n, k, sms)


def launch(x: torch.Tensor, qpacked: torch.Tensor, scale_zero: torch.Tensor, n: int, group_size: int,
           choice: Choice | None = None) -> torch.Tensor:  # fmt: skip
    """y = x @ W.T from the repacked tensors, with an explicit (config, split_k) if given."""
    dev = x.device
    index = backends.device_index(dev)
    m, k = x.shape
    packed = Int4Packed(qpacked, scale_zero, group_size, n, k, x.dtype)
    planned = plan(x, packed, backends.device_capability(index), backends.sm_count(index))  # checks, always
    choice = choice or planned
    y = torch.empty(m, n, dtype=x.dtype, device=dev)
    ws = torch.empty(choice.split_k, m, n, dtype=torch.float32, device=dev) if choice.split_k > 1 else None
    ext().int4_gemm(
        ptr(x), ptr(qpacked), ptr(scale_zero), ptr(y), ptr(ws), m, n, k, group_size, DTYPE_CODE[x.dtype],
        choice.config, choice.split_k, stream(x),
    )  # fmt: skip
    return y


@torch.library.custom_op("llama_kernels::int4_gemm_cuda", mutates_args=(), device_types="cuda")
def int4_gemm_packed(
    x: torch.Tensor, qpacked: torch.Tensor, scale_zero: torch.Tensor, n: int, group_size: int
) -> torch.Tensor:
    """y [M, n] = x @ W.T for a weight repacked by repack_int4 (x's columns already permuted)."""
    return launch(x, qpacked, scale_zero, n, group_size)


@int4_gemm_packed.register_fake
def _(x, qpacked, scale_zero, n, group_size):
    return x.new_empty(x.shape[0], n)


def int4_gemm(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """cuda backend of ops.int4_gemm (arguments validated there); repacks w on first use (cached)."""
    n, k = w.shape
    check_int4_shape(n, k, w.group_size)  # before the repack allocates anything
    packed = repack_int4(w, x.dtype)
    if w.perm is not None:
        x = x.index_select(1, w.perm)
    return int4_gemm_packed(x, packed.qpacked, packed.scale_zero, n, packed.group_size)


backends.register(
    "int4_gemm", "cuda", int4_gemm, min_capability=(8, 0),
    instead="the INT4 kernel needs Ampere (sm_80) or newer; use backend='torch'", prepare=repack_in_place,
)  # fmt: skip

__all__ = ["Int4Packed", "NIBBLE_POS", "MAGIC", "repack_int4", "repack_in_place", "int4_gemm", "int4_gemm_packed",
           "launch", "plan"]  # fmt: skip
