"""Checkpoint: what a reader found (config, tokenizer, tensor stream), and load_model, which
streams its tensors into a Transformer tensor by tensor."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..distributed import TensorParallel
from ..int4 import Int4Weight
from ..model.config import LlamaConfig
from ..model.linear import Fp8Weight, quantize_model
from ..model.model import Transformer
from .errors import CheckpointError
from .kv_scales import is_attention_scale
from .tokenizer import Tokenizer


@dataclass
class Checkpoint:
    path: Path  # the directory or .gguf file
    config: LlamaConfig  # the model's hyperparameters and special tokens
    tokenizer: Tokenizer | None  # None when the checkpoint has no tokenizer
    nbytes: int  # bytes of tensor data the stream reads
    # tensors(tp) yields (HF name, CPU tensor, bytes read); a quantized linear's "<module>.weight"
    # comes as the Fp8Weight / Int4Weight its module loads; with a TensorParallel, the rank's slices
    tensors: Callable[[TensorParallel | None], Iterator[tuple[str, torch.Tensor | Fp8Weight | Int4Weight, int]]]
    quant_method: str | None = None  # the quantization_config's quant_method of a quantized checkpoint
    quantized: dict = field(default_factory=dict)  # {our linear's module path: loader.quantized.Scheme}
    kv_scales: dict = field(default_factory=dict)  # {FP8 KV-cache scale tensor name: its shard} (loader.kv_scales)


# Hugging Face parameter name (without "model.") -> (module path, part, parts) of our model;
# parts > 1: stacked along dim 0 into one fused linear, in part order.
LAYER_PARTS = {
    "self_attn.q_proj": ("attention.wqkv", 0, 3),
    "self_attn.k_proj": ("attention.wqkv", 1, 3),
    "self_attn.v_proj": ("attention.wqkv", 2, 3),
    "self_attn.o_proj": ("attention.wo", 0, 1),
    "mlp.gate_proj": ("feed_forward.w13", 0, 2),
    "mlp.up_proj": ("feed_forward.w13", 1, 2),
    "mlp.down_proj": ("feed_forward.w2", 0, 1),
    "input_layernorm": ("attention_norm", 0, 1),
    "post_attention_layernorm": ("ffn_norm", 0, 1),
}
_TOP = {"embed_tokens.weight": "tok_embeddings", "norm.weight": "norm", "lm_head.weight": "output"}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)\.weight")
_IGNORED = re.compile(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def target(name: str) -> tuple[str, int, int] | None:
    """(module path, part, parts) for a Hugging Face tensor name; None for tensors to skip.

    Raises KeyError for a name a Llama checkpoint does not have.
    """
    short = name.removeprefix("model.")
    if _IGNORED.fullmatch(short) or is_attention_scale(short):  # KV scales go to the cache (loader.kv_scales)
        return None
    if short in _TOP:
        return _TOP[short], 0, 1
    m = _LAYER_RE.fullmatch(short)
    if m and m.group(2) in LAYER_PARTS:
        path, part, parts = LAYER_PARTS[m.group(2)]
        return f"layers.{m.group(1)}.{path}", part, parts
    raise KeyError(name)


def split_of(name: str, tp: TensorParallel | None) -> tuple[int, int, int] | None:
    """(dim, start, stop) of the rank's slice of the Hugging Face tensor `name` ([N, K] coordinates);
    None without tp, for replicated tensors and for names target() rejects (load_model reports those)."""
    try:
        place = target(name)
    except KeyError:
        return None
    return None if tp is None or place is None else tp.split(place[0], place[1])


class ByteProgress:
    """Bytes done out of a total, on stderr: a tqdm bar redrawn in place on a terminal; elsewhere (a log,
    a pipe) one line when done, instead of a stream of redraws."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.enabled = label, enabled
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1000, file=sys.stderr,
                        disable=not (enabled and self.tty), mininterval=0.2)  # fmt: skip
        self.done, self.start = 0, time.perf_counter()  # bytes so far; start time

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()
        if self.enabled and not self.tty:
            secs = time.perf_counter() - self.start
            mb = self.done / 1e6  # 3 significant digits: a small model is not "0 MB in 0.0 s (0 MB/s)"
            print(f"{self.label}: {mb:.3g} MB in {secs:.3g} s ({mb / max(secs, 1e-9):.3g} MB/s)", file=sys.stderr,
                  flush=True)  # fmt: skip


