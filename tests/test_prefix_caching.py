"""Automatic prefix caching (engine.block_allocator, engine.scheduler) on the CPU, fp32 tiny random Llamas:
greedy outputs equal caching off (fp32 and FP8 KV); prompts sharing 0, 1, k and k+partial blocks; LRU
eviction, never of a held block; preemption and abort of shared blocks; n same-prompt requests share
the prompt's blocks; salts never share; a forced digest collision reads nothing foreign; and a randomized
run whose pool accounting is checked after every step."""

from __future__ import annotations

import hashlib
import random

import pytest
from conftest import needs_smollm2

from llama_kernels.engine import Engine, SamplingParams
from llama_kernels.engine.block_allocator import BlockAllocator, PrefixChain, block_digest
from llama_kernels.llm import LLM
from llama_kernels.model import LlamaConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, max_position_embeddings=256)  # fmt: skip
BS = 16  # tokens per KV block (llm.BLOCK_SIZE)
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def ids(n: int, seed: int) -> list[int]:
    r = random.Random(seed)
    return [r.randrange(3, 250) for _ in range(n)]


def tiny(prefix_caching: bool = True, kv=None, max_batch: int = 4, max_context: int = 128) -> LLM:
    return LLM.from_config(CONFIG, device="cpu", max_context=max_context, max_batch=max_batch, seed=3,
                           kv_cache_dtype=kv, prefix_caching=prefix_caching)  # fmt: skip


@pytest.fixture(scope="module")
def on():
    return tiny(True)


@pytest.fixture(scope="module")
def off():
    return tiny(False)


