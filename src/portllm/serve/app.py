"""The HTTP half of `portllm serve`: OpenAI's endpoints over an `Engine`, in OpenAI's shapes.

`model` in a request picks what answers: a patch's name (that patch), the base's name (no patch)
or `auto` (the router: the answer's `model` is then `auto:<patch>`, or `auto:<base>`, and a non-streamed
answer carries the headers `x-portllm-routed-to` and `x-portllm-routing`, the router's scores).
Patches load and unload at runtime through vLLM's endpoints and bodies, each checked against the
base first. Every error, whatever raised it, leaves as OpenAI's error object
`{"error": {"message", "type", "param", "code"}}`: unknown model 404, malformed body or bad parameter
400, full queue 429 (with Retry-After), engine down 503, request timeout 504. Who may call it and how much
they may send (API keys, runtime-loading policy, body size, request ids, no internals in a 5xx) is security.py.
A request whose client went away is cancelled: its row leaves the batch at the next step.
The fields clients send (list and token-id prompts, n, logprobs, echo, include_usage) are served; a field this
server does not know or do is a 400 naming it. Tokenizing, templating and naming tokens run off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import PortLLMError
from ..eval.encode import prefix_token
from .engine import Engine
from .errors import BadRequest, ServeError
from .logprobs import TokenLogprob
from .sampling import SamplingParams
from .schema import (
    AdapterLoaded,
    AssistantMessage,
    ChatChoice,
    ChatChunk,
    ChatChunkChoice,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorInfo,
    ErrorResponse,
    LoadAdapterRequest,
    ModelCard,
    ModelList,
    SamplingFields,
    TokenName,
    UnloadAdapterRequest,
    Usage,
)
from .security import ServerSecurity, internal_error, scope_request_id
from .security import install as install_security
from .streams import AUTO, Completion, Event, GenRequest, Stream, merged

DEFAULT_CHAT_MAX_TOKENS = 1024  # a chat request without max_tokens: at most this (and what the context leaves)


# ---------------------------------------------------------------- errors: OpenAI's error object, whatever raised it


def _error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=_utf8(message), type=kind, param=_utf8(param), code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def _utf8(text: str | None) -> str | None:
    """Text an answer can carry: a client's lone surrogate (a model name, a field's name) escaped, not a 500."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


async def on_serve_error(_: Request, e: ServeError) -> JSONResponse:
    r = _error(e.status, str(e), e.kind, e.param, e.code)
    if e.retry_after is not None:
        r.headers["Retry-After"] = str(max(1, round(e.retry_after)))
    return r


async def on_portllm_error(_: Request, e: PortLLMError) -> JSONResponse:
    return _error(400, str(e), "invalid_request_error")


