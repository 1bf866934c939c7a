"""Split-KV GQA decode attention and paged prefill attention over a paged KV cache, against SDPA
on the gathered (contiguous) cache.

Prefill rows: one sequence's chunk of new tokens over a cached prefix, attending causally to the
whole prefix (FLOPs count only the causal half of the chunk's own square); the SDPA baseline gets
the gathered cache with its KV heads already expanded to the query heads (flash attention's best
case). The torch reference is timed only at small sizes.

    python benchmarks/bench_attention.py --out benchmarks/results/attention-h100-<date>.json
    python benchmarks/bench_attention.py --smoke
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from common import Case, our_backends  # noqa: E402

from llama_kernels import ops  # noqa: E402

# After common: this import loads triton, which must see TRITON_INTERPRET (set by common) first.
from torch.nn.attention.bias import causal_lower_right  # noqa: E402

BLOCK = 16
FP8 = torch.float8_e4m3fn
REFERENCE_MAX_SCORES = 1 << 28  # query x key x head scores above which the torch reference is not timed


def random_cache(blocks: int, hkv: int, d: int, dtype: torch.dtype, device: torch.device):
    """Random k_cache, v_cache [blocks, BLOCK, hkv, d] and unit per-head scales when FP8."""
    k_cache = torch.randn(blocks, BLOCK, hkv, d, device=device).to(dtype)
    v_cache = torch.randn(blocks, BLOCK, hkv, d, device=device).to(dtype)
    return k_cache, v_cache, (torch.ones(hkv, device=device) if dtype == FP8 else None)


def decode_cases(device: torch.device, smoke: bool, requested: str) -> list[Case]:
    if smoke:
        configs = [(2, 100, 9, 3, 64, torch.bfloat16)]
    else:
        configs = [(b, ctx, hkv * g, hkv, 128, dt) for b in (1, 8, 64) for ctx in (1024, 4096, 32768, 131072)
                   for hkv, g in ((8, 4), (8, 8), (8, 16)) for dt in (torch.bfloat16, torch.float8_e4m3fn)
                   if b * ctx <= 64 * 32768]  # fmt: skip
    out = []
    for b, ctx, hq, hkv, d, cache_dtype in configs:
        n_blocks = b * ((ctx + BLOCK - 1) // BLOCK)
        k_cache, v_cache, scales = random_cache(n_blocks, hkv, d, cache_dtype, device)
        table = torch.randperm(n_blocks, device=device).int().view(b, -1)
        lens = torch.full((b,), ctx, dtype=torch.int32, device=device)
        q = torch.randn(b, hq, d, device=device).to(torch.bfloat16)
        elt = k_cache.element_size()
        case = Case("decode_attention", f"b{b} ctx{ctx} {hq}/{hkv}x{d} {str(cache_dtype)[6:]}",
                    2 * b * ctx * hkv * d * elt + 2 * q.numel() * 2, 4 * b * hq * ctx * d)  # fmt: skip
        for be in our_backends("decode_attention", device, requested):
            case.impls[be] = lambda be=be, q=q, kc=k_cache, vc=v_cache, t=table, n=lens, s=scales: ops.decode_attention(
                q, kc, vc, t, n, k_scale=s, v_scale=s, backend=be)  # fmt: skip
        if cache_dtype != torch.float8_e4m3fn:  # SDPA on the gathered cache: the contiguous baseline
            kg = k_cache[table.long()].reshape(b, -1, hkv, d)[:, :ctx].transpose(1, 2).contiguous()
            vg = v_cache[table.long()].reshape(b, -1, hkv, d)[:, :ctx].transpose(1, 2).contiguous()
            case.impls["sdpa gathered"] = lambda q=q, kg=kg, vg=vg: F.scaled_dot_product_attention(
                q[:, :, None], kg, vg, enable_gqa=True)  # fmt: skip
        out.append(case)
    return out


def prefill_cases(device: torch.device, smoke: bool, requested: str) -> list[Case]:
    dtypes = (torch.bfloat16, FP8)
    if smoke:
        chunks, prefixes, groups, hkv, d = (40,), (30,), (3,), 2, 64
    else:
        chunks, prefixes, groups, hkv, d = (512, 2048, 8192), (0, 32768, 131072), (8, 16), 8, 128
    # One cache (and block table) per dtype and one gathered, head-expanded copy per group, long
    # enough for every case: each case uses a prefix of them (all cases are built before any runs).
    max_ctx = max(prefixes) + max(chunks)
    n_blocks = (max_ctx + BLOCK - 1) // BLOCK
    table = torch.randperm(n_blocks, device=device).int().view(1, -1)
    caches = {dt: random_cache(n_blocks, hkv, d, dt, device) for dt in dtypes}
    # {group: [k, v] [1, Hq, max_ctx, D]}
    gathered = {g: [c[table[0].long()].flatten(0, 1).transpose(0, 1).repeat_interleave(g, 0)[None]
                    for c in caches[torch.bfloat16][:2]] for g in groups}  # fmt: skip
    out = []
    for m, prefix, g, cache_dtype in itertools.product(chunks, prefixes, groups, dtypes):
        ctx, hq = prefix + m, hkv * g
        k_cache, v_cache, scales = caches[cache_dtype]
        lens = torch.tensor([ctx], dtype=torch.int32, device=device)
        qlens = torch.tensor([m], dtype=torch.int32, device=device)
        q = torch.randn(m, hq, d, device=device).to(torch.bfloat16)
        elt = k_cache.element_size()
        flops = 4 * hq * d * (m * prefix + m * (m + 1) // 2)  # causal: token i sees prefix + i + 1 keys
        case = Case("paged_prefill_attention", f"chunk{m} prefix{prefix} {hq}/{hkv}x{d} {str(cache_dtype)[6:]}",
                    2 * ctx * hkv * d * elt + 2 * q.numel() * 2, flops)  # fmt: skip
        for be in our_backends("paged_prefill_attention", device, requested):
            if be == "torch" and m * ctx * hq > REFERENCE_MAX_SCORES:
                continue
            case.impls[be] = lambda be=be, q=q, kc=k_cache, vc=v_cache, n=lens, ql=qlens, s=scales: (
                ops.paged_prefill_attention(q, kc, vc, table, n, ql, k_scale=s, v_scale=s, backend=be))  # fmt: skip
        if cache_dtype != FP8:  # SDPA (flash where it can) on the gathered cache, causal to the bottom right
            kg, vg = (c[:, :, :ctx] for c in gathered[g])
            mask = causal_lower_right(m, ctx)
            case.impls["sdpa gathered"] = lambda q=q.transpose(0, 1)[None], kg=kg, vg=vg, mask=mask: (
                F.scaled_dot_product_attention(q, kg, vg, attn_mask=mask))  # fmt: skip
        out.append(case)
    return out


def cases(device: torch.device, smoke: bool, requested: str) -> list[Case]:
    return decode_cases(device, smoke, requested) + prefill_cases(device, smoke, requested)


def main(argv: list[str] | None = None) -> list[dict]:
    return common.main(__doc__, "attention", cases, argv)


if __name__ == "__main__":
    main()
