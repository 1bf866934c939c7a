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
from functools import lru_cache

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .async_engine import AsyncEngine, EngineError, EngineUnavailable
from .metrics import CONTENT_TYPE
from ..engine.engine import SamplingParams
from .protocol import ChatCompletionRequest, CompletionRequest, OpenAIError, parse

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
              max_concurrency: int | None = None) -> FastAPI:  # fmt: skip
    """The app. api_key: when set, /v1/* needs `Authorization: Bearer <api_key>` (else 401);
    max_body_bytes: larger request bodies get 413 (default: default_max_body_bytes of the context);
    body_timeout: seconds a body may take to arrive (else 408); max_concurrency: completions in flight
    (being prepared or in the engine) at most, more get 503 (None: no limit; idle or slow connections do
    not count: the launcher's header deadline bounds those). The caller starts and shuts down `engine`.

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

    def sampling(req, prompt_ids: list[int], prompt_param: str) -> SamplingParams:
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
        top_k = req.top_k if req.top_k not in (None, -1, 0) else None
        temperature = 1.0 if req.temperature is None else req.temperature
        params = SamplingParams(  # temperatures that would overflow logits / T mean greedy (as in vLLM)
            max_tokens=max_tokens, temperature=0.0 if temperature < GREEDY_BELOW else temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=top_k, seed=req.seed, stop=req.stops,
            ignore_eos=req.ignore_eos, logprobs=req.num_logprobs,
        )  # fmt: skip
        try:
            params.validate()
        except ValueError as err:
            field = re.search(r"(\w+)=", str(err))
            raise OpenAIError(str(err), param=field.group(1) if field else None) from None
        return params

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
        model = {"id": served_model_name, "object": "model", "created": created, "owned_by": "llama-kernels",
                 "max_model_len": engine.max_context}  # fmt: skip
        return {"object": "list", "data": [model]}

    def prepare_chat(body: bytes):
        req = parse(ChatCompletionRequest, body)
        check_model(req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        check_length(sum(len(m["content"].encode(errors="surrogatepass")) for m in messages), "messages")
        try:
            prompt_ids = tok.apply_chat_template(messages)
        except Exception as err:  # noqa: BLE001  (a template's raise_exception, e.g. roles out of order)
            raise OpenAIError(f"messages: the chat template refused them: {err}", param="messages") from None
        return req, prompt_ids, sampling(req, prompt_ids, "messages")

    def prepare_completion(body: bytes):
        req = parse(CompletionRequest, body)
        check_model(req.model)
        prompt = req.prompt[0] if isinstance(req.prompt, list) and isinstance(req.prompt[0], str) else req.prompt
        if isinstance(prompt, str):
            check_length(len(prompt.encode(errors="surrogatepass")), "prompt")
            prompt_ids = tok.encode(prompt)
        else:
            bad = next((t for t in prompt if not 0 <= t < tok.vocab_size), None)
            if bad is not None:
                raise OpenAIError(f"prompt: token id {bad}; expected ids in [0, {tok.vocab_size})", param="prompt")
            prompt_ids = list(prompt)
        return req, prompt_ids, sampling(req, prompt_ids, "prompt")

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
        req, prompt_ids, params = await prepare(prepare_chat, await read_body(request))
        return await respond(request, req, f"chatcmpl-{uuid.uuid4().hex}", prompt_ids, params, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_open()
        check_key(request)
        req, prompt_ids, params = await prepare(prepare_completion, await read_body(request))
        return await respond(request, req, f"cmpl-{uuid.uuid4().hex}", prompt_ids, params, chat=False)

    async def respond(request: Request, req, request_id: str, prompt_ids: list[int], params: SamplingParams,
                      chat: bool):  # fmt: skip
        outputs = engine.generate(request_id, prompt_ids, params, cache_salt=req.cache_salt)
        head = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": served_model_name}  # fmt: skip
        if req.stream:  # the first output before the headers: errors until then get a proper status code
            first = await _until_hangup(request, _first_output(outputs))
            if first is _HUNG_UP:
                return _hung_up()
            events = stream_events(req, head, first, outputs, len(prompt_ids), chat)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        result = await _until_hangup(request, _collect(outputs))
        if result is _HUNG_UP:
            return _hung_up()
        text, logprobs, out = result
        usage = _usage(len(prompt_ids), out.completion_tokens, out.cached_tokens)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                      "logprobs": chat_logprobs(logprobs) if req.logprobs else None,
                      "finish_reason": out.finish_reason}  # fmt: skip
            return {**head, "object": "chat.completion", "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": "".join(text), "finish_reason": out.finish_reason,
                  "logprobs": completion_logprobs(logprobs) if req.logprobs is not None else None}  # fmt: skip
        return {**head, "choices": [choice], "usage": usage}

    async def stream_events(req, head: dict, first, outputs, prompt_tokens: int, chat: bool):
        def event(choices: list, usage=None) -> str:
            body = {**head, "choices": choices}
            if req.include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def piece(out) -> dict:
            lp = out.new_logprobs or []
            if chat:
                return {"index": 0, "delta": {"content": out.new_text},
                        "logprobs": chat_logprobs(lp) if req.logprobs else None, "finish_reason": None}  # fmt: skip
            return {"index": 0, "text": out.new_text, "finish_reason": None,
                    "logprobs": completion_logprobs(lp) if req.logprobs is not None else None}  # fmt: skip

        async with aclosing(outputs):
            if chat:
                yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])  # fmt: skip
            out = first
            try:
                while True:
                    if out.new_text or out.new_logprobs:
                        yield event([piece(out)])
                    if out.finished:
                        break
                    out = await anext(outputs)
            except (ValueError, EngineError) as err:
                yield f"data: {json.dumps(_engine_error(err).body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            last = {"index": 0, "finish_reason": out.finish_reason, "logprobs": None}
            yield event([{**last, "delta": {}} if chat else {**last, "text": ""}])
            if req.include_usage:
                yield event([], _usage(prompt_tokens, out.completion_tokens, out.cached_tokens))
            yield "data: [DONE]\n\n"

    def chat_logprobs(items) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            text = token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in items]}  # fmt: skip

    def completion_logprobs(items) -> dict:
        tokens = [token_text(lp.token_id) for lp in items]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in items],
                "top_logprobs": [{token_text(t): v for t, v in lp.top} for lp in items],
                "text_offset": offsets}  # fmt: skip

    return app


_HUNG_UP = object()  # _until_hangup's result when the client left first
WORKER_NICE = 10  # niceness the preparation threads add (Linux: per thread)


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


async def _first_output(outputs):
    """The first output of AsyncEngine.generate's iterator (closed on any error)."""
    try:
        return await anext(outputs)
    except (ValueError, EngineError) as err:
        await outputs.aclose()
        raise _engine_error(err) from None
    except BaseException:
        await outputs.aclose()
        raise


async def _collect(outputs) -> tuple[list[str], list, object]:
    """(text pieces, logprobs, the final output) of a whole request."""
    text, logprobs = [], []
    async with aclosing(outputs):
        try:
            async for out in outputs:
                text.append(out.new_text)
                logprobs += out.new_logprobs or []
        except (ValueError, EngineError) as err:
            raise _engine_error(err) from None
    return text, logprobs, out


def _error(message: str, status: int, code: str | None = None) -> OpenAIError:
    return OpenAIError(message, status=status, type_=_STATUS_TYPES.get(status, "invalid_request_error"), code=code)


def _engine_error(err: Exception) -> OpenAIError:
    if isinstance(err, ValueError):  # the engine refused the request (add_request)
        return OpenAIError(str(err))
    if isinstance(err, EngineUnavailable):  # shutting down, stalled or broken
        return _error(str(err), 503)
    return _error(f"the engine failed on this request: {err}", 500)


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage; cached_tokens: prompt tokens read from the prefix cache (not computed)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}  # fmt: skip