async def on_invalid_request(_: Request, e: RequestValidationError) -> JSONResponse:
    first = (e.errors() or [{}])[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        why = (first.get("ctx") or {}).get("error", "")
        msg = f"We could not parse the JSON body of your request ({why}). Send a JSON object."
        param = None  # pydantic puts the character offset here, not a parameter name
    elif param is None and first.get("type") == "string_unicode":  # a lone surrogate in a field's name
        msg = "The request body holds text that is not valid Unicode (a lone surrogate such as \\ud800)."
    elif param is None:
        msg = "The request body must be a JSON object of the request's parameters."
    elif first.get("type") == "missing":
        msg = f"Missing required parameter: '{param}'."
    elif first.get("type") == "extra_forbidden":  # OpenAI's words; this server does not know the field
        msg = f"Unrecognized request argument supplied: '{param}'. This server does not support it."
    else:
        msg = f"Invalid value for '{param}': {first.get('msg', 'invalid value')}."
    return _error(400, msg, "invalid_request_error", param)


async def on_http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    kind = "invalid_request_error" if e.status_code < 500 else "server_error"
    return _error(e.status_code, str(e.detail), kind)


async def on_crash(request: Request, e: Exception) -> JSONResponse:
    """Anything unexpected: logged here with the request's id, which is all the client is told."""
    rid = scope_request_id(request.scope)
    r = _error(500, internal_error(f"{e.__class__.__name__}: {e}", rid, e), "server_error")
    r.headers["x-request-id"] = rid
    return r


# ---------------------------------------------------------------- the app and its dependencies


@dataclass(frozen=True)
class AppSettings:
    """What `create_app` was told, beside the engine."""

    security: ServerSecurity = field(default_factory=ServerSecurity)
    default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS


async def get_engine(request: Request) -> Engine:
    """The app's engine (app.state.engine); async, so FastAPI calls it without a thread hop."""
    return request.app.state.engine


async def get_settings(request: Request) -> AppSettings:
    return request.app.state.settings


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[AppSettings, Depends(get_settings)]

router = APIRouter()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The engine runs while the app does."""
    engine = app.state.engine
    engine.start()
    try:
        yield
    finally:
        engine.stop()


def create_app(
    engine: Engine, security: ServerSecurity | None = None, default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS
) -> FastAPI:
    """An OpenAI-compatible app over `engine`; starts the engine with the app and stops it after.
    `security` (default: no keys, runtime loading off, 1 MiB bodies) says who may call it and what they may send."""
    app = FastAPI(title="portllm serve", version=__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = AppSettings(security or ServerSecurity(), default_max_tokens)
    install_security(app, app.state.settings.security)
    app.add_exception_handler(ServeError, on_serve_error)
    app.add_exception_handler(PortLLMError, on_portllm_error)
    app.add_exception_handler(RequestValidationError, on_invalid_request)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_crash)
    app.include_router(router)
    return app


# ---------------------------------------------------------------- models and health


@router.get("/health")
def health(engine: EngineDep) -> JSONResponse:
    if not engine.alive:
        return _error(503, "the engine is not running", "server_error", code="unavailable")  # why: in the log
    return JSONResponse({"status": "ok", "running": engine.running, "queued": engine.queued, **engine.stats})


def model_cards(engine: Engine) -> list[ModelCard]:
    """The base, each loaded patch, and `auto` when a router is configured."""
    started = int(getattr(engine, "started", time.time()))
    out = [ModelCard(id=engine.name, created=started, root=str(engine.ref.path))]
    for p in engine.patches.values():
        out.append(ModelCard(id=p.name, created=p.created, root=p.path, parent=engine.name, warnings=p.warnings))
    if engine.router is not None:
        root = f"router:{getattr(engine.router, 'spec', None) or type(engine.router).__name__}"
        out.append(ModelCard(id=AUTO, created=started, parent=engine.name, root=root))
    return out


@router.get("/v1/models", response_model=ModelList)
def list_models(engine: EngineDep) -> ModelList:
    return ModelList(data=model_cards(engine))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
def get_model(model_id: str, engine: EngineDep) -> ModelCard | JSONResponse:
    for c in model_cards(engine):
        if c.id == model_id:
            return c
    return _error(404, f"The model `{model_id}` does not exist.", "invalid_request_error", "model", "model_not_found")


# ---------------------------------------------------------------- runtime patches (vLLM's endpoints)


@router.post("/v1/load_lora_adapter", response_model=AdapterLoaded)
def load_adapter(body: LoadAdapterRequest, engine: EngineDep, settings: SettingsDep) -> AdapterLoaded | JSONResponse:
    path = settings.security.authorize_load(body.lora_name, body.lora_path)  # 403 unless inside a --patch-root
    info = engine.load_patch(body.lora_name, path)  # checked first; PatchRefused -> 400 with why
    note = f" with {len(info.warnings)} warning(s) from check" if info.warnings else ""
    return AdapterLoaded(
        lora_name=info.name,
        lora_path=info.path,
        status="loaded",
        warnings=list(info.warnings),
        message=f"Success: patch '{info.name}' loaded{note}.",
    )


@router.post("/v1/unload_lora_adapter", response_model=AdapterLoaded)
def unload_adapter(
    body: UnloadAdapterRequest, engine: EngineDep, settings: SettingsDep
) -> AdapterLoaded | JSONResponse:
    settings.security.authorize_unload(engine.patches.get(body.lora_name))  # 403: loading off, a start-up patch
    info = engine.unload_patch(body.lora_name)
    return AdapterLoaded(
        lora_name=info.name, lora_path=info.path, status="unloaded", message=f"Success: patch '{info.name}' unloaded."
    )


# ---------------------------------------------------------------- generation

# fields this server knows but does not do: a value that asks for them is a 400 naming the field
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "best_of": lambda v: v not in (None, 1),
    "suffix": bool,
    "logit_bias": bool,
    "presence_penalty": bool,
    "frequency_penalty": bool,
    "tools": bool,
    "functions": bool,
    "response_format": lambda v: bool(v) and v.get("type", "text") != "text",
}


def unsupported(req: BaseModel) -> None:
    """Refuse, by name, a field this server knows but does not do (the schema refuses unknown fields)."""
    for name in sorted(req.model_fields_set):
        check = UNSUPPORTED.get(name)
        if check is not None and check(getattr(req, name)):
            raise BadRequest(f"'{name}' is not supported by this server", param=name)


def sampling_params(req: SamplingFields, max_tokens: int, choice: int = 0) -> SamplingParams:
    """The request's sampling knobs for its `choice`-th answer. With a seed, answer i samples with seed + i:
    the n answers differ, and each is what the same request with that seed and n=1 gets."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p),
        stop=tuple(stop),
        seed=None if req.seed is None else req.seed + choice,
        ignore_eos=req.ignore_eos,
    )


