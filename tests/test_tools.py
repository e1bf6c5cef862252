"""Tool calling's parts: parsing calls out of replies, the documented prompt format, the forced-call schema,
and rendering through a chat template that takes tools (a real tokenizer's)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from webui import templates
from webui.tools import (Call, Tool, ToolError, chosen_tools, forced_schema, in_documented_format, parse_calls,
                         parse_tools, prompt_ids, template_takes_tools)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = parse_tools([WEATHER, TIME])


@pytest.mark.parametrize("text, content, calls", [
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', None, [Call("get_weather", {"city": "Paris"})]),
    ('Sure.\n```json\n{"name": "get_time", "arguments": {}}\n```', "Sure.", [Call("get_time", {})]),
    ('<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>', None,
     [Call("get_weather", {"city": "Oslo"})]),
    ('[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "parameters": {"city": "Rome"}}]', None,
     [Call("get_time", {}), Call("get_weather", {"city": "Rome"})]),
    ('{"name": "launch_rockets", "arguments": {}}', '{"name": "launch_rockets", "arguments": {}}', []),
    ("It is sunny {probably}.", "It is sunny {probably}.", []),
])
def test_calls_are_parsed_wherever_they_stand(text, content, calls):
    assert parse_calls(text, TOOLS) == (content, calls)


def test_the_documented_format_writes_tools_calls_and_results():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                      "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    out = in_documented_format(messages, TOOLS)
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.")
    assert '"name": "get_weather"' in out[0]["content"] and "get_time" in out[0]["content"]
    assert json.loads(out[2]["content"]) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert out[3] == {"role": "user", "content": "Result of get_weather (call call_1): 18 C, sunny"}
    assert all(set(m) == {"role", "content"} for m in out)


def test_the_forced_schema_takes_exactly_a_call_with_valid_arguments():
    schema = forced_schema(chosen_tools(TOOLS, {"type": "function", "function": {"name": "get_weather"}})[0])
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Lima"}}, schema)
    for bad in ({"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {}},
                {"name": "get_weather", "arguments": {"city": "Lima"}, "extra": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    either = forced_schema(TOOLS)
    jsonschema.validate({"name": "get_time", "arguments": {}}, either)


@pytest.mark.parametrize("choice, message", [
    ({"type": "function", "function": {"name": "nope"}}, "not among the tools"),
    ("sometimes", "tool_choice must be"),
])
def test_bad_tool_choices(choice, message):
    with pytest.raises(ToolError, match=message):
        chosen_tools(TOOLS, choice)
    with pytest.raises(ToolError, match="share a name"):
        parse_tools([WEATHER, WEATHER])


def test_a_template_that_takes_tools_renders_them(smollm2_branch):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_branch("main")))
    assert not template_takes_tools(tokenizer, templates.AUTO)
    tokenizer.chat_template = (
        "{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}"
        "{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
        "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert template_takes_tools(tokenizer, templates.AUTO)
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "X"}'}}]},
                {"role": "tool", "tool_call_id": "c", "content": "warm"}]
    text = tokenizer.decode(prompt_ids(tokenizer, templates.AUTO, messages, TOOLS, False))
    assert '<tools>[{"type": "function", "function": {"name": "get_weather"' in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "X"}}</tool_call>' in text
    assert "warm" in text and text.endswith("<|im_start|>assistant\n")
