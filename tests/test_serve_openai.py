"""The OpenAI API as real clients use it, on a live `llama-kernels serve` (SmolLM2, CPU) with the
`openai` client: null fields, ignored and unknown fields, n > 1, penalties and logit_bias, echo with
prompt logprobs (equal to LLM.logits), batch and token-id prompts, continuous usage stats, logprobs
details, structured outputs (20 JSON schemas), and a tool-call round trip."""

from __future__ import annotations

import json
import math
import re

import pytest
from conftest import needs_smollm2

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from test_serve import MODEL, PARIS, ServerProcess  # noqa: E402

pytestmark = [needs_smollm2, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ServerProcess(tmp_path_factory.mktemp("serve_openai"), "--max-num-seqs", "8")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def llm():
    from llama_kernels.llm import LLM

    return LLM.from_pretrained(max_context=512, progress=False)


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{path}", json=body, timeout=120)


def test_null_fields_ignored_fields_and_model_info(server):
    body = {"model": MODEL, "messages": PARIS, "max_tokens": 6, "temperature": 0, "stream": None, "logprobs": None,
            "top_logprobs": None, "n": None, "seed": None, "stop": None, "stream_options": None, "top_p": None,
            "presence_penalty": None, "logit_bias": None, "response_format": None, "tools": None,
            "tool_choice": None, "parallel_tool_calls": True, "service_tier": "auto", "store": False,
            "metadata": {"a": "b"}, "user": "u", "prompt_cache_key": "k", "safety_identifier": "s",
            "frobnicate": 1, "wibble": {"x": 2}}  # fmt: skip
    r = _post(server, "chat/completions", body)
    assert r.status_code == 200, r.text
    ref = server.client().chat.completions.create(model=MODEL, messages=PARIS, max_tokens=6, temperature=0)
    assert r.json()["choices"][0]["message"]["content"] == ref.choices[0].message.content
    warnings = [line for line in server.log.read_text().splitlines() if "frobnicate" in line]
    assert len(warnings) == 1 and "wibble" in warnings[0], warnings
    card = server.client().models.retrieve(MODEL)
    assert card.id == MODEL
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("gpt-4o")


def test_n_choices_greedy_seeded_and_streamed(server):
    client = server.client()
    greedy = client.chat.completions.create(model=MODEL, messages=PARIS, max_tokens=5, temperature=0, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.message.content for c in greedy.choices}) == 1
    one = client.chat.completions.create(model=MODEL, messages=PARIS, max_tokens=5, temperature=0)
    assert greedy.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert greedy.usage.completion_tokens == 3 * one.usage.completion_tokens
    kw = dict(model=MODEL, prompt="My favourite animal is the", max_tokens=5, temperature=1.0, seed=7, n=3)
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1  # each choice samples with its own seed
    texts = ["", "", ""]
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in first.choices]


def test_logit_bias_forces_and_bans_and_penalties_apply(server, llm):
    client = server.client()
    prompt = "The capital of France is"
    base = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    first = llm.tokenizer.encode(base.choices[0].text)[0]
    forced_id = llm.tokenizer.encode(" banana")[-1]
    forced = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0,
                                       logit_bias={str(forced_id): 100})  # fmt: skip
    assert forced.choices[0].text == llm.tokenizer.decode([forced_id] * 3)
    banned = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0,
                                       logit_bias={str(first): -100}, logprobs=1)  # fmt: skip
    assert banned.choices[0].text != llm.tokenizer.decode([first])
    long = dict(model=MODEL, prompt="List: apple, apple, apple, apple,", max_tokens=12, temperature=0)
    plain = client.completions.create(**long).choices[0].text
    penalized = client.completions.create(**long, frequency_penalty=2.0, presence_penalty=1.0).choices[0].text
    repeated = client.completions.create(**long, extra_body={"repetition_penalty": 1.5}).choices[0].text
    assert plain.count("apple") > penalized.count("apple") and repeated != plain
    tiny = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=1.0, top_p=5e-324)
    assert tiny.choices[0].text == base.choices[0].text  # top_p keeps the most likely token, never none
    extras = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, extra_body={
        "min_p": 0.1, "min_tokens": 2, "stop_token_ids": [first], "skip_special_tokens": False})  # fmt: skip
    assert extras.choices[0].finish_reason in ("stop", "length")


