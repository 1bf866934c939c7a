"""Tool calling the Llama 3.1 way (JSON tool calls): the tools and the tool history into the chat
template (its own `tools` support when it has one, else Llama 3.1's JSON tool prompt in the first
user message), a JSON schema forcing a call (tool_choice required / named), and the calls parsed out
of the model's text: `{"name": ..., "parameters": {...}}`, several separated by ';'."""

from __future__ import annotations

import json
import uuid

from .protocol import ChatCompletionRequest, NamedToolChoice, OpenAIError

# Llama 3.1's JSON tool-calling prompt (its chat template puts it in the first user message)
TOOL_PROMPT = ("Given the following functions, please respond with a JSON for a function call with its proper "
               "arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function name, "
               "\"parameters\": dictionary of argument name and its value}. Do not use variables.\n\n")  # fmt: skip
PYTHON_TAG = "<|python_tag|>"  # Llama 3.1 may open a call with it


def template_messages(req: ChatCompletionRequest, template_has_tools: bool) -> tuple[list[dict], list[dict] | None]:
    """(the messages as the chat template gets them, the tools to pass to it or None)."""
    tools = [t.model_dump(exclude_none=True) for t in req.active_tools]
    messages = []
    for i, m in enumerate(req.messages):
        d = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            calls = [(c.function.name, _arguments(c.function.arguments, f"messages[{i}].tool_calls")) for c in m.tool_calls]
            if template_has_tools:  # HF convention: arguments as a dict
                d["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": n, "arguments": a}}
                                   for c, (n, a) in zip(m.tool_calls, calls)]  # fmt: skip
            else:  # the call as the model wrote it
                text = "; ".join(json.dumps({"name": n, "parameters": a}) for n, a in calls)
                d["content"] = (d["content"] + "\n" if d["content"] else "") + text
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        messages.append(d)
    if not tools or template_has_tools:
        return messages, tools or None
    first = next((d for d in messages if d["role"] == "user"), None)
    listing = TOOL_PROMPT + "\n\n".join(json.dumps(t, indent=4) for t in tools) + "\n\n"
    if first is None:
        messages.insert(0, {"role": "user", "content": listing})
    else:
        first["content"] = listing + first["content"]
    return messages, None


def forced_call_schema(req: ChatCompletionRequest) -> dict | None:
    """The JSON schema of the call the output must be (tool_choice required: any tool; named: that one),
    or None when the model may answer freely."""
    choice = req.tool_choice
    if choice == "required":
        tools = req.active_tools
    elif isinstance(choice, NamedToolChoice):
        tools = [t for t in req.active_tools if t.function.name == choice.function.name]
    else:
        return None
    schemas = [{"type": "object", "properties": {"name": {"const": t.function.name}, "parameters": _closed(t)},
                "required": ["name", "parameters"], "additionalProperties": False} for t in tools]  # fmt: skip
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def _closed(tool) -> dict:
    """The tool's parameters schema with no properties beyond those it names (as OpenAI's strict function
    calling): still valid against the schema, and a small model cannot ramble on in invented arguments."""
    params = dict(tool.function.parameters or {"type": "object"})
    if params.get("type") == "object" and "properties" in params:
        params.setdefault("additionalProperties", False)
    return params


def may_be_call(text: str) -> bool:
    """Whether text (the start of an answer) can still become a tool call."""
    s = text.lstrip()
    if PYTHON_TAG.startswith(s):  # (the tag so far, when its text comes in pieces)
        return True
    s = s.removeprefix(PYTHON_TAG).lstrip()
    return not s or s.startswith("{")


def parse_calls(text: str, req: ChatCompletionRequest) -> list[dict] | None:
    """OpenAI tool_calls of an answer that is one or more JSON calls of the request's tools (';'-separated),
    else None. A call's arguments are its "parameters" (or "arguments") object's text as the model wrote
    it, so a stream of its pieces (ToolCallStream) adds up to the same string. parallel_tool_calls=false
    keeps the first call only."""
    names = {t.function.name for t in req.active_tools}
    calls, at = [], _call_start(text)
    while at < len(text):
        scan = _scan_call(text, at, names)
        if scan.state != "complete":
            return None
        calls.append(_call(scan.name, text[scan.args : scan.args_end]))
        at = _next_call(text, scan.end)
    if not calls:
        return None
    return calls[:1] if req.parallel_tool_calls is False else calls


