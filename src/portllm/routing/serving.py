"""Per-request routers for `portllm serve`: model `auto` picks ONE patch per request (or the base).

The serving engine runs one patch per row (PEFT's mixed-adapter batches), so a serving router chooses,
before a request's prefill, which loaded patch answers it. These routers are registered in
`routers.ROUTERS` with kind `per-request`, next to the per-token ones (glider, arrow, ...) that mix
patches inside every layer through a PatchSet, which the serving engine does not run:

- `description`: the cosine between the all-MiniLM-L6-v2 embedding of the request's text (a chat's last
  user message) and each patch's description embedding (`portllm describe`, kept in its manifest; a patch
  with a task and no description gets its task definition's); the top patch, or the base when the best
  cosine is below `threshold` (default 0.2; `threshold=-1`: never the base). Not GLIDER: no gates, no
  per-token mixing.
- `arrow-request`: Arrow decided once per request; the base runs once on the prompt (no patch) with hooks
  on every adapted layer; patch i's score is |x·p_i| averaged over the prompt's tokens (a leading BOS
  excluded: it carries outsized activations in many LLMs) and over the layers it adapts, p_i the top right
  singular vector of its B·A there (`routers.lora_prototype`); the top patch, never the base.

Neither answers with the base by default: with no patch loaded an `auto` request is refused (400), as it is
when a loaded patch cannot be routed to (no description; an all-zero update Arrow cannot read).

Knobs go after the name: `description:threshold=0.3`. What a router computes per patch (embeddings,
prototypes) is cached by patch name, weights checksum and PEFT adapter, so patches loaded or unloaded at
runtime are picked up at the next request. Each routed request gets `request.routing` = {"router", "patch",
"scores"} (the HTTP layer returns it) and a log line on the `portllm.routing.serving` logger.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import PortLLMError
from ..tasks import get_task
from .embed import ENCODER_NAME, encoder_path, shared_encoder
from .routers import KINDS, PER_REQUEST, ROUTERS, Knob, RouterBase, lora_prototype, register, router_names

log = logging.getLogger(__name__)


class ServeRouter(RouterBase):
    """Common part of the per-request routers: knobs (checked by RouterBase), the per-patch cache, the
    refusal when nothing can be routed to, and the report of each decision."""

    kind = PER_REQUEST

    def __init__(self, spec: str | None = None, **values: Any) -> None:
        super().__init__(**values)
        self.spec = spec or self.name
        self._lock = threading.Lock()
        self._cache: dict[tuple, Any] = {}

    def loaded(self, engine: Any) -> None:
        """One line when no patch is loaded: `auto` would otherwise always be answered by the base."""
        if not engine.patches:
            raise PortLLMError(
                f"router {self.name}: no patch is loaded to route to; load one (POST /v1/load_lora_adapter) or "
                "ask for the base by name"
            )

    def _per_patch(self, engine: Any, make: Any) -> dict[str, Any]:
        """name -> make(info) for every loaded patch, cached by (name, checksum, adapter); stale entries go."""
        out, keep = {}, set()
        for name, info in sorted(engine.patches.items()):
            key = (name, info.fingerprint, info.adapter)
            keep.add(key)
            if key not in self._cache:
                self._cache[key] = make(info)
            out[name] = self._cache[key]
        for key in [k for k in self._cache if k not in keep]:
            del self._cache[key]
        return out

    def _report(self, engine: Any, request: Any, patch: str | None, scores: dict[str, float]) -> None:
        request.routing = {"router": self.name, "patch": patch, "scores": {k: round(v, 4) for k, v in scores.items()}}
        shown = ", ".join(f"{k}={v:.3f}" for k, v in scores.items())
        log.info("auto -> %s (%s: %s)", patch or engine.name, self.name, shown or "no patches")


# ---------------------------------------------------------------- global: the request text against descriptions


def _cosine(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and -1 <= v <= 1


@register
class DescriptionRouter(ServeRouter):
    """Cosine of the request text's MiniLM embedding with each patch's description embedding; top-1, or the
    base below `threshold`. (Not GLIDER: no gates and no per-token mixing; `glider` is the per-token router.)"""

    name = "description"
    knobs = (Knob("threshold", 0.2, "best cosine below which the base answers", "a number in [-1, 1]", _cosine),)

    def __init__(self, spec: str | None = None, **values: Any) -> None:
        super().__init__(spec, **values)
        encoder_path()  # installed? (one line saying how, before any model loads)

    @staticmethod
    def _encoder() -> Any:
        return shared_encoder()

    def _embedding(self, info: Any) -> torch.Tensor | None:
        """The patch's description embedding (manifest), else its task definition's description, else None."""
        try:
            raw = json.loads((Path(info.path) / "portllm.json").read_text())
        except (OSError, ValueError):
            raw = {}
        extra = raw.get("extra") if isinstance(raw, dict) else None
        routing = extra.get("routing") if isinstance(extra, dict) else None
        routing = routing if isinstance(routing, dict) else {}
        emb = routing.get("embedding")
        if isinstance(emb, dict) and isinstance(emb.get("vector"), list) and emb.get("encoder") == ENCODER_NAME:
            return torch.nn.functional.normalize(torch.tensor(emb["vector"], dtype=torch.float32), dim=0)
        text = routing.get("description") if isinstance(routing.get("description"), str) else None
        task = raw.get("task") if isinstance(raw, dict) else None
        if not text and isinstance(task, str) and task:
            try:
                t = get_task(task)
                text = t.description or t.name
            except PortLLMError:
                text = None
        if not text:
            return None
        return self._encoder().encode([text])[0].float()

    def embeddings(self, engine: Any) -> tuple[list[str], torch.Tensor]:
        """The loaded patches' names and their (N, 384) unit embeddings; one line naming those without any."""
        self.loaded(engine)
        with self._lock:
            found = self._per_patch(engine, self._embedding)
        missing = [n for n, v in found.items() if v is None]
        if missing:
            raise PortLLMError(
                f"router {self.name}: patch(es) {', '.join(missing)} have no description and no known task; run "
                '`portllm describe PATCH "what it does"` and load them again (or unload them)'
            )
        names = list(found)
        return names, torch.stack([found[n] for n in names])

    def check(self, engine: Any) -> None:
        """Called when an `auto` request arrives: refuse it (400) with no patch, or a patch it cannot route to."""
        self.embeddings(engine)

    def route(self, engine: Any, requests: Sequence[Any]) -> list[str | None]:
        names, emb = self.embeddings(engine)
        texts = [request_text(engine, r) for r in requests]
        have = [t for t in texts if t]
        with self._lock:
            vecs = dict(zip(have, self._encoder().encode(have))) if have else {}
        out: list[str | None] = []
        for r, t in zip(requests, texts):
            if t in vecs:
                cos = (emb @ vecs[t].float()).tolist()
                scores = dict(zip(names, cos))
                best = max(range(len(names)), key=lambda i: cos[i])
                pick = names[best] if cos[best] >= self.values["threshold"] else None
            else:
                scores, pick = {}, None
            self._report(engine, r, pick, scores)
            out.append(pick)
        return out


