"""Speculative decoding in the engine (llama_kernels.engine.speculative): the n-gram proposer, greedy
outputs token-identical to non-speculative decoding (k = 1, 3, 5, batched beside prefill chunks, with
preemption, an FP8 KV cache, across block boundaries, at the context limit), exact rejection sampling
(the joint distribution of 20,000 sampled tokens against the target's, and a verifier that accepts every
draft must fail the same test), and rollback leaving the block pool exact."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from conftest import assert_rel_close
from conftest import needs_smollm2 as smollm2
from conftest import output_tokens as tokens
from conftest import run_engine

from llama_kernels.engine import Engine, SamplingParams
from llama_kernels.engine import speculative
from llama_kernels.engine.block_allocator import BlockAllocator, PrefixChain
from llama_kernels.engine.runner import Chunk
from llama_kernels.engine.scheduler import Sequence
from llama_kernels.engine.speculative import Draft, NgramProposer, SpeculativeConfig, make_speculator, rollback
from llama_kernels.llm import LLM
from llama_kernels.model import LlamaConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, max_position_embeddings=256)  # fmt: skip
# prompts of several lengths around the 16-token blocks; repetitive ones give the n-gram proposer matches
REPEATING = [[5, 6, 7, 8] * 4, [9, 10, 11] * 5, [12, 13] * 15]
PROMPTS = REPEATING + [[(7 * i + 3 * j) % 250 + 3 for j in range(n)] for i, n in enumerate([5, 40, 17, 70, 1, 33])]
GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    """A tiny random fp32 Llama with a pool of 4 x 128 tokens (32 blocks of 16)."""
    return LLM.from_config(CONFIG, device="cpu", max_context=128, max_batch=4, seed=3)


DRAFT_CONFIG = dataclasses.replace(CONFIG, num_layers=1, hidden_size=32, intermediate_size=64, head_dim=8)


@pytest.fixture(scope="module")
def drafted():
    """The same model as `llm` (seed 3) with a smaller random draft model (seed 7) on its own cache."""
    draft = LLM.from_config(DRAFT_CONFIG, device="cpu", max_context=128, max_batch=4, seed=7)
    return LLM.from_config(CONFIG, device="cpu", max_context=128, max_batch=4, seed=3, speculative="draft",
                           num_speculative_tokens=3, draft_model=draft)  # fmt: skip


class Recorder:
    """Wraps an engine's runner: records each step's chunks; after each step, checks the block pool."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.steps = engine, []
        run = engine.runner.run
        engine.runner.run = lambda chunks, **kw: self.steps.append(list(chunks)) or run(chunks, **kw)

    def check_pool(self) -> None:
        """Every block's reference count is the number of running sequences holding it (prefix caching
        shares blocks), the pool's used / free / cached-free blocks add up, and every running sequence
        holds exactly the blocks of its cached tokens (+ the next one's)."""
        e = self.engine
        a = e.allocator
        held = [b for s in e.scheduler.running for b in s.blocks]
        assert all(a.ref_count(b) == held.count(b) for b in set(held)) and a.used == len(set(held))
        assert sorted({*held} | {*a._free} | {*a._lru}) == list(range(a.num_blocks))
        assert len(set(held)) + a.num_free == a.num_blocks
        for s in e.scheduler.running:
            if s.is_decoding:
                assert not s.draft and len(s.blocks) in (a.blocks_for(s.num_computed + 1),
                                                          a.blocks_for(s.num_computed)), (s.request_id, len(s.blocks))


def run(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]], recorder: Recorder | None = None):
    """Add every request, step until done (checking the pool after each step with a recorder); {id: the
    RequestOutputs it got}."""
    return run_engine(engine, requests, recorder.check_pool if recorder is not None else None)


def spec(k: int, **kw) -> SpeculativeConfig:
    return SpeculativeConfig(num_tokens=k, max_verify_tokens=1 << 20, **kw)


def test_ngram_proposer_takes_the_latest_longest_match():
    p = NgramProposer(ngram_max=3, ngram_min=2)
    assert p.lookup([1, 2, 3, 4, 1, 2, 3, 5, 9, 2, 3], 3) == [5, 9, 2], "latest match of the last 2..3 tokens"
    assert p.lookup([7, 1, 2, 3, 8, 0, 2, 3, 9, 1, 2, 3], 2) == [8, 0], "the 3-token match wins over a later 2-token"
    assert p.lookup([1, 2, 3, 4, 5], 3) == [] and p.lookup([1, 2], 3) == []
    assert p.lookup([4, 5, 6, 4, 5], 5) == [6, 4, 5], "the continuation may run into the suffix itself"
    assert p.lookup([4, 5, 6, 4, 5], 0) == []