def load_model(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, quant: str | None = None,
               policy: str = "all", progress: bool = True,
               tp: TensorParallel | None = None) -> Transformer:  # fmt: skip
    """Build the model on the meta device, swap in quantized linears, then stream the checkpoint
    into it tensor by tensor: each tensor goes to `device`, then into its module's final format
    (fused q/k/v and gate/up wait for their parts), so the full-precision model never exists at once.
    With `tp`, the rank's share of the model, loaded from the rank's slices of the tensors.

    Returns the Transformer (not yet setup()).
    """
    model = Transformer(ckpt.config, dtype, device="meta", tp=tp)
    modules = dict(model.named_modules())
    if ckpt.quantized and quant is not None:
        raise CheckpointError(f"{ckpt.path} is already quantized ({ckpt.quant_method}): load it without --quant")
    for path, scheme in ckpt.quantized.items():
        parent, _, name = path.rpartition(".")
        lin = modules[path]
        setattr(modules[parent], name, scheme.module(lin.in_features, lin.out_features, dtype))
    if quant is not None:
        quantize_model(model, quant, policy)
    modules = dict(model.named_modules())
    pending: dict[str, dict[int, torch.Tensor]] = {}
    bar = ByteProgress(f"loading {ckpt.path.name}", ckpt.nbytes, progress)
    for name, tensor, nbytes in ckpt.tensors(tp):
        try:
            place = target(name)
        except KeyError:
            raise CheckpointError(f"{ckpt.path}: unexpected tensor {name!r} for a Llama model") from None
        bar.update(nbytes)
        if place is None or (place[0] == "output" and model.output is None):
            continue
        path, part, parts = place
        if path not in modules:
            raise CheckpointError(
                f"{ckpt.path}: tensor {name!r} has no place in a {ckpt.config.num_layers}-layer model (config.json)"
            )
        tensor = tensor.to(device)
        if parts > 1:
            got = pending.setdefault(path, {})
            got[part] = tensor
            if len(got) < parts:
                continue
            tensor = fuse([got[i] for i in range(parts)], f"{ckpt.path}: {path}")
            del pending[path]
        _load_module(modules[path], tensor, f"{ckpt.path}: tensor {name!r}", dtype)
    bar.close()
    if pending:
        raise CheckpointError(
            f"{ckpt.path}: some of q/k/v or gate/up are missing from the checkpoint for {sorted(pending)}"
        )
    missing = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if missing:
        raise CheckpointError(f"{ckpt.path}: {len(missing)} weights missing from the checkpoint, e.g. {missing[:3]}")
    return model


def fuse(parts: list, what: str) -> torch.Tensor | Fp8Weight | Int4Weight:
    """Stack the weights of fused projections (q/k/v or gate/up) along N.

    FP8 per-tensor scales are requantized to the parts' largest scale (and static input scales
    replaced by their max, as the parts read the same input); INT4 parts must share group size,
    symmetry and act-order permutation.
    """
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, Fp8Weight):
        input_scale = None if first.input_scale is None else torch.stack([p.input_scale for p in parts]).max()
        if all(p.scale.dim() == 0 for p in parts):
            scale = torch.stack([p.scale for p in parts]).max()
            weights = [(p.weight.float() * (p.scale / scale)).to(torch.float8_e4m3fn) for p in parts]
        else:
            scale = torch.cat([p.scale.expand(p.weight.shape[0]) for p in parts])
            weights = [p.weight for p in parts]
        return Fp8Weight(torch.cat(weights), scale, input_scale)
    same = {(p.group_size, p.zeros is None, p.scales.dtype) for p in parts}
    perms = [p.perm for p in parts]
    if len(same) > 1 or any((q is None) != (perms[0] is None) or (q is not None and not torch.equal(q, perms[0]))
                            for q in perms):  # fmt: skip
        raise CheckpointError(f"{what}: its INT4 parts differ in group size, zero points, scale dtype or g_idx "
                              "order; they are fused into one linear here, so they must agree")  # fmt: skip
    zeros = None if first.zeros is None else torch.cat([p.zeros for p in parts])
    return Int4Weight(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]), zeros,
                      first.group_size, first.perm)  # fmt: skip


def _load_module(module: nn.Module, tensor: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    """Put `tensor` into a linear (its load()) or a norm / embedding weight; `what` names it in errors."""
    if hasattr(module, "load"):
        try:
            module.load(tensor)
        except ValueError as err:
            raise CheckpointError(f"{what}: {err} (does config.json match the weights?)") from None
        return
    want = tuple(module.weight.shape)
    if tuple(tensor.shape) != want:
        raise CheckpointError(f"{what} has shape {tuple(tensor.shape)}; the config implies {list(want)}")
    module.weight = nn.Parameter(tensor.to(dtype), requires_grad=False)
