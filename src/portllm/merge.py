"""Merging patches into one patch: linear, task arithmetic, TIES, DARE, Breadcrumbs; greedy selection.

Merges act on the full updates ΔW_i = s_i·B_i·A_i of each layer, never on A and B separately
(averaging factors is wrong: mean(B)·mean(A) ≠ mean(B·A)), so patches of different ranks merge
correctly. The merged update is re-factored to a LoRA of the chosen rank by SVD and the energy
kept is reported; for linear and task arithmetic the merged update is exactly low-rank and is
factored without forming it (QR of the stacked factors).

Methods (weights w_i, λ scales the result; "normalized" divides by the weights' sum, as mergekit
does by default for the same method names, so a config means the same in both tools):
  linear          Σ w_i ΔW_i / Σ w_i                                              (normalized)
  task_arithmetic Σ w_i ΔW_i
  ties            trim each ΔW_i to its top-`density` magnitudes, elect a sign per entry from the
                  weighted sum, keep the agreeing entries, disjoint mean          (normalized)
  dare_linear     drop entries at random with probability 1 − density, rescale by 1/density, sum
  dare_ties       the same drop and rescale, then TIES sign election, sum
  breadcrumbs     drop the top `gamma` share (outliers) and the smallest, keeping `density`, sum
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import PortLLMError
from .extract import _cut, factor
from .patch import LoraModule, Patch, _natural, lora_config, new_manifest, now

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs")


# ---------------------------------------------------------------- sparsifiers (one task vector at a time)


def trim_magnitude(d: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·n) entries with the largest magnitude (TIES 'trim')."""
    if density >= 1.0:
        return d
    k = max(1, int(density * d.numel()))
    mag = d.abs()
    thresh = mag.flatten().kthvalue(d.numel() - k + 1).values  # O(n) selection; equal magnitudes are measure-zero
    return torch.where(mag >= thresh, d, torch.zeros_like(d))


def dare(d: torch.Tensor, density: float, g: torch.Generator) -> torch.Tensor:
    """Drop And REscale: keep each entry with probability `density`, scale survivors by 1/density."""
    if density >= 1.0:
        return d
    keep = torch.rand(d.shape, generator=g) < density
    return torch.where(keep, d / density, torch.zeros_like(d))