def run(engine: Engine, requests: dict, salts: dict | None = None, each_step=None) -> dict[str, tuple[list[int], int]]:
    """Add every request (id -> (prompt, params)), step until done: id -> (new tokens, cached prompt tokens)."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params, **({"cache_salt": salts[rid]} if salts and rid in salts else {}))
    out: dict[str, tuple[list[int], int]] = {rid: ([], 0) for rid in requests}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] = (out[o.request_id][0] + o.new_token_ids, o.cached_tokens)
        if each_step is not None:
            each_step(engine)
    assert engine.allocator.used == 0, "blocks leaked"
    check_pool(engine)
    return out


def check_pool(engine: Engine) -> None:
    """The pool's accounting against the sequences that hold blocks: reference counts, the free and
    cached-free sets, the registrations, and used + cached free + never-cached free == total."""
    a = engine.allocator
    holders = [s.blocks for s in engine.scheduler.running] + [s.blocks for s in engine.scheduler.waiting]
    counts = [0] * a.num_blocks
    for blocks in holders:
        assert len(set(blocks)) == len(blocks), "a sequence holds a block twice"
        for b in blocks:
            counts[b] += 1
    assert counts == [a.ref_count(b) for b in range(a.num_blocks)], "reference counts"
    free, lru = set(a._free), set(a._lru)
    assert len(free) == len(a._free) and not free & lru, "a block is free twice"
    assert free | lru == {b for b in range(a.num_blocks) if counts[b] == 0}, "free = the blocks nobody holds"
    assert a.used + a.num_cached_free + a.num_uncached_free == a.num_blocks
    assert lru <= set(a._by_block) and not free & set(a._by_block), "cached free blocks are the registered ones"
    for digest, reg in a._by_digest.items():
        assert reg.digest == digest and a._by_block[reg.block] is reg
    for s in engine.scheduler.running:
        assert len(s.blocks) >= a.blocks_for(s.num_computed)
        for b in s.blocks[: s.num_computed // BS]:  # a block others hold is full and computed by all of them
            assert counts[b] == 1 or b in a._by_block


def test_digests_chain_sha256_over_namespace_salt_and_tokens():
    a = BlockAllocator(4, BS, namespace="torch.float32")
    root = a.root_key(None)
    fp8 = BlockAllocator(4, BS, namespace="torch.float8_e4m3fn")
    assert len({root, a.root_key(""), a.root_key("x"), fp8.root_key(None)}) == 4, "salt and KV dtype in the root"
    c = PrefixChain(root)
    tokens = ids(2 * BS + 3, seed=1)
    c.extend(tokens, BS, block_digest)
    first = hashlib.sha256(hashlib.sha256(root).digest() + b"".join(t.to_bytes(8, "little") for t in tokens[:BS]))
    assert len(c.digests) == 2 and c.digests[0] == first.digest()
    assert c.digests[1] == block_digest(c.digests[0], tokens[BS : 2 * BS]) != block_digest(c.digests[0], tokens[:BS])


def test_allocator_evicts_least_recently_freed_and_never_a_held_block():
    a = BlockAllocator(4, BS)
    chains = {name: PrefixChain(a.root_key(None)) for name in "ABC"}
    toks = {name: ids(BS, seed=i) for i, name in enumerate("ABC")}
    held = {}
    for name in "ABC":
        held[name] = []
        assert a.grow(held[name], BS)
        a.register(chains[name], toks[name], held[name], BS)
    assert a.num_cached == 3 and a.used == 3
    for name in "ABC":  # freed A, B, C: cached, in that LRU order
        a.free(held[name])
    assert a.used == 0 and a.num_cached_free == 3 and a.num_uncached_free == 1
    fresh = PrefixChain(a.root_key(None))
    hits = a.match(fresh, toks["A"] + [1], 1)  # A used again: now the most recent
    assert [h.block for h in hits] == [0]
    again = a.take(hits, fresh)
    a.free(again)
    taken = []
    assert a.grow(taken, BS) and taken == [3], "the never-cached block goes first"
    assert a.grow(taken, 2 * BS) and taken[1] == 1 and a.num_cached == 2, "then B, the least recently freed"
    held_a = a.take(a.match(PrefixChain(a.root_key(None)), toks["A"] + [1], 1), fresh)  # A is held now
    assert a.grow(taken, 3 * BS) and taken[2] == 2, "C next; A is held and cannot go"
    assert not a.grow(taken, 4 * BS) and len(taken) == 3, "a held cached block is never evicted"
    assert a.ref_count(0) == 1 and a.match(PrefixChain(a.root_key(None)), toks["A"] + [1], 1)
    a.free(held_a)
    assert a.grow(taken, 4 * BS) and taken[3] == 0 and a.num_cached == 0, "free again: evictable"


@pytest.mark.parametrize("kv", [None, "fp8"])
def test_prompts_sharing_0_1_k_and_k_plus_partial_blocks_equal_caching_off(kv):
    on, off = tiny(True, kv), tiny(False, kv)
    base = ids(3 * BS + 5, seed=2)  # 3 full blocks + 5
    other = ids(3 * BS, seed=3)
    cases = {  # name -> (prompt, tokens it finds cached once `base` ran)
        "shares 0": (other[:1] + base[1:], 0),
        "shares 1 block": (base[:BS] + other[: 2 * BS], BS),
        "exactly 3 blocks": (base[: 3 * BS], 2 * BS),  # its last token is computed: the 3rd block is not hit
        "3 blocks + 1": (base[: 3 * BS] + other[:1], 3 * BS),
        "3 blocks + partial": (base + other[:7], 3 * BS),
        "the same prompt": (base, 3 * BS),
        "shorter than a block": (base[:9], 0),
    }
    first_on = run(Engine(on.loaded, max_num_seqs=1), {"base": (base, GREEDY)})
    first_off = run(Engine(off.loaded, max_num_seqs=1), {"base": (base, GREEDY)})
    assert first_on == first_off and first_on["base"][1] == 0
    for name, (prompt, cached) in cases.items():
        got = run(Engine(on.loaded, max_num_seqs=1), {name: (prompt, GREEDY)})[name]
        want = run(Engine(off.loaded, max_num_seqs=1), {name: (prompt, GREEDY)})[name]
        assert got == (want[0], cached), name
    engine = Engine(on.loaded)
    run(engine, {"again": (base, GREEDY)})
    s = engine.stats()
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (len(base), 3 * BS)
    assert s.kv_blocks_cached == s.kv_blocks_cached_free > 0 and s.kv_blocks_used == 0


def test_generated_blocks_are_cached_for_the_next_turn(on, off):
    prompt = ids(BS + 4, seed=4)
    params = SamplingParams(max_tokens=2 * BS, temperature=0, ignore_eos=True)
    turn1 = run(Engine(on.loaded), {"t1": (prompt, params)})["t1"][0]
    history = prompt + turn1 + ids(5, seed=5)  # the next turn resends the answer and adds a question
    got = run(Engine(on.loaded), {"t2": (history, GREEDY)})["t2"]
    computed = len(prompt) + len(turn1) - 1  # the last sampled token was never fed back
    assert got[1] == computed // BS * BS
    assert got[0] == run(Engine(off.loaded), {"t2": (history, GREEDY)})["t2"][0]


def test_n_requests_of_one_prompt_share_its_blocks(on, off):
    prompt = ids(3 * BS + 2, seed=6)
    params = [SamplingParams(max_tokens=5, temperature=0.8, seed=i) for i in range(4)]
    engine = Engine(on.loaded, max_num_seqs=4)
    seen = []

    def look(e: Engine):
        check_pool(e)
        if len(e.scheduler.running) == 4 and not seen:
            seen.append([list(s.blocks) for s in e.scheduler.running])

    got = run(engine, {f"c{i}": (prompt, p) for i, p in enumerate(params)}, each_step=look)
    want = run(Engine(off.loaded, max_num_seqs=4), {f"c{i}": (prompt, p) for i, p in enumerate(params)})
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}
    assert [got[f"c{i}"][1] for i in range(4)] == [0, 3 * BS, 3 * BS, 3 * BS], "the first computes, 3 share"
    (tables,) = seen
    assert all(t[:3] == tables[0][:3] for t in tables), "one copy of the prompt's 3 full blocks"
    assert len({t[3] for t in tables}) == 4, "each has its own last (partial) block"
    assert engine.throughput.cached_tokens == 9 * BS


def test_different_salts_never_share(on):
    prompt = ids(2 * BS + 3, seed=7)
    salts = {"a": "tenant-a", "b": "tenant-b", "a2": "tenant-a", "none": None}
    got = {}
    for rid in ("a", "b", "a2", "none"):
        got.update(run(Engine(on.loaded), {rid: (prompt, GREEDY)}, {rid: salts[rid]} if salts[rid] else None))
    assert [got[r][1] for r in ("a", "b", "a2", "none")] == [0, 0, 2 * BS, 0]
    assert len({tuple(v[0]) for v in got.values()}) == 1
    with pytest.raises(ValueError, match="cache_salt=''"):
        Engine(on.loaded).add_request("x", prompt, GREEDY, cache_salt="")


@pytest.mark.parametrize("hook", ["constant", "tokens ignored", "parent ignored"])
def test_a_forced_digest_collision_reads_no_foreign_block(hook, off):
    """Digests forced to collide (every block alike; blocks at the same position whatever their
    tokens; blocks of equal tokens whatever precedes them): a lookup still checks the tokens and the
    parent registration, so a request gets only its own prefix's blocks and its caching-off tokens."""
    on = tiny(True)
    on.allocator.digest = {"constant": lambda parent, tokens: b"\0" * 32,
                           "tokens ignored": lambda parent, tokens: hashlib.sha256(parent).digest(),
                           "parent ignored": lambda parent, tokens: block_digest(b"", tokens)}[hook]  # fmt: skip
    a, b = ids(3 * BS, seed=8), ids(3 * BS, seed=9)
    c = a[:BS] + b[BS:]  # a's first block, then b's blocks (whose k/v were computed after b's first block)
    cached = []
    for name, prompt, salt in (("a", a, None), ("b", b, None), ("c", c, None), ("a salted", a, "s"), ("a", a, None)):
        got = run(Engine(on.loaded), {name: (prompt, GREEDY)}, {name: salt} if salt else None)[name]
        assert got[0] == run(Engine(off.loaded), {name: (prompt, GREEDY)})[name][0], name
        cached.append(got[1])
    # constant: the table holds one registration at a time, never one equal to the asking block;
    # tokens ignored: b and c replace a's registrations, and the last a hits c's first block (a's);
    # parent ignored: c hits a's first block only; the salted a replaces a's registrations
    assert cached == {"constant": [0, 0, 0, 0, 0], "tokens ignored": [0, 0, 0, 0, BS],
                      "parent ignored": [0, 0, BS, 0, 0]}[hook]  # fmt: skip


