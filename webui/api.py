"""OpenAI-compatible API on the app's loaded model: /v1/models, /v1/completions, /v1/chat/completions.

Each request runs as its own Generation; the model's engine runs them side by
side with the UI's (continuous batching). A client that disconnects cancels its generation,
whether it is running or still waiting for its turn.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from backends.generation import ContextOverflowError, Generation
from backends.sampling import SamplingParams
from webui import templates
from webui.state import AppState, ModelNotLoaded
from webui.templates import TemplateError

log = logging.getLogger("gptq_workbench.api")
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0, le=1)
    typical_p: float = Field(default=1.0, gt=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = 1

    def params(self, default_max: int) -> SamplingParams:
        if self.n != 1:
            raise ApiError(400, "only n=1 is supported", code="unsupported_n")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "at most 4 stop sequences are allowed")
        return SamplingParams(
            max_new_tokens=self.max_tokens or default_max,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            typical_p=self.typical_p, repetition_penalty=self.repetition_penalty, seed=self.seed,
            stop_strings=tuple(s for s in stops if s),
        )


class CompletionRequest(Sampling):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: list[ChatMessage]
    condition: str | None = None  # OpenChat: "GPT4 Correct", "Math Correct", ...
    template: str | None = None  # a named template of this app


@dataclass
class Job:
    """One request's generation and what the response says about it."""

    id: str
    model: str
    generation: Generation
    created: int

    @property
    def usage(self) -> dict:
        r = self.generation.result
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.new_tokens,
                "total_tokens": r.prompt_tokens + r.new_tokens}

    @property
    def finish_reason(self) -> str:
        return FINISH.get(self.generation.result.finish_reason, "stop")


async def pieces(job: Job, request: Request) -> AsyncIterator[str]:
    """The generation's text pieces, produced on a worker thread; cancelled when the client goes away."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def work() -> None:
        try:
            for piece in job.generation:
                loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece))
            result = job.generation.result
            log.info("%s: finished (%s, %d tokens)", job.id, result.finish_reason, result.new_tokens)
            loop.call_soon_threadsafe(queue.put_nowait, ("done", None))
        except Exception as exc:  # noqa: BLE001 - passed to the request
            loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))

    threading.Thread(target=work, name=f"generate-{job.id}", daemon=True).start()
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


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def build_api(state: AppState, api_keys: list[str] | None = None) -> FastAPI:
    app = FastAPI(title="GPTQ Workbench API", docs_url=None, redoc_url=None)
    keys = [k for k in (api_keys or []) if k]

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return ApiError(400, f"invalid request: {problems}").response()

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if keys:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not any(hmac.compare_digest(given, k) for k in keys):
                return ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                code="invalid_api_key").response()
        return await call_next(request)

    def start(prompt_ids_for, body: Sampling, template: str | None, prefix: str) -> Job:
        try:
            loaded = state.require_model()
        except ModelNotLoaded as exc:
            raise ApiError(503, str(exc), kind="server_error", code="model_not_loaded") from exc
        try:
            params = body.params(default_max=512 if prefix == "chatcmpl" else 16)
            generation = state.generation(prompt_ids_for(loaded.tokenizer), params, template)
        except (ContextOverflowError, TemplateError, ValueError) as exc:
            raise ApiError(400, str(exc)) from exc
        job = Job(f"{prefix}-{uuid.uuid4().hex[:24]}", loaded.name, generation, int(time.time()))
        log.info("%s: %d prompt tokens; %d running, %d waiting", job.id, len(generation.prompt_ids),
                 loaded.engine.running(), loaded.engine.waiting())
        return job

    @app.get("/v1/models")
    async def models():
        names = state.local_models()
        if state.loaded is not None:
            names = [state.loaded.name] + [n for n in names if n != state.loaded.name]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "local"} for n in names]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1 or not prompts[0]:
            raise ApiError(400, "prompt must be one non-empty string")
        job = start(lambda tok: tok.encode(prompts[0], add_special_tokens=True), body, None, "cmpl")

        def chunk(text: str, finish: str | None) -> dict:
            return {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            async def events():
                async for piece in pieces(job, request):
                    yield sse(chunk(piece, None))
                yield sse({**chunk("", job.finish_reason), "usage": job.usage})
                yield sse("[DONE]")
            return StreamingResponse(events(), media_type="text/event-stream")
        text = "".join([p async for p in pieces(job, request)])
        return {**chunk(text, job.finish_reason), "usage": job.usage}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        if not body.messages:
            raise ApiError(400, "messages must not be empty")
        template = chat_template(state, body)
        messages = [m.model_dump() for m in body.messages]
        continue_last = messages[-1]["role"] == "assistant"
        job = start(lambda tok: templates.prompt_ids(tok, template, messages, continue_last), body, template, "chatcmpl")

        def chunk(delta: dict, finish: str | None) -> dict:
            return {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            async def events():
                yield sse(chunk({"role": "assistant", "content": ""}, None))
                async for piece in pieces(job, request):
                    yield sse(chunk({"content": piece}, None))
                yield sse({**chunk({}, job.finish_reason), "usage": job.usage})
                yield sse("[DONE]")
            return StreamingResponse(events(), media_type="text/event-stream")
        text = "".join([p async for p in pieces(job, request)])
        return {
            "id": job.id, "object": "chat.completion", "created": job.created, "model": job.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text.strip()},
                         "logprobs": None, "finish_reason": job.finish_reason}],
            "usage": job.usage,
        }

    return app


def chat_template(state: AppState, body: ChatRequest) -> str:
    """`template`, else OpenChat's `condition`, else the template chosen for the loaded model."""
    if body.template:
        if body.template not in templates.template_names():
            raise ApiError(400, f"unknown template {body.template!r}; known: {', '.join(templates.template_names())}")
        return body.template
    if body.condition:
        name = templates.CONDITIONS.get(body.condition, body.condition)
        if name not in templates.NAMED:
            raise ApiError(400, f"unknown condition {body.condition!r}; known: {', '.join(templates.CONDITIONS)}")
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
