"""Making a patch: LoRA fine-tuning with PEFT on one task, the paper's recipe by default.

Rank 8 on every linear projection, alpha 16, AdamW, loss on the answer tokens only, prompts
identical to the evaluation's. Deterministic for a seed (data order, LoRA init, no dropout),
and resumable: a checkpoint of the LoRA weights and optimizer state (safetensors + JSON, never
pickle) is kept beside the output until the patch is written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .errors import PortLLMError
from .progress import Bar
from .resources import measure

PAPER_TARGETS: tuple[str, ...] = ()  # empty = the architecture's own "all linear projections" (architectures.json)


@dataclass
class LoopConfig:
    """What the shared training loop needs (patch training and base evolution alike)."""

    lr: float = 2e-4
    steps: int = 100
    batch_size: int = 8
    max_length: int = 256
    seed: int = 0
    dtype: str = "float32"
    warmup: float = 0.06
    weight_decay: float = 0.0
    checkpoint_every: int = 25

    def key(self) -> str:
        """Identity of the recipe (checkpoints of another recipe are not resumed)."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k != "checkpoint_every"}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainConfig(LoopConfig):
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = PAPER_TARGETS
    max_examples: int | None = None  # use only the first N train examples
    max_epochs: int = 20  # refuse runs that would repeat each example more often than this


@dataclass
class TrainResult:
    """What a training run made and cost; `to_dict()` is `portllm train --json`."""

    patch_dir: Path
    losses: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float | None = None
    trainable_params: int = 0
    resumed_from: int = 0
    eval: dict[str, Any] | None = None  # metric, value, stderr, n on the base's eval split (eval_limit > 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "patch": str(self.patch_dir),
            "steps": len(self.losses),
            "resumed_from": self.resumed_from,
            "loss_first": self.losses[0] if self.losses else None,
            "loss_last": self.losses[-1] if self.losses else None,  # the last step's (the manifest's: last 10)
            "trainable_params": self.trainable_params,
            "wall_s": round(self.wall_s, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "peak_gpu_mb": self.peak_gpu_mb,
            "eval": self.eval,
        }


def training_examples(
    task: Any, tok: Any, max_length: int, data: str | Path | None = None, limit: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per train example; labels are -100 on the prompt, so only the answer is learned."""
    from .evaluate import encode_pair
    from .tasks import load_examples

    out = []
    for e in load_examples(task, "train", data, limit):
        prompt = e.contexts[e.gold] if task.kind == "mc" else e.prompt
        p, t = encode_pair(tok, prompt, e.target)
        if task.kind == "gen" and tok.eos_token_id is not None:
            t = t + [tok.eos_token_id]
        t = t[: max_length - 1]
        p = p[-(max_length - len(t)) :] if max_length - len(t) > 0 else []
        out.append((p + t, [-100] * len(p) + t))
    return out


def _order(n: int, steps: int, batch: int, seed: int) -> list[int]:
    """The example index of every slot of every step: seeded permutations, epoch after epoch."""
    g = torch.Generator().manual_seed(seed)
    need = steps * batch
    order: list[int] = []
    while len(order) < need:
        order += torch.randperm(n, generator=g).tolist()
    return order[:need]


def _lr_at(step: int, cfg: Any) -> float:
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))


def train(
    base: str | Path,
    task_name: str,
    out: str | Path,
    cfg: TrainConfig | None = None,
    data: str | Path | None = None,
    eval_limit: int = 0,
    overwrite: bool = False,
    progress: bool = False,
    callback: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Fine-tune a LoRA patch for `task_name` on `base` and write it as a portllm patch."""
    from peft import LoraConfig, get_peft_model

    from .models import BaseRef, load_base
    from .patch import Patch, new_manifest, read_adapter
    from .tasks import get_task

    cfg = cfg or TrainConfig()
    base = BaseRef.of(base)  # resolved once for the model, its facts and the manifest
    if not cfg.target_modules:
        cfg = replace(cfg, target_modules=base.arch.lora_targets)
    out = Path(out)
    if out.exists() and not overwrite:
        raise PortLLMError(f"output {out} already exists; choose another path or pass --overwrite")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise PortLLMError("--steps and --batch-size must be at least 1")
    task = get_task(task_name)
    ckpt = out.parent / f".{out.name}.ckpt"
    with measure() as usage:
        model, tok = load_base(base, dtype=cfg.dtype)
        if tok is None:
            raise PortLLMError(f"{base} has no tokenizer; training needs one")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        examples = training_examples(task, tok, cfg.max_length, data, cfg.max_examples)
        if len(examples) < cfg.batch_size:
            raise PortLLMError(
                f"too few examples: {task.name} has {len(examples)} train examples, fewer than one batch of "
                f"{cfg.batch_size}"
            )
        if cfg.steps * cfg.batch_size > len(examples) * cfg.max_epochs:
            raise PortLLMError(
                f"too few examples for {cfg.steps} steps x {cfg.batch_size}: {task.name} has {len(examples)} "
                "train examples, "
                f"each would be seen more than {cfg.max_epochs} times; lower --steps or use more examples"
            )
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device)
        torch.manual_seed(cfg.seed)
        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.rank,
                lora_alpha=cfg.alpha,
                target_modules=list(cfg.target_modules),
                lora_dropout=0.0,
                bias="none",
                task_type="CAUSAL_LM",
            ),
        )
        losses, start, n_trainable = fit(
            model, examples, cfg, tok.pad_token_id, ckpt, f"train {task.name}", progress, callback
        )
    result = TrainResult(out, losses, usage.wall_s, usage.peak_rss_mb, usage.peak_gpu_mb, n_trainable, start)
    if eval_limit:
        result.eval = _self_eval(model, tok, task, data, eval_limit, base)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        config, tensors = read_adapter(Path(tmp))
    info = base.info
    extra = {
        "training": {
            **asdict(cfg),
            "target_modules": list(cfg.target_modules),
            "task": task.name,
            "examples_available": len(examples),
            "examples_seen": cfg.steps * cfg.batch_size,
            "trainable_params": result.trainable_params,
            "wall_s": round(result.wall_s, 2),
            "peak_rss_mb": round(result.peak_rss_mb, 1),
            "peak_gpu_mb": result.peak_gpu_mb,
            "device": device,
            "resumed_from": start,
            "loss_first": losses[0] if losses else None,
            "loss_last": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "losses": [round(x, 4) for x in losses],
        },
        "eval_on_base": result.eval,
    }
    config = dict(config, base_model_name_or_path=str(base))
    Patch(config, tensors, new_manifest(info, config, tensors, "trained", task.name, extra)).save(
        out, overwrite=overwrite
    )
    shutil.rmtree(ckpt, ignore_errors=True)
    return result


