"""The model-facing half of `portllm serve`: one base, many patches, every waiting request in one batch.

`Engine` is the library entry point and puts the parts together: the base and its tokenizer, the
patch registry (patches.py: every patch checked against the base before PEFT sees it), the
scheduler (scheduler.py: the worker thread and continuous batching, with kvcache.py and
sampling.py), and the router seam for model `auto`. `Engine.submit` validates a request and
refuses at once what cannot run; the rest happens on the worker thread. The engine knows
nothing of HTTP (see app.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .. import routing
from ..device import resolve_device, resolve_dtype
from ..errors import PortLLMError
from ..eval.encode import bos_prefix, encode_text
from ..models import BaseRef, load_base
from .errors import BadRequest, ServeError, Unavailable
from .logprobs import MAX_LOGPROBS
from .patches import LoadedPatch, PatchRegistry
from .sampling import SamplingParams
from .scheduler import Scheduler
from .security import DEFAULT_MAX_PATCHES, check_context
from .streams import AUTO, Completion, GenRequest, Stream

# ---------------------------------------------------------------- routing seam


class RequestRouter(Protocol):
    """Chooses the patch for requests sent to model `auto`.

    Called on the worker thread (which owns the model, so a router may run the base: `engine.model`,
    inside `engine.base_only()`), once per step with the `auto` requests admitted in that step.
    Returns one public patch name per request, or None for the base; a name that is not loaded fails
    that request ("routing failed: ..."), it is never served by the base. A router may also set each
    request's `routing` (reported to the client) and have a `check(engine)` method, called when an
    `auto` request arrives (on the caller's thread): a PortLLMError there refuses the request with its
    message (400).
    """

    def route(self, engine: Engine, requests: Sequence[GenRequest]) -> list[str | None]: ...


def router_factory(name: str) -> Callable[[Engine], RequestRouter]:
    """What `--router NAME` builds a router with: `portllm.routing.serve_router(name, engine)`. The name (and
    its knobs) are checked here, before any model is loaded: a one-line error for a router that cannot serve."""
    routing.serving.parse_spec(name)
    return lambda engine: routing.serve_router(name, engine)


# ---------------------------------------------------------------- the engine


@dataclass
class EngineConfig:
    """How much the server takes on: rows per forward pass, waiting requests, time per request."""

    max_batch: int = 16
    max_queue: int = 64
    request_timeout_s: float | None = 600.0
    dtype: str = "float32"  # or "auto": device.resolve_dtype
    device: str = "cpu"  # device.resolve_device: auto, cpu, cuda, cuda:N, mps
    threads: int | None = None
    max_length: int | None = None  # prompt + completion tokens; default: the model's max_position_embeddings
    require_signature: bool = False
    trusted: list | None = None
    max_patches: int | None = DEFAULT_MAX_PATCHES  # patches held at once (start-up and runtime); None: no limit


class Engine:
    """A base model with patches attached, serving generation requests in shared batches.

    >>> eng = Engine("smollm2-135m", {"sst2": "patches/sst2"}).start()
    >>> eng.submit(GenRequest(eng.encode("Hello"), patch="sst2")).result().text
    """

    scheduler_class: type[Scheduler] = Scheduler  # another worker loop (the load benchmark's naive one) subclasses it

    def __init__(
        self,
        base: str | Path,
        patches: dict[str, str | Path] | None = None,
        config: EngineConfig | None = None,
        name: str | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        if self.config.max_batch < 1 or self.config.max_queue < 1:
            raise PortLLMError("max_batch and max_queue must be at least 1")
        self.device = resolve_device(self.config.device)
        self.dtype = resolve_dtype(self.config.dtype, self.device)
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self.ref = BaseRef.of(base)
        self.name = name or str(base)
        model, tok = load_base(self.ref, dtype=self.dtype, device=self.device)
        if tok is None:
            raise PortLLMError(f"{base} has no tokenizer; serving needs one")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.tokenizer = tok
        self.bos = bos_prefix(tok)
        self.max_length = self.config.max_length or int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        self.eos = {int(e) for e in [*eos, tok.eos_token_id] if e is not None}
        self.router: RequestRouter | None = None
        cfg = self.config
        self.registry = PatchRegistry(
            model, self.ref, self.name, cfg.require_signature, cfg.trusted, max_patches=cfg.max_patches
        )
        self.scheduler = self.scheduler_class(self.registry, tok, self.eos, cfg.max_batch, cfg.max_queue, self._route)
        self.started = time.time()
        for pname, path in (patches or {}).items():
            self.load_patch(pname, path, startup=True)

    # ------------------------------------------------------------ the model and its patches

    @property
    def model(self) -> Any:
        """The base, wrapped by PEFT while patches are attached (it changes as they load and unload)."""
        return self.registry.model

    @property
    def model_lock(self) -> Any:
        """Held for each forward pass and each adapter change; holding it stalls the worker (tests do)."""
        return self.registry.model_lock

    @property
    def patches(self) -> dict[str, LoadedPatch]:
        return self.registry.patches

    def check_patch(self, path: str | Path) -> tuple[Any, list[str]]:
        """The patch, loaded and checked against the served base, and its warnings; PatchRefused if it does not fit."""
        return self.registry.check(path)

    def load_patch(self, name: str, path: str | Path, startup: bool = False) -> LoadedPatch:
        """Check the patch against the base, then attach it under `name` (between two forward passes)."""
        return self.registry.load(name, path, startup)

    def unload_patch(self, name: str) -> LoadedPatch:
        """New requests for `name` are refused at once; its weights go when its last running request ends."""
        info = self.registry.unload(name)
        if self.scheduler.thread is None:
            self.registry.reap()
        return info

    def base_only(self) -> AbstractContextManager[Any]:
        """A context in which the model runs without any patch (for routers that read the base)."""
        return self.registry.base_only()

    # ------------------------------------------------------------ prompts

    def encode(self, text: str) -> list[int]:
        """Prompt tokens as `eval.generate` makes them: the tokenizer's BOS (never doubled), then the text."""
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
        self._validate(request)
        if not self.alive:
            raise Unavailable("the engine is not running", retry_after=5)  # why (self.failure) is logged, not sent
        timeout = request.timeout_s if request.timeout_s is not None else self.config.request_timeout_s
        if request.patch == AUTO:
            self._check_router()
        adapter, patch = self.registry.acquire(request.patch)
        deadline = None if timeout is None else time.monotonic() + timeout
        stream = Stream(request, adapter, patch, deadline)
        self.scheduler.enqueue(stream)
        return stream

    def _validate(self, request: GenRequest) -> None:
        p = request.params
        bad = p.problem()
        if bad:
            raise BadRequest(bad[1], param=bad[0])
        if not request.prompt_ids:
            raise BadRequest("the prompt is empty", param="prompt")
        vocab = self.model.get_input_embeddings().weight.shape[0]
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in request.prompt_ids):
            raise BadRequest(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        check_context(len(request.prompt_ids), p.max_tokens, self.max_length)
        for k in (request.logprobs, request.prompt_logprobs):
            if k is not None and not (isinstance(k, int) and 0 <= k <= MAX_LOGPROBS):
                raise BadRequest(f"logprobs must be an integer from 0 to {MAX_LOGPROBS}, got {k!r}", param="logprobs")

    def _check_router(self) -> None:
        """An `auto` request needs a router, and one that can route to every loaded patch (its `check`)."""
        if self.router is None:
            raise BadRequest(
                f"model '{AUTO}' needs a router, and none is configured; start the server with --router NAME "
                "or name a patch",
                param="model",
            )
        check = getattr(self.router, "check", None)
        if check is None:
            return
        try:
            check(self)
        except ServeError:
            raise
        except PortLLMError as e:
            raise BadRequest(str(e), param="model") from None

    def _route(self, requests: Sequence[GenRequest]) -> list[str | None]:
        """The scheduler's way to the router (on the worker thread)."""
        if self.router is None:
            raise PortLLMError("the router was removed")
        return list(self.router.route(self, requests))

    def generate(self, prompt: str, patch: str | None = None, **params: Any) -> Completion:
        """One request, blocking: the engine's text for `prompt` (params as SamplingParams)."""
        stop = params.pop("stop", ())
        sp = SamplingParams(stop=tuple([stop] if isinstance(stop, str) else stop), **params)
        return self.submit(GenRequest(self.encode(prompt), patch, sp, text=prompt)).result()

    # ------------------------------------------------------------ the worker

    @property
    def stats(self) -> dict[str, int]:
        return self.scheduler.stats

    @property
    def failure(self) -> str | None:
        """Why the worker died, if it did."""
        return self.scheduler.failure

    @property
    def alive(self) -> bool:
        return self.scheduler.alive

    @property
    def queued(self) -> int:
        return self.scheduler.queue.qsize()

    @property
    def running(self) -> int:
        return len(self.scheduler.rows)

    def start(self) -> Engine:
        self.scheduler.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Finish nothing more: running and waiting requests end with an error event."""
        self.scheduler.stop(timeout)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
