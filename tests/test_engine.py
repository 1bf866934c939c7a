"""The serving engine (llama_kernels.engine) on the CPU: the block allocator, the scheduler's
admission and token budget, preemption by recompute, per-request seeds, stop ids and strings,
UTF-8-safe incremental text, logprobs, abort, and request validation."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest
import torch
from conftest import needs_smollm2 as smollm2
from conftest import output_tokens as tokens
from conftest import run_engine as run

from llama_kernels.llm import LLM
from llama_kernels.model import LlamaConfig
from llama_kernels.engine import Engine, SamplingParams
from llama_kernels.engine.block_allocator import BlockAllocator
from llama_kernels.engine.detokenizer import MAX_OPEN, Detokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, max_position_embeddings=256)  # fmt: skip
PROMPTS = [[(7 * i + 3 * j) % 250 + 3 for j in range(n)] for i, n in enumerate([5, 40, 17, 70, 1, 33])]


@pytest.fixture(scope="module")
def llm():
    """A tiny random fp32 Llama with a pool of 4 x 128 tokens (32 blocks); no prefix caching, so every
    test here prefills its prompts in full (tests/test_prefix_caching.py covers caching)."""
    return LLM.from_config(CONFIG, device="cpu", max_context=128, max_batch=4, seed=3, prefix_caching=False)


@pytest.fixture(scope="module")
def smol():
    return LLM.from_pretrained(None, max_context=256, max_batch=2, progress=False)


def alone(llm: LLM, prompt: list[int], params: SamplingParams) -> list[int]:
    return tokens(run(Engine(llm.loaded, max_num_seqs=1), {"x": (prompt, params)})["x"])


def test_block_allocator_free_list():
    a = BlockAllocator(5, 16)
    first, second = [], []
    assert a.grow(first, 17) and first == [0, 1] and a.used == 2
    assert a.grow(first, 32) and first == [0, 1], "17..32 tokens still fit 2 blocks"
    assert a.grow(second, 40) and second == [2, 3, 4] and a.num_free == 0
    assert not a.grow(first, 33) and first == [0, 1], "a failed grow takes nothing"
    a.free(first)
    assert first == [] and a.num_free == 2
    assert a.grow(first, 1) and first == [0], "freed blocks are reused"
    a.free(first)
    a.free(second)
    assert a.used == 0 and sorted(a._free) == list(range(5))


def test_scheduler_admits_fcfs_within_the_budget(llm):
    engine = Engine(llm.loaded, max_num_seqs=3, prefill_chunk=32, max_num_batched_tokens=48)
    steps = []
    run_ = engine.runner.run
    engine.runner.run = lambda chunks, **kw: steps.append([(c.start, len(c.tokens)) for c in chunks]) or run_(chunks, **kw)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    outs = run(engine, {str(i): (p, params) for i, p in enumerate(PROMPTS[:4])})  # 5, 40, 17, 70 tokens
    # step 1: all of prompt 0 and a 32-token chunk of prompt 1 (prefill_chunk), 11 of the budget left for prompt 2
    assert steps[0] == [(0, 5), (0, 32), (0, 11)]
    assert steps[1] == [(5, 1), (32, 8), (11, 6)], "prompt 0 decodes; the other two finish their prompts"
    assert all(sum(n for _, n in s) <= 48 for s in steps) and all(len(s) <= 3 for s in steps)
    assert engine.throughput.batch_sizes == [3, 1], "prompt 3 waits for a free place (max_num_seqs=3)"
    assert all(n <= 32 for s in steps for _, n in s)
    for i, p in enumerate(PROMPTS[:4]):
        assert tokens(outs[str(i)]) == alone(llm, p, params), f"request {i}"
    s = engine.stats()
    assert (s.num_running, s.num_waiting, s.kv_blocks_used, s.kv_blocks_total) == (0, 0, 0, 32)
    assert s.prompt_tokens_total == 132 and s.generation_tokens_total == 16 and s.num_preemptions == 0


def test_preemption_keeps_every_output(llm):
    """8 requests of up to 100 tokens on a 32-block pool: later ones are preempted and recomputed."""
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    requests = {str(i): (PROMPTS[i % 6] + [i + 3] * (i * 3), params) for i in range(8)}
    engine = Engine(llm.loaded, max_num_seqs=8, prefill_chunk=64)
    outs = run(engine, requests)
    assert engine.stats().num_preemptions > 0
    for rid, (prompt, p) in requests.items():
        assert tokens(outs[rid]) == alone(llm, prompt, p), f"request {rid}"
        assert outs[rid][-1].finish_reason == "length" and outs[rid][-1].completion_tokens == 30


def test_preempted_sampling_keeps_its_generator(llm):
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=11, ignore_eos=True)
    requests = {str(i): (PROMPTS[i % 6] + [9] * 20, dataclasses.replace(params, seed=i)) for i in range(8)}
    engine = Engine(llm.loaded, max_num_seqs=8, prefill_chunk=64)
    outs = run(engine, requests)
    assert engine.stats().num_preemptions > 0
    for rid, (prompt, p) in requests.items():
        assert tokens(outs[rid]) == alone(llm, prompt, p), f"request {rid}"


def test_seeded_sampling_does_not_depend_on_the_batch(llm):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    ref = alone(llm, PROMPTS[1], params)
    others = {str(i): (p, SamplingParams(max_tokens=8, temperature=0.7, ignore_eos=True))
              for i, p in enumerate(PROMPTS)}  # fmt: skip
    outs = run(Engine(llm.loaded, max_num_seqs=4), {**others, "mine": (PROMPTS[1], params)})
    assert tokens(outs["mine"]) == ref
    assert alone(llm, PROMPTS[1], dataclasses.replace(params, seed=99)) != ref, "the seed matters"


def test_stop_token_ids_and_eos(llm):
    free = alone(llm, PROMPTS[2], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    outs = run(Engine(llm.loaded), {"a": (PROMPTS[2], SamplingParams(max_tokens=8, temperature=0,
                                                               stop_token_ids=(free[3],)))})["a"]  # fmt: skip
    assert tokens(outs) == free[: free.index(free[3])] and outs[-1].finish_reason == "stop"
    assert outs[-1].completion_tokens == free.index(free[3]) + 1  # the stop token counts (as vLLM)


def test_logprobs(llm):
    outs = run(Engine(llm.loaded), {"a": (PROMPTS[3], SamplingParams(max_tokens=3, temperature=0, logprobs=5))})["a"]
    lps = [lp for o in outs for lp in o.new_logprobs]
    assert [lp.token_id for lp in lps] == tokens(outs)
    for lp in lps:  # greedy: the chosen token is the most likely one
        assert len(lp.top) == 5 and lp.top[0] == (lp.token_id, lp.logprob) and lp.logprob <= 0
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    none = run(Engine(llm.loaded), {"b": (PROMPTS[3], SamplingParams(max_tokens=2, temperature=0))})["b"]
    assert all(o.new_logprobs is None for o in none)


def test_abort_frees_blocks_now(llm):
    engine = Engine(llm.loaded, max_num_seqs=2)
    engine.add_request("a", PROMPTS[3], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    engine.add_request("b", PROMPTS[1], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    engine.add_request("c", PROMPTS[0], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.allocator.used > 0 and engine.stats().num_waiting == 1
    for rid in ("a", "c", "unknown"):
        engine.abort(rid)
    assert engine.allocator.used == llm.allocator.blocks_for(len(PROMPTS[1]) + 2)  # only b's blocks
    outs = engine.step()
    assert [(o.request_id, o.finished, o.finish_reason) for o in outs if o.request_id != "b"] == [
        ("a", True, "abort"), ("c", True, "abort")]  # fmt: skip
    engine.abort("b")
    assert engine.allocator.used == 0
    assert [o.finish_reason for o in engine.step()] == ["abort"] and not engine.has_unfinished()


def test_cpu_prefill_chunk_is_sized_for_latency_and_cuda_keeps_the_planners(llm):
    """Every running stream waits for a step's prefill chunk: on the CPU the default is 256 tokens (the
    planner's 8192 stalled streams ~10 s behind a 1016-token prompt); on CUDA it stays the planner's."""
    from llama_kernels import plan
    from llama_kernels.llm import CPU_PREFILL_CHUNK, default_prefill_chunk

    assert llm.prefill_chunk == CPU_PREFILL_CHUNK == 256 and Engine(llm.loaded).scheduler.prefill_chunk == 256
    assert default_prefill_chunk(torch.device("cuda")) == plan.PREFILL_CHUNK
    explicit = LLM.from_config(CONFIG, device="cpu", max_context=64, max_batch=1, prefill_chunk=8192)
    assert Engine(explicit.loaded).scheduler.prefill_chunk == 8192


POISON_TOP_P = 0.123  # the sampling of a request with this top_p raises (monkeypatched sample)


def _victims(engine: Engine) -> dict[str, tuple[list[int], SamplingParams]]:
    return {f"v{i}": (PROMPTS[i], SamplingParams(max_tokens=6, temperature=0.8, seed=i, ignore_eos=True))
            for i in range(4)}  # fmt: skip


@pytest.mark.parametrize("where", ["sampling", "forward"])
def test_a_failing_request_fails_alone(llm, monkeypatch, where):
    """One request whose sampling (or forward) raises finishes with finish_reason "error"; the four
    requests batched with it get exactly their solo outputs and no blocks leak."""
    from llama_kernels.engine import engine as engine_module

    ref = {rid: alone(llm, p, sp) for rid, (p, sp) in _victims(None).items()}
    poison = [9, 9, 9, 9, 9, 9, 9]
    if where == "sampling":
        real = engine_module.sample

        def sample(logits, params, generators):
            if any(p.top_p == POISON_TOP_P for p in params):
                raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
            return real(logits, params, generators)

        monkeypatch.setattr(engine_module, "sample", sample)
        bad = SamplingParams(max_tokens=6, temperature=1.0, top_p=POISON_TOP_P)
    else:
        run_model = llm.engine.runner.run.__func__

        def forward(self, chunks, *a, **kw):
            if any(c.tokens[:1] == [9] and c.start == 0 for c in chunks):
                raise RuntimeError("injected forward failure")
            return run_model(self, chunks, *a, **kw)

        monkeypatch.setattr(engine_module.ModelRunner, "run", forward)
        bad = SamplingParams(max_tokens=6, temperature=0)
    engine = Engine(llm.loaded, max_num_seqs=5)
    outs = run(engine, {**_victims(engine), "bad": (poison, bad)})
    assert [(o.finish_reason, o.error) for o in outs["bad"]] == [
        ("error", "RuntimeError: " + ("probability tensor contains either `inf`, `nan` or element < 0"
                                      if where == "sampling" else "injected forward failure"))]  # fmt: skip
    for rid, ref_tokens in ref.items():
        assert tokens(outs[rid]) == ref_tokens and outs[rid][-1].finish_reason == "length", rid
    assert engine.allocator.used == 0 and not engine.has_unfinished()


def test_a_tiny_top_p_never_fails_other_requests(llm):
    """top_p=5e-324 rounds to 0 in float32 (every token masked by a plain nucleus cut): that request
    fails alone or succeeds, and the four others finish with their solo outputs."""
    ref = {rid: alone(llm, p, sp) for rid, (p, sp) in _victims(None).items()}
    engine = Engine(llm.loaded, max_num_seqs=5)
    outs = run(engine, {**_victims(engine), "tiny": ([5, 6, 7], SamplingParams(max_tokens=6, top_p=5e-324, seed=1))})
    assert outs["tiny"][-1].finish_reason in ("error", "length", "stop")
    for rid, ref_tokens in ref.items():
        assert tokens(outs[rid]) == ref_tokens and outs[rid][-1].finish_reason == "length", rid


@pytest.mark.parametrize("field,value,expected", [
    ("max_tokens", 0, "max_tokens=0; expected an int >= 1"),
    ("temperature", -1.0, "temperature=-1.0; expected a number >= 0"),
    ("temperature", float("nan"), "temperature=nan"),
    ("top_p", 1.5, "top_p=1.5; expected 0 < top_p <= 1"),
    ("top_p", 0.0, "top_p=0.0"),
    ("top_k", 0, "top_k=0; expected None or an int >= 1"),
    ("seed", "7", "seed='7'"),
    ("stop", ("",), "stop=\\(''"),
    ("stop_token_ids", (-1,), "stop_token_ids=\\(-1"),
    ("logprobs", 21, "logprobs=21; expected None or an int in \\[0, 20\\]"),
])  # fmt: skip
def test_bad_params_raise_before_any_state_change(llm, field, value, expected):
    engine = Engine(llm.loaded)
    with pytest.raises(ValueError, match=f"SamplingParams: {expected}"):
        engine.add_request("a", [1, 2], SamplingParams(**{field: value}))
    assert not engine.has_unfinished() and engine.stats().num_waiting == 0


def test_bad_requests_raise_before_any_state_change(llm):
    engine = Engine(llm.loaded)
    engine.add_request("dup", [1], SamplingParams(max_tokens=1))
    cases = [("dup", [1], {}, "request_id='dup' is already in use"),
             ("", [1], {}, "request_id=''; expected a non-empty string"),
             ("a", [], {}, "prompt_ids is empty"),
             ("a", [1, 256], {}, r"prompt_ids\[1\]=256; expected a token id in \[0, 256\)"),
             ("a", [1] * 100, {"max_tokens": 29}, "prompt of 100 tokens \\+ max_tokens=29 = 129 > max_context=128"),
             ("a", [1], {"stop": ("x",)}, "stop=\\('x',\\) needs a tokenizer")]  # fmt: skip
    for rid, prompt, kw, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.add_request(rid, prompt, SamplingParams(**kw))
    assert engine.stats().num_waiting == 1
    for kw, message in [({"max_num_seqs": 0}, "max_num_seqs=0"), ({"prefill_chunk": 0}, "prefill_chunk=0"),
                        ({"max_num_seqs": 8, "max_num_batched_tokens": 4}, "max_num_batched_tokens=4; expected an "
                         "int >= 8")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            Engine(llm.loaded, **kw)


class Pieces:
    """A tokenizer whose token i decodes to PIECES[i] (bytes, joined then decoded as UTF-8)."""

    PIECES = [b"x", b"S", b"TO", b"P", b"y", b"ST", b"ar", "日".encode()[:2], "日".encode()[2:]]

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.PIECES[i] for i in ids).decode("utf-8", errors="replace")


def feed(detok: Detokenizer, ids: list[int]) -> list[str]:
    return [detok.add([i]) for i in ids]


def test_detokenizer_withholds_stop_strings_split_across_tokens():
    d = Detokenizer(Pieces(), ("STOP",))
    assert feed(d, [0, 1, 2]) == ["x", "", ""] and not d.stopped  # "S", "STO" could start STOP
    assert feed(d, [3, 4]) == ["", ""] and d.stopped and d.finish() == ""  # "STOP": never shown, nor after it
    d = Detokenizer(Pieces(), ("STOP", "Py"))
    assert feed(d, [5, 6, 1]) == ["", "STar", ""] and d.finish() == "S", "a held prefix that is no stop string"
    d = Detokenizer(Pieces(), ("TOP",))
    assert feed(d, [1, 2, 3, 0]) == ["S", "", "", ""] and d.stopped, "the text before the stop string is shown"


def test_detokenizer_never_splits_a_utf8_character():
    d = Detokenizer(Pieces())
    assert feed(d, [0, 7, 8, 7]) == ["x", "", "日", ""]
    assert d.finish() == "\ufffd", "a sequence that really ends mid-character shows it at the end"


@smollm2
def test_stop_strings_on_smollm2(smol):
    ids = smol.encode_prompt("Write the numbers from one to twenty in words, separated by commas.", chat=True)
    greedy = SamplingParams(max_tokens=40, temperature=0)
    free = run(smol.engine, {"free": (ids, greedy)})["free"]
    text = "".join(o.new_text for o in free)
    pieces = [smol.tokenizer.decode([t]) for t in tokens(free)]
    # a stop string that starts inside one token and ends inside a later one
    i = len(pieces[0]) + len(pieces[1]) + len(pieces[2]) - 1
    stop = text[i : i + len(pieces[3]) + 2]
    outs = run(smol.engine, {"s": (ids, dataclasses.replace(greedy, stop=(stop, "never appears")))})["s"]
    got = [o.new_text for o in outs]
    assert "".join(got) == text[: text.index(stop)] and outs[-1].finish_reason == "stop"
    assert len(text[: text.index(stop)]) < len(text)


@smollm2
def test_utf8_text_is_never_broken_on_smollm2(smol):
    text = "日本語 🙂 ok"
    d = Detokenizer(smol.tokenizer)
    pieces = feed(d, smol.tokenizer.encode(text)) + [d.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert pieces.count("") > 0, "some tokens end mid-character"


class Counting:
    """Pieces that records the length of every decode call."""

    def __init__(self) -> None:
        self.lengths: list[int] = []

    def decode(self, ids: list[int]) -> str:
        self.lengths.append(len(ids))
        return Pieces().decode(ids)


def test_detokenizer_decodes_windows_with_the_text_of_a_full_decode():
    """Random tokens (half of them halves of a 3-byte character, so stray and split characters abound): the pieces
    join to the full decode, none shows U+FFFD before the end, and no decode call grows with the output."""
    ids = torch.randint(len(Pieces.PIECES), (400,), generator=torch.Generator().manual_seed(0)).tolist()
    ids = [i if i < 7 or k % 3 else 7 + (k % 2) for k, i in enumerate(ids)]
    tok = Counting()
    d = Detokenizer(tok)
    pieces = feed(d, ids)
    assert "".join(pieces) + d.finish() == Pieces().decode(ids)
    assert not any(p.endswith("\ufffd") for p in pieces if p)
    assert max(tok.lengths) < 40, "decode calls cover a window, not the whole output"


def test_detokenizer_window_stays_bounded_on_output_that_never_completes_a_character():
    """8000 tokens that each start a 3-byte character and never finish it: every decode call covers a
    bounded window (it grew with the output: 7.4 s for 8000 such tokens), and the text is U+FFFD per token."""
    tok = Counting()
    d = Detokenizer(tok, ("STOP",))
    pieces = feed(d, [7] * 8000)
    assert max(tok.lengths) <= 2 * (MAX_OPEN + 1) and sum(tok.lengths) < 40 * 8000
    assert "".join(pieces) + d.finish() == "\ufffd" * 8000


@smollm2
def test_detokenizer_windows_match_a_full_decode_on_smollm2(smol):
    ids = smol.tokenizer.encode("Café naïve — 日本語のテキスト 🙂🙃 and code: def f(x): return x ** 2\n" * 4)
    d = Detokenizer(smol.tokenizer)
    assert "".join(feed(d, ids)) + d.finish() == smol.tokenizer.decode(ids)


def test_decode_ops_on_the_torch_backend_keep_decode_eager(llm):
    """The torch references of decode_attention and rope_and_cache sync with the host, so a CUDA graph
    cannot capture them: the runner lists the decode ops that would run there and then decodes eagerly."""
    from llama_kernels.engine.runner import decode_ops, graph_blockers

    assert decode_ops(llm.model) == {"add_rms_norm", "rope_and_cache", "decode_attention"}
    fp8 = LLM.from_config(CONFIG, quant="fp8", device="cpu", max_context=32, max_batch=1)
    assert decode_ops(fp8.model) >= {"add_rms_norm_fp8", "quantize_fp8", "fp8_gemm"}
    assert graph_blockers(fp8.model, torch.device("cpu")) == ["decode_attention", "rope_and_cache"]
    assert llm.graphs is None and fp8.graphs is None


# the last prompt shares its first block with the one before: a prefix-cache hit under tensor parallel
TP_PROMPTS = [[5, 17, 99, 3, 42, 8, 77, 12], [9, 1, 100], [4] * 12, list(range(30, 50)), list(range(30, 46)) + [7, 7]]


def tp_engine_tokens(path, tp: int, kv_cache_dtype=None) -> tuple[dict[str, list[int]], tuple[int, int], list]:
    """({id: tokens}, (preemptions, prefix-cache hit tokens), FP8 KV scales k + v of this rank: 2L x [Hkv]
    or None) of 5 requests on a 4-block pool with chunks of 8, on this rank of tp (rank 0 schedules; the
    other ranks follow and return no tokens)."""
    llm = LLM.from_pretrained(path, max_context=64, max_batch=1, progress=False, tp=tp, kv_cache_dtype=kv_cache_dtype)
    scales = llm.cache.k_scale + llm.cache.v_scale
    engine = Engine(llm.loaded, max_num_seqs=4, prefill_chunk=8)
    if llm.model.tp is not None and torch.distributed.get_rank() != 0:
        engine.follow()
        return {}, (0, 0), scales
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    outs = run(engine, {str(i): (p, params) for i, p in enumerate(TP_PROMPTS)})
    engine.stop_followers()
    s = engine.stats()
    return {rid: tokens(o) for rid, o in outs.items()}, (s.num_preemptions, s.prefix_cache_hits), scales


def _tp_worker(rank: int, tp: int, port: int, path, out, kv_cache_dtype=None) -> None:
    """One rank of tp_engine_tokens; each rank saves its result to out.<rank>."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=tp)
    torch.save(tp_engine_tokens(path, tp, kv_cache_dtype), f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def spawn_tp2(path, tmp_path, kv_cache_dtype=None) -> list[tuple]:
    """tp_engine_tokens on both ranks of a gloo group of 2 spawned processes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_tp_worker, args=(2, port, path, tmp_path / "tp2.pt", kv_cache_dtype), nprocs=2)
    return [torch.load(tmp_path / f"tp2.pt.{rank}") for rank in range(2)]


def test_tensor_parallel_engine_matches_one_process(tmp_path):
    """TP=2 over gloo: rank 0 schedules (chunked prefill, preemption) and broadcasts each step; rank 1
    follows. The greedy tokens equal the single-process engine's."""
    from test_tensor_parallel import write_model

    path = write_model(tmp_path / "model", 6, 6, True)
    ref, ref_counts, _ = tp_engine_tokens(path, tp=1)
    assert ref_counts[0] > 0 and ref_counts[1] > 0, "preemptions and prefix-cache hits"
    got, counts, _ = spawn_tp2(path, tmp_path)[0]
    assert got == ref and counts == ref_counts


def test_tensor_parallel_fp8_kv_scales_from_the_checkpoint(tmp_path):
    """Per-head FP8 KV scales in the checkpoint: at TP=2 each rank's cache holds its 3 KV heads' scales
    (no calibration pass), and the greedy tokens equal the single-process engine's."""
    from safetensors.torch import load_file, save_file
    from test_tensor_parallel import write_model

    path = write_model(tmp_path / "model", 6, 6, True)
    tensors = load_file(path / "model.safetensors")
    ref_scales = tp_engine_tokens(path, tp=1, kv_cache_dtype="fp8")[2]  # the calibrated ones
    given = [s * torch.linspace(1.1, 1.6, 6) for s in ref_scales]  # per head, unlike the calibration's
    for i in range(2):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = given[i].clone()
        tensors[f"model.layers.{i}.self_attn.v_scale"] = given[2 + i].clone()
    save_file(tensors, path / "model.safetensors")
    ref, _, scales = tp_engine_tokens(path, tp=1, kv_cache_dtype="fp8")
    assert all(torch.equal(a, b) for a, b in zip(scales, given))
    ranks = spawn_tp2(path, tmp_path, "fp8")
    for rank, (_, _, scales) in enumerate(ranks):
        assert all(torch.equal(a, b[3 * rank : 3 * rank + 3]) for a, b in zip(scales, given)), rank
    assert ranks[0][0] == ref


def test_fp8_kv_scales_are_fixed_at_start_up():
    """One calibration pass when the LLM (and its engine) is built; no prompt changes them later."""
    llm = LLM.from_config(CONFIG, device="cpu", max_context=128, max_batch=2, seed=3, kv_cache_dtype="fp8")
    scales = [s.clone() for s in llm.cache.k_scale + llm.cache.v_scale]
    assert llm.cache.calibrated and all(((s > 0) & torch.isfinite(s)).all() for s in scales)
    assert llm.allocator.used == 0, "the calibration pass gave its blocks back"
    Engine(llm.loaded)  # a second engine on the same LLM does not calibrate again
    llm.generate_ids([PROMPTS[3], [250] * 60], max_new_tokens=4)
    assert all(torch.equal(a, b) for a, b in zip(scales, llm.cache.k_scale + llm.cache.v_scale))


def test_engine_package_imports_neither_the_llm_facade_nor_the_server():
    """The layering (issue 18): llama_kernels.engine is built from a LoadedModel; none of its modules
    imports llama_kernels.llm, the HTTP front end (llama_kernels.server) or a web framework."""
    import ast

    import llama_kernels.engine

    banned = ("llama_kernels.llm", "llama_kernels.server", "fastapi", "uvicorn", "starlette")
    for path in Path(llama_kernels.engine.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ["llama_kernels", "engine"][: 2 - node.level + 1] if node.level else []
                module = ".".join([*base, *([node.module] if node.module else [])])
                names = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith(banned), f"{path.name}:{node.lineno} imports {name}"
