"""The OpenAI-compatible API through the official `openai` client, against `python app.py --api`."""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from tests.browser import AppProcess, free_port
from tests.test_webui_handlers import link_model

KEY = "sk-test-key"
OTHER_KEY = "sk-second-key"
ADMIN_KEY = "sk-admin-key"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_branch):
    models = tmp_path_factory.mktemp("models")
    link_model(smollm2_branch("main"), models / "SmolLM2-GPTQ")
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / "app.log"
    app = AppProcess(["--models-dir", str(models), "--model", "SmolLM2-GPTQ", "--context", "512", "--cache-tokens", "4096",
                      "--api", "--api-port", str(port), "--api-key", KEY, "--api-key", OTHER_KEY,
                      "--admin-key", ADMIN_KEY], {}, log)
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
    ({"messages": QUESTION, "n": 17}, "n: Input should be less than or equal to 16"),
    ({"messages": QUESTION, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "frobnicate"}}}}}}, "response_format.*cannot be used"),
    ({"messages": QUESTION, "response_format": {"type": "yaml"}}, "unknown type 'yaml'"),
    ({"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "function.name"),
    ({"messages": QUESTION, "tool_choice": "required"}, "needs tools"),
    ({"messages": QUESTION, "frobnicate": 1}, "unsupported field 'frobnicate'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "images are not supported"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "needs the tool_call_id"),
    ({"messages": QUESTION, "logit_bias": {"99999999": -100}}, "not a token id"),
    ({"messages": QUESTION, "presence_penalty": 3}, "presence_penalty"),
    ({"messages": QUESTION, "top_logprobs": 2}, "top_logprobs needs logprobs"),
    ({"messages": []}, "messages must not be empty"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
])
def test_bad_requests_get_400(client, kwargs, message):
    known = {"messages", "temperature", "n", "response_format", "tools", "tool_choice", "logit_bias",
             "presence_penalty", "top_logprobs"}
    args = {k: v for k, v in kwargs.items() if k in known}
    extra = {k: v for k, v in kwargs.items() if k not in known}
    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(model="x", **args, extra_body=extra or None)


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


def test_content_parts_are_read_as_text(client, reference_answer):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                          {"type": "text", "text": "of France?"}]}]
    reply = client.chat.completions.create(model="x", messages=parts, temperature=0, max_tokens=40)
    assert reply.choices[0].message.content == reference_answer


def test_n_choices_are_separate_samples(client):
    reply = client.chat.completions.create(model="x", messages=QUESTION, temperature=1.0, n=3, seed=5, max_tokens=16)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) > 1, texts
    again = client.chat.completions.create(model="x", messages=QUESTION, temperature=1.0, n=3, seed=5, max_tokens=16)
    assert [c.message.content for c in again.choices] == texts, "a seed fixes every choice"
    assert reply.usage.completion_tokens == sum(
        len(c.logprobs.content) for c in client.chat.completions.create(
            model="x", messages=QUESTION, temperature=1.0, n=3, seed=5, max_tokens=16, logprobs=True).choices)
    stream = client.chat.completions.create(model="x", messages=QUESTION, temperature=1.0, n=3, seed=5, max_tokens=16,
                                            stream=True)
    streamed = ["", "", ""]
    for c in stream:
        for choice in c.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert [s.strip() for s in streamed] == texts


def test_chat_logprobs_streamed_and_not(client):
    reply = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=10, logprobs=True,
                                           top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(t.token for t in content).strip() == reply.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert bytes(t.bytes).decode() == t.token
    stream = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=10, logprobs=True,
                                            top_logprobs=3, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(content)
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_logprobs_and_echo_score_the_prompt(client):
    """What evaluation harnesses send: echo with logprobs and no new tokens scores the prompt."""
    text = "The capital of France is Paris"
    scored = client.completions.create(model="x", prompt=text, max_tokens=0, echo=True, logprobs=2, temperature=0)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == text
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == text and lp.text_offset[0] == 0
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
    # The last token's log-probability equals that of generating it after the rest.
    head = text[: lp.text_offset[-1]]
    follow = client.completions.create(model="x", prompt=head, max_tokens=1, logprobs=5, temperature=0)
    assert follow.choices[0].logprobs.top_logprobs[0].get(lp.tokens[-1]) == pytest.approx(lp.token_logprobs[-1], abs=1e-3)


