"""Tool calling for the chat API: tools into the prompt, the model's calls back out as ``tool_calls``.

- A chat template that takes ``tools`` (the tokenizer's own, when its Jinja source uses them) renders
  them, and the history's tool calls and results, its own way.
- Otherwise the tools go into the system message in one documented format (:data:`TOOL_PROMPT`): the model
  answers a call with a JSON object ``{"name": ..., "arguments": {...}}`` (a list of them for several);
  earlier calls are written back in that format and results as "Result of NAME (call ID): ...".
- A call is parsed out of the reply wherever it stands (bare, in a code fence or in a model's own
  ``<tool_call>`` tags), for the tools that were offered.
- ``tool_choice`` "required" or a named function is decoded under a JSON Schema of the call
  (backends/constraints.py), so the arguments always validate against the function's parameters.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from webui import templates

TOOL_PROMPT = (
    "You can call functions. To call one, answer with nothing but a JSON object: "
    '{{"name": <function name>, "arguments": <object of its arguments>}}; for several calls, a JSON list of '
    "such objects. Otherwise answer normally.\nFunctions:\n{specs}"
)
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ToolError(ValueError):
    """The tools or tool_choice of a request cannot be used; the message says why."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict

    def spec(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class Call:
    name: str
    arguments: dict
    id: str = ""

    def as_openai(self) -> dict:
        return {"id": self.id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments)}}


def parse_tools(raw: list[dict]) -> list[Tool]:
    tools = []
    for i, entry in enumerate(raw):
        function = entry.get("function") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or entry.get("type") != "function" or not isinstance(function, dict):
            raise ToolError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        name = function.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ToolError(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-'")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON Schema object")
        tools.append(Tool(name, str(function.get("description", "")), parameters))
    if len({t.name for t in tools}) != len(tools):
        raise ToolError("tools: two functions share a name")
    return tools


def chosen_tools(tools: list[Tool], choice) -> tuple[list[Tool], bool]:
    """The tools the reply may call under ``tool_choice``, and whether it must call one."""
    if choice is None or choice == "auto":
        return tools, False
    if choice == "none":
        return [], False
    if choice == "required":
        if not tools:
            raise ToolError("tool_choice 'required' needs tools")
        return tools, True
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        named = [t for t in tools if t.name == name]
        if not named:
            raise ToolError(f"tool_choice names {name!r}, which is not among the tools")
        return named, True
    raise ToolError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}")


def forced_schema(tools: list[Tool]) -> dict:
    """A JSON Schema of one call to one of ``tools``, arguments under the function's own parameters."""
    options = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return options[0] if len(options) == 1 else {"anyOf": options}


def template_takes_tools(tokenizer, template: str) -> bool:
    source = getattr(tokenizer, "chat_template", None)
    return template == templates.AUTO and isinstance(source, str) and "tools" in source


def prompt_ids(tokenizer, template: str, messages: list[dict], tools: list[Tool], continue_last: bool) -> list[int]:
    """The prompt for ``messages`` (which may hold tool calls and results) with ``tools`` offered."""
    if template_takes_tools(tokenizer, template):
        return templates.prompt_ids(tokenizer, template, [_for_template(m) for m in messages], continue_last,
                                    tools=[t.spec() for t in tools] or None)
    return templates.prompt_ids(tokenizer, template, in_documented_format(messages, tools), continue_last)


def _for_template(message: dict) -> dict:
    """A message as Hugging Face chat templates take it (arguments as objects, not JSON text)."""
    if not message.get("tool_calls"):
        return message
    calls = [{"type": "function", "id": c.get("id"), "function": {"name": c["function"]["name"],
                                                                  "arguments": _arguments(c)}}
             for c in message["tool_calls"]]
    return {**message, "content": message.get("content") or "", "tool_calls": calls}


def _arguments(call: dict) -> dict:
    raw = call["function"].get("arguments", "{}")
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as exc:
        raise ToolError(f"tool call {call.get('id')!r}: arguments are not JSON ({exc})") from exc
    return value if isinstance(value, dict) else {"value": value}


def in_documented_format(messages: list[dict], tools: list[Tool]) -> list[dict]:
    """Plain role/content messages: the tools in the system message, calls and results written out."""
    names: dict[str, str] = {}
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": _arguments(c)} for c in m["tool_calls"]]
            names.update({c.get("id", ""): c["function"]["name"] for c in m["tool_calls"]})
            text = json.dumps(calls[0] if len(calls) == 1 else calls)
            out.append({"role": "assistant", "content": ((m.get("content") or "") + "\n" + text).strip()})
        elif m["role"] == "tool":
            call = m.get("tool_call_id") or ""
            out.append({"role": "user", "content": f"Result of {names.get(call, 'the function')} (call {call}): "
                                                   f"{m.get('content') or ''}"})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if tools:
        prompt = TOOL_PROMPT.format(specs="\n".join(json.dumps(t.spec()["function"]) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}".strip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def parse_calls(text: str, tools: list[Tool]) -> tuple[str | None, list[Call]]:
    """The calls to ``tools`` in a reply, and the text around them (None if nothing but calls)."""
    known = {t.name for t in tools}
    decoder = json.JSONDecoder()
    calls, spans, at = [], [], 0
    while (start := _next_json(text, at)) != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            at = start + 1
            continue
        found = [_as_call(v, known) for v in (value if isinstance(value, list) else [value])]
        if found and all(found):
            calls += found
            spans.append((start, end))
        at = end
    if not calls:
        return text, []
    rest, last = [], 0
    for start, end in spans:
        rest.append(text[last:start])
        last = end
    rest.append(text[last:])
    leftover = re.sub(r"</?tool_call>|```(?:json)?", "", "".join(rest)).strip()
    return leftover or None, calls


def _next_json(text: str, at: int) -> int:
    brace, bracket = text.find("{", at), text.find("[", at)
    found = [i for i in (brace, bracket) if i != -1]
    return min(found) if found else -1


def _as_call(value, known: set[str]) -> Call | None:
    if not isinstance(value, dict) or value.get("name") not in known:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return Call(value["name"], arguments) if isinstance(arguments, dict) else None


def starts_like_a_call(text: str) -> bool | None:
    """For streaming: whether a reply that begins with ``text`` may be a call (its text is then held back),
    None while only whitespace has come."""
    head = text.lstrip()
    if not head:
        return None
    return head[0] in "{[<`"