def breadcrumbs(d: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Drop the largest `gamma` share (outliers), then the smallest, so that `density` of the entries remain."""
    if density >= 1.0:
        return d
    n = d.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[d.abs().flatten().argsort()[bottom : bottom + target]] = True
    return torch.where(keep.view(d.shape), d, torch.zeros_like(d))


def elect_and_merge(ds: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    """TIES: elect a sign per entry from the weighted sum (ties go to +), keep the entries that agree,
    and sum them, divided by the agreeing weights when `normalize` (the disjoint mean)."""
    stacked = torch.stack([w * d for w, d in zip(weights, ds)])
    majority = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(stacked) == majority
    num = (stacked * agree).sum(0)
    if not normalize:
        return num
    den = (torch.tensor(weights, dtype=num.dtype).view(-1, *[1] * num.ndim) * agree).sum(0)
    return num / torch.where(den == 0, torch.ones_like(den), den)


# ---------------------------------------------------------------- one layer

NORMALIZE = {
    "linear": True,
    "task_arithmetic": False,
    "ties": True,
    "dare_linear": False,
    "dare_ties": False,
    "breadcrumbs": False,
}  # mergekit's defaults, so configs mean the same in both tools


def merge_deltas(
    deltas: list[torch.Tensor],
    method: str,
    weights: list[float],
    density: float = 0.5,
    lam: float = 1.0,
    gamma: float = 0.01,
    g: torch.Generator | None = None,
    normalize: bool | None = None,
) -> torch.Tensor:
    """The merged dense update of one layer."""
    if method not in NORMALIZE:
        raise PortLLMError(f"unknown merge method {method!r}; choose from {', '.join(METHODS)}")
    norm = NORMALIZE[method] if normalize is None else normalize
    g = g or torch.Generator().manual_seed(0)
    if method in ("ties", "dare_ties"):
        sparse = [trim_magnitude(d, density) if method == "ties" else dare(d, density, g) for d in deltas]
        return lam * elect_and_merge(sparse, weights, norm)
    sparsify = {
        "linear": lambda d: d,
        "task_arithmetic": lambda d: d,
        "dare_linear": lambda d: dare(d, density, g),
        "breadcrumbs": lambda d: breadcrumbs(d, density, gamma),
    }[method]
    total = sum(w * sparsify(d) for w, d in zip(weights, deltas))
    wsum = sum(weights)
    return lam * (total / wsum if norm and abs(wsum) > 1e-8 else total)


def lowrank_factor(
    us: list[torch.Tensor], vs: list[torch.Tensor], rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors of Σ U_i V_i without forming it: QR of the stacked factors, SVD of the core."""
    u = torch.cat(us, dim=1)
    v = torch.cat(vs, dim=0).T
    qu, ru = torch.linalg.qr(u)
    qv, rv = torch.linalg.qr(v)
    uc, s, vch = torch.linalg.svd(ru @ rv.T)
    b, a, kept = _cut(qu @ uc, s, vch @ qv.T, rank, None)
    return b, a, kept


# ---------------------------------------------------------------- patches


def check_mergeable(patches: list[Patch]) -> None:
    fps = {p.source.get("fingerprint") for p in patches}
    if len(fps) != 1 or None in fps:
        names = ", ".join(f"{p.path} ({p.source.get('fingerprint')})" for p in patches)
        raise PortLLMError(f"patches were made on different bases: {names}; port them onto one base first")
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
    density: float = 0.5,
    lam: float = 1.0,
    rank: int | None = None,
    seed: int = 0,
    gamma: float = 0.01,
    normalize: bool | None = None,
) -> tuple[Patch, dict[str, Any]]:
    """Merge patches made on the same base into one patch (not saved); returns it and a report."""
    ps = [p if isinstance(p, Patch) else Patch.load(p) for p in patches]
    if not ps:
        raise PortLLMError("nothing to merge")
    if method not in METHODS:
        raise PortLLMError(f"unknown merge method {method!r}; choose from {', '.join(METHODS)}")
    if not 0 < density <= 1:
        raise PortLLMError(f"density must be in (0, 1], got {density}")
    if not 0 <= gamma < 1 or gamma + density > 1:
        raise PortLLMError(f"gamma must be in [0, 1) with gamma + density <= 1, got {gamma}")
    weights = list(weights) if weights else [1.0] * len(ps)
    if len(weights) != len(ps):
        raise PortLLMError(f"{len(weights)} weights for {len(ps)} patches")
    norm = NORMALIZE[method] if normalize is None else normalize
    if norm and abs(sum(weights)) < 1e-8:
        raise PortLLMError("weights sum to zero, so they cannot be normalized; pass normalize=False (--no-normalize)")
    check_mergeable(ps)
    rank = rank or max(m.rank for p in ps for m in p.modules.values())
    if rank < 1:
        raise PortLLMError("--rank must be at least 1")
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    kept: dict[str, float] = {}
    names = sorted({n for p in ps for n in p.modules}, key=_natural)
    for name in names:
        present = [(w, p.modules[name]) for w, p in zip(weights, ps) if name in p.modules]
        if method in ("linear", "task_arithmetic"):
            wsum = sum(weights) if norm else 1.0
            us = [(lam * w / wsum) * m.scaling * m.B.float() for w, m in present]
            vs = [m.A.float() for _, m in present]
            if present[0][1].fan_in_fan_out:
                raise PortLLMError("fan-in-fan-out patches cannot be merged yet")
            b, a, k = lowrank_factor(us, vs, rank)
        else:
            ds = [m.delta() for _, m in present]
            ws = [w for w, _ in present]
            if len(present) < len(ps):  # absent in some patches: those contribute a zero update
                shape = present[0][1].weight_shape
                ds += [torch.zeros(shape)] * (len(ps) - len(present))
                ws += [w for w, p in zip(weights, ps) if name not in p.modules]
            merged = merge_deltas(ds, method, ws, density, lam, gamma, g, norm)
            b, a, k = factor(merged, rank)
        tensors[f"{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{name}.lora_B.weight"] = b.contiguous()
        kept[name] = k
    config = lora_config(
        {n: tensors[f"{n}.lora_A.weight"].shape[0] for n in names}, ps[0].config.get("base_model_name_or_path")
    )
    report = {
        "method": method,
        "weights": weights,
        "density": density,
        "lambda": lam,
        "gamma": gamma,
        "rank": rank,
        "seed": seed,
        "normalize": norm,
        "inputs": [
            {
                "path": str(p.path),
                "task": (p.manifest or {}).get("task"),
                "sha256": (p.manifest or {}).get("files", {}).get("adapter_model.safetensors"),
            }
            for p in ps
        ],
        "energy_kept_mean": sum(kept.values()) / len(kept),
        "energy_kept_min": min(kept.values()),
        "energy_kept": kept,
        "time": now(),
    }
    tasks = [t for t in ((p.manifest or {}).get("task") for p in ps) if t]
    manifest = new_manifest(
        ps[0].source, config, tensors, "merged", "+".join(dict.fromkeys(tasks)) or None, {"merge": report}
    )
    return Patch(config, tensors, manifest), report


