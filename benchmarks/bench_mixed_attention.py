"""Mixed steps: a prefill chunk beside decode rows, in one paged_prefill_attention call (the
triton kernel and its per-step plan), against the same chunk alone plus the same decode rows
alone through decode_attention. The issue's target: mixed <= 1.2 x (prefill alone + decode alone).

Shapes: Llama 3.1 8B (32 query heads, 8 KV heads) and 405B on 8 GPUs (16 query heads, 1 KV head
per GPU), head_dim 128, bf16 q, bf16 and FP8 caches in blocks of 16; a 512- or 2048-token chunk
(at prefix 0 or over a 32K prefix) with 1-64 decode rows at 8K-128K context. Each case's tensors
are built just before it is timed and freed after; the JSON (--out) is rewritten after every case,
so a run cut short keeps what it measured. Times are per layer: the plan, built once per forward
pass, is built before timing (its build is timed on its own, "plan").

    python benchmarks/bench_mixed_attention.py --out benchmarks/results/mixed-attention-h100-<date>.json
    python benchmarks/bench_mixed_attention.py --smoke     # tiny shapes on any device, seconds
"""

from __future__ import annotations

import datetime
import json
import platform
import re
import sys
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402  (sets TRITON_INTERPRET without a GPU, before triton loads)

from llama_kernels import ops  # noqa: E402
from llama_kernels.triton import prefill_attention  # noqa: E402

BLOCK = 16
FP8 = torch.float8_e4m3fn
K = 1024


class Spec(NamedTuple):
    model: str
    hq: int  # query heads (per GPU)
    hkv: int  # KV heads (per GPU)
    d: int
    chunk: int  # new tokens of the prefill sequence
    prefix: int  # its cached tokens before them
    rows: int  # decode rows
    ctx: int  # each decode row's context (tokens in the cache, its new one included)
    cache_dtype: torch.dtype

    @property
    def name(self) -> str:
        return (f"{self.model} chunk{self.chunk}@{self.prefix} + {self.rows}x decode@{self.ctx} "
                f"{str(self.cache_dtype)[6:]}")  # fmt: skip


MODELS = {"8B": (32, 8, 128), "405B-TP8": (16, 1, 128)}
STEPS = [(512, 0, 1, 128 * K), (512, 0, 8, 32 * K), (512, 32 * K, 16, 32 * K), (2048, 0, 64, 8 * K),
         (2048, 0, 4, 128 * K)]  # fmt: skip


def specs(smoke: bool) -> list[Spec]:
    if smoke:
        return [Spec("smoke", 4, 2, 64, 20, 10, 2, 40, FP8)]  # the interpreter: every program costs
    return [Spec(m, *MODELS[m], *step, dt) for m in MODELS for step in STEPS for dt in (torch.bfloat16, FP8)]


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


