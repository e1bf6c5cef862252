"""OpenAI-compatible API on the app's loaded model: /v1/models, /v1/completions, /v1/chat/completions, and
model loading for an admin key.

Each request (each of its ``n`` choices) runs as its own Generation; the model's engine runs them side by
side with the UI's. A client that disconnects cancels its generations, running or waiting. A field this
API does not support is a 400 that names it: nothing a client sends is silently ignored.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from backends.constraints import Grammar, GrammarError
from backends.engine import TokenLogprob
from backends.generation import ContextOverflowError, Generation
from backends.paged_cache import CacheTooSmall
from backends.perplexity import prompt_logprobs
from backends.sampling import SamplingParams
from webui import templates, tools as tool_calls
from webui.chat import token_text
from webui.metrics import metrics_text
from webui.settings import ModelSettings
from webui.state import AppState, ModelNotLoaded
from webui.templates import TemplateError
from webui.tools import ToolError, chosen_tools, forced_schema, parse_calls, parse_tools, starts_like_a_call

log = logging.getLogger("gptq_workbench.api")
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}
MAX_N = 16
ADMIN_PATHS = ("/v1/internal/model/load", "/v1/internal/model/unload")
# OpenAI fields that this API knows but does not do (yet): a 400 with this reason, never ignored.
NOT_SUPPORTED = {
    "functions": "function calling (functions) is not supported",
    "function_call": "function calling (function_call) is not supported",
    "suffix": "suffix (insertion) is not supported",
    "best_of": "best_of is not supported; use n",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0, le=1)
    typical_p: float = Field(default=1.0, gt=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    # This API's samplers beyond OpenAI's (backends/sampling.py has what each does)
    dry_multiplier: float = Field(default=0.0, ge=0)
    dry_base: float = Field(default=1.75, ge=1)
    dry_allowed_length: int = Field(default=2, ge=1)
    dry_sequence_breakers: list[str] | None = None
    xtc_threshold: float = Field(default=0.1, ge=0, le=0.5)
    xtc_probability: float = Field(default=0.0, ge=0, le=1)
    mirostat_tau: float = Field(default=0.0, ge=0)
    mirostat_eta: float = Field(default=0.1, gt=0, le=1)
    dynatemp_range: float = Field(default=0.0, ge=0)
    dynatemp_exponent: float = Field(default=1.0, gt=0)
    sampler_order: list[str] | None = None
    banned_strings: list[str] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    user: str | None = None  # the client's end-user id: logged
    response_format: dict[str, Any] | None = None

    def grammar(self) -> Grammar | None:
        """``response_format`` as a grammar: OpenAI's text / json_object / json_schema, and this API's
        extensions {"type": "regex", "regex": ...} and {"type": "grammar", "grammar": <Lark>}."""
        fmt = self.response_format
        if fmt is None or fmt.get("type") == "text":
            return None
        kind = fmt.get("type")
        if kind == "json_object":
            return Grammar("json_object")
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise ApiError(400, "response_format.json_schema.schema must be a JSON Schema object",
                               param="response_format")
            return Grammar("json_schema", json.dumps(spec["schema"]))
        if kind == "regex" and isinstance(fmt.get("regex"), str):
            return Grammar("regex", fmt["regex"])
        if kind == "grammar" and isinstance(fmt.get("grammar"), str):
            return Grammar("lark", fmt["grammar"])
        raise ApiError(400, f"response_format: unknown type {kind!r} (text, json_object, json_schema, or this API's "
                       "regex and grammar, with their 'regex' or 'grammar' field)", param="response_format")

    def params(self, default_max: int, vocab_size: int) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "at most 4 stop sequences are allowed", param="stop")
        bias = []
        for key, value in (self.logit_bias or {}).items():
            if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab_size:
                raise ApiError(400, f"logit_bias: {key!r} is not a token id of this model (0..{vocab_size - 1})",
                               param="logit_bias")
            bias.append((int(key), value))
        try:
            return SamplingParams(
                max_new_tokens=max(self.max_tokens or default_max, 1),
                temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                typical_p=self.typical_p, repetition_penalty=self.repetition_penalty,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                logit_bias=tuple(bias), seed=self.seed, stop_strings=tuple(s for s in stops if s),
                dry_multiplier=self.dry_multiplier, dry_base=self.dry_base, dry_allowed_length=self.dry_allowed_length,
                xtc_threshold=self.xtc_threshold, xtc_probability=self.xtc_probability,
                mirostat_tau=self.mirostat_tau, mirostat_eta=self.mirostat_eta, dynatemp_range=self.dynatemp_range,
                dynatemp_exponent=self.dynatemp_exponent, banned_strings=tuple(self.banned_strings or ()),
                **({"dry_sequence_breakers": tuple(self.dry_sequence_breakers)}
                   if self.dry_sequence_breakers is not None else {}),
                **({"sampler_order": tuple(self.sampler_order)} if self.sampler_order is not None else {}),
            )
        except ValueError as exc:
            raise ApiError(400, str(exc)) from exc


class CompletionRequest(Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def as_message(self, index: int) -> dict[str, Any]:
        where = f"messages[{index}]"
        if self.tool_calls is not None and self.role != "assistant":
            raise ApiError(400, f"{where}: only assistant messages carry tool_calls", param="messages")
        if self.role == "tool" and not self.tool_call_id:
            raise ApiError(400, f"{where}: a tool message needs the tool_call_id it answers", param="messages")
        if self.content is None and not self.tool_calls:
            raise ApiError(400, f"{where}: content is missing", param="messages")
        for call in self.tool_calls or []:
            function = call.get("function")
            if call.get("type", "function") != "function" or not isinstance(function, dict) or "name" not in function:
                raise ApiError(400, f"{where}.tool_calls: each call is {{'type': 'function', 'id', 'function': "
                               "{'name', 'arguments'}}", param="messages")
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": message_text(self.content, where) if self.content is not None else ""}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message


def message_text(content: str | list[dict[str, Any]], where: str) -> str:
    """A message's text: a string, or a list of text parts joined (what current clients send)."""
    if isinstance(content, str):
        return content
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "image", "input_image"):
            raise ApiError(400, f"{where}.content[{i}]: images are not supported: the loaded models read text only",
                           param="messages")
        else:
            raise ApiError(400, f"{where}.content[{i}]: unsupported content part type {kind!r} (only 'text')",
                           param="messages")
    return "".join(texts)


