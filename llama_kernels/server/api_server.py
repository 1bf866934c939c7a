"""The OpenAI-compatible HTTP API (FastAPI) over an AsyncEngine.

POST /v1/chat/completions and /v1/completions (streamed as server-sent events, or not), GET /v1/models,
/health and /metrics (Prometheus text). Every error is OpenAI's JSON shape; nothing a client sends
stops the server. Imported only by `llama-kernels serve` (FastAPI is the optional `serve` extra).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, replace
from functools import lru_cache

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .async_engine import AsyncEngine, EngineError, EngineUnavailable
from .metrics import CONTENT_TYPE
from ..engine.sampling import Grammar, SamplingParams, TokenLogprob
from .protocol import ChatCompletionRequest, CompletionRequest, OpenAIError, parse
from .tools import ToolCallStream, forced_call_schema, parse_calls, template_messages

GREEDY_BELOW = 1e-5  # temperatures under this sample greedily
BODY_TIMEOUT = 30.0  # seconds a request body may take to arrive (then 408)
_STATUS_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
                 408: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
                 500: "internal_server_error", 503: "service_unavailable"}  # fmt: skip
log = logging.getLogger(__name__)


def default_max_body_bytes(max_context: int, max_token_bytes: int) -> int:
    """The largest body a prompt that fits the context can need: each of its bytes JSON-escaped (at most
    6 bytes: \\u0001), max_token_bytes per token, plus 64 KiB for the rest of the request."""
    return 6 * max_token_bytes * max_context + (64 << 10)


def build_app(engine: AsyncEngine, served_model_name: str, api_key: str | None = None,
              max_body_bytes: int | None = None, body_timeout: float = BODY_TIMEOUT,
              max_concurrency: int | None = None, strict_api: bool = False) -> FastAPI:  # fmt: skip
    """The app. api_key: when set, /v1/* needs `Authorization: Bearer <api_key>` (else 401);
    max_body_bytes: larger request bodies get 413 (default: default_max_body_bytes of the context);
    body_timeout: seconds a body may take to arrive (else 408); max_concurrency: completions in flight
    (being prepared or in the engine) at most, more get 503 (None: no limit; idle or slow connections do
    not count: the launcher's header deadline bounds those); strict_api: unknown request fields are a 400
    (else ignored with one warning line). The caller starts and shuts down `engine`.

    Parsing, chat templates and tokenization run on worker threads (the tokenizer releases the GIL),
    never on the event loop, so /health and running streams stay responsive under any prompt."""
    app = FastAPI(title="llama-kernels", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    tok = engine.tokenizer
    if max_body_bytes is None:
        max_body_bytes = default_max_body_bytes(engine.max_context, tok.max_token_bytes)
    # request preparation, at a lower CPU priority than the engine thread (whose steps every stream waits for)
    workers = ThreadPoolExecutor(2, thread_name_prefix="llama-kernels-tokenize", initializer=_lower_priority)

    @lru_cache(maxsize=1 << 16)
    def token_text(token_id: int) -> str:
        return tok.decode([token_id], skip_special_tokens=False)

    token_bytes = lru_cache(maxsize=1 << 16)(_token_bytes_of(tok))  # a token's own bytes (chat logprobs' bytes)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, err: OpenAIError) -> JSONResponse:
        # an unread oversized body: close the connection rather than receive it to keep the connection alive
        headers = {"connection": "close"} if err.status in (408, 413) else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        msg = f"{err.detail}: {request.method} {request.url.path}"
        return JSONResponse(_error(msg, err.status_code).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse(_error(f"internal error: {type(err).__name__}: {err}", 500).body(), status_code=500)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise _error("invalid or missing API key: expected the header 'Authorization: Bearer <key>'", 401,
                         code="invalid_api_key")  # fmt: skip

    async def read_body(request: Request) -> bytes:
        """The JSON body: 415 unless Content-Type is application/json (a text/plain POST needs no CORS
        preflight, so a web page could otherwise drive a key-less local server), 413 over max_body_bytes,
        408 if it takes over body_timeout seconds; a client that leaves mid-upload is one log line."""
        ctype = request.headers.get("content-type", "")
        if ctype.partition(";")[0].strip().lower() != "application/json":
            raise _error(f"Content-Type {ctype!r}; expected 'application/json'", 415)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise _error(f"request body of {declared} bytes; expected at most {max_body_bytes}", 413)

        async def read() -> bytes:
            body = bytearray()
            async for piece in request.stream():
                body += piece
                if len(body) > max_body_bytes:
                    raise _error(f"request body over {max_body_bytes} bytes; expected at most {max_body_bytes}", 413)
            return bytes(body)

        try:
            return await asyncio.wait_for(read(), body_timeout)
        except TimeoutError:
            raise _error(f"request body not received within {body_timeout:g} s", 408) from None
        except ClientDisconnect:
            client = request.client
            log.warning("client %s left during the upload of %s", f"{client.host}:{client.port}" if client else "?",
                        request.url.path)  # fmt: skip
            raise _error("client closed the request", 499) from None

    preparing = 0  # requests in prepare()

    async def prepare(fn, body: bytes):
        """fn(body) on a worker thread: (request, prompt ids, SamplingParams), or its OpenAIError."""
        nonlocal preparing
        preparing += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(workers, fn, body)
        finally:
            preparing -= 1

    def check_length(nbytes: int, param: str) -> None:
        """400 for a prompt of nbytes UTF-8 bytes that cannot fit the context whatever its tokens (each token
        stands for at most tok.max_token_bytes bytes), before any tokenization."""
        at_least = -(-nbytes // tok.max_token_bytes)
        if at_least >= engine.max_context:
            raise OpenAIError(f"{param}: {nbytes} bytes, so at least {at_least} tokens; expected fewer than the "
                              f"context of {engine.max_context} tokens (prompt + max_tokens)", param=param)  # fmt: skip

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise OpenAIError(f"model={name!r} does not exist; this server serves {served_model_name!r}",
                              param="model", status=404, type_="not_found_error", code="model_not_found")  # fmt: skip

    def sampling(req, prompt_ids: list[int], prompt_param: str, seed_offset: int = 0,
                 grammar: Grammar | None = None) -> SamplingParams:  # fmt: skip
        """SamplingParams of a request, after the context check (400s name the field and the numbers)."""
        n, ctx = len(prompt_ids), engine.max_context
        if n >= ctx:
            raise OpenAIError(f"{prompt_param}: {n} tokens; expected fewer than the context of {ctx} tokens "
                              "(prompt + max_tokens)", param=prompt_param)  # fmt: skip
        max_tokens = req.requested_max_tokens
        if max_tokens is None:
            max_tokens = ctx - n
        elif n + max_tokens > ctx:
            name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
            raise OpenAIError(f"{name}={max_tokens} with a {n}-token prompt needs {n + max_tokens} tokens; expected "
                              f"prompt + {name} <= the context of {ctx} tokens ({name} <= {ctx - n})",
                              param=name)  # fmt: skip
        vocab = tok.vocab_size
        bias = tuple((int(t), b) for t, b in (req.logit_bias or {}).items())
        for name, ids in (("logit_bias", [t for t, _ in bias]), ("stop_token_ids", req.stop_token_ids or [])):
            bad = next((t for t in ids if t >= vocab), None)
            if bad is not None:
                raise OpenAIError(f"{name}: token id {bad}; expected ids in [0, {vocab})", param=name)
        echo = bool(getattr(req, "echo", False))
        top_k = req.top_k if req.top_k not in (None, -1, 0) else None
        temperature = 1.0 if req.temperature is None else req.temperature

        def given(value, default):
            return default if value is None else value

        params = SamplingParams(  # temperatures that would overflow logits / T mean greedy (as in vLLM)
            max_tokens=max(1, max_tokens), temperature=0.0 if temperature < GREEDY_BELOW else temperature,
            top_p=given(req.top_p, 1.0), top_k=top_k, min_p=given(req.min_p, 0.0),
            seed=None if req.seed is None else (req.seed + seed_offset + 2**63) % 2**64 - 2**63, stop=req.stops,
            stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=given(req.ignore_eos, False),
            min_tokens=given(req.min_tokens, 0), presence_penalty=given(req.presence_penalty, 0.0),
            frequency_penalty=given(req.frequency_penalty, 0.0), repetition_penalty=given(req.repetition_penalty, 1.0),
            logit_bias=bias, logprobs=req.num_logprobs,
            prompt_logprobs=req.num_logprobs if echo and req.num_logprobs is not None else None,
            skip_special_tokens=given(req.skip_special_tokens, True),
            include_stop_str_in_output=given(req.include_stop_str_in_output, False), grammar=grammar,
        )  # fmt: skip
        try:
            params.validate()
        except ValueError as err:
            field = re.search(r"(\w+)=", str(err))
            raise OpenAIError(str(err), param=field.group(1) if field else None) from None
        return params

    def grammar_of(req, forced: dict | None = None) -> tuple[Grammar | None, str | None]:
        """(the request's output constraint, the field that asked for it)."""
        fmt = req.response_format
        if forced is not None:
            return Grammar("json", json.dumps(forced)), "tool_choice"
        if fmt is not None and fmt.type == "json_object":
            return Grammar("json", ""), "response_format"
        if fmt is not None and fmt.type == "json_schema":
            schema = fmt.json_schema.schema_
            return Grammar("json", json.dumps(schema) if schema is not None else ""), "response_format"
        if req.guided_json is not None:
            spec = req.guided_json if isinstance(req.guided_json, str) else json.dumps(req.guided_json)
            return Grammar("json", spec), "guided_json"
        if req.guided_regex is not None:
            return Grammar("regex", req.guided_regex), "guided_regex"
        if req.guided_choice is not None:
            return Grammar("lark", "start: " + " | ".join(json.dumps(c) for c in req.guided_choice)), "guided_choice"
        return None, None

    def compile_grammar(grammar: Grammar | None, field: str | None) -> None:
        """Compile the request's grammar here, on the worker thread (cached per schema), so the engine's
        thread never stalls on it; 400 naming the field if it does not compile."""
        if grammar is not None:
            try:
                engine.compile_grammar(grammar)
            except ValueError as err:
                raise OpenAIError(f"{field}: {err}", param=field) from None

    def log_unknown(path: str, unknown: list[str]) -> None:
        if unknown:
            log.warning("%s: ignored unknown field(s) %s", path, ", ".join(sorted(unknown)))

    @app.get("/health")
    async def health():
        problem = engine.unavailable()
        if problem is not None:
            raise _error(problem, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    def model_card() -> dict:
        return {"id": served_model_name, "object": "model", "created": created, "owned_by": "llama-kernels",
                "max_model_len": engine.max_context}  # fmt: skip

    @app.get("/v1/models/{model_id:path}")
    async def model_info(request: Request, model_id: str):
        check_key(request)
        check_model(model_id)
        return model_card()

    def prepare_chat(body: bytes):
        req, unknown = parse(ChatCompletionRequest, body, strict_api)
        log_unknown("/v1/chat/completions", unknown)
        check_model(req.model)
        messages, tools = template_messages(req, "tools" in (tok.chat_template or ""))
        check_length(sum(len(m["content"].encode(errors="surrogatepass")) for m in messages)
                     + (len(json.dumps(tools)) if tools else 0), "messages")  # fmt: skip
        try:
            prompt_ids = tok.apply_chat_template(messages, req.add_generation_prompt is not False, tools)
        except Exception as err:  # noqa: BLE001  (a template's raise_exception, e.g. roles out of order)
            raise OpenAIError(f"messages: the chat template refused them: {err}", param="messages") from None
        grammar, field = grammar_of(req, forced_call_schema(req))
        compile_grammar(grammar, field)
        choices = [Choice(j, prompt_ids, sampling(req, prompt_ids, "messages", j, grammar)) for j in
                   range(req.num_choices)]  # fmt: skip
        return req, choices, field

    def prepare_completion(body: bytes):
        req, unknown = parse(CompletionRequest, body, strict_api)
        log_unknown("/v1/completions", unknown)
        check_model(req.model)
        grammar, field = grammar_of(req)
        compile_grammar(grammar, field)
        choices = []
        for i, prompt in enumerate(req.prompts):
            param = "prompt" if len(req.prompts) == 1 else f"prompt[{i}]"
            if isinstance(prompt, str):
                check_length(len(prompt.encode(errors="surrogatepass")), param)
                prompt_ids = tok.encode(prompt)
            else:
                bad = next((t for t in prompt if not 0 <= t < tok.vocab_size), None)
                if bad is not None:
                    raise OpenAIError(f"{param}: token id {bad}; expected ids in [0, {tok.vocab_size})", param="prompt")
                prompt_ids = list(prompt)
            echo = (prompt if isinstance(prompt, str) else tok.decode(prompt_ids)) if req.echo else ""
            ranked = req.num_candidates > req.num_choices  # best_of: candidates are ranked by their logprobs
            for j in range(req.num_candidates):
                params = sampling(req, prompt_ids, param, j, grammar)
                if ranked and params.logprobs is None:
                    params = replace(params, logprobs=0)
                choices.append(Choice(i * req.num_candidates + j, prompt_ids, params, echo, req.max_tokens == 0))
        return req, choices, field

    def check_open() -> None:
        if engine.draining:  # the port stays open while running requests finish: new ones are told so
            raise _error("the server is shutting down", 503)
        if max_concurrency is not None and engine.num_requests + preparing >= max_concurrency:
            raise _error(f"{engine.num_requests + preparing} requests in flight, the most this server takes "
                         f"(--max-concurrency {max_concurrency}): retry later", 503)  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_open()
        check_key(request)
        req, choices, field = await prepare(prepare_chat, await read_body(request))
        return await respond(request, req, f"chatcmpl-{uuid.uuid4().hex}", choices, field, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_open()
        check_key(request)
        req, choices, field = await prepare(prepare_completion, await read_body(request))
        return await respond(request, req, f"cmpl-{uuid.uuid4().hex}", choices, field, chat=False)

    async def respond(request: Request, req, request_id: str, choices: list[Choice], field: str | None, chat: bool):
        """Run every choice as an engine request of its own (id: request id + '-' + choice index, so
        identical prompts can share their prefix blocks) and answer them together."""
        streams = [engine.generate(f"{request_id}-{c.index}", c.prompt_ids, c.params, cache_salt=req.cache_salt)
                   for c in choices]  # fmt: skip
        head = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": served_model_name}  # fmt: skip
        prompt_tokens = sum(len(c.prompt_ids) for c in choices[:: req.num_candidates])  # each prompt once, whatever n
        tools = chat and bool(req.active_tools)
        if req.stream:  # the first outputs before the headers: errors until then get a proper status code
            firsts = await _until_hangup(request, _all(streams, _first_output, field))
            if firsts is _HUNG_UP:
                return _hung_up()
            events = stream_events(req, head, choices, firsts, streams, prompt_tokens, chat, tools)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await _until_hangup(request, _all(streams, _collect, field))
        if results is _HUNG_UP:
            return _hung_up()
        # every candidate's tokens (best_of's too, as OpenAI bills them)
        completion_tokens = sum(0 if c.drop_output else r[3].completion_tokens for c, r in zip(choices, results))
        pairs = list(zip(choices, results))
        if req.num_candidates > req.num_choices:
            pairs = _best(pairs, req.num_candidates, req.num_choices)
        out_choices = []
        for c, (text, logprobs, first, out) in pairs:
            text = "".join(text)
            if chat:
                message, reason = {"role": "assistant", "content": text}, out.finish_reason
                calls = parse_calls(text, req) if tools else None
                if calls:
                    message, reason = {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
                out_choices.append({"index": c.index, "message": message, "finish_reason": reason,
                                    "logprobs": chat_logprobs(logprobs) if req.logprobs else None})  # fmt: skip
                continue
            if c.drop_output:
                text, logprobs = "", []
            lp = None
            if req.logprobs is not None:
                prompt_lps = list(zip(c.prompt_ids, first.prompt_logprobs or [])) if c.echo else []
                lp = completion_logprobs(prompt_lps + with_stop(logprobs, out, c), 0)
            out_choices.append({"index": c.index, "text": c.echo + text, "finish_reason": out.finish_reason,
                                "logprobs": lp})  # fmt: skip
        usage = _usage(prompt_tokens, completion_tokens, results[0][3].cached_tokens)  # the prompt's, once
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": out_choices,
                "usage": usage}  # fmt: skip

    async def stream_events(req, head: dict, choices: list[Choice], firsts: list, streams: list, prompt_tokens: int,
                            chat: bool, tools: bool):  # fmt: skip
        completion = [0] * len(choices)  # tokens so far per choice
        offsets = [0] * len(choices)  # characters so far per choice (completions' text_offset)
        calls = [ToolCallStream(req) if tools else None for _ in choices]  # chat with tools: the calls' deltas
        held = [[] for _ in choices]  # chat: logprobs of text not sent yet (held while it may be a call)
        started = [False] * len(choices)  # the choice's first output was sent
        cached = [0] * len(choices)  # prompt tokens each choice found in the prefix cache

        def usage():
            return _usage(prompt_tokens, sum(completion), cached[0])  # the prompt's, once

        def event(items: list, final_usage=None) -> str:
            body = {**head, "choices": items}
            if req.include_usage:
                body["usage"] = final_usage if final_usage is not None else (usage() if req.continuous_usage else None)
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def chat_piece(k: int, delta: dict, lps: list, reason=None) -> dict:
            return {"index": choices[k].index, "delta": delta, "finish_reason": reason,
                    "logprobs": chat_logprobs(lps) if req.logprobs and lps else None}  # fmt: skip

        def text_piece(k: int, text: str, items: list, reason=None) -> dict:
            lp = None
            if req.logprobs is not None:
                lp = completion_logprobs(items, offsets[k])
            offsets[k] += len(text)
            return {"index": choices[k].index, "text": text, "finish_reason": reason, "logprobs": lp}

        def pieces(k: int, out) -> list[dict]:
            """The chunk items of one engine output of choice k (its last one included)."""
            c, items = choices[k], []
            cached[k] = out.cached_tokens
            if not c.drop_output:
                completion[k] = out.completion_tokens
            text, lps = ("", []) if c.drop_output else (out.new_text, out.new_logprobs or [])
            if chat:
                held[k] += lps
                reason = out.finish_reason
                if calls[k] is None:
                    deltas = [{"content": text}] if text or held[k] else []
                else:
                    deltas = calls[k].feed(text)
                    if out.finished:
                        last, called = calls[k].finish()
                        deltas += last
                        reason = "tool_calls" if called else reason
                for delta in deltas:  # the logprobs held so far go with the first
                    items.append(chat_piece(k, delta, held[k]))
                    held[k] = []
                if out.finished:
                    items.append(chat_piece(k, {}, held[k], reason))
                return items
            lps = with_stop(lps, out, c)
            if c.echo and not started[k]:  # the prompt (and its logprobs) first
                text = c.echo + text
                lps = list(zip(c.prompt_ids, out.prompt_logprobs or [])) + lps
            started[k] = True
            if text or lps:
                items.append(text_piece(k, text, lps))
            if out.finished:
                items.append(text_piece(k, "", [], out.finish_reason))
            return items

        merged = _merged(firsts, streams)
        try:
            if chat:
                yield event([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for c in choices])  # fmt: skip
            async for k, out in merged:
                for item in pieces(k, out):  # one choice per chunk, its finish in a chunk of its own
                    yield event([item])
        except (ValueError, EngineError) as err:
            yield f"data: {json.dumps(_engine_error(err).body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        finally:
            await merged.aclose()
        if req.include_usage:
            yield event([], usage())
        yield "data: [DONE]\n\n"

    def chat_logprobs(items) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            return {"token": token_text(token_id), "logprob": logprob, "bytes": list(token_bytes(token_id))}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in items]}  # fmt: skip

    def with_stop(logprobs: list[TokenLogprob], out, c: Choice) -> list[tuple[int, TokenLogprob]]:
        """Completions' (token id, logprob) items of an output's tokens, and of the eos / stop token that
        ended it: completion_tokens counts it, and so do vLLM's logprobs (lm-eval's echo scoring drops the
        generated token's entry, so without it a request ending on eos loses the prompt's last logprob)."""
        stop = [] if out.stop_logprob is None or c.drop_output else [out.stop_logprob]
        return [(x.token_id, x) for x in [*logprobs, *stop]]

    def completion_logprobs(items: list[tuple[int, TokenLogprob | None]], offset: int) -> dict:
        """OpenAI's completions logprobs of (token id, its TokenLogprob or None for the first prompt token);
        text offsets start at `offset` (the characters of the choice's earlier chunks). The top logprobs
        always hold the token itself (as vLLM), so logprobs=0 still gives it."""
        tokens = [token_text(t) for t, _ in items]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        tops = [None if lp is None else {**{token_text(t): v for t, v in lp.top}, token_text(t): lp.logprob}
                for t, lp in items]  # fmt: skip
        return {"tokens": tokens, "token_logprobs": [None if lp is None else lp.logprob for _, lp in items],
                "top_logprobs": tops, "text_offset": offsets}  # fmt: skip

    return app


@dataclass
class Choice:
    """One choice of a request: an engine request of its own."""

    index: int  # its index in the response
    prompt_ids: list[int]
    params: SamplingParams
    echo: str = ""  # text before the output (completions' echo: the prompt)
    drop_output: bool = False  # max_tokens=0 with echo: the one token generated is not shown


_HUNG_UP = object()  # _until_hangup's result when the client left first
WORKER_NICE = 10  # niceness the preparation threads add (Linux: per thread)


def _best(pairs: list[tuple[Choice, tuple]], per_prompt: int, n: int) -> list[tuple[Choice, tuple]]:
    """best_of: of each prompt's per_prompt (choice, _collect result) candidates, the n with the highest sum
    of sampled-token logprobs, best first (ties in candidate order), indexed 0.. n-1 per prompt in order."""
    out = []
    for start in range(0, len(pairs), per_prompt):
        group = sorted(pairs[start : start + per_prompt], key=lambda pair: -sum(x.logprob for x in pair[1][1]))
        out += [(replace(c, index=start // per_prompt * n + rank), res) for rank, (c, res) in enumerate(group[:n])]
    return out


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: same priority
        pass


async def _until_hangup(request: Request, work):
    """The result of the coroutine `work`, or _HUNG_UP if the client disconnects first (work is
    then cancelled, which aborts its request: AsyncEngine.generate's iterator closes)."""
    task = asyncio.ensure_future(work)
    hangup = asyncio.ensure_future(request.receive())  # the body is read: the next message is a disconnect
    try:
        await asyncio.wait((task, hangup), return_when=asyncio.FIRST_COMPLETED)
    finally:
        hangup.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return _HUNG_UP


def _hung_up() -> JSONResponse:
    return JSONResponse(_error("client closed the request", 499).body(), status_code=499)  # read by no one


async def _first_output(outputs, field: str | None):
    """The first output of AsyncEngine.generate's iterator (closed on any error)."""
    try:
        return await anext(outputs)
    except (ValueError, EngineError) as err:
        await outputs.aclose()
        raise _engine_error(err, field) from None
    except BaseException:
        await outputs.aclose()
        raise


async def _collect(outputs, field: str | None) -> tuple[list[str], list, object, object]:
    """(text pieces, logprobs, the first output, the final output) of a whole request."""
    text, logprobs, first = [], [], None
    async with aclosing(outputs):
        try:
            async for out in outputs:
                first = first or out
                text.append(out.new_text)
                logprobs += out.new_logprobs or []
        except (ValueError, EngineError) as err:
            raise _engine_error(err, field) from None
    return text, logprobs, first, out


async def _all(streams: list, fn, field: str | None) -> list:
    """fn(stream, field) for every stream at once; on the first error the others are cancelled (which
    aborts their requests) and it is raised."""
    tasks = [asyncio.ensure_future(fn(s, field)) for s in streams]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if fn is _first_output and any(t.cancelled() or t.exception() is not None for t in tasks):
            for s in streams:  # the started ones are held by their first output: abort them too
                await s.aclose()


async def _merged(firsts: list, streams: list):
    """(choice index, output) of several requests as they come, starting with their first outputs; closing
    it aborts the unfinished ones."""
    pending: dict[asyncio.Future, int] = {}
    try:
        for k, out in enumerate(firsts):
            yield k, out
            if not out.finished:
                pending[asyncio.ensure_future(anext(streams[k]))] = k
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.get):
                k = pending.pop(task)
                out = task.result()
                yield k, out
                if not out.finished:
                    pending[asyncio.ensure_future(anext(streams[k]))] = k
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for s in streams:
            await s.aclose()


def _token_bytes_of(tok):
    """token id -> its own bytes: byte-level BPE pieces through GPT-2's byte table, sentencepiece pieces
    with <0xNN> bytes and U+2581 spaces; added (special) tokens as their UTF-8 text."""
    inner = tok.tokenizer
    decoder = json.loads(inner.to_str()).get("decoder") or {}
    kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
    byte_level = "ByteLevel" in kinds
    table = {chr(c): b for b, c in _gpt2_bytes().items()}
    added = {i for i in inner.get_added_tokens_decoder()}

    def token_bytes(token_id: int) -> bytes:
        piece = inner.id_to_token(token_id) or ""
        if token_id in added:
            return piece.encode()
        if byte_level and all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    return token_bytes


def _gpt2_bytes() -> dict[int, int]:
    """GPT-2's byte -> printable code point table of byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = b
        else:
            table[b] = 256 + extra
            extra += 1
    return table


def _error(message: str, status: int, code: str | None = None) -> OpenAIError:
    return OpenAIError(message, status=status, type_=_STATUS_TYPES.get(status, "invalid_request_error"), code=code)


def _engine_error(err: Exception, field: str | None = None) -> OpenAIError:
    if isinstance(err, ValueError):  # the engine refused the request (add_request)
        message = str(err)
        return OpenAIError(f"{field}: {message}" if field and "grammar" in message else message,
                           param=field if "grammar" in message else None)  # fmt: skip
    if isinstance(err, EngineUnavailable):  # shutting down, stalled or broken
        return _error(str(err), 503)
    return _error(f"the engine failed on this request: {err}", 500)


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage; cached_tokens: prompt tokens read from the prefix cache (not computed)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}  # fmt: skip
