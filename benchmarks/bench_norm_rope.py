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


SLACK = 64 << 20  # the CUDA context's own allocations, small tensors


def cases(device: torch.device, smoke: bool, requested: str) -> list[Case]:
    bf16 = torch.bfloat16
    usable = {op: our_backends(op, device, requested)
              for op in ("add_rms_norm", "add_rms_norm_fp8", "quantize_fp8", "rope_and_cache")}  # fmt: skip

    def rand(*shape):
        return torch.randn(*shape, device=device).to(bf16)

    def build_norm(op: str, m: int, h: int) -> dict:
        x, r, w = rand(m, h), rand(m, h), rand(h)
        if op == "quantize_fp8":
            return {b: lambda b=b: ops.quantize_fp8(x, backend=b) for b in usable[op]}
        impls = {b: lambda b=b: getattr(ops, op)(x, r, w, backend=b) for b in usable[op]}
        if op == "add_rms_norm":
            impls["torch eager"] = lambda: _eager_add_rms_norm(x, r, w)
        return impls

    def build_rope(t: int, hq: int, hkv: int, d: int) -> dict:
        cos, sin = ops.rope_cos_sin(d, 8192, 500000.0, device=device)
        q, k, v = rand(t, hq, d), rand(t, hkv, d), rand(t, hkv, d)
        kc = torch.zeros((t + 15) // 16 + 1, 16, hkv, d, dtype=bf16, device=device)
        vc = torch.zeros_like(kc)
        pos = slots = torch.arange(t, device=device)
        return {b: lambda b=b: ops.rope_and_cache(q, k, v, pos, cos, sin, kc, vc, slots, backend=b)
                for b in usable["rope_and_cache"]}  # fmt: skip

    shapes = [(3, 576)] if smoke else [(m, h) for m in (1, 4096) for h in (4096, 8192, 16384)]
    out = []
    for m, h in shapes:
        peak = 24 * m * h + SLACK  # x, r (4 bytes a value), two results kept (8), eager torch's float32 temporaries (12)
        for op, nbytes in (("add_rms_norm", 4 * m * h * 2), ("add_rms_norm_fp8", m * h * (3 * 2 + 1) + 4 * m),
                           ("quantize_fp8", m * h * 3 + 4 * m)):  # fmt: skip
            out.append(Case(op, f"{m}x{h}", nbytes, build=lambda op=op, m=m, h=h: build_norm(op, m, h), peak_bytes=peak))
    # RoPE + cache write at decode (T = batch) and prefill (T = 4096), Llama 3.1 8B heads.
    for t, hq, hkv, d in [(5, 9, 3, 64)] if smoke else [(t, 32, 8, 128) for t in (1, 64, 4096)]:
        peak = 6 * 2 * t * (hq + 2 * hkv) * d + 2 * 8192 * d * 4 + SLACK  # q, k, v (+ randn, + outputs), caches, cos/sin
        out.append(Case("rope_and_cache", f"T{t} {hq}/{hkv}x{d}", 2 * 2 * (t * hq * d + 2 * t * hkv * d) + 8 * t,
                        build=lambda t=t, hq=hq, hkv=hkv, d=d: build_rope(t, hq, hkv, d), peak_bytes=peak))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    return common.main(__doc__, "norm/rope", cases, argv)


if __name__ == "__main__":
    sys.exit(common.exit_status(main()))
