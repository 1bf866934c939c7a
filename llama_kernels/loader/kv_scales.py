"""FP8 KV-cache scales a Hugging Face checkpoint carries (stored = x / scale, as in vLLM), under the
names vLLM loads them from:
- compressed-tensors `kv_cache_scheme` (llm-compressor), fbgemm and vLLM's own FP8 checkpoints:
  `model.layers.N.self_attn.k_scale` / `v_scale`;
- older compressed-tensors: `self_attn.k_proj.output_scale` / `v_proj.output_scale`;
- ModelOpt: `self_attn.k_proj.k_scale` / `v_proj.v_scale`.
Each is one scalar per layer (broadcast to every KV head) or one scale per KV head; under tensor
parallel a rank takes its heads' entries. Query scales (`q_scale`, `q_proj.output_scale`) are
skipped: the query is not quantized here. The model's weights never include these tensors
(checkpoint.target skips them); LLM.from_pretrained reads them with read_kv_scales when the KV
cache is FP8 and ignores them otherwise.
"""

from __future__ import annotations

import re

import torch

from ..distributed import TensorParallel
from .errors import CheckpointError

_KV_SCALE_RE = re.compile(r"(?:model\.)?layers\.(\d+)\.self_attn\.(k_scale|v_scale|k_proj\.output_scale|"
                          r"v_proj\.output_scale|k_proj\.k_scale|v_proj\.v_scale)")  # fmt: skip
_Q_SCALE_RE = re.compile(r"(?:model\.)?layers\.\d+\.self_attn\.(q_scale|q_proj\.output_scale)")


def kv_scale_of(name: str) -> tuple[int, str] | None:
    """(layer, "k" or "v") of a KV-cache scale tensor's name; None for other tensors."""
    m = _KV_SCALE_RE.fullmatch(name)
    return (int(m.group(1)), m.group(2)[0]) if m else None


def is_attention_scale(name: str) -> bool:
    """Whether `name` is a k, v or q scale of the attention (not a tensor of any linear)."""
    return kv_scale_of(name) is not None or _Q_SCALE_RE.fullmatch(name) is not None


def read_kv_scales(ckpt, tp: TensorParallel | None) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """(k scales, v scales): one float32 [Hkv] tensor per layer (this rank's KV heads under tp; KVCache.set_scales
    clamps them away from 0); None when the checkpoint carries none. CheckpointError (one line) when only
    some layers have them, a layer has two, or one has the wrong size or a negative / non-finite value."""
    if not ckpt.kv_scales:
        return None
    from safetensors import safe_open

    layers, heads = ckpt.config.num_layers, ckpt.config.num_kv_heads
    found: dict[tuple[int, str], str] = {}
    for name in ckpt.kv_scales:
        place = kv_scale_of(name)
        if place[0] >= layers:
            raise CheckpointError(f"{ckpt.path}: tensor {name!r} has no place in a {layers}-layer model (config.json)")
        if place in found:
            raise CheckpointError(f"{ckpt.path}: layer {place[0]} has two {place[1]} scales, {found[place]!r} and "
                                  f"{name!r}; keep one")  # fmt: skip
        found[place] = name
    for i in range(layers):
        for kind in "kv":
            if (i, kind) not in found:
                raise CheckpointError(
                    f"{ckpt.path}: FP8 KV-cache scales are in the checkpoint for some layers, but layer {i} has no "
                    f"{kind} scale (model.layers.{i}.self_attn.{kind}_scale); a checkpoint carries them for every "
                    "layer or for none"
                )
    start, count = (0, heads) if tp is None else (tp.kv_start, tp.num_kv_heads)
    out: dict[str, list[torch.Tensor]] = {"k": [], "v": []}
    tensors = {}
    for shard in dict.fromkeys(ckpt.kv_scales.values()):
        with safe_open(str(shard), framework="pt") as f:
            tensors.update({n: f.get_tensor(n) for n, s in ckpt.kv_scales.items() if s == shard})
    for i in range(layers):
        for kind in "kv":
            name = found[i, kind]
            shard = ckpt.kv_scales[name]
            scale = tensors[name].float().flatten()
            if scale.numel() not in (1, heads):
                raise CheckpointError(f"{shard}: tensor {name!r} has {scale.numel()} elements; expected 1 (one scale "
                                      f"per layer) or {heads} (one per KV head)")  # fmt: skip
            if not (torch.isfinite(scale) & (scale >= 0)).all():
                raise CheckpointError(f"{shard}: tensor {name!r} holds {scale.tolist()}; expected positive finite "
                                      "FP8 scales")  # fmt: skip
            per_head = scale.expand(heads)  # a scalar is every head's scale
            out[kind].append(per_head[start : start + count].contiguous())
    return out["k"], out["v"]
