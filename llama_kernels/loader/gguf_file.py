"""GGUF files (llama.cpp) through the `gguf` package: Llama architecture, tensors in F32, F16,
BF16, Q8_0, Q4_0 or Q4_1, dequantized to float32 one at a time; Q and K rows un-permuted back to
Hugging Face order (llama.cpp's converter interleaves the two rotary halves of each head)."""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..distributed import shard_weight
from ..model.config import LlamaConfig
from ..reference import rope_inv_freq
from .checkpoint import Checkpoint, split_of
from .errors import CheckpointError, check_not_lfs_pointer
from .tokenizer import Tokenizer

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's llama3 RoPE: per-frequency divisors [D/2] float32


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None if it has none."""
    if name.endswith(".weight") and name[: -len(".weight")] in _TOP:
        return _TOP[name[: -len(".weight")]] + ".weight"
    m = _BLOCK_RE.fullmatch(name)
    if m and m.group(2) in _NAMES:
        return f"model.layers.{m.group(1)}.{_NAMES[m.group(2)]}.weight"
    return None


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation: w [heads * D, K] with rows (i, half) -> (half, i) per head."""
    n, k = w.shape
    return w.reshape(heads, n // heads // 2, 2, k).transpose(1, 2).reshape(n, k)


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass
class _TensorInfo:
    name: str  # GGUF tensor name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # numpy order (GGUF's ne reversed): [N, K] for a weight
    qtype: int  # GGMLQuantizationType value
    offset: int  # absolute byte offset of the data in the file
    nbytes: int  # bytes of data


class _Cursor:
    """Little-endian reads from a buffer."""

    def __init__(self, buf) -> None:
        self.buf, self.pos = buf, 0

    def read(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.read("<Q")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.read("<I"), self.read("<Q")
            return [self.value(item) for _ in range(count)]
        return self.read(_SCALARS[kind])


def _read_header(file: Path, data) -> tuple[dict, list[_TensorInfo]]:
    """Metadata {key: value} and tensor infos of a GGUF v2/v3 file mapped as `data` (uint8).

    A direct parse: gguf.GGUFReader builds a numpy view per array element (seconds for a 49k vocabulary).
    """
    import gguf

    if bytes(data[:4]) != b"GGUF":
        raise CheckpointError(f"{file} is not a GGUF file (no GGUF magic): download it again")
    cur = _Cursor(memoryview(data))
    version = cur.read("<4xI")
    if version not in (2, 3):
        raise CheckpointError(f"{file}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cur.read("<Q"), cur.read("<Q")
    meta = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.read("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        ne = [cur.read("<Q") for _ in range(cur.read("<I"))]
        qtype, offset = cur.read("<I"), cur.read("<Q")
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        infos.append(_TensorInfo(name, tuple(reversed(ne)), qtype, offset, math.prod(ne) // block * type_size))
    align = meta.get("general.alignment", 32)
    start = -(-cur.pos // align) * align
    for t in infos:
        t.offset += start
        if t.offset + t.nbytes > len(data):
            raise CheckpointError(
                f"{file} is truncated: tensor {t.name} ends at byte {t.offset + t.nbytes} but the file has "
                f"{len(data)}: download it again"
            )
    return meta, infos


def open_gguf(file: Path) -> Checkpoint:
    """Preflight a .gguf file and return its Checkpoint; nothing is allocated (the file is memory-mapped)."""
    import gguf
    import numpy as np

    check_not_lfs_pointer(file)
    data = np.memmap(file, dtype=np.uint8, mode="r")
    try:
        meta, infos = _read_header(file, data)
    except CheckpointError:
        raise
    except (struct.error, ValueError, KeyError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not a readable GGUF file ({err!r}): download it again") from None
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{file}: general.architecture={arch!r}; only 'llama' GGUF files are supported")
    names = {t.name for t in infos}
    freqs = next((t for t in infos if t.name == ROPE_FREQS), None)
    infos = [t for t in infos if t is not freqs]
    for t in infos:
        kind = gguf.GGMLQuantizationType(t.qtype).name
        if kind not in SUPPORTED_TYPES:
            raise CheckpointError(
                f"{file}: tensor {t.name} is {kind}; supported GGUF types: {', '.join(SUPPORTED_TYPES)}"
            )
        if hf_name(t.name) is None:
            raise CheckpointError(f"{file}: unexpected tensor {t.name!r} for a Llama model")
    config = _config(meta, names, file)
    if freqs is not None:
        kind = gguf.GGMLQuantizationType(freqs.qtype).name
        if kind != "F32":
            raise CheckpointError(f"{file}: {ROPE_FREQS} is {kind}; expected F32: convert the model again")
        factors = torch.from_numpy(np.array(data[freqs.offset : freqs.offset + freqs.nbytes]).view(np.float32))
        config = replace(config, rope_scaling=llama3_rope_scaling(factors, config.head_dim, config.rope_theta, file))
    tokenizer = Tokenizer.from_gguf(meta, file)

    def tensors(tp=None) -> Iterator[tuple[str, torch.Tensor, int]]:
        """With tp, each tensor is read and dequantized whole, then sliced (GGUF blocks do not slice)."""
        for t in infos:
            raw = np.asarray(data[t.offset : t.offset + t.nbytes]).reshape(*t.shape[:-1], -1)
            w = torch.from_numpy(np.array(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(t.qtype))))
            name = hf_name(t.name)
            if name.endswith("q_proj.weight"):
                w = unpermute(w, config.num_heads)
            elif name.endswith("k_proj.weight"):
                w = unpermute(w, config.num_kv_heads)
            yield name, shard_weight(w, split_of(name, tp), name), t.nbytes

    return Checkpoint(file, config, tokenizer, sum(t.nbytes for t in infos), tensors)


def llama3_rope_scaling(factors: torch.Tensor, head_dim: int, theta: float, file: Path) -> dict | None:
    """The Hugging Face llama3 `rope_scaling` that reproduces llama.cpp's rope_freqs (inv_freq / factors).

    llama.cpp stores factor f_i = 1 (short wavelengths), `factor` (long ones) or, in between,
    1 / ((1 - s) / factor + s) with s = (old_ctx / wavelen - low) / (high - low). Only old_ctx / low
    and old_ctx / high are identifiable, so low_freq_factor is taken as 1 and the rest fitted from
    the in-between frequencies (Llama 3.1's 8192 and 4 when there are fewer than two); the result is
    checked against the factors. None when every factor is 1.
    """
    f = factors.double()
    if f.shape != (head_dim // 2,) or not torch.isfinite(f).all() or (f < 1 - 1e-6).any():
        raise CheckpointError(f"{file}: {ROPE_FREQS} has shape {list(f.shape)} or values below 1; expected "
                              f"[{head_dim // 2}] llama3 factors >= 1")  # fmt: skip
    factor = float(f.max())
    if factor <= 1 + 1e-6:
        return None
    inv_freq = rope_inv_freq(head_dim, theta).double()
    x = inv_freq / (2 * math.pi)  # 1 / wavelength
    medium = (f > 1 + 1e-4) & (f < factor * (1 - 1e-4))
    old, high = 8192.0, 4.0
    if int(medium.sum()) >= 2:  # s = a x + b with a = old / (high - 1), b = -1 / (high - 1)
        s = (1 / f[medium] - 1 / factor) / (1 - 1 / factor)
        a, b = torch.linalg.lstsq(torch.stack([x[medium], torch.ones_like(s)], 1), s[:, None]).solution[:, 0].tolist()
        high = 1 - 1 / b
        old = a * (high - 1)
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": round(high, 6),
               "original_max_position_embeddings": round(old)}  # fmt: skip
    got = rope_inv_freq(head_dim, theta, scaling).double()
    if not torch.allclose(got, inv_freq / f, rtol=1e-4, atol=0):
        raise CheckpointError(f"{file}: {ROPE_FREQS} does not follow llama3 RoPE scaling (closest: {scaling}); "
                              "use the model's Hugging Face directory")  # fmt: skip
    return scaling


def _config(meta: dict, names: set[str], file: Path) -> LlamaConfig:
    def get(key: str, default=None):
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise CheckpointError(f"{file}: metadata llama.{key} is missing: the file is incomplete")
        return value

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    scaling = None
    kind = meta.get("llama.rope.scaling.type", "none")
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif kind != "none":
        raise CheckpointError(f"{file}: llama.rope.scaling.type={kind!r}; supported: 'none', 'linear'")
    eos = [meta[f"tokenizer.ggml.{k}"] for k in ("eos_token_id", "eot_token_id", "eom_token_id")
           if f"tokenizer.ggml.{k}" in meta]  # fmt: skip
    try:
        return LlamaConfig(
            vocab_size=meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"]),
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length"),
            num_layers=get("block_count"),
            num_heads=heads,
            num_kv_heads=meta.get("llama.attention.head_count_kv") or heads,
            head_dim=meta.get("llama.attention.key_length") or hidden // heads,
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            tie_word_embeddings="output.weight" not in names,
            max_position_embeddings=get("context_length"),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(eos)),
        )
    except ValueError as err:
        raise CheckpointError(f"{file}: {err}") from None
