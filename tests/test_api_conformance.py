"""Response shapes, field by field, against the OpenAI API reference as the official client declares it
(openai-python's types are generated from OpenAI's OpenAPI specification): every required field is there,
and no field is one the reference does not have. Chat completions and completions, streamed and not."""

from __future__ import annotations

import json
import types
import typing

import httpx
import pydantic
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.test_api import KEY, QUESTION, server  # noqa: F401 - the shared app process


def mismatches(value, annotation, path: str = "$") -> list[str]:
    """Where ``value`` (parsed JSON) departs from the type ``annotation``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return []
        found = [mismatches(value, option, path) for option in options if option is not type(None)]
        return min(found, key=len) if found else [f"{path}: null is not allowed"]
    if origin is typing.Annotated:
        return mismatches(value, typing.get_args(annotation)[0], path)
    if origin is typing.Literal:
        return [] if value in typing.get_args(annotation) else [f"{path}: {value!r} not in {typing.get_args(annotation)}"]
    if origin in (list, typing.List):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        (item,) = typing.get_args(annotation)
        return [m for i, v in enumerate(value) for m in mismatches(v, item, f"{path}[{i}]")]
    if origin in (dict, typing.Dict):
        return [] if isinstance(value, dict) else [f"{path}: expected an object"]
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        if not isinstance(value, dict):
            return [f"{path}: expected an object for {annotation.__name__}"]
        fields = annotation.model_fields
        problems = [f"{path}.{key}: not in the reference's {annotation.__name__}" for key in value if key not in fields]
        problems += [f"{path}.{name}: required by the reference, missing" for name, f in fields.items()
                     if f.is_required() and name not in value]
        for name, f in fields.items():
            if name in value:
                problems += mismatches(value[name], f.annotation, f"{path}.{name}")
        return problems
    if annotation is float:
        return [] if isinstance(value, (int, float)) and not isinstance(value, bool) else [f"{path}: expected a number"]
    if annotation in (int, str, bool):
        return [] if type(value) is annotation else [f"{path}: expected {annotation.__name__}, got {value!r}"]
    return []


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.api_url}/{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=300)


def events(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.api_url}/{path}", json=body, timeout=300,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


CHAT = {"model": "x", "messages": QUESTION, "temperature": 0, "max_tokens": 8}


@pytest.mark.parametrize("extra", [{}, {"logprobs": True, "top_logprobs": 2}, {"n": 2, "temperature": 1.0, "seed": 3}])
def test_chat_completion_shape(server, extra):
    body = post(server, "chat/completions", {**CHAT, **extra}).json()
    assert mismatches(body, ChatCompletion) == []
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("extra", [{}, {"logprobs": True, "top_logprobs": 2, "stream_options": {"include_usage": True}}])
def test_chat_completion_chunk_shape(server, extra):
    chunks = events(server, "chat/completions", {**CHAT, **extra, "stream": True})
    for chunk in chunks:
        assert mismatches(chunk, ChatCompletionChunk) == [], chunk
        assert chunk["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"


# The one departure, on purpose: with echo the first prompt token has no log-probability. The reference types
# it as a number; OpenAI's legacy API itself answered null there, as vLLM does, and evaluation harnesses
# (lm-evaluation-harness) expect it.
ECHO_FIRST_TOKEN = ["$.choices[0].logprobs.token_logprobs[0]: expected a number",
                    "$.choices[0].logprobs.top_logprobs[0]: expected an object"]


@pytest.mark.parametrize("extra", [{}, {"logprobs": 2}, {"echo": True, "logprobs": 1, "max_tokens": 0}])
def test_completion_shape(server, extra):
    body = post(server, "completions", {"model": "x", "prompt": "The capital of France is", "temperature": 0,
                                        "max_tokens": 4, **extra}).json()
    assert mismatches(body, Completion) == (ECHO_FIRST_TOKEN if extra.get("echo") else [])
    assert body["object"] == "text_completion"


def test_completion_chunk_shape(server):
    chunks = events(server, "completions", {"model": "x", "prompt": "The capital of France is", "max_tokens": 4,
                                            "stream": True, "logprobs": 1, "stream_options": {"include_usage": True}})
    # Streamed completions reuse the Completion type, whose finish_reason the reference does not let be null;
    # every chunk before the last has none yet, and OpenAI's own stream sends null there.
    unfinished = "$.choices[0].finish_reason: None not in ('stop', 'length', 'content_filter')"
    for chunk in chunks:
        found = mismatches(chunk, Completion)
        assert found in ([], [unfinished]), chunk
        assert found == [] or chunk is not chunks[-1]


def test_the_checker_finds_departures():
    assert mismatches({"id": "x"}, ChatCompletion)  # required fields missing
    sample = {"id": "a", "object": "chat.completion", "created": 1, "model": "m", "choices": [], "surprise": 1}
    assert mismatches(sample, ChatCompletion) == ["$.surprise: not in the reference's ChatCompletion"]
    sample["choices"] = [{"index": "0", "message": {"role": "assistant"}, "finish_reason": "stop"}]
    del sample["surprise"]
    assert mismatches(sample, ChatCompletion) == ["$.choices[0].index: expected int, got '0'"]
