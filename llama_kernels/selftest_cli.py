"""`llama-kernels selftest`'s options, apart from the checks so that `--help` needs no torch (selftest.py imports
it)."""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bench", action="store_true", help="also time each passing kernel (GPU): us, GB/s or "
                        "TFLOP/s and percent of the peaks measured at the start; dispatch then prefers the fastest")
    parser.add_argument("--json", metavar="PATH", default=None, help="write the rows as a JSON list to PATH (default: none)")
    parser.add_argument("--op", action="append", default=None, help="only this op (repeatable; default: every op)")
    parser.add_argument("--backends", default="cuda,triton,torch", help="backends to check, comma-separated (default: %(default)s)")
    parser.add_argument("--no-record", action="store_true", help="do not write the user's record of passing kernels")
    parser.add_argument("--device", default=None, help="cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--compile-workers", type=int, default=0, metavar="N", help="before the first launch, "
                        "compile every Triton specialization the run will launch in N processes (GPU; default 0: "
                        "each compiles at its first launch, one at a time)")  # fmt: skip


def selftest_argv(args: argparse.Namespace) -> list[str]:
    """The options that reproduce `args`, for the rerun in a fresh process (TRITON_INTERPRET=1 on the CPU)."""
    argv = ["--backends", args.backends] + (["--bench"] if args.bench else [])
    argv += ["--no-record"] if args.no_record else []
    argv += ["--json", os.path.abspath(args.json)] if args.json else []
    argv += ["--device", args.device] if args.device else []
    argv += ["--compile-workers", str(args.compile_workers)] if args.compile_workers else []
    for op in args.op or []:
        argv += ["--op", op]
    return argv
