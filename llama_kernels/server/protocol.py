"""Request models of the OpenAI-compatible API (pydantic) and its error shape.

Parsing is strict (a string where a number belongs is an error, not converted); `null` means the
default for every optional field. Besides OpenAI's fields, vLLM's sampling extensions are accepted.
OpenAI fields that do not change the output (service_tier, store, metadata, user, ...) are accepted and
ignored; a field that would change the output but is not implemented is a 400 naming it unless it has
its default value; other unknown fields are reported by `parse` (the server logs them, or refuses
them with --strict-api). Every problem becomes an OpenAIError naming the field, the value and what
was expected.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_LOGPROBS = 20  # the engine returns at most this many alternatives per token
MAX_STOP = 4  # stop strings per request at most (OpenAI's limit): each is checked against every new token
MAX_STOP_CHARS = 256  # characters per stop string at most
MAX_N = 16  # choices per prompt at most (each is a sequence of its own)
MAX_PROMPTS = 64  # prompts in one completions request at most


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


class _Open(BaseModel):
    """A request body: unknown fields are kept in model_extra (parse() reports them)."""

    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None  # send a last chunk with the usage (and "usage": null in the others)
    continuous_usage_stats: bool | None = None  # with include_usage: every chunk carries the usage so far (vLLM)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # null: an assistant message with tool_calls
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool result's call
    refusal: str | None = None  # accepted in the history and ignored

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None  # the arguments always follow the schema when a grammar forces the call


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchema(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # always honoured: the output is decoded under the schema's grammar


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


# OpenAI / vLLM fields that would change the output but are not implemented: accepted at these values only.
_DEFAULT_ONLY: dict[str, tuple[tuple, str]] = {
    "suffix": ((None, ""), "suffix (insertion) is not supported; expected null"),
    "functions": ((None, []), "functions (deprecated) are not supported; use tools"),
    "function_call": ((None, "none"), "function_call (deprecated) is not supported; use tool_choice"),
    "audio": ((None,), "audio output is not supported; expected null"),
    "modalities": ((None, ["text"]), "only the text modality is supported"),
    "web_search_options": ((None,), "web search is not supported; expected null"),
    "use_beam_search": ((None, False), "beam search is not supported; expected false"),
    "length_penalty": ((None, 1, 1.0), "length_penalty applies to beam search only; expected 1"),
    "truncate_prompt_tokens": ((None,), "truncate_prompt_tokens is not supported; expected null"),
    "guided_grammar": ((None,), "guided_grammar is not supported; use guided_json, guided_regex or response_format"),
    "continue_final_message": ((None, False), "continue_final_message is not supported; expected false"),
    "chat_template": ((None,), "a per-request chat_template is not supported; expected null"),
    "chat_template_kwargs": ((None, {}), "chat_template_kwargs are not supported; expected null"),
    "prompt_logprobs": ((None,), "prompt_logprobs is not supported; use echo with logprobs (completions)"),
}
# OpenAI fields that do not change the output: accepted and ignored (whatever their value's type).
IGNORED = ("user", "store", "metadata", "service_tier", "prompt_cache_key", "prompt_cache_retention",
           "safety_identifier", "prediction", "reasoning_effort", "verbosity", "request_id", "priority",
           "spaces_between_special_tokens", "documents", "add_special_tokens", "return_tokens_as_token_ids",
           "kv_transfer_params", "vllm_xargs")  # fmt: skip


class _Sampling(_Open):
    """Fields common to both endpoints (null = the default)."""

    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # None: 1.0 (OpenAI's default); 0: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)  # choices per prompt, each its own sequence
    best_of: int | None = Field(None, ge=1, le=MAX_N)  # completions: candidates per prompt, the n best returned
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # choice i samples with seed + i
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias, clamped to [-100, 100]
    response_format: ResponseFormat | None = None
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1)  # -1 or 0 mean off
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    min_tokens: int | None = Field(None, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None  # generate max_tokens tokens whatever the eos
    skip_special_tokens: bool | None = None  # default true
    include_stop_str_in_output: bool | None = None
    guided_json: dict[str, Any] | str | None = None  # a JSON schema the output must follow
    guided_regex: str | None = None  # a regex the output must match
    guided_choice: list[str] | None = None  # the output is one of these strings
    cache_salt: str | None = Field(None, min_length=1)  # requests share cached prompt blocks only within a salt
    # the fields of _DEFAULT_ONLY and IGNORED are not declared: they land in model_extra

    def check(self) -> None:
        """The cross-field rules pydantic's per-field checks do not cover."""
        extra = self.model_extra or {}
        for name, (allowed, why) in _DEFAULT_ONLY.items():
            value = extra.get(name)
            if not any(value == a and type(value) is type(a) for a in allowed):
                raise OpenAIError(f"{name}={_clip(value)}: {why}", param=name)
        if self.stream_options is not None and not self.stream:
            raise OpenAIError("stream_options is only allowed with stream=true", param="stream_options")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOP:
            raise OpenAIError(f"stop: {len(stops)} strings; expected at most {MAX_STOP}", param="stop")
        if any(s == "" or len(s) > MAX_STOP_CHARS for s in stops):
            raise OpenAIError(f"stop={_clip(self.stop)}: expected non-empty strings of at most {MAX_STOP_CHARS} "
                              "characters", param="stop")  # fmt: skip
        for t, b in (self.logit_bias or {}).items():
            if not t.isdigit():
                raise OpenAIError(f"logit_bias: key {t!r}; expected token ids (as strings)", param="logit_bias")
        if any(t < 0 for t in self.stop_token_ids or ()):
            raise OpenAIError(f"stop_token_ids={_clip(self.stop_token_ids)}: expected token ids >= 0",
                              param="stop_token_ids")  # fmt: skip
        guided = [n for n in ("guided_json", "guided_regex", "guided_choice") if getattr(self, n) is not None]
        fmt = self.response_format
        if fmt is not None and fmt.type != "text":
            guided.append("response_format")
        if len(guided) > 1:
            raise OpenAIError(f"{' and '.join(guided)}: expected at most one output constraint", param=guided[1])
        if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
            raise OpenAIError("response_format: type 'json_schema' needs a json_schema object",
                              param="response_format.json_schema")  # fmt: skip
        if self.guided_choice is not None and not self.guided_choice:
            raise OpenAIError("guided_choice is empty; expected at least one string", param="guided_choice")

    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def num_candidates(self) -> int:
        """Sequences generated per prompt: best_of (the num_choices with the highest sum of logprobs are kept)."""
        return self.best_of or self.num_choices

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Every chunk carries the usage so far (vLLM: include_usage and continuous_usage_stats)."""
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens (wins if both)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: at most one call per answer
    add_generation_prompt: bool | None = None  # vLLM: default true
    echo: bool | None = None  # vLLM's chat echo: only false

    def check(self) -> None:
        super().check()
        if self.best_of is not None and self.best_of != self.num_choices:
            raise OpenAIError(f"best_of={self.best_of} with n={self.num_choices}: chat supports only best_of = n "
                              "(ranking candidates is a completions feature)", param="best_of")  # fmt: skip
        if self.echo:
            raise OpenAIError("echo=True: echoing the last message is not supported in chat; expected false",
                              param="echo")  # fmt: skip
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError(f"top_logprobs={self.top_logprobs}: needs logprobs=true", param="top_logprobs")
        names = [t.function.name for t in self.tools or ()]
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise OpenAIError(f"tool_choice: function {self.tool_choice.function.name!r} is not among the tools "
                              f"{names}", param="tool_choice")  # fmt: skip
        if self.tool_choice not in (None, "none") and not names:
            raise OpenAIError(f"tool_choice={_clip(self.tool_choice if isinstance(self.tool_choice, str) else 'named')}"
                              ": needs tools", param="tool_choice")  # fmt: skip
        forced = self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)
        if forced and (self.response_format is not None and self.response_format.type != "text"
                       or any(getattr(self, n) is not None for n in ("guided_json", "guided_regex", "guided_choice"))):
            raise OpenAIError("tool_choice: a forced tool call cannot be combined with an output constraint",
                              param="tool_choice")  # fmt: skip
        for i, m in enumerate(self.messages):
            if m.content is None and not (m.role == "assistant" and m.tool_calls):
                raise OpenAIError(f"messages[{i}].content is null; expected a string (null only for an assistant "
                                  "message with tool_calls)", param=f"messages[{i}].content")  # fmt: skip
            if m.tool_calls and m.role != "assistant":
                raise OpenAIError(f"messages[{i}].tool_calls: only assistant messages have tool calls",
                                  param=f"messages[{i}].tool_calls")  # fmt: skip

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def active_tools(self) -> list[Tool]:
        """The tools the model is shown and may call (none with tool_choice "none")."""
        return [] if self.tool_choice == "none" else list(self.tools or ())


class CompletionRequest(_Sampling):
    # one prompt (a string or token ids) or several (strings or token-id lists): one choice (x n) per prompt
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None  # the prompt first in each choice's text (and its logprobs, the first null)
    max_tokens: int | None = Field(None, ge=0)  # None: 16 (OpenAI's default); 0 only with echo

    def check(self) -> None:
        super().check()
        prompts = self.prompts
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise OpenAIError(f"prompt: a list of {len(prompts)} prompts; expected 1 to {MAX_PROMPTS}", param="prompt")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
                raise OpenAIError(f"{where} is empty; expected a non-empty string or token ids", param="prompt")
        if self.best_of is not None and self.best_of < self.num_choices:
            raise OpenAIError(f"best_of={self.best_of} with n={self.num_choices}: expected best_of >= n",
                              param="best_of")  # fmt: skip
        if self.stream and self.num_candidates > self.num_choices:  # (as OpenAI: the best are known at the end)
            raise OpenAIError(f"best_of={self.best_of} with n={self.num_choices} cannot be streamed; expected "
                              "stream=false or best_of = n", param="best_of")  # fmt: skip
        if self.max_tokens == 0 and not self.echo:
            raise OpenAIError("max_tokens=0: only with echo=true (scoring the prompt); expected >= 1",
                              param="max_tokens")  # fmt: skip

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    @property
    def requested_max_tokens(self) -> int | None:
        return 16 if self.max_tokens is None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


def _param(loc: tuple) -> str | None:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "int", "list[int]", "list[str]", "list[list[int]]", "list[TextPart]", "function-after",
                      "NamedToolChoice", "literal['none','auto','required']", "dict[str,any]") or "[" in str(part):
            continue  # union-member labels pydantic puts in the location
        else:
            out += ("." if out else "") + str(part)
    return out or None


def _clip(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse(model: type[_Open], body: bytes, strict_api: bool = False) -> tuple[_Open, list[str]]:
    """(the request model of a JSON body, checked; the names of the unknown fields it ignored). Raises
    OpenAIError (400) on any problem, and for any unknown field with strict_api.

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
    unknown = [k for k in req.model_extra or {} if k not in IGNORED and k not in _DEFAULT_ONLY]
    if unknown and strict_api:
        name = unknown[0]
        raise OpenAIError(f"unrecognized request argument {name}={_clip(req.model_extra[name])} (--strict-api)",
                          param=name)  # fmt: skip
    req.check()
    return req, unknown
