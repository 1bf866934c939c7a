"""The engine: requests in, RequestOutputs out, one scheduler iteration per step() (continuous
batching with chunked prefill over the paged KV cache). LLM.generate and the HTTP server both
run on it. Synchronous: one thread calls it."""

from __future__ import annotations

import logging
import threading
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
from .sampling import (Grammar, SamplingParams, TokenLogprob, apply_bitmask, apply_logit_bias, apply_penalties, ban_tokens,
                       logprobs_of, sample)  # fmt: skip
from .scheduler import Scheduler, Sequence
from .speculative import SpecCounters, SpeculativeConfig, Speculator, make_speculator, rollback
from .structured import GrammarCompiler

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
    completion_tokens: int  # tokens generated so far, the eos / stop token that ended it included (as vLLM)
    error: str | None = None  # with finish_reason "error": what failed ("ExceptionType: message")
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token (the first None), in the
    # request's first output when it asked for prompt_logprobs
    cached_tokens: int = 0  # prompt tokens read from the prefix cache instead of computed
    # the logprob of the eos / stop token that ended the request (in its last output, when it asked for
    # logprobs): counted in completion_tokens, so completions' logprobs list it (as vLLM; lm-eval's echo
    # scoring drops the one generated token's entry, whatever it is)
    stop_logprob: TokenLogprob | None = None


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
    spec_proposed_total: int = 0  # speculative draft tokens verified
    spec_accepted_total: int = 0  # of those, accepted
    spec_verifications_total: int = 0  # (sequence, step) pairs that verified a draft
    spec_mean_accepted_length: float = 0.0  # tokens per verification (accepted drafts + 1); 0 before any


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
    spec: SpecCounters = field(default_factory=SpecCounters)  # speculative drafts proposed / accepted

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
            decodes every step). Speculative drafts count too.
        speculative: speculative decoding (engine/speculative.py), or None; a Speculator brings its
            own proposer (a draft model), a SpeculativeConfig of method "ngram" needs none.
    """

    def __init__(self, loaded: LoadedModel, *, max_num_seqs: int = 8, prefill_chunk: int | None = None,
                 max_num_batched_tokens: int | None = None,
                 speculative: SpeculativeConfig | Speculator | None = None) -> None:  # fmt: skip
        max_num_seqs = _positive_int("max_num_seqs", max_num_seqs)
        prefill_chunk = _positive_int("prefill_chunk", loaded.prefill_chunk if prefill_chunk is None else prefill_chunk)
        if max_num_batched_tokens is None:
            max_num_batched_tokens = max(prefill_chunk, max_num_seqs)
        _positive_int("max_num_batched_tokens", max_num_batched_tokens, max_num_seqs)
        if isinstance(speculative, SpeculativeConfig):
            speculative = make_speculator(speculative)
        self.speculator: Speculator | None = speculative  # None: one token per sequence per step
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer  # encode / decode / apply_chat_template (None for a random model)
        self.max_context = loaded.max_context  # tokens per sequence (prompt + output)
        self.allocator = loaded.allocator  # the block pool, shared by every engine on this model
        self.scheduler = Scheduler(self.allocator, max_num_seqs, prefill_chunk, max_num_batched_tokens)
        self.runner = ModelRunner(loaded.model, loaded.cache, max_num_seqs, loaded.max_context, loaded.cuda_graphs,
                                  speculative.config.num_tokens if speculative is not None else 0)  # fmt: skip
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
        self._grammars: GrammarCompiler | None = None  # built on the first request with a grammar
        self._grammars_lock = threading.Lock()  # compile_grammar may run on another thread

    # --- requests ------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    cache_salt: str | None = None) -> None:  # fmt: skip
        """Queue a request; ValueError (naming the field and value) before any state change.
        cache_salt: requests share cached prefix blocks only with requests of the same salt."""
        prompt = self.check_request(request_id, prompt_ids, params)
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise ValueError(f"Engine.add_request: cache_salt={cache_salt!r}; expected None or a non-empty string")
        matcher = self._grammar_compiler().matcher(params.grammar) if params.grammar is not None else None
        generator = None
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else int(torch.randint(2**62, (1,)))
            generator = torch.Generator(self.device).manual_seed(seed)
        detok = (Detokenizer(self.tokenizer, params.stop, params.skip_special_tokens,
                             params.include_stop_str_in_output, params.min_tokens)
                 if self.tokenizer is not None else None)  # fmt: skip
        chain = PrefixChain(self.allocator.root_key(cache_salt))
        seq = Sequence(request_id, prompt, params, generator, detok, chain)
        seq.matcher = matcher
        # prompt logprobs come from the chunks of the prompt: with prefix caching (branch prefix, whose
        # scheduler reads this), such a request computes its whole prompt instead of reading cached blocks
        seq.reads_prefix_cache = params.prompt_logprobs is None
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
        bad = next((t for t, _ in params.logit_bias if t >= vocab), None)
        if bad is not None:
            raise ValueError(f"Engine.add_request: logit_bias token id {bad}; expected ids in [0, {vocab})")
        return prompt

    def compile_grammar(self, grammar: Grammar) -> None:
        """Compile `grammar` into the cache that add_request reads (ValueError if it does not compile).
        Thread-safe: a server calls it on a worker thread so that the engine's thread finds it compiled."""
        self._grammar_compiler().compile(grammar)

    def _grammar_compiler(self) -> GrammarCompiler:
        with self._grammars_lock:
            if self._grammars is None:
                if self.tokenizer is None:
                    raise ValueError("Engine.add_request: a grammar needs a tokenizer; this model has none")
                self._grammars = GrammarCompiler(self.tokenizer, self.model.config.vocab_size, self.eos_ids)
            return self._grammars

    def abort(self, request_id: str) -> None:
        """Free the request's blocks now; the next step() returns its final output (finish_reason
        "abort"). Unknown or finished ids are ignored."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return
        self.scheduler.remove(seq)
        if self.speculator is not None:
            self.speculator.release(seq)
        self._pending.append(self._output(seq, "abort"))

    def has_unfinished(self) -> bool:
        return bool(self._seqs or self._pending)

    def stats(self) -> EngineStats:
        s = self.scheduler
        a = self.allocator
        spec = self.speculator.totals if self.speculator is not None else SpecCounters()
        return EngineStats(len(s.running), len(s.waiting), a.used, a.num_blocks, self._prompt_total,
                           self._generated_total, s.num_preemptions, prefix_cache_queries=s.prefix_queries,
                           prefix_cache_hits=s.prefix_hits, kv_blocks_cached=a.num_cached,
                           kv_blocks_cached_free=a.num_cached_free, spec_proposed_total=spec.proposed,
                           spec_accepted_total=spec.accepted, spec_verifications_total=spec.verifications,
                           spec_mean_accepted_length=spec.mean_accepted_length)  # fmt: skip

    # --- one iteration -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once over every scheduled chunk (and speculative draft), sample or verify,
        detokenize.

        Failures stay with their request: if the step's forward or sampling raises, it is redone one
        sequence at a time and only the sequences that raise alone finish, with finish_reason "error"."""
        outputs, self._pending = self._pending, []
        t0 = time.perf_counter()
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running, self.max_context)  # seq.draft of decoding sequences
        scheduled, admitted = self.scheduler.schedule()  # a draft that does not fit is dropped there
        if not scheduled:
            return outputs
        decode = all(seq.is_decoding for seq, _ in scheduled)
        # logits [R, V] float32: the last 1 + len(draft) rows of the chunks that end their sequence's known
        # tokens, every row of those that collect prompt logprobs (see _chunk)
        scheduled, logits = self._forward(scheduled, outputs)
        sampling, starts, r = [], [], 0  # the sequences that sample or verify, the first of their rows
        for seq, n in scheduled:
            chunk = self._chunk(seq, n)
            self.scheduler.computed(seq, n - chunk.spec)  # registers its newly full blocks in the prefix cache
            if chunk.all_logits:
                self._add_prompt_logprobs(seq, chunk.start, logits[r : r + n])
                r += n
            elif chunk.logits:
                r += 1 + chunk.spec
            if chunk.logits:
                sampling.append(seq)
                starts.append(r - 1 - chunk.spec)
        plain = [i for i, seq in enumerate(sampling) if not seq.draft]
        picks: list = [None] * len(sampling)  # ([tokens], [logprobs]) per sequence; None: it failed
        if plain:
            seqs, last = [sampling[i] for i in plain], logits[[starts[i] for i in plain]]
            states = [seq.generator.get_state() if seq.generator is not None else None for seq in seqs]
            try:
                one = list(zip(*self._sample(seqs, last)))  # (token, logprob) per sequence
            except Exception:  # noqa: BLE001  (one request's sampling: find it, fail it alone)
                for seq, state in zip(seqs, states):  # as if the batch's sampling had not run
                    if state is not None:
                        seq.generator.set_state(state)
                one = [self._isolated(seq, outputs, lambda j=j, seq=seq: next(zip(*self._sample([seq], last[j : j + 1]))))
                       for j, seq in enumerate(seqs)]  # fmt: skip
            for i, pick in zip(plain, one):
                picks[i] = None if pick is None else ([pick[0]], [pick[1]])
        for i, seq in enumerate(sampling):
            if seq.draft:  # its rows score [last token, draft...]: verify, then drop the rejected tokens' slots
                rows = logits[starts[i] : starts[i] + 1 + len(seq.draft)]
                picks[i] = self._isolated(seq, outputs, self._verify, seq, rows)
                if picks[i] is not None:
                    rollback(seq, len(picks[i][0]) - 1, self.allocator)
        produced = 0
        for seq, pick in zip(sampling, picks):
            result = self._isolated(seq, outputs, self._append, seq, *pick) if pick is not None else None
            if result is not None:
                out, taken = result
                produced += taken
                if out is not None:
                    outputs.append(out)
        self._account(time.perf_counter() - t0, decode, scheduled, admitted, produced)
        return outputs

    def _forward(self, scheduled: list[tuple[Sequence, int]], outputs: list[RequestOutput]):
        """(the scheduled pairs whose forward ran, their logits): the whole step at once, or, if that
        raises, one sequence at a time, failing those that raise alone (their error outputs go to outputs).
        Rerunning a chunk rewrites the same cache slots with the same k/v."""

        def run(pairs):
            return self.runner.run([self._chunk(seq, n) for seq, n in pairs], lead=self.lead)

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

    @staticmethod
    def _chunk(seq: Sequence, n: int) -> Chunk:
        """The next n tokens of seq (before num_computed advances; a speculative draft comes last): logits
        of its last token (and of the draft's positions) when they end its known tokens, of every token
        while it collects prompt logprobs."""
        start, end = seq.num_computed, seq.num_computed + n - len(seq.draft)  # the draft follows ids[:end]
        collecting = seq.prompt_logprobs is not None and len(seq.prompt_logprobs) < seq.prompt_len
        return Chunk(seq.ids[start:end] + seq.draft, start, seq.blocks, end == len(seq.ids),
                     collecting and start < seq.prompt_len, len(seq.draft))  # fmt: skip

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

    def _stop_ids(self, seq: Sequence) -> tuple[int, ...]:
        p = seq.params
        return p.stop_token_ids if p.ignore_eos else (*self.eos_ids, *p.stop_token_ids)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[int], list[TokenLogprob | None]]:
        """Each sequence's next token from its row of logits [N, V] (penalties, logit_bias, min_tokens and
        grammar applied to the whole batch as tensor ops, then each row's own temperature / top-k / top-p /
        min-p and generator), -1 where the grammar allows no token; and its logprob (None unless asked)."""
        if not seqs:
            return [], []
        params = [s.params for s in seqs]
        short = [self._stop_ids(s) if len(s.output_ids) < s.params.min_tokens else () for s in seqs]
        constrained = [i for i, s in enumerate(seqs) if s.matcher is not None]
        processed = logits
        if constrained or any(short) or any(p.penalized or p.logit_bias for p in params):
            processed = logits.clone()
            apply_penalties(processed, params, [s.ids[: s.prompt_len] for s in seqs], [s.output_ids for s in seqs])
            apply_logit_bias(processed, params)
            ban_tokens(processed, short)
            if constrained:
                bitmask = self._grammars.fill_bitmask([seqs[i].matcher for i in constrained])
                apply_bitmask(processed, constrained, bitmask)
        dead = (~torch.isfinite(processed.max(dim=-1).values)).nonzero()[:, 0].tolist()
        if dead:  # no token allowed (a grammar in an error state): sample anything, then report -1
            processed = processed.clone()
            processed[dead] = 0.0
        tokens = sample(processed, params, [s.generator for s in seqs])
        for i in dead:
            tokens[i] = -1
        asked = [i for i, p in enumerate(params) if p.logprobs is not None and tokens[i] >= 0]
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        if asked:
            for i, lp in zip(asked, logprobs_of(logits[asked], [tokens[i] for i in asked],
                                                [params[i].logprobs for i in asked])):  # fmt: skip
                logprobs[i] = lp
        return tokens, logprobs

    def _verify(self, seq: Sequence, rows: torch.Tensor) -> tuple[list[int], list[TokenLogprob | None]]:
        """A speculative draft's verification (rows [1 + len(draft), V]): its tokens and their logprobs."""
        tokens = self.speculator.verify(seq, rows, self.throughput.spec)
        k = seq.params.logprobs
        return tokens, (logprobs_of(rows[: len(tokens)], tokens, [k] * len(tokens)) if k is not None
                        else [None] * len(tokens))  # fmt: skip

    def _add_prompt_logprobs(self, seq: Sequence, start: int, logits: torch.Tensor) -> None:
        """Logprobs of the prompt tokens that the rows of one chunk (logits [n, V], positions start..)
        predict and that the sequence has not collected yet (a recomputed prefill collects nothing twice)."""
        first = len(seq.prompt_logprobs) - start - 1  # the row that predicts the next uncollected token
        last = min(len(logits), seq.prompt_len - start - 1)  # rows up to the one predicting the last prompt token
        if first < 0 or first >= last:  # (first < 0: tokens before the chunk were never computed here)
            return
        targets = seq.ids[start + first + 1 : start + last + 1]
        seq.prompt_logprobs += logprobs_of(logits[first:last], targets, [seq.params.prompt_logprobs] * len(targets))

    def _append(self, seq: Sequence, tokens: list[int],
                logprobs: list[TokenLogprob | None]) -> tuple[RequestOutput | None, int]:  # fmt: skip
        """Take a step's new tokens in order (one sampled, or a verification's) until one finishes the
        request: (its output for this step, or None if nothing to report; the tokens taken, the stop token
        included). Stop ids and strings, max_tokens and logprobs see exactly these tokens."""
        p = seq.params
        text = ""
        for i, (token, logprob) in enumerate(zip(tokens, logprobs)):
            if token < 0:
                return self._finish(seq, "stop", text), i
            if token in self._stop_ids(seq):
                seq.stop_token, seq.stop_logprob = token, logprob
                return self._finish(seq, "stop", text), i + 1
            seq.ids.append(token)
            seq.new_ids.append(token)
            if logprob is not None:
                seq.new_logprobs.append(logprob)
            text += seq.detokenizer.add([token]) if seq.detokenizer is not None else ""
            if seq.matcher is not None:
                seq.matcher.consume_token(token)
                if seq.matcher.is_stopped():  # the grammar is complete: only eos could follow
                    return self._finish(seq, "stop", text), i + 1
            if seq.detokenizer is not None and seq.detokenizer.stopped:
                return self._finish(seq, "stop", text), i + 1
            if len(seq.output_ids) >= p.max_tokens or len(seq.ids) >= self.max_context:
                return self._finish(seq, "length", text), i + 1
        return self._output(seq, None, text), len(tokens)

    def _finish(self, seq: Sequence, reason: str, text: str = "") -> RequestOutput:
        if seq.detokenizer is not None:
            text += seq.detokenizer.finish()  # what was held back ('' after a stop string)
        del self._seqs[seq.request_id]
        self.scheduler.remove(seq)
        if self.speculator is not None:
            self.speculator.release(seq)
        return self._output(seq, reason, text)

    def _output(self, seq: Sequence, reason: str | None, text: str = "") -> RequestOutput:
        prompt_logprobs = None
        if seq.params.prompt_logprobs is not None and seq.prompt_logprobs is not None:
            prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None  # reported once
        completion = len(seq.output_ids) + (seq.stop_token is not None)
        out = RequestOutput(seq.request_id, text, seq.new_ids, seq.new_logprobs if seq.params.logprobs is not None
                            else None, reason is not None, reason, seq.prompt_len, completion,
                            prompt_logprobs=prompt_logprobs, cached_tokens=seq.num_cached_tokens,
                            stop_logprob=seq.stop_logprob if seq.params.logprobs is not None else None)  # fmt: skip
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
        self.runner.follow(self.speculator.proposer.runners if self.speculator is not None else None)

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
