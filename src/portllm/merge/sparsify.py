"""The building blocks merge methods combine: sparsifiers of one task vector, and TIES sign election.

Each acts on a dense update ΔW (one layer of one patch, or the stack of all patches for
`elect_and_merge`); they know nothing of patches or methods, so a new method is a new mix of them.
"""

from __future__ import annotations

import torch


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


def weighted_sum(ds: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """Σ w_i d_i, divided by Σ w_i when `normalize` (and the sum is not zero)."""
    total = sum(w * d for w, d in zip(weights, ds))
    wsum = sum(weights)
    return total / wsum if normalize and abs(wsum) > 1e-8 else total


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
