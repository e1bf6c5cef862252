"""The OpenAI-compatible API through the official `openai` client, against `python app.py --api`."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.browser import AppProcess, free_port
from tests.test_webui_handlers import link_model

KEY = "sk-test-key"
OTHER_KEY = "sk-second-key"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_branch):
    models = tmp_path_factory.mktemp("models")
    link_model(smollm2_branch("main"), models / "SmolLM2-GPTQ")
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / "app.log"
    app = AppProcess(["--models-dir", str(models), "--model", "SmolLM2-GPTQ", "--context", "512", "--cache-tokens", "4096",
                      "--api", "--api-port", str(port), "--api-key", KEY, "--api-key", OTHER_KEY], {}, log)
    app.api_url = f"http://127.0.0.1:{port}/v1"
    app.models_dir = models
    yield app
    app.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.api_url, api_key=KEY, timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def reference_answer(client):
    reply = client.chat.completions.create(model="SmolLM2-GPTQ", messages=QUESTION, temperature=0, max_tokens=40)
    return reply.choices[0].message.content


def test_key_is_required(server):
    response = httpx.get(f"{server.api_url}/models")
    assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
    wrong = openai.OpenAI(base_url=server.api_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        wrong.models.list()
    second = openai.OpenAI(base_url=server.api_url, api_key=OTHER_KEY, max_retries=0)
    assert [m.id for m in second.models.list().data] == ["SmolLM2-GPTQ"]


def test_chat_completion(client, reference_answer):
    assert "Paris" in reference_answer
    reply = client.chat.completions.create(model="SmolLM2-GPTQ", messages=QUESTION, temperature=0, max_tokens=40)
    assert reply.choices[0].message.content == reference_answer
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 10 and 0 < reply.usage.completion_tokens <= 40
    assert reply.model == "SmolLM2-GPTQ"


def test_chat_completion_streams(client, reference_answer):
    stream = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=40, stream=True)
    chunks = list(stream)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) >= 3, "the answer arrives in pieces"
    assert "".join(deltas).strip() == reference_answer
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completions(client):
    reply = client.completions.create(model="x", prompt="The capital of France is", temperature=0, max_tokens=5)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5
    assert reply.choices[0].text.strip()
    stopped = client.completions.create(model="x", prompt="1, 2, 3, 4,", temperature=0, max_tokens=30, stop=["7"])
    assert "7" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    stream = client.completions.create(model="x", prompt="The capital of France is", temperature=0, max_tokens=5,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream) == reply.choices[0].text


def test_seed_repeats_a_sampled_answer(client):
    def ask():
        return client.chat.completions.create(model="x", messages=QUESTION, temperature=1.0, top_p=0.95, seed=1234,
                                              max_tokens=20).choices[0].message.content

    assert ask() == ask()


def test_condition_selects_the_openchat_template(client, server):
    from transformers import AutoTokenizer

    from webui import templates

    tokenizer = AutoTokenizer.from_pretrained(str(server.models_dir / "SmolLM2-GPTQ"))
    reply = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=2,
                                           extra_body={"condition": "Math Correct"})
    expected = templates.prompt_ids(tokenizer, "Math Correct", QUESTION)
    assert reply.usage.prompt_tokens == len(expected)
    with pytest.raises(openai.BadRequestError, match="unknown condition"):
        client.chat.completions.create(model="x", messages=QUESTION, extra_body={"condition": "Poetry"})


@pytest.mark.parametrize("kwargs, message", [
    ({"messages": [{"role": "user", "content": "word " * 600}]}, "context length is 512"),
    ({"messages": QUESTION, "temperature": -1}, "temperature"),
    ({"messages": QUESTION, "n": 2}, "n=1"),
    ({"messages": []}, "messages must not be empty"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
])
def test_bad_requests_get_400(client, kwargs, message):
    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(model="x", **kwargs)


def test_twenty_concurrent_requests(client, reference_answer):
    def one(i: int) -> str:
        if i % 2:
            stream = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=40,
                                                    stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip()
        return client.chat.completions.create(model="x", messages=QUESTION, temperature=0,
                                              max_tokens=40).choices[0].message.content

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(one, range(20)))
    assert answers == [reference_answer] * 20


def test_a_disconnected_stream_frees_the_model(client, server, reference_answer):
    long_story = [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]
    with httpx.stream("POST", f"{server.api_url}/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "x", "messages": long_story, "max_tokens": 480, "temperature": 0,
                            "stream": True}) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
    assert any('"content"' in line for line in received)
    # Had the story kept the model, this would wait for its 480 tokens; it is answered next instead.
    reply = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=40)
    assert reply.choices[0].message.content == reference_answer
    log = server.log.read_text()
    story = re.search(r"(chatcmpl-\w+): client went away; generation cancelled", log)
    assert story, log[-2000:]
    ended = re.search(rf"{story.group(1)}: finished \(cancelled, (\d+) tokens\)", log)
    assert ended and int(ended.group(1)) < 100, "the story stopped soon after the client left"
    assert log.index(ended.group(0)) < log.rindex("finished (eos"), "and before the next request was answered"


def test_64_concurrent_requests_each_get_their_own_answer(client, server):
    """All at once through the official client: each equals its request run alone, and the server answers
    other calls meanwhile."""
    def ask(i: int):
        messages = [{"role": "user", "content": f"Write one sentence about the number {i}."}]
        return client.chat.completions.create(model="SmolLM2-GPTQ", messages=messages, temperature=0, max_tokens=12)

    alone = [ask(i).choices[0].message.content for i in range(64)]
    with ThreadPoolExecutor(64) as pool:
        futures = [pool.submit(ask, i) for i in range(64)]
        listed = client.models.list()  # while the 64 run
        replies = [f.result(timeout=600) for f in futures]
    assert [m.id for m in listed.data] == ["SmolLM2-GPTQ"]
    for i, reply in enumerate(replies):
        assert reply.choices[0].message.content == alone[i], f"request {i}"
        assert reply.choices[0].finish_reason in ("stop", "length")
    assert len(set(alone)) > 32, "the questions get different answers"
