"""Continuous-batching scheduler: which tokens of which sequences run in the next step.

Every step, all running sequences that are decoding get their one token; running sequences still
prefilling get their next chunk; then waiting requests are admitted first come first served while
the step's token budget, max_num_seqs and the free KV blocks allow. A prompt longer than
prefill_chunk (or than the budget left) is prefilled over several steps, so one step may hold the
tail of one prompt and the head of the next. When the pool runs out, the most recently admitted
running sequence is preempted: its blocks go back to the pool and it waits at the front of the
queue to be recomputed (prompt + tokens so far, as one more prefill; its sampling state is kept,
so its output is the one it would have had).

Prefix caching (see block_allocator): on admission a sequence takes the longest cached prefix of
its tokens, in whole blocks and always leaving at least its last token to compute (its logits are
sampled), and prefills only the rest; full blocks are registered as soon as their k/v are computed
(computed()). A waiting sequence whose next uncached block is being computed by a running one (the
same prompt admitted together, e.g. n > 1 choices or a shared system prompt) waits until it is
registered, then shares it instead of computing it again; nobody overtakes it meanwhile.
"""

from __future__ import annotations

from collections import deque

import torch

from .block_allocator import BlockAllocator, PrefixChain
from .detokenizer import Detokenizer
from .sampling import SamplingParams, TokenLogprob