class ToolCallStream:
    """A chat answer's text, fed as it is generated, as OpenAI stream deltas (as vLLM's Llama 3 JSON
    parser streams them): plain `content` once the answer cannot be a call; else nothing while it may
    still be one (no raw call JSON in `content`); then per call a first delta with its index, id, type
    and name (arguments ""), and deltas with the pieces of its arguments' text as they come. finish()
    reconciles with parse_calls of the whole text (what the non-streamed answer holds)."""

    def __init__(self, req: ChatCompletionRequest) -> None:
        self.req = req
        self.names = {t.function.name for t in req.active_tools}
        self.text = ""  # the answer so far
        self.mode = "undecided"  # "content": plain text; "calls": calls are being streamed
        self.calls: list[list] = []  # per streamed call: [id, name, characters of its arguments sent]
        self.at = 0  # where the call being streamed starts in text (mode "calls")

    def feed(self, piece: str) -> list[dict]:
        """The deltas (dicts for `delta`) the new piece of text gives."""
        self.text += piece
        if self.mode == "content":
            return [{"content": piece}] if piece else []
        if self.mode == "undecided":
            if not may_be_call(self.text):
                self.mode = "content"
                return [{"content": self.text}]
            if PYTHON_TAG.startswith(self.text.lstrip()):
                return []
            self.at = _call_start(self.text)
            scan = _scan_call(self.text, self.at, self.names)
            if scan.state == "invalid":
                self.mode = "content"
                return [{"content": self.text}]
            if not scan.started:
                return []
            self.mode = "calls"
            return self._start_call(scan)
        return self._more()

    def finish(self) -> tuple[list[dict], bool]:
        """(the last deltas, whether the answer is tool calls) once generation ended."""
        final = parse_calls(self.text, self.req)
        if final is None:  # not calls: what was held is content (calls already streamed stay sent)
            held = self.mode == "undecided" and self.text
            return [{"content": self.text}] if held else [], False
        deltas = []
        for i, call in enumerate(final):
            args = call["function"]["arguments"]
            if i < len(self.calls):
                call_id, _, sent = self.calls[i]
                if args[sent:]:
                    deltas.append(_delta(i, {"arguments": args[sent:]}))
            else:
                deltas += [_delta(i, {"name": call["function"]["name"], "arguments": ""}, call["id"]),
                           *([_delta(i, {"arguments": args})] if args else [])]  # fmt: skip
        return deltas, True

    def _start_call(self, scan: "_Scan") -> list[dict]:
        """The first delta of a call whose name is known, then _more()."""
        self.calls.append([_call_id(), scan.name, 0])
        return [self._header(), *self._more()]

    def _header(self) -> dict:
        call_id, name, _ = self.calls[-1]
        return _delta(len(self.calls) - 1, {"name": name, "arguments": ""}, call_id)

    def _more(self) -> list[dict]:
        """The argument pieces since the last call (and the next calls' starts, with parallel calls)."""
        deltas = []
        while self.at is not None:
            scan = _scan_call(self.text, self.at, self.names)
            index, call = len(self.calls) - 1, self.calls[-1]
            if not scan.started:  # the call's object no longer parses: finish() decides
                self.at = None
                break
            end = scan.args_end if scan.args_end is not None else len(self.text)
            if end - scan.args > call[2]:
                deltas.append(_delta(index, {"arguments": self.text[scan.args + call[2] : end]}))
                call[2] = end - scan.args
            if scan.state != "complete":
                break
            at = _next_call(self.text, scan.end)
            if at >= len(self.text) or self.req.parallel_tool_calls is False:
                if self.req.parallel_tool_calls is False:  # the rest is not streamed
                    self.at = None
                break
            nxt = _scan_call(self.text, at, self.names)
            if not nxt.started:  # not yet (or never) a next call
                if nxt.state == "invalid":
                    self.at = None
                break
            self.at = at
            self.calls.append([_call_id(), nxt.name, 0])
            deltas.append(self._header())
        return deltas


