"""The merge loop: patches made on one base in, one patch and a MergeReport out.

Merges act on each layer's full updates ΔW_i = s_i·B_i·A_i, never on A and B separately
(averaging factors is wrong: mean(B)·mean(A) ≠ mean(B·A)), so patches of different ranks merge
correctly. The merged update is re-factored to a LoRA of the chosen rank by SVD and the energy
kept is reported; for the weighted-sum methods (linear, task arithmetic) the merged update is
exactly low-rank and is factored without forming it (QR of the stacked factors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import PortLLMError
from ..linalg import factor, lowrank_factor
from ..patch import Patch, lora_config, natural_key, new_manifest, now
from ..sign import require_trusted
from .methods import DENSITY, GAMMA, get_method


@dataclass
class MergeInput:
    """One merged patch, as recorded in the report."""

    path: str
    task: str | None
    sha256: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "task": self.task, "sha256": self.sha256}


@dataclass
class MergeReport:
    """What a merge did; stored in the merged patch's manifest (extra["merge"]) and printed by `--json`."""

    method: str
    weights: list[float]
    density: float
    lam: float
    gamma: float
    rank: int
    seed: int
    normalize: bool
    inputs: list[MergeInput]
    energy_kept: dict[str, float]  # share of each layer's merged ||ΔW||_F the rank cut kept
    time: str = field(default_factory=now)

    @property
    def energy_kept_mean(self) -> float:
        return sum(self.energy_kept.values()) / len(self.energy_kept)

    @property
    def energy_kept_min(self) -> float:
        return min(self.energy_kept.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "weights": self.weights,
            "density": self.density,
            "lambda": self.lam,
            "gamma": self.gamma,
            "rank": self.rank,
            "seed": self.seed,
            "normalize": self.normalize,
            "inputs": [i.to_dict() for i in self.inputs],
            "energy_kept_mean": self.energy_kept_mean,
            "energy_kept_min": self.energy_kept_min,
            "energy_kept": self.energy_kept,
            "time": self.time,
        }


def merge_deltas(
    deltas: list[torch.Tensor],
    method: str,
    weights: list[float],
    density: float = DENSITY.default,
    lam: float = 1.0,
    gamma: float = GAMMA.default,
    g: torch.Generator | None = None,
    normalize: bool | None = None,
) -> torch.Tensor:
    """The merged dense update of one layer (the reference the patch merge follows, usable on full models)."""
    m = get_method(method, density=density, gamma=gamma)
    norm = m.normalize if normalize is None else normalize
    return lam * m.merge_layer(deltas, weights, norm, g or torch.Generator().manual_seed(0))


def check_mergeable(patches: list[Patch]) -> None:
    """Refuse inputs whose updates cannot be added: other bases, other shapes, whole-tensor replacements."""
    fps = {p.source_fingerprint for p in patches}
    if len(fps) != 1 or None in fps:
        names = ", ".join(f"{p.path} ({p.source_fingerprint})" for p in patches)
        raise PortLLMError(f"patches were made on different bases: {names}; port them onto one base first")
    for p in patches:
        if p.full_weights:
            raise PortLLMError(
                f"patch {p.path} replaces whole tensors ({', '.join(sorted(p.full_weights))}, modules_to_save): "
                "a whole-tensor replacement cannot be merged as a low-rank update; port each patch instead"
            )
    shapes: dict[str, tuple[int, int]] = {}
    for p in patches:
        for name, m in p.modules.items():
            if shapes.setdefault(name, m.weight_shape) != m.weight_shape:
                raise PortLLMError(
                    f"module {name} has shape {m.weight_shape} in {p.path} but {shapes[name]} in another patch"
                )


def merge(
    patches: list[Patch | str | Path],
    method: str = "linear",
    weights: list[float] | None = None,
    density: float = DENSITY.default,
    lam: float = 1.0,
    rank: int | None = None,
    seed: int = 0,
    gamma: float = GAMMA.default,
    normalize: bool | None = None,
    require_signature: bool = False,
    trusted: list | None = None,
) -> tuple[Patch, MergeReport]:
    """Merge patches made on the same base into one patch (not saved); returns it and a report.

    `density` and `gamma` are used (and checked) only by the methods that declare them. With
    `require_signature` (or `trusted` public keys), every input is verified before any tensor is read.
    """

    checked = [require_trusted(p, require_signature, trusted) for p in patches]  # all, before any tensor is read
    ps = [Patch.load(v.path) if v else p if isinstance(p, Patch) else Patch.load(p) for p, v in zip(patches, checked)]
    if not ps:
        raise PortLLMError("nothing to merge")
    m = get_method(method, density=density, gamma=gamma)
    weights = list(weights) if weights else [1.0] * len(ps)
    if len(weights) != len(ps):
        raise PortLLMError(f"{len(weights)} weights for {len(ps)} patches")
    norm = m.normalize if normalize is None else normalize
    if norm and abs(sum(weights)) < 1e-8:
        raise PortLLMError("weights sum to zero, so they cannot be normalized; pass normalize=False (--no-normalize)")
    check_mergeable(ps)
    rank = rank or max(mod.rank for p in ps for mod in p.modules.values())
    if rank < 1:
        raise PortLLMError("--rank must be at least 1")
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    kept: dict[str, float] = {}
    names = sorted({n for p in ps for n in p.modules}, key=natural_key)
    for name in names:
        present = [(w, p.modules[name]) for w, p in zip(weights, ps) if name in p.modules]
        if m.lowrank:  # Σ c_i s_i B_i A_i: stack the factors, never form the dense update
            wsum = sum(weights) if norm else 1.0
            us = [(lam * w / wsum) * mod.scaling * mod.B.float() for w, mod in present]
            vs = [mod.A.float() for _, mod in present]
            if present[0][1].fan_in_fan_out:
                raise PortLLMError("fan-in-fan-out patches cannot be merged yet")
            b, a, k = lowrank_factor(us, vs, rank)
        else:
            ds = [mod.delta() for _, mod in present]
            ws = [w for w, _ in present]
            if len(present) < len(ps):  # absent in some patches: those contribute a zero update
                shape = present[0][1].weight_shape
                ds += [torch.zeros(shape)] * (len(ps) - len(present))
                ws += [w for w, p in zip(weights, ps) if name not in p.modules]
            b, a, k = factor(lam * m.merge_layer(ds, ws, norm, g), rank)
        tensors[f"{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{name}.lora_B.weight"] = b.contiguous()
        kept[name] = k
    config = lora_config(
        {n: tensors[f"{n}.lora_A.weight"].shape[0] for n in names}, ps[0].config.get("base_model_name_or_path")
    )
    report = MergeReport(
        method=method,
        weights=weights,
        density=density,
        lam=lam,
        gamma=gamma,
        rank=rank,
        seed=seed,
        normalize=norm,
        inputs=[MergeInput(str(p.path), p.task, p.weights_sha256) for p in ps],
        energy_kept=kept,
    )
    tasks = [p.task for p in ps if p.task]
    manifest = new_manifest(
        ps[0].source, config, tensors, "merged", "+".join(dict.fromkeys(tasks)) or None, {"merge": report.to_dict()}
    )
    return Patch(config, tensors, manifest), report
