"""Request models of the OpenAI-compatible API (pydantic) and its error shape.

Parsing is strict (a string where a number belongs is an error, not converted) and refuses unknown
fields; OpenAI fields this server does not implement are accepted only at their default values.
Every problem becomes an OpenAIError naming the field, the value and what was expected.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_LOGPROBS = 20  # the engine returns at most this many alternatives per token
MAX_STOP = 4  # stop strings per request at most (OpenAI's limit): each is checked against every new token
MAX_STOP_CHARS = 256  # characters per stop string at most


class OpenAIError(Exception):
    """An error response: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type_: str = "invalid_request_error", code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type_, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False  # send a last chunk with the usage (and "usage": null in the others)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


# Fields of OpenAI's API that are accepted only at these (default) values, and why not otherwise.
_DEFAULT_ONLY: dict[str, tuple[tuple, str]] = {
    "n": ((1, None), "only n=1 is supported"),
    "best_of": ((1, None), "only best_of=1 is supported"),
    "presence_penalty": ((0, 0.0, None), "penalties are not supported; expected 0"),
    "frequency_penalty": ((0, 0.0, None), "penalties are not supported; expected 0"),
    "logit_bias": ((None, {}), "logit_bias is not supported; expected null or {}"),
    "echo": ((False, None), "echo is not supported; expected false"),
    "suffix": ((None, ""), "suffix is not supported; expected null"),
    "tools": ((None, []), "tools are not supported; expected null"),
    "tool_choice": ((None, "none"), "tools are not supported; expected null or \"none\""),
    "parallel_tool_calls": ((None, True, False), ""),
    "functions": ((None, []), "functions are not supported; expected null"),
    "function_call": ((None, "none"), "functions are not supported; expected null"),
    "response_format": ((None, {"type": "text"}), "only response_format {\"type\": \"text\"} is supported"),
}


class _Sampling(_Strict):
    """Fields common to both endpoints."""

    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # None: 1.0 (OpenAI's default); 0: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # extension (vLLM's): -1 or 0 mean off
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # a torch.Generator seed
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension (vLLM's): generate max_tokens tokens whatever the eos
    user: str | None = None  # accepted and ignored
    # extension (vLLM's): requests share cached prompt blocks only with requests of the same salt
    cache_salt: str | None = Field(None, min_length=1)
    # accepted at their defaults only (see _DEFAULT_ONLY)
    n: Any = None
    best_of: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None

    def check(self) -> None:
        """The cross-field rules pydantic's per-field checks do not cover."""
        for name, (allowed, why) in _DEFAULT_ONLY.items():
            if name in type(self).model_fields:
                value = getattr(self, name)
                if not any(value == a and type(value) is type(a) for a in allowed):
                    raise OpenAIError(f"{name}={value!r}: {why or 'not supported'}", param=name)
        if self.stream_options is not None and not self.stream:
            raise OpenAIError("stream_options is only allowed with stream=true", param="stream_options")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOP:
            raise OpenAIError(f"stop: {len(stops)} strings; expected at most {MAX_STOP}", param="stop")
        if any(s == "" or len(s) > MAX_STOP_CHARS for s in stops):
            raise OpenAIError(f"stop={_clip(self.stop)}: expected non-empty strings of at most {MAX_STOP_CHARS} "
                              "characters", param="stop")  # fmt: skip

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens (wins if both)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    store: bool | None = None  # accepted and ignored
    metadata: dict[str, str] | None = None  # accepted and ignored

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError(f"top_logprobs={self.top_logprobs}: needs logprobs=true", param="top_logprobs")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]  # one prompt: a string, or token ids
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Any = None
    suffix: Any = None
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions

    def check(self) -> None:
        super().check()
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise OpenAIError(f"prompt: a list of {len(self.prompt)} strings; expected one prompt", param="prompt")
        if len(self.prompt) == 0:
            raise OpenAIError("prompt is empty; expected a non-empty string or token ids", param="prompt")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


def _param(loc: tuple) -> str | None:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[int]", "list[str]", "list[TextPart]", "function-after") or "[" in str(part):
            continue  # union-member labels pydantic puts in the location
        else:
            out += ("." if out else "") + str(part)
    return out or None


def _clip(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse(model: type[_Strict], body: bytes) -> _Strict:
    """The request model of a JSON body, checked; raises OpenAIError (400) on any problem.

    The body is decoded by json.loads and the stop list's length checked before pydantic validates it
    (5x faster than validating the JSON text, which holds the GIL: 50 ms for 60,000 stop strings);
    pydantic parses the text itself only to name what is wrong, in JSON's terms."""
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict) and isinstance(data.get("stop"), list) and len(data["stop"]) > MAX_STOP:
        raise OpenAIError(f"stop: {len(data['stop'])} strings; expected at most {MAX_STOP}", param="stop")
    try:
        try:
            req = model.model_validate_json(body) if data is None else model.model_validate(data)
        except ValidationError:
            if data is None:
                raise
            req = model.model_validate_json(body)  # JSON mode's errors speak of JSON types (array, object)
    except ValidationError as err:
        e = err.errors(include_url=False)[0]
        kind, param = e["type"], _param(e["loc"])
        if kind == "json_invalid":
            raise OpenAIError(f"malformed JSON body: {e['ctx'].get('error', e['msg'])}") from None
        if kind == "model_type" or (kind.endswith("_type") and param is None):
            raise OpenAIError("request body: expected a JSON object") from None
        if kind == "missing":
            raise OpenAIError(f"{param} is required", param=param) from None
        if kind == "extra_forbidden":
            raise OpenAIError(f"unrecognized request argument {param}={_clip(e['input'])}", param=param) from None
        # a union reports one error per member: say all they expected
        msgs = dict.fromkeys(x["msg"] for x in err.errors(include_url=False) if _param(x["loc"]) == param)
        expected = " or ".join(m[0].lower() + m[1:] for m in msgs)
        raise OpenAIError(f"{param}={_clip(e['input'])}: {expected}", param=param) from None
    req.check()
    return req
