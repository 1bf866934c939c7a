"""`llama-kernels selftest`: every op on every backend that can run it, against the reference.

On a CUDA GPU: a fixed set of shapes (the Llama 3.1 8B layer, and one GPU's share of 70B and 405B
at tensor parallel 8; M = 1, 16, 128, 4096 rows), each backend's output compared with the torch
backend (``llama_kernels.reference``) by |out - ref| / |ref|. ``--bench`` also times each (CUDA
events, median) and reports GB/s or TFLOP/s and the percent of the roofline (the copy bandwidth and
matmul throughput measured at the start; the nearer bound counts). The result of each kernel
backend (cuda, triton) per op is recorded for this GPU model in the user's record
(``backends.user_record_path()``), which automatic dispatch reads: a cuda kernel that passed here is
used, one that failed is never chosen, and after ``--bench`` the fastest passing backend per op and
row bucket is preferred.

Without a GPU: the Triton kernels under the Triton interpreter at small shapes (nothing recorded).

``--compile-workers N`` (GPU): every Triton specialization the run will launch is compiled first, in N
processes (:func:`precompile_triton`, ``llama_kernels.precompile``).

Adding an op: one entry in ``CASES`` (a builder yielding :class:`Case` objects for the device).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import backends, ops, precompile, reference
from .selftest_cli import add_arguments, selftest_argv
from .measure import LLAMA31_PROJECTIONS, environment, measure_peaks, time_budgeted

FP8 = torch.float8_e4m3fn
GPU_ROWS = (1, 16, 128, 4096)  # M of the GEMM, norm and RoPE cases on a GPU
# Tolerances on |out - ref| / |ref|: one rounding to the output dtype (bf16: 2^-9 relative, ~2.3e-3 as a
# norm), with room for a different float32 summation order; INT4 GEMMs also round the dequantized
# weight to bf16; FP8 outputs are compared dequantized, where a rare 1-ulp rounding flip shows.
TOL_BF16 = 8e-3
TOL_INT4 = 1.6e-2
TOL_FP8 = 1e-2
ATTENTION_MODELS = {"8B": (32, 8), "70B/8": (8, 1), "405B/8": (16, 1)}  # query heads, KV heads per GPU
HIDDEN = {"8B": 4096, "70B": 8192, "405B": 16384}
TIME_BUDGET_S = 0.02  # per timed row (the whole GPU run stays under 2 minutes)


@dataclass
class Case:
    """One shape of one op: fresh arguments, the tensors compared, the roofline's numerators."""

    shape: str  # what the table shows, e.g. "8B gate_up 16x28672x4096"
    make: Callable[[], tuple]  # the op's positional arguments (fresh in-place outputs on each call)
    compare: Callable[[tuple, object], list[torch.Tensor]]  # (args, result) -> tensors compared with the reference's
    tol: float
    bytes: int  # bytes that must cross memory at least once
    flops: int = 0
    fp8_math: bool = False  # the FLOP roofline is FP8's, not bf16's


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """|out - ref| / |ref| in float64; inf when out has a non-finite value the reference has not."""
    out, ref = out.double(), ref.double()
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def poison_allocator(device: torch.device, nbytes: int = 256 << 20) -> None:
    """Fill a large freed block of the CUDA caching allocator with NaN bytes, so outputs a kernel
    allocates and fails to write show up as NaN instead of stale correct-looking values."""
    if device.type == "cuda":
        junk = torch.empty(nbytes, dtype=torch.uint8, device=device)
        junk.fill_(0xFF)  # 0xFFFF is NaN in fp16/bf16, 0xFFFFFFFF in fp32, 0xFF in e4m3fn
        del junk


# --- case builders: (device, small) -> cases -------------------------------------------------


def _rand(g: torch.Generator, device, *shape, scale: float = 1.0, dtype=torch.bfloat16) -> torch.Tensor:
    return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)


