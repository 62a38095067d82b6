"""Many patches, one base: route each request (and each token) to the right patches.

Layout: `patchset` (the base loaded once, every adapted linear layer holding all patches' factors
stacked; per-row selection), `routers` (the one registry of router names, each entry per-token or
per-request; the per-token routers: arrow, phatgoose, glider, mixture, and the oracle / uniform / none
references), `serving` (the per-request routers of `portllm serve --router`: description, arrow-request),
`embed` (all-MiniLM-L6-v2 for the global router), `describe` (a patch's description and embedding in its
manifest), `phatgoose` (gate training, cached), `score` (routed evaluation through `eval.loglikelihoods`),
`study` (the held-in / held-out report; `study_report` renders it), `wording` (eval templates' fixed text,
the leak check on descriptions, paraphrased wordings).

    from portllm.routing import PatchSet, get_router, Request
    ps = PatchSet("smollm2-135m", ["zoo/sst2", "zoo/boolq"]).use(get_router("glider", top_k=2, alpha=10))
    with ps.rows([Request(text="Is this review positive? ...")]):
        logits = ps.model(input_ids=ids).logits
"""

from __future__ import annotations

from .describe import Description, describe
from .patchset import Expert, PatchSet, Request, RoutedLinear
from .routers import (
    KINDS,
    PER_REQUEST,
    PER_TOKEN,
    ROUTERS,
    Knob,
    Router,
    RouterBase,
    get_router,
    register,
    router_class,
    router_from,
    router_names,
    topk_softmax,
)
from .serving import ServeRouter, serve_router  # imported here so ROUTERS holds the per-request routers too

__all__ = [
    "KINDS",
    "PER_REQUEST",
    "PER_TOKEN",
    "ROUTERS",
    "Description",
    "Expert",
    "Knob",
    "PatchSet",
    "Request",
    "RoutedLinear",
    "Router",
    "RouterBase",
    "ServeRouter",
    "describe",
    "get_router",
    "register",
    "router_class",
    "router_from",
    "router_names",
    "serve_router",
    "topk_softmax",
]
