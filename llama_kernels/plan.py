"""Memory planner: does a Llama model fit on N GPUs, and how much context x batch is left.

Pure arithmetic on the model's config (no torch, no GPU).  Every figure is bytes per GPU, for
tensor parallel over N GPUs:

* weights: exact from the config and the weight format (:data:`QUANTS`).  Column-parallel
  q/k/v/gate/up hold 1/N of their output rows, row-parallel o/down 1/N of their input columns
  (and, being split along K, every output row: row-wise FP8 scales and biases are replicated);
  the vocab-parallel embedding and lm_head hold ceil(vocab/N) rows; KV heads are replicated
  when N > num_key_value_heads (each GPU holds one); norms are replicated.
* KV cache: ``batch x ceil(context / block_size) x block_size`` tokens (paged, whole blocks)
  times :func:`kv_cache_bytes_per_token`; an FP8 cache adds one float32 scale per layer, K/V
  and local KV head (``rope_and_cache``'s k_scale/v_scale [Hkv]).
* activations + workspace of the largest prefill chunk, T = min(prefill_chunk, batch x context)
  tokens (see :func:`_activation_bytes`), plus the RoPE cos/sin tables for the context and the
  prefill attention plan's partial outputs (:func:`llama_kernels.attention_workspace.workspace_bytes`
  at :data:`GPU_SMS`, the kernel's own formula: ~34 MB for 8 KV heads of 128 dims).
* CUDA-graph pool: the same activation formula for one decode step of ``batch`` tokens (the
  graphs captured for every batch size share one pool, as large as the largest), plus the
  split-KV partial outputs of ``decode_attention``; with speculative decoding of ``spec_tokens``
  draft tokens, the larger of that and a verify step's (``batch x (spec_tokens + 1) + 1`` tokens,
  every token's logits: the verify graphs share the pool).
* communication (NCCL), the framework's reserve (CUDA context + allocator fragmentation) and
  the headroom left: constants below, each with its source.
* with a speculative draft model (``draft``): its weights (same formats, sharded over the same GPUs)
  and its own paged KV cache of as many tokens as the model's (the runner allocates both caches for
  ``batch x context`` tokens), its RoPE tables, and the fragmentation reserve of its weights; its
  passes run between the model's, so the activation term is the larger of the two models' (the
  draft's prefill is chunked like the model's). It runs eagerly: no CUDA-graph pool of its own.

The runner sizes its KV cache with :func:`plan` (``max_context_at_batch``) and calls
:func:`check_fits` before loading anything.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

from .attention_workspace import HOPPER_TILE_ROWS, tile_rows, workspace_bytes

__all__ = [
    "PRESETS",
    "QUANTS",
    "Plan",
    "check_fits",
    "kv_cache_bytes_per_token",
    "load_config",
    "parameter_counts",
    "parse_bytes",
    "plan",
]

GiB = 1 << 30
MiB = 1 << 20

#: Hugging Face ``config.json`` values of the meta-llama checkpoints (only the keys the planner
#: reads).  Llama 3.2 sets ``head_dim`` explicitly (1B: 2048 / 32 = 64; 3B: 3072 / 24 = 128).
PRESETS: dict[str, dict] = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
                       max_position_embeddings=4096),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False,
                        max_position_embeddings=4096),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
                        max_position_embeddings=4096),
    # Llama 3 (April 2024): 3.1's shapes at 8K positions, without RoPE scaling
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                       max_position_embeddings=8192),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                        max_position_embeddings=8192),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                         max_position_embeddings=131072),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                          max_position_embeddings=131072),
    "llama-3.1-405b": dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                           num_attention_heads=128, num_key_value_heads=8, vocab_size=128256,
                           tie_word_embeddings=False, max_position_embeddings=131072),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072),
    # Llama 3.3 70B: 3.1 70B's shapes and context
    "llama-3.3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                          max_position_embeddings=131072),
}  # fmt: skip

#: Keys a ``config.json`` must have; the others default as in transformers' ``LlamaConfig``
#: (num_key_value_heads = num_attention_heads, head_dim = hidden_size / num_attention_heads,
#: tie_word_embeddings, attention_bias and mlp_bias False).
REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                 "max_position_embeddings")  # fmt: skip

#: Weight formats.  Embedding, lm_head and norms are bf16 in all of them.
QUANTS = {
    "bf16": "no quantization",
    "fp8": "every decoder linear (q/k/v/o/gate/up/down) FP8 e4m3 with one float32 scale per output row",
    "fp8-meta": "Meta's Llama 3.1 FP8 recipe: FFN linears (gate/up/down) FP8 e4m3 with one float32 scale per "
                "output row, except in the first and last layers; attention bf16",
    "int4": "every decoder linear INT4 with, per group of group_size inputs of a row, a 16-bit (fp16/bf16) "
            "scale and a uint8 zero point (Int4Weight's layout)",
}  # fmt: skip
#: Activation dtypes (the runner's --dtype): bytes per element of the unquantized weights (and
#: of embedding, lm_head, norms, biases) and of the activations.
DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}
#: Bytes per KV-cache element.
KV_DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}

FP32 = 4  # bytes: FP8 weight/activation/KV scales, logits
INT4_SCALE = 2  # bytes: Int4Weight.scales in fp16/bf16
INT4_ZERO = 1  # bytes: Int4Weight.zeros in uint8

#: Tokens per paged KV-cache block (vLLM's default block size); a sequence holds whole blocks.
KV_BLOCK_SIZE = 16
#: Largest prefill chunk, in tokens: longer prompts are prefilled in chunks of this many tokens
#: (chunked prefill, as vLLM's max_num_batched_tokens=8192), so activations do not grow with
#: the context.  Prefill attention is assumed flash-style: no [T, context] score matrix.
PREFILL_CHUNK = 8192
#: cuBLAS/cuBLASLt workspace per stream: the 32 MiB cuBLAS documents as the size to give it on
#: Hopper (cublasSetWorkspace); the FP8 GEMMs (cublasLt / CUTLASS) use at most this much.
GEMM_WORKSPACE = 32 * MiB
#: SMs of an H100 SXM / H200; decode_attention splits each (sequence, KV head) into at most
#: ceil(2 x SMs / (batch x KV heads)) splits (llama_kernels/triton/attention.py:num_splits), and
#: the prefill attention plan's workspace grows with it (attention_workspace.workspace_bytes).
GPU_SMS = 132
#: Planning allowance for the CUDA context and the kernel images loaded into it (torch, cuBLAS,
#: cuBLASLt, Triton, llama_kernels._C).  A bare torch CUDA context on H100 with CUDA 12 lazy
#: loading takes about 0.5 GiB (nvidia-smi); we allow twice that for the modules loaded on
#: first use.  Not measured by this planner: replace with a measurement when one exists.
CUDA_CONTEXT = 1 * GiB
#: Planning allowance for PyTorch caching-allocator fragmentation, as a fraction of what goes
#: through the allocator in many tensors (weights, activations, CUDA-graph pool; the KV cache
#: is a few large up-front tensors and is not counted).  The allocator rounds requests over
#: 1 MiB into 2 MiB-granular or 20 MiB segments (CUDACachingAllocator kRoundLarge /
#: kLargeBuffer); 5 % is an allowance, not a measurement.
FRAGMENTATION = 0.05
#: Planning allowance for NCCL's device buffers on each GPU when N > 1: NCCL_BUFFSIZE (4 MiB
#: by default) per channel and protocol for ring and tree, up to 32 channels on NVLink, plus
#: NVLink SHARP (NVLS) buffers on H100 come to a few hundred MiB; 1 GiB rounds that up.
NCCL_BUFFERS = 1 * GiB


# --- config ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Model:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    max_positions: int
    attention_bias: bool
    mlp_bias: bool


def load_config(source: str) -> dict:
    """A preset's config (a key of :data:`PRESETS`, case-insensitive) or a ``config.json`` (the
    file, or a directory holding it) as a dict.  Raises ValueError naming the presets."""
    if source.lower() in PRESETS:
        return dict(PRESETS[source.lower()])
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
    if path.suffix == ".json" or len(path.parts) > 1:
        raise ValueError(f"{path}: no such file (expected a config.json, or a directory holding one)")
    raise ValueError(f"unknown preset {source!r}; presets: {', '.join(PRESETS)} (or a path to a config.json)")


def _model(config: Mapping | str) -> _Model:
    name = config if isinstance(config, str) else str(config.get("_name_or_path", "config"))
    if isinstance(config, str):
        config = load_config(config)

    def get(key: str, default=None):  # as LlamaConfig: a missing or null key takes the default
        return default if config.get(key) is None else config[key]

    missing = [k for k in REQUIRED_KEYS if get(k) is None]
    if missing:
        raise ValueError(f"{name}: config is missing {', '.join(missing)} "
                         f"(a Llama config needs {', '.join(REQUIRED_KEYS)})")  # fmt: skip
    sizes = {k: get(k) for k in REQUIRED_KEYS}
    sizes["num_key_value_heads"] = get("num_key_value_heads", sizes["num_attention_heads"])
    sizes["head_dim"] = get("head_dim")
    for key, value in sizes.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name}: config has {key}={value!r}; expected a positive integer")
    heads, kv_heads = sizes["num_attention_heads"], sizes["num_key_value_heads"]
    if heads % kv_heads:
        raise ValueError(f"{name}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    return _Model(
        name=name,
        hidden=sizes["hidden_size"],
        intermediate=sizes["intermediate_size"],
        layers=sizes["num_hidden_layers"],
        heads=heads,
        kv_heads=kv_heads,
        head_dim=sizes["head_dim"] or sizes["hidden_size"] // heads,
        vocab=sizes["vocab_size"],
        tied=bool(get("tie_word_embeddings", False)),
        max_positions=sizes["max_position_embeddings"],
        attention_bias=bool(get("attention_bias", False)),
        mlp_bias=bool(get("mlp_bias", False)),
    )


def _check_gpus(m: _Model, gpus: int) -> None:
    """Raise ValueError unless tensor parallel over ``gpus`` can shard ``m`` evenly."""

    def ok(n: int) -> bool:
        kv_ok = m.kv_heads % n == 0 or n % m.kv_heads == 0  # split the KV heads, or replicate them
        return m.heads % n == 0 and kv_ok and m.intermediate % n == 0

    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1 or not ok(gpus):
        valid = ", ".join(str(n) for n in range(1, m.heads + 1) if ok(n))
        raise ValueError(
            f"gpus={gpus!r}: tensor parallel over {gpus} GPUs cannot split {m.name} (num_attention_heads={m.heads}, "
            f"num_key_value_heads={m.kv_heads}, intermediate_size={m.intermediate}); valid choices: {valid}"
        )


def _kv_heads_per_gpu(m: _Model, gpus: int) -> int:
    return max(1, m.kv_heads // gpus)


def _linears(m: _Model, gpus: int) -> list[tuple[str, str, int, int, int]]:
    """One decoder layer's linears as one of ``gpus`` GPUs holds them:
    (name, part, rows = output features, columns = input features, bias elements)."""
    q, kv = m.heads // gpus * m.head_dim, _kv_heads_per_gpu(m, gpus) * m.head_dim
    i, h = m.intermediate // gpus, m.hidden
    ab, mb = m.attention_bias, m.mlp_bias
    return [
        ("q_proj", "attention", q, h, q * ab),  # column-parallel
        ("k_proj", "attention", kv, h, kv * ab),
        ("v_proj", "attention", kv, h, kv * ab),
        ("o_proj", "attention", h, q, h * ab),  # row-parallel
        ("gate_proj", "mlp", i, h, i * mb),
        ("up_proj", "mlp", i, h, i * mb),
        ("down_proj", "mlp", h, i, h * mb),
    ]


def parameter_counts(config: Mapping | str) -> dict[str, int]:
    """Exact parameter counts (elements) of a Llama model: embedding, attention, mlp, norms,
    lm_head (0 when tied to the embedding) and total."""
    m = _model(config)
    layer = {"attention": 0, "mlp": 0}
    for _, part, rows, cols, bias in _linears(m, 1):
        layer[part] += rows * cols + bias
    counts = {
        "embedding": m.vocab * m.hidden,
        "attention": m.layers * layer["attention"],
        "mlp": m.layers * layer["mlp"],
        "norms": (2 * m.layers + 1) * m.hidden,  # input + post-attention norm per layer, final norm
        "lm_head": 0 if m.tied else m.vocab * m.hidden,
    }
    counts["total"] = sum(counts.values())
    return counts


# --- bytes per GPU -----------------------------------------------------------------------


def _linear_bytes(fmt: str, name: str, rows: int, cols: int, group_size: int, gpus: int,
                  act: int) -> tuple[int, int]:  # fmt: skip
    """(weight bytes, scale bytes) of a [rows, cols] linear in format bf16 (unquantized: `act` bytes
    per element, the activation dtype's), fp8 or int4."""
    if fmt == "bf16":
        return act * rows * cols, 0
    if fmt == "fp8":
        return rows * cols, FP32 * rows
    if cols % group_size:
        raise ValueError(f"int4: group_size={group_size} does not divide the {cols} input columns of {name} on each "
                         f"of {gpus} GPUs; pick a group size that divides {cols}")  # fmt: skip
    return rows * cols // 2, rows * (cols // group_size) * (INT4_SCALE + INT4_ZERO)


def _weight_bytes(m: _Model, gpus: int, quant: str, group_size: int, act: int) -> dict[str, int]:
    vocab_rows = math.ceil(m.vocab / gpus)  # vocab-parallel; the last shard padded
    out = {
        "embedding": act * vocab_rows * m.hidden,
        "attention": 0,
        "mlp": 0,
        "lm_head": 0 if m.tied else act * vocab_rows * m.hidden,
        "norms": act * (2 * m.layers + 1) * m.hidden,
        "scales": 0,
    }
    for layer in range(m.layers):
        for name, part, rows, cols, bias in _linears(m, gpus):
            fmt = quant
            if quant == "fp8-meta":
                fmt = "fp8" if part == "mlp" and 0 < layer < m.layers - 1 else "bf16"
            weight, scales = _linear_bytes(fmt, name, rows, cols, group_size, gpus, act)
            out[part] += weight + act * bias
            out["scales"] += scales
    return out


def kv_cache_bytes_per_token(config: Mapping | str, kv_dtype: str = "bf16", gpus: int = 1) -> int:
    """KV-cache bytes per token on each of ``gpus`` GPUs: 2 (K, V) x layers x KV heads per GPU x
    head_dim x bytes per element (bf16 2, fp8 1).  FP8 scales are per head, not per token."""
    m = _model(config)
    _check_gpus(m, gpus)
    _check_choice("kv_dtype", kv_dtype, KV_DTYPES)
    return _kv_per_token(m, gpus, kv_dtype)


def _kv_per_token(m: _Model, gpus: int, kv_dtype: str) -> int:
    return 2 * m.layers * _kv_heads_per_gpu(m, gpus) * m.head_dim * KV_DTYPES[kv_dtype]


def _activation_bytes(m: _Model, gpus: int, quant: str, tokens: int, seqs: int, act: int) -> int:
    """Peak activations of a forward pass over ``tokens`` tokens of ``seqs`` sequences, in bytes,
    summed over the attention and MLP blocks (an upper bound: they are not live at once):

    tokens x [act x (3 hidden                 residual, normed input, block output (all-reduced in place)
                   + (Hq + 2 Hkv) head_dim  q, k, v
                   + Hq head_dim            attention output
                   + 3 I)                   gate, up, silu(gate) * up
              + hidden + Hq head_dim + I + 3 x 4]   fp8 only: FP8 copies of the GEMM inputs + row scales
    + seqs x (ceil(vocab / N) + vocab) x 4  float32 logits of each sequence's last token, local + gathered
    + GEMM_WORKSPACE,
    with Hq, Hkv and I the query heads, KV heads and intermediate size on one GPU and act the
    activation dtype's bytes."""
    q = m.heads // gpus * m.head_dim
    kv = _kv_heads_per_gpu(m, gpus) * m.head_dim
    i = m.intermediate // gpus
    per_token = act * (3 * m.hidden + q + 2 * kv + q + 3 * i)
    if quant.startswith("fp8"):
        per_token += m.hidden + q + i + 3 * FP32
    logits = seqs * (math.ceil(m.vocab / gpus) + m.vocab) * FP32
    return tokens * per_token + logits + GEMM_WORKSPACE


def _kv_bytes(m: _Model, gpus: int, kv_dtype: str, context: int, batch: int, block_size: int) -> int:
    """The paged KV cache of ``batch`` sequences of ``context`` tokens (whole blocks), FP8 scales included."""
    kv = batch * math.ceil(context / block_size) * block_size * _kv_per_token(m, gpus, kv_dtype)
    if kv_dtype == "fp8":
        kv += 2 * m.layers * _kv_heads_per_gpu(m, gpus) * FP32
    return kv


def _attention_workspace(m: _Model, gpus: int) -> int:
    """The prefill attention plan's split-KV partials, for the sm_90 tiles (the largest) on GPU_SMS SMs."""
    kv_heads = _kv_heads_per_gpu(m, gpus)
    return workspace_bytes(GPU_SMS, kv_heads, tile_rows(HOPPER_TILE_ROWS, m.heads // gpus // kv_heads), m.head_dim)


def _runtime_bytes(m: _Model, gpus: int, quant: str, kv_dtype: str, weights: int, context: int, batch: int,
                   prefill_chunk: int, block_size: int, act: int, draft: _Model | None = None,
                   spec_tokens: int = 0) -> dict[str, int]:  # fmt: skip
    """Everything but the weights, for ``batch`` sequences of ``context`` tokens (``weights``: the model's
    and the draft's, for the fragmentation reserve); with a draft model, its KV cache as "draft_kv_cache"."""
    kv_heads = _kv_heads_per_gpu(m, gpus)
    kv = _kv_bytes(m, gpus, kv_dtype, context, batch, block_size)
    chunk = min(prefill_chunk, batch * context)
    activations = _activation_bytes(m, gpus, quant, chunk, batch, act)
    rope = context * m.head_dim * FP32  # cos and sin, [context, head_dim / 2] float32 each
    attention = _attention_workspace(m, gpus)
    if draft is not None:  # its passes run between the model's: the larger activations, both RoPE tables
        activations = max(activations, _activation_bytes(draft, gpus, quant, chunk, batch, act))
        rope += context * draft.head_dim * FP32
        attention = max(attention, _attention_workspace(draft, gpus))
    activations += rope + attention
    # decode_attention's partial outputs and log-sum-exps: [batch, q heads, splits, head_dim + 1] f32
    batch_splits = batch * math.ceil(2 * GPU_SMS / (batch * kv_heads))
    partials = batch_splits * m.heads // gpus * (m.head_dim + 1) * FP32
    graph_pool = _activation_bytes(m, gpus, quant, batch, batch, act) + partials
    if spec_tokens:  # the verify graphs' static step (engine/runner.py: verify_layout)
        verify = batch * (spec_tokens + 1) + 1
        graph_pool = max(graph_pool, _activation_bytes(m, gpus, quant, verify, verify, act))
    return {
        "kv_cache": kv,
        **({"draft_kv_cache": _kv_bytes(draft, gpus, kv_dtype, context, batch, block_size)} if draft else {}),
        "activations": activations,
        "cuda_graph_pool": graph_pool,
        "communication": NCCL_BUFFERS if gpus > 1 else 0,
        "reserve": CUDA_CONTEXT + math.ceil(FRAGMENTATION * (weights + activations + graph_pool)),
    }


# --- the plan ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Memory per GPU, in bytes, for ``batch`` sequences of ``max_context`` tokens.

    ``weight_bytes`` splits the weights into embedding, attention, mlp, lm_head, norms and
    (quantization) scales; the other ``*_bytes`` fields are described in the module docstring.
    ``max_context_at_batch``: the largest context (tokens, whole KV blocks, capped by the
    model's max_position_embeddings) that fits at ``batch``; ``max_batch_at_context``: the
    largest batch that fits at ``max_context``; both 0 when nothing fits.
    """

    model: str
    parameters: int
    quant: str
    group_size: int
    kv_dtype: str
    dtype: str  # activation dtype: also the unquantized weights' and the embedding's
    gpus: int
    gpu_mem_bytes: int
    max_context: int
    batch: int
    prefill_chunk: int
    block_size: int
    max_positions: int
    weight_bytes: dict[str, int]
    kv_cache_bytes: int
    activation_bytes: int
    cuda_graph_pool_bytes: int
    communication_bytes: int
    reserve_bytes: int
    max_context_at_batch: int
    max_batch_at_context: int
    draft: str | None = None  # the speculative draft model's name, or None
    draft_parameters: int = 0
    draft_weight_bytes: int = 0  # its weights on each GPU (same formats as the model's)
    draft_kv_cache_bytes: int = 0  # its own KV cache: batch x max_context tokens, as the model's

    @property
    def total_bytes(self) -> int:
        return (sum(self.weight_bytes.values()) + self.kv_cache_bytes + self.activation_bytes
                + self.cuda_graph_pool_bytes + self.communication_bytes + self.reserve_bytes
                + self.draft_weight_bytes + self.draft_kv_cache_bytes)  # fmt: skip

    @property
    def headroom_bytes(self) -> int:
        """gpu_mem_bytes - total_bytes; negative when it does not fit."""
        return self.gpu_mem_bytes - self.total_bytes

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0

    def to_dict(self) -> dict:
        """The fields, total_bytes, headroom_bytes and fits, for JSON."""
        return {**asdict(self), "total_bytes": self.total_bytes, "headroom_bytes": self.headroom_bytes,
                "fits": self.fits}  # fmt: skip

    def verdict(self) -> str:
        total, mem = self.total_bytes / GiB, self.gpu_mem_bytes / GiB
        if self.fits:
            return f"fits: {total:.2f} of {mem:.2f} GiB per GPU"
        return f"does not fit: needs {total:.2f} GiB per GPU, {total - mem:.2f} GiB more than its {mem:.2f} GiB"

    def format(self) -> str:
        """A text table in GiB (2^30 bytes), the verdict and the largest context x batch."""
        group = f", group size {self.group_size}" if self.quant == "int4" else ""
        w = self.weight_bytes
        rows = [("weights", sum(w.values()))] + [(f"  {k}", v) for k, v in w.items()] + [
            (f"KV cache ({self.batch} x {self.max_context} tokens)", self.kv_cache_bytes),
            *([(f"draft weights ({self.draft})", self.draft_weight_bytes),
               (f"draft KV cache ({self.batch} x {self.max_context} tokens)", self.draft_kv_cache_bytes)]
              if self.draft is not None else []),
            (f"activations + workspace ({min(self.prefill_chunk, self.batch * self.max_context)}-token prefill)",
             self.activation_bytes),
            ("CUDA-graph pool", self.cuda_graph_pool_bytes),
            ("communication (NCCL)", self.communication_bytes),
            (f"reserve (CUDA context + {FRAGMENTATION:.0%} fragmentation)", self.reserve_bytes),
            ("total", self.total_bytes),
            ("headroom", self.headroom_bytes),
        ]  # fmt: skip
        width = max(len(label) for label, _ in rows)
        cap = " (the model's maximum)" if self.max_context_at_batch == self.max_positions else ""
        lines = [
            f"{self.model}: {self.parameters / 1e9:.2f}B parameters",
            f"weights {self.quant}: {QUANTS[self.quant]}{group}; embedding, lm_head, norms {self.dtype}"
            + ("; lm_head tied to the embedding" if w["lm_head"] == 0 else ""),
            f"KV cache {self.kv_dtype}; {self.gpus} x {self.gpu_mem_bytes / GiB:.2f} GiB GPU"
            + (f"s, tensor parallel over {self.gpus}" if self.gpus > 1 else ""),
            *([f"speculative draft {self.draft}: {self.draft_parameters / 1e9:.2f}B parameters, the same formats, "
               "its own KV cache"] if self.draft is not None else []),
            "",
            f"{'per GPU':<{width}}  {'GiB':>7}",
            *(f"{label:<{width}}  {value / GiB:7.2f}" for label, value in rows),
            "",
            self.verdict(),
        ]
        if self.max_context_at_batch == 0 and self.max_batch_at_context == 0:
            lines.append(f"nothing fits: not even one sequence of {self.block_size} tokens (one KV block) beside the "
                         "weights; quantize the weights (--quant), use more GPUs (--gpus) or larger ones (--gpu-mem)")
        else:
            lines.append(f"largest context at batch {self.batch}: {self.max_context_at_batch} tokens{cap}")
            lines.append(f"largest batch at context {self.max_context}: {self.max_batch_at_context}")
        return "\n".join(lines)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; expected one of {', '.join(choices)}")


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}; expected a positive integer")


def _largest(ok: Callable[[int], bool], limit: int) -> int:
    """Largest n in [0, limit] with ok(n), for ok true up to some n and false after (0: none)."""
    lo, hi = 0, 1
    while hi <= limit and ok(hi):
        lo, hi = hi, 2 * hi
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def plan(
    config: Mapping | str,
    *,
    quant: str = "bf16",
    kv_dtype: str = "bf16",
    dtype: str = "bf16",
    gpus: int = 1,
    gpu_mem_bytes: int = 80 * GiB,
    max_context: int | None = None,
    batch: int = 1,
    group_size: int = 128,
    prefill_chunk: int = PREFILL_CHUNK,
    block_size: int = KV_BLOCK_SIZE,
    draft: Mapping | str | None = None,
    spec_tokens: int = 0,
) -> Plan:
    """Plan the memory of ``config`` (a dict of Hugging Face config keys, a preset name or a
    config.json path) on ``gpus`` GPUs of ``gpu_mem_bytes`` bytes each, for ``batch`` sequences of
    ``max_context`` tokens.  The default context is the runner's: as much as fits (whole KV
    blocks), capped by max_position_embeddings; one block when nothing fits.  ``quant`` is one of
    :data:`QUANTS`, ``group_size`` the INT4 group (input channels), ``kv_dtype`` one of
    :data:`KV_DTYPES`, ``dtype`` the activation dtype (:data:`DTYPES`; unquantized weights too).
    ``draft``: a speculative draft model (as ``config``) loaded beside it, in the same formats over the
    same GPUs with its own KV cache of ``batch x max_context`` tokens; the context is then capped by
    both models' max_position_embeddings. ``spec_tokens``: draft tokens per sequence of speculative
    decoding (0: none), for the verify step's CUDA graphs.
    Raises ValueError on a bad argument, naming it and the valid choices."""
    m = _model(config)
    _check_gpus(m, gpus)
    d = None if draft is None else _model(draft)
    if d is not None:
        _check_gpus(d, gpus)
        if d.vocab != m.vocab:
            raise ValueError(f"draft {d.name}: vocab_size={d.vocab}, {m.name}'s is {m.vocab}; a draft model needs "
                             "the same tokenizer")  # fmt: skip
    positions = m.max_positions if d is None else min(m.max_positions, d.max_positions)
    _check_choice("quant", quant, QUANTS)
    _check_choice("kv_dtype", kv_dtype, KV_DTYPES)
    _check_choice("dtype", dtype, DTYPES)
    act = DTYPES[dtype]
    for name, value in [("gpu_mem_bytes", gpu_mem_bytes), ("batch", batch), ("group_size", group_size),
                        ("prefill_chunk", prefill_chunk), ("block_size", block_size)]:  # fmt: skip
        _check_positive(name, value)
    if isinstance(spec_tokens, bool) or not isinstance(spec_tokens, int) or spec_tokens < 0:
        raise ValueError(f"spec_tokens={spec_tokens!r}; expected an int >= 0")
    if max_context is not None:
        _check_positive("max_context", max_context)
        for model in (m, d) if d is not None else (m,):
            if max_context > model.max_positions:
                raise ValueError(f"max_context={max_context} exceeds {'draft ' if model is d else ''}{model.name}'s "
                                 f"max_position_embeddings={model.max_positions}")  # fmt: skip

    weight_bytes = _weight_bytes(m, gpus, quant, group_size, act)
    weights = sum(weight_bytes.values())
    draft_weights = sum(_weight_bytes(d, gpus, quant, group_size, act).values()) if d is not None else 0

    def runtime(ctx: int, b: int) -> dict[str, int]:
        return _runtime_bytes(m, gpus, quant, kv_dtype, weights + draft_weights, ctx, b, prefill_chunk, block_size,
                              act, d, spec_tokens)  # fmt: skip

    def fits(ctx: int, b: int) -> bool:
        return weights + draft_weights + sum(runtime(ctx, b).values()) <= gpu_mem_bytes

    def blocks_context(n: int) -> int:
        return min(n * block_size, positions)

    most_blocks = math.ceil(positions / block_size)
    best = blocks_context(_largest(lambda n: fits(blocks_context(n), batch), most_blocks))
    context = max_context or best or blocks_context(1)
    # Every sequence holds at least one block, so the batch is bounded by the memory over a block's bytes.
    max_batch = gpu_mem_bytes // (block_size * _kv_per_token(m, gpus, kv_dtype))
    r = runtime(context, batch)
    return Plan(
        model=m.name, parameters=parameter_counts(config)["total"], quant=quant, group_size=group_size,
        kv_dtype=kv_dtype, dtype=dtype, gpus=gpus, gpu_mem_bytes=gpu_mem_bytes, max_context=context, batch=batch,
        prefill_chunk=prefill_chunk, block_size=block_size, max_positions=positions,
        weight_bytes=weight_bytes, kv_cache_bytes=r["kv_cache"], activation_bytes=r["activations"],
        cuda_graph_pool_bytes=r["cuda_graph_pool"], communication_bytes=r["communication"],
        reserve_bytes=r["reserve"], max_context_at_batch=best,
        max_batch_at_context=_largest(lambda b: fits(context, b), max_batch),
        draft=None if d is None else d.name, draft_parameters=0 if draft is None else parameter_counts(draft)["total"],
        draft_weight_bytes=draft_weights, draft_kv_cache_bytes=r.get("draft_kv_cache", 0),
    )  # fmt: skip


def check_fits(p: Plan) -> None:
    """Raise ValueError, with the plan's table in the message, unless ``p`` fits; one line when only its
    draft model's weights and KV cache keep it from fitting."""
    draft = p.draft_weight_bytes + p.draft_kv_cache_bytes
    if p.draft is not None and not p.fits and p.headroom_bytes + draft >= 0:
        raise ValueError(f"the draft model {p.draft} does not fit beside {p.model} on {p.gpus} x "
                         f"{p.gpu_mem_bytes / GiB:.2f} GiB GPUs at {p.batch} x {p.max_context} tokens: it needs "
                         f"{draft / GiB:.2f} GiB per GPU (weights {p.draft_weight_bytes / GiB:.2f}, KV cache "
                         f"{p.draft_kv_cache_bytes / GiB:.2f}), {(p.headroom_bytes + draft) / GiB:.2f} GiB are left; "
                         "use a smaller draft, a shorter context or batch, or n-gram speculation")  # fmt: skip
    if not p.fits:
        raise ValueError(f"{p.model} does not fit on {p.gpus} x {p.gpu_mem_bytes / GiB:.2f} GiB GPUs at "
                         f"{p.batch} x {p.max_context} tokens:\n{p.format()}")  # fmt: skip


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_bytes(text: str) -> int:
    """Bytes in a size such as ``80GiB`` (2^30 bytes per GiB), ``141GB`` (10^9 bytes per GB) or
    ``79.6 GiB``; the unit is required (case-insensitive: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]+)\s*", text)
    if not match or match[2].lower() not in _UNITS or float(match[1]) <= 0:
        raise ValueError(f"cannot read {text!r} as a memory size; expected a positive number and a unit, e.g. "
                         f"80GiB (2^30 bytes each) or 80GB (10^9 bytes each); units: B, KB, MB, GB, TB, KiB, MiB, "
                         f"GiB, TiB")  # fmt: skip
    return int(float(match[1]) * _UNITS[match[2].lower()])


# --- `llama-kernels plan` ----------------------------------------------------------------

CLI_EPILOG = (
    "Exit status: 0 when the model fits, 1 when it does not (the table is printed either way) or on a bad "
    "value (one error line), 2 on a usage error. Sizes per GPU in GiB (2^30 bytes)."
)


def add_arguments(parser) -> None:
    """The options of ``llama-kernels plan`` on an argparse parser."""
    parser.add_argument("model", help=f"a preset ({', '.join(PRESETS)}) or a config.json (or its directory)")
    parser.add_argument("--quant", choices=list(QUANTS), default="bf16", help="weight format (default bf16)")
    parser.add_argument("--group-size", type=int, default=128, help="INT4 group size in input channels (default 128)")
    parser.add_argument("--kv-dtype", choices=list(KV_DTYPES), default="bf16", help="KV-cache dtype (default bf16)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16",
                        help="activation dtype, also of unquantized weights (default bf16)")  # fmt: skip
    parser.add_argument("--gpus", type=int, default=1, help="GPUs for tensor parallel (default 1)")
    parser.add_argument("--gpu-mem", default="80GiB", help="memory of each GPU, e.g. 80GiB or 141GB (default 80GiB)")
    parser.add_argument("--max-context", type=int,
                        help="tokens per sequence (default: as much as fits, up to the model's maximum)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    parser.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK,
                        help=f"largest prefill chunk in tokens (default {PREFILL_CHUNK})")  # fmt: skip
    parser.add_argument("--draft", help="a speculative draft model loaded beside it (a preset or a config.json): "
                        "its weights and its own KV cache are counted (default: none)")  # fmt: skip
    parser.add_argument("--num-speculative-tokens", type=int, default=0,
                        help="draft tokens per sequence of speculative decoding, for the verify step's CUDA graphs "
                             "(default 0: none)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON (bytes) instead of a table")


def run(args, parser=None) -> int:
    """Run ``llama-kernels plan``; a bad value raises ValueError (the command line: one line, exit status 1)."""
    try:
        gpu_mem = parse_bytes(args.gpu_mem)
    except ValueError as e:
        raise ValueError(f"--gpu-mem: {e}") from None
    p = plan(args.model, quant=args.quant, kv_dtype=args.kv_dtype, dtype=args.dtype, gpus=args.gpus,
             gpu_mem_bytes=gpu_mem, max_context=args.max_context, batch=args.batch, group_size=args.group_size,
             prefill_chunk=args.prefill_chunk, draft=args.draft,
             spec_tokens=args.num_speculative_tokens)  # fmt: skip
    print(json.dumps(p.to_dict(), indent=2) if args.json else p.format())
    return 0 if p.fits else 1
