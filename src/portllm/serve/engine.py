"""The model-facing half of `portllm serve`: one base, many patches, every waiting request in one batch.

One worker thread owns the model. Requests wait in a bounded queue; at each step the worker takes
what has arrived (up to `max_batch` rows in flight), prefills the newcomers together and merges
them into the running batch (continuous batching: their KV cache is left-padded to the batch's),
then runs one decode step for every row. Each row names its own patch: PEFT's mixed-adapter
forward (`adapter_names=[...]`, `__base__` for none) applies to each row only its own B·A, so
requests for different patches share the base's forward pass. Rows leave the batch when they
finish, are cancelled or time out.

Greedy outputs do not depend on who else is in the batch: left padding is masked, every row
carries its own position ids, and a row's LoRA update is computed on its rows only. Rounding
differences from a wider matrix product remain possible in principle (tests compare token ids).

Every patch is checked against the served base (`check`) before PEFT sees it, at start-up and
at runtime: an incompatible one is refused with the check's reason, one with warnings loads and
the warnings are returned. The engine knows nothing of HTTP (see app.py); `Engine.submit` is the
library entry point.
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import PortLLMError

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
AUTO = "auto"  # the model name that asks the router to choose


# ---------------------------------------------------------------- errors with an HTTP meaning


class ServeError(PortLLMError):
    """A refused request; `status` and `code` are what an HTTP layer answers with."""

    status = 400
    code: str | None = None
    kind = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.retry_after = retry_after


class BadRequest(ServeError):
    pass


class UnknownModel(ServeError):
    status = 404
    code = "model_not_found"


class ContextTooLong(ServeError):
    code = "context_length_exceeded"


class PatchRefused(ServeError):
    """`check` found the patch incompatible with the served base (its reason is the message)."""

    code = "patch_incompatible"


class Overloaded(ServeError):
    """The queue is full: try again shortly (HTTP 429 with Retry-After)."""

    status = 429
    code = "queue_full"
    kind = "rate_limit_error"


class Unavailable(ServeError):
    """The engine is not running (starting, stopping, or its worker died): HTTP 503."""

    status = 503
    code = "unavailable"
    kind = "server_error"


# ---------------------------------------------------------------- requests and their events


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI's sampling knobs. temperature 0 is greedy (argmax, as `evaluate.generate`)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (load tests)

    def problem(self) -> tuple[str, str] | None:
        """(parameter, what is wrong) for values no sampler can use, else None."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            return "max_tokens", f"max_tokens must be a positive integer, got {self.max_tokens!r}"
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 2):
            return "temperature", f"temperature must be between 0 and 2, got {self.temperature!r}"
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            return "top_p", f"top_p must be in (0, 1], got {self.top_p!r}"
        if len(self.stop) > 4 or any(not isinstance(s, str) or not s for s in self.stop):
            return "stop", "stop takes at most 4 non-empty strings"
        return None


@dataclass
class GenRequest:
    """One generation: prompt tokens, which patch (None: the base; AUTO: the router's choice), how to sample."""

    prompt_ids: list[int]
    patch: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    timeout_s: float | None = None  # None: the engine's default
    text: str | None = None  # the prompt as text, when the caller has it (routers may read it)
    route_text: str | None = None  # what a router should read instead of `text` (a chat's last user message)
    routing: dict[str, Any] | None = None  # set by the router for `auto`: {"router", "patch", "scores"}


@dataclass(frozen=True)
class Event:
    """A piece of a request's output. The last event has `finish_reason` set (and the totals)."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None  # stop, length, cancelled, timeout, error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass(frozen=True)
class Completion:
    """A finished request, as `Stream.result()` gathers it."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    patch: str | None
    error: str | None = None


