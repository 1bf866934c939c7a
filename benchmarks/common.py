"""Shared benchmark machinery: timing, the roofline measured at the start of a run, and output.

Every script times our kernels (per backend) beside torch baselines with CUDA events (median of
many runs), and reports time, GB/s, TFLOP/s and the percent of the peaks measured here: a large
device-to-device copy for bandwidth, a large bf16 and FP8 matmul for tensor throughput.
`--smoke` runs tiny shapes and few iterations on any device (CI proves the scripts work).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
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
from llama_kernels.selftest import rel_err  # noqa: E402


@dataclass
class Case:
    """One measured configuration. `build` allocates its tensors and returns {label: call} (labels
    "cuda", "triton", "torch.matmul", ...): it runs just before the case is timed, and everything it
    made is freed after, so only one case's tensors are alive at once (a full-size attention sweep
    built all at once does not fit an 80 GB GPU). `peak_bytes` is the GPU memory the case holds at
    most (its tensors, the baselines' copies, the temporaries of building them), by arithmetic on
    the shapes: tests/test_gpu_check.py checks every full-size case against the budget."""

    op: str
    shape: str
    bytes: int  # bytes that must cross memory at least once (the bandwidth roofline's numerator)
    flops: int = 0
    build: Callable[[], dict[str, Callable[[], object]]] = dict
    peak_bytes: int = 0
    extra: dict = field(default_factory=dict)  # more columns for this case's rows (e.g. its batch mix)


def parse_args(doc: str, argv: list[str] | None, backends: str = "cuda,triton,torch") -> argparse.Namespace:
    """The options every kernel benchmark takes; `backends`: the default of --backends."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few iterations, any device (CI)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", default=backends, help="our backends to time (comma-separated)")
    parser.add_argument("--iters", type=int, default=None, help="timed runs per configuration (median reported)")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    parser.add_argument("--only", default=None, metavar="REGEX", help="only the cases whose 'op shape' matches")
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


def _first_tensor(out: object) -> torch.Tensor | None:
    """The tensor an implementation returned (the first of a tuple), for comparing implementations."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    return out if isinstance(out, torch.Tensor) else None


def _free(device: torch.device) -> None:
    """Return a finished case's memory: the next case's tensors then fit beside nothing of it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def num(x: float | None) -> str:
    """x with 3 significant digits, never rounded to 0 (0.00123, 1.23, 12.3, 1234); '-' for None."""
    if x is None:
        return "-"
    if x == 0 or abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}" if abs(x) >= 1e-3 else f"{x:.2e}"


def run(title: str, cases: list[Case], args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Time every implementation of every case, one case's tensors at a time; print a table; rewrite
    the JSON (if asked) after every case, so a run cut short keeps what it measured.

    A builder's label whose value is a string is a baseline it could not set up here (the string says
    why): a row with "skipped". An implementation that raises gets a row with "error" and the run goes
    on (see exit_status). Each row has "relerr": |out - first| / |first| against the case's first
    implementation (ours), so a baseline that computes something else shows."""
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
    w_impl = 14  # implementations are known only once a case is built
    print(f"{'op':<{w_op}} {'shape':<{w_shape}} {'impl':<{w_impl}} {'time us':>9} {'GB/s':>8} {'%bw':>6} "
          f"{'TFLOP/s':>8} {'%peak':>6} {'relerr':>8}")  # fmt: skip
    rows: list[dict] = []
    for i, case in enumerate(cases, 1):
        first = None
        try:
            impls = case.build()
        except Exception as err:  # noqa: BLE001 (an out-of-memory or a bad shape costs this case only)
            impls = {"build": err}
        for label, fn in impls.items():
            row = {"op": case.op, "shape": case.shape, "impl": label, **case.extra}
            if isinstance(fn, str):
                row["skipped"] = fn
                print(f"{case.op:<{w_op}} {case.shape:<{w_shape}} {label:<{w_impl}} skipped: {fn}", flush=True)
                rows.append(row)
                continue
            try:
                if isinstance(fn, Exception):
                    raise fn
                out = _first_tensor(fn())
                sec = time_call(device, fn, iters, warmup)
            except Exception as err:  # noqa: BLE001
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                print(f"{case.op:<{w_op}} {case.shape:<{w_shape}} {label:<{w_impl}} ERROR {row['error']}", flush=True)
                rows.append(row)
                continue
            peak_flops = peaks.get("fp8_flops" if "fp8" in case.op else "bf16_flops", peaks["bf16_flops"])
            row.update({
                "time_us": sec * 1e6, "GBps": case.bytes / sec / 1e9, "TFLOPps": case.flops / sec / 1e12,
                "pct_bw": 100 * case.bytes / sec / peaks["copy_Bps"] if with_pct else None,
                "pct_flops": 100 * case.flops / sec / peak_flops if with_pct and case.flops else None,
            })  # fmt: skip
            if first is None:
                first = out
            elif out is not None and first is not None and out.shape == first.shape:
                row["relerr"] = rel_err(out, first)
            del out
            rows.append(row)
            flops = f"{num(row['TFLOPps']):>8} {num(row['pct_flops']):>6}" if case.flops else f"{'':>8} {'':>6}"
            err = f"{row['relerr']:8.1e}" if "relerr" in row else f"{'':>8}"
            print(f"{case.op:<{w_op}} {case.shape:<{w_shape}} {label:<{w_impl}} {num(row['time_us']):>9} "
                  f"{num(row['GBps']):>8} {num(row['pct_bw']):>6} {flops} {err}  [{i}/{len(cases)}]",
                  flush=True)  # fmt: skip
        del impls, first
        _free(device)
        if args.out:
            write_json(args.out, {"meta": meta, "rows": rows})
    if args.out:
        print(f"# wrote {args.out}")
    return rows


def write_json(path: str, data: dict) -> None:
    """Replace `path` with `data` as JSON in one rename: a reader (or a cut) never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def exit_status(rows: list[dict]) -> int:
    """The scripts' exit status: 1 when an implementation raised (a skipped baseline is no failure)."""
    return 1 if any("error" in r for r in rows) else 0


def main(doc: str, title: str, cases: Callable[[torch.device, bool, str], list[Case]], argv: list[str] | None) -> list[dict]:
    """Parse the common flags, build the cases for the device, run them."""
    args = parse_args(doc, argv)
    device = torch.device(args.device)
    return run(title, select(cases(device, args.smoke, args.backends), args.only), args, device)


def select(cases: list[Case], only: str | None) -> list[Case]:
    """The cases whose "op shape" matches the regular expression `only` (all when None)."""
    return cases if only is None else [c for c in cases if re.search(only, f"{c.op} {c.shape}")]


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
