"""Merging patches made on one base into one patch; similarity of patches; greedy selective merging.

Layout: `methods` (one class per merge method, and the registry), `sparsify` (trim, DARE, Breadcrumbs,
TIES sign election), `core` (the loop over layers, MergeReport), `similarity` (cosine of updates,
groups), `select` (Model-GLUE greedy selection, held-out scorer).

Adding a method touches one file, `methods.py`: subclass `Method`, set `name`, `normalize` (mergekit's
default for that name), `params` (reuse DENSITY / GAMMA or declare a `Param` with its rule) and
implement `merge_layer`; decorate it with `@register`. merge(), `portllm merge --method` (choices,
help, validation) and benchmarks/merge_tasks.py pick it up from METHODS. A parameter other than
density and gamma also needs its keyword in `core.merge` and an option in cli/merging.py.
"""

from __future__ import annotations

from .core import MergeInput, MergeReport, check_mergeable, merge, merge_deltas
from .methods import DENSITY, GAMMA, METHODS, Method, Param, get_method, methods_with, register
from .select import greedy_select, heldout_scorer
from .similarity import clusters, delta_inner, similarity
from .sparsify import breadcrumbs, dare, elect_and_merge, trim_magnitude, weighted_sum

__all__ = [
    "DENSITY",
    "GAMMA",
    "METHODS",
    "MergeInput",
    "MergeReport",
    "Method",
    "Param",
    "breadcrumbs",
    "check_mergeable",
    "clusters",
    "dare",
    "delta_inner",
    "elect_and_merge",
    "get_method",
    "greedy_select",
    "heldout_scorer",
    "merge",
    "merge_deltas",
    "methods_with",
    "register",
    "similarity",
    "trim_magnitude",
    "weighted_sum",
]