class Sequence:
    """One request's state."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 generator: torch.Generator | None, detokenizer: Detokenizer | None,
                 chain: PrefixChain) -> None:  # fmt: skip
        self.request_id = request_id
        self.params = params
        self.prompt_len = len(prompt_ids)  # tokens of the prompt
        self.ids = list(prompt_ids)  # prompt + generated tokens (the stop token excluded)
        self.generator = generator  # per-request sampling RNG (None: greedy)
        self.detokenizer = detokenizer  # incremental text (None without a tokenizer)
        self.blocks: list[int] = []  # its KV-cache blocks
        self.num_computed = 0  # tokens of ids whose k/v are in the cache
        self.admitted = False  # admitted at least once (its prompt counted)
        self.chain = chain  # its block digests and the cached registrations its leading blocks equal
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at its first admission
        self.reads_prefix_cache = True  # may start from cached blocks (False when every prompt token's logits count)
        self.new_ids: list[int] = []  # tokens not yet reported in a RequestOutput
        self.new_logprobs: list[TokenLogprob] = []  # their logprobs (when asked for)
        # the prompt tokens' logprobs collected so far (the first has none), when asked for and not yet reported
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if params.prompt_logprobs is not None else None
        self.matcher = None  # the grammar's state (engine.structured), when the output is constrained
        self.stop_token: int | None = None  # the eos / stop token that ended it (counted, not in ids)
        self.stop_logprob: TokenLogprob | None = None  # its logprob (when asked for)
        self.draft: list[int] = []  # speculative tokens to verify in the next step (engine/speculative.py)
        self.draft_probs: torch.Tensor | None = None  # [len(draft), V] their proposal distributions; None: one-hot

    @property
    def output_ids(self) -> list[int]:
        return self.ids[self.prompt_len :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.ids) - self.num_computed

    @property
    def is_decoding(self) -> bool:
        """Its next step is one decode token (the prompt and every earlier token are cached)."""
        return self.num_uncomputed == 1 and len(self.ids) > self.prompt_len


class Scheduler:
    """Waiting and running sequences over one block pool."""

    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, prefill_chunk: int,
                 max_num_batched_tokens: int) -> None:  # fmt: skip
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs  # running sequences at most
        self.prefill_chunk = prefill_chunk  # new tokens of one sequence per step at most
        self.max_num_batched_tokens = max_num_batched_tokens  # tokens per step at most (>= max_num_seqs)
        self.waiting: deque[Sequence] = deque()  # not admitted, or preempted (at the front), in order
        self.running: list[Sequence] = []  # admitted, oldest first
        self.num_preemptions = 0  # sequences preempted so far
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache (first admissions)
        self.prefix_hits = 0  # of those, tokens found cached

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence (finished or aborted) and give its blocks back."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def computed(self, seq: Sequence, n: int) -> None:
        """n more tokens of seq have their k/v in the cache: register its newly full blocks."""
        seq.num_computed += n
        self.allocator.register(seq.chain, seq.ids, seq.blocks, seq.num_computed)

    def schedule(self) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
        """(the (sequence, new tokens) pairs of the next step, in running order; the sequences
        admitted for the first time in it)."""
        budget = self.max_num_batched_tokens
        step: dict[Sequence, int] = {}
        decoding = [s for s in self.running if s.is_decoding]
        prefilling = [s for s in self.running if not s.is_decoding]
        spare = budget - len(decoding)  # tokens past one per decoding sequence: room for drafts
        for seq in decoding + prefilling:
            if seq not in self.running:  # preempted for an older sequence in this loop
                continue
            if seq.draft:  # a draft rides along while the budget and the free blocks allow (never preempts)
                del seq.draft[max(0, min(spare, self.prefill_chunk - 1)) :]
                if not self.allocator.grow(seq.blocks, seq.num_computed + 1 + len(seq.draft)):
                    seq.draft.clear()
                spare -= len(seq.draft)
            n = min(seq.num_uncomputed + len(seq.draft), self.prefill_chunk, budget)
            if n and self._grow(seq, n):
                step[seq] = n
                budget -= n
        new = []
        pending: set[bytes] | None = None  # digests of full blocks running sequences have yet to compute
        while self.waiting and budget and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if pending is None and self.allocator.prefix_caching:
                pending = {d for s in self.running for d in self._uncomputed_digests(s)}
            n = self._admit(seq, budget, pending)
            if not n:
                break  # first come first served: nobody overtakes it
            self.waiting.popleft()
            self.running.append(seq)
            if pending is not None:
                pending.update(self._uncomputed_digests(seq))
            step[seq] = n
            budget -= n
            if not seq.admitted:
                seq.admitted = True
                new.append(seq)
                self.prefix_queries += seq.prompt_len
                self.prefix_hits += seq.num_cached_tokens
        return [(s, step[s]) for s in self.running if s in step], new

    def _admit(self, seq: Sequence, budget: int, pending: set[bytes] | None) -> int:
        """Give a waiting sequence (nothing computed) its longest cached prefix and the blocks of its
        next chunk: the chunk's tokens, or 0 (nothing changed) if it does not fit or waits for a
        block a running sequence is computing."""
        a, bs = self.allocator, self.allocator.block_size
        hittable = (len(seq.ids) - 1) // bs if seq.reads_prefix_cache else 0  # the last token is always computed
        hits = a.match(seq.chain, seq.ids, hittable)
        if pending and len(hits) < hittable and seq.chain.digests[len(hits)] in pending:
            return 0
        n = min(len(seq.ids) - len(hits) * bs, self.prefill_chunk, budget)
        if not a.can_take(hits, a.blocks_for(len(hits) * bs + n) - len(hits)):
            return 0
        seq.blocks = a.take(hits, seq.chain)
        seq.num_computed = len(hits) * bs
        if not seq.admitted:
            seq.num_cached_tokens = seq.num_computed
        a.grow(seq.blocks, seq.num_computed + n)
        return n

    def _uncomputed_digests(self, seq: Sequence) -> list[bytes]:
        """Digests of the full blocks of a running sequence's known tokens not yet computed."""
        bs = self.allocator.block_size
        seq.chain.extend(seq.ids, bs, self.allocator.digest)
        return seq.chain.digests[seq.num_computed // bs : len(seq.ids) // bs]

    def _release(self, seq: Sequence) -> None:
        """Give a sequence's blocks back (the registered ones stay cached) and forget its cache view."""
        self.allocator.free(seq.blocks)
        seq.chain.serials = []
        seq.num_computed = 0

    def _grow(self, seq: Sequence, n: int) -> bool:
        """Blocks for n more tokens of a running sequence, preempting the most recently admitted
        ones until they fit; False if `seq` itself had to go."""
        while not self.allocator.grow(seq.blocks, seq.num_computed + n):
            victim = self.running.pop()
            self._release(victim)  # recomputed later: prompt + tokens so far, less what is still cached
            victim.draft = []
            self.waiting.appendleft(victim)
            self.num_preemptions += 1
            if victim is seq:
                return False
        return True