class ChatRequest(Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    condition: str | None = None  # OpenChat: "GPT4 Correct", "Math Correct", ...
    template: str | None = None  # a named template of this app
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_name: str
    backend: str | None = None
    context_length: int | None = Field(default=None, ge=16)
    cache_tokens: int | None = Field(default=None, ge=16)
    kv_cache: Literal["auto", "fp8"] | None = None


@dataclass
class Job:
    """One choice's generation and what the response says about it."""

    id: str
    model: str
    generation: Generation
    created: int
    index: int = 0

    @property
    def finish_reason(self) -> str:
        return FINISH.get(self.generation.result.finish_reason, "stop")


def usage(jobs: list[Job], prompt_tokens: int) -> dict:
    completion = sum(j.generation.result.new_tokens for j in jobs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


async def pieces(job: Job, request: Request) -> AsyncIterator[tuple[str, int]]:
    """The generation's text pieces, each with how many of its tokens' logprobs are ready, produced on a worker
    thread; cancelled when the client goes away."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    result = job.generation.result

    def work() -> None:
        try:
            for piece in job.generation:
                loop.call_soon_threadsafe(queue.put_nowait, ("piece", (piece, len(result.logprobs))))
            log.info("%s: finished (%s, %d tokens)", job.id, result.finish_reason, result.new_tokens)
            loop.call_soon_threadsafe(queue.put_nowait, ("done", None))
        except Exception as exc:  # noqa: BLE001 - passed to the request
            loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))

    threading.Thread(target=work, name=f"generate-{job.id}-{job.index}", daemon=True).start()
    ended = False
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            if kind == "piece":
                yield value
                continue
            ended = True
            if kind == "error":
                raise value
            return
    finally:
        if not ended:  # the client went away (or the server is stopping): free the model
            job.generation.cancel.set()
            log.info("%s: client went away; generation cancelled", job.id)


async def merged(jobs: list[Job], request: Request) -> AsyncIterator[tuple[Job, str, int]]:
    """Every choice's pieces as they come, tagged with their job."""
    queue: asyncio.Queue = asyncio.Queue()

    async def drain(job: Job) -> None:
        try:
            async for piece, ready in pieces(job, request):
                await queue.put((job, piece, ready))
        finally:
            await queue.put((job, None, 0))

    tasks = [asyncio.create_task(drain(job)) for job in jobs]
    try:
        open_jobs = len(jobs)
        while open_jobs:
            job, piece, ready = await queue.get()
            if piece is None:
                open_jobs -= 1
                continue
            yield job, piece, ready
        for task in tasks:
            task.result()  # a generation's error reaches the response
    finally:
        for task in tasks:
            task.cancel()


async def collect(jobs: list[Job], request: Request) -> list[str]:
    texts = {id(job): [] for job in jobs}
    async for job, piece, _ in merged(jobs, request):
        texts[id(job)].append(piece)
    return ["".join(texts[id(job)]) for job in jobs]


class TokenText:
    """Each token's text as it reads in context (webui/chat.py's token_text)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, context: list[int], token: int) -> str:
        return token_text(self.tokenizer, context, token)


def chat_logprobs(entries: list[TokenLogprob], context: list[int], text_of: TokenText) -> dict:
    content = []
    for entry in entries:
        token = text_of(context, entry.token)
        top = [{"token": (t := text_of(context, i)), "logprob": lp, "bytes": list(t.encode())} for i, lp in entry.top]
        content.append({"token": token, "logprob": entry.logprob, "bytes": list(token.encode()), "top_logprobs": top})
        context = context + [entry.token]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[TokenLogprob | None], ids: list[int], context: list[int], text_of: TokenText,
                        offset: int) -> dict:
    """The legacy completions format; ``ids``: the tokens ``entries`` describe, after ``context``."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for entry, token in zip(entries, ids):
        text = text_of(context, token)
        tokens.append(text)
        token_logprobs.append(entry.logprob if entry is not None else None)
        tops.append({text_of(context, i): lp for i, lp in entry.top} if entry is not None else None)
        offsets.append(offset)
        offset += len(text)
        context = context + [token]
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def build_api(state: AppState, api_keys: list[str] | None = None, admin_keys: list[str] | None = None) -> FastAPI:
    app = FastAPI(title="GPTQ Workbench API", docs_url=None, redoc_url=None)
    keys = [k for k in (api_keys or []) if k]
    admins = [k for k in (admin_keys or []) if k]

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        problems, param = [], None
        for e in exc.errors():
            where = ".".join(str(p) for p in e["loc"][1:]) or "body"
            name = str(e["loc"][-1]) if e["loc"] else ""
            if e["type"] == "extra_forbidden":
                param = param or name
                problems.append(f"{where}: {NOT_SUPPORTED.get(name, f'unsupported field {name!r}')}")
            else:
                problems.append(f"{where}: {e['msg']}")
        return ApiError(400, f"invalid request: {'; '.join(problems)}", param=param).response()

    def bearer(request: Request) -> str:
        return request.headers.get("authorization", "").removeprefix("Bearer ").strip()

    def matches(given: str, allowed: list[str]) -> bool:
        return any(hmac.compare_digest(given, k) for k in allowed)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        given = bearer(request)
        if request.url.path in ADMIN_PATHS:
            if not admins:
                return ApiError(403, "model management is off: start the app with --admin-key KEY",
                                kind="permission_error").response()
            if not matches(given, admins):
                return ApiError(401, "loading and unloading models needs the admin key", code="invalid_api_key").response()
        elif keys and not matches(given, keys + admins):
            return ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                            code="invalid_api_key").response()
        return await call_next(request)

    def loaded_model():
        try:
            return state.require_model()
        except ModelNotLoaded as exc:
            raise ApiError(503, str(exc), kind="server_error", code="model_not_loaded") from exc

    def start(prompt: list[int], body: Sampling, template: str | None, prefix: str, logprobs: int | None,
              default_max: int, grammar: Grammar | None = None) -> list[Job]:
        loaded = loaded_model()
        params = body.params(default_max, loaded.args.vocab_size)
        grammar = grammar or body.grammar()
        seed = params.seed if params.seed is not None else random.randrange(2**31)
        jobs = []
        job_id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        for index in range(body.n):
            try:
                generation = state.generation(prompt, replace(params, seed=seed + index), template, logprobs, grammar)
            except GrammarError as exc:
                raise ApiError(400, f"response_format: {exc}", param="response_format") from exc
            except (ContextOverflowError, CacheTooSmall, TemplateError, ValueError) as exc:
                raise ApiError(400, str(exc)) from exc
            jobs.append(Job(job_id, loaded.name, generation, int(time.time()), index))
        log.info("%s: %d prompt tokens, n=%d%s; %d running, %d waiting", job_id, len(prompt), body.n,
                 f", user {body.user!r}" if body.user else "", loaded.engine.running(), loaded.engine.waiting())
        return jobs

    @app.get("/v1/models")
    async def models():
        names = state.local_models()
        if state.loaded is not None:
            names = [state.loaded.name] + [n for n in names if n != state.loaded.name]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "local"} for n in names]}

    @app.get("/v1/internal/model/info")
    async def model_info():
        loaded = state.loaded
        if loaded is None:
            return {"model_name": None}
        stats = loaded.engine.stats()
        return {"model_name": loaded.name, "backend": loaded.backend, "device": str(loaded.device),
                "context_length": loaded.context_length, "running": stats.running, "waiting": stats.waiting,
                "kv_cache_tokens": stats.kv_tokens, "kv_cache_tokens_in_use": stats.kv_tokens_held,
                "kv_cache_dtype": str(loaded.engine.pool.k.dtype).removeprefix("torch."),
                "prompt_tokens_reused": stats.reused_tokens}

    @app.get("/metrics")
    async def metrics():
        loaded = state.loaded
        text = metrics_text(loaded.name, loaded.engine.stats()) if loaded is not None else metrics_text(None, None)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/internal/model/load")
    async def load(body: LoadRequest):
        try:
            settings = state.settings_for(body.model_name)
            settings = ModelSettings.from_dict({
                **settings.__dict__, "backend": body.backend or settings.backend,
                "context_length": body.context_length or settings.context_length,
                "cache_tokens": body.cache_tokens or settings.cache_tokens,
                "kv_cache": body.kv_cache or settings.kv_cache}, "the request")
            report = await asyncio.to_thread(state.load, body.model_name, settings)
        except (ValueError, OSError, MemoryError) as exc:
            raise ApiError(400, str(exc), param="model_name") from exc
        log.info("loaded %s through the API", body.model_name)
        return {"status": "loaded", "model_name": report.name, "backend": report.loaded.backend,
                "context_length": report.loaded.context_length, "seconds": round(report.seconds, 2)}

    @app.post("/v1/internal/model/unload")
    async def unload():
        name = await asyncio.to_thread(state.unload)
        return {"status": "unloaded" if name else "nothing was loaded", "model_name": name}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1 or not prompts[0]:
            raise ApiError(400, "prompt must be one non-empty string", param="prompt")
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens must be at least 1 (0 only with echo, to score the prompt)",
                           param="max_tokens")
        loaded = loaded_model()
        prompt = loaded.tokenizer.encode(prompts[0], add_special_tokens=True)
        text_of = TokenText(loaded.tokenizer)
        scored = None
        if body.echo and body.logprobs is not None:
            try:
                scored = await asyncio.to_thread(prompt_logprobs, loaded, prompt, body.logprobs)
            except ValueError as exc:
                raise ApiError(400, str(exc), param="prompt") from exc
        jobs = [] if body.max_tokens == 0 else start(prompt, body, None, "cmpl", body.logprobs, 16)
        created = int(time.time())
        job_id = jobs[0].id if jobs else f"cmpl-{uuid.uuid4().hex[:24]}"
        head = prompts[0] if body.echo else ""

        def logprobs_of(job: Job | None, text_offset: int) -> dict | None:
            if body.logprobs is None:
                return None
            entries, ids, context = [], [], []
            if scored is not None:
                entries, ids = list(scored), list(prompt)
            if job is not None:
                r = job.generation.result
                entries += r.logprobs
                ids += r.token_ids[: len(r.logprobs)]
                context = [] if scored is not None else prompt
            return completion_logprobs(entries, ids, context, text_of, text_offset)

        def chunk(index: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
            return {"id": job_id, "object": "text_completion", "created": created, "model": loaded.name,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

        if body.stream:
            async def events():
                sent = {job.index: 0 for job in jobs}
                async for job, piece, ready in merged(jobs, request):
                    lp = None
                    if body.logprobs is not None:
                        r = job.generation.result
                        lp = completion_logprobs(r.logprobs[sent[job.index]:ready], r.token_ids[sent[job.index]:ready],
                                                 prompt + r.token_ids[: sent[job.index]], text_of, 0)
                        sent[job.index] = ready
                    yield sse(chunk(job.index, piece, None, lp))
                for job in jobs:
                    yield sse(chunk(job.index, "", job.finish_reason))
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({"id": job_id, "object": "text_completion", "created": created, "model": loaded.name,
                               "choices": [], "usage": usage(jobs, len(prompt))})
                yield sse("[DONE]")
            return StreamingResponse(events(), media_type="text/event-stream")
        texts = await collect(jobs, request) if jobs else [""]
        choices = []
        for i, text in enumerate(texts):
            job = jobs[i] if jobs else None
            choices.append({"index": i, "text": head + text, "logprobs": logprobs_of(job, 0),
                            "finish_reason": job.finish_reason if job else "length"})
        return {"id": job_id, "object": "text_completion", "created": created, "model": loaded.name,
                "choices": choices, "usage": usage(jobs, len(prompt))}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        if not body.messages:
            raise ApiError(400, "messages must not be empty", param="messages")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise ApiError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
        if body.max_tokens == 0:
            raise ApiError(400, "max_tokens must be at least 1", param="max_tokens")
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if body.max_completion_tokens is not None:
            body = body.model_copy(update={"max_tokens": body.max_completion_tokens})
        messages = [m.as_message(i) for i, m in enumerate(body.messages)]
        template = chat_template(state, body)
        loaded = loaded_model()
        continue_last = messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls")
        try:
            offered = parse_tools(body.tools or [])
            callable_tools, forced = chosen_tools(offered, body.tool_choice)
        except ToolError as exc:
            raise ApiError(400, str(exc), param="tools") from exc
        if forced and body.response_format is not None:
            raise ApiError(400, "a forced tool_choice and response_format cannot be combined", param="tool_choice")
        try:
            if offered or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
                prompt = tool_calls.prompt_ids(loaded.tokenizer, template, messages, callable_tools, continue_last)
            else:
                prompt = templates.prompt_ids(loaded.tokenizer, template, messages, continue_last)
        except (TemplateError, ToolError) as exc:
            raise ApiError(400, str(exc), param="messages") from exc
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        grammar = Grammar("json_schema", json.dumps(forced_schema(callable_tools))) if forced else None
        jobs = start(prompt, body, template, "chatcmpl", logprobs, 512, grammar)
        text_of = TokenText(loaded.tokenizer)
        first = jobs[0]

        def reply(text: str) -> tuple[dict, str | None]:
            """The message for a finished reply, and the finish reason it implies (None: the job's own)."""
            if not callable_tools:
                return {"role": "assistant", "content": text.strip(), "refusal": None}, None
            content, calls = parse_calls(text, callable_tools)
            if calls and not body.parallel_tool_calls:
                calls = calls[:1]
            message = {"role": "assistant", "content": content.strip() if content else None, "refusal": None}
            if calls:
                message["tool_calls"] = [c.as_openai() for c in calls]
                return message, "tool_calls"
            return message, None

        def chunk(index: int, delta: dict, finish: str | None, lp: dict | None = None) -> dict:
            return {"id": first.id, "object": "chat.completion.chunk", "created": first.created, "model": first.model,
                    "system_fingerprint": None,
                    "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

        if body.stream:
            async def events():
                sent = {job.index: 0 for job in jobs}
                # With tools, a reply that starts like a call is held back and sent as tool_calls at its end.
                held = {job.index: ([] if callable_tools else None) for job in jobs}
                holding = {job.index: forced or None for job in jobs}
                for job in jobs:
                    yield sse(chunk(job.index, {"role": "assistant", "content": ""}, None))
                async for job, piece, ready in merged(jobs, request):
                    lp = None
                    if logprobs is not None:
                        r = job.generation.result
                        lp = chat_logprobs(r.logprobs[sent[job.index]:ready], prompt + r.token_ids[: sent[job.index]],
                                           text_of)
                        sent[job.index] = ready
                    if held[job.index] is not None:
                        held[job.index].append(piece)
                        if holding[job.index] is None:
                            holding[job.index] = starts_like_a_call("".join(held[job.index]))
                        if holding[job.index] is not False:
                            continue
                        piece, held[job.index] = "".join(held[job.index]), None
                    yield sse(chunk(job.index, {"content": piece}, None, lp))
                for job in jobs:
                    finish = job.finish_reason
                    if held[job.index]:
                        message, implied = reply("".join(held[job.index]))
                        if implied:
                            calls = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
                            yield sse(chunk(job.index, {"tool_calls": calls}, None))
                            finish = implied
                        elif message["content"]:
                            yield sse(chunk(job.index, {"content": message["content"]}, None))
                    yield sse(chunk(job.index, {}, finish))
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({"id": first.id, "object": "chat.completion.chunk", "created": first.created,
                               "model": first.model, "system_fingerprint": None, "choices": [],
                               "usage": usage(jobs, len(prompt))})
                yield sse("[DONE]")
            return StreamingResponse(events(), media_type="text/event-stream")
        texts = await collect(jobs, request)
        choices = []
        for job, text in zip(jobs, texts):
            lp = chat_logprobs(job.generation.result.logprobs, prompt, text_of) if logprobs is not None else None
            message, implied = reply(text)
            choices.append({"index": job.index, "message": message, "logprobs": lp,
                            "finish_reason": implied or job.finish_reason})
        return {"id": first.id, "object": "chat.completion", "created": first.created, "model": first.model,
                "system_fingerprint": None, "choices": choices, "usage": usage(jobs, len(prompt))}

    return app


def chat_template(state: AppState, body: ChatRequest) -> str:
    """`template`, else OpenChat's `condition`, else the template chosen for the loaded model."""
    if body.template:
        if body.template not in templates.template_names():
            raise ApiError(400, f"unknown template {body.template!r}; known: {', '.join(templates.template_names())}",
                           param="template")
        return body.template
    if body.condition:
        name = templates.CONDITIONS.get(body.condition, body.condition)
        if name not in templates.NAMED:
            raise ApiError(400, f"unknown condition {body.condition!r}; known: {', '.join(templates.CONDITIONS)}",
                           param="condition")
        return name
    return state.template


def serve_in_background(app: FastAPI, host: str, port: int):
    """Runs the API with uvicorn on a daemon thread; returns the uvicorn Server."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the API could not start on {host}:{port} (is the port in use?)")
        time.sleep(0.05)
    return server