@dataclass(frozen=True)
class Prompt:
    """One prompt of a completion request: its tokens, and its text as the client sent it (None: token ids)."""

    ids: list[int]
    text: str | None


def completion_prompts(engine: Engine, prompt: Any) -> list[Prompt]:
    """A completion's prompt(s) as tokens: a text (encoded as `evaluate.generate` does), a list of texts, token
    ids, or a list of token-id lists. The routes run it on a worker thread, off the event loop."""
    items = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else [prompt]
    out = []
    for p in items:
        if isinstance(p, str):  # an empty text is conditioned on BOS (EOS where there is none), as lm-eval does
            out.append(Prompt(engine.encode(p) or [prefix_token(engine.tokenizer)], p))
        else:
            out.append(Prompt(list(p), None))
    return out


def chat_prompt(engine: Engine, messages: list[dict[str, Any]]) -> tuple[list[int], str]:
    """The chat template applied and its text tokenized (on a worker thread, off the event loop)."""
    text = engine.chat_prompt(messages)
    return engine.encode(text), text


def submit_all(engine: Engine, requests: list[GenRequest]) -> list[Stream]:
    """Each choice of a request is its own stream through the engine: all are queued, or none (a refused one
    cancels those already queued)."""
    if len(requests) > engine.config.max_queue:
        raise BadRequest(
            f"this request asks for {len(requests)} answers (prompts × n); this server queues at most "
            f"{engine.config.max_queue}",
            param="n",
        )
    streams: list[Stream] = []
    try:
        for r in requests:
            streams.append(engine.submit(r))
    except BaseException:
        for s in streams:
            s.cancel()
        raise
    return streams


def token_namer(tokenizer: Any) -> TokenName:
    """A token id's text as logprobs name it: the tokenizer's decode of that token alone (as vLLM's)."""
    cache: dict[int, str] = {}

    def name(t: int) -> str:
        if t not in cache:
            cache[t] = tokenizer.decode([t])
        return cache[t]

    return name


def _target(engine: Engine, model: str) -> str | None:
    """The engine's patch name for the request's `model` (None: the base)."""
    return None if model == engine.name else model


