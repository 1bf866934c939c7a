"""Measurement helpers shared by ``llama-kernels selftest`` and the benchmarks (benchmarks/common.py):
median times with CUDA events, the copy bandwidth and matmul throughput achieved here, the
versions a measurement was taken with, and the Llama 3.1 per-GPU GEMM shapes both measure at.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

# Llama 3.1 linear projections per GPU, (N, K) in nn.Linear layout: 8B at TP 1, 70B and 405B at TP 8.
LLAMA31_PROJECTIONS = {
    "8B qkv": (6144, 4096), "8B o": (4096, 4096), "8B gate_up": (28672, 4096), "8B down": (4096, 14336),
    "70B/8 qkv": (1280, 8192), "70B/8 o": (8192, 1024), "70B/8 gate_up": (7168, 8192), "70B/8 down": (8192, 3584),
    "405B/8 qkv": (2304, 16384), "405B/8 o": (16384, 2048), "405B/8 gate_up": (13312, 16384),
    "405B/8 down": (16384, 6656),
}  # fmt: skip


def time_call(device: torch.device, fn: Callable[[], object], iters: int, warmup: int) -> float:
    """Median seconds per call: CUDA events on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_budgeted(device: torch.device, fn: Callable[[], object], budget_s: float, max_iters: int = 50) -> float:
    """Median seconds per call, with as many runs (3 to max_iters) as fit in about budget_s after
    a first timed estimate: short kernels get many runs, long ones a few."""
    first = time_call(device, fn, 1, 1)
    iters = max(3, min(max_iters, int(budget_s / max(first, 1e-7))))
    return time_call(device, fn, iters, 1)


def measure_peaks(device: torch.device, smoke: bool) -> dict:
    """Copy bandwidth (bytes/s, read + write) and bf16 / FP8 matmul throughput (FLOP/s) achieved here."""
    n_bytes = (8 << 20) if smoke else (2 << 30)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    iters, warmup = (3, 1) if smoke else (20, 5)
    peaks = {"copy_Bps": 2 * n_bytes / time_call(device, lambda: dst.copy_(src), iters, warmup)}
    del src, dst
    n = 256 if smoke else 8192
    a = torch.randn(n, n, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, device=device).to(torch.bfloat16)
    peaks["bf16_flops"] = 2 * n**3 / time_call(device, lambda: a @ b, iters, warmup)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        af, bf = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        fn = lambda: torch._scaled_mm(af, bf.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
        peaks["fp8_flops"] = 2 * n**3 / time_call(device, fn, iters, warmup)
    return peaks


def module_version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def driver_version() -> str | None:
    """The NVIDIA driver version from nvidia-smi, None without a GPU or nvidia-smi."""
    if not torch.cuda.is_available():
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return None


def environment(device: torch.device) -> dict:
    """Device name, compute capability, driver, torch / CUDA / triton versions and the UTC date."""
    cuda = device.type == "cuda"
    cap = torch.cuda.get_device_capability(device) if cuda else None
    return {
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "capability": f"{cap[0]}.{cap[1]}" if cap else None,
        "driver": driver_version() if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": module_version("triton"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