def fit(
    model: Any,
    examples: list[tuple[list[int], list[int]]],
    cfg: Any,
    pad_id: int,
    ckpt: Path,
    label: str,
    progress: bool = False,
    callback: Callable[[int, float], None] | None = None,
) -> tuple[list[float], int, int]:
    """The shared training loop (patches and evolved bases): seeded order, AdamW, warmup + linear decay,
    checkpoints every `cfg.checkpoint_every` steps, resuming from one if its recipe matches."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, losses = _resume(ckpt, cfg, names, params, opt)
    order = _order(len(examples), cfg.steps, cfg.batch_size, cfg.seed)
    model.train()
    with Bar(progress, cfg.steps, label, start=start, loss="-") as bar:
        for step in range(start, cfg.steps):
            batch = [examples[i] for i in order[step * cfg.batch_size : (step + 1) * cfg.batch_size]]
            ids, labels, mask = _collate(batch, pad_id, device)
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, cfg)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            if not torch.isfinite(loss):
                raise PortLLMError(f"loss became {float(loss)} at step {step}; lower --lr")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(step + 1, loss=f"{losses[-1]:.4f}")
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                _save_ckpt(ckpt, cfg, names, params, opt, step + 1, losses)
            if callback:
                callback(step + 1, losses[-1])
    model.eval()
    return losses, start, sum(p.numel() for p in params)


def _collate(batch: list[tuple[list[int], list[int]]], pad: int, device: str):
    width = max(len(x) for x, _ in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for j, (x, y) in enumerate(batch):
        ids[j, : len(x)] = torch.tensor(x)
        labels[j, : len(y)] = torch.tensor(y)
        mask[j, : len(x)] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def _save_ckpt(
    ckpt: Path,
    cfg: Any,
    names: list[str],
    params: list[torch.Tensor],
    opt: torch.optim.Optimizer,
    step: int,
    losses: list[float],
) -> None:
    from safetensors.torch import save_file

    tmp = ckpt.parent / f"{ckpt.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {}
    for i, (n, p) in enumerate(zip(names, params)):
        tensors[f"param.{n}"] = p.detach().cpu().contiguous()
        for k, v in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "config_key": cfg.key(), "losses": losses}))
    shutil.rmtree(ckpt, ignore_errors=True)
    tmp.rename(ckpt)


def _resume(
    ckpt: Path, cfg: Any, names: list[str], params: list[torch.Tensor], opt: torch.optim.Optimizer
) -> tuple[int, list[float]]:
    if not (ckpt / "state.json").is_file():
        return 0, []
    from safetensors.torch import load_file

    meta = json.loads((ckpt / "state.json").read_text())
    if meta.get("config_key") != cfg.key():
        shutil.rmtree(ckpt, ignore_errors=True)  # a checkpoint of another recipe: start over
        return 0, []
    state = load_file(str(ckpt / "state.safetensors"))
    with torch.no_grad():
        for i, (n, p) in enumerate(zip(names, params)):
            p.copy_(state[f"param.{n}"].to(p.device, p.dtype))
            s = {k.split(".", 2)[2]: v.to(p.device) for k, v in state.items() if k.startswith(f"opt.{i}.")}
            if s:
                opt.state[p] = s
    return int(meta["step"]), list(meta["losses"])


def _self_eval(
    model: Any, tok: Any, task: Any, data: str | Path | None, limit: int, base: str | Path
) -> dict[str, Any]:
    from .evaluate import LM, run_task
    from .tasks import load_examples

    lm = LM(model, tok, str(base))
    run = run_task(lm, task, load_examples(task, "eval", data, limit))
    return {"metric": run.metric, "value": run.value, "stderr": run.stderr, "n": run.n}