def test_logit_bias_and_penalties_change_the_answer(client, server, reference_answer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(server.models_dir / "SmolLM2-GPTQ"))
    first = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=1)
    first_ids = tokenizer.encode(first.choices[0].message.content, add_special_tokens=False)
    assert len(first_ids) == 1
    banned = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=1,
                                            logit_bias={str(first_ids[0]): -100})
    assert banned.choices[0].message.content != first.choices[0].message.content
    repeat = [{"role": "user", "content": "Repeat the word hello ten times."}]
    plain = client.chat.completions.create(model="x", messages=repeat, temperature=0, max_tokens=40)
    penalised = client.chat.completions.create(model="x", messages=repeat, temperature=0, max_tokens=40,
                                               frequency_penalty=1.5)
    counts = [r.choices[0].message.content.lower().count("hello") for r in (plain, penalised)]
    assert counts[0] >= 2 and counts[1] < counts[0], counts
    dry = client.chat.completions.create(model="x", messages=repeat, temperature=0, max_tokens=40,
                                         extra_body={"dry_multiplier": 3.0, "dry_allowed_length": 1})
    assert dry.choices[0].message.content != plain.choices[0].message.content
    seeded = {"temperature": 1.0, "seed": 9, "max_tokens": 16,
              "extra_body": {"mirostat_tau": 4.0, "xtc_probability": 0.5, "dynatemp_range": 0.5,
                             "sampler_order": ["min_p", "temperature", "top_k", "top_p", "typical_p", "xtc"]}}
    once = client.chat.completions.create(model="x", messages=QUESTION, **seeded).choices[0].message.content
    assert client.chat.completions.create(model="x", messages=QUESTION, **seeded).choices[0].message.content == once
    with pytest.raises(openai.BadRequestError, match="sampler_order"):
        client.chat.completions.create(model="x", messages=QUESTION, extra_body={"sampler_order": ["top_k"]})


def test_banned_strings_streamed_and_not(client, reference_answer):
    body = {"banned_strings": ["paris"]}
    reply = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=40, extra_body=body)
    text = reply.choices[0].message.content
    assert text and "paris" not in text.lower() and text != reference_answer
    stream = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=40, stream=True,
                                            extra_body=body)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


def test_structured_output_through_the_client(client):
    import jsonschema

    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 30},
                                               "population_millions": {"type": "integer", "minimum": 0, "maximum": 999}},
              "required": ["capital", "population_millions"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}
    for params in ({"temperature": 0}, {"temperature": 1.0, "seed": 4, "n": 3}):
        reply = client.chat.completions.create(model="x", messages=QUESTION, max_tokens=150, response_format=fmt,
                                               **params)
        for choice in reply.choices:
            assert choice.finish_reason == "stop", choice.message.content
            jsonschema.validate(json.loads(choice.message.content), schema)
    stream = client.chat.completions.create(model="x", messages=QUESTION, max_tokens=150, response_format=fmt,
                                            temperature=0, stream=True)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)), schema)
    regex = client.completions.create(model="x", prompt="Is Paris in France?", max_tokens=20, temperature=0,
                                      extra_body={"response_format": {"type": "regex", "regex": "(Yes|No)[.!]"}})
    assert re.fullmatch(r"(Yes|No)[.!]", regex.choices[0].text)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_a_forced_tool_call_has_valid_arguments(client):
    import jsonschema

    named = {"type": "function", "function": {"name": "get_weather"}}
    for params in ({"temperature": 0}, {"temperature": 1.0, "seed": 8, "n": 2}):
        reply = client.chat.completions.create(model="x", messages=WEATHER_QUESTION, tools=[WEATHER],
                                               tool_choice=named, max_tokens=80, **params)
        for choice in reply.choices:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            (call,) = choice.message.tool_calls
            assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    stream = client.chat.completions.create(model="x", messages=WEATHER_QUESTION, tools=[WEATHER],
                                            tool_choice="required", max_tokens=80, temperature=0, stream=True)
    chunks = list(stream)
    calls = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks if c.choices), "the call is not sent as text"


def test_tool_results_in_the_history_reach_the_prompt(client):
    history = WEATHER_QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "It is 31 degrees and sunny in Paris."}]
    reply = client.chat.completions.create(model="x", messages=history, tools=[WEATHER], max_tokens=40, temperature=0)
    without = client.chat.completions.create(model="x", messages=WEATHER_QUESTION, tools=[WEATHER], max_tokens=1)
    assert reply.usage.prompt_tokens > without.usage.prompt_tokens + 20
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert (choice.message.tool_calls is not None) == (choice.finish_reason == "tool_calls")
    none = client.chat.completions.create(model="x", messages=WEATHER_QUESTION, tools=[WEATHER], tool_choice="none",
                                         max_tokens=20, temperature=0)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason != "tool_calls"