def request_text(engine: Any, r: Any) -> str:
    """What the global router reads: a chat's last user message, else the prompt text, else its tokens decoded."""
    text = getattr(r, "route_text", None) or r.text
    if not text:
        text = engine.tokenizer.decode(r.prompt_ids, skip_special_tokens=True)
    return text.strip()


# ---------------------------------------------------------------- arrow: the base's layer inputs against prototypes


@register
class ArrowRequestRouter(ServeRouter):
    """Arrow once per request: |x·p_i| at each adapted layer (base forward, no patch), averaged over the prompt's
    tokens and layers; top-1, never the base. (The per-token Arrow, mixing patches inside every layer, is `arrow`.)"""

    name = "arrow-request"

    def _prototypes(self, engine: Any) -> Any:
        def make(info: Any) -> dict[str, torch.Tensor]:
            protos = {}
            for mname, mod in engine.model.named_modules():
                la, lb = getattr(mod, "lora_A", None), getattr(mod, "lora_B", None)
                if la is None or lb is None or info.adapter not in la or info.adapter not in lb:
                    continue
                a, b = la[info.adapter].weight, lb[info.adapter].weight
                if not hasattr(a, "dim") or a.dim() != 2 or float(b.detach().abs().max()) == 0:
                    continue  # not a linear LoRA, or an update of zero (no direction to read)
                protos[mname] = lora_prototype(a.detach().float().cpu(), b.detach().float().cpu())
            return protos

        return make

    def prototypes(self, engine: Any) -> dict[str, dict[str, torch.Tensor]]:
        """Each loaded patch's prototypes by layer; one line naming the patches Arrow cannot read (all-zero
        update, or no linear LoRA layer): they could never be chosen."""
        self.loaded(engine)
        with self._lock:
            protos = self._per_patch(engine, self._prototypes(engine))
        empty = [n for n, p in protos.items() if not p]
        if empty:
            raise PortLLMError(
                f"router {self.name}: patch(es) {', '.join(empty)} have no LoRA update to read a direction from "
                "(all-zero B, or no linear LoRA layer); unload them, or serve with --router description"
            )
        return protos

    def check(self, engine: Any) -> None:
        """Called when an `auto` request arrives: refuse it (400) with no patch, or a patch it cannot read."""
        self.prototypes(engine)

    def route(self, engine: Any, requests: Sequence[Any]) -> list[str | None]:
        protos = self.prototypes(engine)
        names = list(protos)
        layers = sorted({m for n in names for m in protos[n]})
        modules = dict(engine.model.named_modules())
        seen: dict[str, torch.Tensor] = {}

        def hook(mname: str) -> Any:
            def grab(_mod: Any, args: tuple, kwargs: dict) -> None:
                x = args[0] if args else kwargs.get("x")
                seen[mname] = x.detach()

            return grab

        ids, mask, pos, keep = _batch(engine, [r.prompt_ids for r in requests])
        handles = [modules[m].register_forward_pre_hook(hook(m), with_kwargs=True) for m in layers if m in modules]
        try:
            with engine.base_only():
                engine.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()
        total = torch.zeros(len(requests), len(names))
        count = torch.zeros(len(names))
        w = keep.float()
        for m in layers:
            if m not in seen:
                continue
            x = seen[m].float().cpu()  # (rows, T, d)
            idx = [i for i, n in enumerate(names) if m in protos[n]]
            p = torch.stack([protos[names[i]][m] for i in idx])  # (k, d)
            s = (x @ p.T).abs()  # (rows, T, k)
            mean = (s * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
            total[:, idx] += mean
            count[idx] += 1
        scores = total / count.clamp(min=1)
        out: list[str | None] = []
        for j, r in enumerate(requests):
            pick = names[int(scores[j].argmax())]
            self._report(engine, r, pick, dict(zip(names, scores[j].tolist())))
            out.append(pick)
        return out


def _batch(engine: Any, prompts: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """Left-padded ids, attention mask, position ids (as the engine's prefill), and the tokens to average
    over (not padding, not a leading BOS unless it is the whole prompt)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), engine.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, p in enumerate(prompts):
        ids[j, width - len(p) :] = torch.tensor(p)
        mask[j, width - len(p) :] = 1
    pos = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)
    keep = mask.clone()
    bos = list(getattr(engine, "bos", []) or [])
    for j, p in enumerate(prompts):
        if bos and len(p) > len(bos) and list(p[: len(bos)]) == bos:
            keep[j, width - len(p) : width - len(p) + len(bos)] = 0
    dev = engine.model.get_input_embeddings().weight.device
    return ids.to(dev), mask.to(dev), pos.to(dev), keep


# ---------------------------------------------------------------- the seam (names from routers.ROUTERS)


def parse_spec(spec: str) -> tuple[type[ServeRouter], dict[str, Any]]:
    """`NAME` or `NAME:knob=value,...` -> the per-request router class and its knob values; one line for
    anything else, a per-token router's name included (it says which names the server serves, and why)."""
    choose = ", ".join(router_names(PER_REQUEST))
    if not isinstance(spec, str) or not spec.strip():
        raise PortLLMError(f"--router needs a name: {choose}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    cls = ROUTERS.get(name)
    if cls is None:
        raise PortLLMError(f"--router {spec}: unknown router for serving; choose from {choose}")
    if cls.kind != PER_REQUEST:
        raise PortLLMError(
            f"--router {name}: the server picks one patch per request and serves {choose}; {name} "
            f"{KINDS[cls.kind]}, which the serving engine does not run"
        )
    knobs = {k.name: k for k in cls.knobs}
    values: dict[str, Any] = {}
    for part in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, val = (s.strip() for s in part.partition("="))
        if not eq or key not in knobs:
            takes = ", ".join(f"{k.name} ({k.rule})" for k in cls.knobs) or "none"
            raise PortLLMError(f"--router {spec}: {name} takes no {part!r}; its parameters: {takes}")
        try:
            values[key] = float(val)
        except ValueError:
            raise PortLLMError(f"--router {spec}: {key} must be {knobs[key].rule}, got {val!r}") from None
    return cls, values  # type: ignore[return-value]


def serve_router(name: str, engine: Any = None, **knobs: Any) -> ServeRouter:
    """The `RequestRouter` (serve/engine.py) called `name` (a per-request router: `description`,
    `arrow-request`; knobs as `description:threshold=0.3` or keywords). It reads the engine's patches at each
    request, so `engine` is not needed to build it."""
    cls, values = parse_spec(name)
    values.update({k: v for k, v in knobs.items() if v is not None})
    return cls(name.strip(), **values)