def test_ngram_index_grows_with_the_sequence():
    """The incremental index (one per request) proposes what a brute-force search of the whole sequence does."""
    from llama_kernels.engine.speculative import NgramIndex

    def brute(ids, k):
        for n in range(3, 0, -1):
            starts = [i for i in range(len(ids) - n) if ids[i : i + n] == ids[len(ids) - n :]]
            if len(ids) > n and starts:
                return ids[starts[-1] + n : starts[-1] + n + k]
        return []

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, (300,), generator=g).tolist()
    index, n = NgramIndex(3, 1), 1
    while n < len(ids):
        assert index.lookup(ids[:n], 4) == brute(ids[:n], 4), n
        n += int(torch.randint(1, 5, (1,), generator=g))


@pytest.mark.parametrize("method", ["ngram", "draft"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_is_token_identical_batched_beside_prefills(llm, drafted, method, k):
    """9 requests through 4 places: verify chunks share steps with prefill chunks and plain decodes
    (a request whose draft runs out), some cross block boundaries; a sampled request rides along.
    The draft model (a different random model) is rarely right: rejections at every position."""
    requests = {str(i): (p, dataclasses.replace(GREEDY, max_tokens=20 + 3 * i)) for i, p in enumerate(PROMPTS)}
    requests["sampled"] = (PROMPTS[2], SamplingParams(max_tokens=30, temperature=0.8, seed=5, ignore_eos=True))
    ref = run(Engine(llm.loaded, max_num_seqs=4, prefill_chunk=24), requests)
    if method == "ngram":
        engine = Engine(llm.loaded, max_num_seqs=4, prefill_chunk=24, speculative=spec(k, ngram_min=1))
    else:
        proposer = drafted.new_speculator().proposer
        engine = Engine(drafted.loaded, max_num_seqs=4, prefill_chunk=24,
                        speculative=make_speculator(spec(k, method="draft"), proposer))  # fmt: skip
    rec = Recorder(engine)
    outs = run(engine, requests, rec)
    for rid in requests:
        if rid != "sampled":
            assert tokens(outs[rid]) == tokens(ref[rid]), rid
        assert [o.finish_reason for o in outs[rid]][-1] == "length"
    s = engine.stats()
    assert 0 < s.spec_accepted_total < s.spec_proposed_total, "some drafts accepted, some rejected"
    verifications = s.spec_verifications_total
    assert s.spec_mean_accepted_length == (s.spec_accepted_total + verifications) / verifications
    verify = [c for step in rec.steps for c in step if c.spec]
    assert max(c.spec for c in verify) == k
    assert any(any(c.spec for c in st) and any(len(c.tokens) > 1 and not c.spec for c in st) for st in rec.steps), \
        "a step with a verify chunk beside a prefill chunk"
    assert any(c.start // 16 != (c.start + len(c.tokens) - 1) // 16 for c in verify), "a verification across blocks"
    assert s.generation_tokens_total == sum(len(tokens(o)) for o in outs.values())
    if method == "draft":
        assert drafted.draft.allocator.used == 0, "the draft pool is given back as requests end"


def test_greedy_with_preemption(llm):
    """12 requests of up to 100 tokens on a 32-block pool: later ones are preempted and recomputed;
    drafts never preempt (a draft that does not fit is dropped)."""
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    requests = {str(i): (PROMPTS[i % 9] + [i + 3, 4] * (i * 2), params) for i in range(12)}
    ref = run(Engine(llm.loaded, max_num_seqs=8, prefill_chunk=64), requests)
    engine = Engine(llm.loaded, max_num_seqs=8, prefill_chunk=64, speculative=spec(3))
    outs = run(engine, requests, Recorder(engine))
    assert engine.stats().num_preemptions > 0 and engine.stats().spec_accepted_total > 0
    assert {r: tokens(o) for r, o in outs.items()} == {r: tokens(o) for r, o in ref.items()}


def test_greedy_with_an_fp8_kv_cache():
    llm = LLM.from_config(CONFIG, device="cpu", max_context=128, max_batch=4, seed=3, kv_cache_dtype="fp8")
    requests = {str(i): (p, GREEDY) for i, p in enumerate(PROMPTS[:5])}
    ref = run(Engine(llm.loaded, max_num_seqs=4), requests)
    engine = Engine(llm.loaded, max_num_seqs=4, speculative=spec(5))
    outs = run(engine, requests)
    assert engine.stats().spec_accepted_total > 0
    assert {r: tokens(o) for r, o in outs.items()} == {r: tokens(o) for r, o in ref.items()}


def test_greedy_at_the_context_limit_and_stops(llm):
    """Prompt + max_tokens = max_context: drafts shrink at the end; a stop id inside an accepted draft
    ends the output there; logprobs are those of the accepted tokens."""
    prompt = REPEATING[2] + [12, 13] * 34  # 98 tokens: 30 new ones reach max_context = 128
    full = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, logprobs=2)
    ref = run(Engine(llm.loaded), {"a": (prompt, full)})["a"]
    engine = Engine(llm.loaded, speculative=spec(5))
    outs = run(engine, {"a": (prompt, full)})["a"]
    assert tokens(outs) == tokens(ref) and len(tokens(outs)) == 30 and outs[-1].finish_reason == "length"
    assert engine.stats().spec_accepted_total > 0
    for got, want in zip((lp for o in outs for lp in o.new_logprobs), (lp for o in ref for lp in o.new_logprobs)):
        assert got.token_id == want.token_id and math.isclose(got.logprob, want.logprob, abs_tol=1e-4)
        assert [t for t, _ in got.top] == [t for t, _ in want.top]
    free = tokens(ref)
    stop = dataclasses.replace(full, stop_token_ids=(free[20],), logprobs=None)
    outs = run(Engine(llm.loaded, speculative=spec(5)), {"a": (prompt, stop)})["a"]
    assert tokens(outs) == free[: free.index(free[20])] and outs[-1].finish_reason == "stop"
    outs = run(Engine(llm.loaded, speculative=spec(5)), {"a": (prompt, dataclasses.replace(stop, max_tokens=7))})["a"]
    assert tokens(outs) == free[:7] and outs[-1].completion_tokens == 7, "max_tokens cuts an accepted draft"


def test_greedy_with_prefix_caching(llm):
    """Requests sharing a prompt share its cached blocks; speculation beside them keeps the tokens, and
    the blocks a rollback frees are never shared ones."""
    prompt = REPEATING[2] + [40, 41, 42] * 4  # 42 tokens: 2 full blocks to share
    requests = {str(i): (prompt + [i + 50], dataclasses.replace(GREEDY, max_tokens=30 + i)) for i in range(4)}
    ref = run(Engine(llm.loaded, max_num_seqs=4), requests)
    engine = Engine(llm.loaded, max_num_seqs=4, speculative=spec(3, ngram_min=1))
    outs = run(engine, requests, Recorder(engine))
    s = engine.stats()
    assert s.prefix_cache_hits > 0 and s.spec_accepted_total > 0
    assert {r: tokens(o) for r, o in outs.items()} == {r: tokens(o) for r, o in ref.items()}


def test_requests_with_position_dependent_processing_are_not_speculated(llm):
    """Penalties, logit_bias, pending min_tokens: their logits processing depends on the tokens before each
    position, so they decode one token a step (same tokens as without speculation); min_tokens only until
    it is reached."""
    engine = Engine(llm.loaded, speculative=spec(3, ngram_min=1))
    for kw in ({"repetition_penalty": 1.3}, {"presence_penalty": 0.5}, {"logit_bias": ((7, 2.0),)}):
        params = dataclasses.replace(GREEDY, **kw)
        ref = tokens(run(Engine(llm.loaded), {"a": (REPEATING[0], params)})["a"])
        assert tokens(run(engine, {"a": (REPEATING[0], params)})["a"]) == ref, kw
        assert engine.stats().spec_verifications_total == 0, kw
    rec = Recorder(engine)
    run(engine, {"m": (REPEATING[0], dataclasses.replace(GREEDY, min_tokens=10))}, rec)
    verified = [c.start - len(REPEATING[0]) + 1 for st in rec.steps for c in st if c.spec]  # outputs so far
    assert verified and min(verified) >= 10


def test_rollback_gives_back_emptied_blocks():
    a = BlockAllocator(8, 16)
    seq = Sequence("x", list(range(30)), GREEDY, None, None, PrefixChain(a.root_key(None)))
    assert a.grow(seq.blocks, 30)
    seq.num_computed = 29
    seq.draft = [1, 2, 3, 4, 5]
    assert a.grow(seq.blocks, 35) and len(seq.blocks) == 3  # the verify pass writes positions 29 .. 34
    rollback(seq, 1, a)  # one draft token accepted: positions 0 .. 30 cached
    assert seq.num_computed == 31 and len(seq.blocks) == 2 and a.used == 2 and seq.draft == []
    rollback(seq, 0, a)
    assert seq.num_computed == 30 and len(seq.blocks) == 2 and a.used == 2


def test_speculation_turns_off_for_large_steps(llm):
    """max_verify_tokens: 4 decoding sequences x (k + 1 = 4) tokens = 16 > 12: no drafts while all 4 run."""
    requests = {str(i): (p, GREEDY) for i, p in enumerate(REPEATING)}
    requests["long"] = (PROMPTS[4], dataclasses.replace(GREEDY, max_tokens=60))
    engine = Engine(llm.loaded, max_num_seqs=4, speculative=SpeculativeConfig(num_tokens=3, max_verify_tokens=12))
    rec = Recorder(engine)
    run(engine, requests)
    decode_steps = [st for st in rec.steps if all(c.start > 0 for c in st)]
    assert all(not any(c.spec for c in st) for st in decode_steps if len(st) == 4)
    assert any(any(c.spec for c in st) for st in decode_steps if len(st) <= 3)


def test_bad_speculative_settings():
    with pytest.raises(ValueError, match="speculative: num_tokens=0; expected an int >= 1"):
        make_speculator(SpeculativeConfig(num_tokens=0))
    with pytest.raises(ValueError, match="speculative: method='medusa'"):
        make_speculator(SpeculativeConfig(method="medusa"))
    with pytest.raises(ValueError, match="num_speculative_tokens=0; expected an int >= 1"):
        LLM.from_config(CONFIG, device="cpu", max_context=32, max_batch=1, speculative="ngram",
                        num_speculative_tokens=0)  # fmt: skip
    with pytest.raises(ValueError, match="speculative='eagle'; expected None, 'ngram' or 'draft'"):
        LLM.from_config(CONFIG, device="cpu", max_context=32, max_batch=1, speculative="eagle")
    with pytest.raises(ValueError, match="speculative='draft' with draft_model=None; 'draft' needs a draft_model"):
        LLM.from_config(CONFIG, device="cpu", max_context=32, max_batch=1, speculative="draft")
    other = LLM.from_config(dataclasses.replace(CONFIG, vocab_size=100), device="cpu", max_context=32, max_batch=1)
    with pytest.raises(ValueError, match="vocabulary of 100 tokens, the model 256; a draft model needs the same"):
        LLM.from_config(CONFIG, device="cpu", max_context=32, max_batch=1, speculative="draft", draft_model=other)


# --- exact rejection sampling ---------------------------------------------------------------------------

TINY = LlamaConfig(vocab_size=4, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                   head_dim=8, max_position_embeddings=32)  # fmt: skip
SAMPLE_PROMPT = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]  # the n-gram proposer finds a match at once
NEW, REQUESTS = 4, 5000  # 20,000 sampled tokens


def accept_every_draft(rows, draft, params, generator):
    """A broken verifier: keeps every draft token, then samples one from the last row."""
    p = speculative.sampling_probs(rows[-1:], params)
    return draft.tokens + [int(torch.multinomial(p[0], 1, generator=generator))]


def chi2_bound(df: int, z: float = 3.09) -> float:
    """The 0.999 quantile of chi-square(df) (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("method,verifier", [("ngram", "exact"), ("draft", "exact"), ("ngram", "accept_every_draft")])
def test_sampled_tokens_keep_the_target_distribution(monkeypatch, method, verifier):
    """5,000 requests x 4 tokens at temperature 1 (each seeded) from a 4-token-vocabulary random model,
    with speculation (k = 3; n-gram, or a draft model of other random weights that samples its drafts,
    so q is a full distribution): the joint distribution of the 4 tokens (256 outcomes, pooled below an
    expected count of 5) against the target's exact one (products of its conditionals, computed from its
    logits). Exact verification stays under the 0.999 chi-square bound; a verifier that accepts every
    draft token must exceed it."""
    if verifier == "accept_every_draft":
        monkeypatch.setattr(speculative, "verify", accept_every_draft)
    draft = LLM.from_config(TINY, device="cpu", max_context=16, max_batch=256, seed=2) if method == "draft" else None
    llm = LLM.from_config(TINY, device="cpu", max_context=16, max_batch=256, seed=1, draft_model=draft,
                          speculative="draft" if draft else None)  # fmt: skip
    # the target: p(x1 .. x4) = prod p(x_i | prompt, x_<i), from the logits of every 3-token continuation
    logp = {}
    for prefix in itertools.product(range(4), repeat=NEW - 1):
        rows = llm.logits(SAMPLE_PROMPT + list(prefix))[len(SAMPLE_PROMPT) - 1 :].log_softmax(-1).double()
        for x in range(4):
            seq = (*prefix, x)
            logp[seq] = sum(float(rows[i, seq[i]]) for i in range(NEW))
    config = spec(3, ngram_min=1, method=method)
    proposer = llm.new_speculator().proposer if draft else None
    engine = Engine(llm.loaded, max_num_seqs=256, max_num_batched_tokens=4096,
                    speculative=make_speculator(config, proposer))  # fmt: skip
    params = SamplingParams(max_tokens=NEW, temperature=1.0, ignore_eos=True)
    requests = {str(i): (SAMPLE_PROMPT, dataclasses.replace(params, seed=i)) for i in range(REQUESTS)}
    counts = dict.fromkeys(logp, 0)
    for outs in run(engine, requests).values():
        counts[tuple(tokens(outs))] += 1
    s = engine.stats()
    assert s.spec_verifications_total >= REQUESTS and s.spec_accepted_total > 0, "speculation ran"
    expected = {x: REQUESTS * math.exp(lp) for x, lp in logp.items()}
    big = [x for x in expected if expected[x] >= 5]
    rest_e = sum(expected[x] for x in expected if expected[x] < 5)
    rest_o = sum(counts[x] for x in expected if expected[x] < 5)
    chi2 = sum((counts[x] - expected[x]) ** 2 / expected[x] for x in big) + (rest_o - rest_e) ** 2 / rest_e
    bound = chi2_bound(len(big))  # len(big) + 1 cells, one constraint
    if verifier == "exact":
        assert chi2 < bound, f"chi-square {chi2:.1f} over {len(big) + 1} cells >= {bound:.1f}"
    else:
        assert chi2 > bound, f"a verifier that accepts every draft passed: chi-square {chi2:.1f} < {bound:.1f}"


def test_rejection_sampling_with_a_draft_distribution():
    """verify() with a proposal distribution q (as a draft model gives): over many draws the first token
    follows p exactly, though the drafts come from a very different q."""
    g = torch.Generator().manual_seed(0)
    p_logits = torch.tensor([[2.0, 0.5, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    p = p_logits.softmax(-1)[0]
    q = torch.tensor([0.05, 0.15, 0.5, 0.3])
    params = SamplingParams(temperature=1.0)
    n, counts = 5000, torch.zeros(4)
    drafts = torch.multinomial(q, n, replacement=True, generator=g).tolist()
    for d in drafts:
        counts[speculative.verify(p_logits, Draft([d], q[None]), params, g)[0]] += 1
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < chi2_bound(3)


@smollm2
def test_the_draft_prefills_in_chunks(llm, drafted, monkeypatch):
    """The draft model catches up with new prompts in passes of at most its prefill_chunk tokens (the memory
    planner's activation bound), several sequences per pass; greedy output unchanged."""
    from llama_kernels.engine.speculative import DraftModelProposer

    d = drafted.draft
    passes, forward = [], d.engine.runner.run
    monkeypatch.setattr(d.engine.runner, "run",
                        lambda chunks, **kw: passes.append([len(c.tokens) for c in chunks]) or forward(chunks, **kw))
    proposer = DraftModelProposer(d.engine.runner, d.allocator, d.max_context, prefill_chunk=24)
    requests = {str(i): (p, GREEDY) for i, p in enumerate(PROMPTS[:5])}
    ref = run(Engine(llm.loaded, max_num_seqs=4), requests)
    engine = Engine(drafted.loaded, max_num_seqs=4, speculative=make_speculator(spec(3, method="draft"), proposer))
    outs = run(engine, requests)
    assert {r: tokens(o) for r, o in outs.items()} == {r: tokens(o) for r, o in ref.items()}
    assert max(map(sum, passes)) == 24 and any(sum(p) == 24 and len(p) > 1 for p in passes)
    assert engine.stats().spec_proposed_total > 0 and d.allocator.used == 0


def test_smollm2_greedy_identical_on_a_quoting_prompt():
    """n-gram, and SmolLM2 as its own draft model (the same weights, its own cache): the greedy tokens of
    plain decoding; the self-draft is accepted (nearly) always."""
    llm = LLM.from_pretrained(None, max_context=512, max_batch=1, progress=False)
    text = ("Repeat this sentence exactly: The quick brown fox jumps over the lazy dog near the river bank, "
            "and then the dog chases the fox back across the old wooden bridge.")  # fmt: skip
    ids = llm.encode_prompt(text, chat=True)
    params = SamplingParams(max_tokens=48, temperature=0)
    ref = tokens(run(Engine(llm.loaded, max_num_seqs=1), {"a": (ids, params)})["a"])
    engine = Engine(llm.loaded, max_num_seqs=1, speculative=SpeculativeConfig(num_tokens=4))
    assert tokens(run(engine, {"a": (ids, params)})["a"]) == ref
    s = engine.stats()
    assert s.spec_accepted_total / s.spec_proposed_total > 0.3, "the quoted sentence is proposed and accepted"
    target = LLM._build(llm.model, llm.tokenizer, llm.cache.dtype, llm.max_context, 1, False, llm.prefill_chunk,
                        speculative=SpeculativeConfig("draft", 4), draft=llm)  # fmt: skip
    assert tokens(run(target.engine, {"a": (ids, params)})["a"]) == ref
    s = target.engine.stats()
    assert s.spec_accepted_total >= 0.95 * s.spec_proposed_total and llm.allocator.used == 0


def test_counters_reach_metrics_and_the_cli_line(llm, capsys):
    from llama_kernels import cli
    from llama_kernels.server.metrics import Metrics, parse

    engine = Engine(llm.loaded, speculative=spec(3))
    run(engine, {"a": (REPEATING[0], GREEDY)})
    s = engine.stats()
    m = Metrics()
    m.set_gauges(s)
    values = parse(m.render())
    assert values["llama_kernels_spec_decode_num_draft_tokens_total"] == s.spec_proposed_total > 0
    assert values["llama_kernels_spec_decode_num_accepted_tokens_total"] == s.spec_accepted_total > 0
    assert values["llama_kernels_spec_decode_num_verifications_total"] == s.spec_verifications_total > 0
    assert values["llama_kernels_spec_decode_mean_accepted_length"] == pytest.approx(s.spec_mean_accepted_length)
    c = engine.throughput.spec
    assert (c.proposed, c.accepted, c.verifications) == (s.spec_proposed_total, s.spec_accepted_total,
                                                         s.spec_verifications_total)  # fmt: skip
    cli._print_stats(engine.throughput)
    rate = round(100 * s.spec_accepted_total / s.spec_proposed_total)
    assert f"speculative acceptance {rate}% ({s.spec_accepted_total}/{s.spec_proposed_total}" in capsys.readouterr().err


TP_PROMPTS = [[5, 6, 7, 8] * 3, [9, 1, 100, 9, 1], list(range(30, 50)) * 2]


def tp_spec_tokens(path, draft, tp: int) -> dict[str, tuple[dict[str, list[int]], int, int]]:
    """{proposer: ({id: greedy tokens}, draft tokens proposed, accepted)} of 3 requests with speculation
    (k = 3) by n-gram and by the draft model `draft`, on this rank of tp (rank 0 schedules, proposes and
    verifies; the other ranks follow, running the target's and the draft's passes, and return nothing)."""
    llm = LLM.from_pretrained(path, max_context=64, max_batch=3, progress=False, tp=tp, speculative="draft",
                              num_speculative_tokens=3, draft_model=draft)  # fmt: skip
    assert (llm.draft.model.tp is not None) == (tp > 1)  # the draft is sharded too
    out = {}
    speculators = {"ngram": SpeculativeConfig(num_tokens=3, ngram_min=1), "draft": llm.new_speculator()}
    for name, speculator in speculators.items():
        engine = Engine(llm.loaded, max_num_seqs=3, speculative=speculator)
        if llm.model.tp is not None and torch.distributed.get_rank() != 0:
            engine.follow()
            continue
        params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
        outs = run(engine, {str(i): (p, params) for i, p in enumerate(TP_PROMPTS)})
        engine.stop_followers()
        s = engine.stats()
        out[name] = {rid: tokens(o) for rid, o in outs.items()}, s.spec_proposed_total, s.spec_accepted_total
    return out


def _tp_worker(rank: int, port: int, path, draft, out) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.save(tp_spec_tokens(path, draft, 2), f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_tensor_parallel_speculation_matches_one_process(tmp_path):
    """TP=2 over gloo, n-gram and a draft model (a random 1-layer Llama sharing the target's embedding, lm_head
    and first layer, sharded over the same 2 ranks; 3 query heads and 1 KV head per rank): the other rank
    runs rank 0's verify and draft passes; the tokens, drafts proposed and accepted equal one process's, and
    the tokens plain decoding's."""
    import socket

    from test_tensor_parallel import write_model

    path = write_model(tmp_path / "model", 6, 2, False)  # untied: its greedy tokens do not just repeat
    draft = write_model(tmp_path / "draft", 6, 2, False, layers=1)
    ref = tp_spec_tokens(path, draft, 1)
    plain = LLM.from_pretrained(path, max_context=64, max_batch=3, progress=False)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    want = {r: tokens(o) for r, o in run(Engine(plain.loaded, max_num_seqs=3),
                                         {str(i): (p, params) for i, p in enumerate(TP_PROMPTS)}).items()}  # fmt: skip
    for name, (got, proposed, accepted) in ref.items():
        assert got == want and proposed > accepted > 0, (name, proposed, accepted)  # some rejected
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_tp_worker, args=(port, path, draft, tmp_path / "tp.pt"), nprocs=2)
    assert torch.load(tmp_path / "tp.pt.0") == ref


def test_a_draft_model_that_tp_cannot_split_is_refused_before_loading(tmp_path, monkeypatch):
    """--tp 2 with a draft of 3 heads (or an LLM loaded without tp): one line naming the draft and tp, before
    any process group or weight load."""
    from test_tensor_parallel import write_model

    import llama_kernels.llm as llm_module

    path = write_model(tmp_path / "model", 6, 6, True)
    draft = write_model(tmp_path / "draft", 3, 3, True, layers=1)
    one = LLM.from_pretrained(draft, max_context=16, max_batch=1, progress=False)
    monkeypatch.setattr(llm_module, "load_model", lambda *a, **k: pytest.fail("loaded weights"))
    monkeypatch.setattr(llm_module.distributed, "init", lambda *a, **k: pytest.fail("joined a process group"))
    with pytest.raises(ValueError, match=rf"draft_model={draft} cannot be split by tp=2 \(3 query heads, 3 KV "
                                         r"heads, intermediate_size 192\); .* tp that split it: \[1, 3\]$"):
        LLM.from_pretrained(path, tp=2, speculative="draft", draft_model=draft, progress=False)
    with pytest.raises(ValueError, match="draft_model is an LLM loaded with tp=1, the model with tp=2; .* with tp=2"):
        LLM.from_pretrained(path, tp=2, speculative="draft", draft_model=one, progress=False)


# --- the verify step as CUDA graphs ---------------------------------------------------------------


def test_verify_layout_pads_and_buckets():
    """verify_layout (the pure part of VerifyGraphs): the live chunks packed as the eager step packs them,
    then padding to the bucket's static shapes (B q + 1 tokens, B + 1 sequences: one token for each missing
    sequence, the rest in a last one; slot -1, position 0, block 0); None for steps that are not verify
    steps (they run as before)."""
    from llama_kernels.engine.runner import verify_layout

    a = Chunk([7, 8, 9, 10], 20, [3, 5], True, spec=3)
    b = Chunk([4, 6], 16, [1, 2], True, spec=1)
    c = Chunk([11], 30, [0, 6], True)  # a plain decode beside them
    lay = verify_layout([a, b, c], 3, [1, 2, 4], 16, 5)
    assert lay.size == 4 and lay.rows == 7
    assert lay.tokens == [7, 8, 9, 10, 4, 6, 11] + [0] * 10
    assert lay.positions == [20, 21, 22, 23, 16, 17, 30] + [0] * 10
    assert lay.slots == [84, 85, 86, 87, 32, 33, 110] + [-1] * 10
    assert lay.block_table == [[3, 5, 0, 0, 0], [1, 2, 0, 0, 0], [0, 6, 0, 0, 0], [0] * 5, [0] * 5]
    assert lay.seq_lens == [24, 18, 31, 1, 9] and lay.query_lens == [4, 2, 1, 1, 9]
    one = verify_layout([b], 3, [1, 2, 4], 16, 5)
    assert (one.size, one.seq_lens, one.query_lens, len(one.tokens)) == (1, [18, 3], [2, 3], 5)
    full = verify_layout([a, a, a, a], 3, [1, 2, 4], 16, 5)  # every draft k long, the bucket full
    assert full.query_lens == [4, 4, 4, 4, 1] and full.rows == 16
    assert verify_layout([a, b, c], 5, [1, 2, 4], 16, 5).query_lens == [4, 2, 1, 1, 17]  # k = 5: 4 x 6 + 1
    prefill = Chunk([1, 2, 3], 0, [4], True)
    for chunks, k in [([c], 3), ([a, prefill], 3), ([a], 2), ([dataclasses.replace(a, all_logits=True)], 3),
                      ([a, dataclasses.replace(c, logits=False)], 3), ([a, b, c, c, c], 3)]:  # fmt: skip
        assert verify_layout(chunks, k, [1, 2, 4], 16, 5) is None, (chunks, k)
    with pytest.raises(ValueError, match="verify_layout: a sequence of this step needs more than the 5 x 16 tokens"):
        verify_layout([dataclasses.replace(a, start=78)], 3, [1, 2, 4], 16, 5)


def test_the_padded_verify_layout_gives_the_eager_logits(llm):
    """What a verify graph replays, run eagerly on the CPU: 3 sequences (drafts of 3, 1 and 0 tokens, one
    across a block boundary) padded to bucket 4's 17 tokens give the eager step's logits and write exactly
    its k/v."""
    from llama_kernels.engine.runner import buckets, verify_layout
    from llama_kernels.model import AttentionBatch

    runner, cache, alloc = llm.engine.runner, llm.cache, llm.allocator
    prompts, drafts = [PROMPTS[4][:30], PROMPTS[6], PROMPTS[3]], [[9, 200, 31], [77], []]
    blocks = [[] for _ in prompts]
    chunks = []
    try:
        for p, d, bl in zip(prompts, drafts, blocks):
            assert alloc.grow(bl, len(p) + len(d))
            runner.run([Chunk(p[:-1], 0, bl, True)])
            chunks.append(Chunk(p[-1:] + d, len(p) - 1, bl, True, spec=len(d)))
        eager = runner.run(chunks)  # [7, V]
        after = [t.clone() for t in cache.k + cache.v]
        width = -(-max(llm.max_context, 4 * 4 + 1) // cache.block_size)
        lay = verify_layout(chunks, 3, buckets(4), cache.block_size, width)
        assert lay.size == 4 and lay.rows == 7 and len(lay.tokens) == 17
        batch = AttentionBatch(torch.tensor(lay.positions), torch.tensor(lay.slots),
                               torch.tensor(lay.block_table, dtype=torch.int32),
                               torch.tensor(lay.seq_lens, dtype=torch.int32),
                               torch.tensor(lay.query_lens, dtype=torch.int32))  # fmt: skip
        with torch.inference_mode():
            padded = llm.model(torch.tensor(lay.tokens), batch, cache).float()
    finally:
        for bl in blocks:
            alloc.free(bl)
    assert padded.shape == (17, CONFIG.vocab_size)
    assert_rel_close(padded[: lay.rows], eager, 1e-5, "the live rows' logits")
    live = torch.tensor([s for s in lay.slots if s >= 0])
    for a, b in zip(cache.k + cache.v, after):
        a, b = a.flatten(0, 1).clone(), b.flatten(0, 1).clone()
        assert_rel_close(a[live], b[live], 1e-6, "the live tokens' k/v")
        a[live] = b[live] = 0
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), "a padding token wrote to the cache"


@pytest.mark.gpu
@pytest.mark.parametrize("quant,kv", [(None, None), ("fp8", "fp8")])
def test_verify_graphs_match_eager(quant, kv):
    """On a GPU: verify steps replayed as CUDA graphs (buckets 1 to 4, drafts of 0 to 3 tokens padded) give
    the eager verify logits and the same greedy tokens."""
    config = dataclasses.replace(CONFIG, head_dim=64)  # the triton prefill attention takes D 64 or 128
    kw = dict(quant=quant, device="cuda", dtype="bfloat16", kv_cache_dtype=kv, max_context=128, max_batch=4, seed=3)
    requests = {str(i): (p, GREEDY) for i, p in enumerate(REPEATING + [PROMPTS[4]])}
    seen = {}
    for graphs in (True, False):
        llm = LLM.from_config(config, cuda_graphs=graphs, **kw)
        engine = Engine(llm.loaded, max_num_seqs=4, speculative=spec(3, ngram_min=1))
        assert (engine.runner.verify_graphs is not None) == graphs
        steps, run_ = [], engine.runner.run
        engine.runner.run = lambda chunks, **k: steps.append(
            (any(c.spec for c in chunks), run_(chunks, **k).clone())) or steps[-1][1]  # fmt: skip
        outs = run(engine, requests)
        seen[graphs] = {r: tokens(o) for r, o in outs.items()}, steps, engine.runner.verify_graphs
    (got, got_steps, vg), (ref, ref_steps, _) = seen[True], seen[False]
    assert got == ref and vg.graphs, "greedy tokens equal; some verify steps ran as graphs"
    verify = [(g, r) for (spec_step, g), (_, r) in zip(got_steps, ref_steps) if spec_step]
    assert verify
    for i, (g, r) in enumerate(verify):
        assert_rel_close(g, r, 0.02, f"{quant}/{kv} verify step {i} logits")


def test_a_draft_caps_the_context(tmp_path):
    """A draft trained on fewer positions caps the sized context (the CPU default here) and refuses a larger
    max_context in one line naming it, before anything loads."""
    import json

    from test_tensor_parallel import write_model

    path = write_model(tmp_path / "model", 6, 2, False)
    draft = write_model(tmp_path / "draft", 6, 2, False, layers=1)
    config = json.loads((draft / "config.json").read_text())
    (draft / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 48}))
    llm = LLM.from_pretrained(path, max_batch=1, progress=False, speculative="draft", draft_model=draft)
    assert llm.max_context == llm.draft.max_context == 48 < llm.config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"^max_context \(--max-context\) 64 is above the trained context of the "
                                         rf"draft model {draft} \(48 tokens\); expected at most 48$"):
        LLM.from_pretrained(path, max_context=64, progress=False, speculative="draft", draft_model=draft)
