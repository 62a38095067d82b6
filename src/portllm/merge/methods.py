"""Merge methods, one class each, and the registry that the merge loop, the CLI and the benchmarks read.

A method declares its own parameters (each with a default, help and a validity rule), mergekit's
normalize default for the same name (so a config means the same in both tools), and how it merges
one layer's dense updates. Only a method's own parameters are checked: TIES ignores Breadcrumbs'
gamma, so `--method ties --density 1.0` is valid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import PortLLMError
from .sparsify import breadcrumbs, dare, elect_and_merge, trim_magnitude, weighted_sum


@dataclass(frozen=True)
class Param:
    """A numeric knob of a method: keyword, default, help, and the rule it must satisfy."""

    name: str
    default: float
    help: str
    rule: str  # what a valid value is, in words, for the error message
    valid: Callable[[float, Mapping[str, float]], bool]  # (value, all of the method's values)


DENSITY = Param("density", 0.5, "share of entries kept", "in (0, 1]", lambda v, _: 0 < v <= 1)
GAMMA = Param(
    "gamma",
    0.01,
    "share of largest entries dropped",
    "in [0, 1) with gamma + density <= 1",
    lambda v, p: 0 <= v < 1 and v + p["density"] <= 1,
)


class Method:
    """One merge method with its parameter values checked; `merge_layer` gives one layer's merged update."""

    name: ClassVar[str]
    normalize: ClassVar[bool] = False  # mergekit's default: divide by the weights' sum
    params: ClassVar[tuple[Param, ...]] = ()
    random: ClassVar[bool] = False  # draws from the seeded generator
    lowrank: ClassVar[bool] = False  # the merge is exactly weighted_sum: factored from the LoRA factors, never formed

    def __init_subclass__(cls, **kw: object) -> None:
        super().__init_subclass__(**kw)
        if "merge_layer" in cls.__dict__ and "lowrank" not in cls.__dict__:
            cls.lowrank = False  # a new merge_layer is not the weighted sum the fast path computes

    def __init__(self, **values: float) -> None:
        """Take this method's own parameters from `values` (defaults for those missing, the rest ignored)."""
        own = {p.name: values.get(p.name, p.default) for p in self.params}
        for p in self.params:
            if not p.valid(own[p.name], own):
                raise PortLLMError(f"{self.name}: {p.name} must be {p.rule}, got {own[p.name]}")
        self.values = own

    @classmethod
    def summary(cls) -> str:
        return " ".join((cls.__doc__ or "").split())

    def merge_layer(
        self, deltas: list[torch.Tensor], weights: list[float], normalize: bool, g: torch.Generator
    ) -> torch.Tensor:
        """The merged dense update of one layer, before λ."""
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available to merge(), `portllm merge --method` and the benchmarks."""
    if cls.name in METHODS:
        raise ValueError(f"merge method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, **values: float) -> Method:
    """The method called `name` with its own parameters taken from `values` and checked."""
    if name not in METHODS:
        raise PortLLMError(f"unknown merge method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name](**values)


def methods_with(param: str) -> list[str]:
    """Names of the methods that take the parameter `param` (for help texts)."""
    return [n for n, cls in METHODS.items() if any(p.name == param for p in cls.params)]


# ---------------------------------------------------------------- the methods (registry order is help order)


@register
class Linear(Method):
    """Σ w_i ΔW_i / Σ w_i."""

    name = "linear"
    normalize = True
    lowrank = True

    def merge_layer(self, deltas, weights, normalize, g):
        return weighted_sum(deltas, weights, normalize)


@register
class TaskArithmetic(Linear):
    """Σ w_i ΔW_i."""

    name = "task_arithmetic"
    normalize = False


@register
class Ties(Method):
    """Trim each ΔW_i to its top-`density` magnitudes, elect a sign per entry from the weighted sum, keep the
    agreeing entries, disjoint mean."""

    name = "ties"
    normalize = True
    params = (DENSITY,)

    def merge_layer(self, deltas, weights, normalize, g):
        return elect_and_merge([trim_magnitude(d, self.values["density"]) for d in deltas], weights, normalize)


@register
class DareLinear(Method):
    """Drop entries at random with probability 1 − density, rescale by 1/density, sum."""

    name = "dare_linear"
    params = (DENSITY,)
    random = True

    def merge_layer(self, deltas, weights, normalize, g):
        return weighted_sum([dare(d, self.values["density"], g) for d in deltas], weights, normalize)


@register
class DareTies(Method):
    """The DARE drop and rescale, then TIES sign election, sum."""

    name = "dare_ties"
    params = (DENSITY,)
    random = True

    def merge_layer(self, deltas, weights, normalize, g):
        return elect_and_merge([dare(d, self.values["density"], g) for d in deltas], weights, normalize)


@register
class Breadcrumbs(Method):
    """Drop the top `gamma` share (outliers) and the smallest, keeping `density`, sum."""

    name = "breadcrumbs"
    params = (DENSITY, GAMMA)

    def merge_layer(self, deltas, weights, normalize, g):
        v = self.values
        return weighted_sum([breadcrumbs(d, v["density"], v["gamma"]) for d in deltas], weights, normalize)
