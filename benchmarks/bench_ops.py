"""Time every op of the contract on each backend that can run it, at Llama shapes.

Prints one row per (op, shape, backend): median time, GB/s, TFLOP/s where the op has FLOPs,
and the percent of the copy bandwidth measured at the start of the run (a large
device-to-device copy). Results also go to a JSON file (--out).

    python benchmarks/bench_ops.py                 # on a GPU: Llama 3.1 shapes
    python benchmarks/bench_ops.py --smoke         # tiny shapes, any device (CI)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llama_kernels import BackendUnavailableError, backends, ops

FP8 = torch.float8_e4m3fn


@dataclass
class Case:
    op: str
    shape: str
    run: Callable[[str], object]  # backend -> result
    bytes: int  # bytes that must move through memory at least once
    flops: int = 0


def _timer(device: torch.device, fn: Callable[[], object], iters: int, warmup: int) -> float:
    """Median seconds per call: CUDA events on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
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


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Achieved bytes/s of a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _timer(device, lambda: dst.copy_(src), iters=20, warmup=3)


def _rand(*shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def cases(device: torch.device, smoke: bool) -> list[Case]:
    bf16 = torch.bfloat16
    out: list[Case] = []
    # Norms: Llama 3.1 8B/70B/405B hidden sizes at decode (1 token) and prefill (4096 tokens).
    norm_shapes = [(3, 576)] if smoke else [(1, 4096), (4096, 4096), (4096, 8192), (4096, 16384)]
    for m, h in norm_shapes:
        x, r, w = _rand(m, h, dtype=bf16, device=device), _rand(m, h, dtype=bf16, device=device), _rand(
            h, dtype=bf16, device=device
        )
        out.append(Case("add_rms_norm", f"{m}x{h}", lambda b, x=x, r=r, w=w: ops.add_rms_norm(x, r, w, backend=b),
                        4 * m * h * 2))  # fmt: skip
        out.append(Case("add_rms_norm_fp8", f"{m}x{h}",
                        lambda b, x=x, r=r, w=w: ops.add_rms_norm_fp8(x, r, w, backend=b), m * h * (3 * 2 + 1)))  # fmt: skip
        out.append(Case("rms_norm", f"{m}x{h}", lambda b, x=x, w=w: ops.rms_norm(x, w, backend=b), 2 * m * h * 2))
        out.append(Case("quantize_fp8", f"{m}x{h}", lambda b, x=x: ops.quantize_fp8(x, backend=b), m * h * 3))
    # GEMMs: Llama 3.1 8B qkv projection (N = 6144, K = 4096); smoke shrinks it.
    gemm_shapes = [(3, 64, 128)] if smoke else [(m, 6144, 4096) for m in (1, 16, 64, 256, 4096)]
    for m, n, k in gemm_shapes:
        xq, xs = ops.quantize_fp8(_rand(m, k, dtype=bf16, device=device))
        wq, ws = ops.quantize_fp8(_rand(n, k, dtype=bf16, device=device, scale=0.02))
        out.append(Case("fp8_gemm", f"{m}x{n}x{k}",
                        lambda b, xq=xq, xs=xs, wq=wq, ws=ws: ops.fp8_gemm(xq, xs, wq, ws, backend=b),
                        m * k + n * k + 2 * m * n, 2 * m * n * k))  # fmt: skip
        x = _rand(m, k, dtype=bf16, device=device)
        w4 = ops.quantize_int4(_rand(n, k, dtype=bf16, device=device, scale=0.02), 128 if k % 128 == 0 else 64)
        out.append(Case("int4_gemm", f"{m}x{n}x{k}", lambda b, x=x, w4=w4: ops.int4_gemm(x, w4, backend=b),
                        2 * m * k + n * k // 2 + 4 * n * (k // w4.group_size) + 2 * m * n, 2 * m * n * k))  # fmt: skip
    # Attention: Llama 3.1 8B at TP 1 (32 query heads, 8 KV heads, head_dim 128).
    attn = [(2, 9, 3, 64, 100)] if smoke else [(b, 32, 8, 128, ctx) for b, ctx in ((1, 32768), (8, 8192), (64, 4096))]
    for b, hq, hkv, d, ctx in attn:
        block = 16
        blocks = b * ((ctx + block - 1) // block)
        kc = _rand(blocks, block, hkv, d, dtype=bf16, device=device)
        vc = _rand(blocks, block, hkv, d, dtype=bf16, device=device)
        table = torch.randperm(blocks, device=device).int().view(b, -1)
        lens = torch.full((b,), ctx, dtype=torch.int32, device=device)
        q = _rand(b, hq, d, dtype=bf16, device=device)
        out.append(Case("decode_attention", f"b{b} ctx{ctx} {hq}/{hkv}x{d}",
                        lambda be, q=q, kc=kc, vc=vc, t=table, n=lens: ops.decode_attention(q, kc, vc, t, n, backend=be),
                        2 * b * ctx * hkv * d * 2 + 2 * q.numel() * 2, 4 * b * hq * ctx * d))  # fmt: skip
        t = b
        cos, sin = ops.rope_cos_sin(d, 4096, 500000.0, device=device)
        k, v = _rand(t, hkv, d, dtype=bf16, device=device), _rand(t, hkv, d, dtype=bf16, device=device)
        pos = torch.arange(t, device=device)
        slots = torch.arange(t, device=device) * 7
        out.append(Case("rope_and_cache", f"t{t} {hq}/{hkv}x{d}",
                        lambda be, q=q, k=k, v=v, p=pos, c=cos, s=sin, kc=kc, vc=vc, sl=slots: ops.rope_and_cache(
                            q, k, v, p, c, s, kc, vc, sl, backend=be),
                        2 * (2 * q.numel() + 2 * k.numel() + 2 * v.numel()) * 2))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few iterations (CI)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", default="cuda,triton,torch", help="comma-separated backends to time")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--out", default=None, help="write results as JSON here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    iters = args.iters or (3 if args.smoke else 100)
    warmup = 1 if args.smoke else 10
    bandwidth = copy_bandwidth(device, (16 << 20) if args.smoke else (1 << 30))
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda_extension_archs": backends.compiled_archs(),
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "smoke": args.smoke,
    }
    print(f"# {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)  # fmt: skip
    header = f"{'op':<18} {'shape':<26} {'backend':<8} {'time (us)':>11} {'GB/s':>9} {'% copy bw':>9} {'TFLOP/s':>9}"
    print(header)
    rows = []
    all_cases = cases(device, args.smoke)
    for i, case in enumerate(all_cases, 1):
        for backend in args.backends.split(","):
            try:
                backends.select(case.op, device, backend)
            except BackendUnavailableError as err:
                rows.append({"op": case.op, "shape": case.shape, "backend": backend, "skipped": str(err)})
                continue
            sec = _timer(device, lambda c=case, b=backend: c.run(b), iters, warmup)
            row = {"op": case.op, "shape": case.shape, "backend": backend, "time_us": sec * 1e6,
                   "GBps": case.bytes / sec / 1e9, "pct_copy_bw": 100 * case.bytes / sec / bandwidth,
                   "TFLOPps": case.flops / sec / 1e12 if case.flops else None}  # fmt: skip
            rows.append(row)
            tflops = f"{row['TFLOPps']:9.2f}" if case.flops else f"{'':>9}"
            print(f"{case.op:<18} {case.shape:<26} {backend:<8} {row['time_us']:11.1f} {row['GBps']:9.1f} "
                  f"{row['pct_copy_bw']:9.1f} {tflops}   [{i}/{len(all_cases)}]", flush=True)  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    raise SystemExit(main())
