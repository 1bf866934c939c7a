"""Split-KV GQA decode attention over a paged KV cache, against SDPA on the gathered (contiguous)
cache and, where installed, FlashInfer's paged decode.

    python benchmarks/bench_attention.py --out benchmarks/results/attention-h100-<date>.json
    python benchmarks/bench_attention.py --smoke
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from common import Case, our_backends  # noqa: E402

from llama_kernels import ops  # noqa: E402

BLOCK = 16


def cases(device: torch.device, smoke: bool, requested: str) -> list[Case]:
    if smoke:
        configs = [(2, 100, 9, 3, 64, torch.bfloat16)]
    else:
        configs = [(b, ctx, hkv * g, hkv, 128, dt) for b in (1, 8, 64) for ctx in (1024, 4096, 32768, 131072)
                   for hkv, g in ((8, 4), (8, 8), (8, 16)) for dt in (torch.bfloat16, torch.float8_e4m3fn)
                   if b * ctx <= 64 * 32768]  # fmt: skip
    out = []
    for b, ctx, hq, hkv, d, cache_dtype in configs:
        n_blocks = b * ((ctx + BLOCK - 1) // BLOCK)
        k_cache = torch.randn(n_blocks, BLOCK, hkv, d, device=device).to(cache_dtype)
        v_cache = torch.randn(n_blocks, BLOCK, hkv, d, device=device).to(cache_dtype)
        scales = torch.ones(hkv, device=device) if cache_dtype == torch.float8_e4m3fn else None
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


def main(argv: list[str] | None = None) -> list[dict]:
    return common.main(__doc__, "decode attention", cases, argv)


if __name__ == "__main__":
    main()
