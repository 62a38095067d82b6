"""Many patches on one base: the base loaded once, each adapted linear layer holding every patch's factors stacked.

A `RoutedLinear` replaces an adapted `nn.Linear` in place and computes

    y = W x + Σ_i w_i · s_i · B_i A_i x

with all patches' A stacked into one (Σr, d_in) matrix and all B into one (d_out, Σr) matrix, so routing N
patches costs two small matmuls whatever N is, and the base weights exist once. The weights w come from a
router (per token: [rows, seq, N]) or from a per-row selection (one patch per row, or none): set them with
`PatchSet.rows(...)` around a forward pass. A patch without a module contributes nothing there (its rows
are absent from that layer's stack and routers give it no weight).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..check import check
from ..errors import PortLLMError
from ..eval import LM
from ..models import BaseRef, load_base
from ..patch import Patch
from ..sign import require_trusted

if TYPE_CHECKING:
    from .routers import Router  # for annotations only: routers -> phatgoose -> patchset would be a cycle


@dataclass(frozen=True)
class Request:
    """What one row of a batch is: its text (for the global router), a task label (the oracle only, for
    evaluation), or a patch chosen by the caller (index or name; overrides any router for that row)."""

    text: str | None = None
    label: str | None = None
    patch: int | str | None = None


class RoutedLinear(nn.Module):
    """An adapted linear layer of the shared base plus the stacked factors of every patch that adapts it."""

    def __init__(self, name: str, base: nn.Linear, owners: list[int], factors: list[tuple[torch.Tensor, ...]], pset):
        super().__init__()
        self.name = name
        self.base = base
        self.index = -1  # position among the set's layers (routers keep per-layer tensors in that order)
        self.present = sorted(set(owners))  # patches that adapt this layer
        a = torch.cat([A.float() for A, _, _ in factors], 0)  # (Σr, d_in)
        b = torch.cat([B.float() for _, B, _ in factors], 1)  # (d_out, Σr)
        owner = torch.cat([torch.full((A.shape[0],), i, dtype=torch.long) for i, (A, _, _) in zip(owners, factors)])
        scale = torch.cat([torch.full((A.shape[0],), float(s)) for A, _, s in factors])
        dev = base.weight.device
        self.register_buffer("A", a.to(dev), persistent=False)
        self.register_buffer("B", b.to(dev), persistent=False)
        self.register_buffer("owner", owner.to(dev), persistent=False)
        self.register_buffer("scale", scale.to(dev), persistent=False)
        self._pset = [pset]  # a list: not registered as a submodule (the set owns the model, not the reverse)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    def factors(self, i: int) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """Patch i's (A, B, scaling) in this layer, or None where it does not adapt it."""
        sel = self.owner == i
        if not bool(sel.any()):
            return None
        return self.A[sel], self.B[:, sel], float(self.scale[sel][0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        w = self._pset[0]._weights(self, x)
        if w is None:
            return y
        xa = x.to(self.A.dtype)
        z = xa @ self.A.T  # (..., Σr)
        coef = w.to(z.dtype)[..., self.owner] * self.scale  # (rows, seq or 1, Σr)
        # as PEFT: the fp32 update is added to the base output before casting back (not cast, then added)
        return (y + (z * coef) @ self.B.T).to(y.dtype)


@dataclass
class Expert:
    """One patch of the set, as routers see it."""

    name: str
    path: str | None
    task: str | None
    sha256: str | None
    description: str | None = None
    embedding: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class PatchSet:
    """N patches made on (or ported onto) one base, loaded once onto one copy of that base.

    Every patch is checked against the base (`check`, as `portllm eval --patch` does); one that does not
    fit is refused with the reason. `model` is the base's transformers model with the adapted linear
    layers wrapped; outside `rows(...)` (and with no default router) it computes the bare base.
    """

    def __init__(
        self,
        base: str | Path | BaseRef,
        patches: Sequence[str | Path | Patch],
        dtype: str = "float32",
        router: Router | None = None,
        require_signature: bool = False,
        trusted: list | None = None,
    ):
        if not patches:
            raise PortLLMError("a patch set needs at least one patch")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise PortLLMError(f"dtype {dtype!r} not supported; use float32 or bfloat16")
        ref = BaseRef.of(base)
        loaded: list[Patch] = []
        for p in patches:
            if isinstance(p, Patch):
                loaded.append(p)
                continue
            require_trusted(p, require_signature, trusted)
            loaded.append(Patch.load(p, require_manifest=False))
        for p in loaded:
            rep = check(p, ref)
            rep.require(
                "attach",
                f"patch {p.path} does not fit {ref.name}",
                "; port it onto this base first (`portllm port ... --as-adapter`)",
            )
            if rep.source_fingerprint and rep.source_fingerprint != rep.target_fingerprint:
                raise PortLLMError(
                    f"patch {p.path} was made on another base ({p.source_name}, fingerprint "
                    f"{rep.source_fingerprint[:16]}) than {ref.name} ({rep.target_fingerprint[:16]}); a patch set "
                    f"shares one base: port it first (portllm port {p.path} --base {ref.name} --out DIR --as-adapter)"
                )
            if p.full_weights:
                raise PortLLMError(
                    f"patch {p.path} replaces whole tensors ({next(iter(p.full_weights))}, modules_to_save); "
                    "a patch set shares one copy of the base, so only LoRA factors can be routed"
                )
            if bool(p.config.get("fan_in_fan_out")):
                raise PortLLMError(f"patch {p.path} is fan-in-fan-out (Conv1D); routing supports nn.Linear layers")
        self.ref = ref
        self.patches = loaded
        self.dtype = dtype
        self.experts = [_expert(p, i) for i, p in enumerate(loaded)]
        _unique_names(self.experts)
        model, tok = load_base(ref, dtype=dtype)
        if tok is None:
            raise PortLLMError(f"{ref.name} has no tokenizer; routing needs one")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.model, self.tokenizer = model, tok
        self.layers: list[RoutedLinear] = []
        self._wrap()
        self.router = router
        self.gate_config = None  # phatgoose.GateConfig for gates trained on demand (None: its defaults)
        self.data: str | Path | None = None  # task data directory for gate training (None: $PORTLLM_DATA)
        self.encoder_path: str | Path | None = None  # all-MiniLM-L6-v2 folder (None: embed.encoder_path's rule)
        self.log: Any = None  # callable(str) for notes such as "training gates"
        self._rows: list[Request] | None = None
        self._row_weights: torch.Tensor | None = None  # (rows, N) fixed selections; NaN where the router decides
        self._cache: dict[str, Any] = {}  # per forward pass: routers' per-row tensors
        self._requests: dict[Any, Request] = {}
        model.route_rows = self._route_keys  # evaluate.loglikelihoods calls it with each batch's row keys

    # ---------------------------------------------------------------- building

    def _wrap(self) -> None:
        names = sorted({n for p in self.patches for n in p.modules}, key=_natural_key)
        mods = dict(self.model.named_modules())
        for name in names:
            base = mods.get(name)
            if not isinstance(base, nn.Linear):
                raise PortLLMError(f"module {name} of {self.ref.name} is {type(base).__name__}, not a linear layer")
            owners, factors = [], []
            for i, p in enumerate(self.patches):
                m = p.modules.get(name)
                if m is not None:
                    owners.append(i)
                    factors.append((m.A, m.B, m.scaling))
            layer = RoutedLinear(name, base, owners, factors, self)
            layer.index = len(self.layers)
            parent, _, child = name.rpartition(".")
            setattr(mods[parent] if parent else self.model, child, layer)
            self.layers.append(layer)

    @property
    def n(self) -> int:
        return len(self.patches)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def index_of(self, patch: int | str) -> int:
        """A patch's position from its index, name, task or path."""
        if isinstance(patch, int) and not isinstance(patch, bool):
            if 0 <= patch < self.n:
                return patch
            raise PortLLMError(f"patch index {patch} is out of range (the set has {self.n})")
        for i, e in enumerate(self.experts):
            if patch in (e.name, e.task, e.path):
                return i
        raise PortLLMError(f"no patch {patch!r} in the set; it holds {', '.join(self.names)}")

    def set_hash(self) -> str:
        """Identity of the set: base fingerprint and each patch's weights, in order."""
        h = hashlib.sha256(self.ref.fingerprint.encode())
        for p in self.patches:
            h.update((p.weights_sha256 or tensor_digest(p)).encode())
        return h.hexdigest()[:16]

    def lm(self, router: Router | None = None) -> LM:
        """The set as an `evaluate.LM` (routed by `router`, or the set's own)."""
        if router is not None:
            self.use(router)
        cfg = getattr(self.model, "config", None)
        max_len = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
        label = ",".join(e.path or e.name for e in self.experts)
        return LM(self.model, self.tokenizer, self.ref.name, label, self.set_hash(), self.dtype, min(max_len, 4096))

    def use(self, router: Router | None) -> PatchSet:
        """Route with `router` from now on (None: the bare base); prepares it (prototypes, gates, embeddings)."""
        if router is not None:
            router.prepare(self)
        self.router = router
        return self

    # ---------------------------------------------------------------- per-row context

    @contextmanager
    def rows(self, requests: Sequence[Request | None]) -> Iterator[None]:
        """Within the block, row j of every forward pass is `requests[j]` (None: only the router decides)."""
        try:  # setting the rows may itself fail (a router's per-request step): nothing may outlive the block
            self._set_rows([r or Request() for r in requests])
            yield
        finally:
            self._rows, self._row_weights, self._cache = None, None, {}

    @contextmanager
    def requests(self, by_key: dict[Any, Request]) -> Iterator[None]:
        """Requests by the row keys `evaluate.loglikelihoods` reports (its share keys), for scoring."""
        self._requests = by_key
        try:
            yield
        finally:
            self._requests = {}
            self._rows, self._row_weights, self._cache = None, None, {}

    def _route_keys(self, keys: list[Any]) -> None:
        self._set_rows([self._requests.get(k, Request()) for k in keys])

    def _set_rows(self, reqs: list[Request]) -> None:
        fixed = torch.full((len(reqs), self.n), float("nan"))
        for j, r in enumerate(reqs):
            if r.patch is not None:
                fixed[j] = 0.0
                if r.patch != "none":
                    fixed[j, self.index_of(r.patch)] = 1.0
        self._rows = reqs
        self._row_weights = fixed if bool(~torch.isnan(fixed).all()) else None
        self._cache = {}
        if self.router is not None:
            self._cache = self.router.rows(self, reqs)

    def _weights(self, layer: RoutedLinear, x: torch.Tensor) -> torch.Tensor | None:
        """Per-token weights over the N patches for this layer's input x (rows, seq, d_in), or None (base only)."""
        w = None
        if self.router is not None:
            w = self.router.weights(self, layer, x, self._cache)
        fixed = self._row_weights
        if fixed is not None and fixed.shape[0] == x.shape[0]:
            f = fixed.to(x.device)[:, None, :]
            chosen = ~torch.isnan(f[..., :1])
            if w is None:
                w = torch.where(chosen, f, torch.zeros_like(f))
            else:
                w = torch.where(chosen, f.to(w.dtype), w)
        return w


def _expert(p: Patch, i: int) -> Expert:
    routing = p.extra.get("routing") if p.manifest else None
    routing = routing if isinstance(routing, dict) else {}
    name = p.path.name if p.path else (p.task or f"patch{i}")
    emb = routing.get("embedding")
    return Expert(
        name,
        str(p.path) if p.path else None,
        p.task,
        p.weights_sha256,
        routing.get("description") if isinstance(routing.get("description"), str) else None,
        list(emb["vector"]) if isinstance(emb, dict) and isinstance(emb.get("vector"), list) else None,
        {"encoder": emb.get("encoder")} if isinstance(emb, dict) else {},
    )


def _unique_names(experts: list[Expert]) -> None:
    seen: dict[str, int] = {}
    for e in experts:
        if e.name in seen:
            seen[e.name] += 1
            e.name = f"{e.name}#{seen[e.name]}"
        else:
            seen[e.name] = 0


def tensor_digest(p: Patch) -> str:
    """sha256 of a patch's tensors (names and fp32 values): its identity when no manifest checksum covers them."""
    h = hashlib.sha256()
    for k in sorted(p.tensors):
        h.update(k.encode())
        h.update(p.tensors[k].float().numpy().tobytes())
    return h.hexdigest()


def _natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
