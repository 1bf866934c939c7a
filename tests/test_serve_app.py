"""The HTTP layer (api_server, protocol, async_engine, metrics) in-process over a fake engine: every bad
input gets its OpenAI-shaped error and the server keeps serving; an engine failure fails only its
requests; auth, body size, disconnects. Fast (no model forward); the live-model tests are test_serve.py."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import needs_smollm2

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import llama_kernels  # noqa: E402
from llama_kernels.loader import open_checkpoint  # noqa: E402
from llama_kernels.engine.engine import RequestOutput, SamplingParams  # noqa: E402
from llama_kernels.server.metrics import parse as parse_metrics  # noqa: E402

pytestmark = needs_smollm2  # the tokenizer is the default model's

BLOCK = 16
POISON = "POISON"  # a prompt containing it makes the fake engine's step raise


class FakeEngine:
    """serve.Engine's interface without a model: every request replies with REPLY's tokens in turn
    (then eos), one token per step; blocks are counted per 16 tokens held."""

    def __init__(self, tokenizer, max_context: int = 256, blocks_total: int = 64) -> None:
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.blocks_total = blocks_total
        self.reply = tokenizer.encode(" The capital of France is Paris.")[-8:]  # no BOS
        self.eos = 2
        self.poison = tokenizer.encode(POISON)[-1]
        self.reqs: dict[str, dict] = {}  # id -> {"prompt", "params", "out"}
        self.aborted: list[str] = []  # ids with a final "abort" output pending
        self.prompt_total = self.gen_total = 0
        self.salts: dict[str, str] = {}  # id -> the cache_salt it came with

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    cache_salt: str | None = None) -> None:  # fmt: skip
        if request_id in self.reqs:
            raise ValueError(f"request_id={request_id!r} already exists")
        if len(prompt_ids) + params.max_tokens > self.max_context:
            raise ValueError(f"max_tokens={params.max_tokens}: over the context")
        self.reqs[request_id] = {"prompt": prompt_ids, "params": params, "out": []}
        if cache_salt is not None:
            self.salts[request_id] = cache_salt
        self.prompt_total += len(prompt_ids)

    def abort(self, request_id: str) -> None:
        if self.reqs.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def stop_followers(self) -> None:  # tensor parallel only
        pass

    def has_unfinished(self) -> bool:
        return bool(self.reqs or self.aborted)

    def step(self) -> list[RequestOutput]:
        if any(self.poison in r["prompt"] for r in self.reqs.values()):
            raise RuntimeError("injected failure")
        outs = [RequestOutput(rid, "", [], None, True, "abort", 0, 0) for rid in self.aborted]
        self.aborted = []
        for rid, r in list(self.reqs.items()):
            p, out = r["params"], r["out"]
            token = self.reply[len(out)] if len(out) < len(self.reply) else self.eos
            done_eos = token == self.eos and not p.ignore_eos
            if not done_eos:
                out.append(token)
                self.gen_total += 1
            finished = done_eos or len(out) >= p.max_tokens
            text = self.tokenizer.decode(out[-1:]) if not done_eos else ""
            reason = ("stop" if done_eos else "length") if finished else None
            outs.append(RequestOutput(rid, text, [] if done_eos else [token], None, finished, reason,
                                      len(r["prompt"]), len(out),
                                      cached_tokens=len(r["prompt"]) // BLOCK * BLOCK))  # fmt: skip
            if finished:
                del self.reqs[rid]
        time.sleep(0.01)  # a step takes time, as a real one does
        return outs

    def stats(self):
        used = sum(-(-(len(r["prompt"]) + len(r["out"])) // BLOCK) for r in self.reqs.values())
        return type("Stats", (), dict(num_running=len(self.reqs), num_waiting=0, kv_blocks_used=used,
                                      kv_blocks_total=self.blocks_total, prompt_tokens_total=self.prompt_total,
                                      generation_tokens_total=self.gen_total, num_preemptions=0,
                                      prefix_cache_queries=self.prompt_total, prefix_cache_hits=0,
                                      kv_blocks_cached=0, kv_blocks_cached_free=0))  # fmt: skip


class Server:
    """build_app over a FakeEngine, served by uvicorn on a free port in a thread."""

    def __init__(self, tokenizer, **app_args) -> None:
        import uvicorn

        from llama_kernels.server.api_server import build_app
        from llama_kernels.server.async_engine import AsyncEngine

        self.engine = FakeEngine(tokenizer)
        self.async_engine = AsyncEngine(self.engine)
        self.async_engine.start()
        app = build_app(self.async_engine, "fake", **app_args)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the test server did not start in 20 s"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.async_engine.shutdown()

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=10).text)


@pytest.fixture(scope="module")
def tokenizer():
    return open_checkpoint(None).tokenizer


@pytest.fixture(scope="module")
def server(tokenizer):
    s = Server(tokenizer, max_body_bytes=4096)
    yield s
    s.stop()


MSG = [{"role": "user", "content": "What is the capital of France?"}]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def _post(server: Server, path: str, body, headers=None) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"content-type": "application/json", **(headers or {})}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=30)


def _assert_good(server: Server) -> None:
    r = _post(server, CHAT, {"model": "fake", "messages": MSG, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == " The capital of France"


# (path, body, status, param, words the message must contain)
BAD = [
    (CHAT, b"{not json", 400, None, ["malformed JSON"]),
    (CHAT, b"[1, 2]", 400, None, ["JSON object"]),
    (CHAT, {"model": "fake"}, 400, "messages", ["messages", "required"]),
    (CHAT, {"messages": []}, 400, "messages", ["messages", "at least 1"]),
    (CHAT, {"messages": "hi"}, 400, "messages", ["'hi'", "array"]),
    (CHAT, {"messages": [{"role": "bot", "content": "x"}]}, 400, "messages[0].role", ["'bot'", "'user'"]),
    (CHAT, {"messages": [{"role": "user", "content": 7}]}, 400, "messages[0].content", ["=7", "string"]),
    (CHAT, {"messages": MSG, "max_tokens": 0}, 400, "max_tokens", ["max_tokens=0", "greater than or equal to 1"]),
    (CHAT, {"messages": MSG, "max_tokens": "5"}, 400, "max_tokens", ["max_tokens='5'", "integer"]),
    (CHAT, {"messages": MSG, "max_completion_tokens": -3}, 400, "max_completion_tokens", ["-3"]),
    (CHAT, {"messages": MSG, "max_tokens": 100000}, 400, "max_tokens", ["max_tokens=100000", "256"]),
    (CHAT, {"messages": MSG, "temperature": "hot"}, 400, "temperature", ["'hot'", "number"]),
    (CHAT, {"messages": MSG, "temperature": 3}, 400, "temperature", ["temperature=3", "less than or equal to 2"]),
    (CHAT, {"messages": MSG, "top_p": 0}, 400, "top_p", ["top_p=0", "greater than 0"]),
    (CHAT, {"messages": MSG, "stop": 5}, 400, "stop", ["stop=5", "string"]),
    (CHAT, {"messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", ["5 strings", "at most 4"]),
    (CHAT, {"messages": MSG, "stop": "x" * 257}, 400, "stop", ["at most 256 characters"]),
    (CHAT, {"messages": MSG, "n": 0}, 400, "n", ["n=0", "greater than or equal to 1"]),
    (CHAT, {"messages": MSG, "n": 17}, 400, "n", ["n=17", "16"]),
    (CHAT, {"messages": MSG, "best_of": 3}, 400, "best_of", ["best_of=3", "n=1"]),
    (COMPLETIONS, {"prompt": "x", "n": 3, "best_of": 2}, 400, "best_of", ["best_of=2", "n=3", "best_of >= n"]),
    (COMPLETIONS, {"prompt": "x", "best_of": 2, "stream": True}, 400, "best_of", ["best_of=2", "stream"]),
    (COMPLETIONS, {"prompt": "x", "best_of": 17}, 400, "best_of", ["best_of=17", "16"]),
    (CHAT, {"messages": MSG, "presence_penalty": 2.5}, 400, "presence_penalty", ["2.5", "2"]),
    (CHAT, {"messages": MSG, "frequency_penalty": "x"}, 400, "frequency_penalty", ["'x'", "number"]),
    (CHAT, {"messages": MSG, "repetition_penalty": 0}, 400, "repetition_penalty", ["=0", "greater than 0"]),
    (CHAT, {"messages": MSG, "min_p": 1.5}, 400, "min_p", ["1.5"]),
    (CHAT, {"messages": MSG, "min_tokens": -1}, 400, "min_tokens", ["-1"]),
    (CHAT, {"messages": MSG, "top_k": -2}, 400, "top_k", ["-2"]),
    (CHAT, {"messages": MSG, "stop_token_ids": [-1]}, 400, "stop_token_ids", ["-1"]),
    (CHAT, {"messages": MSG, "stop_token_ids": [99999999]}, 400, "stop_token_ids", ["99999999", "49152"]),
    (CHAT, {"messages": MSG, "skip_special_tokens": "no"}, 400, "skip_special_tokens", ["'no'", "boolean"]),
    (CHAT, {"messages": MSG, "include_stop_str_in_output": 1}, 400, "include_stop_str_in_output", ["=1"]),
    (CHAT, {"messages": MSG, "ignore_eos": "x"}, 400, "ignore_eos", ["'x'"]),
    (CHAT, {"messages": MSG, "logit_bias": {"abc": 1}}, 400, "logit_bias", ["'abc'", "token ids"]),
    (CHAT, {"messages": MSG, "logit_bias": {"99999999": 1}}, 400, "logit_bias", ["99999999", "49152"]),
    (CHAT, {"messages": MSG, "logit_bias": {"5": "x"}}, 400, "logit_bias.5", ["'x'", "number"]),
    (CHAT, {"messages": MSG, "tools": [{"type": "function"}]}, 400, "tools[0].function", ["required"]),
    (CHAT, {"messages": MSG, "tool_choice": "required"}, 400, "tool_choice", ["needs tools"]),
    (CHAT, {"messages": MSG, "tool_choice": "sometimes"}, 400, "tool_choice", ["'sometimes'"]),
    (CHAT, {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice", ["'g'", "['f']"]),
    (CHAT, {"messages": MSG, "parallel_tool_calls": "x"}, 400, "parallel_tool_calls", ["'x'"]),
    (CHAT, {"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content", ["null"]),
    (CHAT, {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
            "function": {"name": "f", "arguments": "{x"}}]}]}, 400, "messages[0].tool_calls", ["not JSON"]),
    (CHAT, {"messages": MSG, "response_format": {"type": "xml"}}, 400, "response_format.type", ["'xml'"]),
    (CHAT, {"messages": MSG, "response_format": {"type": "json_schema"}}, 400, "response_format.json_schema",
     ["json_schema"]),
    (CHAT, {"messages": MSG, "response_format": {"type": "json_object"}, "guided_regex": "a"}, 400,
     "response_format", ["at most one"]),
    (CHAT, {"messages": MSG, "stream": True, "stream_options": {"continuous_usage_stats": "x"}}, 400,
     "stream_options.continuous_usage_stats", ["'x'"]),
    (CHAT, {"messages": MSG, "audio": {"voice": "x"}}, 400, "audio", ["audio"]),
    (CHAT, {"messages": MSG, "echo": True}, 400, "echo", ["echo"]),
    (CHAT, {"messages": MSG, "cache_salt": ""}, 400, "cache_salt", ["cache_salt=''", "at least 1"]),
    (COMPLETIONS, {"prompt": "hi", "cache_salt": 5}, 400, "cache_salt", ["cache_salt=5", "string"]),
    (CHAT, {"messages": MSG, "stream_options": {"include_usage": True}}, 400, "stream_options", ["stream=true"]),
    (CHAT, {"messages": MSG, "top_logprobs": 3}, 400, "top_logprobs", ["logprobs=true"]),
    (CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", ["21", "20"]),
    (CHAT, {"model": "gpt-4o", "messages": MSG}, 404, "model", ["'gpt-4o'", "'fake'"]),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt", ["empty"]),
    (COMPLETIONS, {"prompt": [[1, 2], []]}, 400, "prompt", ["prompt[1] is empty"]),
    (COMPLETIONS, {"prompt": [[1, 2], ["a"]]}, 400, "prompt", ["prompt"]),
    (COMPLETIONS, {"prompt": ["a"] * 65}, 400, "prompt", ["65 prompts", "64"]),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", ["max_tokens=0", "echo"]),
    (COMPLETIONS, {"prompt": "hi", "suffix": "x"}, 400, "suffix", ["suffix"]),
    (COMPLETIONS, {"prompt": [1, 99999999]}, 400, "prompt", ["99999999", "49152"]),
    (COMPLETIONS, {"prompt": "hi", "echo": "yes"}, 400, "echo", ["'yes'"]),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 21}, 400, "logprobs", ["21"]),
    (COMPLETIONS, {"prompt": "x " * 300, "max_tokens": 1}, 400, "prompt", ["tokens", "256"]),
    (COMPLETIONS, {"prompt": "hi", "model": "nope"}, 404, "model", ["'nope'"]),
    (COMPLETIONS, "x" * 5000, 413, None, ["5000", "4096"]),
]


@pytest.mark.parametrize("path,body,status,param,words", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input_gets_openai_error_and_server_keeps_serving(server, path, body, status, param, words):
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param
    for w in words:
        assert w in err["message"], (w, err["message"])
    _assert_good(server)


def test_unknown_route_and_method_are_openai_errors(server):
    r = httpx.get(server.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and "/v1/nothing" in r.json()["error"]["message"]
    r = httpx.get(server.url + CHAT, timeout=10)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_chunked_oversized_body_is_413(server):
    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    r = httpx.post(server.url + CHAT, content=chunks(), headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 413, r.text
    _assert_good(server)


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded", "application/jsonx"])
def test_a_body_that_is_not_json_is_415(server, ctype):
    """A text/plain POST needs no CORS preflight: parsed as JSON, any web page could make a key-less server work."""
    body = json.dumps({"messages": MSG, "max_tokens": 2}).encode()
    headers = {"content-type": ctype} if ctype else {}
    r = httpx.post(server.url + CHAT, content=body, headers=headers, timeout=10)
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], r.text
    assert _post(server, CHAT, body, {"content-type": "application/json; charset=utf-8"}).status_code == 200


def test_a_prompt_too_long_in_bytes_is_refused_before_tokenizing(tokenizer, monkeypatch):
    """A prompt of more bytes than context x the longest token cannot fit: 400 without running the tokenizer."""
    s = Server(tokenizer)  # the default body limit: the context's worth of prompt bytes
    try:
        calls = []
        monkeypatch.setattr(tokenizer, "encode", lambda text: calls.append(text) or [1])
        n = tokenizer.max_token_bytes * s.engine.max_context
        for path, body in ((COMPLETIONS, {"prompt": "x" * n}), (CHAT, {"messages": [{"role": "user", "content": "x" * n}]})):
            r = _post(s, path, body)
            assert r.status_code == 400 and f"{n} bytes" in r.json()["error"]["message"], r.text
        assert calls == []
        monkeypatch.undo()
        _assert_good(s)
    finally:
        s.stop()


def test_completions_past_max_concurrency_get_503_and_idle_connections_do_not_count(tokenizer):
    s = Server(tokenizer, max_concurrency=2)
    try:
        host, port = s.url.split("//")[1].split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(5)]  # connections, no request
        _assert_good(s)

        async def go():
            async with httpx.AsyncClient(timeout=30) as client:
                body = {"prompt": "hello", "max_tokens": 60, "ignore_eos": True, "stream": True}
                async with client.stream("POST", s.url + COMPLETIONS, json=body) as a, \
                        client.stream("POST", s.url + COMPLETIONS, json=body) as b:
                    assert a.status_code == b.status_code == 200
                    return await client.post(s.url + COMPLETIONS, json={"prompt": "hi", "max_tokens": 2})

        r = asyncio.run(go())
        assert r.status_code == 503 and "--max-concurrency 2" in r.json()["error"]["message"], r.text
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + 2
        while s.async_engine.num_requests:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        _assert_good(s)
    finally:
        s.stop()


def test_a_body_slower_than_the_deadline_is_408(tokenizer):
    s = Server(tokenizer, body_timeout=0.5)
    try:
        host, port = s.url.split("//")[1].split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"prompt\": ")
            sock.settimeout(10)
            start = time.monotonic()
            head = b""
            while piece := sock.recv(4096):  # the server closes the connection after the answer
                head += piece
        assert head.startswith(b"HTTP/1.1 408 ") and b"within 0.5 s" in head, head
        assert 0.4 < time.monotonic() - start < 5
        _assert_good(s)
    finally:
        s.stop()


def test_repeated_accept_errors_are_logged_once_per_interval(caplog):
    """accept() out of file descriptors repeats for every pending connection: one log line per interval."""
    from llama_kernels.server.launcher import _AcceptErrorLog

    handler, loop, seen = _AcceptErrorLog(interval=60), asyncio.new_event_loop(), []
    loop.default_exception_handler = seen.append
    try:
        with caplog.at_level("ERROR", logger="llama_kernels.server.launcher"):
            for _ in range(1000):
                handler(loop, {"message": "socket.accept() out of system resource", "exception": OSError(24, "EMFILE")})
            handler(loop, {"message": "something else"})
    finally:
        loop.close()
    assert len(caplog.records) == 1 and "accept() failed 1 time(s)" in caplog.records[0].getMessage()
    assert handler.count == 999 and seen == [{"message": "something else"}]


def test_api_key(tokenizer):
    s = Server(tokenizer, api_key="sekret")
    try:
        body = {"messages": MSG, "max_tokens": 2}
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "sekret"}):
            r = _post(s, CHAT, body, headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (headers, r.text)
        assert httpx.get(s.url + "/v1/models", timeout=10).status_code == 401
        assert _post(s, CHAT, body, {"authorization": "Bearer sekret"}).status_code == 200
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200  # probes need no key
    finally:
        s.stop()


def test_unknown_fields_warn_once_or_are_refused_with_strict_api(tokenizer, caplog):
    body = {"messages": MSG, "max_tokens": 2, "frobnicate": 1, "wibble": 2, "service_tier": "auto", "store": True}
    s = Server(tokenizer)
    try:
        with caplog.at_level("WARNING", logger="llama_kernels.server.api_server"):
            assert _post(s, CHAT, body).status_code == 200
        lines = [r.getMessage() for r in caplog.records if "frobnicate" in r.getMessage()]
        assert lines == ["/v1/chat/completions: ignored unknown field(s) frobnicate, wibble"]
    finally:
        s.stop()
    s = Server(tokenizer, strict_api=True)
    try:
        r = _post(s, CHAT, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "frobnicate", r.text
        del body["frobnicate"], body["wibble"]
        assert _post(s, CHAT, body).status_code == 200  # ignorable OpenAI fields still pass
    finally:
        s.stop()


def test_llama31_tool_calls_are_parsed_and_prompted():
    from llama_kernels.server.protocol import ChatCompletionRequest, parse
    from llama_kernels.server.tools import forced_call_schema, parse_calls, template_messages

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "42"}]  # fmt: skip

    def req(**kw):
        return parse(ChatCompletionRequest, json.dumps({"messages": history, "tools": [tool], **kw}).encode())[0]

    r = req()
    two = '{"name": "f", "parameters": {"x": 1}}; {"name": "f", "arguments": {"y": "é"}}'
    calls = parse_calls(two, r)
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"x": 1}, {"y": "é"}]
    assert len({c["id"] for c in calls}) == 2 and calls[0]["type"] == "function"
    assert len(parse_calls(two, req(parallel_tool_calls=False))) == 1
    assert parse_calls('<|python_tag|>{"name": "f", "parameters": {}}', r)[0]["function"]["name"] == "f"
    for text in ('{"name": "g", "parameters": {}}', "Hello", '{"name": "f"}', '{"name": "f", "parameters": {}} x',
                 '{"name": "f", "parameters": {}} "x"', '{"name": "f", "parameters": []}', '[1]'):
        assert parse_calls(text, r) is None, text
    messages, tools = template_messages(r, template_has_tools=False)
    assert tools is None and messages[0]["content"].startswith("Given the following functions")
    assert '"name": "f"' in messages[0]["content"] and messages[0]["content"].endswith("hi")
    assert json.loads(messages[1]["content"]) == {"name": "f", "parameters": {"a": 1}}
    assert messages[2] == {"role": "tool", "content": "42", "tool_call_id": "c1"}
    messages, tools = template_messages(r, template_has_tools=True)
    assert tools == [tool] and messages[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert template_messages(req(tool_choice="none"), False)[0][0]["content"] == "hi"
    assert forced_call_schema(r) is None
    named = forced_call_schema(req(tool_choice={"type": "function", "function": {"name": "f"}}))
    assert named["properties"]["name"] == {"const": "f"} and named["required"] == ["name", "parameters"]
    tool["function"]["parameters"] = {"type": "object", "properties": {"a": {"type": "integer"}}}
    closed = forced_call_schema(req(tool_choice="required"))["properties"]["parameters"]
    assert closed == {**tool["function"]["parameters"], "additionalProperties": False}  # no invented arguments


def _stream_calls(stream, pieces: list[str]) -> tuple[str, list[dict], bool, list[dict]]:
    """(content, tool calls accumulated as the openai client does, called, every delta) of pieces fed to stream."""
    deltas = [d for p in pieces for d in stream.feed(p)]
    last, called = stream.finish()
    deltas += last
    content, calls = "", []
    for d in deltas:
        content += d.get("content", "")
        for c in d.get("tool_calls", []):
            if c["index"] == len(calls):  # a call's first delta: id, type, name, arguments ""
                assert c["id"].startswith("call_") and c["type"] == "function" and c["function"]["arguments"] == ""
                calls.append({"id": c["id"], "type": "function", "function": dict(c["function"])})
            else:
                assert set(c) == {"index", "function"} and set(c["function"]) == {"arguments"}, c
                calls[c["index"]]["function"]["arguments"] += c["function"]["arguments"]
    return content, calls, called, deltas


def test_tool_calls_stream_as_argument_deltas():
    """ToolCallStream: any split of the text gives the calls parse_calls finds (names, ids once, the
    arguments' pieces adding up to the same text), no call JSON in content, content as soon as the text
    cannot be a call."""
    import random

    from llama_kernels.server.protocol import ChatCompletionRequest, parse
    from llama_kernels.server.tools import ToolCallStream, parse_calls

    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("f", "fg")]

    def req(**kw):
        body = {"messages": [{"role": "user", "content": "hi"}], "tools": tools, **kw}
        return parse(ChatCompletionRequest, json.dumps(body).encode())[0]

    rng = random.Random(0)
    texts = ['{"name": "f", "parameters": {"x": 1, "s": "a}{\\"b"}}',
             ' <|python_tag|>{"parameters": {"y": [1, {"z": null}]}, "name": "fg"}',
             '{"name": "fg", "arguments": {"y": "\u00e9"}}; {"name": "f", "parameters": {}}\n;'
             '{"name":"f","parameters":{"q":2}}',
             '{"name":"f","parameters":{"a":1},"extra":[1,2]}']  # fmt: skip
    for text in texts:
        for r in (req(), req(parallel_tool_calls=False)):
            want = parse_calls(text, r)
            assert want is not None, text
            for split in range(6):  # by characters, and in random pieces
                cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, len(text) // 3))) if split else []
                pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])] if split else list(text)
                content, calls, called, deltas = _stream_calls(ToolCallStream(r), pieces)
                assert called and content == "", (text, content)
                assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
                    (c["function"]["name"], c["function"]["arguments"]) for c in want], (text, pieces)
                if not split and text.startswith('{"name"'):  # streamed as generated: arguments in pieces
                    assert sum("arguments" in d.get("tool_calls", [{}])[0]["function"] for d in deltas) > 3
    for text, streamed_early in [("Hello there", True), ('  {"answer": 1}', False), ('{"name": "g", "x": 1}', True),
                                 ('{"name": "f", "parameters": {"x": 1}} and more', False)]:  # fmt: skip
        content, calls, called, deltas = _stream_calls(ToolCallStream(req()), list(text))
        assert not called and parse_calls(text, req()) is None
        if streamed_early:  # plain text as it comes, no call
            assert content == text and calls == [] and len(deltas) > 1, (text, deltas)
        elif "answer" in text:  # held while it might be a call, then all of it
            assert content == text and len(deltas) == 1
        else:  # a call was streamed and the rest never became one: no content, not tool_calls
            assert content == "" and len(calls) == 1


def test_engine_failure_fails_only_its_request(server):
    r = _post(server, COMPLETIONS, {"prompt": f"say {POISON}", "max_tokens": 3})
    assert r.status_code == 500, r.text
    assert "injected failure" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
    _assert_good(server)
    assert server.metrics()["llama_kernels_kv_blocks_used"] == 0


def test_stream_format_and_usage(server):
    body = {"messages": MSG, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + CHAT, json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == " The capital of France is"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert all(c["usage"] is None for c in chunks[:-1])


def test_cache_salt_reaches_the_engine_and_usage_reports_cached_tokens(server):
    body = {"prompt": "hello " * 40, "max_tokens": 2, "cache_salt": "tenant-7"}
    r = _post(server, COMPLETIONS, body)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]  # the fake engine reports the prompt's whole blocks as cached
    assert usage["prompt_tokens_details"] == {"cached_tokens": usage["prompt_tokens"] // BLOCK * BLOCK}
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0
    assert server.engine.salts.get(r.json()["id"] + "-0") == "tenant-7"  # choice 0's engine request


def test_disconnect_aborts_and_frees_blocks(server):
    async def go():
        async with httpx.AsyncClient(timeout=30) as client:
            body = {"prompt": "hello " * 40, "max_tokens": 200, "stream": True, "ignore_eos": True}
            async with client.stream("POST", server.url + COMPLETIONS, json=body) as r:
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen == 3:  # read the gauge, then hang up
                        return server.metrics()["llama_kernels_kv_blocks_used"]

    before = server.metrics().get('llama_kernels_request_success_total{finished_reason="abort"}', 0)
    assert asyncio.run(go()) > 0  # still held while streaming
    deadline = time.monotonic() + 1.0
    while server.metrics()["llama_kernels_kv_blocks_used"] != 0:
        assert time.monotonic() < deadline, "blocks not freed within a second of the disconnect"
        time.sleep(0.02)
    assert server.metrics()['llama_kernels_request_success_total{finished_reason="abort"}'] == before + 1


def test_metrics_exposition(server):
    _assert_good(server)
    text = httpx.get(server.url + "/metrics", timeout=10).text
    m = parse_metrics(text)
    for name in ("num_requests_running", "num_requests_waiting", "kv_blocks_used", "kv_blocks_total",
                 "prompt_tokens_total", "generation_tokens_total", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "kv_blocks_cached", "kv_blocks_cached_free"):  # fmt: skip
        assert f"llama_kernels_{name}" in m, name
    assert m["llama_kernels_kv_blocks_total"] == 64 and m["llama_kernels_generation_tokens_total"] >= 4
    for hist in ("time_to_first_token_seconds", "inter_token_latency_seconds"):
        buckets = [v for k, v in m.items() if k.startswith(f"llama_kernels_{hist}_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == m[f"llama_kernels_{hist}_count"] > 0
        assert f"# TYPE llama_kernels_{hist} histogram" in text


def test_disconnect_before_a_non_streamed_answer_aborts(server):
    body = {"prompt": "hello", "max_tokens": 200, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up (and closes the connection) after 0.3 s
        httpx.post(server.url + COMPLETIONS, json=body, timeout=httpx.Timeout(10, read=0.3))
    deadline = time.monotonic() + 1.0
    while server.metrics()["llama_kernels_kv_blocks_used"] != 0 or server.engine.reqs:
        assert time.monotonic() < deadline, "the abandoned request still runs a second after the disconnect"
        time.sleep(0.02)
    _assert_good(server)


def test_finish_counters_count_every_request_exactly_once(tokenizer):
    """A request whose client leaves while the engine finishes it, and one that leaves before the engine
    thread has seen it, are each counted once (as aborts)."""
    from llama_kernels.server.async_engine import AsyncEngine

    engine = FakeEngine(tokenizer)
    gate, in_step = threading.Event(), threading.Event()
    real_step = engine.step

    def step():
        in_step.set()
        assert gate.wait(10)
        return real_step()

    engine.step = step
    ae = AsyncEngine(engine)
    ae.start()

    async def go():
        params = SamplingParams(max_tokens=1, temperature=0)
        a = asyncio.ensure_future(anext(ae.generate("a", [1, 2, 3], params)))
        assert await asyncio.to_thread(in_step.wait, 10)  # the engine thread is in a step that finishes "a"
        b = asyncio.ensure_future(anext(ae.generate("b", [1, 2, 3], params)))
        await asyncio.sleep(0.05)  # "b" is queued for the engine thread, which is busy
        for task in (a, b):  # both clients leave
            task.cancel()
        await asyncio.gather(a, b, return_exceptions=True)
        gate.set()

    try:
        asyncio.run(go())
        deadline = time.monotonic() + 5
        while engine.has_unfinished() or ae._aborts or ae._adds:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        m = parse_metrics(ae.metrics.render())
        counts = {k: v for k, v in m.items() if k.startswith("llama_kernels_request_success_total")}
        assert counts == {'llama_kernels_request_success_total{finished_reason="abort"}': 2.0}, counts
    finally:
        gate.set()
        ae.shutdown()


def test_serve_package_and_cli_import_without_fastapi():
    code = ("import sys; sys.modules['fastapi'] = sys.modules['uvicorn'] = None\n"
            "import llama_kernels.engine, llama_kernels.server, llama_kernels.cli\n"
            "from llama_kernels.cli import main\n"
            "sys.exit(main(['serve', '--port', '0']))")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(llama_kernels.__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().endswith('pip install "llama-kernels[serve]"') and len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize("argv,words", [
    (["--max-num-seqs", "0"], ["--max-num-seqs=0", ">= 1"]),
    (["--port", "70000"], ["--port=70000", "65535"]),
    (["/nonexistent/model.gguf"], ["/nonexistent/model.gguf"]),
    (["--model", "/nonexistent/model.gguf"], ["/nonexistent/model.gguf"]),  # --model as generate/chat take it
    (["a.gguf", "--model", "b.gguf"], ["MODEL='a.gguf'", "--model='b.gguf'", "once"]),
])  # fmt: skip
def test_serve_command_bad_arguments_are_one_line(argv, words, capsys):
    import argparse

    from llama_kernels.server import serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    assert serve_cli.run(parser.parse_args(argv)) == 1  # a bad value: exit 1, as every command
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("llama-kernels serve: error: "), err
    for w in words:
        assert w in err, (w, err)


def test_a_dead_engine_thread_answers_500_and_health_503(tokenizer):
    s = Server(tokenizer)
    try:
        def crash(*args):
            raise RuntimeError("a bug in the engine loop")

        s.async_engine._deliver = crash  # the thread's own code fails (not the engine's)
        r = _post(s, CHAT, {"messages": MSG, "max_tokens": 2})
        assert r.status_code == 500 and "engine thread died" in r.json()["error"]["message"], r.text
        assert httpx.get(s.url + "/health", timeout=10).status_code == 503
        r = _post(s, CHAT, {"messages": MSG, "max_tokens": 2})  # later requests are refused at once, not hung
        assert r.status_code == 500 and "not running" in r.json()["error"]["message"], r.text
    finally:
        s.stop()


def test_serve_command_busy_port_fails_before_loading(capsys):
    import argparse

    from llama_kernels.server import serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.monotonic()
        assert serve_cli.run(parser.parse_args(["--port", str(port)])) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"llama-kernels serve: error: cannot listen on 127.0.0.1:{port}: Address already in use", err
    assert time.monotonic() - start < 1.0  # no model was loaded


def test_each_finished_request_is_one_log_line(server, caplog):
    """serve --log-requests (the default): one line per request, with its id, how it ended, its tokens and time;
    off, nothing."""
    server.async_engine.log_requests = True
    try:
        with caplog.at_level(logging.INFO, logger="llama_kernels.requests"):
            r = _post(server, CHAT, {"messages": MSG, "max_tokens": 3})
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 5
            while not caplog.records and time.monotonic() < deadline:
                time.sleep(0.02)
        lines = [rec.getMessage() for rec in caplog.records if rec.name == "llama_kernels.requests"]
        usage = r.json()["usage"]
        assert len(lines) == 1, lines
        assert lines[0].startswith("request ") and " finished (" in lines[0], lines[0]
        assert f"prompt {usage['prompt_tokens']} tokens, completion {usage['completion_tokens']} tokens" in lines[0]
        caplog.clear()
        server.async_engine.log_requests = False
        with caplog.at_level(logging.INFO, logger="llama_kernels.requests"):
            assert _post(server, CHAT, {"messages": MSG, "max_tokens": 3}).status_code == 200
        assert not [rec for rec in caplog.records if rec.name == "llama_kernels.requests"]
    finally:
        server.async_engine.log_requests = False