def _label(engine: Engine, model: str, stream: Stream) -> Callable[[], str]:
    """The answer's `model`: as asked, except `auto`, which becomes `auto:<patch or base>` once routed."""
    if model != AUTO:
        return lambda: model
    return lambda: AUTO if stream.patch == AUTO else f"{AUTO}:{stream.patch or engine.name}"


def _answer(engine: Engine, body: BaseModel, model: str, stream: Stream) -> Any:
    """The response body; for `auto`, with the routing headers (of the first choice)."""
    if model != AUTO:
        return body
    headers = {"x-portllm-routed-to": _ascii(stream.patch or engine.name)}
    if stream.request.routing is not None:
        headers["x-portllm-routing"] = json.dumps(stream.request.routing, separators=(",", ":"))
    return JSONResponse(body.model_dump(), headers=headers)


@dataclass(frozen=True)
class CompletionPlan:
    """How a completion request's choices are shown: choice i answers prompt i // n; with echo its prompt
    (text, and with logprobs the prompt's log-probabilities) comes first."""

    prompts: list[Prompt]
    n: int
    echo: bool
    logprobs: int | None
    scored_only: bool  # max_tokens 0 with echo: the prompt scored, nothing generated (one token is, then dropped)
    name: TokenName
    decode: Callable[[list[int]], str]

    def piece(
        self, i: int, text: str, entries: Sequence[TokenLogprob], prompt_lps: Any, first: bool, offset: int
    ) -> tuple[str, CompletionLogprobs | None]:
        """Choice i's text and logprobs for a piece of its output (`first`: the piece that opens it)."""
        if self.scored_only:
            text, entries = "", []
        ids = [e.token for e in entries]
        lps: list[TokenLogprob | None] = list(entries)
        if first and self.echo:
            p = self.prompts[i // self.n]
            text = (p.text if p.text is not None else self.decode(p.ids)) + text
            ids = p.ids + ids
            lps = list(prompt_lps or [None] * len(p.ids)) + lps
        if self.logprobs is None or not ids:
            return text, None
        return text, CompletionLogprobs.of(lps, ids, self.name, offset)

    def usage(self, completion_tokens: int) -> Usage:
        """Each prompt counted once (however many choices it has), as vLLM counts."""
        prompt = sum(len(p.ids) for p in self.prompts)
        done = 0 if self.scored_only else completion_tokens
        return Usage(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done)


@router.post("/v1/completions", response_model=CompletionResponse)
async def completions(req: CompletionRequest, request: Request, engine: EngineDep) -> Any:
    unsupported(req)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default for completions
    if max_tokens == 0 and not req.echo:
        raise BadRequest("max_tokens 0 scores the prompt and returns nothing else: it needs echo", param="max_tokens")
    prompts = await run_in_threadpool(completion_prompts, engine, req.prompt)
    n, target = req.n or 1, _target(engine, req.model)
    scored = req.logprobs if req.echo else None
    params = [sampling_params(req, max(1, max_tokens), i) for i in range(n)]
    gens = [
        GenRequest(p.ids, target, params[i], text=p.text, logprobs=req.logprobs, prompt_logprobs=scored)
        for p in prompts
        for i in range(n)
    ]
    streams = submit_all(engine, gens)
    tok = engine.tokenizer
    plan = CompletionPlan(prompts, n, bool(req.echo), req.logprobs, max_tokens == 0, token_namer(tok), tok.decode)
    cid, label = f"cmpl-{streams[0].id}", _label(engine, req.model, streams[0])
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return _sse(_completion_chunks(streams, plan, cid, label, usage))
    done = await _collect(streams, request)

    def body() -> CompletionResponse:  # token texts for logprobs and the echo: decoding, off the loop
        choices = []
        for i, d in enumerate(done):
            text, lps = plan.piece(i, d.text, d.logprobs, d.prompt_logprobs, True, 0)
            reason = "length" if plan.scored_only else d.finish_reason
            choices.append(CompletionChoice(index=i, text=text, logprobs=lps, finish_reason=reason))
        usage = plan.usage(sum(d.completion_tokens for d in done))
        return CompletionResponse(id=cid, created=int(streams[0].created), model=label(), choices=choices, usage=usage)

    return _answer(engine, await run_in_threadpool(body), req.model, streams[0])


@router.post("/v1/chat/completions", response_model=ChatResponse)
async def chat(req: ChatRequest, request: Request, engine: EngineDep, settings: SettingsDep) -> Any:
    unsupported(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    messages = [_message(m, i) for i, m in enumerate(req.messages)]
    ids, text = await run_in_threadpool(chat_prompt, engine, messages)
    room = engine.max_length - len(ids)
    limit = req.max_completion_tokens or req.max_tokens or max(1, min(settings.default_max_tokens, room))
    asked = next((m["content"] for m in reversed(messages) if m["role"] == "user" and m["content"]), None)
    k = (req.top_logprobs or 0) if req.logprobs else None
    target = _target(engine, req.model)
    gens = [
        GenRequest(ids, target, sampling_params(req, limit, i), text=text, route_text=asked, logprobs=k)
        for i in range(req.n or 1)
    ]
    streams = submit_all(engine, gens)
    name = token_namer(engine.tokenizer)
    cid, label = f"chatcmpl-{streams[0].id}", _label(engine, req.model, streams[0])
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return _sse(_chat_chunks(streams, cid, label, usage, name if k is not None else None))
    done = await _collect(streams, request)

    def body() -> ChatResponse:
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=d.text),
                logprobs=ChatLogprobs.of(d.logprobs, name) if k is not None else None,
                finish_reason=d.finish_reason,
            )
            for i, d in enumerate(done)
        ]
        usage = _usage(len(ids), sum(d.completion_tokens for d in done))
        return ChatResponse(id=cid, created=int(streams[0].created), model=label(), choices=choices, usage=usage)

    return _answer(engine, await run_in_threadpool(body), req.model, streams[0])