def test_best_of_returns_the_most_likely_candidates(server):
    client = server.client()
    kw = dict(model=MODEL, prompt="My favourite animal is the", max_tokens=5)
    plain = client.completions.create(**kw, temperature=0)
    greedy = client.completions.create(**kw, temperature=0, best_of=3)
    assert [c.text for c in greedy.choices] == [plain.choices[0].text] and greedy.choices[0].logprobs is None
    assert greedy.usage.completion_tokens == 3 * plain.usage.completion_tokens  # every candidate counts
    # choice i samples with seed + i: n=4 is best_of=4's candidates, each with its sampled tokens' logprobs
    four = client.completions.create(**kw, temperature=1.0, seed=11, n=4, logprobs=0)
    sums = [sum(c.logprobs.token_logprobs) for c in four.choices]
    assert len(set(sums)) == 4, sums  # (distinct candidates: the ranking below is well defined)
    ranked = sorted(four.choices, key=lambda c: -sum(c.logprobs.token_logprobs))
    assert [c.index for c in ranked[:2]] != [0, 1]  # (the seed makes taking the first two wrong)
    best = client.completions.create(**kw, temperature=1.0, seed=11, n=2, best_of=4, logprobs=0)
    assert [c.index for c in best.choices] == [0, 1]
    assert [(c.text, c.logprobs.token_logprobs) for c in best.choices] == [
        (c.text, c.logprobs.token_logprobs) for c in ranked[:2]]  # fmt: skip
    assert best.usage.completion_tokens == four.usage.completion_tokens
    quiet = client.completions.create(**kw, temperature=1.0, seed=11, n=2, best_of=4)  # ranked without logprobs
    assert [c.text for c in quiet.choices] == [c.text for c in ranked[:2]] and quiet.choices[0].logprobs is None
    two = client.completions.create(**{**kw, "prompt": ["One, two,", "The sky is"]}, temperature=0, best_of=2)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 2 * 2 * 5


def test_min_tokens_holds_stop_strings(server):
    """vLLM v1: no stop check (eos, stop_token_ids, stop strings) until min_tokens tokens are out; then a stop
    string ending in the later tokens' text ends the output."""
    client = server.client()
    kw = dict(model=MODEL, prompt="List some animals: cat, dog,", max_tokens=12, temperature=0,
              extra_body={"min_tokens": 4})  # fmt: skip
    free = client.completions.create(**kw, logprobs=0).choices[0]  # the same tokens, no stop string
    text, tokens = free.text, free.logprobs.tokens
    assert "".join(tokens) == text and len(tokens) == 12
    unchecked = len("".join(tokens[:4]))  # the first min_tokens tokens' text
    stop = ","
    early, late = text.find(stop), text.find(stop, unchecked)
    assert 0 <= early < unchecked and late >= unchecked, (text, tokens)  # the prompt makes this hold
    assert client.completions.create(**{**kw, "extra_body": None}, stop=stop).choices[0].text == text[:early]
    held = client.completions.create(**kw, stop=stop).choices[0]
    assert held.text == text[:late] and held.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stop=stop, stream=True) if c.choices)
    assert streamed == text[:late]