def test_preemption_and_abort_of_shared_blocks(off):
    on = tiny(True, max_batch=1, max_context=96)  # a pool of 6 blocks for 3 sequences of up to 74 tokens
    shared = ids(2 * BS, seed=10)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    requests = {f"r{i}": (shared + ids(10 + i, seed=20 + i), params) for i in range(3)}
    engine = Engine(on.loaded, max_num_seqs=3)
    got = run(engine, requests, each_step=check_pool)
    assert engine.stats().num_preemptions > 0
    want = run(Engine(off.loaded, max_num_seqs=3), requests)
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}

    engine = Engine(on.loaded, max_num_seqs=3)
    for rid, (prompt, p) in requests.items():
        engine.add_request(rid, prompt, p)
    outs = {rid: [] for rid in requests}
    while len(engine.scheduler.running) < 2 or any(s.num_computed < 2 * BS for s in engine.scheduler.running):
        for o in engine.step():
            outs[o.request_id] += o.new_token_ids
    first, second = engine.scheduler.running[:2]
    sharing = sum(s.blocks[:2] == first.blocks[:2] for s in engine.scheduler.running)
    assert first.blocks[:2] == second.blocks[:2] and engine.allocator.ref_count(first.blocks[0]) == sharing >= 2
    engine.abort(first.request_id)
    check_pool(engine)
    assert engine.allocator.ref_count(second.blocks[0]) == sharing - 1, "the others still hold the shared blocks"
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] += o.new_token_ids
        check_pool(engine)
    assert engine.allocator.used == 0
    for rid in requests:
        if rid != first.request_id:
            assert outs[rid] == want[rid][0], rid


