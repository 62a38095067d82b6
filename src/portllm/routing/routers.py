"""Routers: how much of each patch every token (or row) of a request gets, one class each, in a registry.

Local routers score tokens at each adapted layer from that layer's input x:
- `arrow`: training-free; each patch's prototype is the top right singular vector of its B·A in that layer,
  the score |x·p| (sign-agnostic), top-k then softmax(score / temperature) (PEFT 0.21's Arrow, exactly).
- `phatgoose`: one trained gate vector per patch per layer (phatgoose.py); the score is the standardized
  x against the standardized gate, / √d, top-k softmax (PHATGOOSE's inference rule).
The global router embeds the request text and each patch's description (embed.py, describe.py):
- `glider`: local logits (PHATGOOSE gates, as GLIDER; or Arrow) + α · cos(request, patch), top-k softmax.
- `mixture` (Model-GLUE): patches clustered by the cosine of their updates (merge.similarity/clusters),
  each cluster merged linearly, tokens routed between clusters (Arrow on the cluster's merged update
  + α · cos to the cluster's mean description). A linear merge of a cluster is exactly the members sharing
  the cluster's weight equally, so it runs on the stacked factors with no copy and no rank cut.
Row-level references: `oracle` (the row's own task's patch; needs the task label: evaluation only),
`uniform` (every patch 1/N: the linear average), `none` (the bare base).

Adding a router: subclass `Router`, set `name`, `knobs`, implement `weights` (and `prepare` / `rows` when
it precomputes per set / per request); decorate with `@register`. The CLI options and the study read ROUTERS.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import PortLLMError

if TYPE_CHECKING:
    from .patchset import PatchSet, Request, RoutedLinear


@dataclass(frozen=True)
class Knob:
    """A router parameter: name, default, help, and the rule a value must satisfy."""

    name: str
    default: Any
    help: str
    rule: str
    valid: Callable[[Any], bool]


TOP_K = Knob("top_k", 2, "patches mixed per token", "an integer >= 1", lambda v: isinstance(v, int) and v >= 1)
TEMPERATURE = Knob("temperature", 1.0, "softmax temperature", "finite and > 0", lambda v: math.isfinite(v) and v > 0)
ALPHA = Knob(
    "alpha", 1.0, "weight of the global (description) bias", "finite and >= 0", lambda v: math.isfinite(v) and v >= 0
)
LOCAL = Knob("local", "phatgoose", "local router: phatgoose or arrow", "phatgoose or arrow", lambda v: v in LOCALS)
THRESHOLD = Knob(
    "threshold", 0.3, "cosine at or above which patches share a cluster", "in [-1, 1]", lambda v: -1 <= v <= 1
)
LOCALS = ("phatgoose", "arrow")


class Router:
    """One routing rule with its knob values checked. `weights` gives (rows, seq or 1, N) or None (base only)."""

    name: ClassVar[str]
    knobs: ClassVar[tuple[Knob, ...]] = ()
    needs_text: ClassVar[bool] = False  # reads each row's request text (global router)
    needs_label: ClassVar[bool] = False  # reads each row's task label (oracle)
    needs_gates: ClassVar[bool] = False  # PHATGOOSE gates must be trained first

    def __init__(self, **values: Any) -> None:
        unknown = set(values) - {k.name for k in self.knobs}
        if unknown:
            raise PortLLMError(
                f"router {self.name} takes no {', '.join(sorted(unknown))}; its parameters: "
                f"{', '.join(k.name for k in self.knobs) or 'none'}"
            )
        own = {k.name: values.get(k.name, k.default) for k in self.knobs}
        for k in self.knobs:
            if own[k.name] is None:
                own[k.name] = k.default
            if not k.valid(own[k.name]):
                raise PortLLMError(f"router {self.name}: {k.name} must be {k.rule}, got {own[k.name]!r}")
        self.values = own

    @classmethod
    def summary(cls) -> str:
        return " ".join((cls.__doc__ or "").split())

    def params(self) -> dict[str, Any]:
        """The values used, for reports."""
        return {"router": self.name, **self.values}

    def prepare(self, pset: PatchSet) -> None:
        """Precompute what does not depend on the request (prototypes, gates, embeddings)."""

    def rows(self, pset: PatchSet, reqs: list[Request]) -> dict[str, Any]:
        """Per-forward state from the rows' requests (e.g. global scores)."""
        return {}

    def weights(self, pset: PatchSet, layer: RoutedLinear, x: torch.Tensor, cache: dict[str, Any]):
        raise NotImplementedError

    @property
    def top_k(self) -> int:
        return int(self.values.get("top_k", 1))