def test_echo_prompt_logprobs_equal_llm_logits(server, llm):
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = llm.tokenizer.encode(prompt)
    logp = llm.logits(ids).double().log_softmax(-1)
    for max_tokens, stream in [(1, False), (0, False), (2, True)]:
        kw = dict(model=MODEL, prompt=ids, max_tokens=max_tokens, temperature=0, logprobs=1, echo=True)
        if stream:
            chunks = [c.choices[0] for c in server.client().completions.create(**kw, stream=True) if c.choices]
            text = "".join(c.text for c in chunks)
            lps = [c.logprobs for c in chunks if c.logprobs is not None]
            tokens = [t for lp in lps for t in lp.tokens]
            token_lps = [v for lp in lps for v in lp.token_logprobs]
            offsets = [o for lp in lps for o in lp.text_offset]
        else:
            res = server.client().completions.create(**kw)
            text, lp = res.choices[0].text, res.choices[0].logprobs
            tokens, token_lps, offsets = lp.tokens, lp.token_logprobs, lp.text_offset
            assert res.usage.prompt_tokens == len(ids) and res.usage.completion_tokens == max_tokens
        assert text.startswith(prompt) and len(tokens) == len(ids) + max_tokens
        assert token_lps[0] is None
        for j in range(1, len(ids)):
            assert math.isclose(token_lps[j], float(logp[j - 1, ids[j]]), abs_tol=2e-4), j
        assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]  # across chunks too
        assert "".join(tokens) == llm.tokenizer.decode(ids, skip_special_tokens=False) + text[len(prompt):]
    # a request that ends on eos lists it too (counted in completion_tokens, as vLLM): lm-eval's scoring
    # drops the last entry as the generated token's, so without it the prompt's last logprob was lost
    eos = llm.tokenizer.tokenizer.token_to_id(llm.tokenizer.eos_token)
    for stream in (False, True):
        kw = dict(model=MODEL, prompt=ids, max_tokens=3, temperature=0, logprobs=1, echo=True, logit_bias={eos: 100})
        if stream:
            chunks = [c.choices[0] for c in server.client().completions.create(**kw, stream=True) if c.choices]
            lps, reason = [c.logprobs for c in chunks if c.logprobs is not None], chunks[-1].finish_reason
            tokens, token_lps = [t for lp in lps for t in lp.tokens], [v for lp in lps for v in lp.token_logprobs]
        else:
            res = server.client().completions.create(**kw)
            lp, reason = res.choices[0].logprobs, res.choices[0].finish_reason
            tokens, token_lps = lp.tokens, lp.token_logprobs
            assert res.usage.completion_tokens == 1
        assert reason == "stop" and len(tokens) == len(ids) + 1 and tokens[-1] == llm.tokenizer.eos_token
        assert math.isclose(token_lps[-1], float(logp[-1, eos]), abs_tol=2e-4)  # the model's, before the bias
        assert math.isclose(token_lps[-2], float(logp[-2, ids[-1]]), abs_tol=2e-4)


def test_batch_and_token_id_prompts_equal_one_by_one(server, llm):
    client = server.client()
    prompts = ["One, two,", "The sky is", "Paris is the capital of"]
    single = [client.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0).choices[0].text
              for p in prompts]  # fmt: skip
    batch = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2] and [c.text for c in batch.choices] == single
    ids = [llm.tokenizer.encode(p) for p in prompts]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert [c.text for c in by_ids.choices] == single
    assert by_ids.usage.prompt_tokens == sum(map(len, ids))
    # lm-evaluation-harness's loglikelihood request: token-id prompts, echo, logprobs=1, max_tokens=1
    scored = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1,
                                       seed=1234)  # fmt: skip
    for c, p in zip(scored.choices, ids, strict=True):
        lp = c.logprobs
        assert len(lp.token_logprobs) == len(p) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(t) >= 1 for t in lp.top_logprobs[1:])
    streamed = ["", "", ""]
    for chunk in client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == single


def test_continuous_usage_stats_and_logprobs_details(server):
    client = server.client()
    kw = dict(model=MODEL, messages=PARIS, max_tokens=8, temperature=0)
    full = client.chat.completions.create(**kw, logprobs=True, top_logprobs=0)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={
        "include_usage": True, "continuous_usage_stats": True}))  # fmt: skip
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and chunks[-1].usage.model_dump() == full.usage.model_dump()
    # guidellm's streamed completions: include_usage with continuous_usage_stats, usage in every chunk
    pieces = list(client.completions.create(model=MODEL, prompt="One, two,", max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True, "continuous_usage_stats": True}))  # fmt: skip
    assert all(c.usage is not None for c in pieces) and pieces[-1].usage.completion_tokens == 4
    content = full.choices[0].logprobs.content
    assert all(c.top_logprobs == [] for c in content)
    assert b"".join(bytes(c.bytes) for c in content).decode() == full.choices[0].message.content  # the token's bytes
    res = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=4, temperature=0, logprobs=0)
    lp = res.choices[0].logprobs
    assert all(top == {t: v} for t, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))  # the sampled token


