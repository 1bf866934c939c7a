"""The engine: requests in, RequestOutputs out, one scheduler iteration per step() (continuous
batching with chunked prefill over the paged KV cache). LLM.generate and the HTTP server both
run on it. Synchronous: one thread calls it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from .. import distributed
from ..loader.tokenizer import Tokenizer
from ..model.kv_cache import KVCache
from ..model.model import Transformer
from .block_allocator import BlockAllocator, PrefixChain
from .detokenizer import Detokenizer
from .runner import Chunk, ModelRunner
from .sampling import SamplingParams, TokenLogprob, sample, token_logprob
from .scheduler import Scheduler, Sequence

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """What an engine runs on: a loaded model with its paged KV cache, block pool and tokenizer
    (llama_kernels.llm.LLM builds one; the engine knows nothing of LLM or of HTTP)."""

    model: Transformer  # set up for max_context positions
    cache: KVCache  # the paged KV cache: [num_blocks, block_size, Hkv, D] K and V per layer
    allocator: BlockAllocator  # the cache's blocks, shared by every engine on this model
    tokenizer: Tokenizer | None  # encode / decode / apply_chat_template (None for a random model)
    stop_ids: tuple[int, ...]  # the model's eos ids
    max_context: int  # tokens per sequence: prompt + new tokens
    prefill_chunk: int  # prompt tokens per forward pass at most (the planner's number)
    cuda_graphs: bool  # on CUDA, replay decode steps as CUDA graphs


@dataclass
class RequestOutput:
    """One per request per engine step that produced something for it."""

    request_id: str
    new_text: str  # detokenized text since the previous output (UTF-8-safe, stop strings withheld)
    new_token_ids: list[int]  # tokens since the previous output (stop token excluded)
    new_logprobs: list[TokenLogprob] | None  # their logprobs, when the request asked for them
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" once finished, else None
    prompt_tokens: int
    completion_tokens: int  # tokens generated so far (stop token excluded)
    error: str | None = None  # with finish_reason "error": what failed ("ExceptionType: message")
    cached_tokens: int = 0  # prompt tokens read from the prefix cache instead of computed


@dataclass
class EngineStats:
    num_running: int  # admitted sequences
    num_waiting: int  # queued (new or preempted) sequences
    kv_blocks_used: int
    kv_blocks_total: int
    prompt_tokens_total: int  # prompt tokens of every admitted request
    generation_tokens_total: int  # tokens sampled (stop tokens included)
    num_preemptions: int
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found cached (not computed)
    kv_blocks_cached: int = 0  # blocks registered in the prefix cache, held or free
    kv_blocks_cached_free: int = 0  # of those, free ones (evicted least recently used when needed)


@dataclass
class GenerationStats:
    """Throughput counters of the engine's steps (LLM.generate reports those of one call)."""

    prompt_tokens: int = 0  # prompt tokens admitted
    cached_tokens: int = 0  # of those, tokens found in the prefix cache (not computed)
    new_tokens: int = 0  # tokens sampled (stop tokens included)
    prefill_s: float = 0.0  # seconds in steps that held prefill chunks (their sampling included)
    decode_s: float = 0.0  # seconds in pure decode steps
    decode_steps: int = 0  # pure decode steps
    decode_tokens: int = 0  # tokens those steps produced (a sequence's first token comes from its prefill)
    decode_bytes: int = 0  # weight + KV bytes the decode steps read
    batch_sizes: list[int] = field(default_factory=list)  # requests admitted per step that admitted any

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens computed (cached ones excluded) per second of prefill."""
        return (self.prompt_tokens - self.cached_tokens) / self.prefill_s if self.prefill_s else 0.0

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


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Engine: {name}={value!r}; expected an int >= {minimum}")
    return value


class Engine:
    """Continuous batching over a loaded model and its KV-cache pool.

    Args:
        loaded: the model, its cache, block allocator, tokenizer and eos ids.
        max_num_seqs: sequences running at once.
        prefill_chunk: new tokens of one sequence per step at most (default loaded.prefill_chunk: the
            planner's PREFILL_CHUNK unless loaded with another, so the planner's activation budget holds).
        max_num_batched_tokens: tokens per step at most, decodes included (default
            max(prefill_chunk, max_num_seqs); must be >= max_num_seqs so every running sequence
            decodes every step).
    """

    def __init__(self, loaded: LoadedModel, *, max_num_seqs: int = 8, prefill_chunk: int | None = None,
                 max_num_batched_tokens: int | None = None) -> None:  # fmt: skip
        max_num_seqs = _positive_int("max_num_seqs", max_num_seqs)
        prefill_chunk = _positive_int("prefill_chunk", loaded.prefill_chunk if prefill_chunk is None else prefill_chunk)
        if max_num_batched_tokens is None:
            max_num_batched_tokens = max(prefill_chunk, max_num_seqs)
        _positive_int("max_num_batched_tokens", max_num_batched_tokens, max_num_seqs)
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer  # encode / decode / apply_chat_template (None for a random model)
        self.max_context = loaded.max_context  # tokens per sequence (prompt + output)
        self.allocator = loaded.allocator  # the block pool, shared by every engine on this model
        self.scheduler = Scheduler(self.allocator, max_num_seqs, prefill_chunk, max_num_batched_tokens)
        self.runner = ModelRunner(loaded.model, loaded.cache, max_num_seqs, loaded.max_context,
                                  loaded.cuda_graphs)  # fmt: skip
        self.runner.calibrate(self.allocator, self.tokenizer, loaded.max_context)
        self.device = loaded.model.tok_embeddings.weight.device
        # under tensor parallel, rank 0 schedules and sends each step to the other ranks (see follow())
        self.lead = loaded.model.tp is not None and distributed.is_main()
        self.eos_ids = tuple(loaded.stop_ids)  # the model's eos ids
        self.throughput = GenerationStats()  # counters since the last reset (LLM.generate resets it)
        self._seqs: dict[str, Sequence] = {}  # unfinished requests by id
        self._pending: list[RequestOutput] = []  # abort outputs, handed out by the next step()
        self._prompt_total = 0  # prompt tokens of every request admitted since start-up (stats())
        self._generated_total = 0  # tokens sampled since start-up (stats())
        self._weight_bytes = weight_bytes(loaded.model)

    # --- requests ------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    cache_salt: str | None = None) -> None:  # fmt: skip
        """Queue a request; ValueError (naming the field and value) before any state change.
        cache_salt: requests share cached prefix blocks only with requests of the same salt."""
        prompt = self.check_request(request_id, prompt_ids, params)
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise ValueError(f"Engine.add_request: cache_salt={cache_salt!r}; expected None or a non-empty string")
        generator = None
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else int(torch.randint(2**62, (1,)))
            generator = torch.Generator(self.device).manual_seed(seed)
        detok = Detokenizer(self.tokenizer, params.stop) if self.tokenizer is not None else None
        seq = Sequence(request_id, prompt, params, generator, detok, PrefixChain(self.allocator.root_key(cache_salt)))
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def check_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        """The checks of add_request, changing nothing: ValueError naming the field and value, else
        the prompt as a list."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"Engine.add_request: request_id={request_id!r}; expected a non-empty string")
        if request_id in self._seqs:
            raise ValueError(f"Engine.add_request: request_id={request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"Engine.add_request: params={params!r}; expected a SamplingParams")
        params.validate()
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("Engine.add_request: prompt_ids is empty; expected at least one token")
        vocab = self.model.config.vocab_size
        for i, t in enumerate(prompt):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"Engine.add_request: prompt_ids[{i}]={t!r}; expected a token id in [0, {vocab})")
        total = len(prompt) + params.max_tokens
        if total > self.max_context:
            raise ValueError(f"Engine.add_request: prompt of {len(prompt)} tokens + max_tokens={params.max_tokens} "
                             f"= {total} > max_context={self.max_context}")  # fmt: skip
        if self.allocator.blocks_for(total) > self.allocator.num_blocks:
            raise ValueError(f"Engine.add_request: prompt of {len(prompt)} tokens + max_tokens={params.max_tokens} "
                             f"needs more than the {self.allocator.num_blocks} KV blocks of the pool")  # fmt: skip
        if params.stop and self.tokenizer is None:
            raise ValueError(f"Engine.add_request: stop={params.stop!r} needs a tokenizer; this model has none")
        return prompt

    def abort(self, request_id: str) -> None:
        """Free the request's blocks now; the next step() returns its final output (finish_reason
        "abort"). Unknown or finished ids are ignored."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return
        self.scheduler.remove(seq)
        self._pending.append(self._output(seq, "abort"))

    def has_unfinished(self) -> bool:
        return bool(self._seqs or self._pending)

    def stats(self) -> EngineStats:
        s = self.scheduler
        a = self.allocator
        return EngineStats(len(s.running), len(s.waiting), a.used, a.num_blocks, self._prompt_total,
                           self._generated_total, s.num_preemptions, s.prefix_queries, s.prefix_hits,
                           a.num_cached, a.num_cached_free)  # fmt: skip

    # --- one iteration -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once over every scheduled chunk, sample, detokenize.

        Failures stay with their request: if the step's forward or sampling raises, it is redone one
        sequence at a time and only the sequences that raise alone finish, with finish_reason "error"."""
        outputs, self._pending = self._pending, []
        scheduled, admitted = self.scheduler.schedule()
        if not scheduled:
            return outputs
        t0 = time.perf_counter()
        decode = all(seq.is_decoding for seq, _ in scheduled)
        scheduled, logits = self._forward(scheduled, outputs)  # logits [N, V] float32: the chunks that end their
        for seq, n in scheduled:  # sequence's known tokens
            self.scheduler.computed(seq, n)  # registers its newly full blocks in the prefix cache
        sampling = [seq for seq, n in scheduled if seq.num_computed == len(seq.ids)]
        states = [seq.generator.get_state() if seq.generator is not None else None for seq in sampling]
        try:
            tokens = self._sample(sampling, logits)
        except Exception:  # noqa: BLE001  (one request's sampling: find it, fail it alone)
            for seq, state in zip(sampling, states):  # as if the batch's sampling had not run
                if state is not None:
                    seq.generator.set_state(state)
            tokens = [self._isolated(seq, outputs, lambda i=i, seq=seq: self._sample([seq], logits[i : i + 1])[0])
                      for i, seq in enumerate(sampling)]  # fmt: skip
        for seq, row, token in zip(sampling, logits, tokens):
            out = self._isolated(seq, outputs, self._append, seq, row, token) if token is not None else None
            if out is not None:
                outputs.append(out)
        self._account(time.perf_counter() - t0, decode, scheduled, admitted, len(sampling))
        return outputs

    def _forward(self, scheduled: list[tuple[Sequence, int]], outputs: list[RequestOutput]):
        """(the scheduled pairs whose forward ran, their logits): the whole step at once, or, if that
        raises, one sequence at a time, failing those that raise alone (their error outputs go to outputs).
        Rerunning a chunk rewrites the same cache slots with the same k/v."""

        def run(pairs):
            chunks = [Chunk(seq.ids[seq.num_computed : seq.num_computed + n], seq.num_computed, seq.blocks,
                            seq.num_computed + n == len(seq.ids)) for seq, n in pairs]  # fmt: skip
            return self.runner.run(chunks, lead=self.lead)

        try:
            return scheduled, run(scheduled)
        except Exception as err:  # noqa: BLE001
            if self.model.tp is not None:  # the ranks ran (or missed) this step together: no retry can realign them
                raise distributed.describe_failure(err) from None
            if len(scheduled) == 1:
                self._fail(scheduled[0][0], err, outputs)
                return [], torch.empty(0)
        ran, rows = [], []
        for pair in scheduled:
            logits = self._isolated(pair[0], outputs, run, [pair])
            if logits is not None:
                ran.append(pair)
                rows.append(logits)
        return ran, torch.cat(rows) if rows else torch.empty(0)

    def _isolated(self, seq: Sequence, outputs: list[RequestOutput], fn, *args):
        """fn(*args); if it raises, seq finishes with finish_reason "error" (its output goes to outputs,
        its blocks back to the pool) and the result is None."""
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001
            self._fail(seq, err, outputs)
            return None

    def _fail(self, seq: Sequence, err: Exception, outputs: list[RequestOutput]) -> None:
        """Finish seq with finish_reason "error" (one log line; the traceback at debug level)."""
        log.warning("request %s failed: %s: %s", seq.request_id, type(err).__name__, err)
        log.debug("request %s failed", seq.request_id, exc_info=err)
        if self._seqs.pop(seq.request_id, None) is not None:
            self.scheduler.remove(seq)
            out = self._output(seq, "error")
            out.error = f"{type(err).__name__}: {err}"
            outputs.append(out)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """Each sequence's next token from its row of logits [N, V], with its own parameters and generator."""
        greedy = logits.argmax(dim=-1).tolist() if seqs else []
        return [g if s.params.temperature == 0 else
                int(sample(logits[i : i + 1], s.params.temperature, s.params.top_k, s.params.top_p, s.generator))
                for i, (s, g) in enumerate(zip(seqs, greedy))]  # fmt: skip

    def _append(self, seq: Sequence, logits: torch.Tensor, token: int) -> RequestOutput | None:
        """Take a sampled token; the request's output for this step (None if nothing to report)."""
        p = seq.params
        stop_ids = p.stop_token_ids if p.ignore_eos else (*self.eos_ids, *p.stop_token_ids)
        if token in stop_ids:
            return self._finish(seq, "stop")
        seq.ids.append(token)
        seq.new_ids.append(token)
        if p.logprobs is not None:
            seq.new_logprobs.append(token_logprob(logits, token, p.logprobs))
        text = seq.detokenizer.add([token]) if seq.detokenizer is not None else ""
        if seq.detokenizer is not None and seq.detokenizer.stopped:
            return self._finish(seq, "stop", text)
        if len(seq.output_ids) >= p.max_tokens or len(seq.ids) >= self.max_context:
            return self._finish(seq, "length", text)
        return self._output(seq, None, text)

    def _finish(self, seq: Sequence, reason: str, text: str = "") -> RequestOutput:
        if seq.detokenizer is not None:
            text += seq.detokenizer.finish()  # what was held back ('' after a stop string)
        del self._seqs[seq.request_id]
        self.scheduler.remove(seq)
        return self._output(seq, reason, text)

    def _output(self, seq: Sequence, reason: str | None, text: str = "") -> RequestOutput:
        out = RequestOutput(seq.request_id, text, seq.new_ids, seq.new_logprobs if seq.params.logprobs is not None
                            else None, reason is not None, reason, seq.prompt_len, len(seq.output_ids),
                            cached_tokens=seq.num_cached_tokens)  # fmt: skip
        seq.new_ids, seq.new_logprobs = [], []
        return out

    def _account(self, seconds: float, decode: bool, scheduled, admitted: list[Sequence], sampled: int) -> None:
        s = self.throughput
        prompt = sum(seq.prompt_len for seq in admitted)
        self._prompt_total += prompt
        self._generated_total += sampled
        s.prompt_tokens += prompt
        s.cached_tokens += sum(seq.num_cached_tokens for seq in admitted)
        s.new_tokens += sampled
        if admitted:
            s.batch_sizes.append(len(admitted))
        if decode:
            s.decode_s += seconds
            s.decode_steps += 1
            s.decode_tokens += sampled
            kv_tokens = sum(seq.num_computed for seq, _ in scheduled)
            s.decode_bytes += self._weight_bytes + kv_tokens * self.loaded.cache.bytes_per_token
        else:
            s.prefill_s += seconds

    # --- tensor parallel ------------------------------------------------------------------------

    def follow(self) -> None:
        """Under tensor parallel, on every rank but 0: run the forward of each step rank 0's engine
        takes, until rank 0 calls stop_followers(). Requests are added to rank 0's engine only."""
        if self.model.tp is None or distributed.is_main():
            raise RuntimeError("Engine.follow: only ranks other than 0 of a tensor-parallel model follow")
        self.runner.follow()

    def stop_followers(self) -> None:
        """Rank 0 under tensor parallel: end the other ranks' follow() (no-op otherwise)."""
        if self.lead:
            self.runner.stop_followers()

    # --- whole-sequence logits (LLM.logits) ----------------------------------------------------

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Logits [T, V] float32 of every position of one sequence, prefilled in chunks of
        prefill_chunk tokens on free blocks of the pool (given back at the end)."""
        blocks: list[int] = []
        if not self.allocator.grow(blocks, len(ids)):
            raise ValueError(f"Engine.logits: {len(ids)} tokens need {self.allocator.blocks_for(len(ids))} KV "
                             f"blocks; {self.allocator.num_free} are free")  # fmt: skip
        step = self.scheduler.prefill_chunk
        try:
            return torch.cat([self.runner.run([Chunk(ids[i : i + step], i, blocks, True)], all_logits=True)
                              for i in range(0, len(ids), step)])  # fmt: skip
        finally:
            self.allocator.free(blocks)
