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
    s = text.lstrip().removeprefix(PYTHON_TAG).lstrip()
    return not s or s.startswith("{")


def parse_calls(text: str, req: ChatCompletionRequest) -> list[dict] | None:
    """OpenAI tool_calls of an answer that is one or more JSON calls of the request's tools (';'-separated),
    else None. parallel_tool_calls=false keeps the first call only."""
    names = {t.function.name for t in req.active_tools}
    s = text.strip().removeprefix(PYTHON_TAG).strip()
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(s):
        try:
            obj, at = decoder.raw_decode(s, at)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or obj.get("name") not in names:
            return None
        args = obj.get("parameters", obj.get("arguments"))
        if not isinstance(args, dict):
            return None
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}})  # fmt: skip
        while at < len(s) and s[at] in " \t\r\n;":
            at += 1
    if not calls:
        return None
    return calls[:1] if req.parallel_tool_calls is False else calls


def _arguments(text: str, param: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise OpenAIError(f"{param}: function.arguments={text[:60]!r} is not JSON", param=param) from None
    if not isinstance(value, dict):
        raise OpenAIError(f"{param}: function.arguments={text[:60]!r}; expected a JSON object", param=param)
    return value
