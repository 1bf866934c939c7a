"""The model runner: turns one scheduled step (a chunk of new tokens per sequence) into an
AttentionBatch, runs the model (a decode step, and a speculative verify step, as a CUDA graph where
it can), and calibrates the FP8 KV scales once at start-up."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .. import backends, distributed
from .._validate import frozen_values
from ..model.kv_cache import AttentionBatch, KVCache
from ..model.linear import Fp8Linear, Fp8StaticLinear, Int4Linear
from ..model.model import Transformer
from .block_allocator import BlockAllocator

# The fixed text whose k and v set the FP8 KV-cache scales at start-up (prose, digits, code and
# non-Latin script, so the scales see more than one kind of token).
CALIBRATION_TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after the "
    "engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. In 2023 it welcomed "
    "6.3 million visitors; its height is 330 m (1,083 ft).\n\ndef fib(n: int) -> int:\n    return n if n < 2 else "
    "fib(n - 1) + fib(n - 2)\n\nQ: What is 17 * 23? A: 391.\n東京は日本の首都です。Москва — столица России. "
    "<|user|> Summarize the text above in one sentence. <|assistant|> A famous iron tower in Paris, built by Eiffel."
)
CALIBRATION_TOKENS = 256  # token ids of a checkpoint without a tokenizer: this many seeded random ids
_said_eager: list[bool] = []  # whether "decode runs eagerly" was printed (once per process)


@dataclass
class Chunk:
    """New tokens of one sequence in one step."""

    tokens: list[int]  # the tokens to run (their k/v are written to the cache)
    start: int  # position of tokens[0] in its sequence (tokens before it are in the cache)
    blocks: list[int]  # the sequence's cache blocks (enough for start + len(tokens) tokens)
    logits: bool  # compute the logits of its last token
    all_logits: bool = False  # compute the logits of every token (prompt logprobs)
    spec: int = 0  # with logits: also those of the `spec` tokens before it (a speculative draft's verification)


def decode_ops(model: Transformer) -> set[str]:
    """The ops one decode step of `model` calls."""
    used = {"add_rms_norm", "rope_and_cache", "decode_attention"}
    for m in model.modules():
        if isinstance(m, Fp8Linear):
            used |= {"add_rms_norm_fp8", "quantize_fp8", "fp8_gemm"}
        elif isinstance(m, Fp8StaticLinear):
            used |= {"fp8_gemm"}
        elif isinstance(m, Int4Linear):
            used |= {"int4_gemm"}
    return used


def verify_ops(model: Transformer) -> set[str]:
    """The ops one speculative verify step of `model` calls (several query tokens per sequence)."""
    return decode_ops(model) - {"decode_attention"} | {"paged_prefill_attention"}


def graph_blockers(model: Transformer, device: torch.device, ops: set[str] | None = None) -> list[str]:
    """Ops (default: decode_ops) whose implementation on `device` a CUDA graph cannot capture (the torch
    references that sync with the host: backends.graph_safe)."""
    return sorted(op for op in (decode_ops(model) if ops is None else ops) if not backends.graph_safe(op, device))


def capture(model: Transformer, cache: KVCache, pool, tokens: torch.Tensor,
            batch: AttentionBatch) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:  # fmt: skip
    """Warm up on a side stream (Triton compiles, cuBLAS plans), then capture one forward pass of the
    model over static inputs (tokens and batch) into a graph of memory pool `pool`: (graph, its logits)."""
    stream = torch.cuda.Stream(tokens.device)
    stream.wait_stream(torch.cuda.current_stream(tokens.device))
    with torch.cuda.stream(stream):
        model(tokens, batch, cache)  # rewrites the same k/v the replay writes
    torch.cuda.current_stream(tokens.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    batch.plans.clear()  # an attention plan is built inside the graph, from the static inputs
    with torch.cuda.graph(graph, pool=pool):
        logits = model(tokens, batch, cache)
    return graph, logits


def buckets(max_batch: int) -> list[int]:
    """Batch-size buckets of the CUDA graphs: 1, 2, 4, ..., the first >= max_batch."""
    return [1 << i for i in range((max_batch - 1).bit_length() + 1)]


class DecodeGraphs:
    """The decode step as CUDA graphs, one per batch-size bucket (1, 2, 4, ..., the first >= max_batch),
    each captured on first use and replayed with the live batch copied into its static buffers.

    Static inputs of bucket B: tokens [B] int64, positions [B] int64, slots [B] int64, block_table
    [B, W] int32 (W = blocks of max_context), seq_lens [B] int32; output: logits [B, V]. Rows past
    the live batch are padding: slot -1 (rope_and_cache skips the cache write), seq_len 1, block 0;
    their logits are dropped. The graphs share one memory pool. A graph bakes in the cache's
    tensors and FP8 scales by address (both are updated in place). Capture and replay run under
    the model's device (torch.cuda.device), whichever device is current.
    """

    def __init__(self, model: Transformer, cache: KVCache, max_batch: int, max_context: int) -> None:
        device = model.tok_embeddings.weight.device
        if device.type != "cuda":
            raise ValueError(f"DecodeGraphs: the model is on {device}; CUDA graphs need a CUDA device")
        self.model, self.cache, self.device = model, cache, device
        self.width = -(-max_context // cache.block_size)  # W: block-table columns of a full-length sequence
        self.buckets = buckets(max_batch)
        with torch.cuda.device(device):
            self.pool = torch.cuda.graph_pool_handle()  # shared by every bucket's graph
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}

    def __call__(self, tokens: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """Logits [n, V] of one decode step: tokens [n] and a decode AttentionBatch of n sequences."""
        n = tokens.shape[0]
        size = next(b for b in self.buckets if b >= n)
        with torch.cuda.device(self.device):
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
        tok, pos, slots, table, lens = bufs
        return capture(self.model, self.cache, self.pool, tok, AttentionBatch(pos, slots, block_table=table,
                                                                              seq_lens=lens))  # fmt: skip


@dataclass
class VerifyLayout:
    """A speculative verify step as the verify graph of bucket `size` replays it (verify_layout): the live
    sequences exactly as the eager step runs them, then padding, in static shapes of q = k + 1 tokens per
    sequence of the bucket and one padding sequence more."""

    size: int  # B: the batch-size bucket
    tokens: list[int]  # [B q + 1] token ids: the live chunks' packed, then padding (0)
    positions: list[int]  # [B q + 1] RoPE positions (padding: 0)
    slots: list[int]  # [B q + 1] cache slots of the k/v written (padding: -1, no write)
    block_table: list[list[int]]  # [B + 1][W] block ids (unused entries and padding sequences: block 0, read only)
    seq_lens: list[int]  # [B + 1] tokens in the cache after the step (padding sequences: their query length)
    query_lens: list[int]  # [B + 1] new tokens of each sequence (sum B q + 1)
    rows: int  # the step's logits are the first `rows` rows (every token of its chunks)


def verify_layout(chunks: list[Chunk], k: int, sizes: list[int], block_size: int, width: int) -> VerifyLayout | None:
    """The verify-graph layout of a step, or None when the step is not one (it then runs as before: a pure
    decode step as a decode graph, anything else eagerly).

    A verify step has at most sizes[-1] chunks, each a decoding sequence's last token and its draft of at
    most k tokens (logits of all of them: spec = len(tokens) - 1 <= k, no all_logits), at least one draft
    non-empty. Sequences whose draft is shorter than k (or empty) are not sent to the eager path: the live
    chunks are packed as the eager step packs them (same positions, slots, seq_lens and query_lens: every
    real token attends to exactly what it does eagerly), and the static shapes are filled with padding that
    no live token reads: the bucket's missing sequences (the first of `sizes` >= the chunks) of one token
    each and one last padding sequence holding the remaining tokens of the B q + 1, all with slot -1 (no
    cache write), over block 0 (read only; their logits are dropped). width: block-table columns, at least
    max_context and sizes[-1] q + 1 tokens.
    """
    q = k + 1
    if not chunks or len(chunks) > sizes[-1] or not any(c.spec for c in chunks):
        return None
    if not all(c.logits and not c.all_logits and len(c.tokens) == c.spec + 1 <= q for c in chunks):
        return None
    size = next(b for b in sizes if b >= len(chunks))
    live = sum(len(c.tokens) for c in chunks)
    rest = size * q + 1 - live - (size - len(chunks))  # the last padding sequence's tokens, >= 1
    if max(rest, *(c.start + len(c.tokens) for c in chunks)) > width * block_size:
        raise ValueError(f"verify_layout: a sequence of this step needs more than the {width} x {block_size} tokens "
                         "of the block table")  # fmt: skip
    pad = size * q + 1 - live
    return VerifyLayout(
        size,
        [t for c in chunks for t in c.tokens] + [0] * pad,
        [c.start + j for c in chunks for j in range(len(c.tokens))] + [0] * pad,
        [c.blocks[p // block_size] * block_size + p % block_size for c in chunks
         for p in range(c.start, c.start + len(c.tokens))] + [-1] * pad,
        [c.blocks + [0] * (width - len(c.blocks)) for c in chunks] + [[0] * width] * (size + 1 - len(chunks)),
        [c.start + len(c.tokens) for c in chunks] + [1] * (size - len(chunks)) + [rest],
        [len(c.tokens) for c in chunks] + [1] * (size - len(chunks)) + [rest],
        live,
    )  # fmt: skip


class VerifyGraphs:
    """The verify step of speculative decoding (fixed k) as CUDA graphs, one per batch-size bucket
    (1, 2, 4, ..., the first >= max_batch), captured on first use, replayed with verify_layout's padded
    step copied into its static buffers (see verify_layout for the padding).

    Static inputs of bucket B, q = k + 1: tokens, positions, slots [B q + 1] int64, block_table [B + 1, W]
    int32 (W: blocks of max(max_context, max_batch-bucket q + 1) tokens), seq_lens, query_lens [B + 1]
    int32; output: logits [B q + 1, V]. The attention plan is built inside the graph from seq_lens and
    query_lens. pool: a graph memory pool to share (the decode graphs': steps never overlap), None: its own.
    """

    def __init__(self, model: Transformer, cache: KVCache, max_batch: int, max_context: int, k: int,
                 pool=None) -> None:  # fmt: skip
        device = model.tok_embeddings.weight.device
        if device.type != "cuda":
            raise ValueError(f"VerifyGraphs: the model is on {device}; CUDA graphs need a CUDA device")
        self.model, self.cache, self.device, self.k = model, cache, device, k
        self.buckets = buckets(max_batch)
        self.width = -(-max(max_context, self.buckets[-1] * (k + 1) + 1) // cache.block_size)
        with torch.cuda.device(device):
            self.pool = torch.cuda.graph_pool_handle() if pool is None else pool
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}

    def layout(self, chunks: list[Chunk]) -> VerifyLayout | None:
        return verify_layout(chunks, self.k, self.buckets, self.cache.block_size, self.width)

    def __call__(self, layout: VerifyLayout) -> torch.Tensor:
        """Logits [layout.rows, V] of a verify step (a copy: the next replay overwrites the graph's output)."""
        live = (layout.tokens, layout.positions, layout.slots, layout.block_table, layout.seq_lens,
                layout.query_lens)  # fmt: skip
        with torch.cuda.device(self.device):
            if layout.size in self.graphs:
                graph, bufs, logits = self.graphs[layout.size]
                for buf, values in zip(bufs, live):
                    buf.copy_(torch.tensor(values, dtype=buf.dtype))
            else:
                bufs = tuple(torch.tensor(v, dtype=torch.int64 if i < 3 else torch.int32, device=self.device)
                             for i, v in enumerate(live))  # fmt: skip
                tok, pos, slots, table, lens, qlens = bufs
                graph, logits = capture(self.model, self.cache, self.pool, tok,
                                        AttentionBatch(pos, slots, table, lens, qlens))  # fmt: skip
                self.graphs[layout.size] = graph, bufs, logits
            graph.replay()
        return logits[: layout.rows].clone()


class ModelRunner:
    """Runs steps of the model over the paged cache: prefill chunks and decode steps alike."""

    def __init__(self, model: Transformer, cache: KVCache, max_num_seqs: int, max_context: int,
                 cuda_graphs: bool, spec_tokens: int = 0) -> None:  # fmt: skip
        self.model, self.cache = model, cache
        self.device = model.tok_embeddings.weight.device
        self.graphs: DecodeGraphs | None = None  # decode steps as CUDA graphs; None: eager
        self.verify_graphs: VerifyGraphs | None = None  # verify steps of spec_tokens drafts as CUDA graphs
        if cuda_graphs and self.device.type == "cuda":
            blockers = graph_blockers(model, self.device)
            if blockers and not _said_eager:
                _said_eager.append(True)
                print(f"decode runs eagerly, without CUDA graphs: {', '.join(blockers)} would run on the torch "
                      "backend, whose host syncs a graph cannot capture", file=sys.stderr)  # fmt: skip
            if not blockers:
                self.graphs = DecodeGraphs(model, cache, max_num_seqs, max_context)
            if spec_tokens and not graph_blockers(model, self.device, verify_ops(model)):
                self.verify_graphs = VerifyGraphs(model, cache, max_num_seqs, max_context, spec_tokens,
                                                  self.graphs.pool if self.graphs is not None else None)  # fmt: skip

    @torch.inference_mode()
    def run(self, chunks: list[Chunk], all_logits: bool = False, lead: bool = False,
            key: str = "target") -> torch.Tensor:  # fmt: skip
        """Logits [N, V] float32 of the chunks that ask for them (their last 1 + spec tokens, or every token of
        a chunk with all_logits, in order), or with all_logits of every token [T, V]. A step whose chunks are
        all one token is a decode step.
        With lead (rank 0 under tensor parallel), the step is first sent to the ranks in follow(), which run
        it on their runner of that key ("target": the engine's model, or one a proposer runs: "draft")."""
        if lead:
            distributed.broadcast_object(("run", key, chunks, all_logits))
        layout = self.verify_graphs.layout(chunks) if self.verify_graphs is not None and not all_logits else None
        if layout is not None:  # a verify step of speculative decoding, as a CUDA graph
            with frozen_values():
                return self.verify_graphs(layout).float()
        bs = self.cache.block_size
        tokens = [t for c in chunks for t in c.tokens]
        positions = [c.start + i for c in chunks for i in range(len(c.tokens))]
        slots = [c.blocks[p // bs] * bs + p % bs for c in chunks for p in range(c.start, c.start + len(c.tokens))]
        width = max(len(c.blocks) for c in chunks)
        table = torch.tensor([c.blocks + [0] * (width - len(c.blocks)) for c in chunks], dtype=torch.int32)
        lens = [len(c.tokens) for c in chunks]
        decode = all(n == 1 for n in lens)
        dev = self.device
        batch = AttentionBatch(
            torch.tensor(positions, device=dev), torch.tensor(slots, device=dev), table.to(dev),
            torch.tensor([c.start + n for c, n in zip(chunks, lens)], dtype=torch.int32, device=dev),
            None if decode else torch.tensor(lens, dtype=torch.int32, device=dev),
        )  # fmt: skip
        ids = torch.tensor(tokens, device=dev)
        ends = torch.tensor(lens).cumsum(0) - 1  # row of each chunk's last token
        want = torch.tensor([r for c, n, e in zip(chunks, lens, ends.tolist())
                             for r in (range(e - n + 1, e + 1) if c.all_logits else range(e - c.spec, e + 1)
                                       if c.logits else ())],
                            dtype=torch.int64)  # fmt: skip
        with frozen_values():  # the batch's index tensors are value-checked once, not in every layer
            if decode and not all_logits:  # a decode step: every sequence's logits
                logits = self.graphs(ids, batch) if self.graphs is not None else self.model(ids, batch, self.cache)
                return logits[want].float()
            index = None if all_logits else want.to(dev)
            return self.model(ids, batch, self.cache, index).float()

    def follow(self, others: dict[str, ModelRunner] | None = None) -> None:
        """Under tensor parallel, on ranks other than 0: run each pass rank 0 leads, on this runner (key
        "target") or on the one of `others` it names (a draft model's), until rank 0 stops."""
        runners = {"target": self, **(others or {})}
        while True:
            message = distributed.broadcast_object()
            if message[0] == "stop":
                return
            _, key, chunks, all_logits = message
            runners[key].run(chunks, all_logits)

    @staticmethod
    def stop_followers() -> None:
        """Rank 0: end the other ranks' follow()."""
        distributed.broadcast_object(("stop",))

    def calibrate(self, allocator: BlockAllocator, tokenizer, max_context: int) -> None:
        """Fix the FP8 KV scales (no-op unless the cache is FP8 and not yet calibrated) from one
        prefill of CALIBRATION_TEXT (or seeded random ids without a tokenizer)."""
        if self.cache.calibrated:
            return
        if tokenizer is not None:
            ids = tokenizer.encode(CALIBRATION_TEXT)
        else:
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(self.model.config.vocab_size, (CALIBRATION_TOKENS,), generator=g).tolist()
        ids = ids[: min(max_context, allocator.num_free * allocator.block_size)]
        blocks: list[int] = []
        allocator.grow(blocks, len(ids))
        self.cache.calibrating = True
        try:
            self.run([Chunk(ids, 0, blocks, True)])
        finally:
            self.cache.calibrating = False
            allocator.free(blocks)
        self.cache.calibrated = True
