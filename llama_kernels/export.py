"""`llama-kernels quantize IN OUT --quant fp8|int4`: write a quantized checkpoint in a standard layout
that this runner, transformers and vLLM load, from a bf16/fp16/fp32 Hugging Face directory or a GGUF file.

Layouts (config.json's quantization_config and the tensors of each quantized linear):
- fp8, format "fbgemm" (Meta's FP8 Llama 3.1): e4m3 `weight` [N, K], float32 `weight_scale` [N, 1],
  activation_scale_ub (1200 with policy "meta"; float32's largest, i.e. no clamping, with "all"),
  modules_to_not_convert for the linears left in bf16.
- fp8, format "compressed-tensors" (llm-compressor's FP8-dynamic): e4m3 `weight`, per-channel
  `weight_scale` [N, 1] in the checkpoint dtype, dynamic per-token activations; `ignore`.
- int4, format "awq" (AutoAWQ GEMM): `qweight` [K, N/8], `qzeros` [K/G, N/8], fp16 `scales`
  [K/G, N]; asymmetric round-to-nearest with one group size for the whole model (128 where every
  K allows it); the whole checkpoint in fp16, as AWQ engines expect.
The lm_head and embeddings are never quantized. The tokenizer files are copied (written from the
metadata for a GGUF source).

With kv_cache_scales (compressed-tensors only), the FP8 KV-cache scales the engine fixes at start-up
(its calibration pass, or the source's own scales) are written as llm-compressor's kv_cache_scheme:
one float32 [1] `model.layers.N.self_attn.k_scale` / `v_scale` per layer (the max over KV heads:
the per-tensor form every vLLM version loads); loading it then skips the calibration pass.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch

from . import ops
from .loader import CheckpointError, open_checkpoint
from .loader.checkpoint import ByteProgress
from .loader.kv_scales import is_attention_scale
from .loader.quantized import split_linear
from .model.config import LlamaConfig
from .model.linear import FP8_NO_BOUND, META_FP8_SCALE_UB, int4_group_size

FORMATS = {"fp8": ("fbgemm", "compressed-tensors"), "int4": ("awq",)}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")  # fmt: skip
_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def quantize_checkpoint(src: str | Path | None, out: str | Path, quant: str, fmt: str | None = None,
                        policy: str = "all", max_shard_bytes: int = 5 << 30, progress: bool = True,
                        kv_cache_scales: bool = False) -> Path:  # fmt: skip
    """Quantize the checkpoint `src` (directory, .gguf, None: the embedded default model) into the
    new directory `out`, tensor by tensor on the CPU; returns `out`.

    quant "fp8" (fmt "fbgemm", the default, or "compressed-tensors"; policy "all": every decoder
    linear, "meta": FFN only, first and last layers kept) or "int4" (fmt "awq", policy "all").
    kv_cache_scales (fp8 compressed-tensors): also write FP8 KV-cache scales (see the module doc);
    this runs the model once, so it needs the full-precision model in memory.
    """
    fmt = fmt or FORMATS.get(quant, ("",))[0]
    if fmt not in FORMATS.get(quant, ()):
        raise ValueError(f"quantize: quant={quant!r} fmt={fmt!r}; expected fp8 with fbgemm or compressed-tensors, "
                         "or int4 with awq")  # fmt: skip
    if policy not in ("all", "meta") or (quant == "int4" and policy != "all"):
        raise ValueError(f"quantize: policy={policy!r} for {quant}; expected 'all' (or 'meta' for fp8)")
    if kv_cache_scales and fmt != "compressed-tensors":
        raise ValueError(f"quantize: kv_cache_scales with format {fmt!r}; KV-cache scales are written in the "
                         "compressed-tensors format only (--quant fp8 --format compressed-tensors)")  # fmt: skip
    ckpt = open_checkpoint(src)
    if ckpt.quant_method is not None:
        raise CheckpointError(f"{ckpt.path} is already quantized ({ckpt.quant_method}): start from a bf16 checkpoint")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty: choose a new output directory")
    out.mkdir(parents=True, exist_ok=True)
    c = ckpt.config
    layers = c.num_layers
    skip = [f"model.layers.{i}.{m}" for i in range(layers) for m in _LINEARS
            if policy == "meta" and (m.startswith("self_attn") or i in (0, layers - 1))]  # fmt: skip
    group = min(int4_group_size(k) for k in (c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim))
    config = _source_config(ckpt.path, c)
    if fmt == "fbgemm":
        # Meta's bound for policy meta only; vLLM requires the key, so policy all gets one that never clamps
        ub = META_FP8_SCALE_UB if policy == "meta" else FP8_NO_BOUND
        qc = {"quant_method": "fbgemm_fp8", "activation_scale_ub": ub,
              "modules_to_not_convert": skip + ["lm_head"]}  # fmt: skip
    elif fmt == "compressed-tensors":
        fp8 = dict(num_bits=8, type="float", symmetric=True, group_size=None, actorder=None, block_structure=None,
                   observer=None, observer_kwargs={})  # fmt: skip
        group_0 = {"targets": ["Linear"], "output_activations": None,
                   "weights": {**fp8, "strategy": "channel", "dynamic": False},
                   "input_activations": {**fp8, "strategy": "token", "dynamic": True}}  # fmt: skip
        kv_scheme = {**fp8, "strategy": "tensor", "dynamic": False} if kv_cache_scales else None
        qc = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": group_0},
              "ignore": skip + ["lm_head"], "kv_cache_scheme": kv_scheme,
              "quantization_status": "compressed"}  # fmt: skip
    else:
        qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
              "modules_to_not_convert": None}  # fmt: skip
        if group != 128:
            print(f"quantize: K is not a multiple of 128 in every linear; AWQ group size {group}", file=sys.stderr)
    writer = _ShardWriter(out, max_shard_bytes)
    if kv_cache_scales:
        for name, scale in _kv_cache_scales(ckpt.path, c.max_position_embeddings).items():
            writer.add(name, scale)
    dtype = None
    bar = ByteProgress(f"quantize {fmt}", ckpt.nbytes, progress)
    for name, tensor, nbytes in ckpt.tensors():
        if name.endswith("rotary_emb.inv_freq") or (kv_cache_scales and is_attention_scale(name)):
            continue  # the source's KV scales, if any, are already in _kv_cache_scales
        if dtype is None:  # the checkpoint dtype: fp16 for AWQ, else the source's half dtype (bf16 from fp32/GGUF)
            half = tensor.dtype in (torch.float16, torch.bfloat16)
            dtype = torch.float16 if fmt == "awq" else (tensor.dtype if half else torch.bfloat16)
        split = split_linear(name)
        module = split[0] if split else None
        if module is None or module == "lm_head" or module in skip:
            writer.add(name, tensor.to(dtype))
        else:
            for suffix, t in _quantize(tensor, fmt, dtype, group).items():
                writer.add(f"{module}.{suffix}", t)
        bar.update(nbytes)
    bar.close()
    writer.close()
    config.update(quantization_config=qc, torch_dtype=str(dtype).removeprefix("torch."))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_tokenizer(ckpt, out)
    if not (out / "generation_config.json").exists():  # a GGUF source, or a directory without one
        eos = list(c.eos_token_ids)
        gen = {"bos_token_id": c.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if progress:
        print(f"wrote {out} ({writer.count} shard(s))", file=sys.stderr)
    return out


def _kv_cache_scales(src: Path, max_positions: int) -> dict[str, torch.Tensor]:
    """{model.layers.N.self_attn.k_scale / v_scale: float32 [1]}: per layer, the max over KV heads of the
    FP8 scales the engine fixes at start-up for `src` (its calibration pass, or the source's scales)."""
    from .llm import LLM

    context = min(max_positions, 1024)  # room for the whole calibration text (serve.runner.CALIBRATION_TEXT)
    llm = LLM.from_pretrained(src, max_context=context, kv_cache_dtype="fp8", max_batch=1, progress=False)
    cache = llm.cache
    return {f"model.layers.{i}.self_attn.{kind}_scale": scales[i].max().reshape(1).cpu()
            for i in range(len(cache.k)) for kind, scales in (("k", cache.k_scale), ("v", cache.v_scale))}  # fmt: skip


def _quantize(w: torch.Tensor, fmt: str, dtype: torch.dtype, group: int) -> dict[str, torch.Tensor]:
    """One linear's tensors {suffix: tensor} in the layout `fmt`."""
    if fmt == "fbgemm":
        q, scale = ops.quantize_fp8(w.float())
        return {"weight": q, "weight_scale": scale[:, None]}
    if fmt == "compressed-tensors":  # scale rounded to the checkpoint dtype first, so q uses the stored scale
        scale = (w.float().abs().amax(1, keepdim=True) / 448.0).clamp(min=1e-12).to(dtype)
        q = (w.float() / scale.float()).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        return {"weight": q, "weight_scale": scale}
    qweight, qzeros, scales = ops.quantize_int4(w.to(torch.float16), group_size=group).to_awq()
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales}


