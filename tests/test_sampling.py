"""Per-request sampling parameters applied to the batch's logits (llama_kernels.engine.sampling):
penalties, logit_bias, min_p / top_p / top_k, min_tokens, prompt logprobs, grammars, against
per-row float64 references and end to end in the engine (each request of a mixed batch as alone)."""

from __future__ import annotations

import dataclasses
import json
import re
import threading

import pytest
import torch
from conftest import needs_smollm2
from conftest import output_tokens as tokens
from conftest import run_engine as run

from llama_kernels.engine import Engine, SamplingParams
from llama_kernels.engine.sampling import Grammar, apply_bitmask, apply_logit_bias, apply_penalties, filter_logits
from llama_kernels.llm import LLM
from llama_kernels.model import LlamaConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, max_position_embeddings=256)  # fmt: skip
PROMPT = [(5 * j) % 250 + 3 for j in range(23)]


@pytest.fixture(scope="module")
def llm():
    return LLM.from_config(CONFIG, device="cpu", max_context=128, max_batch=4, seed=5)


def test_penalties_and_bias_match_a_per_row_reference():
    g = torch.Generator().manual_seed(0)
    v = 50
    logits = torch.randn(4, v, generator=g) * 3
    params = [SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4), SamplingParams(),
              SamplingParams(repetition_penalty=1.8, logit_bias=((3, 250.0), (7, -5.5), (3, 1.0))),
              SamplingParams(repetition_penalty=0.6, frequency_penalty=2.0)]  # fmt: skip
    prompts = [[1, 2, 2], [4], [9, 10, 3], [11, 11, 12]]
    outputs = [[5, 5, 5, 6], [], [10, 20], [12, 13, 13]]
    ref = logits.double().clone()
    for i, p in enumerate(params):  # the definitions, one token at a time
        for t in range(v):
            count = outputs[i].count(t)
            if t in prompts[i] or count:
                x = ref[i, t]
                ref[i, t] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
            ref[i, t] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
        bias = {}
        for t, b in p.logit_bias:
            bias[t] = bias.get(t, 0.0) + max(-100.0, min(100.0, b))
        for t, b in bias.items():
            ref[i, t] += b
    out = logits.clone()
    apply_penalties(out, params, prompts, outputs)
    apply_logit_bias(out, params)
    assert (out.double() - ref).abs().max() < 1e-5
    assert torch.equal(out[1], logits[1])  # an unpenalized row is untouched


def test_filters_keep_the_most_likely_token_and_match_a_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 40, generator=g) * 2
    temp = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.7])
    top_k = torch.tensor([40, 5, 40, 1, 40])
    top_p = torch.tensor([5e-324, 1.0, 0.8, 1.0, 0.9], dtype=torch.float64)
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.3])
    out = filter_logits(logits, temp, top_k, top_p, min_p)
    for i in range(5):
        x = logits[i].double() / temp[i]
        order = x.argsort(descending=True)
        keep = set(order[: int(top_k[i])].tolist())
        probs = torch.full_like(x, float("-inf"))
        probs[list(keep)] = x[list(keep)]
        probs = probs.softmax(-1)
        total, nucleus = 0.0, set()
        for t in order.tolist():
            if t in keep and (total < top_p[i] or not nucleus):
                nucleus.add(t)
                total += float(probs[t])
        p2 = torch.full_like(x, float("-inf"))
        p2[list(nucleus)] = x[list(nucleus)]
        p2 = p2.softmax(-1)
        final = {t for t in nucleus if p2[t] >= min_p[i] * p2.max()}
        assert set(torch.isfinite(out[i]).nonzero()[:, 0].tolist()) == final, i
        assert int(order[0]) in final
    assert torch.isfinite(out[0]).sum() == 1  # top_p = 5e-324 keeps exactly the most likely token


def test_bitmask_applies_llguidance_layout():
    logits = torch.zeros(3, 70)
    bitmask = torch.tensor([[0b101, -(1 << 31), 0], [-1, -1, -1]], dtype=torch.int32)  # bit 31 of word 1: token 63
    apply_bitmask(logits, [0, 2], bitmask)
    assert torch.isfinite(logits[0]).nonzero()[:, 0].tolist() == [0, 2, 63]
    assert torch.isfinite(logits[1]).all() and torch.isfinite(logits[2]).sum() == 70
    narrow = torch.zeros(1, 70)
    apply_bitmask(narrow, [0], torch.full((1, 2), -1, dtype=torch.int32))  # a mask of 64 tokens: the rest forbidden
    assert torch.isfinite(narrow[0]).nonzero()[:, 0].tolist() == list(range(64))