def _dequant(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float().reshape(-1, *([1] * (q.dim() - 1)))


def _gemm_shapes(small: bool) -> tuple[dict[str, tuple[int, int]], tuple[int, ...]]:
    return ({"small": (96, 256), "small odd": (64, 160)}, (1, 17)) if small else (LLAMA31_PROJECTIONS, GPU_ROWS)


def fp8_gemm_cases(device: torch.device, small: bool) -> Iterator[Case]:
    g = torch.Generator(device).manual_seed(1)
    shapes, rows = _gemm_shapes(small)
    for name, (n, k) in shapes.items():
        wq, ws = reference.quantize_fp8(_rand(g, device, n, k, scale=0.02))
        for m in rows:
            xq, xs = reference.quantize_fp8(_rand(g, device, m, k))
            yield Case(f"{name} {m}x{n}x{k}", lambda xq=xq, xs=xs, wq=wq, ws=ws: (xq, xs, wq, ws, torch.bfloat16),
                       lambda args, y: [y], TOL_BF16, m * k + n * k + 2 * m * n, 2 * m * n * k, fp8_math=True)  # fmt: skip


def int4_gemm_cases(device: torch.device, small: bool) -> Iterator[Case]:
    g = torch.Generator(device).manual_seed(2)
    shapes, rows = _gemm_shapes(small)
    for name, (n, k) in shapes.items():
        group = 128 if k % 128 == 0 else 32
        w = reference.quantize_int4(_rand(g, device, n, k, scale=0.02), group_size=group)
        for m in rows:
            x = _rand(g, device, m, k)
            yield Case(f"{name} {m}x{n}x{k} g{group}", lambda x=x, w=w: (x, w), lambda args, y: [y], TOL_INT4,
                       2 * m * k + n * k // 2 + 4 * n * (k // group) + 2 * m * n, 2 * m * n * k)  # fmt: skip


def _norm_shapes(small: bool) -> list[tuple[str, int, int]]:
    if small:
        return [("small", m, 256) for m in (1, 5)]
    return [(name, m, h) for name, h in HIDDEN.items() for m in GPU_ROWS]


def quantize_fp8_cases(device: torch.device, small: bool) -> Iterator[Case]:
    g = torch.Generator(device).manual_seed(3)
    for name, m, h in _norm_shapes(small):
        x = _rand(g, device, m, h)
        yield Case(f"{name} {m}x{h}", lambda x=x: (x,), lambda args, r: [_dequant(*r), r[1]], TOL_FP8,
                   m * h * 3 + 4 * m)


def rms_norm_cases(device: torch.device, small: bool) -> Iterator[Case]:
    g = torch.Generator(device).manual_seed(4)
    for name, m, h in _norm_shapes(small):
        x, w = _rand(g, device, m, h), _rand(g, device, h)
        yield Case(f"{name} {m}x{h}", lambda x=x, w=w: (x, w, 1e-5), lambda args, y: [y], TOL_BF16,
                   2 * m * h * 2 + 2 * h)


def add_rms_norm_cases(device: torch.device, small: bool) -> Iterator[Case]:
    g = torch.Generator(device).manual_seed(5)
    for name, m, h in _norm_shapes(small):
        x, r, w = _rand(g, device, m, h), _rand(g, device, m, h), _rand(g, device, h)
        yield Case(f"{name} {m}x{h}", lambda x=x, r=r, w=w: (x, r, w, 1e-5), lambda args, out: list(out), TOL_BF16,
                   4 * m * h * 2 + 2 * h)  # fmt: skip


def add_rms_norm_fp8_cases(device: torch.device, small: bool) -> Iterator[Case]:
    g = torch.Generator(device).manual_seed(6)
    for name, m, h in _norm_shapes(small):
        x, r, w = _rand(g, device, m, h), _rand(g, device, m, h), _rand(g, device, h)
        yield Case(f"{name} {m}x{h}", lambda x=x, r=r, w=w: (x, r, w, 1e-5),
                   lambda args, out: [_dequant(out[0], out[1]), out[1], out[2]], TOL_FP8,
                   m * h * (3 * 2 + 1) + 4 * m + 2 * h)  # fmt: skip


def _heads(small: bool) -> dict[str, tuple[int, int, int]]:
    """name -> (query heads, KV heads, head_dim)."""
    if small:
        return {"small": (4, 2, 64)}
    return {name: (hq, hkv, 128) for name, (hq, hkv) in ATTENTION_MODELS.items()}


def _cache_scale(g, device, hkv: int, cache_dtype) -> torch.Tensor | None:
    """Per-KV-head FP8 scales of distinct sizes (a wrong head's scale shows), None for other caches."""
    return (torch.rand(hkv, generator=g, device=device) * 0.2 + 0.1) if cache_dtype == FP8 else None


def _written(cache: torch.Tensor, slots: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The cache rows of `slots` [T] as float32 [T, Hkv, D] (dequantized when FP8)."""
    rows = cache.flatten(0, 1)[slots.long()].float()
    return rows * scale.float()[None, :, None] if scale is not None else rows


def rope_and_cache_cases(device: torch.device, small: bool) -> Iterator[Case]:
    g = torch.Generator(device).manual_seed(7)
    block = 16
    cos, sin = reference.rope_cos_sin(128 if not small else 64, 8192, 500000.0, device=device)
    for name, (hq, hkv, d) in _heads(small).items():
        for t in (1, 5) if small else GPU_ROWS:
            for cache_dtype in (torch.bfloat16, FP8) if small or name == "8B" else (torch.bfloat16,):
                q, k, v = _rand(g, device, t, hq, d), _rand(g, device, t, hkv, d), _rand(g, device, t, hkv, d)
                pos = torch.randint(0, cos.shape[0], (t,), generator=g, device=device)
                n_blocks = -(-t // block) + 2
                slots = torch.randperm(n_blocks * block, generator=g, device=device)[:t]
                k_scale, v_scale = _cache_scale(g, device, hkv, cache_dtype), _cache_scale(g, device, hkv, cache_dtype)

                def make(q=q, k=k, v=v, pos=pos, slots=slots, nb=n_blocks, hkv=hkv, d=d, dt=cache_dtype,
                         ks=k_scale, vs=v_scale):  # fmt: skip
                    caches = [torch.zeros(nb, block, hkv, d, device=device).to(dt) for _ in range(2)]
                    return (q, k, v, pos, cos, sin, *caches, slots, ks, vs)

                def compare(args, out):
                    return [*out, _written(args[6], args[8], args[9]), _written(args[7], args[8], args[10])]

                elt = 1 if cache_dtype == FP8 else 2
                yield Case(f"{name} T{t} {hq}/{hkv}x{d} {str(cache_dtype)[6:]}", make, compare,
                           TOL_FP8 if cache_dtype == FP8 else TOL_BF16,
                           2 * 2 * t * (hq + hkv) * d + t * hkv * d * (2 + 2 * elt) + 16 * t)  # fmt: skip


def decode_attention_cases(device: torch.device, small: bool) -> Iterator[Case]:
    """Random lengths per sequence (so live lengths, not the table width, must bound the work), a
    shuffled block table with spare columns, FP8 caches with per-head scales."""
    g = torch.Generator(device).manual_seed(8)
    block = 16
    batches = {2: 40} if small else {1: 8192, 16: 4096, 128: 2048}  # batch -> longest sequence
    for name, (hq, hkv, d) in _heads(small).items():
        for b, longest in batches.items():
            for cache_dtype in (torch.bfloat16, FP8) if small or name == "8B" else (torch.bfloat16,):
                lens = torch.randint(1, longest + 1, (b,), generator=g, device=device, dtype=torch.int32)
                lens[0] = longest
                max_blocks = -(-longest // block) + 2  # spare columns: the table is wider than any sequence
                n_blocks = b * max_blocks
                table = torch.randperm(n_blocks, generator=g, device=device).int().view(b, max_blocks)
                k_scale, v_scale = _cache_scale(g, device, hkv, cache_dtype), _cache_scale(g, device, hkv, cache_dtype)
                # FP8: stored values ~N(0, 4^2), dequantized (x scale) ~N(0, 0.4 - 1.2): logits of unit order.
                kc, vc = (_rand(g, device, n_blocks, block, hkv, d, scale=4.0 if cache_dtype == FP8 else 1.0,
                                dtype=cache_dtype) for _ in range(2))  # fmt: skip
                q = _rand(g, device, b, hq, d)
                tokens = int(lens.sum())
                elt = kc.element_size()
                yield Case(f"{name} b{b} len<={longest} {hq}/{hkv}x{d} {str(cache_dtype)[6:]}",
                           lambda q=q, kc=kc, vc=vc, t=table, n=lens, ks=k_scale, vs=v_scale: (q, kc, vc, t, n, None, ks, vs),
                           lambda args, out: [out], TOL_BF16, 2 * tokens * hkv * d * elt + 2 * q.numel() * 2,
                           4 * tokens * hq * d)  # fmt: skip


def paged_prefill_attention_cases(device: torch.device, small: bool) -> Iterator[Case]:
    """Chunks of new tokens at the end of cached prefixes (several sequences of mixed lengths packed in
    one call), a shuffled block table with spare columns, FP8 caches with per-head scales."""
    g = torch.Generator(device).manual_seed(9)
    block = 16
    # (new tokens, cached prefix) per sequence of one call
    layouts = [[(5, 0), (17, 20)]] if small else [[(2048, 0)], [(512, 8192)], [(300, 0), (1000, 3000), (128, 77)]]
    for name, (hq, hkv, d) in _heads(small).items():
        for layout in layouts:
            for cache_dtype in (torch.bfloat16, FP8) if small or name == "8B" else (torch.bfloat16,):
                q_lens = torch.tensor([m for m, _ in layout], dtype=torch.int32, device=device)
                lens = torch.tensor([m + p for m, p in layout], dtype=torch.int32, device=device)
                b, longest = len(layout), int(lens.max())
                max_blocks = -(-longest // block) + 2  # spare columns: the table is wider than any sequence
                n_blocks = b * max_blocks
                table = torch.randperm(n_blocks, generator=g, device=device).int().view(b, max_blocks)
                k_scale, v_scale = _cache_scale(g, device, hkv, cache_dtype), _cache_scale(g, device, hkv, cache_dtype)
                kc, vc = (_rand(g, device, n_blocks, block, hkv, d, scale=4.0 if cache_dtype == FP8 else 1.0,
                                dtype=cache_dtype) for _ in range(2))  # fmt: skip
                t = int(q_lens.sum())
                q = _rand(g, device, t, hq, d)
                attended = sum(m * p + m * (m + 1) // 2 for m, p in layout)  # (query, key) pairs under the causal mask
                elt = kc.element_size()
                yield Case(f"{name} {'+'.join(f'{m}@{p}' for m, p in layout)} {hq}/{hkv}x{d} {str(cache_dtype)[6:]}",
                           lambda q=q, kc=kc, vc=vc, tb=table, n=lens, ql=q_lens, ks=k_scale, vs=v_scale:
                           (q, kc, vc, tb, n, ql, None, ks, vs),
                           lambda args, out: [out], TOL_BF16, 2 * int(lens.sum()) * hkv * d * elt + 2 * q.numel() * 2,
                           4 * attended * hq * d)  # fmt: skip


# One builder per op of the contract (backends.ops()); a new op adds its entry here.
CASES: dict[str, Callable[[torch.device, bool], Iterator[Case]]] = {
    "quantize_fp8": quantize_fp8_cases,
    "fp8_gemm": fp8_gemm_cases,
    "int4_gemm": int4_gemm_cases,
    "rms_norm": rms_norm_cases,
    "add_rms_norm": add_rms_norm_cases,
    "add_rms_norm_fp8": add_rms_norm_fp8_cases,
    "rope_and_cache": rope_and_cache_cases,
    "decode_attention": decode_attention_cases,
    "paged_prefill_attention": paged_prefill_attention_cases,
}


# --- running ---------------------------------------------------------------------------


@dataclass
class Row:
    op: str
    shape: str
    backend: str
    bucket: str
    status: str  # "pass", "FAIL", "no kernel" (the backend has none for this shape), "error"
    instance: str = ""  # backends.instance_key of the case's arguments: what a pass validates
    relerr: float | None = None
    tol: float | None = None
    detail: str = ""
    us: float | None = None
    gbps: float | None = None
    tflops: float | None = None
    pct_of_peak: float | None = None  # of the nearer roofline bound ...
    bound: str = ""  # ... "memory" (copy bandwidth) or "compute" (matmul throughput)

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if v is not None and v != ""}
        return {**d, "passed": self.passed}


def _check(op: str, case: Case, backend: str, device: torch.device, want: list[torch.Tensor]) -> Row:
    args = case.make()
    row = Row(op, case.shape, backend, backends.args_bucket(args) or "", "pass",
              backends.instance_key(op, args) or "", tol=case.tol)  # fmt: skip
    poison_allocator(device)
    try:
        got = case.compare(args, getattr(ops, op)(*args, backend=backend))
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a fault surfaces here, on its own row
    except backends.NoKernelError as err:
        row.status, row.detail = "no kernel", str(err)
        return row
    except Exception as err:  # noqa: BLE001  (a crashing kernel is a failed check, reported with the rest)
        row.status, row.detail = "error", f"{type(err).__name__}: {err}"
        return row
    row.relerr = max(rel_err(o, r) for o, r in zip(got, want, strict=True))
    if not row.relerr <= case.tol:
        row.status = "FAIL"
    return row


def _time(op: str, case: Case, row: Row, device: torch.device, peaks: dict) -> None:
    args = case.make()
    fn = getattr(ops, op)
    sec = time_budgeted(device, lambda: fn(*args, backend=row.backend), TIME_BUDGET_S)
    row.us = sec * 1e6
    row.gbps = case.bytes / sec / 1e9
    pct = [100 * case.bytes / sec / peaks["copy_Bps"]]
    if case.flops:
        row.tflops = case.flops / sec / 1e12
        peak = peaks.get("fp8_flops", peaks["bf16_flops"]) if case.fp8_math else peaks["bf16_flops"]
        pct.append(100 * case.flops / sec / peak)
    row.pct_of_peak = max(pct)
    row.bound = "compute" if pct[-1] > pct[0] else "memory"


def _fmt(v: float | None, spec: str) -> str:
    return format(v, spec) if v is not None else "-"


def _print_row(row: Row, bench: bool) -> None:
    line = f"{row.op:<23} {row.shape:<40} {row.backend:<7} {_fmt(row.relerr, '.2e'):>9} {row.status:<9}"
    if bench:
        rate = f"{row.tflops:.1f} TF/s" if row.bound == "compute" else f"{row.gbps:.0f} GB/s" if row.gbps else "-"
        line += f" {_fmt(row.us, '9.1f'):>9} {rate:>11} {_fmt(row.pct_of_peak, '5.1f'):>6}"
    if row.detail:
        line += f"  {row.detail.splitlines()[0][:160]}"
    print(line.rstrip(), flush=True)


def run_cases(device: torch.device, small: bool, wanted_backends: list[str], only_ops: list[str] | None,
              bench: bool, peaks: dict | None, after_op: Callable[[list[Row]], None] = lambda rows: None,
              ) -> tuple[list[Row], list[str]]:  # fmt: skip
    """Every op's cases on every wanted backend that can run it; (rows, ops without a case builder).
    after_op(rows so far) runs after each op (the caller saves progress: a run cut short keeps it)."""
    rows, missing = [], []
    for op in backends.ops():
        if rows:
            after_op(rows)
        if only_ops and op not in only_ops:
            continue
        build = CASES.get(op)
        if build is None:
            missing.append(op)
            continue
        usable = []
        for name in wanted_backends:
            reason = backends.unavailable_reason(op, name, device)
            if reason is None:
                usable.append(name)
            else:
                print(f"# {op}: {name} skipped: {reason}", flush=True)
        if not usable:
            continue
        reference_fn = backends.select(op, device, "torch")[1]
        for case in build(device, small):
            args = case.make()
            want = case.compare(args, reference_fn(*args))
            for name in usable:
                row = _check(op, case, name, device, want)
                if bench and row.status == "pass" and peaks is not None:
                    _time(op, case, row, device, peaks)
                rows.append(row)
                _print_row(row, bench)
                if row.status == "error" and not _context_usable(device):
                    print("# the CUDA context is unusable after this error (a fault poisons it for the process): "
                          "stopping; later ops and backends are unchecked", flush=True)  # fmt: skip
                    return rows, missing
            del want
    return rows, missing


def triton_specializations(device: torch.device, small: bool, only_ops: list[str] | None,
                           ) -> list[precompile.Specialization]:  # fmt: skip
    """The Triton specializations run_cases will launch on `device` (each once), found by a dry pass
    over every case's triton call that compiles and launches nothing."""
    with precompile.recording() as found:
        for op, build in CASES.items():
            if (only_ops and op not in only_ops) or backends.unavailable_reason(op, "triton", device):
                continue
            for case in build(device, small):
                with contextlib.suppress(Exception):  # a call the dry pass cannot complete is compiled at launch
                    getattr(ops, op)(*case.make(), backend="triton")
    return found


def precompile_triton(device: torch.device, workers: int, only_ops: list[str] | None) -> str:
    """Compile the specializations the GPU run will launch in `workers` processes; one line saying so."""
    start = time.perf_counter()
    specs = triton_specializations(device, False, only_ops)
    results = precompile.compile_all(specs, workers) if specs else []
    failed = [f"{name}: {err}" for name, _, err in results if err]
    line = (f"# compiled {len(specs) - len(failed)} of {len(specs)} Triton specializations in {workers} processes "
            f"in {time.perf_counter() - start:.1f} s (serial compile time {sum(t for _, t, _ in results):.1f} s)")
    return line + (f"; failed (compiled at launch instead): {failed[0][:200]}" if failed else "")


def _context_usable(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device).item()
    except Exception:  # noqa: BLE001  (any CUDA error here means the context is lost)
        return False
    return True


# --- the record automatic dispatch reads ------------------------------------------------


def fastest_by_bucket(rows: list[Row], passed: dict[tuple[str, str], bool]) -> dict[str, dict[str, str]]:
    """op -> bucket -> the kernel backend (cuda, triton) that passed every case of the op here and
    took the least total time over the bucket's cases every such backend ran; only buckets where this
    run timed at least two such backends (a run of one backend compares nothing)."""
    out: dict[str, dict[str, str]] = {}
    for op in dict.fromkeys(r.op for r in rows):
        candidates = [b for b in backends.KERNEL_BACKENDS if passed.get((op, b))]
        labels = [label for _, label in backends.ROW_BUCKETS]
        rank = {label: i for i, label in enumerate(labels)}  # ">128" (not listed) last
        for bucket in sorted({r.bucket for r in rows if r.op == op}, key=lambda b: rank.get(b, len(labels))):
            times: dict[str, dict[str, float]] = {b: {} for b in candidates}
            for r in rows:
                if r.op == op and r.bucket == bucket and r.backend in times and r.us is not None:
                    times[r.backend][r.shape] = r.us
            common = set.intersection(*(set(t) for t in times.values())) if len(times) >= 2 else set()
            if common:
                best = min(candidates, key=lambda b: sum(times[b][s] for s in common))
                out.setdefault(op, {})[bucket] = best
    return out


def record(device: torch.device, rows: list[Row], bench: bool) -> tuple[str, dict]:
    """Merge this run's kernel results (and, with --bench, the fastest backends) into the user's
    record for this GPU model; (path, the device's entry)."""
    env = environment(device)
    index = backends.device_index(device)
    passed: dict[tuple[str, str], bool] = {}
    instances: dict[tuple[str, str], dict[str, bool]] = {}  # (op, backend) -> instance -> all its cases passed
    failed_shapes: dict[tuple[str, str, str], list[str]] = {}  # (op, backend, instance) -> what failed
    for r in rows:
        if r.backend not in backends.KERNEL_BACKENDS or r.status == "no kernel":
            continue
        key = (r.op, r.backend)
        passed[key] = passed.get(key, True) and r.passed
        seen = instances.setdefault(key, {})
        seen[r.instance] = seen.get(r.instance, True) and r.passed
        if not r.passed:
            failed_shapes.setdefault((*key, r.instance), []).append(f"{r.shape}: {r.status} {r.detail or r.relerr}")
    path = backends.user_record_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data["_doc"] = ("Kernels checked by `llama-kernels selftest` per GPU model (llama_kernels.backends reads it; "
                    f"override the path with {backends.RECORD_ENV_VAR}). Delete this file to forget them.")  # fmt: skip
    devices = data.setdefault("devices", {})
    key = backends.device_key(env["device"], backends.device_capability(index))
    entry = devices.setdefault(key, {})
    entry.update({k: env[k] for k in ("device", "capability", "driver", "torch", "cuda", "triton", "date")})
    kernels = entry.setdefault("kernels", {})
    for op, backend in passed:
        code = backends.code_id(backend)
        old = kernels.get(f"{op}:{backend}", {})
        # Instantiations checked earlier with the same code stay validated; this run's results replace
        # those it checked again; a record of other code is dropped (it must pass again).
        known = old.get("instances", {}) if old.get("code") == code else {}
        for inst, inst_ok in instances[(op, backend)].items():
            known[inst] = {"passed": inst_ok, "date": env["date"],
                           **({"failed": failed_shapes[(op, backend, inst)]} if not inst_ok else {})}  # fmt: skip
        failed = [shape for r in known.values() for shape in r.get("failed", [])]
        kernels[f"{op}:{backend}"] = {
            "passed": not failed, "date": env["date"], "code": code, "driver": env["driver"], "torch": env["torch"],
            "triton": env["triton"], "instances": known, **({"failed": failed} if failed else {}),
        }  # fmt: skip
    if bench:
        # Merged per bucket: buckets this run did not compare across backends keep their entry.
        fastest = entry.setdefault("fastest", {})
        for op, buckets in fastest_by_bucket(rows, passed).items():
            codes = {b: backends.code_id(b) for b in backends.KERNEL_BACKENDS if passed.get((op, b))}
            fastest.setdefault(op, {}).update(
                {bucket: {"backend": name, "code": codes, "date": env["date"]} for bucket, name in buckets.items()})
        entry["bench_date"] = env["date"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)  # atomic: a concurrent reader sees the old or the new record
    backends.reload_user_record()
    return str(path), entry


# --- the command -----------------------------------------------------------------------


def _validate(args: argparse.Namespace) -> str | None:
    for op in args.op or []:
        if op not in backends.ops():
            return f"--op {op!r} is not an op; expected one of {backends.ops()}"
    for name in args.backends.split(","):
        if name not in backends.BACKENDS:
            return f"--backends: {name!r} is not a backend; expected a comma-separated subset of {backends.BACKENDS}"
    if args.compile_workers < 0:
        return f"--compile-workers {args.compile_workers}: expected an int >= 0 (0: off)"
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            return f"--device {args.device!r} is not a device; expected cuda, cuda:N or cpu"
        if device.type == "cuda" and not torch.cuda.is_available():
            return f"--device {args.device}: no CUDA GPU is visible"
    return None


def run(args: argparse.Namespace) -> int:
    error = _validate(args)
    if error:
        print(f"llama-kernels selftest: {error}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    wanted = args.backends.split(",")
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            # Triton picks the interpreter when a kernel is defined (at import): rerun in a fresh process.
            env = {**os.environ, "TRITON_INTERPRET": "1"}
            return subprocess.call([sys.executable, "-m", "llama_kernels.selftest", *selftest_argv(args)], env=env,
                                   cwd=Path(__file__).parents[1])  # `-m` then finds this same package
        print("no CUDA GPU present: checking the triton kernels under the Triton interpreter at small shapes "
              "against the reference (nothing is recorded; --bench needs a GPU)", flush=True)  # fmt: skip
        wanted = [b for b in wanted if b == "triton"]
        if backends.unavailable_reason("rms_norm", "triton", device):
            from .triton import triton as installed  # None: the import failed

            why = ('Triton is not installed: pip install "llama-kernels[triton]" (or pip install triton)'
                   if installed is None else backends.unavailable_reason("rms_norm", "triton", device))  # fmt: skip
            print(f"llama-kernels selftest: error: nothing was checked: {why}", file=sys.stderr)
            return 1
    env = environment(device)
    print(f"# selftest: {env['device']}" + (f" (compute capability {env['capability']}, driver {env['driver']})"
          if device.type == "cuda" else "") + f"  torch {env['torch']}  triton {env['triton']}  "
          f"cuda extension {backends.compiled_archs() or backends.cuda_extension()[1]}", flush=True)  # fmt: skip
    if args.compile_workers and device.type != "cuda":
        print(f"# --compile-workers {args.compile_workers}: nothing to precompile: no CUDA GPU (the Triton "
              "interpreter runs the kernels without compiling them)", flush=True)  # fmt: skip
    elif args.compile_workers and "triton" in wanted:
        print(precompile_triton(device, args.compile_workers, args.op), flush=True)
    bench = args.bench and device.type == "cuda"
    peaks = None
    if bench:
        peaks = measure_peaks(device, smoke=False)
        print(f"# peaks measured here: copy {peaks['copy_Bps'] / 1e9:.0f} GB/s, bf16 {peaks['bf16_flops'] / 1e12:.0f} "
              f"TFLOP/s" + (f", fp8 {peaks['fp8_flops'] / 1e12:.0f} TFLOP/s" if "fp8_flops" in peaks else ""))  # fmt: skip
    head = f"{'op':<23} {'shape':<40} {'backend':<7} {'relerr':>9} {'result':<9}"
    print((head + (f" {'us':>9} {'rate':>11} {'%peak':>6}" if bench else "")).rstrip(), flush=True)
    record_here = device.type == "cuda" and not args.no_record

    def save(rows: list[Row]) -> None:
        if record_here:
            record(device, rows, bench)
        if args.json:
            with open(args.json, "w") as f:
                json.dump([{**r.to_json(), "device": env["device"], "date": env["date"]} for r in rows], f, indent=1)

    rows, missing = run_cases(device, device.type == "cpu", wanted, args.op, bench, peaks, save)
    save(rows)
    bad = [r for r in rows if r.status in ("FAIL", "error")]
    checked = [r for r in rows if r.status != "no kernel"]
    print(f"# {len(checked) - len(bad)} of {len(checked)} checks passed"
          + (f"; FAILED: {sorted({f'{r.op} on {r.backend}' for r in bad})}" if bad else ""))  # fmt: skip
    for op in missing:
        print(f"# {op}: no selftest cases (add a builder to llama_kernels.selftest.CASES)")
    if record_here:
        print(f"# recorded in {backends.user_record_path()}: automatic dispatch now uses what passed here "
              "(llama-kernels info says which)")  # fmt: skip
    if args.json:
        print(f"# wrote {args.json}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama-kernels selftest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