def scrape(server, key: str | None = KEY) -> dict[str, float]:
    """``GET /metrics`` as {sample name with labels: value}, every line checked against the text format."""
    response = httpx.get(server.api_url.removesuffix("/v1") + "/metrics",
                         headers={"Authorization": f"Bearer {key}"} if key else {})
    response.raise_for_status()
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in response.text.splitlines():
        if line.startswith("# "):
            assert re.fullmatch(r"# (HELP|TYPE) gptq_workbench_\w+ .+", line), line
            continue
        name, value = line.rsplit(" ", 1)
        assert re.fullmatch(r'gptq_workbench_\w+(\{\w+="[^"]*"\})?', name), line
        samples[name] = float(value)
    return samples


def test_metrics_count_what_the_engine_did(server, client):
    assert httpx.get(server.api_url.removesuffix("/v1") + "/metrics").status_code == 401, "the API key guards it"
    before = scrape(server)
    assert before['gptq_workbench_model_loaded{model="SmolLM2-GPTQ"}'] == 1
    assert before["gptq_workbench_requests_running"] == 0 and before["gptq_workbench_kv_cache_tokens"] > 0
    reply = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Write a long story."}],
                                           temperature=0, max_tokens=5)
    assert reply.choices[0].finish_reason == "length"
    after = scrape(server)
    grew = {name: after[name] - before[name] for name in before}
    assert grew["gptq_workbench_generated_tokens_total"] == reply.usage.completion_tokens == 5
    assert grew["gptq_workbench_prompt_tokens_total"] == reply.usage.prompt_tokens
    assert grew['gptq_workbench_requests_finished_total{reason="length"}'] == 1
    assert grew['gptq_workbench_requests_finished_total{reason="eos"}'] == 0
    assert after["gptq_workbench_kv_cache_tokens_in_use"] == 0


def test_models_load_and_unload_with_the_admin_key_only(server, client, reference_answer):
    """Last in this file: it unloads the model that the others use, then loads it again."""
    def post(path: str, key: str, **body):
        return httpx.post(f"{server.api_url}/internal/model/{path}", headers={"Authorization": f"Bearer {key}"},
                          json=body or None, timeout=120)

    assert post("unload", KEY).status_code == 401, "a user key cannot unload"
    info = httpx.get(f"{server.api_url}/internal/model/info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["model_name"] == "SmolLM2-GPTQ" and info["backend"] == "cpu" and info["kv_cache_dtype"] == "bfloat16"
    assert post("unload", ADMIN_KEY).json() == {"status": "unloaded", "model_name": "SmolLM2-GPTQ"}
    assert scrape(server) == {"gptq_workbench_model_loaded": 0}
    with pytest.raises(openai.APIStatusError, match="no model is loaded"):
        client.chat.completions.create(model="x", messages=QUESTION, max_tokens=4)
    missing = post("load", ADMIN_KEY, model_name="nope")
    assert missing.status_code == 400 and "no model named 'nope'" in missing.json()["error"]["message"]
    unknown = post("load", ADMIN_KEY, model_name="SmolLM2-GPTQ", kv_cache="int4")
    assert unknown.status_code == 400 and "kv_cache" in unknown.json()["error"]["message"]
    if not torch.cuda.is_available():
        cpu = post("load", ADMIN_KEY, model_name="SmolLM2-GPTQ", kv_cache="fp8")
        assert cpu.status_code == 400 and "an fp8 KV cache needs a GPU" in cpu.json()["error"]["message"]
    loaded = post("load", ADMIN_KEY, model_name="SmolLM2-GPTQ", context_length=512, cache_tokens=4096)
    assert loaded.status_code == 200 and loaded.json()["context_length"] == 512
    for _ in range(2):
        reply = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=40)
        assert reply.choices[0].message.content == reference_answer
    info = httpx.get(f"{server.api_url}/internal/model/info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert (info["running"], info["waiting"], info["kv_cache_tokens"], info["kv_cache_tokens_in_use"]) == (0, 0, 4096, 0)
    assert info["prompt_tokens_reused"] >= 16, "the second request found the first one's prompt in the cache"

