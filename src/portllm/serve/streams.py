"""A request as the engine takes it and its output as the caller reads it: `GenRequest` in, `Stream` of `Event`s out.

The worker thread puts events on a request's stream; the caller reads them blocking (iterate), from an
event loop (`events()`, woken by the worker without polling) or whole (`result()`). These types know
nothing of the model, so the HTTP layer and library callers share them.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .logprobs import TokenLogprob
from .sampling import SamplingParams

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
AUTO = "auto"  # the model name that asks the router to choose


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
    logprobs: int | None = None  # each sampled token's log-probability and this many alternatives (None: none)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (None: none)


@dataclass(frozen=True)
class Event:
    """A piece of a request's output. The last event has `finish_reason` set (and the totals)."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None  # stop, length, cancelled, timeout, error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens sampled in this event (an EOS that stopped it included)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # on a request's first event, when asked


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
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @classmethod
    def of(cls, events: list[Event], patch: str | None) -> Completion:
        """The events of one request, gathered (the last one has the finish reason and the totals)."""
        last = events[-1] if events else Event()
        prompt = next((e.prompt_logprobs for e in events if e.prompt_logprobs is not None), None)
        return cls(
            "".join(e.text for e in events),
            [t for e in events for t in e.token_ids],
            last.finish_reason or "error",
            last.prompt_tokens,
            last.completion_tokens,
            patch,
            last.error,
            [x for e in events for x in e.logprobs],
            None if prompt is None else list(prompt),
        )


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
        self._wake: Callable[[], Any] | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def put(self, ev: Event) -> None:
        """The worker's side: one more event (the last one has `finish_reason`); wakes an `events()` reader."""
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
        return Completion.of(list(self), self.patch)


async def merged(streams: list[Stream]) -> AsyncIterator[tuple[int, Event]]:
    """The events of several streams (a request's choices) as they come: (index of the stream, event)."""
    out: asyncio.Queue[tuple[int, Event] | None] = asyncio.Queue()

    async def pump(i: int, s: Stream) -> None:
        try:
            async for ev in s.events():
                await out.put((i, ev))
        finally:
            await out.put(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            item = await out.get()
            if item is None:
                running -= 1
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
