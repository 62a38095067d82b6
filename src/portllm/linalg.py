"""Low-rank factoring by SVD, shared by extraction (ΔW of a full fine-tune) and merging (merged ΔW).

Factors split the singular values evenly (B = U·√σ, A = √σ·Vᴴ) so neither factor carries the
whole scale, and every function reports the share of ‖ΔW‖_F it kept, because a rank cut is lossy
and the user should see by how much.
"""

from __future__ import annotations

import math

import torch


def factor(
    delta: torch.Tensor, rank: int | None = None, energy: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """B (out×k), A (k×in) with B·A the best rank-k approximation of delta, and the norm share kept."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return cut_svd(u, s, vh, rank, energy)


def cut_svd(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int | None = None, energy: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Keep the top-k of an SVD as factors B, A: k = `rank` (default 8), or with `energy` the smallest k
    holding that share of Σσ²; returns B, A and the share of the Frobenius norm kept."""
    total = float((s * s).sum())
    if energy is not None:
        cum = torch.cumsum(s * s, 0) / max(total, 1e-30)
        k = int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype)).item()) + 1
    else:
        k = rank or 8
    k = max(1, min(k, s.numel()))
    root = s[:k].sqrt()
    b = u[:, :k] * root
    a = root[:, None] * vh[:k]
    kept = math.sqrt(float((s[:k] ** 2).sum()) / total) if total > 0 else 1.0
    return b.contiguous(), a.contiguous(), kept


def lowrank_factor(
    us: list[torch.Tensor], vs: list[torch.Tensor], rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors of Σ U_i V_i without forming it: QR of the stacked factors, SVD of the core.

    A weighted sum of LoRA updates is exactly low-rank, so this costs (out + in)·(Σ r_i)² instead of
    an SVD of the dense out×in matrix.
    """
    u = torch.cat(us, dim=1)
    v = torch.cat(vs, dim=0).T
    qu, ru = torch.linalg.qr(u)
    qv, rv = torch.linalg.qr(v)
    uc, s, vch = torch.linalg.svd(ru @ rv.T)
    return cut_svd(qu @ uc, s, vch @ qv.T, rank, None)
