"""The Llama decoder: embedding, decoder layers, final norm and lm_head, and nothing else.

Linears are the swappable modules of ``linear.py`` (quantize_model replaces them). The
residual stream runs through ops.add_rms_norm, or ops.add_rms_norm_fp8 when the linear that
reads the norm's output takes FP8 activations. With a TensorParallel (llama_kernels.distributed)
the model holds one rank's share: its heads, feed-forward rows and vocabulary rows. Attention writes k and v through
ops.rope_and_cache into the paged cache, then attends over the cache: ops.paged_prefill_attention
for a pass with prefill chunks (one call per layer for all sequences), ops.decode_attention for a decode step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..distributed import TensorParallel
from .config import LlamaConfig
from .kv_cache import AttentionBatch, KVCache
from .linear import Fp8Activation, Linear


class RMSNorm(nn.Module):
    """The weight and epsilon of an RMSNorm; the math is ops.add_rms_norm(_fp8)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        self.eps = eps  # added to the mean square
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype, device=device), requires_grad=False)  # [H]

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None, reader: nn.Module):
        """(normalized x + residual for `reader`, new residual), x and residual [T, H].

        The normalized rows come quantized (Fp8Activation) when `reader` takes FP8 input.
        """
        if reader.fp8_input:
            yq, y_scale, residual = ops.add_rms_norm_fp8(x, residual, self.weight, self.eps, reader.scale_ub)
            return Fp8Activation(yq, y_scale), residual
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class Embedding(nn.Module):
    """The embedding [V, H], or with tp its vocabulary rows [vocab_start, vocab_stop)."""

    def __init__(self, num: int, dim: int, dtype: torch.dtype, device=None, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.tp = tp
        rows = num if tp is None else tp.vocab_stop - tp.vocab_start
        self.weight = nn.Parameter(torch.empty(rows, dim, dtype=dtype, device=device), requires_grad=False)  # [V, H]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [T] int64 -> [T, H] (with tp: the masked local lookups, all-reduced)."""
        if self.tp is None:
            return F.embedding(tokens, self.weight)
        local = tokens - self.tp.vocab_start
        mine = (local >= 0) & (local < self.weight.shape[0])
        h = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * mine[:, None].to(self.weight.dtype)
        return self.tp.all_reduce(h)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_id: int, dtype: torch.dtype, device=None,
                 tp: TensorParallel | None = None) -> None:  # fmt: skip
        super().__init__()
        self.tp = tp  # None, or this rank's share: its heads, and an all-reduce after wo
        self.layer_id = layer_id  # index into the KV cache's layers
        self.num_heads = config.num_heads if tp is None else tp.num_heads  # Hq (this rank's)
        self.num_kv_heads = config.num_kv_heads if tp is None else tp.num_kv_heads  # Hkv (this rank's)
        self.head_dim = config.head_dim  # D
        qkv = (self.num_heads + 2 * self.num_kv_heads) * config.head_dim
        self.wqkv = Linear(config.hidden_size, qkv, dtype, device)  # [(Hq + 2 Hkv) D, H]: q, k, v stacked
        self.wo = Linear(self.num_heads * config.head_dim, config.hidden_size, dtype, device)  # [H, Hq D]

    def forward(self, x, batch: AttentionBatch, cache: KVCache, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H] (or its FP8 form) -> [T, H]; writes the tokens' k and v to the cache."""
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.wqkv(x)
        t = qkv.shape[0]
        q, k, v = (p.reshape(t, -1, d).contiguous() for p in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
        layer = self.layer_id
        k_scale, v_scale = cache.scales(layer, k, v)
        q, k = ops.rope_and_cache(q, k, v, batch.positions, cos, sin, cache.k[layer], cache.v[layer],
                                  batch.slot_mapping, k_scale, v_scale)  # fmt: skip
        if batch.is_decode:
            out = ops.decode_attention(q, cache.k[layer], cache.v[layer], batch.block_table, batch.seq_lens,
                                       k_scale=k_scale, v_scale=v_scale)  # fmt: skip
        else:  # prefill chunks (and one-token decodes beside them): each sequence over its whole cached prefix
            out = ops.paged_prefill_attention(q, cache.k[layer], cache.v[layer], batch.block_table, batch.seq_lens,
                                              batch.query_lens, k_scale=k_scale, v_scale=v_scale,
                                              plans=batch.plans)  # fmt: skip
        out = self.wo(out.reshape(t, hq * d))
        return out if self.tp is None else self.tp.all_reduce(out)


class FeedForward(nn.Module):
    def __init__(self, config: LlamaConfig, dtype: torch.dtype, device=None, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.tp = tp  # None, or this rank's share: its rows of gate/up, and an all-reduce after down
        self.intermediate_size = config.intermediate_size if tp is None else tp.ffn  # F (this rank's)
        self.w13 = Linear(config.hidden_size, 2 * self.intermediate_size, dtype, device)  # [2F, H]: gate, up
        self.w2 = Linear(self.intermediate_size, config.hidden_size, dtype, device)  # [H, F]: down

    def forward(self, x) -> torch.Tensor:
        """x [T, H] (or its FP8 form) -> [T, H]: w2(silu(gate) * up)."""
        gate, up = self.w13(x).split(self.intermediate_size, dim=-1)
        out = self.w2(F.silu(gate) * up)
        return out if self.tp is None else self.tp.all_reduce(out)


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig, layer_id: int, dtype: torch.dtype, device=None,
                 tp: TensorParallel | None = None) -> None:  # fmt: skip
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.attention = Attention(config, layer_id, dtype, device, tp)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.feed_forward = FeedForward(config, dtype, device, tp)

    def forward(self, h, residual, batch: AttentionBatch, cache: KVCache, cos, sin):
        """(h, residual) [T, H] -> (h, residual): the block's output is h + residual."""
        x, residual = self.attention_norm.add_norm(h, residual, self.attention.wqkv)
        h = self.attention(x, batch, cache, cos, sin)
        x, residual = self.ffn_norm.add_norm(h, residual, self.feed_forward.w13)
        return self.feed_forward(x), residual


class Transformer(nn.Module):
    """Llama decoder. Create it (on the meta device to load a checkpoint into it), then call
    setup(max_positions) once its weights are on their device. With `tp`, one rank's share of it
    (llama_kernels.distributed); the logits are still the full [T, V] on every rank."""

    def __init__(self, config: LlamaConfig, dtype: torch.dtype = torch.float32, device=None,
                 tp: TensorParallel | None = None) -> None:  # fmt: skip
        super().__init__()
        self.config = config
        self.tp = tp  # None, or this rank's share of the model
        self.dtype = dtype  # activation dtype; unquantized weights are stored in it
        h, v = config.hidden_size, config.vocab_size
        self.tok_embeddings = Embedding(v, h, dtype, device, tp)
        self.layers = nn.ModuleList(TransformerBlock(config, i, dtype, device, tp) for i in range(config.num_layers))
        self.norm = RMSNorm(h, config.rms_norm_eps, dtype, device)
        # lm_head [V, H] (with tp: its vocabulary rows); None when tied: the embedding matrix is used instead
        rows = v if tp is None else tp.vocab_stop - tp.vocab_start
        self.output = None if config.tie_word_embeddings else Linear(h, rows, dtype, device)
        self.cos: torch.Tensor | None = None  # [P, D/2] float32 RoPE tables, set by setup()
        self.sin: torch.Tensor | None = None  # [P, D/2] float32

    def setup(self, max_positions: int) -> None:
        """Compute the RoPE tables for positions [0, max_positions) on the weights' device."""
        c = self.config
        device = self.tok_embeddings.weight.device
        self.cos, self.sin = ops.rope_cos_sin(c.head_dim, max_positions, c.rope_theta, c.rope_scaling, device)

    def forward(self, tokens: torch.Tensor, batch: AttentionBatch, cache: KVCache,
                logits_index: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Logits of one forward pass.

        Args:
            tokens: [T] int64, the packed new tokens of each sequence (prefill chunks), or one token per
                sequence (decode).
            batch: positions, cache slots and sequence layout of the tokens.
            cache: the paged KV cache; the tokens' k and v are written to it.
            logits_index: [N] int64 rows of T to compute logits for (e.g. each prompt's last
                token); None for all T.
        Returns:
            [N, V] (or [T, V]) in the model dtype.
        """
        if self.cos is None:
            raise RuntimeError("Transformer: call setup(max_positions) before the first forward")
        h = self.tok_embeddings(tokens)
        residual = None
        for layer in self.layers:
            h, residual = layer(h, residual, batch, cache, self.cos, self.sin)
        if logits_index is not None:
            h, residual = h[logits_index], residual[logits_index]
        h, _ = ops.add_rms_norm(h, residual, self.norm.weight, self.norm.eps)
        logits = self.output(h) if self.output is not None else F.linear(h, self.tok_embeddings.weight)
        return logits if self.tp is None else self.tp.gather_vocab(logits)
