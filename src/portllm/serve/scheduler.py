"""Continuous batching on one worker thread: every waiting request joins the running batch at the next step.

One worker thread owns the model. Requests wait in a bounded queue; at each step the worker takes
what has arrived (up to `max_batch` rows in flight), routes the `auto` ones, prefills the newcomers
together and merges them into the running batch (their KV cache is left-padded to the batch's,
`kvcache.BatchCache`), then runs one decode step for every row. Each row names its own patch: PEFT's
mixed-adapter forward (`adapter_names=[...]`, `__base__` for none) applies to each row only its own
B·A, so requests for different patches share the base's forward pass. Rows leave the batch when they
finish, are cancelled or time out.

Greedy outputs do not depend on who else is in the batch: left padding is masked, every row carries
its own position ids, and a row's LoRA update is computed on its rows only. Rounding differences
from a wider matrix product remain possible in principle (tests compare token ids).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import PortLLMError
from .detokenize import Detokenizer, decode_spec
from .errors import Overloaded
from .kvcache import BatchCache, cache_keyword
from .logprobs import TokenLogprob, prompt_logprobs, sampled_logprobs
from .patches import PatchRegistry
from .sampling import next_tokens, row_generator, safe_end, stop_at
from .streams import AUTO, Event, GenRequest, Stream

Router = Callable[[Sequence[GenRequest]], list]  # `auto` requests -> one patch name (or None) each


@dataclass
class Row:
    """A request in the running batch."""

    stream: Stream
    gen: torch.Generator | None
    next_pos: int
    detok: Detokenizer
    sampled: int = 0
    pending: int | None = None  # sampled, not yet fed to the model
    held: str = ""  # decoded, not yet sent: it may still become a stop string
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # sent with the row's first event
    done: bool = False


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts as one left-padded batch: token ids, attention mask, position ids (as transformers' generate)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, p in enumerate(prompts):
        ids[j, width - len(p) :] = torch.tensor(p)
        mask[j, width - len(p) :] = 1
    pos = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)
    return ids, mask, pos


class Scheduler:
    """The request queue, the worker thread and the running batch of one engine."""

    def __init__(
        self, registry: PatchRegistry, tokenizer: Any, eos: set[int], max_batch: int, max_queue: int, router: Router
    ) -> None:
        self.registry = registry
        self.tokenizer = tokenizer
        self.decoding = decode_spec(tokenizer)  # each row's text is decoded incrementally (detokenize.py)
        self.eos = eos
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.router = router
        self.cache_kw = cache_keyword(registry.model)
        self.queue: queue.Queue[Stream] = queue.Queue(maxsize=max_queue)
        self.rows: list[Row] = []
        self.kv: BatchCache | None = None
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.failure: str | None = None  # why the worker died, if it did
        self.stats = {"requests": 0, "steps": 0, "rows": 0, "completion_tokens": 0, "max_rows": 0, "cancelled": 0}

    # ------------------------------------------------------------ the caller's side

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and not self.stopping

    def enqueue(self, stream: Stream) -> None:
        """Queue a stream whose adapter is already held; Overloaded (and released) when the queue is full."""
        try:
            self.queue.put_nowait(stream)
        except queue.Full:
            self.registry.release(stream.adapter)
            raise Overloaded(
                f"the server is at capacity ({self.max_queue} requests waiting); retry shortly", retry_after=1
            ) from None
        self.stats["requests"] += 1

    def start(self) -> None:
        if self.thread is None:
            self.stopping = False
            self.thread = threading.Thread(target=self.work, name="portllm-engine", daemon=True)
            self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish nothing more: running and waiting requests end with an error event."""
        self.stopping = True
        if self.thread is not None:
            self.thread.join(timeout)
        self._fail_rows("the server is shutting down")
        while True:
            try:
                s = self.queue.get_nowait()
            except queue.Empty:
                break
            self.finish(s, Event(finish_reason="error", error="the server is shutting down"))
        self.thread = None

    def finish(self, s: Stream, ev: Event) -> None:
        """The stream's last event; its adapter is released."""
        if ev.finish_reason == "cancelled":
            self.stats["cancelled"] += 1
        self.registry.release(s.adapter)
        s.put(ev)

    # ------------------------------------------------------------ the worker

    def work(self) -> None:
        """The worker thread: admit, step, until stopped (a subclass may run requests differently)."""
        try:
            with torch.inference_mode():
                while not self.stopping:
                    self.registry.reap()
                    new = self._admit()
                    if not new and not self.rows:
                        continue
                    with self.registry.model_lock:
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
        room = self.max_batch - len(self.rows)
        if self.rows and self.kv is not None and not self.kv.joinable:
            room = 0
        out: list[Stream] = []
        while len(out) < room:
            try:
                s = self.queue.get(timeout=0.05) if not out and not self.rows else self.queue.get_nowait()
            except queue.Empty:
                break
            if s.cancelled:
                self.finish(s, Event(finish_reason="cancelled"))
            elif s.deadline is not None and time.monotonic() > s.deadline:
                self.finish(s, Event(finish_reason="timeout", error="timed out waiting in the queue"))
            else:
                out.append(s)
        return out

    def _step(self, new: list[Stream]) -> None:
        if new:
            new = self._route(new)
        # a row that wants its prompt's log-probabilities is prefilled alone: its logits at every prompt position
        # (prompt × vocab) are kept, and only its own
        for group in [[s] for s in new if s.request.prompt_logprobs is not None] + [
            [s for s in new if s.request.prompt_logprobs is None]
        ]:
            if group:
                self._prefill(group)
        self._drop_ended()
        if self.rows:
            self._decode()
        self.stats["steps"] += 1

    def _route(self, new: list[Stream]) -> list[Stream]:
        """The router's patch for each `auto` newcomer; a router that fails, or names a patch that is not
        loaded, fails those requests only."""
        streams = [s for s in new if s.adapter == AUTO]
        if not streams:
            return new
        try:
            names = list(self.router([s.request for s in streams]))
            if len(names) != len(streams):
                raise PortLLMError(f"the router answered {len(names)} names for {len(streams)} requests")
        except Exception as e:
            for s in streams:
                self.finish(s, Event(finish_reason="error", error=f"routing failed: {_first_line(e)}"))
            return [s for s in new if s.adapter != AUTO]
        failed = set()
        for s, name in zip(streams, names):
            try:
                s.adapter, s.patch = self.registry.reassign(AUTO, name), name
            except PortLLMError as e:
                self.finish(s, Event(finish_reason="error", error=f"routing failed: {_first_line(e)}"))
                failed.add(s.id)
        return [s for s in new if s.id not in failed]

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any, rows: list[Row], keep: int = 1
    ) -> Any:
        """One pass for the batch; the one place where each row's patch reaches the model (PEFT's
        `adapter_names`). A per-token router replaces this: same rows, its own mixing inside the layers."""
        return self.registry.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **{self.cache_kw: cache},
            logits_to_keep=keep,
            **self.registry.adapter_names([r.stream.adapter for r in rows]),
        )

    @property
    def _device(self) -> torch.device:
        return self.registry.model.get_input_embeddings().weight.device

    def _prefill(self, streams: list[Stream]) -> None:
        """The newcomers' prompts in one left-padded pass; their cache then joins the running batch's."""
        prompts = [s.request.prompt_ids for s in streams]
        ids, mask, pos = left_padded(prompts, self.tokenizer.pad_token_id)
        rows = [
            Row(s, row_generator(s.request.params), len(p), Detokenizer(self.decoding))
            for s, p in zip(streams, prompts)
        ]
        scored = [j for j, s in enumerate(streams) if s.request.prompt_logprobs is not None]
        dev = self._device
        keep = max((len(prompts[j]) for j in scored), default=1)
        out = self._forward(ids.to(dev), mask.to(dev), pos.to(dev), None, rows, keep)
        for j in scored:
            k = streams[j].request.prompt_logprobs or 0
            rows[j].prompt_logprobs = tuple(prompt_logprobs(out.logits[j], prompts[j], k))
        self._accept(rows, out.logits[:, -1])
        keep = [j for j, r in enumerate(rows) if not r.done]
        if not keep:
            return
        kv = BatchCache(getattr(out, self.cache_kw), mask.to(dev))
        if len(keep) < len(rows):
            kv.keep(keep)
        rows = [rows[j] for j in keep]
        if self.rows and self.kv is not None:
            self.kv.join(kv)
            self.rows += rows
        else:
            self.kv, self.rows = kv, rows
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self.rows))

    def _decode(self) -> None:
        rows, kv = self.rows, self.kv
        assert kv is not None  # rows in the batch always have their cache
        dev = self._device
        ids = torch.tensor([[r.pending] for r in rows], device=dev)
        pos = torch.tensor([[r.next_pos] for r in rows], device=dev)
        out = self._forward(ids, kv.grow(), pos, kv.cache, rows)
        kv.cache = getattr(out, self.cache_kw)
        for r in rows:
            r.next_pos += 1
        self._accept(rows, out.logits[:, -1])
        self.stats["rows"] += len(rows)
        self._drop_ended()

    def _accept(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Sample each row's next token, emit its new text, mark the rows that finished."""
        tokens = next_tokens(logits, [r.stream.request.params for r in rows], [r.gen for r in rows])
        lps = sampled_logprobs(logits, tokens, [r.stream.request.logprobs for r in rows])
        for r, tok, lp in zip(rows, tokens, lps):
            r.sampled += 1
            r.pending = tok
            self._emit(r, tok, lp)

    def _emit(self, r: Row, tok: int, lp: TokenLogprob | None) -> None:
        """The row's new text (decoded incrementally, held back while it may become a stop string), and
        its end: EOS, a stop string or max_tokens."""
        p = r.stream.request.params
        stopped = tok in self.eos and not p.ignore_eos
        reason = "stop" if stopped else None
        if not stopped:
            r.held += r.detok.add(tok)
        if reason is None and r.sampled >= p.max_tokens:
            reason = "length"
        if reason is not None:
            r.held += r.detok.flush()
        cut = stop_at(r.held, p.stop)
        if cut >= 0:
            r.held, reason = r.held[:cut], "stop"
        ids = () if stopped else (tok,)
        extra = {"logprobs": () if lp is None else (lp,), "prompt_logprobs": r.prompt_logprobs}
        r.prompt_logprobs = None
        if reason is None:
            end = safe_end(r.held, p.stop)
            text, r.held = r.held[:end], r.held[end:]
            r.stream.put(Event(text, ids, **extra))
            return
        r.done = True
        self.stats["completion_tokens"] += r.sampled
        final = Event(r.held, ids, reason, len(r.stream.request.prompt_ids), r.sampled, **extra)
        r.held = ""
        self.finish(r.stream, final)

    def _drop_ended(self) -> None:
        """Rows that finished, were cancelled or ran out of time leave the batch (and their cache rows)."""
        now = time.monotonic()
        for r in self.rows:
            if r.done:
                continue
            s = r.stream
            if s.cancelled:
                r.done = True
                self.finish(s, Event(finish_reason="cancelled", completion_tokens=r.sampled))
            elif s.deadline is not None and now > s.deadline:
                r.done = True
                self.finish(
                    s,
                    Event(
                        finish_reason="timeout",
                        error="the request took longer than the server's timeout",
                        prompt_tokens=len(s.request.prompt_ids),
                        completion_tokens=r.sampled,
                    ),
                )
        keep = [j for j, r in enumerate(self.rows) if not r.done]
        if len(keep) == len(self.rows):
            return
        if not keep or self.kv is None:
            self.rows, self.kv = [], None
            return
        self.kv.keep(keep)
        self.rows = [self.rows[j] for j in keep]

    def _fail_rows(self, message: str, extra: Sequence[Stream] = ()) -> None:
        for s in [r.stream for r in self.rows] + list(extra):
            if not s.done.is_set():
                self.finish(s, Event(finish_reason="error", error=message))
        self.rows, self.kv = [], None


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0][:300] if str(e) else e.__class__.__name__
