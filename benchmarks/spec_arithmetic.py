"""The speculative-decoding arithmetic of issue 21 (Llama 3.1 405B FP8 over 8 GPUs at >= 120 tokens/s per
user), from the memory planner's byte counts instead of constants, so that a GPU session only plugs in the
step costs it measured.

At batch 1 a decode step reads, on each GPU, the weights that GPU holds (all but the embedding table, whose
rows are gathered, unless it is also the lm_head) and the KV cache of the context: at the HBM bandwidth
that is the step's floor. Tensor parallel adds 2 all-reduces per layer, the embedding's all-reduce and the
lm_head's all-gather, each --allreduce-us (an input: measure it). A speculative step costs one verify pass
of the target (k + 1 tokens; at batch 1 still bandwidth-bound: --verify-ratio of a decode step, or the
measured --verify-ms) and k decode steps of the draft model (its own bytes over the same GPUs, or the
measured --draft-ms); it yields L tokens, the mean accepted length (1 .. k + 1; with a per-token acceptance
rate a, L = (1 - a^(k+1)) / (1 - a), Leviathan et al. 2023). So

    tokens/s per user = 1000 L / (verify_ms + k draft_ms)
    the goal needs L >= goal (verify_ms + k draft_ms) / 1000

A small draft's step is bound by kernel launches and collectives, not bandwidth: its estimate is a floor,
replace it with the measured --draft-ms.

    python benchmarks/spec_arithmetic.py                                  # 405B FP8 TP8, 3.2 1B draft, H200s
    python benchmarks/spec_arithmetic.py --hbm-gbps 3350 --allreduce-us 8  # H100 SXM, an assumed all-reduce
    python benchmarks/spec_arithmetic.py --decode-ms 11.2 --verify-ms 12.0 --draft-ms 0.9 --k 3 5 --out a.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_kernels.plan import kv_cache_bytes_per_token, load_config, plan  # noqa: E402

HBM_GBPS = {"h100": 3350, "h200": 4800}  # spec-sheet HBM bandwidth, GB/s (H100 SXM5 HBM3, H200 HBM3e)


def step_bytes(model: str, quant: str, kv_dtype: str, gpus: int, context: int) -> dict[str, int]:
    """Bytes one batch-1 decode step reads on each GPU: {"weights", "kv_cache"} (the planner's counts)."""
    p = plan(model, quant=quant, kv_dtype=kv_dtype, gpus=gpus, max_context=context)
    w = p.weight_bytes
    gathered = w["embedding"] if w["lm_head"] else 0  # a tied embedding is read whole as the lm_head
    kv = context * kv_cache_bytes_per_token(model, kv_dtype, gpus)
    return {"weights": sum(w.values()) - gathered, "kv_cache": kv}


def collectives(model: str, gpus: int) -> int:
    """Collectives of one forward pass under tensor parallel: 2 all-reduces per layer, the embedding's, the
    lm_head's all-gather (0 on one GPU)."""
    return 0 if gpus == 1 else 2 * load_config(model)["num_hidden_layers"] + 2


def step_ms(model: str, args, measured: float | None) -> dict:
    """A decode step of `model` (bandwidth floor + collectives), or the measured one."""
    b = step_bytes(model, args.quant, args.kv_dtype, args.gpus, args.context)
    n = collectives(model, args.gpus)
    floor = (b["weights"] + b["kv_cache"]) / (args.hbm_gbps * 1e9) * 1e3
    est = floor + n * args.allreduce_us / 1e3
    return {"model": model, "bytes_per_gpu": b, "collectives": n, "allreduce_us": args.allreduce_us,
            "bandwidth_floor_ms": floor, "estimate_ms": est, "measured_ms": measured,
            "ms": measured if measured is not None else est}  # fmt: skip


def arithmetic(args) -> dict:
    target = step_ms(args.model, args, args.decode_ms)
    draft = step_ms(args.draft, args, args.draft_ms)
    verify = args.verify_ms if args.verify_ms is not None else target["ms"] * args.verify_ratio
    rows = []
    for k in args.k:
        cost = verify + k * draft["ms"]
        need = args.target * cost / 1e3  # accepted length L the target needs
        per_rate = {f"{a:.2f}": 1e3 * accepted_length(a, k) / cost for a in args.acceptance}
        rows.append({"k": k, "step_ms": cost, "accepted_length_needed": need, "reachable": need <= k + 1,
                     "tokens_per_s": per_rate})  # fmt: skip
    return {"target": target, "draft": draft, "verify_ms": verify, "plain_tokens_per_s": 1e3 / target["ms"],
            "goal_tokens_per_s": args.target, "speculative": rows,
            "inputs": {k: v for k, v in vars(args).items() if k != "out"}}  # fmt: skip


def accepted_length(a: float, k: int) -> float:
    """Mean tokens per verification at per-token acceptance rate a and k draft tokens."""
    return k + 1.0 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


def report(r: dict) -> str:
    t, d = r["target"], r["draft"]
    gib = 1 << 30

    def step(s: dict, name: str) -> str:
        b = s["bytes_per_gpu"]
        how = "measured" if s["measured_ms"] is not None else (f"bandwidth floor {s['bandwidth_floor_ms']:.2f} ms "
                                                                f"+ {s['collectives']} collectives x "
                                                                f"{s['allreduce_us']:g} us")  # fmt: skip
        return (f"{name} {s['model']}: {b['weights'] / gib:.2f} GiB weights + {b['kv_cache'] / gib:.3f} GiB KV read "
                f"per GPU per step; {s['ms']:.2f} ms ({how})")  # fmt: skip

    lines = [step(t, "model"), step(d, "draft"), f"verify pass: {r['verify_ms']:.2f} ms; plain decode: "
             f"{r['plain_tokens_per_s']:.1f} tokens/s per user", ""]  # fmt: skip
    rates = list(r["speculative"][0]["tokens_per_s"]) if r["speculative"] else []
    lines.append(f"{'k':>2}  {'step ms':>8}  {'L needed':>8}  " + "  ".join(f"{'a=' + a:>7}" for a in rates))
    for row in r["speculative"]:
        need = f"{row['accepted_length_needed']:.2f}" + ("" if row["reachable"] else "!")
        lines.append(f"{row['k']:>2}  {row['step_ms']:8.2f}  {need:>8}  "
                     + "  ".join(f"{v:7.1f}" for v in row["tokens_per_s"].values()))  # fmt: skip
    lines.append(f"(tokens/s per user at per-token acceptance a; L needed: tokens per verification for "
                 f"{r['goal_tokens_per_s']:g} tokens/s; '!': above k + 1, out of reach at that k)")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    ap.add_argument("--model", default="llama-3.1-405b", help="preset or config.json (default llama-3.1-405b)")
    ap.add_argument("--draft", default="llama-3.2-1b", help="draft preset or config.json (default llama-3.2-1b)")
    ap.add_argument("--quant", default="fp8", help="weight format of both (default fp8)")
    ap.add_argument("--kv-dtype", default="fp8", help="KV-cache dtype (default fp8)")
    ap.add_argument("--gpus", type=int, default=8, help="tensor-parallel GPUs (default 8)")
    ap.add_argument("--context", type=int, default=2048, help="tokens in the cache per step (default 2048)")
    ap.add_argument("--hbm-gbps", type=float, default=HBM_GBPS["h200"],
                    help=f"HBM bandwidth per GPU in GB/s (default {HBM_GBPS['h200']}: H200; H100 SXM "
                         f"{HBM_GBPS['h100']}); better: the copy bandwidth bench_generate measures")  # fmt: skip
    ap.add_argument("--allreduce-us", type=float, default=0.0,
                    help="microseconds per small all-reduce (default 0: bandwidth only; measure it)")  # fmt: skip
    ap.add_argument("--verify-ratio", type=float, default=1.0,
                    help="verify pass (k + 1 tokens) / decode step at batch 1 (default 1.0: bandwidth-bound)")
    ap.add_argument("--decode-ms", type=float, help="measured decode step of the model (default: estimated)")
    ap.add_argument("--verify-ms", type=float, help="measured verify pass (default: decode x --verify-ratio)")
    ap.add_argument("--draft-ms", type=float, help="measured decode step of the draft (default: estimated)")
    ap.add_argument("--k", type=int, nargs="+", default=[3, 5, 7], help="draft tokens per step (default 3 5 7)")
    ap.add_argument("--acceptance", type=float, nargs="+", default=[0.6, 0.7, 0.8, 0.9],
                    help="per-token acceptance rates to tabulate (default 0.6 0.7 0.8 0.9)")  # fmt: skip
    ap.add_argument("--target", type=float, default=120.0, help="tokens/s per user to reach (default 120)")
    ap.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    try:
        r = arithmetic(args)
    except ValueError as e:
        print(f"spec_arithmetic: error: {e}", file=sys.stderr)
        return 1
    print(report(r))
    if args.out:
        args.out.write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
