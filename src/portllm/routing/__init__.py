"""Many patches, one base: route each request (and each token) to the right patches.

Layout: `patchset` (the base loaded once, every adapted linear layer holding all patches' factors
stacked; per-row selection), `routers` (the registry: arrow, phatgoose, glider, mixture, and the
oracle / uniform / none references), `embed` (all-MiniLM-L6-v2 for the global router), `describe`
(a patch's description and embedding in its manifest), `phatgoose` (gate training, cached), `score`
(routed evaluation through `evaluate.loglikelihoods`), `study` (the held-in / held-out report).

    from portllm.routing import PatchSet, get_router, Request
    ps = PatchSet("smollm2-135m", ["zoo/sst2", "zoo/boolq"]).use(get_router("glider", top_k=2, alpha=10))
    with ps.rows([Request(text="Is this review positive? ...")]):
        logits = ps.model(input_ids=ids).logits
"""

from __future__ import annotations

from .describe import Description, describe
from .patchset import Expert, PatchSet, Request, RoutedLinear
from .routers import ROUTERS, Knob, Router, get_router, register, router_from, topk_softmax
from .serving import serve_router as serve_router  # `portllm serve --router` (per-request routing)

__all__ = [
    "ROUTERS",
    "Description",
    "Expert",
    "Knob",
    "PatchSet",
    "Request",
    "RoutedLinear",
    "Router",
    "describe",
    "get_router",
    "register",
    "router_from",
    "topk_softmax",
]