def _valid(value, schema: dict) -> bool:
    """A JSON-schema check of the keywords the schemas below use."""
    if "enum" in schema:
        return value in schema["enum"]
    if "const" in schema:
        return value == schema["const"]
    if "anyOf" in schema:
        return any(_valid(value, s) for s in schema["anyOf"])
    kind = schema.get("type")
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    if kind in ("integer", "number"):
        if isinstance(value, bool) or not isinstance(value, int if kind == "integer" else (int, float)):
            return False
        return schema.get("minimum", -math.inf) <= value <= schema.get("maximum", math.inf)
    if kind is not None and not isinstance(value, kinds[kind]):
        return False
    if kind == "string":
        return len(value) <= schema.get("maxLength", 10**9) and re.fullmatch(schema.get("pattern", ".*"), value) is not None
    if kind == "array":
        return schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 10**9) and all(
            _valid(v, schema.get("items", {})) for v in value)  # fmt: skip
    if kind == "object":
        props = schema.get("properties", {})
        if not set(schema.get("required", [])) <= set(value):
            return False
        if schema.get("additionalProperties") is False and not set(value) <= set(props):
            return False
        return all(_valid(v, props[k]) for k, v in value.items() if k in props)
    return True


def _obj(props: dict, required=None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}  # fmt: skip


