"""Patches from full fine-tunes: ΔW = W_tuned − W_base per linear layer, cut to low rank by SVD.

The result is an ordinary LoRA patch (PEFT-loadable), so a fully fine-tuned model becomes
portable like any adapter. Layers are streamed one pair at a time. Each layer keeps either a
fixed rank or the smallest rank holding a given share of the update's energy (Σσ²); the share
of the Frobenius norm kept is reported per layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import PortLLMError
from .linalg import factor
from .models import BaseRef
from .patch import Patch, lora_config, new_manifest
from .progress import Bar
from .stream import paired_tensors


@dataclass
class ExtractedLayer:
    """One changed tensor: a LoRA of some rank, or kept whole ("full", embeddings)."""

    module: str
    kind: str  # "lora" or "full"
    rank: int | None
    kept: float  # share of ||ΔW||_F kept
    rel_change: float  # ||ΔW|| / ||W_base||

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExtractResult:
    """What extract() wrote; the summary goes into the manifest (extra["extract"]), all of it to `--json`."""

    rank: int | None
    energy: float | None
    layers: int
    mean_norm_kept: float
    min_norm_kept: float
    ranks: list[int]
    skipped_1d: list[str]  # changed 1-D tensors (norms, biases): a LoRA cannot carry them
    full_tensors: list[str]
    tuned: dict[str, Any]
    rows: list[ExtractedLayer]
    out: str

    def summary(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "energy": self.energy,
            "layers": self.layers,
            "mean_norm_kept": self.mean_norm_kept,
            "min_norm_kept": self.min_norm_kept,
            "ranks": self.ranks,
            "skipped_1d": self.skipped_1d,
            "full_tensors": self.full_tensors,
            "tuned": self.tuned,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "rows": [r.to_dict() for r in self.rows], "out": self.out}


def extract(
    tuned: str | Path | BaseRef,
    base: str | Path | BaseRef,
    out: str | Path,
    rank: int | None = 8,
    energy: float | None = None,
    include_embeddings: bool = False,
    min_change: float = 0.0,
    overwrite: bool = False,
    progress: bool = False,
) -> ExtractResult:
    """Write the low-rank patch that takes `base` to (approximately) `tuned`."""
    if energy is not None and not 0 < energy <= 1:
        raise PortLLMError(f"--energy must be in (0, 1], got {energy}")
    if energy is None and (rank is None or rank < 1):
        raise PortLLMError("--rank must be at least 1")
    tref, bref = BaseRef.of(tuned), BaseRef.of(base)
    ti, bi = tref.index, bref.index
    tinfo, binfo = tref.info, bref.info
    if tinfo.model_type != binfo.model_type:
        raise PortLLMError(
            f"tuned model is {tinfo.model_type}, base is {binfo.model_type}: not a fine-tune of this base"
        )
    names = [n for n in bi if n.endswith(".weight") and n in ti]
    for name in names:  # from the headers, before any tensor is read
        b_shape, t_shape = tuple(bi[name][1].shape), tuple(ti[name][1].shape)
        if b_shape != t_shape:
            raise PortLLMError(f"{name} is {t_shape} in the tuned model but {b_shape} in the base")
    tensors: dict[str, torch.Tensor] = {}
    rows: list[ExtractedLayer] = []
    ranks: dict[str, int] = {}
    skipped_1d: list[str] = []
    saved_full: list[str] = []
    with Bar(progress, len(names), "extract") as bar:
        for name, w_b, w_t in paired_tensors(bi, ti, names, on_mismatch="raise"):
            bar.advance()
            d = w_t - w_b
            dn = float(d.norm())
            if dn <= min_change * max(float(w_b.norm()), 1e-30) or dn == 0.0:
                continue
            module = name[: -len(".weight")]
            short = module.rsplit(".", 1)[-1]
            if bref.arch.is_vocab_tensor(module):
                if include_embeddings:
                    tensors[name] = w_t.to(torch.float32)
                    saved_full.append(short)
                    rows.append(ExtractedLayer(module, "full", None, 1.0, dn / float(w_b.norm())))
                continue
            if d.ndim != 2:
                skipped_1d.append(name)
                continue
            b, a, kept = factor(d, rank, energy)
            tensors[f"{module}.lora_A.weight"] = a
            tensors[f"{module}.lora_B.weight"] = b
            ranks[module] = a.shape[0]
            rows.append(ExtractedLayer(module, "lora", a.shape[0], kept, dn / float(w_b.norm())))
    if not ranks:
        raise PortLLMError("the tuned model's linear layers do not differ from the base: nothing to extract")
    config = lora_config(ranks, str(base), sorted(set(saved_full)))
    tot = [r.kept for r in rows if r.kind == "lora"]
    result = ExtractResult(
        rank=rank if energy is None else None,
        energy=energy,
        layers=len(ranks),
        mean_norm_kept=sum(tot) / len(tot),
        min_norm_kept=min(tot),
        ranks=sorted(set(ranks.values())),
        skipped_1d=skipped_1d,
        full_tensors=saved_full,
        tuned={"name": str(tuned), "fingerprint": tinfo.fingerprint},
        rows=rows,
        out=str(out),
    )
    extra = {"extract": result.summary(), "layers": [r.to_dict() for r in rows]}
    manifest = new_manifest(binfo, config, tensors, "extracted", None, extra)
    Patch(config, tensors, manifest).save(out, overwrite=overwrite)
    return result
