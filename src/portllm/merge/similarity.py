"""How alike patches are: cosine of their whole updates, and the groups that look mergeable.

Computed from the LoRA factors (r×r products), never from dense ΔW, so comparing many patches
stays cheap; routing between patches reuses the same measure.
"""

from __future__ import annotations

import math

from ..patch import LoraModule, Patch


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
