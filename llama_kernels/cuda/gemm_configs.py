"""Dispatch table of the hand-written CUDA GEMMs (csrc/fp8_gemm.h, csrc/int4_gemm.h).

The kernels are compiled for a short whitelist of tile configurations (ids = the C enums); this
module picks one and a split of K for each call, and raises :class:`NoKernelError` (a ValueError)
before any launch for a shape no compiled kernel supports.

Whitelist (every configuration: 4 warps, 128 output columns per block):

==========  =========  ===========  ============  ==========================================
op          config id  rows of M    K per step    pipeline
==========  =========  ===========  ============  ==========================================
fp8_gemm    0 (m16)    16           64            4 register stages (16-byte loads)
fp8_gemm    1 (m32)    32           64            3 register stages
fp8_gemm    2 (m64)    64           64            2 register stages; any M (grid over M tiles)
fp8_gemm    3 (sm90)   128          128           Hopper only: wgmma + TMA, 4 shared-memory stages,
                                                  128 x 128 tiles, persistent; split_k 1
int4_gemm   0 (m16)    16           128           4 cp.async shared-memory stages
int4_gemm   1 (m64)    64           128           3 cp.async stages; any M (grid over M tiles)
==========  =========  ===========  ============  ==========================================

Shape support: fp8_gemm needs K % 16 == 0 and N % 8 == 0; int4_gemm needs K % 16 == 0, N % 32 == 0
and a group size that divides K and is a multiple of 32 (or K itself: per-channel). All
operands must be 16-byte aligned (outputs and scales 4-byte).

Choice per call: ``TABLE[(op, arch, m_bucket(M), N, K)]`` if present; else, for fp8_gemm with
M > ``SM90_MIN_M`` on compute capability 9.0 (and a build holding sm_90a code) whose 128 x 128
output tiles are at least as many as the SMs (:func:`sm90_tiles`), the wgmma kernel (config
``SM90_CONFIG``, split_k 1); else :func:`default_choice`:
the smallest configuration whose rows cover M (m64 beyond 32 rows), and a split of K that brings
column blocks x M tiles x splits to about ``BLOCKS_PER_SM`` blocks per SM, keeping at least
``MIN_STEPS_PER_SPLIT`` K steps per split (the pipeline needs a few steps to fill). The partial
sums of a split go to a float32 workspace [split_k, M, N] reduced in a fixed order (deterministic).

TABLE is empty: no entry has been timed on a GPU yet. ``python benchmarks/bench_gemm.py --tune
OUT`` on the target GPU times ``launch(..., choice=Choice(config, split_k))`` of
llama_kernels.cuda.fp8_gemm / int4_gemm over ``candidates(op, M)`` for each benchmark shape and
writes the fastest as a TABLE literal to paste here.
"""

from __future__ import annotations

from typing import NamedTuple

from .common import NoKernelError

BLOCK_N = 128  # output columns per block, every configuration
ROWS = {"fp8_gemm": (16, 32, 64), "int4_gemm": (16, 64)}  # rows of M per block, by config id
STEP_K = {"fp8_gemm": 64, "int4_gemm": 128}  # K values per pipeline step
MIN_STEPS_PER_SPLIT = {"fp8_gemm": 4, "int4_gemm": 2}
BLOCKS_PER_SM = {"fp8_gemm": 2, "int4_gemm": 3}  # resident blocks per SM (registers / shared memory)
MAX_SPLIT_K = 16  # the C launchers accept up to 64; more partials than this cost more than they save
SM90_CONFIG = 3  # fp8_gemm: the Hopper wgmma + TMA kernel (csrc/fp8_gemm_sm90.cu), sm_90a builds only
SM90_MIN_M = 64  # ... used for M above this (below it the mma.sync decode kernel streams the weight)
SM90_TILE = 128  # ... whose output tiles are 128 x 128, and which is used only when they fill the SMs
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Choice(NamedTuple):
    config: int  # the C enum value (Fp8GemmConfig / Int4GemmConfig)
    split_k: int  # K slices; > 1 needs a float32 workspace [split_k, M, N]