S = {"type": "string", "maxLength": 8}
SCHEMAS = [
    _obj({"name": S}), _obj({"age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    _obj({"ok": {"type": "boolean"}}), _obj({"color": {"enum": ["red", "green", "blue"]}}),
    _obj({"x": {"type": "number"}, "y": {"type": "number"}}), _obj({"tags": {"type": "array", "items": S,
                                                                         "maxItems": 2}}),
    _obj({"city": S, "country": S}), _obj({"kind": {"const": "point"}, "v": {"type": "integer"}}),
    _obj({"id": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"}}),
    _obj({"inner": _obj({"a": {"type": "integer", "minimum": 1, "maximum": 9}})}),
    _obj({"maybe": {"anyOf": [{"type": "integer"}, {"type": "null"}]}}),
    _obj({"scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 10}, "minItems": 1,
                     "maxItems": 3}}),
    _obj({"first": S, "last": S, "title": {"enum": ["Dr", "Mr", "Ms"]}}),
    _obj({"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}}),
    _obj({"lat": {"type": "number"}, "lon": {"type": "number"}, "label": S}),
    _obj({"items": {"type": "array", "items": _obj({"n": {"type": "integer"}}), "maxItems": 2}}),
    _obj({"word": S, "length": {"type": "integer", "minimum": 0, "maximum": 50}}),
    _obj({"status": {"enum": ["open", "closed"]}, "count": {"type": "integer", "minimum": 0, "maximum": 99}}),
    _obj({"flag": {"type": "boolean"}, "note": S}, required=["flag"]),
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 4},
]


def test_json_schema_outputs_parse_and_validate(server):
    import asyncio

    async def go():
        async with server.async_client() as client:
            return await asyncio.gather(*(client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Give an example as JSON."}], max_tokens=60,
                temperature=0.7, seed=i, response_format={"type": "json_schema", "json_schema": {
                    "name": f"s{i}", "schema": schema, "strict": True}}) for i, schema in enumerate(SCHEMAS)))

    results = asyncio.run(go())
    for schema, res in zip(SCHEMAS, results):
        choice = res.choices[0]
        assert choice.finish_reason == "stop", (schema, choice.message.content)
        value = json.loads(choice.message.content)
        assert _valid(value, schema), (schema, value)
    stream = server.client().chat.completions.create(model=MODEL, messages=PARIS, max_tokens=40, temperature=0,
                                                     stream=True, response_format={"type": "json_object"})  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict)
    r = _post(server, "chat/completions", {"model": MODEL, "messages": PARIS, "response_format": {
        "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "object", "minProperties": "x"}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
    choice = _post(server, "completions", {"model": MODEL, "prompt": "The best season is", "max_tokens": 8,
                                           "temperature": 0, "guided_choice": ["summer", "winter"]}).json()  # fmt: skip
    assert choice["choices"][0]["text"] in ("summer", "winter")


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
           "parameters": _obj({"city": {"type": "string", "maxLength": 20}})}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a city",
        "parameters": _obj({"city": {"type": "string", "maxLength": 20}})}}  # fmt: skip


def test_tool_call_round_trip(server):
    client = server.client()
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model=MODEL, messages=question, tools=[WEATHER, TIME], max_tokens=40, temperature=0,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})  # fmt: skip
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    content, calls, reasons, pieces = _streamed_calls(client.chat.completions.create(**kw, stream=True))
    assert reasons == ["tool_calls"] and content == "" and pieces > 2  # the arguments came in pieces
    assert [(c.function.name, c.function.arguments) for c in whole.message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in calls]
    call = calls[0]
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert _valid(args, WEATHER["function"]["parameters"])
    history = question + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function", "function": {
            "name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21, "sky": "sunny"})}]
    final = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER, TIME], max_tokens=8,
                                           temperature=0)  # fmt: skip
    assert final.choices[0].finish_reason in ("stop", "length") and final.choices[0].message.content
    assert final.choices[0].message.tool_calls is None
    required = client.chat.completions.create(model=MODEL, messages=question, tools=[WEATHER, TIME], max_tokens=40,
                                              temperature=0, tool_choice="required", parallel_tool_calls=False)  # fmt: skip
    assert required.choices[0].finish_reason == "tool_calls" and required.choices[0].message.content is None
    calls = required.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name in ("get_weather", "get_time")
    assert _valid(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
    _, streamed, reasons, _ = _streamed_calls(client.chat.completions.create(
        model=MODEL, messages=question, tools=[WEATHER, TIME], max_tokens=40, temperature=0, tool_choice="required",
        stream=True))  # fmt: skip
    assert reasons == ["tool_calls"] and [(c.function.name, c.function.arguments) for c in streamed] == [
        (c.function.name, c.function.arguments) for c in calls]


def _streamed_calls(stream) -> tuple[str, list, list[str], int]:
    """(content, tool calls accumulated from their deltas, finish reasons, argument pieces) of a chat stream."""
    content, calls, reasons, pieces = "", [], [], 0
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            reasons += [c.finish_reason] if c.finish_reason else []
            for d in c.delta.tool_calls or []:
                if d.index == len(calls):  # a call's first delta: its id, type and name
                    assert d.id and d.type == "function" and d.function.name and d.function.arguments == ""
                    calls.append(d)
                else:
                    assert d.id is None and d.function.name is None
                    calls[d.index].function.arguments += d.function.arguments
                    pieces += 1
    return content, calls, reasons, pieces


def test_langchain_chat_openai(server):
    """LangChain's ChatOpenAI and OpenAI wrappers (langchain-openai, in the test extra): tools, structured
    output (its three methods), n, penalties, and a batch of prompts in one completions request."""
    lc = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from pydantic import BaseModel

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny, 21 C"

    class Person(BaseModel):
        name: str
        age: int

    kw = dict(base_url=server.url + "/v1", api_key="none", model=MODEL, temperature=0, max_tokens=40)
    llm = lc.ChatOpenAI(**kw)
    question = [HumanMessage("What is the weather in Paris?")]
    ai = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(question)
    (call,) = ai.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    chunks = list(llm.bind_tools([get_weather], tool_choice="get_weather").stream(question))
    streamed = sum(chunks[1:], chunks[0])  # LangChain's tool_call_chunks, merged by index
    assert len(chunks) > 3 and [(c["name"], c["args"]) for c in streamed.tool_calls] == [(call["name"], call["args"])]
    answer = llm.bind_tools([get_weather]).invoke([*question, ai, ToolMessage(get_weather.invoke(call["args"]),
                                                                              tool_call_id=call["id"])])  # fmt: skip
    assert answer.content
    for method in ("json_schema", "function_calling"):
        person = llm.with_structured_output(Person, method=method).invoke("Describe Ann, 31, as JSON.")
        assert isinstance(person, Person)
    # json_mode: response_format json_object, parsed by LangChain (the 135M model's keys and values are its own)
    raw = llm.with_structured_output(Person, method="json_mode", include_raw=True).invoke(
        "Describe Ann, 31, as JSON with keys name and age.")["raw"]  # fmt: skip
    assert isinstance(json.loads(raw.content), dict)
    two = lc.ChatOpenAI(**{**kw, "temperature": 1.0, "max_tokens": 4}, n=2, presence_penalty=0.5,
                        frequency_penalty=0.5).generate([[HumanMessage("Hi")]])  # fmt: skip
    assert len(two.generations[0]) == 2
    completions = lc.OpenAI(**{**kw, "max_tokens": 4}).batch(["One, two,", "The sky is"])
    assert len(completions) == 2 and all(completions)