def test_logit_bias_and_penalties_in_a_mixed_batch(llm):
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    plain = tokens(run(Engine(llm.loaded), {"a": (PROMPT, greedy)})["a"])
    pick = next(t for t in range(3, 250) if t not in plain)
    forced = dataclasses.replace(greedy, logit_bias=((pick, 100.0),))
    banned = dataclasses.replace(greedy, logit_bias=((plain[0], -100.0),))
    penal = dataclasses.replace(greedy, frequency_penalty=2.0, presence_penalty=2.0)
    sampled = SamplingParams(max_tokens=10, temperature=1.0, seed=3, repetition_penalty=1.3, min_p=0.05,
                             ignore_eos=True)  # fmt: skip
    reqs = {"plain": (PROMPT, greedy), "forced": (PROMPT, forced), "banned": (PROMPT, banned),
            "penal": (PROMPT, penal), "sampled": (PROMPT[:9], sampled)}  # fmt: skip
    outs = run(Engine(llm.loaded, max_num_seqs=8), reqs)
    assert tokens(outs["plain"]) == plain
    assert tokens(outs["forced"]) == [pick] * 10
    assert plain[0] not in tokens(outs["banned"])
    pen = tokens(outs["penal"])
    assert len(set(pen)) > len(set(plain)) or len(set(pen)) == 10  # repeats are penalized
    for rid, (prompt, p) in reqs.items():  # each as it would be alone
        assert tokens(outs[rid]) == tokens(run(Engine(llm.loaded, max_num_seqs=1), {"x": (prompt, p)})["x"]), rid


def test_min_tokens_masks_the_stop_ids(llm):
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    free = tokens(run(Engine(llm.loaded), {"a": (PROMPT, greedy)})["a"])
    stop = dataclasses.replace(greedy, stop_token_ids=(free[0],))
    out = run(Engine(llm.loaded), {"a": (PROMPT, stop)})["a"]
    assert tokens(out) == [] and out[-1].finish_reason == "stop" and out[-1].completion_tokens == 1
    out = run(Engine(llm.loaded), {"a": (PROMPT, dataclasses.replace(stop, min_tokens=3))})["a"]
    got = tokens(out)
    assert len(got) >= 3 and free[0] not in got[:3]


@pytest.mark.parametrize("chunk", [5, 64])
def test_prompt_logprobs_equal_the_logits(llm, chunk):
    ref = llm.logits(PROMPT).double().log_softmax(-1)
    params = SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=4, logprobs=2, ignore_eos=True)
    other = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    outs = run(Engine(llm.loaded, max_num_seqs=4, prefill_chunk=chunk), {"o": (PROMPT[:7], other), "p": (PROMPT, params)})
    first = outs["p"][0].prompt_logprobs
    assert first[0] is None and len(first) == len(PROMPT)
    assert all(o.prompt_logprobs is None for o in outs["p"][1:] + outs["o"])
    for j in range(1, len(PROMPT)):
        lp = first[j]
        assert lp.token_id == PROMPT[j] and abs(lp.logprob - float(ref[j - 1, PROMPT[j]])) < 1e-4
        top = ref[j - 1].topk(4)
        assert [t for t, _ in lp.top] == top.indices.tolist()
    assert tokens(outs["p"]) == tokens(run(Engine(llm.loaded), {"x": (PROMPT, other)})["x"])


def test_new_params_are_checked(llm):
    engine = Engine(llm.loaded)
    for kw, words in [({"min_p": 1.5}, "min_p=1.5"), ({"presence_penalty": 3}, "presence_penalty=3"),
                      ({"repetition_penalty": 0}, "repetition_penalty=0"), ({"min_tokens": -1}, "min_tokens=-1"),
                      ({"logit_bias": ((1, float("nan")),)}, "logit_bias="), ({"prompt_logprobs": 21}, "21"),
                      ({"logit_bias": ((256, 1.0),)}, "logit_bias token id 256")]:  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(words)):
            engine.add_request("a", [1, 2], SamplingParams(**kw))
    assert not engine.has_unfinished()


@pytest.fixture(scope="module")
def smol():
    return LLM.from_pretrained(None, max_context=256, max_batch=4, progress=False)