# (op, arch, m_bucket, N, K) -> (config, split_k). Empty until timed on a GPU (see module doc).
TABLE: dict[tuple[str, str, int, int, int], tuple[int, int]] = {}


def m_bucket(m: int) -> int:
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


def arch_name(capability: tuple[int, int]) -> str:
    """The SASS arch a GPU of this capability runs from this build: sm_80, sm_89, sm_90a."""
    major, minor = capability
    return f"sm_{major}{minor}" + ("a" if major == 9 else "")


def candidates(op: str, m: int) -> list[Choice]:
    """Every (config, split_k) the benchmark may time for M rows."""
    return [Choice(c, s) for c, rows in enumerate(ROWS[op]) if rows >= min(m, ROWS[op][-1])
            for s in (1, 2, 3, 4, 6, 8, 12, 16)]  # fmt: skip


def default_choice(op: str, m: int, n: int, k: int, sms: int) -> Choice:
    rows = ROWS[op]
    config = next((i for i, r in enumerate(rows) if m <= r), len(rows) - 1)
    tiles = -(-n // BLOCK_N) * -(-m // rows[config])
    steps = -(-k // STEP_K[op])
    target = BLOCKS_PER_SM[op] * sms
    split = -(-target // tiles) if tiles < target else 1
    split = max(1, min(split, MAX_SPLIT_K, steps // MIN_STEPS_PER_SPLIT[op]))
    return Choice(config, split)


def built_with_sm90a() -> bool:
    """Whether the installed _C holds sm_90a code (the wgmma kernel exists only there)."""
    try:
        from .. import _build_info
    except ImportError:
        return False
    return _build_info.CUDA_BUILT and "90a" in _build_info.CUDA_ARCHS


def choose(
    op: str, capability: tuple[int, int], m: int, n: int, k: int, sms: int, sm90a: bool | None = None
) -> Choice:
    """sm90a: whether the build holds sm_90a code (default: the installed build's info)."""
    entry = TABLE.get((op, arch_name(capability), m_bucket(m), n, k))
    if entry is not None:
        return Choice(*entry)
    if op == "fp8_gemm" and capability == (9, 0) and m > SM90_MIN_M and sm90_tiles(m, n) >= sms:
        if built_with_sm90a() if sm90a is None else sm90a:
            return Choice(SM90_CONFIG, 1)
    return default_choice(op, m, n, k, sms)


def sm90_tiles(m: int, n: int) -> int:
    """Output tiles of the wgmma kernel (one CTA each, no split-K): below the SM count it leaves SMs
    idle (M = 65..128 at N = 4096 fills 32 of 132), so such shapes take the split-K mma.sync path."""
    return -(-m // SM90_TILE) * -(-n // SM90_TILE)


# --- shape and alignment checks (no GPU needed: they run on CPU or fake tensors too) ----------


def check_fp8_shape(m: int, n: int, k: int) -> None:
    if k % 16:
        raise NoKernelError(f"fp8_gemm: no kernel for this shape: K={k} must be a multiple of 16 (cuda backend)")
    if n % 8:
        raise NoKernelError(f"fp8_gemm: no kernel for this shape: N={n} must be a multiple of 8 (cuda backend)")


def check_int4_shape(n: int, k: int, group_size: int) -> None:
    if k % 16:
        raise NoKernelError(f"int4_gemm: no kernel for this shape: K={k} must be a multiple of 16 (cuda backend)")
    if n % 32:
        raise NoKernelError(
            f"int4_gemm: no kernel for this shape: N={n} must be a multiple of 32 (the repacked weight's "
            "column tile; cuda backend)"
        )
    if group_size <= 0 or k % group_size or (group_size % 32 and group_size != k):
        raise NoKernelError(
            f"int4_gemm: no kernel for this shape: group_size={group_size} must divide K={k} and be a "
            "multiple of 32 (32, 64, 128, ...) or equal K (per-channel) (cuda backend)"
        )
