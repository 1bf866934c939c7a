"""Split-KV GQA decode attention over a paged KV cache, against SDPA on the gathered (contiguous)
cache. (Prefill attention: bench_prefill.py.)

Each case's cache is built just before it is timed and freed after (the largest, 64 sequences of
32K tokens with SDPA's gathered copies, holds about 20 GiB; the sweep at once would not fit).

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
FP8 = torch.float8_e4m3fn
# (batch, context, query heads, KV heads, head_dim, cache dtype); at most 64 x 32K tokens per case
CONFIGS = [(b, ctx, hkv * g, hkv, 128, dt) for b in (1, 8, 64) for ctx in (1024, 4096, 32768, 131072)
           for hkv, g in ((8, 4), (8, 8), (8, 16)) for dt in (torch.bfloat16, FP8)
           if b * ctx <= 64 * 32768]  # fmt: skip
SMOKE = [(2, 100, 9, 3, 64, torch.bfloat16)]
SLACK = 64 << 20  # the CUDA context's own allocations, split-KV partials, small tensors


def random_cache(blocks: int, hkv: int, d: int, dtype: torch.dtype, device: torch.device):
    """Random k_cache, v_cache [blocks, BLOCK, hkv, d] and unit per-head scales when FP8."""
    k_cache = torch.randn(blocks, BLOCK, hkv, d, device=device).to(dtype)
    v_cache = torch.randn(blocks, BLOCK, hkv, d, device=device).to(dtype)
    return k_cache, v_cache, (torch.ones(hkv, device=device) if dtype == FP8 else None)


def cache_peak_bytes(elements: int, dtype: torch.dtype) -> int:
    """GPU bytes random_cache holds at most for caches of `elements` values each: building v, the
    float32 randn beside k (4 + 1 bytes a value for FP8), then both caches."""
    elt = torch.empty((), dtype=dtype).element_size()
    return max(elt * elements + 4 * elements, 2 * elt * elements)


def decode_peak_bytes(b: int, ctx: int, hq: int, hkv: int, d: int, cache_dtype: torch.dtype) -> int:
    """The most GPU memory a decode case holds: its caches, and for SDPA (bf16 caches) the gathered
    k, v [b, hkv, ctx, d] plus the whole-block gather copy alive while the second is made contiguous."""
    n = b * -(-ctx // BLOCK) * BLOCK * hkv * d  # values per cache (whole blocks)
    peak = cache_peak_bytes(n, cache_dtype)
    if cache_dtype != FP8:
        peak = max(peak, 2 * 2 * n + 2 * n + 2 * 2 * b * ctx * hkv * d)
    return peak + 4 * b * hq * d * 2 + SLACK  # q, outputs


def decode_cases(device: torch.device, smoke: bool, requested: str) -> list[Case]:
    usable = our_backends("decode_attention", device, requested)
    out = []
    for b, ctx, hq, hkv, d, cache_dtype in SMOKE if smoke else CONFIGS:

        def build(b=b, ctx=ctx, hq=hq, hkv=hkv, d=d, cache_dtype=cache_dtype) -> dict:
            n_blocks = b * -(-ctx // BLOCK)
            k_cache, v_cache, scales = random_cache(n_blocks, hkv, d, cache_dtype, device)
            table = torch.randperm(n_blocks, device=device).int().view(b, -1)
            lens = torch.full((b,), ctx, dtype=torch.int32, device=device)
            q = torch.randn(b, hq, d, device=device).to(torch.bfloat16)
            impls = {be: lambda be=be: ops.decode_attention(q, k_cache, v_cache, table, lens, k_scale=scales,
                                                            v_scale=scales, backend=be) for be in usable}  # fmt: skip
            if cache_dtype != FP8:  # SDPA on the gathered cache: the contiguous baseline
                kg = k_cache[table.long()].reshape(b, -1, hkv, d)[:, :ctx].transpose(1, 2).contiguous()
                vg = v_cache[table.long()].reshape(b, -1, hkv, d)[:, :ctx].transpose(1, 2).contiguous()
                impls["sdpa gathered"] = lambda: F.scaled_dot_product_attention(
                    q[:, :, None], kg, vg, enable_gqa=True)[:, :, 0]  # fmt: skip
            return impls

        elt = torch.empty((), dtype=cache_dtype).element_size()
        out.append(Case("decode_attention", f"b{b} ctx{ctx} {hq}/{hkv}x{d} {str(cache_dtype)[6:]}",
                        2 * b * ctx * hkv * d * elt + 2 * b * hq * d * 2, 4 * b * hq * ctx * d, build,
                        decode_peak_bytes(b, ctx, hq, hkv, d, cache_dtype)))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    return common.main(__doc__, "decode attention", decode_cases, argv)


if __name__ == "__main__":
    sys.exit(common.exit_status(main()))