# ---------------------------------------------------------------- similarity and selection


def delta_inner(a: LoraModule, b: LoraModule) -> float:
    """<ΔW_a, ΔW_b>_F from r×r products: trace(A_aᵀ B_aᵀ B_b A_b)."""
    return a.scaling * b.scaling * float(((a.B.double().T @ b.B.double()) * (a.A.double() @ b.A.double().T)).sum())


def similarity(patches: list[Patch]) -> list[list[float]]:
    """Cosine similarity of the patches' whole updates (all layers concatenated)."""
    n = len(patches)
    gram = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            s = sum(
                delta_inner(m, patches[j].modules[k]) for k, m in patches[i].modules.items() if k in patches[j].modules
            )
            gram[i][j] = gram[j][i] = s
    return [
        [gram[i][j] / math.sqrt(gram[i][i] * gram[j][j]) if gram[i][i] and gram[j][j] else 0.0 for j in range(n)]
        for i in range(n)
    ]


def clusters(sim: list[list[float]], threshold: float) -> list[list[int]]:
    """Groups of patches linked by cosine >= threshold (connected components): candidates to merge."""
    n, seen, out = len(sim), set(), []
    for i in range(n):
        if i in seen:
            continue
        stack, comp = [i], []
        while stack:
            k = stack.pop()
            if k in seen:
                continue
            seen.add(k)
            comp.append(k)
            stack += [j for j in range(n) if j not in seen and sim[k][j] >= threshold]
        out.append(sorted(comp))
    return out


def greedy_select(
    patches: list[Patch],
    score: Callable[[Patch], float],
    method: str = "linear",
    order: str = "score",
    log: Callable[[str], None] = print,
    **merge_kw: Any,
) -> tuple[Patch, list[dict[str, Any]]]:
    """Model-GLUE-style selective merging: add candidates one at a time, keep each only if the held-out score "
    "does not drop."""
    own = [score(p) for p in patches]
    idx = list(range(len(patches)))
    if order == "score":
        idx.sort(key=lambda i: -own[i])
    elif order == "similarity":
        sim = similarity(patches)
        first = max(idx, key=lambda i: own[i])
        idx = [first] + sorted((i for i in idx if i != first), key=lambda i: -sim[first][i])
    else:
        raise PortLLMError(f"unknown order {order!r}; use score or similarity")
    chosen = [idx[0]]
    best, _ = merge([patches[idx[0]]], method, **merge_kw)
    best_score = own[idx[0]]
    trajectory = [
        {"candidate": str(patches[idx[0]].path), "own_score": own[idx[0]], "merged_score": best_score, "kept": True}
    ]
    log(f"start with {patches[idx[0]].path}: {best_score:.4f}")
    for i in idx[1:]:
        trial, _ = merge([patches[k] for k in chosen + [i]], method, **merge_kw)
        s = score(trial)
        keep = s >= best_score
        trajectory.append({"candidate": str(patches[i].path), "own_score": own[i], "merged_score": s, "kept": keep})
        log(f"{'keep' if keep else 'drop'} {patches[i].path}: merged score {s:.4f} (best {best_score:.4f})")
        if keep:
            chosen.append(i)
            best, best_score = trial, s
    best.manifest["extra"]["selection"] = {
        "order": order,
        "trajectory": trajectory,
        "chosen": [str(patches[k].path) for k in chosen],
    }
    return best, trajectory
