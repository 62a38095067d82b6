"""Patches from full fine-tunes: ΔW = W_tuned − W_base per linear layer, cut to low rank by SVD.

The result is an ordinary LoRA patch (PEFT-loadable), so a fully fine-tuned model becomes
portable like any adapter. Layers are streamed one pair at a time. Each layer keeps either a
fixed rank or the smallest rank holding a given share of the update's energy (Σσ²); the share
of the Frobenius norm kept is reported per layer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .errors import PortLLMError
from .progress import Bar

EMBEDDING_HINTS = ("embed_tokens", "lm_head", "wte", "wpe", "embed_out", "word_embeddings")


def factor(
    delta: torch.Tensor, rank: int | None = None, energy: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """B (out×k), A (k×in) with B·A the best rank-k approximation of delta, and the norm share kept."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return _cut(u, s, vh, rank, energy)


def _cut(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int | None, energy: float | None):
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


def extract(
    tuned: str | Path,
    base: str | Path,
    out: str | Path,
    rank: int | None = 8,
    energy: float | None = None,
    include_embeddings: bool = False,
    min_change: float = 0.0,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the low-rank patch that takes `base` to (approximately) `tuned`."""
    from .models import base_info, resolve_base, weight_index
    from .patch import Patch, lora_config, new_manifest
    from .stream import read_tensor

    if energy is not None and not 0 < energy <= 1:
        raise PortLLMError(f"--energy must be in (0, 1], got {energy}")
    if energy is None and (rank is None or rank < 1):
        raise PortLLMError("--rank must be at least 1")
    tdir, bdir = resolve_base(tuned), resolve_base(base)
    ti, bi = weight_index(tdir), weight_index(bdir)
    tinfo, binfo = base_info(tdir), base_info(base)
    if tinfo["model_type"] != binfo["model_type"]:
        raise PortLLMError(
            f"tuned model is {tinfo['model_type']}, base is {binfo['model_type']}: not a fine-tune of this base"
        )
    tensors: dict[str, torch.Tensor] = {}
    rows: list[dict[str, Any]] = []
    ranks: dict[str, int] = {}
    skipped_1d: list[str] = []
    saved_full: list[str] = []
    names = [n for n in bi if n.endswith(".weight") and n in ti]
    with Bar(progress, len(names), "extract") as bar:
        for name in names:
            bar.advance()
            (bf, b_inf), (tf, t_inf) = bi[name], ti[name]
            if tuple(b_inf.shape) != tuple(t_inf.shape):
                raise PortLLMError(
                    f"{name} is {tuple(t_inf.shape)} in the tuned model but {tuple(b_inf.shape)} in the base"
                )
            w_b, w_t = read_tensor(b_inf, bf).float(), read_tensor(t_inf, tf).float()
            d = w_t - w_b
            dn = float(d.norm())
            if dn <= min_change * max(float(w_b.norm()), 1e-30) or dn == 0.0:
                continue
            module = name[: -len(".weight")]
            short = module.rsplit(".", 1)[-1]
            if any(h in module for h in EMBEDDING_HINTS):
                if include_embeddings:
                    tensors[name] = w_t.to(torch.float32)
                    saved_full.append(short)
                    rows.append(
                        {
                            "module": module,
                            "kind": "full",
                            "rank": None,
                            "kept": 1.0,
                            "rel_change": dn / float(w_b.norm()),
                        }
                    )
                continue
            if d.ndim != 2:
                skipped_1d.append(name)
                continue
            b, a, kept = factor(d, rank, energy)
            tensors[f"{module}.lora_A.weight"] = a
            tensors[f"{module}.lora_B.weight"] = b
            ranks[module] = a.shape[0]
            rows.append(
                {
                    "module": module,
                    "kind": "lora",
                    "rank": a.shape[0],
                    "kept": kept,
                    "rel_change": dn / float(w_b.norm()),
                }
            )
    if not ranks:
        raise PortLLMError("the tuned model's linear layers do not differ from the base: nothing to extract")
    config = lora_config(ranks, str(base), sorted(set(saved_full)))
    tot = [r["kept"] for r in rows if r["kind"] == "lora"]
    summary = {
        "rank": rank if energy is None else None,
        "energy": energy,
        "layers": len(ranks),
        "mean_norm_kept": sum(tot) / len(tot),
        "min_norm_kept": min(tot),
        "ranks": sorted(set(ranks.values())),
        "skipped_1d": skipped_1d,
        "full_tensors": saved_full,
        "tuned": {"name": str(tuned), "fingerprint": tinfo["fingerprint"]},
    }
    manifest = new_manifest(binfo, config, tensors, "extracted", None, {"extract": summary, "layers": rows})
    Patch(config, tensors, manifest).save(out, overwrite=overwrite)
    return {**summary, "rows": rows, "out": str(out)}