def peak_bytes(s: Spec) -> int:
    """Device memory a case holds at once (arithmetic, no allocation): the caches, q and the outputs,
    the prefill kernel's partial workspace (at most 4 x SMs x 128 rows per KV head, 132 SMs) and
    decode_attention's split partials (at most 64 splits per row and head)."""
    blocks = _blocks(s.prefix + s.chunk) + s.rows * _blocks(s.ctx)
    cache = 2 * blocks * BLOCK * s.hkv * s.d * (1 if s.cache_dtype == FP8 else 2)
    tokens = s.chunk + s.rows
    q_out = 4 * tokens * s.hq * s.d * 2  # q, the mixed, prefill and decode outputs
    workspace = 4 * (132 // s.hkv) * s.hkv * 128 * (s.d + 1) * 4
    splits = s.rows * s.hq * 64 * (s.d + 1) * 4
    return cache + q_out + workspace + splits


def build(s: Spec, device: torch.device) -> dict:
    """The case's tensors: one paged cache holding the chunk's sequence (row 0) and the decode rows'."""
    g = torch.Generator(device=device).manual_seed(0)
    lens = [s.prefix + s.chunk] + [s.ctx] * s.rows
    width = max(_blocks(n) for n in lens)
    n_blocks = sum(_blocks(n) for n in lens)
    ids = torch.randperm(n_blocks, device=device, generator=g).int()
    table = torch.zeros(len(lens), width, dtype=torch.int32, device=device)  # unused entries: block 0
    start = 0
    for b, n in enumerate(lens):
        table[b, : _blocks(n)] = ids[start : start + _blocks(n)]
        start += _blocks(n)
    shape = (n_blocks, BLOCK, s.hkv, s.d)
    kc = torch.randn(shape, device=device, generator=g).to(s.cache_dtype)
    vc = torch.randn(shape, device=device, generator=g).to(s.cache_dtype)
    scale = torch.full((s.hkv,), 0.5, device=device) if s.cache_dtype == FP8 else None
    q = torch.randn(s.chunk + s.rows, s.hq, s.d, device=device, generator=g).to(torch.bfloat16)
    i32 = dict(dtype=torch.int32, device=device)
    return dict(q=q, kc=kc, vc=vc, table=table, scale=scale, lens=torch.tensor(lens, **i32),
                qlens=torch.tensor([s.chunk] + [1] * s.rows, **i32))  # fmt: skip


def impls(s: Spec, t: dict, decode_backends: list[str]) -> dict:
    """label -> call: the mixed step, its parts alone, and the plan's build."""
    q, kc, vc, table, sc, lens, qlens = t["q"], t["kc"], t["vc"], t["table"], t["scale"], t["lens"], t["qlens"]
    pre = (q[: s.chunk], table[:1], lens[:1], qlens[:1])
    dec = (q[s.chunk :], table[1:].contiguous(), lens[1:].contiguous())
    plans_mixed, plans_prefill = {}, {}

    def attend(q, table, lens, qlens, plans):
        return ops.paged_prefill_attention(q, kc, vc, table, lens, qlens, k_scale=sc, v_scale=sc, plans=plans,
                                           backend="triton")  # fmt: skip

    attend(q, table, lens, qlens, plans_mixed)  # builds the plans (once per forward pass in the model)
    attend(*pre, plans_prefill)
    calls = {"mixed": lambda: attend(q, table, lens, qlens, plans_mixed),
             "prefill alone": lambda: attend(*pre, plans_prefill),
             "plan": lambda: prefill_attention.make_plan(q, kc, table, lens, qlens)}  # fmt: skip
    for be in decode_backends:
        calls[f"decode alone ({be})"] = lambda be=be: ops.decode_attention(*dec[:1], kc, vc, *dec[1:], k_scale=sc,
                                                                           v_scale=sc, backend=be)  # fmt: skip
    return calls


def main(argv: list[str] | None = None) -> list[dict]:
    args = common.parse_args(__doc__, argv, backends="cuda,triton")  # --backends: those of decode_attention
    device = torch.device(args.device)
    iters, warmup = args.iters or (1 if args.smoke else 30), 0 if args.smoke else 5
    if not common.our_backends("paged_prefill_attention", device, "triton"):
        raise SystemExit("bench_mixed_attention: the triton paged_prefill_attention cannot run here")
    requested = ",".join(b for b in args.backends.split(",") if b != "torch")
    decode_backends = common.our_backends("decode_attention", device, requested)
    meta = {
        "benchmark": "mixed attention",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "driver": common._driver(), "torch": torch.__version__, "triton": common._version("triton"),
        "smoke": args.smoke, "iters": iters,
    }  # fmt: skip
    print(f"# mixed attention: {meta['device']}  torch {meta['torch']}  triton {meta['triton']}")
    print(f"{'case':<52} {'mixed us':>9} {'prefill':>9} {'decode':>9} {'plan':>7} {'ratio':>6}")
    rows = []
    cases = [s for s in specs(args.smoke) if args.only is None or re.search(args.only, s.name)]
    for i, s in enumerate(cases, 1):
        tensors = build(s, device)
        times = {label: common.time_call(device, fn, iters, warmup) * 1e6
                 for label, fn in impls(s, tensors, decode_backends).items()}  # fmt: skip
        del tensors
        if device.type == "cuda":
            torch.cuda.empty_cache()
        decode = min((v, k) for k, v in times.items() if k.startswith("decode alone"))
        row = {"case": s.name, "model": s.model, "chunk": s.chunk, "prefix": s.prefix, "decode_rows": s.rows,
               "decode_ctx": s.ctx, "cache": str(s.cache_dtype)[6:], "times_us": times,
               "decode_backend": decode[1][len("decode alone (") : -1],
               "ratio": times["mixed"] / (times["prefill alone"] + decode[0]), "peak_bytes": peak_bytes(s)}  # fmt: skip
        rows.append(row)
        print(f"{s.name:<52} {times['mixed']:9.1f} {times['prefill alone']:9.1f} {decode[0]:9.1f} "
              f"{times['plan']:7.1f} {row['ratio']:6.2f}  [{i}/{len(cases)}]", flush=True)  # fmt: skip
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if args.out:
        print(f"# wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