ROUTERS: dict[str, type[Router]] = {}


def register(cls: type[Router]) -> type[Router]:
    if cls.name in ROUTERS:
        raise ValueError(f"router {cls.name!r} is registered twice")
    ROUTERS[cls.name] = cls
    return cls


def get_router(name: str, **values: Any) -> Router:
    """The router called `name` with its knobs from `values` (None = default) checked."""
    if name not in ROUTERS:
        raise PortLLMError(f"unknown router {name!r}; choose from {', '.join(ROUTERS)}")
    cls = ROUTERS[name]
    own = {k.name for k in cls.knobs}
    return cls(**{k: v for k, v in values.items() if k in own and v is not None})


def topk_softmax(logits: torch.Tensor, k: int, temperature: float = 1.0) -> torch.Tensor:
    """Softmax over each row's k largest logits (the rest get 0); -inf logits (absent patches) get 0."""
    k = min(k, logits.shape[-1])
    if k == logits.shape[-1]:
        return torch.softmax(logits / temperature, dim=-1)
    top, idx = torch.topk(logits, k, dim=-1)
    full = torch.full_like(logits, float("-inf")).scatter(-1, idx, top)
    return torch.softmax(full / temperature, dim=-1)


def _absent(pset: PatchSet, layer: RoutedLinear) -> torch.Tensor:
    """(N,) bool: patches without this layer."""
    mask = torch.ones(pset.n, dtype=torch.bool)
    mask[layer.present] = False
    return mask


# ---------------------------------------------------------------- references


@register
class NoRouter(Router):
    """The bare base: no patch."""

    name = "none"

    def weights(self, pset, layer, x, cache):
        return None


@register
class Uniform(Router):
    """Every patch with weight 1/N: the linear average of the patches (their linear merge), unrouted."""

    name = "uniform"

    def weights(self, pset, layer, x, cache):
        return torch.full((1, 1, pset.n), 1.0 / pset.n, device=x.device)


def _task_name(name: str) -> str:
    """The registry's name for a task ("SST2" in a manifest is the task sst2), else the name as given."""
    from ..tasks import get_task

    try:
        return get_task(name).name
    except PortLLMError:
        return name


@register
class Oracle(Router):
    """Each row gets the patch made for its own task (the row's label); rows of other tasks get the base.
    Needs the task label, so it is a reference for evaluation, not a router for requests."""

    name = "oracle"
    needs_label = True

    def rows(self, pset, reqs):
        w = torch.zeros(len(reqs), 1, pset.n)
        by_task = {_task_name(e.task): i for i, e in enumerate(pset.experts) if e.task}
        for j, r in enumerate(reqs):
            label = _task_name(r.label) if r.label else None
            if label in by_task:
                w[j, 0, by_task[label]] = 1.0
        return {"w": w}

    def weights(self, pset, layer, x, cache):
        w = cache.get("w")
        return w.to(x.device) if w is not None and w.shape[0] == x.shape[0] else None


# ---------------------------------------------------------------- local routers


