"""Launch configurations of the Triton GEMMs (fp8_gemm, int4_gemm), chosen per call without autotuning.

``TABLES[(arch, SM count)][op][(m_bucket(M), N, K)]`` holds a configuration for the Llama 3.1
projections that benchmarks/bench_gemm.py times (8B at TP 1, 70B and 405B at TP 8; M = 1, 16, 64,
256, 4096) on one GPU model: a split-K tuned for 132 SMs is wrong for an L4's 58, so a GPU, or a
shape, without a table entry gets :func:`default_config`, computed for its architecture and SM
count. Two regimes:

- decode (M <= DECODE_MAX_M): the weight is streamed once, so the grid must fill the GPU from N
  alone: BLOCK_M covers all of M (16 minimum for tl.dot), and SPLIT_K splits K until
  tiles x splits reaches about two programs per SM (one program per work item, not persistent).
- prefill: compute-bound; 128x128 tiles, persistent programs (one per SM), GROUP_M grouping.

The seed entries below (TABLE, for sm_90 with 132 SMs: H100/H200 SXM) are what
:func:`default_config` picks there; they have not been timed yet. To regenerate, or add a GPU: for
each key, time ``fp8_gemm.launch(..., config=c)`` / ``int4_gemm.launch(..., config=c)`` over
``candidates(op, M)`` on the target GPU (``bench_gemm.py --tune``), keep the fastest, and paste
``format_table(new_table)`` as that GPU's entry of TABLES.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from .. import backends

DECODE_MAX_M = 64  # M up to this runs the decode (split-K) configurations
M_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)  # larger M uses the 4096 entry
MAX_SPLIT_K = 16  # beyond this the float32 partials cost more traffic than the weight itself
CPU_GPU = ((9, 0), 132)  # (capability, SM count) assumed under the interpreter: run what an H100 would


class Gpu(NamedTuple):
    """What the configurations depend on: the architecture and the number of SMs."""

    capability: tuple[int, int]
    sms: int


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int  # row tiles per L2 group in the persistent tile order
    split_k: int  # K slices reduced in order by a second kernel (1: fused epilogue)
    num_warps: int
    num_stages: int


# fmt: off
TABLE: dict[str, dict[tuple[int, int, int], tuple[int, ...]]] = {
    # (m_bucket, N, K): (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT_K, num_warps, num_stages)
    "fp8_gemm": {
        (16, 6144, 4096): (16, 64, 128, 1, 2, 4, 4),
        (16, 4096, 4096): (16, 64, 128, 1, 4, 4, 4),
        (16, 28672, 4096): (16, 64, 128, 1, 1, 4, 4),
        (16, 4096, 14336): (16, 64, 128, 1, 4, 4, 4),
        (16, 1280, 8192): (16, 64, 128, 1, 13, 4, 4),
        (16, 8192, 1024): (16, 64, 128, 1, 2, 4, 4),
        (16, 7168, 8192): (16, 64, 128, 1, 2, 4, 4),
        (16, 8192, 3584): (16, 64, 128, 1, 2, 4, 4),
        (16, 2304, 16384): (16, 64, 128, 1, 7, 4, 4),
        (16, 16384, 2048): (16, 64, 128, 1, 1, 4, 4),
        (16, 13312, 16384): (16, 64, 128, 1, 1, 4, 4),
        (16, 16384, 6656): (16, 64, 128, 1, 1, 4, 4),
        (64, 6144, 4096): (64, 64, 128, 1, 2, 4, 4),
        (64, 4096, 4096): (64, 64, 128, 1, 4, 4, 4),
        (64, 28672, 4096): (64, 64, 128, 1, 1, 4, 4),
        (64, 4096, 14336): (64, 64, 128, 1, 4, 4, 4),
        (64, 1280, 8192): (64, 64, 128, 1, 13, 4, 4),
        (64, 8192, 1024): (64, 64, 128, 1, 2, 4, 4),
        (64, 7168, 8192): (64, 64, 128, 1, 2, 4, 4),
        (64, 8192, 3584): (64, 64, 128, 1, 2, 4, 4),
        (64, 2304, 16384): (64, 64, 128, 1, 7, 4, 4),
        (64, 16384, 2048): (64, 64, 128, 1, 1, 4, 4),
        (64, 13312, 16384): (64, 64, 128, 1, 1, 4, 4),
        (64, 16384, 6656): (64, 64, 128, 1, 1, 4, 4),
        (256, 6144, 4096): (128, 128, 128, 8, 1, 8, 4),
        (256, 4096, 4096): (128, 128, 128, 8, 1, 8, 4),
        (256, 28672, 4096): (128, 128, 128, 8, 1, 8, 4),
        (256, 4096, 14336): (128, 128, 128, 8, 1, 8, 4),
        (256, 1280, 8192): (128, 128, 128, 8, 1, 8, 4),
        (256, 8192, 1024): (128, 128, 128, 8, 1, 8, 4),
        (256, 7168, 8192): (128, 128, 128, 8, 1, 8, 4),
        (256, 8192, 3584): (128, 128, 128, 8, 1, 8, 4),
        (256, 2304, 16384): (128, 128, 128, 8, 1, 8, 4),
        (256, 16384, 2048): (128, 128, 128, 8, 1, 8, 4),
        (256, 13312, 16384): (128, 128, 128, 8, 1, 8, 4),
        (256, 16384, 6656): (128, 128, 128, 8, 1, 8, 4),
        (4096, 6144, 4096): (128, 128, 128, 8, 1, 8, 4),
        (4096, 4096, 4096): (128, 128, 128, 8, 1, 8, 4),
        (4096, 28672, 4096): (128, 128, 128, 8, 1, 8, 4),
        (4096, 4096, 14336): (128, 128, 128, 8, 1, 8, 4),
        (4096, 1280, 8192): (128, 128, 128, 8, 1, 8, 4),
        (4096, 8192, 1024): (128, 128, 128, 8, 1, 8, 4),
        (4096, 7168, 8192): (128, 128, 128, 8, 1, 8, 4),
        (4096, 8192, 3584): (128, 128, 128, 8, 1, 8, 4),
        (4096, 2304, 16384): (128, 128, 128, 8, 1, 8, 4),
        (4096, 16384, 2048): (128, 128, 128, 8, 1, 8, 4),
        (4096, 13312, 16384): (128, 128, 128, 8, 1, 8, 4),
        (4096, 16384, 6656): (128, 128, 128, 8, 1, 8, 4),
    },
    "int4_gemm": {
        (16, 6144, 4096): (16, 64, 128, 1, 2, 8, 3),
        (16, 4096, 4096): (16, 64, 128, 1, 4, 8, 3),
        (16, 28672, 4096): (16, 64, 128, 1, 1, 8, 3),
        (16, 4096, 14336): (16, 64, 128, 1, 4, 8, 3),
        (16, 1280, 8192): (16, 64, 128, 1, 13, 8, 3),
        (16, 8192, 1024): (16, 64, 128, 1, 2, 8, 3),
        (16, 7168, 8192): (16, 64, 128, 1, 2, 8, 3),
        (16, 8192, 3584): (16, 64, 128, 1, 2, 8, 3),
        (16, 2304, 16384): (16, 64, 128, 1, 7, 8, 3),
        (16, 16384, 2048): (16, 64, 128, 1, 1, 8, 3),
        (16, 13312, 16384): (16, 64, 128, 1, 1, 8, 3),
        (16, 16384, 6656): (16, 64, 128, 1, 1, 8, 3),
        (64, 6144, 4096): (64, 64, 128, 1, 2, 8, 3),
        (64, 4096, 4096): (64, 64, 128, 1, 4, 8, 3),
        (64, 28672, 4096): (64, 64, 128, 1, 1, 8, 3),
        (64, 4096, 14336): (64, 64, 128, 1, 4, 8, 3),
        (64, 1280, 8192): (64, 64, 128, 1, 13, 8, 3),
        (64, 8192, 1024): (64, 64, 128, 1, 2, 8, 3),
        (64, 7168, 8192): (64, 64, 128, 1, 2, 8, 3),
        (64, 8192, 3584): (64, 64, 128, 1, 2, 8, 3),
        (64, 2304, 16384): (64, 64, 128, 1, 7, 8, 3),
        (64, 16384, 2048): (64, 64, 128, 1, 1, 8, 3),
        (64, 13312, 16384): (64, 64, 128, 1, 1, 8, 3),
        (64, 16384, 6656): (64, 64, 128, 1, 1, 8, 3),
        (256, 6144, 4096): (128, 128, 64, 8, 1, 8, 3),
        (256, 4096, 4096): (128, 128, 64, 8, 1, 8, 3),
        (256, 28672, 4096): (128, 128, 64, 8, 1, 8, 3),
        (256, 4096, 14336): (128, 128, 64, 8, 1, 8, 3),
        (256, 1280, 8192): (128, 128, 64, 8, 1, 8, 3),
        (256, 8192, 1024): (128, 128, 64, 8, 1, 8, 3),
        (256, 7168, 8192): (128, 128, 64, 8, 1, 8, 3),
        (256, 8192, 3584): (128, 128, 64, 8, 1, 8, 3),
        (256, 2304, 16384): (128, 128, 64, 8, 1, 8, 3),
        (256, 16384, 2048): (128, 128, 64, 8, 1, 8, 3),
        (256, 13312, 16384): (128, 128, 64, 8, 1, 8, 3),
        (256, 16384, 6656): (128, 128, 64, 8, 1, 8, 3),
        (4096, 6144, 4096): (128, 128, 64, 8, 1, 8, 3),
        (4096, 4096, 4096): (128, 128, 64, 8, 1, 8, 3),
        (4096, 28672, 4096): (128, 128, 64, 8, 1, 8, 3),
        (4096, 4096, 14336): (128, 128, 64, 8, 1, 8, 3),
        (4096, 1280, 8192): (128, 128, 64, 8, 1, 8, 3),
        (4096, 8192, 1024): (128, 128, 64, 8, 1, 8, 3),
        (4096, 7168, 8192): (128, 128, 64, 8, 1, 8, 3),
        (4096, 8192, 3584): (128, 128, 64, 8, 1, 8, 3),
        (4096, 2304, 16384): (128, 128, 64, 8, 1, 8, 3),
        (4096, 16384, 2048): (128, 128, 64, 8, 1, 8, 3),
        (4096, 13312, 16384): (128, 128, 64, 8, 1, 8, 3),
        (4096, 16384, 6656): (128, 128, 64, 8, 1, 8, 3),
    },
}
# fmt: on


TABLES: dict[tuple[str, int], dict] = {("sm_90", 132): TABLE}  # (arch, SM count) -> a tuned TABLE


def m_bucket(m: int) -> int:
    """The smallest bucket >= M (4096 for anything larger)."""
    return next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1])


def _split_k(tiles: int, k_tiles: int, sms: int) -> int:
    """Splits of K giving about two programs per SM (memory-bound: several in flight per SM), at least
    2 K tiles per split."""
    return max(1, min(2 * sms // tiles, k_tiles // 2, MAX_SPLIT_K))


def default_config(op: str, m: int, n: int, k: int, gpu: Gpu) -> GemmConfig:
    """The heuristic configuration for a GPU or shape missing from TABLES: split-K from the GPU's SM
    count, tiles that fit its registers (every one compiles without spills on sm_80, sm_89, sm_90)."""
    if m <= DECODE_MAX_M:
        block_m = max(16, triton.next_power_of_2(m))
        block_n, block_k = 64, 128
        tiles = -(-m // block_m) * -(-n // block_n)
        split = _split_k(tiles, -(-k // block_k), gpu.sms)
        if op == "fp8_gemm":
            return GemmConfig(block_m, block_n, block_k, 1, split, 4, 4)
        return GemmConfig(block_m, block_n, block_k, 1, split, 8, 3)  # 8 warps: room for the dequantized tile
    block_m = 64 if m <= 128 else 128
    warps = 8 if block_m == 128 else 4
    if op == "fp8_gemm":
        return GemmConfig(block_m, 128, 128, 8, 1, warps, 4)
    if gpu.capability < (9, 0):  # mma.sync holds the dequantized tile in registers: 4 warps spill 80+ B/thread
        warps = 8
    return GemmConfig(block_m, 128, 64, 8, 1, warps, 3)


def arch_name(capability: tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


def get_config(op: str, m: int, n: int, k: int, gpu: Gpu) -> GemmConfig:
    """The configuration TABLES holds for this GPU (arch, SM count) and (m_bucket(M), N, K), else default_config."""
    entry = TABLES.get((arch_name(gpu.capability), gpu.sms), {}).get(op, {}).get((m_bucket(m), n, k))
    return GemmConfig(*entry) if entry is not None else default_config(op, m, n, k, gpu)


def candidates(op: str, m: int) -> list[GemmConfig]:
    """The search space the benchmark times to regenerate TABLE entries of M bucket m_bucket(m).
    Some do not fit every GPU (shared memory, registers): skip those that fail to launch."""
    if m <= DECODE_MAX_M:
        block_m = max(16, triton.next_power_of_2(m))
        return [GemmConfig(block_m, bn, bk, 1, s, w, st)
                for bn in (32, 64, 128) for bk in (64, 128, 256) for s in (1, 2, 4, 8, 16)
                for w in (4, 8) for st in (3, 4)]  # fmt: skip
    return [GemmConfig(bm, bn, bk, 8, 1, w, st)
            for bm in (64, 128) for bn in (128, 256) for bk in ((64, 128) if op == "fp8_gemm" else (32, 64))
            for w in (4, 8) for st in (3, 4)]  # fmt: skip


def format_table(table: dict[str, dict[tuple[int, int, int], tuple[int, ...]]]) -> str:
    """TABLE as the Python literal to paste into this file."""
    lines = ["TABLE: dict[str, dict[tuple[int, int, int], tuple[int, ...]]] = {"]
    for op, entries in table.items():
        lines.append(f'    "{op}": {{')
        lines += [f"        {key}: {tuple(cfg)}," for key, cfg in entries.items()]
        lines.append("    },")
    return "\n".join(lines + ["}"])


def gpu_of(device: torch.device) -> Gpu:
    """The architecture and SM count of `device` (CPU_GPU under the interpreter)."""
    if device.type != "cuda":
        return Gpu(*CPU_GPU)
    index = backends.device_index(device)
    return Gpu(backends.device_capability(index), backends.sm_count(index))


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (persistent grids launch one program per SM)."""
    return gpu_of(device).sms
