"""Shared benchmark machinery: timing, the roofline measured at the start of a run, and output.

Every script times our kernels (per backend) beside torch baselines with CUDA events (median of
many runs), and reports time, GB/s, TFLOP/s and the percent of the peaks measured here: a large
device-to-device copy for bandwidth, a large bf16 and FP8 matmul for tensor throughput.
`--smoke` runs tiny shapes and few iterations on any device (CI proves the scripts work).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

if not torch.cuda.is_available():  # Triton kernels run on the CPU only under the interpreter,
    os.environ.setdefault("TRITON_INTERPRET", "1")  # which must be chosen before they are defined

from llama_kernels import BackendUnavailableError, backends  # noqa: E402
# The timing and peak helpers and the Llama shapes live in the package (llama-kernels selftest uses them
# too); the scripts reach them through this module (e.g. bench_generate: common._driver, common._version).
from llama_kernels.measure import driver_version as _driver  # noqa: E402
from llama_kernels.measure import LLAMA31_PROJECTIONS, measure_peaks, time_call  # noqa: E402,F401
from llama_kernels.measure import module_version as _version  # noqa: E402


@dataclass
class Case:
    """One measured configuration; `impls` maps a label ("cuda", "triton", "torch.matmul", ...) to a call."""

    op: str
    shape: str
    bytes: int  # bytes that must cross memory at least once (the bandwidth roofline's numerator)
    flops: int = 0
    impls: dict[str, Callable[[], object]] = field(default_factory=dict)


def parse_args(doc: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few iterations, any device (CI)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", default="cuda,triton,torch", help="our backends to time (comma-separated)")
    parser.add_argument("--iters", type=int, default=None, help="timed runs per configuration (median reported)")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    return parser.parse_args(argv)


_skipped: set[tuple[str, str]] = set()  # (op, backend) already reported as skipped


def our_backends(op: str, device: torch.device, requested: str) -> list[str]:
    """The requested backends that can run `op` on `device` (others are reported, once per op, and skipped)."""
    usable = []
    for name in requested.split(","):
        try:
            backends.select(op, device, name)
            usable.append(name)
        except BackendUnavailableError as err:
            if (op, name) not in _skipped:
                _skipped.add((op, name))
                print(f"# skip {op} on {name}: {err}", file=sys.stderr)
    return usable


def num(x: float | None) -> str:
    """x with 3 significant digits, never rounded to 0 (0.00123, 1.23, 12.3, 1234); '-' for None."""
    if x is None:
        return "-"
    if x == 0 or abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}" if abs(x) >= 1e-3 else f"{x:.2e}"


def run(title: str, cases: list[Case], args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Time every implementation of every case, print a table, write JSON if asked."""
    iters = args.iters or (3 if args.smoke else 100)
    warmup = 1 if args.smoke else 10
    peaks = measure_peaks(device, args.smoke)
    meta = {
        "benchmark": title,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "driver": _driver(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "cuda_extension_archs": backends.compiled_archs(),
        "smoke": args.smoke,
        "iters": iters,
        **{k: v for k, v in peaks.items()},
    }
    line = (f"# {title}: {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  copy "
            f"{num(peaks['copy_Bps'] / 1e9)} GB/s  bf16 matmul {num(peaks['bf16_flops'] / 1e12)} TFLOP/s")  # fmt: skip
    if "fp8_flops" in peaks:
        line += f"  fp8 {num(peaks['fp8_flops'] / 1e12)} TFLOP/s"
    print(line)
    # Percent of peak only on a GPU, at full size: a CPU's (or a smoke run's small) copy and bf16 matmul are no
    # roofline for these kernels (a float32 or INT4 kernel on a CPU beat a 256-wide bf16 matmul by 4-30x).
    with_pct = device.type == "cuda" and not args.smoke
    if not with_pct:
        print("# (no %bw / %peak: " + ("a smoke run's peaks are not measured at full size)" if device.type == "cuda"
                                       else "no GPU peak applies to a CPU)"))  # fmt: skip
    w_op = max([len("op"), *(len(c.op) for c in cases)])
    w_shape = max([len("shape"), *(len(c.shape) for c in cases)])
    w_impl = max([len("impl"), *(len(label) for c in cases for label in c.impls)])
    print(f"{'op':<{w_op}} {'shape':<{w_shape}} {'impl':<{w_impl}} {'time us':>9} {'GB/s':>8} {'%bw':>6} "
          f"{'TFLOP/s':>8} {'%peak':>6}")  # fmt: skip
    rows = []
    for i, case in enumerate(cases, 1):
        for label, fn in case.impls.items():
            sec = time_call(device, fn, iters, warmup)
            peak_flops = peaks.get("fp8_flops" if "fp8" in case.op else "bf16_flops", peaks["bf16_flops"])
            row = {
                "op": case.op, "shape": case.shape, "impl": label, "time_us": sec * 1e6,
                "GBps": case.bytes / sec / 1e9, "TFLOPps": case.flops / sec / 1e12,
                "pct_bw": 100 * case.bytes / sec / peaks["copy_Bps"] if with_pct else None,
                "pct_flops": 100 * case.flops / sec / peak_flops if with_pct and case.flops else None,
            }  # fmt: skip
            rows.append(row)
            flops = f"{num(row['TFLOPps']):>8} {num(row['pct_flops']):>6}" if case.flops else f"{'':>8} {'':>6}"
            print(f"{case.op:<{w_op}} {case.shape:<{w_shape}} {label:<{w_impl}} {num(row['time_us']):>9} "
                  f"{num(row['GBps']):>8} {num(row['pct_bw']):>6} {flops}  [{i}/{len(cases)}]", flush=True)  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"# wrote {args.out}")
    return rows


def main(doc: str, title: str, cases: Callable[[torch.device, bool, str], list[Case]], argv: list[str] | None) -> list[dict]:
    """Parse the common flags, build the cases for the device, run them."""
    args = parse_args(doc, argv)
    device = torch.device(args.device)
    return run(title, cases(device, args.smoke, args.backends), args, device)
