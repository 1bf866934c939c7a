"""LlamaConfig: the hyperparameters of a Llama 2 / 3 / 3.1 / 3.2 model, read from a Hugging Face config."""

from __future__ import annotations

from dataclasses import dataclass

from ..reference import rope_scaling_type


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int  # V: rows of the embedding and of the lm_head
    hidden_size: int  # H: width of the residual stream
    intermediate_size: int  # F: width of the SwiGLU feed-forward
    num_layers: int  # L: decoder layers
    num_heads: int  # Hq: query heads
    num_kv_heads: int  # Hkv: key/value heads (GQA: Hq % Hkv == 0)
    head_dim: int  # D: width of one head (default H / Hq)
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: dict | None = None  # Hugging Face rope_scaling: None, linear or llama3 (reference.rope_inv_freq)
    rms_norm_eps: float = 1e-5  # epsilon of every RMSNorm
    tie_word_embeddings: bool = False  # lm_head reuses the embedding matrix [V, H]
    max_position_embeddings: int = 4096  # longest context the model was trained for
    bos_token_id: int | None = None  # beginning-of-sequence token
    eos_token_ids: tuple[int, ...] = ()  # every token that ends generation

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig: {name}={value!r}; expected a positive int")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig: num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim={self.head_dim} must be even (rotary pairs)")
        rope_scaling_type(self.rope_scaling)

    @classmethod
    def from_hf(cls, d: dict) -> LlamaConfig:
        """From a Hugging Face config.json dict (model_type "llama").

        Reads RoPE either as `rope_theta` + `rope_scaling` (the checkpoints' layout; the llama3 kind
        under `rope_type` or `type`) or as transformers 5's `rope_parameters` (theta inside).
        """
        model_type = d.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"LlamaConfig: model_type={model_type!r}; only 'llama' models are supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"LlamaConfig: hidden_act={d['hidden_act']!r}; Llama uses 'silu'")
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key):
                raise ValueError(f"LlamaConfig: {key}=true is not supported (Llama linears have no bias)")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]  # fmt: skip
        if missing:
            raise ValueError(f"LlamaConfig: missing keys {missing}")
        if "rope_parameters" in d:
            params = dict(d["rope_parameters"])
            theta = float(params.pop("rope_theta", d.get("rope_theta", 10000.0)))
            scaling = params if params.get("rope_type", params.get("type", "default")) != "default" else None
        else:
            theta = float(d.get("rope_theta", 10000.0))
            scaling = d.get("rope_scaling")
            if scaling is not None and rope_scaling_type(scaling) == "default":
                scaling = None
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=id_tuple(eos),
        )


def id_tuple(ids: int | list[int] | None) -> tuple[int, ...]:
    """A token id, a list of them or None (as in config.json's eos_token_id), as a tuple."""
    if ids is None:
        return ()
    return (ids,) if isinstance(ids, int) else tuple(ids)