@needs_smollm2
def test_grammars_constrain_the_output(smol):
    pytest.importorskip("llguidance")
    tok = smol.tokenizer
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
              "age": {"type": "integer"}}, "required": ["name", "age"], "additionalProperties": False}  # fmt: skip
    prompt = tok.apply_chat_template([{"role": "user", "content": "Describe a person as JSON."}])
    reqs = {"json": (prompt, SamplingParams(max_tokens=40, temperature=0, grammar=Grammar("json", json.dumps(schema)))),
            "regex": (prompt, SamplingParams(max_tokens=10, temperature=0.8, seed=1, grammar=Grammar("regex", r"[0-9]{3}-[a-z]{2}"))),
            "free": (prompt, SamplingParams(max_tokens=5, temperature=0))}  # fmt: skip
    engine = Engine(smol.loaded, max_num_seqs=4)
    outs = run(engine, reqs)
    text = {rid: "".join(o.new_text for o in outs[rid]) for rid in outs}
    value = json.loads(text["json"])
    assert set(value) == {"name", "age"} and isinstance(value["age"], int) and len(value["name"]) <= 12
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text["regex"]), text["regex"]
    assert outs["json"][-1].finish_reason == "stop"
    with pytest.raises(ValueError, match="grammar"):
        engine.add_request("bad", prompt, SamplingParams(grammar=Grammar("json", "{not json")))
    with pytest.raises(ValueError, match="grammar"):
        engine.add_request("bad", prompt, SamplingParams(grammar=Grammar("regex", "(")))
    with pytest.raises(ValueError, match="grammar"):
        engine.compile_grammar(Grammar("lark", "start: ("))
    assert not engine.has_unfinished()
    # a server compiles on a worker thread; the engine's add_request then finds it cached
    digits = Grammar("regex", "[0-9]{4}")
    worker = threading.Thread(target=engine.compile_grammar, args=(digits,))
    worker.start()
    worker.join()
    assert digits in engine._grammars._cache
    out = run(engine, {"d": (prompt, SamplingParams(max_tokens=8, temperature=0, grammar=digits))})["d"]
    assert re.fullmatch("[0-9]{4}", "".join(o.new_text for o in out))


class Letters:
    """Token 0 is a special token "<s>"; token i > 0 decodes to the i-th letter."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(("" if skip_special_tokens else "<s>") if i == 0 else chr(96 + i) for i in ids)


def test_detokenizer_include_stop_str_and_special_tokens():
    from llama_kernels.engine.detokenizer import Detokenizer

    def text(detok: Detokenizer, ids: list[int]) -> str:
        return "".join(detok.add([i]) for i in ids) + detok.finish()

    assert text(Detokenizer(Letters(), ("cd",)), [1, 2, 3, 4, 5]) == "ab"
    assert text(Detokenizer(Letters(), ("cd",), include_stop=True), [1, 2, 3, 4, 5]) == "abcd"
    assert text(Detokenizer(Letters()), [0, 1, 0]) == "a"
    assert text(Detokenizer(Letters(), skip_special_tokens=False), [0, 1, 0]) == "<s>a<s>"


def test_detokenizer_min_tokens_holds_stop_strings():
    """vLLM v1: no stop string counts until more than min_tokens tokens are out, then one ending in their text."""
    from llama_kernels.engine.detokenizer import Detokenizer

    def text(stop: tuple[str, ...], ids: list[int], min_tokens: int, **kw) -> str:
        d = Detokenizer(Letters(), stop, min_tokens=min_tokens, **kw)
        return "".join(d.add([i]) for i in ids) + d.finish()

    abcbd = [1, 2, 3, 2, 4]
    assert text(("b",), abcbd, 0) == "a" and text(("b",), abcbd, 1) == "a"
    assert text(("b",), abcbd, 2) == "abc" and text(("b",), abcbd, 3) == "abc"  # the 2nd token's b is ignored
    assert text(("b",), abcbd, 4) == "abcbd"  # none after the 4th token
    assert text(("b",), abcbd, 2, include_stop=True) == "abcb"
    assert text(("bc",), abcbd, 2) == "a"  # it ends in the 3rd token's text: a match
    assert text(("ab",), [1, 2, 1, 2], 2) == "ab" and text(("ab",), [1, 2, 1, 2], 3) == "ab"
    assert text(("ab",), [1, 2, 1, 2], 4) == "abab"
    d = Detokenizer(Letters(), ("b",), min_tokens=2)
    assert d.add(abcbd) + d.finish() == "abc"  # tokens added together: the same as one by one