def _source_config(path: Path, c: LlamaConfig) -> dict:
    """The source's config.json, or for a GGUF file one written from its LlamaConfig."""
    if path.is_dir():
        return json.loads((path / "config.json").read_text())
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim, "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling,
        "rms_norm_eps": c.rms_norm_eps, "tie_word_embeddings": c.tie_word_embeddings,
        "max_position_embeddings": c.max_position_embeddings, "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_ids) if len(c.eos_token_ids) > 1 else next(iter(c.eos_token_ids), None),
    }  # fmt: skip


def _write_tokenizer(ckpt, out: Path) -> None:
    """Copy the tokenizer files of a directory; write tokenizer.json and tokenizer_config.json for a GGUF."""
    if ckpt.path.is_dir():
        for name in TOKENIZER_FILES:
            if (ckpt.path / name).exists():
                shutil.copy(ckpt.path / name, out / name)
        return
    tok = ckpt.tokenizer
    tok.tokenizer.save(str(out / "tokenizer.json"))
    cfg = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "add_bos_token": tok.add_bos,
           "chat_template": tok.chat_template, "tokenizer_class": "PreTrainedTokenizerFast"}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


class _ShardWriter:
    """Collects tensors into safetensors shards of at most max_bytes (one tensor may exceed it), named
    model.safetensors or model-0000i-of-0000n.safetensors with model.safetensors.index.json."""

    def __init__(self, out: Path, max_bytes: int) -> None:
        self.out, self.max_bytes = out, max_bytes
        self.tensors: dict[str, torch.Tensor] = {}  # the shard being filled
        self.size = 0  # its bytes
        self.shards: list[list[str]] = []  # tensor names of each written shard
        self.total = 0  # bytes written

    @property
    def count(self) -> int:
        return len(self.shards)

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.tensors and self.size + nbytes > self.max_bytes:
            self._flush()
        self.tensors[name] = t.contiguous()
        self.size += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.tensors, self.out / f"shard-{len(self.shards)}.tmp", metadata={"format": "pt"})
        self.shards.append(list(self.tensors))
        self.total += self.size
        self.tensors, self.size = {}, 0

    def close(self) -> None:
        if self.tensors or not self.shards:
            self._flush()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        mode = 0o666 & ~_umask()  # safetensors writes 0600; a checkpoint is for others to read too
        for i, name in enumerate(names):
            (self.out / f"shard-{i}.tmp").rename(self.out / name)
            (self.out / name).chmod(mode)
        if n > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {t: name for name, ts in zip(names, self.shards) for t in ts}}  # fmt: skip
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _umask() -> int:
    """The process's umask (reading it means setting it: put it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