def _delta(index: int, function: dict, call_id: str | None = None) -> dict:
    """A tool_calls delta: a call's first (with its id and type) or one of its argument pieces."""
    head = {} if call_id is None else {"id": call_id, "type": "function"}
    return {"tool_calls": [{"index": index, **head, "function": function}]}


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name: str, arguments: str) -> dict:
    return {"id": _call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def _call_start(text: str) -> int:
    """Where the first call's object starts: after leading whitespace and Llama 3.1's <|python_tag|>."""
    at = len(text) - len(text.lstrip())
    if text.startswith(PYTHON_TAG, at):
        at += len(PYTHON_TAG)
        at = len(text) - len(text[at:].lstrip())
    return at


def _next_call(text: str, at: int) -> int:
    """Where the next call starts after a call ending at `at`: past whitespace and ';'."""
    while at < len(text) and text[at] in " \t\r\n;":
        at += 1
    return at


class _Scan:
    """How far text[start:] parses as a call object {"name": ..., "parameters": {...}} (keys in any order)."""

    def __init__(self) -> None:
        self.state = "partial"  # "partial": a prefix of a call object; "invalid": none; "complete"
        self.name: str | None = None  # the tool's name, once known
        self.args: int | None = None  # where the arguments object starts in text, once it has
        self.args_end: int | None = None  # where it ends, once it has
        self.end = 0  # where the call object ends (complete)

    @property
    def started(self) -> bool:
        """Its name and the start of its arguments are known: the call can be streamed."""
        return self.state != "invalid" and self.name is not None and self.args is not None


_DECODER = json.JSONDecoder()


def _scan_call(text: str, start: int, names: set[str]) -> _Scan:
    """How far the call object at text[start] parses (a partial one: what is known so far)."""
    out, n, i = _Scan(), len(text), start

    def ws(k: int) -> int:
        while k < n and text[k] in " \t\r\n":
            k += 1
        return k

    def invalid() -> _Scan:
        out.state, out.args, out.args_end = "invalid", None, None
        return out

    if i >= n:
        return out
    if text[i] != "{":
        return invalid()
    i = ws(i + 1)
    while True:
        if i >= n:
            return out
        if text[i] != '"':
            return invalid()
        try:
            key, i = json.decoder.scanstring(text, i + 1)
        except json.JSONDecodeError:
            return out  # the key is still coming
        i = ws(i)
        if i >= n:
            return out
        if text[i] != ":":
            return invalid()
        i = ws(i + 1)
        if i >= n:
            return out
        if key == "name":
            if text[i] != '"':
                return invalid()
            try:
                name, i = json.decoder.scanstring(text, i + 1)
            except json.JSONDecodeError:  # still coming: it must become one of the tools' names
                if not any(t.startswith(text[i + 1 :]) for t in names) and "\\" not in text[i:]:
                    return invalid()
                return out
            if name not in names:
                return invalid()
            out.name = name
        elif key in ("parameters", "arguments") and out.args is None:
            if text[i] != "{":
                return invalid()
            out.args, end = i, _object_end(text, i)
            if end is None:  # the arguments are still coming
                return out
            try:
                json.loads(text[i:end])
            except json.JSONDecodeError:
                return invalid()
            i, out.args_end = end, end
        else:  # another key (kept by parse_calls): its value must be whole JSON
            try:
                _, i = _DECODER.raw_decode(text, i)
            except json.JSONDecodeError:
                return out
        i = ws(i)
        if i >= n:
            return out
        if text[i] == "}":
            if out.name is None or out.args is None:
                return invalid()
            out.state, out.end = "complete", i + 1
            return out
        if text[i] != ",":
            return invalid()
        i = ws(i + 1)


def _object_end(text: str, i: int) -> int | None:
    """The end of the JSON object starting at text[i] ('{'), by its brackets outside strings; None while open."""
    depth, in_string, escaped = 0, False, False
    for k in range(i, len(text)):
        ch = text[k]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return k + 1
    return None


def _arguments(text: str, param: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise OpenAIError(f"{param}: function.arguments={text[:60]!r} is not JSON", param=param) from None
    if not isinstance(value, dict):
        raise OpenAIError(f"{param}: function.arguments={text[:60]!r}; expected a JSON object", param=param)
    return value
