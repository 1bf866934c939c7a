"""FP8 and INT4 GEMMs at the Llama 3.1 per-GPU projections, against torch.matmul (bf16) and
torch._scaled_mm (row-wise FP8).

    python benchmarks/bench_gemm.py --out benchmarks/results/gemm-h100-<date>.json
    python benchmarks/bench_gemm.py --smoke
    python benchmarks/bench_gemm.py --tune new_tables.py   # regenerate the Triton (and, on a GPU
        with the cuda backend, the CUDA) GEMM config tables: time every candidate, keep the fastest
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from common import LLAMA31_PROJECTIONS, Case, our_backends  # noqa: E402

from llama_kernels import backends, ops  # noqa: E402

M_VALUES = (1, 16, 64, 256, 4096)
SLACK = 64 << 20  # the CUDA context's own allocations, scales, small tensors


def peak_bytes(op: str, m: int, n: int, k: int) -> int:
    """The most GPU memory a case holds: the float32 randn beside the bf16 weight while building it
    (6 bytes a weight value), for INT4 the quantizer's float32 temporaries (4 of [N, K], beside the
    bf16 weight), x in float32 and bf16 (and FP8), two outputs, and split-K's float32 partials (at
    most 16 splits, used for M <= 64)."""
    weights = 6 * n * k if op == "fp8_gemm" else 2 * n * k + 16 * n * k
    return weights + 7 * m * k + 2 * 2 * m * n + (16 * 4 * m * n if m <= 64 else 0) + SLACK


def cases(device: torch.device, smoke: bool, requested: str) -> list[Case]:
    shapes = {"smoke": (64, 128)} if smoke else LLAMA31_PROJECTIONS
    m_values = (1, 17) if smoke else M_VALUES
    fp8_backends, int4_backends = our_backends("fp8_gemm", device, requested), our_backends("int4_gemm", device, requested)

    def tensors(m: int, n: int, k: int):
        w = torch.randn(n, k, device=device).mul_(0.02).to(torch.bfloat16)
        return w, torch.randn(m, k, device=device).to(torch.bfloat16)

    def build_fp8(m: int, n: int, k: int) -> dict:
        w, x = tensors(m, n, k)
        (wq, ws), (xq, xs) = ops.quantize_fp8(w), ops.quantize_fp8(x)
        impls = {b: lambda b=b: ops.fp8_gemm(xq, xs, wq, ws, backend=b) for b in fp8_backends}
        if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
            impls["torch._scaled_mm"] = lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs[:, None], scale_b=ws[None, :],
                                                                 out_dtype=torch.bfloat16)  # fmt: skip
        impls["torch.matmul bf16"] = lambda: x @ w.t()
        return impls

    def build_int4(m: int, n: int, k: int, group: int) -> dict:
        w, x = tensors(m, n, k)
        w4 = ops.quantize_int4(w, group_size=group)
        impls = {b: lambda b=b: ops.int4_gemm(x, w4, backend=b) for b in int4_backends}
        impls["torch.matmul bf16"] = lambda: x @ w.t()
        return impls

    out = []
    for name, (n, k) in shapes.items():
        group = 128 if k % 128 == 0 else 64
        for m in m_values:
            flops = 2 * m * n * k
            out.append(Case("fp8_gemm", f"{name} {m}x{n}x{k}", m * k + n * k + 2 * m * n, flops,
                            lambda m=m, n=n, k=k: build_fp8(m, n, k), peak_bytes("fp8_gemm", m, n, k)))  # fmt: skip
            out.append(Case("int4_gemm", f"{name} {m}x{n}x{k} g{group}",
                            2 * m * k + n * k // 2 + 4 * n * (k // group) + 2 * m * n, flops,
                            lambda m=m, n=n, k=k, g=group: build_int4(m, n, k, g), peak_bytes("int4_gemm", m, n, k)))  # fmt: skip
    return out


def _fastest(label: str, run_config, configs, device: torch.device, iters: int):
    """(seconds, config) of the fastest configuration that runs; candidates that do not fit this
    GPU (shared memory, registers) are reported and skipped."""
    timed = []
    for cfg in configs:
        try:
            timed.append((common.time_call(device, lambda: run_config(cfg), iters, 2), cfg))
        except Exception as err:
            print(f"# {label}: {cfg} failed: {type(err).__name__}", file=sys.stderr)
    if not timed:
        raise RuntimeError(f"{label}: no candidate configuration ran on {device}")
    best_sec, best = min(timed, key=lambda t: t[0])
    print(f"# {label}: {best} {best_sec * 1e6:.1f} us ({len(timed)} candidates)", flush=True)
    return best


def tune_cuda(device: torch.device, iters: int) -> dict:
    """The fastest (config, split_k) of each CUDA GEMM per llama_kernels.cuda.gemm_configs.TABLE key."""
    from llama_kernels.cuda import fp8_gemm, gemm_configs, int4_gemm

    cap = torch.cuda.get_device_capability(device)
    table = {}
    for name, (n, k) in LLAMA31_PROJECTIONS.items():
        w = torch.randn(n, k, device=device).mul_(0.02).to(torch.bfloat16)
        wq, ws = ops.quantize_fp8(w)
        packed = int4_gemm.repack_int4(ops.quantize_int4(w, group_size=128 if k % 128 == 0 else 64))
        for m in M_VALUES:
            x = torch.randn(m, k, device=device).to(torch.bfloat16)
            xq, xs = ops.quantize_fp8(x)
            runs = {"int4_gemm": lambda c: int4_gemm.launch(x, packed.qpacked, packed.scale_zero, n,
                                                            packed.group_size, choice=c)}  # fmt: skip
            fp8_choices = gemm_configs.candidates("fp8_gemm", m)
            if cap >= (8, 9):
                runs["fp8_gemm"] = lambda c: fp8_gemm.launch(xq, xs, wq, ws, torch.bfloat16, None, choice=c)
                if cap == (9, 0) and gemm_configs.built_with_sm90a() and m > gemm_configs.SM90_MIN_M:
                    fp8_choices.append(gemm_configs.Choice(gemm_configs.SM90_CONFIG, 1))
            for op, run_config in runs.items():
                configs = fp8_choices if op == "fp8_gemm" else gemm_configs.candidates(op, m)
                best = _fastest(f"cuda {op} {name} M={m}", run_config, configs, device, iters)
                table[(op, gemm_configs.arch_name(cap), gemm_configs.m_bucket(m), n, k)] = tuple(best)
    return table


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
                configs = gemm_configs.candidates(op, m)[: 2 if smoke else None]
                best = _fastest(f"triton {op} {name} M={m}", run_config, configs, device, iters)
                table[op][(gemm_configs.m_bucket(m), n, k)] = tuple(best)
    return table


def main(argv: list[str] | None = None) -> list[dict]:
    if argv is None:
        argv = sys.argv[1:]
    if "--tune" in argv:
        from llama_kernels.triton import gemm_configs

        i = argv.index("--tune")
        out, rest = argv[i + 1], argv[:i] + argv[i + 2 :]
        args = common.parse_args(__doc__, rest)
        device = torch.device(args.device)
        iters = args.iters or (3 if args.smoke else 50)
        text = "# llama_kernels/triton/gemm_configs.py\n" + gemm_configs.format_table(tune(device, args.smoke, iters)) + "\n"
        if not args.smoke and "cuda" in args.backends.split(",") and not backends.unavailable_reason(
            "int4_gemm", "cuda", device
        ):
            entries = "".join(f"    {key!r}: {val!r},\n" for key, val in tune_cuda(device, iters).items())
            text += f"\n# llama_kernels/cuda/gemm_configs.py\nTABLE: dict[tuple[str, str, int, int, int], tuple[int, int]] = {{\n{entries}}}\n"
        Path(out).write_text(text)
        print(f"# wrote {out}: replace the TABLE literals in llama_kernels/triton/gemm_configs.py "
              "(and llama_kernels/cuda/gemm_configs.py) with it")  # fmt: skip
        return []
    return common.main(__doc__, "GEMM", cases, argv)


if __name__ == "__main__":
    sys.exit(common.exit_status(main()))
