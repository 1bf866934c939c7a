"""Batched generation over the paged KV cache: one packed prefill, then one decode step per token.

Works on token ids; llama_kernels.llm.LLM adds the tokenizer. Prompts of different lengths
share each step; a sequence leaves the batch when it emits a stop token or reaches
max_new_tokens. On CUDA the decode step can replay a CUDA graph (DecodeGraphs) captured per
batch-size bucket.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .model.kv_cache import AttentionBatch, KVCache
from .model.model import Transformer


@dataclass
class GenerationStats:
    """Throughput of one generate call (all batches of it)."""

    prompt_tokens: int = 0  # tokens prefilled
    new_tokens: int = 0  # tokens generated (stop tokens included)
    prefill_s: float = 0.0  # seconds in prefill (first token's logits and sampling included)
    decode_s: float = 0.0  # seconds in decode steps
    decode_steps: int = 0  # decode forward passes
    decode_tokens: int = 0  # tokens those passes produced (the first token of a sequence comes from prefill)
    decode_bytes: int = 0  # weight + KV bytes the decode steps read
    batch_sizes: list[int] = field(default_factory=list)  # sequences per batch

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def decode_gb_per_s(self) -> float:
        """Achieved bandwidth of decode: (weight bytes + KV bytes read per step) summed over steps / time."""
        return self.decode_bytes / self.decode_s / 1e9 if self.decode_s else 0.0


def weight_bytes(model: Transformer) -> int:
    """Bytes of weights one decode step reads: everything but the embedding table (unless it is the lm_head)."""
    total = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    return total if model.output is None else total - model.tok_embeddings.weight.nbytes


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None) -> torch.Tensor:  # fmt: skip
    """Next tokens [B] int64 from logits [B, V]: greedy at temperature 0, else softmax(logits / T)
    restricted to the top_k most likely tokens and to the smallest set whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # tokens after the nucleus is complete
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DecodeGraphs:
    """The decode step as CUDA graphs, one per batch-size bucket (1, 2, 4, ..., the first >= max_batch),
    each captured on first use and replayed with the live batch copied into its static buffers.

    Static inputs of bucket B: tokens [B] int64, positions [B] int64, slots [B] int64, block_table
    [B, W] int32 (W = blocks of max_context), seq_lens [B] int32; output: logits [B, V]. Rows past
    the live batch are padding: slot -1 (rope_and_cache skips the cache write), seq_len 1, block 0;
    their logits are dropped. The graphs share one memory pool. A graph bakes in the cache's
    tensors and FP8 scales by address (both are updated in place), so it stays valid across resets.
    """

    def __init__(self, model: Transformer, cache: KVCache, max_batch: int, max_context: int) -> None:
        device = model.tok_embeddings.weight.device
        if device.type != "cuda":
            raise ValueError(f"DecodeGraphs: the model is on {device}; CUDA graphs need a CUDA device")
        self.model, self.cache = model, cache
        self.width = -(-max_context // cache.block_size)  # W: block-table columns of a full-length sequence
        self.buckets = [1 << i for i in range((max_batch - 1).bit_length() + 1)]  # 1, 2, 4, ..., >= max_batch
        self.pool = torch.cuda.graph_pool_handle()  # shared by every bucket's graph
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}

    def __call__(self, tokens: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """Logits [n, V] of one decode step: tokens [n] and a decode AttentionBatch of n sequences."""
        n = tokens.shape[0]
        size = next(b for b in self.buckets if b >= n)
        if size in self.graphs:
            graph, bufs, logits = self.graphs[size]
            self.fill(bufs, tokens, batch)
        else:
            bufs = self.static_inputs(size, self.width, tokens.device)
            self.fill(bufs, tokens, batch)
            graph, logits = self._capture(bufs)
            self.graphs[size] = graph, bufs, logits
        graph.replay()
        return logits[:n]

    @staticmethod
    def static_inputs(size: int, width: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(tokens [B] int64, positions [B] int64, slots [B] int64, block_table [B, W] int32, seq_lens [B] int32)."""
        i64 = dict(dtype=torch.int64, device=device)
        return (torch.zeros(size, **i64), torch.zeros(size, **i64), torch.full((size,), -1, **i64),
                torch.zeros(size, width, dtype=torch.int32, device=device),
                torch.ones(size, dtype=torch.int32, device=device))  # fmt: skip

    @staticmethod
    def fill(bufs: tuple[torch.Tensor, ...], tokens: torch.Tensor, batch: AttentionBatch) -> None:
        """Copy a live decode batch of n <= B sequences into static_inputs; rows n: become padding."""
        tok, pos, slots, table, lens = bufs
        n = tokens.shape[0]
        for buf, live, pad in ((tok, tokens, 0), (pos, batch.positions, 0), (slots, batch.slot_mapping, -1),
                               (lens, batch.seq_lens, 1)):  # fmt: skip
            buf[:n].copy_(live)
            buf[n:].fill_(pad)
        table.zero_()
        table[:n, : batch.block_table.shape[1]].copy_(batch.block_table)

    def _capture(self, bufs: tuple[torch.Tensor, ...]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream (Triton compiles, cuBLAS plans), then capture one step over bufs."""
        tok, pos, slots, table, lens = bufs
        batch = AttentionBatch(pos, slots, block_table=table, seq_lens=lens)
        stream = torch.cuda.Stream(tok.device)
        stream.wait_stream(torch.cuda.current_stream(tok.device))
        with torch.cuda.stream(stream):
            self.model(tok, batch, self.cache)  # rewrites the same k/v the replay writes
        torch.cuda.current_stream(tok.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.model(tok, batch, self.cache)
        return graph, logits


@torch.inference_mode()
def generate(model: Transformer, cache: KVCache, prompts: list[list[int]], max_new_tokens: int, *,
             max_context: int, max_batch: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, stop_ids: tuple[int, ...] = (),
             graphs: DecodeGraphs | None = None, on_token: Callable[[int, int], None] | None = None
             ) -> tuple[list[list[int]], GenerationStats]:  # fmt: skip
    """Generate up to max_new_tokens after each prompt (token ids), max_batch sequences at a time.

    Decode steps run through `graphs` when given (CUDA), else eagerly. on_token(prompt index,
    token) is called for every kept token as soon as it is sampled (streaming).
    Returns (new token ids per prompt, the stop token excluded; stats). Raises ValueError before
    any work when a prompt plus max_new_tokens exceeds max_context.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    check_context(prompts, max_new_tokens, max_context)
    device = model.tok_embeddings.weight.device
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    stats = GenerationStats()
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), max_batch):
        chunk = prompts[start : start + max_batch]
        emit = (lambda b, tok, start=start: on_token(start + b, tok)) if on_token is not None else None
        outputs += _generate_batch(model, cache, chunk, max_new_tokens, temperature, top_k, top_p, generator,
                                   set(stop_ids), stats, device, graphs, emit)  # fmt: skip
    return outputs, stats


def _generate_batch(model, cache, prompts, max_new_tokens, temperature, top_k, top_p, generator, stop_ids, stats,
                    device, graphs, on_token) -> list[list[int]]:  # fmt: skip
    lens = [len(p) for p in prompts]
    cache.reset()
    block_table = cache.allocate([n + max_new_tokens for n in lens])  # [B, max_blocks]
    _sync(device)
    t0 = time.perf_counter()
    tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=device)
    positions = torch.cat([torch.arange(n) for n in lens]).to(device)
    rows = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)).to(device)
    batch = AttentionBatch(positions, cache.slots(block_table, positions, rows), prefill_lens=lens)
    last = torch.tensor(lens, device=device).cumsum(0) - 1
    next_tokens = sample(model(tokens, batch, cache, last), temperature, top_k, top_p, generator).tolist()
    stats.prefill_s += time.perf_counter() - t0
    stats.prompt_tokens += sum(lens)
    stats.batch_sizes.append(len(prompts))

    out: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))  # sequences still generating
    step_weights = weight_bytes(model)
    t0 = time.perf_counter()
    while True:
        still = []
        for b, tok in zip(active, next_tokens):
            stats.new_tokens += 1
            if tok in stop_ids:
                continue
            out[b].append(tok)
            if on_token is not None:
                on_token(b, tok)
            if len(out[b]) < max_new_tokens:
                still.append(b)
        active = still
        if not active:
            break
        pos = [lens[b] + len(out[b]) - 1 for b in active]  # position of each sequence's newest token
        positions = torch.tensor(pos, device=device)
        table = block_table[torch.tensor(active, device=device)]
        batch = AttentionBatch(positions, cache.slots(table, positions, torch.arange(len(active), device=device)),
                               block_table=table, seq_lens=(positions + 1).to(torch.int32))  # fmt: skip
        tokens = torch.tensor([out[b][-1] for b in active], device=device)
        logits = graphs(tokens, batch) if graphs is not None else model(tokens, batch, cache)
        next_tokens = sample(logits, temperature, top_k, top_p, generator).tolist()
        stats.decode_steps += 1
        stats.decode_tokens += len(active)
        stats.decode_bytes += step_weights + (sum(pos) + len(pos)) * cache.bytes_per_token
    stats.decode_s += time.perf_counter() - t0
    return out
