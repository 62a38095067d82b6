"""Routing for `portllm serve`: model `auto` picks ONE patch per request (or the base).

The serving engine runs one patch per row (PEFT's mixed-adapter batches), so a serving router chooses,
before a request's prefill, which loaded patch answers it:

- `glider` / `global`: the cosine between the all-MiniLM-L6-v2 embedding of the request's text (a chat's
  last user message) and each patch's description embedding (`portllm describe`, kept in its manifest; a
  patch with a task and no description gets its task definition's); the top patch, or the base when the
  best cosine is below `threshold` (default 0.2).
- `arrow`: training-free; the base runs once on the prompt (no patch) with hooks on every adapted layer;
  patch i's score is |x·p_i| averaged over the prompt's tokens (a leading BOS excluded: it carries outsized
  activations in many LLMs) and over the layers it adapts, p_i the top right singular vector of its B·A
  there (`routers.lora_prototype`); the top patch.

Knobs go after the name: `glider:threshold=0.3`. What a router computes per patch (embeddings, prototypes)
is cached by patch name, weights checksum and PEFT adapter, so patches loaded or unloaded at runtime are
picked up at the next request. Each routed request gets `request.routing` = {"router", "patch", "scores"}
(the HTTP layer returns it) and a log line on the `portllm.routing.serving` logger.
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

log = logging.getLogger(__name__)

TOKEN_LEVEL = ("phatgoose", "mixture", "uniform", "oracle", "none")  # the evaluation routers that do not fit here


class _ServeRouter:
    """Common part: name, knobs, the per-patch cache and the report of each decision."""

    name = ""
    knobs: dict[str, tuple[Any, str]] = {}  # knob -> (default, rule)

    def __init__(self, spec: str, **values: Any) -> None:
        self.spec = spec
        self.values = {k: values.get(k, d) for k, (d, _) in self.knobs.items()}
        self._lock = threading.Lock()
        self._cache: dict[tuple, Any] = {}

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


class GlobalRouter(_ServeRouter):
    """Cosine of the request text's MiniLM embedding with each patch's description embedding; top-1, or the
    base below `threshold`."""

    name = "glider"
    knobs = {"threshold": (0.2, "a number in [-1, 1]")}

    def __init__(self, spec: str, **values: Any) -> None:
        super().__init__(spec, **values)
        t = self.values["threshold"]
        if not isinstance(t, (int, float)) or not math.isfinite(t) or not -1 <= t <= 1:
            raise PortLLMError(f"router {spec}: threshold must be a number in [-1, 1], got {t!r}")
        from .embed import encoder_path

        encoder_path()  # installed? (one line saying how, before any model loads)

    @staticmethod
    def _encoder() -> Any:
        from .embed import shared_encoder

        return shared_encoder()

    def _embedding(self, info: Any) -> torch.Tensor | None:
        """The patch's description embedding (manifest), else its task definition's description, else None."""
        from .embed import ENCODER_NAME

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
            from ..tasks import get_task

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
        with self._lock:
            found = self._per_patch(engine, self._embedding)
        missing = [n for n, v in found.items() if v is None]
        if missing:
            raise PortLLMError(
                f"router {self.name}: patch(es) {', '.join(missing)} have no description and no known task; run "
                '`portllm describe PATCH "what it does"` and load them again (or unload them)'
            )
        names = list(found)
        return names, (torch.stack([found[n] for n in names]) if names else torch.zeros(0, 384))

    def check(self, engine: Any) -> None:
        """Called when an `auto` request arrives: refuse it (400) if a loaded patch cannot be routed to."""
        self.embeddings(engine)

    def route(self, engine: Any, requests: Sequence[Any]) -> list[str | None]:
        names, emb = self.embeddings(engine)
        texts = [request_text(engine, r) for r in requests]
        have = [t for t in texts if t]
        with self._lock:
            vecs = dict(zip(have, self._encoder().encode(have))) if have and names else {}
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


class ArrowRouter(_ServeRouter):
    """Arrow per request: |x·p_i| at each adapted layer (base forward, no patch), averaged over the prompt's
    tokens and layers; top-1."""

    name = "arrow"

    def _prototypes(self, engine: Any) -> Any:
        from .routers import lora_prototype

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

    def route(self, engine: Any, requests: Sequence[Any]) -> list[str | None]:
        from peft import PeftModel

        with self._lock:
            protos = self._per_patch(engine, self._prototypes(engine))
        names = [n for n, p in protos.items() if p]
        if not names or not isinstance(engine.model, PeftModel):
            for r in requests:
                self._report(engine, r, None, {})
            return [None] * len(requests)
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


# ---------------------------------------------------------------- the registry and the seam


SERVE_ROUTERS: dict[str, type[_ServeRouter]] = {"glider": GlobalRouter, "global": GlobalRouter, "arrow": ArrowRouter}


def parse_spec(spec: str) -> tuple[type[_ServeRouter], dict[str, Any]]:
    """`NAME` or `NAME:knob=value,...` -> the router class and its knob values; one line for anything else."""
    if not isinstance(spec, str) or not spec.strip():
        raise PortLLMError("--router needs a name: glider, global or arrow")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    choose = ", ".join(SERVE_ROUTERS)
    if name not in SERVE_ROUTERS:
        if name in TOKEN_LEVEL:
            raise PortLLMError(
                f"--router {name}: serving picks one patch per request, which {name} does not do; choose from {choose}"
            )
        raise PortLLMError(f"--router {spec}: unknown router for serving; choose from {choose}")
    cls = SERVE_ROUTERS[name]
    values: dict[str, Any] = {}
    for part in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, val = (s.strip() for s in part.partition("="))
        if not eq or key not in cls.knobs:
            takes = ", ".join(f"{k} ({r})" for k, (_, r) in cls.knobs.items()) or "none"
            raise PortLLMError(f"--router {spec}: {name} takes no {part!r}; its parameters: {takes}")
        try:
            values[key] = float(val)
        except ValueError:
            raise PortLLMError(f"--router {spec}: {key} must be {cls.knobs[key][1]}, got {val!r}") from None
    return cls, values


def serve_router(name: str, engine: Any = None, **knobs: Any) -> Any:
    """The `RequestRouter` (serve/engine.py) called `name` (`glider`, `global`, `arrow`; knobs as
    `glider:threshold=0.3` or keywords) for `engine`. It reads the engine's patches at each request."""
    cls, values = parse_spec(name)
    values.update({k: v for k, v in knobs.items() if v is not None})
    unknown = set(values) - set(cls.knobs)
    if unknown:
        raise PortLLMError(f"router {name}: takes no {', '.join(sorted(unknown))}")
    router = cls(name.strip(), **values)
    router.name = name.strip().partition(":")[0].lower()
    return router