def test_llm_generate_reuses_the_cache(on):
    prompt = ids(2 * BS + 1, seed=11)
    first = on.generate_ids([prompt], max_new_tokens=4, stop_ids=())
    assert on.generate_ids([prompt], max_new_tokens=4, stop_ids=()) == first
    assert on.last_stats.cached_tokens == 2 * BS and on.last_stats.prompt_tokens == len(prompt)


def test_prefix_caching_argument_is_checked():
    with pytest.raises(ValueError, match="prefix_caching='no'"):
        LLM.from_config(CONFIG, device="cpu", max_context=32, max_batch=1, prefix_caching="no")


def test_random_requests_keep_the_pool_exact(off):
    """Many requests over random shared prefixes, salts, lengths and aborts on an oversubscribed pool
    (preemptions): the accounting holds after every step, and every request that was not aborted gets
    the greedy tokens it gets with caching off."""
    r = random.Random(0)
    on = tiny(True, max_batch=1, max_context=128)  # 8 blocks for up to 5 sequences: preemptions
    bases = [ids(r.randrange(BS, 3 * BS), seed=100 + i) for i in range(4)]
    requests, salts = {}, {}
    for i in range(60):
        prompt = r.choice(bases)[: r.randrange(1, 3 * BS)] + ids(r.randrange(0, 12), seed=200 + i)
        requests[f"q{i}"] = (prompt, SamplingParams(max_tokens=r.randrange(1, 30), temperature=0, ignore_eos=True))
        if r.random() < 0.2:
            salts[f"q{i}"] = r.choice(["s1", "s2"])
    engine = Engine(on.loaded, max_num_seqs=5, prefill_chunk=24)
    pending = list(requests)
    outs: dict[str, list[int]] = {}
    aborted = set()
    steps = 0
    while pending or engine.has_unfinished():
        for _ in range(r.randrange(0, 4)):
            if pending:
                rid = pending.pop(0)
                engine.add_request(rid, *requests[rid], **({"cache_salt": salts[rid]} if rid in salts else {}))
                outs[rid] = []
        live = [s.request_id for s in engine.scheduler.running + list(engine.scheduler.waiting)]
        if live and r.random() < 0.05:
            rid = r.choice(live)
            engine.abort(rid)
            aborted.add(rid)
        for o in engine.step():
            outs[o.request_id] += o.new_token_ids
        check_pool(engine)
        steps += 1
        assert steps < 2000
    assert engine.allocator.used == 0
    s = engine.stats()
    assert s.num_preemptions > 0 and s.prefix_cache_hits > 0 and aborted
    want = run(Engine(off.loaded, max_num_seqs=4), {k: v for k, v in requests.items() if k not in aborted})
    for rid, (tokens, _) in want.items():
        assert outs[rid] == tokens, rid


