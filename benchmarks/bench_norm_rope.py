"""Fused add+RMSNorm (bf16 and FP8 output), quantize_fp8 and RoPE + KV-cache write, against eager
torch.

    python benchmarks/bench_norm_rope.py --out benchmarks/results/norm-rope-h100-<date>.json
    python benchmarks/bench_norm_rope.py --smoke
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


def _eager_add_rms_norm(x, r, w):
    s = x + r
    return F.rms_norm(s.float(), (s.shape[-1],), w.float(), 1e-5).to(s.dtype), s


def cases(device: torch.device, smoke: bool, requested: str) -> list[Case]:
    bf16 = torch.bfloat16
    shapes = [(3, 576)] if smoke else [(m, h) for m in (1, 4096) for h in (4096, 8192, 16384)]
    out = []
    for m, h in shapes:
        x, r = torch.randn(m, h, device=device).to(bf16), torch.randn(m, h, device=device).to(bf16)
        w = torch.randn(h, device=device).to(bf16)
        c = Case("add_rms_norm", f"{m}x{h}", 4 * m * h * 2)
        for b in our_backends("add_rms_norm", device, requested):
            c.impls[b] = lambda b=b, x=x, r=r, w=w: ops.add_rms_norm(x, r, w, backend=b)
        c.impls["torch eager"] = lambda x=x, r=r, w=w: _eager_add_rms_norm(x, r, w)
        c8 = Case("add_rms_norm_fp8", f"{m}x{h}", m * h * (3 * 2 + 1) + 4 * m)
        for b in our_backends("add_rms_norm_fp8", device, requested):
            c8.impls[b] = lambda b=b, x=x, r=r, w=w: ops.add_rms_norm_fp8(x, r, w, backend=b)
        q = Case("quantize_fp8", f"{m}x{h}", m * h * 3 + 4 * m)
        for b in our_backends("quantize_fp8", device, requested):
            q.impls[b] = lambda b=b, x=x: ops.quantize_fp8(x, backend=b)
        out += [c, c8, q]
    # RoPE + cache write at decode (T = batch) and prefill (T = 4096), Llama 3.1 8B heads.
    rope_shapes = [(5, 9, 3, 64)] if smoke else [(t, 32, 8, 128) for t in (1, 64, 4096)]
    for t, hq, hkv, d in rope_shapes:
        cos, sin = ops.rope_cos_sin(d, 8192, 500000.0, device=device)
        q = torch.randn(t, hq, d, device=device).to(bf16)
        k, v = torch.randn(t, hkv, d, device=device).to(bf16), torch.randn(t, hkv, d, device=device).to(bf16)
        blocks = (t + 15) // 16 + 1
        kc = torch.zeros(blocks, 16, hkv, d, dtype=bf16, device=device)
        vc = torch.zeros_like(kc)
        pos = torch.arange(t, device=device)
        slots = torch.arange(t, device=device)
        c = Case("rope_and_cache", f"T{t} {hq}/{hkv}x{d}", 2 * 2 * (q.numel() + 2 * k.numel()) + 8 * t)
        for b in our_backends("rope_and_cache", device, requested):
            c.impls[b] = lambda b=b, q=q, k=k, v=v, p=pos, kc=kc, vc=vc, s=slots, cos=cos, sin=sin: ops.rope_and_cache(
                q, k, v, p, cos, sin, kc, vc, s, backend=b)  # fmt: skip
        out.append(c)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    return common.main(__doc__, "norm/rope", cases, argv)


if __name__ == "__main__":
    main()
