"""Paged prefill attention (`ops.paged_prefill_attention`) at Llama 3.1 8B and 405B-TP8 shapes,
against SDPA's flash and cuDNN kernels on the same chunk, and mixed batches against their decode
rows alone (the straggler ratio).

A case is one sequence's chunk of new tokens over its cached prefix (causal to the bottom right:
new token i sees the prefix and tokens 0..i of the chunk; FLOPs count exactly that), with bf16 or
FP8 KV. The SDPA baselines get that sequence's cache gathered, dequantized to bf16 and with its KV
heads expanded to the query heads (flash attention's best case); a baseline this torch or GPU
lacks is skipped with the reason, and each row's relerr compares its output with ours.

A mixed case adds decode rows (one new token each, 32K-128K context) to the chunk in the same
launch, as a continuous-batching step does. It is timed three ways: the mixed launch, the chunk
alone, and the decode rows alone through `ops.decode_attention`; the straggler ratio is
t(mixed) / (t(chunk alone) + t(decode rows alone)): about 1 when a long decode row does not hold
the launch back, well over 1 when one program walks a 128K-token row alone while the rest wait.

    python benchmarks/bench_prefill.py --out benchmarks/results/prefill-h100-<date>.json
    python benchmarks/bench_prefill.py --smoke

`--backends ...,triton-fp8t` adds, on FP8 chunks, the triton kernel with its transposed prefill tiles
(prefill_attention.FP8_TRANSPOSED: decoded K/V kept out of shared memory; off by default, this is the
A/B that decides it).

The case list is the table CASES below: one line per case, easy to extend.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from bench_attention import BLOCK, FP8, SLACK, cache_peak_bytes, random_cache  # noqa: E402
from common import Case, our_backends  # noqa: E402

from llama_kernels import ops  # noqa: E402
from llama_kernels.selftest import rel_err  # noqa: E402

FP8_TRANSPOSED = "triton-fp8t"  # --backends name of the triton kernel with FP8_TRANSPOSED on

# per-GPU attention shapes: query heads, KV heads, head_dim
MODELS = {"8B": (32, 8, 128), "405B/8": (16, 1, 128), "smoke": (6, 2, 64)}
MIX = (32768, 65536, 98304, 131072) * 2  # decode rows' contexts, 32K to 128K
# (model, chunk tokens, cached prefix tokens, decode rows' contexts); every case runs with each of KV_DTYPES
CASES = [
    ("8B", 8192, 0, ()),
    ("8B", 2048, 30720, ()),
    ("8B", 512, 32768, ()),
    ("405B/8", 8192, 0, ()),
    ("405B/8", 2048, 30720, ()),
    ("405B/8", 512, 32768, ()),
    ("8B", 2048, 30720, (32768,) * 8),
    ("8B", 512, 32768, MIX),
    ("405B/8", 2048, 30720, (32768,) * 8),
    ("405B/8", 512, 32768, MIX),
]
SMOKE_CASES = [("smoke", 40, 30, ()), ("smoke", 24, 50, (70, 90))]
KV_DTYPES = (torch.bfloat16, FP8)
CLOSE = 0.02  # relerr of a bf16 attention kernel against float32 on the same inputs is far under this
CHECK_ROWS = 64  # the chunk's last query rows each SDPA baseline is checked on before it is timed


def _flops(hq: int, d: int, seqs: list[tuple[int, int]]) -> int:
    """QK^T and PV multiply-adds of causal attention: a sequence's new token i of q_len sees ctx - q_len + i + 1 keys."""
    return sum(4 * hq * d * (q * (ctx - q) + q * (q + 1) // 2) for ctx, q in seqs)


def _bytes(hq: int, hkv: int, d: int, elt: int, seqs: list[tuple[int, int]]) -> int:
    """Each sequence's K and V read once, q read and out written once (bf16)."""
    return sum(2 * ctx * hkv * d * elt + 2 * q * hq * d * 2 for ctx, q in seqs)


def peak_bytes(hq: int, hkv: int, d: int, dtype: torch.dtype, seqs: list[tuple[int, int]], baselines: bool) -> int:
    """The most GPU memory a case holds: the caches (random_cache's float32 randn while building),
    q and two outputs; for the SDPA baselines the chunk's gathered blocks, their bf16 copy, the
    head-expanded k, v [Hq, ctx, D], the flash / cuDNN log-sum-exp, and the float32 check of the last
    CHECK_ROWS rows (k, v in float32, scores and probabilities [Hq, rows, ctx])."""
    n = sum(-(-ctx // BLOCK) for ctx, _ in seqs) * BLOCK * hkv * d  # cache values, whole blocks
    tokens = sum(q for _, q in seqs)
    peak = cache_peak_bytes(n, dtype) + 3 * tokens * hq * d * 2
    if baselines:
        ctx, q = seqs[0]
        gathered = -(-ctx // BLOCK) * BLOCK * hkv * d
        rows = min(q, CHECK_ROWS)
        peak += 2 * 2 * ctx * hq * d + gathered * (torch.empty((), dtype=dtype).element_size() + 2) + 2 * 4 * hq * q
        peak += 2 * 4 * ctx * hq * d + 2 * 4 * hq * rows * ctx
    return peak + SLACK


def _layout(seqs: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(block_table [B, max_blocks] over shuffled blocks, seq_lens [B], query_lens [B], number of blocks)."""
    blocks = [-(-ctx // BLOCK) for ctx, _ in seqs]
    perm = torch.randperm(sum(blocks), device=device).int()
    table = torch.zeros(len(seqs), max(blocks), dtype=torch.int32, device=device)
    start = 0
    for i, nb in enumerate(blocks):
        table[i, :nb] = perm[start : start + nb]
        start += nb
    lens = torch.tensor([ctx for ctx, _ in seqs], dtype=torch.int32, device=device)
    qlens = torch.tensor([q for _, q in seqs], dtype=torch.int32, device=device)
    return table, lens, qlens, sum(blocks)


def _last_rows_reference(qx: torch.Tensor, kx: torch.Tensor, vx: torch.Tensor, scale: float, rows: int) -> torch.Tensor:
    """float32 attention of the chunk's last `rows` queries [rows, Hq, D], causal to the bottom right: query
    i of the m new tokens sees the first ctx - m + i + 1 keys (a top-left mask would give the last row m keys)."""
    m, ctx = qx.shape[2], kx.shape[2]
    q = qx[0, :, m - rows :].float()  # [Hq, rows, D]
    scores = q @ kx[0].float().transpose(1, 2) * scale  # [Hq, rows, ctx]
    sees = torch.arange(ctx, device=q.device)[None] <= torch.arange(ctx - rows, ctx, device=q.device)[:, None]
    p = scores.masked_fill(~sees, float("-inf")).softmax(-1)
    return (p @ vx[0].float()).transpose(0, 1)


def _sdpa_baselines(q, k_cache, v_cache, table, ctx: int, hq: int, scale: float) -> dict:
    """{"sdpa flash": call, "sdpa cudnn": call} on one sequence's gathered, bf16, head-expanded cache;
    a label maps to the reason instead where that kernel is missing here, or where it computes other
    attention than ours (its last rows checked against a float32 reference: e.g. a top-left causal mask)."""
    if q.device.type != "cuda":
        return {"sdpa flash": "needs a CUDA GPU", "sdpa cudnn": "needs a CUDA GPU"}
    m, _, d = q.shape
    nb = -(-ctx // BLOCK)
    # [1, Hq, ctx, D]: the blocks in order, dequantized (unit scales), KV head h // g for query head h
    kx, vx = (c[table[0, :nb].long()].flatten(0, 1)[:ctx].to(torch.bfloat16).transpose(0, 1)
              .repeat_interleave(hq // c.shape[2], 0)[None] for c in (k_cache, v_cache))  # fmt: skip
    qx = q.transpose(0, 1)[None]  # [1, Hq, m, D], a view
    rows = min(m, CHECK_ROWS)
    ref = _last_rows_reference(qx, kx, vx, scale, rows)
    aten = torch.ops.aten
    calls = {  # is_causal: both kernels are asked for the bottom-right mask (flash's: see torch.nn.attention.bias)
        "sdpa flash": lambda: aten._scaled_dot_product_flash_attention(qx, kx, vx, 0.0, True, False, scale=scale)[0][0].transpose(0, 1),
        "sdpa cudnn": lambda: aten._scaled_dot_product_cudnn_attention(
            qx, kx, vx, None, False, 0.0, True, False, scale=scale)[0][0].transpose(0, 1),
    }  # fmt: skip
    out = {}
    for label, fn in calls.items():
        try:
            err = rel_err(fn()[m - rows :], ref)
        except Exception as e:  # noqa: BLE001 (not built into this torch, or not for this GPU / shape)
            out[label] = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        out[label] = fn if err <= CLOSE else f"not the same attention: last {rows} rows' relerr {err:.2g} vs float32"
    return out


def _fp8_transposed(call):
    """`call` (a triton paged_prefill_attention) with prefill_attention.FP8_TRANSPOSED on."""
    from llama_kernels.triton import prefill_attention

    def run():
        prefill_attention.FP8_TRANSPOSED = True
        try:
            return call()
        finally:
            prefill_attention.FP8_TRANSPOSED = False

    return run


def _case(op: str, model: str, dtype: torch.dtype, seqs: list[tuple[int, int]], device, usable: list[str],
          baselines: bool, mix: str | None, transposed: bool = False) -> Case:  # fmt: skip
    hq, hkv, d = MODELS[model]
    scale = 1 / math.sqrt(d)

    def build() -> dict:
        table, lens, qlens, n_blocks = _layout(seqs, device)
        k_cache, v_cache, scales = random_cache(n_blocks, hkv, d, dtype, device)
        q = torch.randn(int(qlens.sum()), hq, d, device=device).to(torch.bfloat16)
        if op == "decode_attention":
            impls = {be: lambda be=be: ops.decode_attention(q, k_cache, v_cache, table, lens, scale, scales, scales,
                                                            backend=be) for be in usable}  # fmt: skip
        else:
            impls = {be: lambda be=be: ops.paged_prefill_attention(q, k_cache, v_cache, table, lens, qlens, scale,
                                                                   scales, scales, backend=be) for be in usable}  # fmt: skip
            if transposed and dtype == FP8 and "triton" in impls:
                impls[FP8_TRANSPOSED] = _fp8_transposed(impls["triton"])
        if baselines:
            impls.update(_sdpa_baselines(q, k_cache, v_cache, table, seqs[0][0], hq, scale))
        return impls

    elt = torch.empty((), dtype=dtype).element_size()
    kv = str(dtype).removeprefix("torch.")
    if op == "decode_attention":
        shape = f"{model} {len(seqs)} decode rows {kv}"
    else:
        (ctx, q), rows = seqs[0], len(seqs) - 1
        shape = f"{model} chunk{q} prefix{ctx - q}" + (f" +{rows} decode" if rows else " alone" if mix else "") + f" {kv}"
    extra = {"model": model, "kv": kv, "seq_lens": [c for c, _ in seqs], "query_lens": [q for _, q in seqs]}
    if mix:
        extra["mix"] = mix
    return Case(op, shape, _bytes(hq, hkv, d, elt, seqs), _flops(hq, d, seqs), build,
                peak_bytes(hq, hkv, d, dtype, seqs, baselines), extra)  # fmt: skip


def cases(device: torch.device, smoke: bool, requested: str) -> list[Case]:
    names = requested.split(",")
    transposed = FP8_TRANSPOSED in names
    requested = ",".join(n for n in names if n != FP8_TRANSPOSED)
    prefill = our_backends("paged_prefill_attention", device, requested)
    decode = [b for b in our_backends("decode_attention", device, requested) if b in prefill] or prefill
    out = []
    for model, chunk, prefix, decode_ctx in SMOKE_CASES if smoke else CASES:
        for dtype in KV_DTYPES:
            seqs = [(prefix + chunk, chunk)]
            if not decode_ctx:
                out.append(_case("paged_prefill_attention", model, dtype, seqs, device, prefill, True, None,
                                 transposed))
                continue
            rows = [(ctx, 1) for ctx in decode_ctx]
            mix = f"{model} chunk{chunk} prefix{prefix} + decode {','.join(map(str, decode_ctx))} {str(dtype)[6:]}"
            out.append(_case("paged_prefill_attention", model, dtype, seqs + rows, device, prefill, False, mix))
            out.append(_case("paged_prefill_attention", model, dtype, seqs, device, prefill, False, mix))
            out.append(_case("decode_attention", model, dtype, rows, device, decode, False, mix))
    return out


def straggler_ratios(rows: list[dict]) -> list[dict]:
    """Per mixed case and backend: t(mixed launch) / (t(chunk alone) + t(decode rows alone))."""
    timed = {}
    for r in rows:
        if "mix" in r and "time_us" in r:
            part = "decode" if r["op"] == "decode_attention" else "mixed" if len(r["seq_lens"]) > 1 else "chunk"
            timed[(r["mix"], r["impl"], part)] = r["time_us"]
    out = []
    for (mix, impl, part), t in timed.items():
        if part == "mixed" and (mix, impl, "chunk") in timed and (mix, impl, "decode") in timed:
            alone = timed[(mix, impl, "chunk")] + timed[(mix, impl, "decode")]
            out.append({"mix": mix, "impl": impl, "mixed_us": t, "alone_us": alone, "straggler_ratio": t / alone})
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    args = common.parse_args(__doc__, argv)
    device = torch.device(args.device)
    rows = common.run("prefill attention", common.select(cases(device, args.smoke, args.backends), args.only), args, device)
    ratios = straggler_ratios(rows)
    for r in ratios:
        print(f"# straggler ratio {r['impl']:<7} {r['mix']}: {r['straggler_ratio']:.2f} "
              f"(mixed {r['mixed_us']:.1f} us, alone {r['alone_us']:.1f} us)")  # fmt: skip
    if args.out and ratios:
        data = common.read_json(args.out)
        data["straggler"] = ratios
        common.write_json(args.out, data)
    return rows


if __name__ == "__main__":
    sys.exit(common.exit_status(main()))
