"""FP8 and INT4 GEMMs at the Llama 3.1 per-GPU projections, against torch.matmul (bf16) and
torch._scaled_mm (row-wise FP8).

    python benchmarks/bench_gemm.py --out benchmarks/results/gemm-h100-<date>.json
    python benchmarks/bench_gemm.py --smoke
    python benchmarks/bench_gemm.py --tune llama_kernels/triton/gemm_configs_new.py   # regenerate the
        Triton config table: time every candidate per (M bucket, N, K), keep the fastest
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from common import LLAMA31_PROJECTIONS, Case, our_backends  # noqa: E402

from llama_kernels import ops  # noqa: E402

M_VALUES = (1, 16, 64, 256, 4096)


def cases(device: torch.device, smoke: bool, requested: str) -> list[Case]:
    shapes = {"smoke": (64, 128)} if smoke else LLAMA31_PROJECTIONS
    m_values = (1, 17) if smoke else M_VALUES
    scaled_mm = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
    out = []
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device=device).mul_(0.02).to(torch.bfloat16)
        wq, ws = ops.quantize_fp8(w)
        group = 128 if k % 128 == 0 else 64
        w4 = ops.quantize_int4(w, group_size=group)
        for m in m_values:
            x = torch.randn(m, k, device=device).to(torch.bfloat16)
            xq, xs = ops.quantize_fp8(x)
            flops = 2 * m * n * k
            fp8 = Case("fp8_gemm", f"{name} {m}x{n}x{k}", m * k + n * k + 2 * m * n, flops)
            for b in our_backends("fp8_gemm", device, requested):
                fp8.impls[b] = lambda b=b, xq=xq, xs=xs, wq=wq, ws=ws: ops.fp8_gemm(xq, xs, wq, ws, backend=b)
            if scaled_mm:
                fp8.impls["torch._scaled_mm"] = lambda xq=xq, xs=xs, wq=wq, ws=ws: torch._scaled_mm(
                    xq, wq.t(), scale_a=xs[:, None], scale_b=ws[None, :], out_dtype=torch.bfloat16)  # fmt: skip
            fp8.impls["torch.matmul bf16"] = lambda x=x, w=w: x @ w.t()
            int4 = Case("int4_gemm", f"{name} {m}x{n}x{k} g{group}",
                        2 * m * k + n * k // 2 + 4 * n * (k // group) + 2 * m * n, flops)  # fmt: skip
            for b in our_backends("int4_gemm", device, requested):
                int4.impls[b] = lambda b=b, x=x, w4=w4: ops.int4_gemm(x, w4, backend=b)
            int4.impls["torch.matmul bf16"] = lambda x=x, w=w: x @ w.t()
            out += [fp8, int4]
    return out


def tune(device: torch.device, smoke: bool, iters: int) -> dict:
    """The fastest candidate configuration of each Triton GEMM per TABLE key, as a new TABLE."""
    from llama_kernels.triton import fp8_gemm, gemm_configs, int4_gemm

    shapes = {"smoke": (64, 128)} if smoke else LLAMA31_PROJECTIONS
    table: dict = {"fp8_gemm": {}, "int4_gemm": {}}
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device=device).mul_(0.02).to(torch.bfloat16)
        wq, ws = ops.quantize_fp8(w)
        w4 = ops.quantize_int4(w, group_size=128 if k % 128 == 0 else 64)
        for m in ((1, 17) if smoke else M_VALUES):
            x = torch.randn(m, k, device=device).to(torch.bfloat16)
            xq, xs = ops.quantize_fp8(x)
            runs = {
                "fp8_gemm": lambda c: fp8_gemm.launch(xq, xs, wq, ws, torch.bfloat16, None, config=c),
                "int4_gemm": lambda c: int4_gemm.launch(x, w4.qweight, w4.scales, w4.zeros, w4.group_size, config=c),
            }
            for op, run_config in runs.items():
                timed = []
                for cfg in gemm_configs.candidates(op, m)[: 2 if smoke else None]:
                    try:
                        timed.append((common.time_call(device, lambda: run_config(cfg), iters, 2), cfg))
                    except Exception as err:  # a candidate that does not fit this GPU (shared memory, registers)
                        print(f"# {op} {name} M={m}: {cfg} failed: {type(err).__name__}", file=sys.stderr)
                if not timed:
                    raise RuntimeError(f"{op} {name} M={m}: no candidate configuration ran on {device}")
                best_sec, best = min(timed, key=lambda t: t[0])
                table[op][(gemm_configs.m_bucket(m), n, k)] = tuple(best)
                print(f"# {op} {name} M={m}: {best} {best_sec * 1e6:.1f} us ({len(timed)} candidates)", flush=True)
    return table


def main(argv: list[str] | None = None) -> list[dict]:
    if argv is None:
        argv = sys.argv[1:]
    if "--tune" in argv:
        from llama_kernels.triton import gemm_configs

        i = argv.index("--tune")
        out, rest = argv[i + 1], argv[:i] + argv[i + 2 :]
        args = common.parse_args(__doc__, rest)
        table = tune(torch.device(args.device), args.smoke, args.iters or (3 if args.smoke else 50))
        Path(out).write_text(gemm_configs.format_table(table) + "\n")
        print(f"# wrote {out}: replace the TABLE literal in llama_kernels/triton/gemm_configs.py with it")
        return []
    return common.main(__doc__, "GEMM", cases, argv)


if __name__ == "__main__":
    main()
