"""The HTTP half of `portllm serve`: OpenAI's endpoints over an `Engine`, in OpenAI's shapes.

`model` in a request picks what answers: a patch's name (that patch), the base's name (no patch)
or `auto` (the router: the answer's `model` is then `auto:<patch>`, or `auto:<base>`, and a non-streamed
answer carries the headers `x-portllm-routed-to` and `x-portllm-routing`, the router's scores).
Patches load and unload at runtime through vLLM's endpoints and bodies, each checked against the
base first. Every error, whatever raised it, leaves as OpenAI's error object
`{"error": {"message", "type", "param", "code"}}`: unknown model 404, malformed body or bad parameter
400, full queue 429 (with Retry-After), engine down 503, request timeout 504.
A request whose client went away is cancelled: its row leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import PortLLMError
from .engine import AUTO, BadRequest, Completion, Engine, Event, GenRequest, SamplingParams, ServeError, Stream

DEFAULT_CHAT_MAX_TOKENS = 1024  # a chat request without max_tokens: at most this (and what the context leaves)


# ---------------------------------------------------------------- request schemas


class _Body(BaseModel):
    # fields this server does not know (newer API versions, vendor extensions) are ignored, as vLLM does
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: Optional[int] = Field(None, ge=1)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    ignore_eos: bool = False  # vLLM's extension


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(None, ge=1)
    echo: Optional[bool] = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class TextPart(_Body):
    type: str
    text: Optional[str] = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    functions: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None


class LoadAdapterRequest(_Body):
    lora_name: str
    lora_path: str


class UnloadAdapterRequest(_Body):
    lora_name: str


# ---------------------------------------------------------------- response schemas


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "portllm"
    root: Optional[str] = None  # where it came from (vLLM's field)
    parent: Optional[str] = None  # a patch's base
    warnings: list[str] = []  # what `check` said when the patch loaded


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Optional[str] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Optional[str] = None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: Optional[str] = None


class ChatDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: Optional[str] = None


class ChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class AdapterLoaded(BaseModel):
    object: Literal["lora_adapter"] = "lora_adapter"
    lora_name: str
    lora_path: str
    status: Literal["loaded", "unloaded"]
    warnings: list[str] = []
    message: str


# ---------------------------------------------------------------- the app


def _error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def _serve_error(e: ServeError) -> JSONResponse:
    r = _error(e.status, str(e), e.kind, e.param, e.code)
    if e.retry_after is not None:
        r.headers["Retry-After"] = str(max(1, round(e.retry_after)))
    return r


def _usage(ev: Event | Completion) -> Usage:
    return Usage(
        prompt_tokens=ev.prompt_tokens,
        completion_tokens=ev.completion_tokens,
        total_tokens=ev.prompt_tokens + ev.completion_tokens,
    )


def create_app(
    engine: Engine, runtime_loading: bool = True, default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS
) -> FastAPI:
    """An OpenAI-compatible app over `engine`; starts the engine with the app and stops it after."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="portllm serve", version=__version__, lifespan=lifespan)
    app.state.engine = engine

    # ------------------------------------------------------------ errors

    @app.exception_handler(ServeError)
    async def _on_serve_error(_: Request, e: ServeError) -> JSONResponse:
        return _serve_error(e)

    @app.exception_handler(PortLLMError)
    async def _on_portllm_error(_: Request, e: PortLLMError) -> JSONResponse:
        return _error(400, str(e), "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = (e.errors() or [{}])[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            why = (first.get("ctx") or {}).get("error", "")
            msg = f"We could not parse the JSON body of your request ({why}). Send a JSON object."
            param = None  # pydantic puts the character offset here, not a parameter name
        elif param is None:
            msg = "The request body must be a JSON object of the request's parameters."
        elif first.get("type") == "missing":
            msg = f"Missing required parameter: '{param}'."
        else:
            msg = f"Invalid value for '{param}': {first.get('msg', 'invalid value')}."
        return _error(400, msg, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return _error(e.status_code, str(e.detail), kind)

    @app.exception_handler(Exception)
    async def _on_crash(_: Request, e: Exception) -> JSONResponse:
        return _error(500, f"internal error: {e.__class__.__name__}: {str(e)[:300]}", "server_error")

    # ------------------------------------------------------------ models and health

    @app.get("/health")
    def health() -> JSONResponse:
        if not engine.alive:
            return _error(503, engine.failure or "the engine is not running", "server_error", code="unavailable")
        return JSONResponse({"status": "ok", "running": engine.running, "queued": engine.queued, **engine.stats})

    def cards() -> list[ModelCard]:
        started = int(getattr(engine, "started", time.time()))
        out = [ModelCard(id=engine.name, created=started, root=str(engine.ref.path))]
        for p in engine.patches.values():
            out.append(ModelCard(id=p.name, created=p.created, root=p.path, parent=engine.name, warnings=p.warnings))
        if engine.router is not None:
            root = f"router:{getattr(engine.router, 'spec', None) or type(engine.router).__name__}"
            out.append(ModelCard(id=AUTO, created=started, parent=engine.name, root=root))
        return out

    @app.get("/v1/models", response_model=ModelList)
    def list_models() -> ModelList:
        return ModelList(data=cards())

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    def get_model(model_id: str) -> ModelCard | JSONResponse:
        for c in cards():
            if c.id == model_id:
                return c
        return _error(
            404, f"The model `{model_id}` does not exist.", "invalid_request_error", "model", "model_not_found"
        )

    # ------------------------------------------------------------ runtime patches (vLLM's endpoints)

    @app.post("/v1/load_lora_adapter", response_model=AdapterLoaded)
    def load_adapter(body: LoadAdapterRequest) -> AdapterLoaded | JSONResponse:
        if not runtime_loading:
            return _error(403, "runtime loading is disabled on this server", "permission_error")
        info = engine.load_patch(body.lora_name, body.lora_path)  # checked first; PatchRefused -> 400 with why
        note = f" with {len(info.warnings)} warning(s) from check" if info.warnings else ""
        return AdapterLoaded(
            lora_name=info.name,
            lora_path=info.path,
            status="loaded",
            warnings=list(info.warnings),
            message=f"Success: patch '{info.name}' loaded{note}.",
        )

    @app.post("/v1/unload_lora_adapter", response_model=AdapterLoaded)
    def unload_adapter(body: UnloadAdapterRequest) -> AdapterLoaded | JSONResponse:
        if not runtime_loading:
            return _error(403, "runtime loading is disabled on this server", "permission_error")
        info = engine.unload_patch(body.lora_name)
        return AdapterLoaded(
            lora_name=info.name,
            lora_path=info.path,
            status="unloaded",
            message=f"Success: patch '{info.name}' unloaded.",
        )

    # ------------------------------------------------------------ generation

    def sampling(req: _Sampling, max_tokens: int) -> SamplingParams:
        if (req.n or 1) != 1:
            raise BadRequest("n must be 1: send separate requests (the server batches them)", param="n")
        if req.presence_penalty or req.frequency_penalty:
            raise BadRequest("presence_penalty and frequency_penalty are not supported", param="presence_penalty")
        if req.logit_bias:
            raise BadRequest("logit_bias is not supported", param="logit_bias")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            stop=tuple(stop),
            seed=req.seed,
            ignore_eos=req.ignore_eos,
        )

    def target(model: str) -> str | None:
        return None if model == engine.name else model

    def label(model: str, stream: Stream) -> Callable[[], str]:
        """The answer's `model`: as asked, except `auto`, which becomes `auto:<patch or base>` once routed."""
        if model != AUTO:
            return lambda: model
        return lambda: AUTO if stream.patch == AUTO else f"{AUTO}:{stream.patch or engine.name}"

    def answer(body: BaseModel, model: str, stream: Stream) -> Any:
        if model != AUTO:
            return body
        headers = {"x-portllm-routed-to": _ascii(stream.patch or engine.name)}
        if stream.request.routing is not None:
            headers["x-portllm-routing"] = json.dumps(stream.request.routing, separators=(",", ":"))
        return JSONResponse(body.model_dump(), headers=headers)

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(req: CompletionRequest, request: Request) -> Any:
        if req.echo or req.logprobs is not None or (req.best_of or 1) != 1 or req.suffix:
            raise BadRequest("echo, logprobs, best_of and suffix are not supported", param="echo")
        ids, text = _prompt_ids(engine, req.prompt)
        params = sampling(req, req.max_tokens or 16)  # OpenAI's default for completions
        stream = engine.submit(GenRequest(ids, target(req.model), params, text=text))
        cid = f"cmpl-{stream.id}"
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(_completion_chunks(stream, cid, label(req.model, stream), usage))
        done = await _collect(stream, request)
        choice = CompletionChoice(text=done.text, finish_reason=done.finish_reason)
        body = CompletionResponse(
            id=cid, created=int(stream.created), model=label(req.model, stream)(), choices=[choice], usage=_usage(done)
        )
        return answer(body, req.model, stream)

    @app.post("/v1/chat/completions", response_model=ChatResponse)
    async def chat(req: ChatRequest, request: Request) -> Any:
        if req.tools or req.functions:
            raise BadRequest("tools and functions are not supported", param="tools")
        if req.logprobs:
            raise BadRequest("logprobs are not supported", param="logprobs")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise BadRequest("only response_format {'type': 'text'} is supported", param="response_format")
        messages = [_message(m, i) for i, m in enumerate(req.messages)]
        text = engine.chat_prompt(messages)
        ids = engine.encode(text)
        room = engine.max_length - len(ids)
        limit = req.max_completion_tokens or req.max_tokens or max(1, min(default_max_tokens, room))
        asked = next((m["content"] for m in reversed(messages) if m["role"] == "user" and m["content"]), None)
        stream = engine.submit(GenRequest(ids, target(req.model), sampling(req, limit), text=text, route_text=asked))
        cid = f"chatcmpl-{stream.id}"
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(_chat_chunks(stream, cid, label(req.model, stream), usage))
        done = await _collect(stream, request)
        choice = ChatChoice(message=AssistantMessage(content=done.text), finish_reason=done.finish_reason)
        body = ChatResponse(
            id=cid, created=int(stream.created), model=label(req.model, stream)(), choices=[choice], usage=_usage(done)
        )
        return answer(body, req.model, stream)

    return app


# ---------------------------------------------------------------- helpers


def _ascii(s: str) -> str:
    """A header value (latin-1 only): other characters escaped."""
    return s.encode("ascii", "backslashreplace").decode("ascii")


def _prompt_ids(engine: Engine, prompt: Any) -> tuple[list[int], str | None]:
    """A completion prompt as tokens: text (encoded as `evaluate.generate` does) or token ids, one per request."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise BadRequest("send one prompt per request (the server batches concurrent requests)", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = engine.encode(prompt)
        if not ids:  # an empty text is conditioned on BOS (EOS where there is none), as lm-eval does
            from ..evaluate import prefix_token

            ids = [prefix_token(engine.tokenizer)]
        return ids, prompt
    return list(prompt), None


def _message(m: ChatMessage, i: int) -> dict[str, Any]:
    if isinstance(m.content, list):
        if any(p.type != "text" or p.text is None for p in m.content):
            raise BadRequest("only text content parts are supported", param=f"messages.{i}.content")
        content = "".join(p.text or "" for p in m.content)
    else:
        content = m.content or ""
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
    if m.name:
        out["name"] = m.name
    return out


async def _collect(stream: Stream, request: Request) -> Completion:
    """Wait for the whole output; if the client disconnects meanwhile, cancel the request."""

    async def watch() -> None:
        while True:
            await asyncio.sleep(0.25)
            if await request.is_disconnected():
                stream.cancel()
                return

    watcher = asyncio.create_task(watch())
    parts: list[str] = []
    ids: list[int] = []
    last = Event()
    try:
        async for ev in stream.events():
            parts.append(ev.text)
            ids.extend(ev.token_ids)
            last = ev
    finally:
        watcher.cancel()
        stream.cancel()  # no-op once finished; otherwise (this coroutine cancelled) the row must go
    if last.finish_reason in ("error", "timeout", "cancelled"):
        raise _failed(last)
    return Completion(
        "".join(parts), ids, last.finish_reason or "stop", last.prompt_tokens, last.completion_tokens, stream.patch
    )


class _Failed(ServeError):
    pass


def _failed(ev: Event) -> ServeError:
    if ev.finish_reason == "timeout":
        e = _Failed(ev.error or "the request timed out")
        e.status, e.kind, e.code = 504, "timeout_error", "timeout"
        return e
    e = _Failed(ev.error or f"request {ev.finish_reason}")
    e.status, e.kind, e.code = (
        (503, "server_error", "unavailable")
        if "shutting down" in (ev.error or "")
        else (
            500,
            "server_error",
            None,
        )
    )
    return e


def _sse(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _data(obj: BaseModel | dict[str, Any]) -> str:
    body = obj.model_dump_json(exclude_none=False) if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {body}\n\n"


def _stream_error(ev: Event) -> str:
    e = _failed(ev)
    return _data({"error": ErrorInfo(message=str(e), type=e.kind, param=None, code=e.code).model_dump()})


async def _completion_chunks(stream: Stream, cid: str, label: Callable[[], str], usage: bool) -> AsyncIterator[str]:
    created = int(stream.created)
    try:
        async for ev in stream.events():
            if ev.finish_reason in ("error", "timeout", "cancelled"):
                yield _stream_error(ev)
                break
            model = label()
            if ev.text or ev.finish_reason:
                choice = CompletionChoice(text=ev.text, finish_reason=ev.finish_reason)
                yield _data(CompletionResponse(id=cid, created=created, model=model, choices=[choice]))
            if ev.finish_reason and usage:
                yield _data(CompletionResponse(id=cid, created=created, model=model, choices=[], usage=_usage(ev)))
        yield "data: [DONE]\n\n"
    finally:
        stream.cancel()  # the client went away (or we are done: then it is a no-op)


async def _chat_chunks(stream: Stream, cid: str, label: Callable[[], str], usage: bool) -> AsyncIterator[str]:
    created = int(stream.created)
    routed = label() != AUTO  # an `auto` request's first chunk waits for the router (it names the patch)

    def chunk(delta: ChatDelta, finish: str | None = None) -> str:
        choice = ChatChunkChoice(delta=delta, finish_reason=finish)
        return _data(ChatChunk(id=cid, created=created, model=label(), choices=[choice]))

    try:
        if routed:
            yield chunk(ChatDelta(role="assistant", content=""))
        async for ev in stream.events():
            if ev.finish_reason in ("error", "timeout", "cancelled"):
                yield _stream_error(ev)
                break
            if not routed:
                routed = True
                yield chunk(ChatDelta(role="assistant", content=""))
            if ev.text:
                yield chunk(ChatDelta(content=ev.text))
            if ev.finish_reason:
                yield chunk(ChatDelta(), ev.finish_reason)
                if usage:
                    yield _data(ChatChunk(id=cid, created=created, model=label(), choices=[], usage=_usage(ev)))
        yield "data: [DONE]\n\n"
    finally:
        stream.cancel()