# ---------------------------------------------------------------- helpers


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _ascii(s: str) -> str:
    """A header value (latin-1 only): other characters escaped."""
    return s.encode("ascii", "backslashreplace").decode("ascii")


def _message(m: ChatMessage, i: int) -> dict[str, Any]:
    for field_name in ("tool_calls", "function_call", "audio"):
        if getattr(m, field_name):
            raise BadRequest(f"'{field_name}' in messages is not supported", param=f"messages.{i}.{field_name}")
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


def _failed_any(events: list[list[Event]]) -> None:
    for evs in events:
        last = evs[-1] if evs else Event(finish_reason="cancelled")
        if last.finish_reason in ("error", "timeout", "cancelled"):
            raise _failed(last)


async def _collect(streams: list[Stream], request: Request) -> list[Completion]:
    """Wait for every choice's whole output; if the client disconnects meanwhile, cancel them."""

    async def watch() -> None:
        while True:
            await asyncio.sleep(0.25)
            if await request.is_disconnected():
                for s in streams:
                    s.cancel()
                return

    watcher = asyncio.create_task(watch())
    events: list[list[Event]] = [[] for _ in streams]
    try:
        async for i, ev in merged(streams):
            events[i].append(ev)
    finally:
        watcher.cancel()
        for s in streams:
            s.cancel()  # no-op once finished; otherwise (this coroutine cancelled) the rows must go
    _failed_any(events)
    return [Completion.of(evs, s.patch) for evs, s in zip(events, streams)]


class _Failed(ServeError):
    """A request that ended badly on the worker, as HTTP answers it."""