@pytest.mark.parametrize("command", [pytest.param(["generate", "Hi"], marks=needs_smollm2), ["serve", "--port", "0"]])
def test_no_prefix_caching_flag_reaches_the_loader(command, monkeypatch, capsys):
    from llama_kernels import cli

    seen = []

    def fake_load(*args, **kwargs):
        seen.append(kwargs["prefix_caching"])
        raise ValueError("stop here")

    monkeypatch.setattr(LLM, "from_pretrained", fake_load)
    assert cli.main(command) != 0 and cli.main([*command, "--no-prefix-caching"]) != 0
    assert seen == [True, False] and "stop here" in capsys.readouterr().err


def test_a_failed_forward_registers_nothing(off, monkeypatch):
    """A step whose forward raises is redone one sequence at a time (Engine failure isolation): the
    failing request's blocks go back unregistered, the others' are registered, and the same prompt
    later is computed afresh with its caching-off tokens."""
    from llama_kernels.engine import engine as engine_module

    on = tiny(True)
    poison = [9] * (2 * BS + 8)
    shared = ids(2 * BS, seed=12)
    requests = {f"ok{i}": (shared + ids(5, seed=30 + i), GREEDY) for i in range(2)}
    run_model = engine_module.ModelRunner.run

    def forward(self, chunks, *a, **kw):
        if any(c.tokens[:1] == [9] and c.start == 0 for c in chunks):
            raise RuntimeError("injected forward failure")
        return run_model(self, chunks, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(engine_module.ModelRunner, "run", forward)
        got = run(Engine(on.loaded, max_num_seqs=3), {**requests, "bad": (poison, GREEDY)}, each_step=check_pool)
    assert got["bad"] == ([], 0)
    assert all(reg.tokens != (9,) * BS for reg in on.allocator._by_block.values()), "a failed block was registered"
    want = run(Engine(off.loaded), {**requests, "bad": (poison, GREEDY)})
    assert {k: v[0] for k, v in got.items() if k != "bad"} == {k: v[0] for k, v in want.items() if k != "bad"}
    again = run(Engine(on.loaded), {"bad": (poison, GREEDY), "ok0": requests["ok0"]})
    assert again["bad"] == (want["bad"][0], 0) and again["ok0"] == (want["ok0"][0], len(requests["ok0"][0]) // BS * BS)


def test_a_sequence_that_needs_every_prompt_logit_reads_no_cached_block(on):
    """reads_prefix_cache False (a request that needs every prompt token's logits, e.g. prompt
    logprobs): its whole prompt is computed even when cached; the same prompt beside it reads the cache."""
    prompt = ids(2 * BS + 3, seed=13)
    first = run(Engine(on.loaded), {"first": (prompt, GREEDY)})["first"]
    engine = Engine(on.loaded)
    outs = {}
    for rid, reads in (("all", False), ("cached", True)):
        engine.add_request(rid, prompt, GREEDY)
        engine.scheduler.waiting[-1].reads_prefix_cache = reads
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] = (outs.get(o.request_id, ([], 0))[0] + o.new_token_ids, o.cached_tokens)
    assert outs == {"all": (first[0], 0), "cached": (first[0], 2 * BS)}
    assert engine.throughput.cached_tokens == 2 * BS and engine.allocator.used == 0