def lora_prototype(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Top right singular vector of B·A (unit, sign arbitrary), exactly, without forming B·A: QR of Aᵀ."""
    q, r = torch.linalg.qr(A.double().T)  # Aᵀ = QR, so B·A = (B Rᵀ) Qᵀ
    _, _, vh = torch.linalg.svd(B.double() @ r.T, full_matrices=False)
    return (q @ vh[0]).float()


def stacked_prototype(parts: list[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """Top right singular vector of Σ s_i B_i A_i (a cluster's linear merge), from the stacked factors."""
    A = torch.cat([a for a, _, _ in parts], 0)
    B = torch.cat([b * s for _, b, s in parts], 1)
    return lora_prototype(A, B)


@register
class Arrow(Router):
    """Training-free (Arrow, Ostapenko et al. 2024): per token, |x·p_i| with p_i the top right singular
    vector of patch i's B·A in this layer; top-k, softmax(score / temperature). Equals PEFT 0.21's Arrow."""

    name = "arrow"
    knobs = (Knob("top_k", 3, TOP_K.help, TOP_K.rule, TOP_K.valid), TEMPERATURE)

    def prepare(self, pset):
        protos = []
        for layer in pset.layers:
            p = torch.zeros(pset.n, layer.in_features)
            for i in layer.present:
                a, b, _ = layer.factors(i)
                p[i] = lora_prototype(a, b)
            protos.append((p.to(layer.A.device), _absent(pset, layer).to(layer.A.device)))
        self._protos = protos

    def logits(self, layer, x):
        p, absent = self._protos[layer.index]
        return (x.to(p.dtype) @ p.T).abs().masked_fill(absent, float("-inf"))

    def weights(self, pset, layer, x, cache):
        return topk_softmax(self.logits(layer, x), self.values["top_k"], self.values["temperature"])


def standardize(v: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance along the last axis (LayerNorm without affine), as PHATGOOSE routes."""
    return torch.nn.functional.layer_norm(v, v.shape[-1:], eps=1e-5)


@register
class Phatgoose(Router):
    """PHATGOOSE (Muqeeth et al. 2024): a gate vector per patch per layer, trained with the patch and base
    frozen (phatgoose.py); per token, standardized x · standardized gate / √d; top-k softmax."""

    name = "phatgoose"
    knobs = (TOP_K, TEMPERATURE)
    needs_gates = True

    def prepare(self, pset):
        from .phatgoose import load_gates

        gates = load_gates(pset)
        self._gates = []
        for layer in pset.layers:
            g = torch.zeros(pset.n, layer.in_features)
            for i in layer.present:
                g[i] = standardize(gates[i][layer.name].float())
            self._gates.append((g.to(layer.A.device), _absent(pset, layer).to(layer.A.device)))

    def logits(self, layer, x):
        g, absent = self._gates[layer.index]
        s = standardize(x.to(g.dtype)) @ g.T / math.sqrt(g.shape[-1])
        return s.masked_fill(absent, float("-inf"))

    def weights(self, pset, layer, x, cache):
        return topk_softmax(self.logits(layer, x), self.values["top_k"], self.values["temperature"])


# ---------------------------------------------------------------- global router


def expert_embeddings(pset: PatchSet) -> torch.Tensor:
    """(N, 384) unit vectors from the manifests; refuses, by name, a patch with no description."""
    missing = [e.path or e.name for e in pset.experts if e.embedding is None]
    if missing:
        raise PortLLMError(
            f"patch {missing[0]} has no description for the global router"
            + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
            + '; run `portllm describe PATCH "what it does"` (or `portllm describe PATCH` for its task\'s)'
        )
    return torch.nn.functional.normalize(torch.tensor([e.embedding for e in pset.experts]), dim=-1)


def global_scores(pset: PatchSet, reqs: list[Request], targets: torch.Tensor) -> torch.Tensor | None:
    """(rows, M) cosine of each row's request text with each target embedding (0 for a row without text)."""
    from .embed import shared_encoder

    texts = [r.text for r in reqs]
    if not any(texts):
        return None
    enc = shared_encoder(getattr(pset, "encoder_path", None))
    have = [t for t in texts if t]
    vecs = dict(zip(have, enc.encode(have)))
    out = torch.zeros(len(reqs), targets.shape[0])
    for j, t in enumerate(texts):
        if t:
            out[j] = targets @ vecs[t]
    return out


@register
class Glider(Router):
    """GLIDER (Li et al. 2024): local logits (PHATGOOSE gates, as GLIDER; or Arrow) + α · cos(request
    embedding, patch description embedding), the same bias at every token and layer; top-k softmax."""

    name = "glider"
    knobs = (TOP_K, TEMPERATURE, Knob("alpha", 10.0, ALPHA.help, ALPHA.rule, ALPHA.valid), LOCAL)
    needs_text = True

    @property
    def needs_gates(self) -> bool:  # type: ignore[override]
        return self.values["local"] == "phatgoose"

    def prepare(self, pset):
        self._emb = expert_embeddings(pset)
        self._local = (Phatgoose if self.values["local"] == "phatgoose" else Arrow)(top_k=1)
        self._local.prepare(pset)

    def rows(self, pset, reqs):
        g = global_scores(pset, reqs, self._emb)
        return {} if g is None else {"g": g[:, None, :]}

    def weights(self, pset, layer, x, cache):
        logits = self._local.logits(layer, x)
        g = cache.get("g")
        if g is not None and g.shape[0] == x.shape[0]:
            logits = logits + self.values["alpha"] * g.to(logits.device, logits.dtype)
        return topk_softmax(logits, self.values["top_k"], self.values["temperature"])


# ---------------------------------------------------------------- Model-GLUE mixture


@register
class Mixture(Router):
    """Model-GLUE's mixture: cluster the patches by the cosine of their updates, merge each cluster
    (linearly: its members share the cluster's weight), route tokens between clusters by Arrow on each
    cluster's merged update plus α · cos(request, the cluster's mean description) when descriptions exist."""

    name = "mixture"
    knobs = (Knob("top_k", 1, TOP_K.help, TOP_K.rule, TOP_K.valid), TEMPERATURE, THRESHOLD, ALPHA)

    def prepare(self, pset):
        from ..merge import clusters, similarity

        self.sim = similarity(pset.patches)
        self.groups = clusters(self.sim, self.values["threshold"])
        m = len(self.groups)
        spread = torch.zeros(m, pset.n)  # cluster weight -> member weights (linear merge: equal shares)
        for c, g in enumerate(self.groups):
            spread[c, g] = 1.0 / len(g)
        self._spread = spread
        self._protos = []
        for layer in pset.layers:
            p = torch.zeros(m, layer.in_features)
            absent = torch.ones(m, dtype=torch.bool)
            for c, g in enumerate(self.groups):
                parts = [f for i in g if (f := layer.factors(i)) is not None]
                if parts:
                    p[c] = stacked_prototype([(a, b, s / len(g)) for a, b, s in parts])
                    absent[c] = False
            self._protos.append((p.to(layer.A.device), absent.to(layer.A.device)))
        self._emb = None
        if all(e.embedding is not None for e in pset.experts):
            e = expert_embeddings(pset)
            self._emb = torch.nn.functional.normalize(spread @ e, dim=-1)

    def params(self):
        return {**super().params(), "clusters": [[i for i in g] for g in getattr(self, "groups", [])]}

    def rows(self, pset, reqs):
        if self._emb is None:
            return {}
        g = global_scores(pset, reqs, self._emb)
        return {} if g is None else {"g": g[:, None, :]}

    def weights(self, pset, layer, x, cache):
        p, absent = self._protos[layer.index]
        logits = (x.to(p.dtype) @ p.T).abs().masked_fill(absent, float("-inf"))
        g = cache.get("g")
        if g is not None and g.shape[0] == x.shape[0]:
            logits = logits + self.values["alpha"] * g.to(logits.device, logits.dtype)
        wc = topk_softmax(logits, self.values["top_k"], self.values["temperature"])
        return wc @ self._spread.to(wc.device)


def router_from(spec: Mapping[str, Any]) -> Router:
    """A router from a dict {"router": name, knob: value, ...} (reports and the study's configs)."""
    d = dict(spec)
    name = d.pop("router", None)
    if not isinstance(name, str):
        raise PortLLMError(f"a router spec needs a 'router' name, got {spec!r:.80}")
    d.pop("clusters", None)
    return get_router(name, **d)