def _failed(ev: Event) -> ServeError:
    """Timeout 504; the server shutting down 503; any other error (or a cancel) 500."""
    if ev.finish_reason == "timeout":
        e = _Failed(ev.error or "the request timed out")
        e.status, e.kind, e.code = 504, "timeout_error", "timeout"
    elif "shutting down" in (ev.error or ""):
        e = _Failed(ev.error or f"request {ev.finish_reason}")
        e.status, e.kind, e.code = 503, "server_error", "unavailable"
    else:  # what failed is logged with the request id; the client gets the id only
        e = _Failed(internal_error(ev.error or f"request {ev.finish_reason}"))
        e.status, e.kind, e.code = 500, "server_error", None
    return e


def _sse(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _data(obj: BaseModel | dict[str, Any]) -> str:
    body = obj.model_dump_json(exclude_none=False) if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {body}\n\n"


def _stream_error(ev: Event) -> str:
    e = _failed(ev)
    return _data({"error": ErrorInfo(message=str(e), type=e.kind, param=None, code=e.code).model_dump()})


async def _completion_chunks(
    streams: list[Stream], plan: CompletionPlan, cid: str, label: Callable[[], str], usage: bool
) -> AsyncIterator[str]:
    created = int(streams[0].created)
    sent = [0] * len(streams)  # characters of each choice's text so far (its logprobs' text_offset)
    opened = [False] * len(streams)
    completion_tokens = 0
    try:
        async for i, ev in merged(streams):
            if ev.finish_reason in ("error", "timeout", "cancelled"):
                yield _stream_error(ev)
                return
            text, lps = plan.piece(i, ev.text, ev.logprobs, ev.prompt_logprobs, not opened[i], sent[i])
            opened[i] = True
            sent[i] += len(text)
            reason = ("length" if plan.scored_only else ev.finish_reason) if ev.finish_reason else None
            completion_tokens += ev.completion_tokens if ev.finish_reason else 0
            if text or lps is not None or reason:
                choice = CompletionChoice(index=i, text=text, logprobs=lps, finish_reason=reason)
                yield _data(CompletionResponse(id=cid, created=created, model=label(), choices=[choice]))
        if usage:
            u = plan.usage(completion_tokens)
            yield _data(CompletionResponse(id=cid, created=created, model=label(), choices=[], usage=u))
        yield "data: [DONE]\n\n"
    finally:
        for s in streams:
            s.cancel()  # the client went away (or we are done: then it is a no-op)


async def _chat_chunks(
    streams: list[Stream], cid: str, label: Callable[[], str], usage: bool, name: TokenName | None
) -> AsyncIterator[str]:
    created = int(streams[0].created)
    # an `auto` request's first chunk waits for the router (it names the patch); otherwise every choice opens now
    opened = [label() != AUTO] * len(streams)
    completion_tokens = 0

    def chunk(i: int, delta: ChatDelta, finish: str | None = None, lps: Any = None) -> str:
        choice = ChatChunkChoice(index=i, delta=delta, logprobs=lps, finish_reason=finish)
        return _data(ChatChunk(id=cid, created=created, model=label(), choices=[choice]))

    try:
        for i in range(len(streams)):
            if opened[i]:
                yield chunk(i, ChatDelta(role="assistant", content=""))
        async for i, ev in merged(streams):
            if ev.finish_reason in ("error", "timeout", "cancelled"):
                yield _stream_error(ev)
                return
            if not opened[i]:
                opened[i] = True
                yield chunk(i, ChatDelta(role="assistant", content=""))
            lps = ChatLogprobs.of(ev.logprobs, name) if name is not None and ev.logprobs else None
            if ev.text or lps is not None:
                yield chunk(i, ChatDelta(content=ev.text), lps=lps)
            if ev.finish_reason:
                completion_tokens += ev.completion_tokens
                yield chunk(i, ChatDelta(), ev.finish_reason)
        if usage:
            prompt = len(streams[0].request.prompt_ids)
            u = _usage(prompt, completion_tokens)
            yield _data(ChatChunk(id=cid, created=created, model=label(), choices=[], usage=u))
        yield "data: [DONE]\n\n"
    finally:
        for s in streams:
            s.cancel()
