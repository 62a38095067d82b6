"""Training-free repair: one scale per layer type (q, k, v, o, gate, up, down), chosen without labels.

An extension of `portllm rescale` (one λ for the whole patch): drift can damp the patch more in one kind
of layer than another. The patch is attached to θ' once and its LoRA scaling changed in place; each
candidate is judged by how often θ'+λΔθ picks θ+Δθ's option on the training part of the inputs (ties:
the smaller KL, then the λ nearest 1). First one λ for all types, then one pass over the types, each
trying the grid with the others fixed.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch

from ..eval import open_lm
from ..patch import Patch
from .distill import Agreement, agreement
from .teacher import ChoiceTargets

GRID = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


def module_type(name: str) -> str:
    """The layer type of a LoRA module or tensor name: q_proj for ...self_attn.q_proj(.lora_B.weight)."""
    return name.split(".lora_")[0].rsplit(".", 1)[-1]


def _lora_layers(model: Any) -> dict[str, list[Any]]:
    from peft.tuners.lora import LoraLayer  # deferred: peft's import is slow

    out: dict[str, list[Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and "default" in m.scaling:
            out.setdefault(module_type(name), []).append(m)
    return out


def choose_scales(
    old_patch: str | Path,
    new: str | Path,
    targets: ChoiceTargets,
    train_idx: list[int],
    held: list[int],
    grid: tuple[float, ...],
    dtype: str,
    device: str,
) -> tuple[dict[str, float], Agreement, Agreement]:
    """Per layer type λ, and the held-out agreement before (all λ = 1) and after."""
    lm = open_lm(new, old_patch, dtype=dtype, device=device)
    pad = lm.tokenizer.pad_token_id
    try:
        layers = _lora_layers(lm.model)
        base = {t: [m.scaling["default"] for m in ms] for t, ms in layers.items()}

        def apply(scales: dict[str, float]) -> None:
            for t, ms in layers.items():
                for m, s0 in zip(ms, base[t]):
                    m.scaling["default"] = s0 * scales[t]

        def score(scales: dict[str, float]) -> tuple[float, float]:
            apply(scales)
            a = agreement(lm.model, pad, targets, train_idx, 16)
            return a.agreement or 0.0, a.kl

        def best(cands: list[dict[str, float]], key: str | None) -> dict[str, float]:
            scored = [(score(c), c) for c in cands]
            return max(scored, key=lambda x: (round(x[0][0], 9), -x[0][1], -abs((x[1][key] if key else 1) - 1)))[1]

        ones = {t: 1.0 for t in layers}
        before = agreement(lm.model, pad, targets, held, 16)
        glob = best([{t: g for t in layers} for g in grid], next(iter(layers)))
        for t in layers:
            glob = best([dict(glob, **{t: g}) for g in grid], t)
        apply(glob)
        after = agreement(lm.model, pad, targets, held, 16)
        apply(ones)
        return glob, before, after
    finally:
        lm = None  # the model goes before returning: one model in memory at a time
        gc.collect()


def scaled_by_type(patch: Patch, scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """The patch's tensors with each module's B multiplied by its type's scale (so ΔW by the scale)."""
    return {k: (v * scales.get(module_type(k), 1.0) if ".lora_B" in k else v) for k, v in patch.tensors.items()}
