"""Routers: how much of each patch every token (or row) of a request gets, one class each, in ONE registry.

Every router name resolves in `ROUTERS`, and each entry declares its kind (`KINDS`):
- per-token (`Router`, this module): mixes patches inside every adapted layer through a `PatchSet`
  (`portllm eval --patches`, `route-study`); built by `get_router`.
- per-request (`serving.ServeRouter`): picks one loaded patch per request before its prefill, for
  `portllm serve --router` (model `auto`); built by `serving.serve_router`. Each builder refuses the other
  kind with one line. Names are unique: `glider` is per-token GLIDER everywhere; the server's routers are
  `description` (request text vs patch descriptions) and `arrow-request` (Arrow, one patch per request).

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
it precomputes per set / per request); decorate with `@register`. The CLI options and the study read ROUTERS
(`router_names`). The package imports `serving`, so the registry holds both kinds once `portllm.routing` loads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import PortLLMError
from ..merge import clusters, similarity
from ..tasks import get_task
from .embed import shared_encoder
from .phatgoose import load_gates

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

PER_TOKEN = "per-token"
PER_REQUEST = "per-request"
KINDS = {  # what a router of each kind does, and where it runs (error messages say it)
    PER_TOKEN: "mixes patches per token inside every adapted layer (a PatchSet: portllm eval --patches, route-study)",
    PER_REQUEST: "picks one loaded patch per request before its prefill (portllm serve --router, model 'auto')",
}


class RouterBase:
    """What every registered router declares: its unique name, its kind (KINDS) and its knobs, checked here."""

    name: ClassVar[str]
    kind: ClassVar[str]
    knobs: ClassVar[tuple[Knob, ...]] = ()

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


class Router(RouterBase):
    """A per-token routing rule (through a PatchSet). `weights` gives (rows, seq or 1, N) or None (base only)."""

    kind = PER_TOKEN
    needs_text: ClassVar[bool] = False  # reads each row's request text (global router)
    needs_label: ClassVar[bool] = False  # reads each row's task label (oracle)
    needs_gates: ClassVar[bool] = False  # PHATGOOSE gates must be trained first

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


ROUTERS: dict[str, type[RouterBase]] = {}  # every router of every kind, by its unique name


def register(cls: type[RouterBase]) -> type[RouterBase]:
    """Add a router class to the registry (a class decorator); names are unique across kinds."""
    if cls.name in ROUTERS:
        raise ValueError(f"router {cls.name!r} is registered twice")
    if getattr(cls, "kind", None) not in KINDS:
        raise ValueError(f"router {cls.name!r} declares no kind ({' or '.join(KINDS)})")
    ROUTERS[cls.name] = cls
    return cls


def router_names(kind: str | None = None) -> list[str]:
    """The registered names, of one kind (PER_TOKEN, PER_REQUEST) or all, in registration order."""
    return [n for n, c in ROUTERS.items() if kind is None or c.kind == kind]


def router_class(name: str, kind: str | None = None) -> type[RouterBase]:
    """The class registered as `name`; with `kind`, one line refusing a router of the other kind."""
    cls = ROUTERS.get(name)
    if cls is None:
        raise PortLLMError(f"unknown router {name!r}; choose from {', '.join(router_names(kind))}")
    if kind is not None and cls.kind != kind:
        raise PortLLMError(
            f"router {name} {KINDS[cls.kind]}; this needs a {kind} router, which {KINDS[kind]}: "
            + ", ".join(router_names(kind))
        )
    return cls


def get_router(name: str, **values: Any) -> Router:
    """The per-token router called `name` with its knobs from `values` checked; None means the knob's default,
    and a knob the router does not take is an error (naming the router's knobs), not dropped."""
    cls = router_class(name, PER_TOKEN)
    return cls(**{k: v for k, v in values.items() if v is not None})  # type: ignore[return-value]


def topk_softmax(logits: torch.Tensor, k: int, temperature: float = 1.0) -> torch.Tensor:
    """Softmax over each row's k largest logits (the rest get 0); -inf logits (absent patches) get 0."""
    k = min(k, logits.shape[-1])
    if k == logits.shape[-1]:
        return torch.softmax(logits / temperature, dim=-1)
    top, idx = torch.topk(logits, k, dim=-1)
    full = torch.full_like(logits, float("-inf")).scatter(-1, idx, top)
    return torch.softmax(full / temperature, dim=-1)


def _per_row(router: str, cache: dict[str, Any], key: str, x: torch.Tensor, what: str) -> torch.Tensor:
    """The per-row tensor a router computed in `rows` for this forward pass; one line when there is none or it
    is for another number of rows (rather than quietly computing something else for those rows)."""
    t = cache.get(key)
    if t is None:
        raise PortLLMError(f"router {router} reads {what}: run the model inside PatchSet.rows([...]), a Request a row")
    if t.shape[0] != x.shape[0]:
        raise PortLLMError(f"router {router} has {what} for {t.shape[0]} rows, but the batch has {x.shape[0]}")
    return t


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
    try:
        return get_task(name).name
    except PortLLMError:
        return name


@register
class Oracle(Router):
    """Each row gets the patch made for its own task (the row's label); rows of other tasks get the base.
    Needs the task label, so it is a reference for evaluation, not a router for requests: a row without a
    label (and no patch chosen by the caller), or a forward pass whose rows it has no labels for, is an error."""

    name = "oracle"
    needs_label = True

    def rows(self, pset, reqs):
        w = torch.zeros(len(reqs), 1, pset.n)
        by_task = {_task_name(e.task): i for i, e in enumerate(pset.experts) if e.task}
        for j, r in enumerate(reqs):
            if r.patch is not None:
                continue  # the caller chose this row's patch (PatchSet overrides the router there)
            if not r.label:
                raise PortLLMError(f"router oracle needs each row's task label; row {j} has none (Request(label=...))")
            label = _task_name(r.label)
            if label in by_task:
                w[j, 0, by_task[label]] = 1.0
        return {"w": w}

    def weights(self, pset, layer, x, cache):
        return _per_row(self.name, cache, "w", x, "task labels (Request(label=...))").to(x.device)


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


def request_scores(router: str, pset: PatchSet, reqs: list[Request], targets: torch.Tensor) -> torch.Tensor:
    """(rows, 1, M) cosine of each row's request text with each target; a row with neither text nor a patch chosen
    by the caller is an error (its global term would silently be 0)."""
    bare = [j for j, r in enumerate(reqs) if not r.text and r.patch is None]
    if bare:
        raise PortLLMError(
            f"router {router} adds alpha * cosine(request text, description), and row {bare[0]} has no text; give "
            "Request(text=...) for every row, or alpha=0 to route by the local logits alone"
        )
    g = global_scores(pset, reqs, targets)
    return (torch.zeros(len(reqs), targets.shape[0]) if g is None else g)[:, None, :]


@register
class Glider(Router):
    """GLIDER (Li et al. 2024): local logits (PHATGOOSE gates, as GLIDER; or Arrow) + α · cos(request
    embedding, patch description embedding), the same bias at every token and layer; top-k softmax.
    Every patch needs a description and every row its request text; alpha=0 (explicitly) drops the global
    term and needs neither."""

    name = "glider"
    knobs = (TOP_K, TEMPERATURE, Knob("alpha", 10.0, ALPHA.help, ALPHA.rule, ALPHA.valid), LOCAL)

    @property
    def needs_gates(self) -> bool:  # type: ignore[override]
        return self.values["local"] == "phatgoose"

    @property
    def needs_text(self) -> bool:  # type: ignore[override]
        return self.values["alpha"] > 0

    def prepare(self, pset):
        self._emb = expert_embeddings(pset) if self.needs_text else None
        self._local = (Phatgoose if self.values["local"] == "phatgoose" else Arrow)(top_k=1)
        self._local.prepare(pset)

    def rows(self, pset, reqs):
        return {} if self._emb is None else {"g": request_scores(self.name, pset, reqs, self._emb)}

    def weights(self, pset, layer, x, cache):
        logits = self._local.logits(layer, x)
        if self._emb is not None:
            g = _per_row(self.name, cache, "g", x, "each row's request text (Request(text=...); or alpha=0)")
            logits = logits + self.values["alpha"] * g.to(logits.device, logits.dtype)
        return topk_softmax(logits, self.values["top_k"], self.values["temperature"])


# ---------------------------------------------------------------- Model-GLUE mixture


@register
class Mixture(Router):
    """Model-GLUE's mixture: cluster the patches by the cosine of their updates, merge each cluster
    (linearly: its members share the cluster's weight), route tokens between clusters by Arrow on each
    cluster's merged update plus α · cos(request, the cluster's mean description) when every patch has a
    description (then every row needs its request text, as for glider); without descriptions, Arrow alone."""

    name = "mixture"
    knobs = (Knob("top_k", 1, TOP_K.help, TOP_K.rule, TOP_K.valid), TEMPERATURE, THRESHOLD, ALPHA)

    def prepare(self, pset):
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
        self._emb = None  # no global term: some patch has no description, or alpha = 0
        if self.values["alpha"] > 0 and all(e.embedding is not None for e in pset.experts):
            e = expert_embeddings(pset)
            self._emb = torch.nn.functional.normalize(spread @ e, dim=-1)

    @property
    def needs_text(self) -> bool:  # type: ignore[override]
        return getattr(self, "_emb", None) is not None

    def params(self):
        return {**super().params(), "clusters": [[i for i in g] for g in getattr(self, "groups", [])]}

    def rows(self, pset, reqs):
        return {"g": request_scores(self.name, pset, reqs, self._emb)} if self.needs_text else {}

    def weights(self, pset, layer, x, cache):
        p, absent = self._protos[layer.index]
        logits = (x.to(p.dtype) @ p.T).abs().masked_fill(absent, float("-inf"))
        if self.needs_text:
            g = _per_row(self.name, cache, "g", x, "each row's request text (Request(text=...))")
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