class Stream:
    """What `Engine.submit` returns: the request's events as the worker produces them.

    Iterate it (blocking), `async for` over `events()` (an event loop), or call `result()`. `cancel()`
    takes the row out of the batch at the next step; an abandoned HTTP request does that.
    """

    def __init__(self, request: GenRequest, adapter: str, patch: str | None, deadline: float | None) -> None:
        self.id = uuid.uuid4().hex[:24]
        self.request = request
        self.adapter = adapter  # PEFT's adapter name for this row (BASE for none), or AUTO until routed
        self.patch = patch  # the public name (None: the base)
        self.deadline = deadline
        self.created = time.time()
        self.cancelled = False
        self.done = threading.Event()
        self._q: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._wake: Any = None

    def cancel(self) -> None:
        self.cancelled = True

    def _put(self, ev: Event) -> None:
        self._q.put(ev)
        if ev.finish_reason is not None:
            self.done.set()
        wake = self._wake
        if wake is not None:
            wake()

    def __iter__(self) -> Iterator[Event]:
        while True:
            ev = self._q.get()
            yield ev
            if ev.finish_reason is not None:
                return

    async def events(self) -> AsyncIterator[Event]:
        """The events without blocking the event loop: the worker wakes it when it puts one."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        self._wake = lambda: loop.call_soon_threadsafe(ready.set)
        try:
            while True:
                try:
                    ev = self._q.get_nowait()
                except queue.Empty:
                    await ready.wait()
                    ready.clear()
                    continue
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            self._wake = None

    def result(self) -> Completion:
        """Block until the request finishes; the whole text and the totals."""
        text, ids, last = [], [], Event()
        for ev in self:
            text.append(ev.text)
            ids.extend(ev.token_ids)
            last = ev
        return Completion(
            "".join(text),
            ids,
            last.finish_reason or "error",
            last.prompt_tokens,
            last.completion_tokens,
            self.patch,
            last.error,
        )


# ---------------------------------------------------------------- routing seam


class RequestRouter(Protocol):
    """Chooses the patch for requests sent to model `auto`.

    Called on the worker thread (which owns the model, so a router may run the base: `engine.model`,
    inside `engine.base_only()`), once per step with the `auto` requests admitted in that step.
    Returns one public patch name per request, or None for the base. A router may also set each request's
    `routing` (reported to the client) and have a `check(engine)` method, called when an `auto` request
    arrives (on the caller's thread): a PortLLMError there refuses the request with its message (400).
    """

    def route(self, engine: Engine, requests: Sequence[GenRequest]) -> list[str | None]: ...


def router_factory(name: str) -> Callable[[Engine], RequestRouter]:
    """What `--router NAME` builds a router with: `portllm.routing.serve_router(name, engine)`. The name (and
    its knobs) are checked here, before any model is loaded: a one-line error for a router that cannot serve."""
    try:
        from .. import routing
    except ImportError:
        routing = None
    make = getattr(routing, "serve_router", None)
    if make is None:
        raise PortLLMError(
            f"--router {name}: routed serving is not available (portllm.routing has no serve_router); serve "
            "without --router and name a patch in each request's model"
        )
    check = getattr(getattr(routing, "serving", None), "parse_spec", None)
    if check is not None:
        check(name)
    return lambda engine: make(name, engine)


# ---------------------------------------------------------------- the engine


@dataclass
class EngineConfig:
    """How much the server takes on: rows per forward pass, waiting requests, time per request."""

    max_batch: int = 16
    max_queue: int = 64
    request_timeout_s: float | None = 600.0
    dtype: str = "float32"
    threads: int | None = None
    max_length: int | None = None  # prompt + completion tokens; default: the model's max_position_embeddings
    require_signature: bool = False
    trusted: list | None = None


@dataclass(frozen=True)
class LoadedPatch:
    """A patch the engine serves: its public name, where it came from, and what `check` said."""

    name: str
    path: str
    adapter: str  # PEFT's internal adapter name
    fingerprint: str | None
    warnings: tuple[str, ...] = ()
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class _Row:
    """A request in the running batch."""

    stream: Stream
    gen: torch.Generator | None
    next_pos: int
    ids: list[int] = field(default_factory=list)  # completion tokens kept for the text (EOS excluded)
    sampled: int = 0
    pending: int | None = None  # sampled, not yet fed to the model
    sent: int = 0  # characters of the text already emitted
    done: bool = False


class Engine:
    """A base model with patches attached, serving generation requests in shared batches.

    >>> eng = Engine("smollm2-135m", {"sst2": "patches/sst2"}).start()
    >>> eng.submit(GenRequest(eng.encode("Hello"), patch="sst2")).result().text
    """

    def __init__(
        self,
        base: str | Path,
        patches: dict[str, str | Path] | None = None,
        config: EngineConfig | None = None,
        name: str | None = None,
    ) -> None:
        from ..evaluate import bos_prefix
        from ..models import BaseRef, load_base

        self.config = config or EngineConfig()
        if self.config.max_batch < 1 or self.config.max_queue < 1:
            raise PortLLMError("max_batch and max_queue must be at least 1")
        if self.config.dtype not in ("float32", "bfloat16", "float16"):
            raise PortLLMError(f"dtype {self.config.dtype!r} not supported; use float32 or bfloat16")
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self.ref = BaseRef.of(base)
        self.name = name or str(base)
        model, tok = load_base(self.ref, dtype=self.config.dtype)
        if tok is None:
            raise PortLLMError(f"{base} has no tokenizer; serving needs one")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.model: Any = model
        self.tokenizer = tok
        self.bos = bos_prefix(tok)
        cfg = model.config
        self.max_length = self.config.max_length or int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        self.eos = {int(e) for e in [*eos, tok.eos_token_id] if e is not None}
        # transformers 5 renamed past_key_values to cache (and warns about the old name)
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.router: RequestRouter | None = None
        self._patches: dict[str, LoadedPatch] = {}
        self._refs: dict[str, int] = {}  # adapter -> requests queued or running with it
        self._retired: set[str] = set()  # unloaded adapters PEFT still holds until their last request ends
        self._lock = threading.Lock()  # the tables above
        self._model_lock = threading.Lock()  # the model: one forward pass or one adapter change at a time
        self._counter = 0
        self._queue: queue.Queue[Stream] = queue.Queue(maxsize=self.config.max_queue)
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.failure: str | None = None  # why the worker died, if it did
        self.started = time.time()
        self.stats = {"requests": 0, "steps": 0, "rows": 0, "completion_tokens": 0, "max_rows": 0, "cancelled": 0}
        for pname, path in (patches or {}).items():
            self.load_patch(pname, path)

    # ------------------------------------------------------------ patches

    @property
    def patches(self) -> dict[str, LoadedPatch]:
        with self._lock:
            return dict(self._patches)

    def check_patch(self, path: str | Path) -> tuple[Any, list[str]]:
        """The patch, loaded and checked against the served base, and its warnings; PatchRefused if it does
        not fit (quantization only forbids merging, not attaching: as `open_lm`)."""
        from ..check import check
        from ..patch import Patch
        from ..sign import require_trusted

        require_trusted(path, self.config.require_signature, self.config.trusted)
        loaded = Patch.load(path, require_manifest=False)
        rep = check(loaded, self.ref)
        try:
            rep.require("attach", f"patch {path} does not fit {self.name}")
        except PortLLMError as e:
            raise PatchRefused(str(e)) from None
        warnings = rep.warnings()
        if loaded.manifest is None:
            warnings.append(
                "identity: a plain adapter (no portllm.json): the base it was made for is unknown, only its shapes "
                "were checked; `portllm import-adapter` stamps it"
            )
        return loaded, warnings

    def load_patch(self, name: str, path: str | Path) -> LoadedPatch:
        """Check the patch against the base, then attach it under `name` (between two forward passes)."""
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise BadRequest(f"patch name {name!r} is empty or has surrounding spaces", param="lora_name")
        if name in (self.name, AUTO, BASE):
            raise BadRequest(f"patch name {name!r} is reserved (the base, '{AUTO}' or '{BASE}')", param="lora_name")
        with self._lock:
            if name in self._patches:
                raise BadRequest(f"a patch named {name!r} is already loaded; unload it first", param="lora_name")
        loaded, warnings = self.check_patch(path)
        with self._lock:
            self._counter += 1
            adapter = f"p{self._counter}"  # PEFT module keys cannot hold every name a user may give
        with self._model_lock:
            from peft import PeftModel

            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(str(path), adapter_name=adapter)
                else:
                    self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=adapter)
            except Exception as e:  # whatever PEFT objects to, after check passed
                if isinstance(self.model, PeftModel) and adapter in self.model.peft_config:
                    self._drop_adapter(adapter)
                raise PatchRefused(f"PEFT could not load {path}: {str(e).splitlines()[0][:300]}") from None
            self.model.eval()
        info = LoadedPatch(name, str(path), adapter, loaded.weights_sha256, tuple(warnings))
        with self._lock:
            if name in self._patches:  # loaded by someone else meanwhile
                self._retired.add(adapter)
                raise BadRequest(f"a patch named {name!r} is already loaded; unload it first", param="lora_name")
            self._patches[name] = info
            self._refs.setdefault(adapter, 0)
        return info

    def unload_patch(self, name: str) -> LoadedPatch:
        """New requests for `name` are refused at once; its weights go when its last running request ends."""
        with self._lock:
            info = self._patches.pop(name, None)
            if info is None:
                raise UnknownModel(f"no patch named {name!r} is loaded", param="lora_name")
            self._retired.add(info.adapter)
        if self._thread is None:
            self._reap()
        return info

    def _reap(self) -> None:
        with self._lock:
            gone = [a for a in self._retired if self._refs.get(a, 0) == 0]
            for a in gone:
                self._retired.discard(a)
                self._refs.pop(a, None)
        for a in gone:
            with self._model_lock:
                self._drop_adapter(a)

    def _drop_adapter(self, adapter: str) -> None:
        if set(self.model.peft_config) == {adapter}:  # PEFT cannot run with no adapter left: unwrap the base
            self.model = self.model.unload().eval()
        else:
            self.model.delete_adapter(adapter)

    # ------------------------------------------------------------ prompts

    def encode(self, text: str) -> list[int]:
        """Prompt tokens as `evaluate.generate` makes them: the tokenizer's BOS (never doubled), then the text."""
        from ..evaluate import encode_text

        return encode_text(self.tokenizer, text, self.bos)

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        """The tokenizer's chat template applied to the messages, ready for the assistant's turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadRequest(f"{self.name} has no chat template; use /v1/completions with a plain prompt")
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # jinja's TemplateError ("roles must alternate ...") and the like
            raise BadRequest(f"the chat template rejects these messages: {str(e).splitlines()[0][:300]}") from None

    # ------------------------------------------------------------ requests

    def submit(self, request: GenRequest) -> Stream:
        """Queue a request; its events arrive on the returned stream. Refuses at once (ServeError) what
        cannot run: an unknown patch, bad parameters, too long a prompt, a full queue, a stopped engine."""
        p = request.params
        bad = p.problem()
        if bad:
            raise BadRequest(bad[1], param=bad[0])
        if not request.prompt_ids:
            raise BadRequest("the prompt is empty", param="prompt")
        vocab = self.model.get_input_embeddings().weight.shape[0]
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in request.prompt_ids):
            raise BadRequest(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        need = len(request.prompt_ids) + p.max_tokens
        if need > self.max_length:
            raise ContextTooLong(
                f"This model's maximum context length is {self.max_length} tokens. However, you requested {need} "
                f"tokens ({len(request.prompt_ids)} in the prompt, {p.max_tokens} for the completion). Please reduce "
                "the prompt or max_tokens.",
                param="max_tokens",
            )
        if not self.alive:
            raise Unavailable(self.failure or "the engine is not running", retry_after=5)
        timeout = request.timeout_s if request.timeout_s is not None else self.config.request_timeout_s
        check = getattr(self.router, "check", None) if request.patch == AUTO else None
        if check is not None:
            try:
                check(self)
            except ServeError:
                raise
            except PortLLMError as e:
                raise BadRequest(str(e), param="model") from None
        with self._lock:
            if request.patch in (None, self.name):
                adapter, patch = BASE, None
            elif request.patch == AUTO:
                if self.router is None:
                    raise BadRequest(
                        f"model '{AUTO}' needs a router, and none is configured; start the server with --router NAME "
                        "or name a patch",
                        param="model",
                    )
                adapter, patch = AUTO, AUTO
            elif request.patch in self._patches:
                adapter, patch = self._patches[request.patch].adapter, request.patch
            else:
                raise UnknownModel(
                    f"The model `{request.patch}` does not exist: serving {self.name} with patches "
                    f"{sorted(self._patches) or 'none'}",
                    param="model",
                )
            stream = Stream(request, adapter, patch, None if timeout is None else time.monotonic() + timeout)
            self._refs[adapter] = self._refs.get(adapter, 0) + 1
        try:
            self._queue.put_nowait(stream)
        except queue.Full:
            self._release(stream)
            raise Overloaded(
                f"the server is at capacity ({self.config.max_queue} requests waiting); retry shortly", retry_after=1
            ) from None
        self.stats["requests"] += 1
        return stream

    def generate(self, prompt: str, patch: str | None = None, **params: Any) -> Completion:
        """One request, blocking: the engine's text for `prompt` (params as SamplingParams)."""
        stop = params.pop("stop", ())
        sp = SamplingParams(stop=tuple([stop] if isinstance(stop, str) else stop), **params)
        return self.submit(GenRequest(self.encode(prompt), patch, sp, text=prompt)).result()

    def _release(self, stream: Stream) -> None:
        with self._lock:
            self._refs[stream.adapter] = self._refs.get(stream.adapter, 1) - 1

    # ------------------------------------------------------------ the worker

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> int:
        return len(self._rows)

    def start(self) -> Engine:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="portllm-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Finish nothing more: running and waiting requests end with an error event."""
        self._stopping = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_rows("the server is shutting down")
        while True:
            try:
                s = self._queue.get_nowait()
            except queue.Empty:
                break
            self._finish_stream(s, Event(finish_reason="error", error="the server is shutting down"))
        self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _work(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stopping:
                    self._reap()
                    new = self._admit()
                    if not new and not self._rows:
                        continue
                    with self._model_lock:
                        try:
                            self._step(new)
                        except Exception as e:  # a failed pass fails its rows, not the server
                            self._fail_rows(f"generation failed: {e.__class__.__name__}: {str(e)[:300]}", new)
        except BaseException as e:  # pragma: no cover - the worker itself broke
            self.failure = f"engine worker stopped: {e.__class__.__name__}: {e}"
            self._fail_rows(self.failure)
            raise

    def _admit(self) -> list[Stream]:
        """Waiting requests for the free rows (none while a batch that cannot take newcomers runs)."""
        room = self.config.max_batch - len(self._rows)
        if self._rows and not self._mergeable():
            room = 0
        out: list[Stream] = []
        while len(out) < room:
            try:
                s = self._queue.get(timeout=0.05) if not out and not self._rows else self._queue.get_nowait()
            except queue.Empty:
                break
            if s.cancelled:
                self._finish_stream(s, Event(finish_reason="cancelled"))
            elif s.deadline is not None and time.monotonic() > s.deadline:
                self._finish_stream(s, Event(finish_reason="timeout", error="timed out waiting in the queue"))
            else:
                out.append(s)
        return out

    def _step(self, new: list[Stream]) -> None:
        if new:
            new = self._route(new)
        if new:
            self._prefill(new)
        self._drop_ended()
        if self._rows:
            self._decode()
        self.stats["steps"] += 1

    def _route(self, new: list[Stream]) -> list[Stream]:
        """The router's patch for each `auto` newcomer; a router that fails fails those requests only."""
        streams = [s for s in new if s.adapter == AUTO]
        if not streams:
            return new
        try:
            if self.router is None:
                raise PortLLMError("the router was removed")
            names = list(self.router.route(self, [s.request for s in streams]))
            if len(names) != len(streams):
                raise PortLLMError(f"the router answered {len(names)} names for {len(streams)} requests")
        except Exception as e:
            why = str(e).splitlines()[0][:300] if str(e) else e.__class__.__name__
            for s in streams:
                self._finish_stream(s, Event(finish_reason="error", error=f"routing failed: {why}"))
            return [s for s in new if s.adapter != AUTO]
        for s, name in zip(streams, names):
            with self._lock:
                info = self._patches.get(name) if name is not None else None
                adapter = info.adapter if info else BASE
                self._refs[AUTO] -= 1
                self._refs[adapter] = self._refs.get(adapter, 0) + 1
            s.adapter, s.patch = adapter, name if info else None
        return new

    def base_only(self) -> Any:
        """A context in which the model runs without any patch (for routers that read the base)."""
        from contextlib import nullcontext

        from peft import PeftModel

        return self.model.disable_adapter() if isinstance(self.model, PeftModel) else nullcontext()

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any, rows: list[_Row]) -> Any:
        """One pass for the batch; the one place where each row's patch reaches the model (PEFT's
        `adapter_names`). A per-token router replaces this: same rows, its own mixing inside the layers."""
        from peft import PeftModel

        kw: dict[str, Any] = {}
        if isinstance(self.model, PeftModel):
            kw["adapter_names"] = [r.stream.adapter for r in rows]
        return self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **{self._cache_kw: cache},
            logits_to_keep=1,
            **kw,
        )

    def _prefill(self, streams: list[Stream]) -> None:
        """The newcomers' prompts in one left-padded pass; their cache then joins the running batch's."""
        prompts = [s.request.prompt_ids for s in streams]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(prompts):
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        pos = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)  # as transformers' generate
        rows = [_Row(s, _generator(s.request.params), len(p)) for s, p in zip(streams, prompts)]
        dev = self._device
        out = self._forward(ids.to(dev), mask.to(dev), pos.to(dev), None, rows)
        self._accept(rows, out.logits[:, -1])
        keep = [j for j, r in enumerate(rows) if not r.done]
        if not keep:
            return
        cache, mask = getattr(out, self._cache_kw), mask.to(dev)
        if len(keep) < len(rows):
            cache, mask = _select(cache, mask, keep)
        rows = [rows[j] for j in keep]
        if self._rows:
            self._cache, self._mask = _merge(self._cache, self._mask, cache, mask)
            self._rows += rows
        else:
            self._cache, self._mask, self._rows = cache, mask, rows
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self._rows))

    def _decode(self) -> None:
        rows = self._rows
        dev = self._device
        ids = torch.tensor([[r.pending] for r in rows], device=dev)
        pos = torch.tensor([[r.next_pos] for r in rows], device=dev)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        out = self._forward(ids, self._mask, pos, self._cache, rows)
        self._cache = getattr(out, self._cache_kw)
        for r in rows:
            r.next_pos += 1
        self._accept(rows, out.logits[:, -1])
        self.stats["rows"] += len(rows)
        self._drop_ended()

    @property
    def _device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def _mergeable(self) -> bool:
        return self._cache is None or _plain(self._cache)

    def _accept(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample each row's next token, emit its new text, mark the rows that finished."""
        logits = logits.float()
        greedy = logits.argmax(dim=-1).tolist()
        for j, r in enumerate(rows):
            p = r.stream.request.params
            tok = greedy[j] if p.temperature == 0 else _sample(logits[j], p, r.gen)
            r.sampled += 1
            r.pending = tok
            self._emit(r, tok)

    def _emit(self, r: _Row, tok: int) -> None:
        p = r.stream.request.params
        reason = None
        if tok in self.eos and not p.ignore_eos:
            reason = "stop"
        else:
            r.ids.append(tok)
        text = self.tokenizer.decode(r.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        if reason is None and r.sampled >= p.max_tokens:
            reason = "length"
        if reason is None:
            end = _safe_end(text, p.stop)
            if end > r.sent:
                r.stream._put(Event(text[r.sent : end], (tok,)))
                r.sent = end
            elif tok not in self.eos:
                r.stream._put(Event("", (tok,)))
            return
        r.done = True
        self.stats["completion_tokens"] += r.sampled
        final = Event(
            text[r.sent :],
            () if reason == "stop" and tok in self.eos and not p.ignore_eos else (tok,),
            reason,
            len(r.stream.request.prompt_ids),
            r.sampled,
        )
        r.sent = len(text)
        self._finish_stream(r.stream, final)

    def _drop_ended(self) -> None:
        """Rows that finished, were cancelled or ran out of time leave the batch (and their cache rows)."""
        now = time.monotonic()
        for r in self._rows:
            if r.done:
                continue
            s = r.stream
            if s.cancelled:
                r.done = True
                self._finish_stream(s, Event(finish_reason="cancelled", completion_tokens=r.sampled))
            elif s.deadline is not None and now > s.deadline:
                r.done = True
                self._finish_stream(
                    s,
                    Event(
                        finish_reason="timeout",
                        error="the request took longer than the server's timeout",
                        prompt_tokens=len(s.request.prompt_ids),
                        completion_tokens=r.sampled,
                    ),
                )
        keep = [j for j, r in enumerate(self._rows) if not r.done]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        self._cache, self._mask = _select(self._cache, self._mask, keep)
        self._rows = [self._rows[j] for j in keep]

    def _finish_stream(self, s: Stream, ev: Event) -> None:
        if ev.finish_reason == "cancelled":
            self.stats["cancelled"] += 1
        self._release(s)
        s._put(ev)

    def _fail_rows(self, message: str, extra: Sequence[Stream] = ()) -> None:
        for s in [r.stream for r in self._rows] + list(extra):
            if not s.done.is_set():
                self._finish_stream(s, Event(finish_reason="error", error=message))
        self._rows, self._cache, self._mask = [], None, None


# ---------------------------------------------------------------- helpers


def _generator(p: SamplingParams) -> torch.Generator | None:
    if p.temperature == 0:
        return None
    return torch.Generator().manual_seed(p.seed if p.seed is not None else random.getrandbits(63))


def _sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """Temperature, then nucleus (the smallest set of tokens whose probability reaches top_p)."""
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > p.top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def _safe_end(text: str, stop: Sequence[str]) -> int:
    """How much of the text can be sent: not a tail that may still become a stop string, nor a
    half-decoded character (U+FFFD while a multi-byte token sequence is incomplete)."""
    end = len(text)
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                end = min(end, len(text) - k)
                break
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    return end


def _plain(cache: Any) -> bool:
    """A cache whose layers are plain growing tensors (not sliding windows): rows can be padded and joined."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(x) is DynamicLayer and x.keys is not None for x in layers)


def _select(cache: Any, mask: torch.Tensor, keep: list[int]) -> tuple[Any, torch.Tensor]:
    """Keep these rows; drop the columns that are padding for every row left."""
    idx = torch.tensor(keep, device=mask.device)
    for layer in cache.layers:
        layer.batch_select_indices(idx)
    mask = mask[idx]
    if _plain(cache):
        used = mask.sum(0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first > 0:
            for layer in cache.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]
            mask = mask[:, first:]
    return cache, mask


def _merge(a: Any, a_mask: torch.Tensor, b: Any, b_mask: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Two batches' caches as one: each left-padded (zeros, masked out) to the longer, then stacked."""
    width = max(a_mask.shape[1], b_mask.shape[1])

    def pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
        if n == 0:
            return t
        shape = list(t.shape)
        shape[dim] = n
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    for la, lb in zip(a.layers, b.layers):
        na, nb = width - a_mask.shape[1], width - b_mask.shape[1]
        la.keys = torch.cat([pad(la.keys, na, 2), pad(lb.keys, nb, 2)], dim=0)
        la.values = torch.cat([pad(la.values, na, 2), pad(lb.values, nb, 2)], dim=0)
    mask = torch.cat([pad(a_mask, width - a_mask.shape[1], 1), pad(b_mask, width - b_mask.shape[1], 1)], dim=0)
    return a, mask
