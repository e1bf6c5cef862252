"""Structured output on the real SmolLM2 GPTQ checkpoint: whatever the sampling, the text parses and
validates against its JSON Schema (jsonschema is the oracle), matches its regex or grammar."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from backends.constraints import Grammar, GrammarError
from backends.generation import Generation
from backends.loader import LoadOptions, load_model
from backends.sampling import SamplingParams

SCHEMAS = [
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
     "additionalProperties": False},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                      "likes_cats": {"type": "boolean"}},
     "required": ["name", "age", "likes_cats"], "additionalProperties": False},
    {"type": "object", "properties": {"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                 "minItems": 1, "maxItems": 3}},
     "required": ["colors"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"type": "number"}, "unit": {"enum": ["m", "km"]}},
     "required": ["answer", "unit"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "integer"},
                                                                                 "y": {"type": "integer"}},
                                                "required": ["x", "y"], "additionalProperties": False},
                                      "label": {"type": ["string", "null"], "maxLength": 10}},
     "required": ["point", "label"], "additionalProperties": False},
]
PARAMS = [SamplingParams(temperature=0, max_new_tokens=120),
          SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=120, seed=11),
          SamplingParams(temperature=1.5, max_new_tokens=120, seed=12, repetition_penalty=1.2)]


@pytest.fixture(scope="module")
def loaded(smollm2_branch):
    model = load_model(smollm2_branch("main"), LoadOptions(device="cpu", context_length=512, cache_tokens=4096))
    yield model
    model.engine.close()


def ask(loaded, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    return loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]


def run(generation: Generation) -> Generation:
    for _ in generation:
        pass
    return generation


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: "-".join(s["properties"]))
@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "sampled", "hot"])
def test_output_validates_against_the_schema(loaded, schema, params):
    grammar = Grammar("json_schema", json.dumps(schema))
    gen = run(Generation(loaded, ask(loaded, "Describe a person as JSON."), params, grammar=grammar))
    assert gen.result.finish_reason == "eos", gen.result.text
    jsonschema.validate(json.loads(gen.result.text), schema)


def test_many_requests_at_once_each_follow_their_own_schema(loaded):
    import threading

    gens = [Generation(loaded, ask(loaded, f"Give me data number {i}."), PARAMS[i % 3],
                       grammar=Grammar("json_schema", json.dumps(SCHEMAS[i % len(SCHEMAS)]))) for i in range(10)]
    gens.append(Generation(loaded, ask(loaded, "Say hello."), SamplingParams(temperature=0, max_new_tokens=12)))
    threads = [threading.Thread(target=run, args=(g,)) for g in gens]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    ended = [g for g in gens[:-1] if g.result.finish_reason == "eos"]
    for i, g in enumerate(gens[:-1]):
        if g.result.finish_reason == "eos":
            jsonschema.validate(json.loads(g.result.text), SCHEMAS[i % len(SCHEMAS)])
        else:  # a grammar cannot make a model stop: greedy SmolLM2 can write the digits of a number forever
            assert g.result.finish_reason == "length" and g.result.new_tokens == g.params.max_new_tokens, g.result
    assert len(ended) >= 8, [g.result.text for g in gens]
    with pytest.raises(json.JSONDecodeError):
        json.loads(gens[-1].result.text)  # the unconstrained one is free text


def test_json_object_regex_and_lark(loaded):
    # Any object: its size is up to the model (this small one often rambles past any limit), so one it ends.
    obj = run(Generation(loaded, ask(loaded, 'Write {"ok": true} and nothing else.'),
                         SamplingParams(temperature=0, max_new_tokens=100), grammar=Grammar("json_object")))
    assert obj.result.finish_reason == "eos", obj.result.text
    assert isinstance(json.loads(obj.result.text), dict)
    pattern = r"(yes|no), because [a-z ]{3,30}\."
    rx = run(Generation(loaded, ask(loaded, "Is the sky blue?"), PARAMS[1], grammar=Grammar("regex", pattern)))
    assert re.fullmatch(pattern, rx.result.text), rx.result.text
    lark = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]{1,3}/'
    gen = run(Generation(loaded, ask(loaded, "What is 6 times 7?"), PARAMS[0], grammar=Grammar("lark", lark)))
    assert re.fullmatch(r"The answer is [0-9]{1,3}\.", gen.result.text), gen.result.text


@pytest.mark.parametrize("grammar, message", [
    (Grammar("json_schema", "{not json"), "not valid JSON"),
    (Grammar("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "frobnicate"}}})), "cannot be used"),
    (Grammar("regex", "(unclosed"), "cannot be used"),
    (Grammar("xml", "<a/>"), "unknown grammar kind"),
])
def test_bad_grammars_are_refused_before_anything_runs(loaded, grammar, message):
    with pytest.raises(GrammarError, match=message):
        Generation(loaded, ask(loaded, "x"), PARAMS[0], grammar=grammar)


@pytest.mark.parametrize("vocabulary", ["llama", "mistral"])
def test_tokenizer_model_only_repos_get_structured_output(tmp_path, vocabulary):
    """The seed models ship only tokenizer.model (and OpenChat an added end-of-turn token): their vocabulary
    reaches llguidance through sentencepiece. A random-weight model with Llama-2's or Mistral's real
    tokenizer, any sampling: the output validates."""
    import shutil

    from tests.gptq_testing import tiny_config, write_random_checkpoint
    from tests.seed_tokenizers import llama_tokenizer_model, mistral_tokenizer_model

    folder = write_random_checkpoint(tmp_path / "m", tiny_config(vocab_size=32002, max_position_embeddings=512),
                                     4, 32, False)
    source = llama_tokenizer_model() if vocabulary == "llama" else mistral_tokenizer_model()
    shutil.copyfile(source, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))
    (folder / "added_tokens.json").write_text(json.dumps({"<|end_of_turn|>": 32000, "<|pad_0|>": 32001}))
    model = load_model(folder, LoadOptions(device="cpu", context_length=512))
    try:
        assert not model.tokenizer.is_fast
        schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                                                   "word": {"type": "string", "maxLength": 6},
                                                   "ok": {"type": "boolean"}},
                  "required": ["n", "word", "ok"], "additionalProperties": False}
        ids = model.tokenizer.encode("GPT4 User: give me JSON<|end_of_turn|>GPT4 Assistant:")
        for seed in range(4):
            params = SamplingParams(temperature=1.0, max_new_tokens=200, seed=seed)
            gen = run(Generation(model, ids, params, grammar=Grammar("json_schema", json.dumps(schema))))
            assert gen.result.finish_reason == "eos", gen.result.text
            jsonschema.validate(json.loads(gen.result.text), schema)
        pattern = r"[A-Z][a-z]{2,8} (and|or) [0-9]{1,4}!"
        rx = run(Generation(model, ids, PARAMS[1], grammar=Grammar("regex", pattern)))
        assert re.fullmatch(pattern, rx.result.text), rx.result.text
    finally:
        model.engine.close()
