"""PHATGOOSE gates: one vector per patch per adapted layer, trained after the patch with everything else frozen.

During training, patch i's update at each layer is scaled per token by sigmoid(g·x); only g learns, on the
patch's own task train data (the loss and prompts of `portllm train`), from g = 0 (scale ½). At inference
the gates become routing prototypes (routers.Phatgoose). Gates live in a cache
($PORTLLM_CACHE/routing/gates), keyed by the patch's weights sha256 (of its tensors when it has no
manifest checksum), its task, the base fingerprint and the gate recipe, not in the patch directory:
writing a file into a patch would change what its manifest and signature cover, and the gates are a
function of (patch, base, data) that anyone can recompute.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..atomic import owned_temp
from ..errors import PortLLMError
from ..head import lm_loss
from ..models import cache_root
from ..progress import Bar
from ..tasks import get_task
from ..train import collate, example_order, training_examples
from .patchset import PatchSet, tensor_digest


@dataclass(frozen=True)
class GateConfig:
    """The gate-training recipe (PHATGOOSE trains gates briefly with a larger learning rate than LoRA)."""

    steps: int = 100
    batch_size: int = 8
    lr: float = 5e-3
    max_length: int = 128
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def gates_file(pset: PatchSet, i: int, cfg: GateConfig) -> Path:
    p = pset.patches[i]
    sha = p.weights_sha256 or tensor_digest(p)  # this patch's own weights (never the set's: patches would collide)
    task = hashlib.sha256(str(p.task).encode()).hexdigest()[:8]  # gates learn from the task's data
    return cache_root() / "routing" / "gates" / f"{sha[:16]}-{task}-{pset.ref.fingerprint[:12]}-{cfg.key()}.safetensors"


class _GateTraining:
    """A router that only trains: patch i scaled by sigmoid(g_layer · x) per token, the others off."""

    needs_text = needs_label = needs_gates = False

    def __init__(self, pset: PatchSet, i: int):
        self.i = i
        self.gates = torch.nn.ParameterDict()
        self.names = {}
        for layer in pset.layers:
            if i in layer.present:
                key = f"l{layer.index}"
                self.gates[key] = torch.nn.Parameter(torch.zeros(layer.in_features, device=layer.A.device))
                self.names[key] = layer.name

    def prepare(self, pset):
        pass

    def rows(self, pset, reqs):
        return {}

    def weights(self, pset, layer, x, cache):
        key = f"l{layer.index}"
        w = torch.zeros(*x.shape[:-1], pset.n, device=x.device, dtype=torch.float32)
        if key not in self.gates:
            return w
        s = torch.sigmoid(x.float() @ self.gates[key])
        return w.index_copy(-1, torch.tensor([self.i], device=x.device), s.unsqueeze(-1))


def train_gates(
    pset: PatchSet,
    i: int,
    cfg: GateConfig | None = None,
    data: str | Path | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Train patch i's gates (base and patches frozen); returns {module name: gate vector}."""
    cfg = cfg or GateConfig()
    p = pset.patches[i]
    if not p.task:
        raise PortLLMError(
            f"patch {p.path} records no task, and PHATGOOSE gates train on the patch's own task data; "
            "use the arrow router (training-free) for it"
        )
    task = get_task(p.task)
    examples = training_examples(task, pset.tokenizer, cfg.max_length, data, cfg.steps * cfg.batch_size)
    if not examples:
        raise PortLLMError(f"no train examples for {task.name}: gates cannot be trained")
    # gates may be trained on demand from `use()` called under no_grad / inference_mode: gradients are needed here
    with torch.inference_mode(False), torch.enable_grad():
        return _train(pset, i, cfg, examples, progress)


def _train(pset: PatchSet, i: int, cfg: GateConfig, examples: list, progress: bool) -> dict[str, torch.Tensor]:
    trainer = _GateTraining(pset, i)
    saved = pset.router, pset._row_weights, pset._cache
    pset.router, pset._row_weights, pset._cache = trainer, None, {}  # no caller's selection overrides the gates
    for prm in pset.model.parameters():
        prm.requires_grad_(False)
    opt = torch.optim.AdamW(trainer.gates.parameters(), lr=cfg.lr, weight_decay=0.0)
    order = example_order(len(examples), cfg.steps, cfg.batch_size, cfg.seed)
    device = next(pset.model.parameters()).device
    torch.manual_seed(cfg.seed)
    try:
        with Bar(progress, cfg.steps, f"gates {pset.experts[i].name}") as bar:
            for step in range(cfg.steps):
                batch = [examples[j] for j in order[step * cfg.batch_size : (step + 1) * cfg.batch_size]]
                ids, labels, mask = collate(batch, pset.tokenizer.pad_token_id, device)
                loss = lm_loss(pset.model, ids, mask, labels)
                if not torch.isfinite(loss):
                    raise PortLLMError(f"gate training loss became {float(loss)} at step {step}; lower the gate lr")
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                bar.update(step + 1)
    finally:
        pset.router, pset._row_weights, pset._cache = saved
    return {trainer.names[k]: v.detach().cpu().clone() for k, v in trainer.gates.items()}


def load_gates(
    pset: PatchSet,
    cfg: GateConfig | None = None,
    data: str | Path | None = None,
    train_missing: bool = True,
    log: Callable[[str], Any] | None = None,
    progress: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Every patch's gates from the cache, training (and caching) those missing unless `train_missing` is off."""
    cfg = cfg or getattr(pset, "gate_config", None) or GateConfig()
    data = data if data is not None else getattr(pset, "data", None)
    log = log or getattr(pset, "log", None)
    files = [gates_file(pset, i, cfg) for i in range(pset.n)]
    untaskable = [
        pset.experts[i].path or pset.experts[i].name
        for i, f in enumerate(files)
        if not pset.patches[i].task and not f.is_file()
    ]
    if train_missing and untaskable:  # refused before any other patch's gates are trained
        raise PortLLMError(
            f"patch {untaskable[0]} records no task, and PHATGOOSE gates train on the patch's own task data; "
            "use the arrow router (training-free) for it"
        )
    out = []
    for i, f in enumerate(files):
        if f.is_file():
            out.append(load_file(str(f)))
            continue
        if not train_missing:
            raise PortLLMError(
                f"patch {pset.experts[i].path} has no PHATGOOSE gates for this base and recipe; train them first "
                "(portllm route-gates) or use the arrow router"
            )
        if log:
            log(f"training PHATGOOSE gates for {pset.experts[i].name} ({cfg.steps} steps; cached in {f.parent})")
        gates = train_gates(pset, i, cfg, data, progress)
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = owned_temp(f)
        save_file({k: v.contiguous() for k, v in gates.items()}, str(tmp), metadata={"recipe": json.dumps(asdict(cfg))})
        tmp.replace(f)
        out.append(gates)
    return out
