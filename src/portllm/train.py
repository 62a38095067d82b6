"""Making a patch: LoRA fine-tuning with PEFT on one task, the paper's recipe by default.

Rank 8 on every linear projection, alpha 16, AdamW, loss on the answer tokens only, prompts
identical to the evaluation's. Deterministic for a seed (data order, LoRA init, no dropout),
and resumable: a checkpoint of the LoRA weights and optimizer state (safetensors + JSON, never
pickle) is kept beside the output until the patch is written. A checkpoint is resumed only by the
same run: recipe, base fingerprint, task, tokenized train data and init patch all match, else it is
discarded with a note.

A user's own data (`train_on_data`, `portllm train --data FILE.jsonl`): prompt/completion or chat
messages rows, read and masked as `sft` says, with a held-out part scored (reference log-likelihood per
token) before and after training; the manifest records the files' sha256, row counts and format only.

Warm start (`init=PATCH`, `portllm train --init`): the LoRA modules start from an existing patch's
factors instead of a fresh init, e.g. to re-tune a patch made on θ on the evolved θ'. Rank, alpha
and targets are then the patch's; the new patch records the init (path, weights sha256) in its
training record and continues the init's lineage.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .check import check
from .device import resolve_device
from .errors import PortLLMError
from .eval import LM, encode_pair, run_task
from .head import lm_loss
from .models import BaseRef, load_base
from .patch import ADAPTER_WEIGHTS, Patch, new_manifest, read_adapter, sha256_file
from .progress import Bar
from .resources import measure
from .sft import Encoded, SFTData, completion_loglik, encode_rows, read_sft, split_heldout
from .tasks import get_task, load_examples

PAPER_TARGETS: tuple[str, ...] = ()  # empty = the architecture's own "all linear projections" (architectures.json)
PAPER_RANK, PAPER_ALPHA = 8, 16.0


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
    device: str = "auto"  # device.resolve_device: auto = CUDA when present, else the CPU; never a silent fallback

    def key(self) -> str:
        """Identity of the recipe (checkpoints of another recipe are not resumed; the device is not the recipe)."""
        d = {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in asdict(self).items()
            if k not in ("checkpoint_every", "device")
        }
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainConfig(LoopConfig):
    """None / empty LoRA fields mean: the init patch's when warm-starting, else the paper's (8, 16, all linear)."""

    rank: int | None = None
    alpha: float | None = None
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
    init: dict[str, Any] | None = None  # the warm start's patch: path, weights_sha256, task, base_fingerprint
    heldout: dict[str, Any] | None = None  # --data runs: held-out rows and their log-likelihood before/after

    def to_dict(self) -> dict[str, Any]:
        extra = {"heldout": self.heldout} if self.heldout is not None else {}  # --data runs only
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
            "init": self.init,
            **extra,
        }


@dataclass
class WarmStart:
    """An init patch for a warm start, vetted against the base, and the LoRA shape it fixes."""

    patch: Patch
    cfg: TrainConfig  # rank, alpha and targets: the patch's
    lora_extra: dict[str, Any]  # rank/alpha patterns, rsLoRA, fan-in-fan-out: as the patch's config says
    record: dict[str, Any]  # path, weights_sha256, task, base_fingerprint

    @classmethod
    def open(cls, init: str | Path | Patch, base: BaseRef, cfg: TrainConfig) -> WarmStart:
        """Load `init` and refuse, in one line, a patch that does not fit `base` or LoRA options that contradict it."""
        patch = init if isinstance(init, Patch) else Patch.load(init)
        if patch.path is None:
            raise PortLLMError("an init patch must be saved first: its record names its path and weights sha256")
        where = f"init patch {patch.path}"
        check(patch, base).require("merge", f"{where} does not fit base {base}")
        if patch.full_weights:
            raise PortLLMError(
                f"{where} replaces whole tensors ({next(iter(patch.full_weights))}); a warm start takes LoRA "
                "factors only"
            )
        mods = patch.modules
        ranks = sorted({m.rank for m in mods.values()})
        types = sorted({n.rsplit(".", 1)[-1] for n in mods})
        rank = ranks[0] if len(ranks) == 1 else int(patch.config.get("r", ranks[-1]))
        alpha = float(patch.config.get("lora_alpha", rank))
        if cfg.rank is not None and ranks != [cfg.rank]:
            raise PortLLMError(f"--rank {cfg.rank} conflicts with {where} (rank {'/'.join(map(str, ranks))}); omit it")
        if cfg.alpha is not None and (float(cfg.alpha) != alpha or patch.config.get("alpha_pattern")):
            raise PortLLMError(f"--alpha {cfg.alpha:g} conflicts with {where} (alpha {alpha:g}); omit it")
        if cfg.target_modules and set(cfg.target_modules) not in (set(types), set(mods)):
            raise PortLLMError(
                f"--targets {','.join(cfg.target_modules)} conflicts with {where} ({','.join(types)}); omit it"
            )
        # module types when the patch covers every such matrix of the base, else its exact module names
        covered = {n[: -len(".weight")] for n in base.index if n.endswith(".weight")}
        covered = {n for n in covered if n.rsplit(".", 1)[-1] in types}
        targets = tuple(types) if covered == set(mods) else tuple(mods)
        if set(targets) == set(base.arch.lora_targets):
            targets = base.arch.lora_targets  # as a cold start names them, so the recipes compare equal
        extra = {
            "rank_pattern": dict(patch.config.get("rank_pattern") or {}),
            "alpha_pattern": dict(patch.config.get("alpha_pattern") or {}),
            "use_rslora": bool(patch.config.get("use_rslora")),
            "fan_in_fan_out": bool(patch.config.get("fan_in_fan_out")),
        }
        sha = patch.weights_sha256 or sha256_file(Path(patch.path) / ADAPTER_WEIGHTS)
        record = {
            "path": str(Path(patch.path).absolute()),
            "weights_sha256": sha,
            "task": patch.task,
            "base_fingerprint": patch.source_fingerprint,
        }
        return cls(patch, replace(cfg, rank=rank, alpha=alpha, target_modules=targets), extra, record)

    @property
    def lineage(self) -> list[dict[str, Any]]:
        return list(self.patch.manifest.lineage) if self.patch.manifest else []

    def load_into(self, model: Any) -> None:
        """Copy the patch's A and B into the fresh LoRA modules of a PEFT model, which must match them exactly."""
        from peft.tuners.lora import LoraLayer  # deferred: peft's import is slow; only a warm start needs it

        lm = model.base_model.model
        layers = {n: m for n, m in lm.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A}
        mods = self.patch.modules
        if set(layers) != set(mods):
            odd = sorted(set(layers) ^ set(mods))[0]
            raise PortLLMError(f"init patch {self.patch.path}: module {odd} is not adapted alike on this base")
        with torch.no_grad():
            for name, m in mods.items():
                layer = layers[name]
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                if a.shape != m.A.shape or b.shape != m.B.shape or abs(layer.scaling["default"] - m.scaling) > 1e-6:
                    raise PortLLMError(
                        f"init patch {self.patch.path}: module {name} has rank or scaling other than the LoRA "
                        "made for it"
                    )
                a.copy_(m.A)
                b.copy_(m.B)


def training_examples(
    task: Any, tok: Any, max_length: int, data: str | Path | None = None, limit: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per train example; labels are -100 on the prompt, so only the answer is learned."""
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


def example_order(n: int, steps: int, batch: int, seed: int) -> list[int]:
    """The example index of every slot of every step: seeded permutations, epoch after epoch."""
    g = torch.Generator().manual_seed(seed)
    need = steps * batch
    order: list[int] = []
    while len(order) < need:
        order += torch.randperm(n, generator=g).tolist()
    return order[:need]


def lr_at(step: int, cfg: Any) -> float:
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
    init: str | Path | Patch | None = None,
) -> TrainResult:
    """Fine-tune a LoRA patch for `task_name` on `base` and write it as a portllm patch (a user's own JSONL:
    `train_on_data`).

    `init`: a patch whose factors the LoRA modules start from (warm start) instead of a fresh init.
    """
    cfg = cfg or TrainConfig()
    base = BaseRef.of(base)  # resolved once for the model, its facts and the manifest
    out = Path(out)
    if out.exists() and not overwrite:
        raise PortLLMError(f"output {out} already exists; choose another path or pass --overwrite")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise PortLLMError("--steps and --batch-size must be at least 1")
    task = get_task(task_name)
    warm = WarmStart.open(init, base, cfg) if init is not None else None
    cfg = warm.cfg if warm else _paper_lora(cfg, base)
    ckpt = out.parent / f".{out.name}.ckpt"
    with measure() as usage:
        model, tok, examples = _load_for_training(base, task, cfg, data)
        device = resolve_device(cfg.device)
        model.to(device)
        model = with_lora(model, cfg, warm)
        identity = {
            "recipe": cfg.key(),
            "base": base.fingerprint,
            "task": task.identity,
            "train data": examples_digest(examples),
            "init patch": warm.record["weights_sha256"] if warm else None,
        }
        losses, start, n_trainable = fit(
            model, examples, cfg, tok.pad_token_id, ckpt, f"train {task.name}", progress, callback, identity
        )
    result = TrainResult(out, losses, usage.wall_s, usage.peak_rss_mb, usage.peak_gpu_mb, n_trainable, start)
    result.init = warm.record if warm else None
    if eval_limit:
        result.eval = _self_eval(model, tok, task, data, eval_limit, base)
    record = _training_record(cfg, task.identity, len(examples), result, device)  # a task file: name@sha256
    save_trained_patch(model, base, task.name, {"training": record, "eval_on_base": result.eval}, warm, out, overwrite)
    shutil.rmtree(ckpt, ignore_errors=True)
    return result


def train_on_data(
    base: str | Path,
    data: str | Path,
    out: str | Path,
    cfg: TrainConfig | None = None,
    eval_data: str | Path | None = None,
    eval_fraction: float | None = 0.1,
    overwrite: bool = False,
    progress: bool = False,
    callback: Callable[[int, float], None] | None = None,
    init: str | Path | Patch | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> TrainResult:
    """Fine-tune a LoRA patch on a user's JSONL of prompt/completion or messages rows (`sft` says how they are
    read and masked), scoring the held-out rows' reference log-likelihood per token before and after.

    Held out: `eval_data`'s rows, else a seeded `eval_fraction` of `data` (None or 0: none); "before" is the
    model training starts from (the base, or the `init` patch's factors on it). The manifest
    records each file's sha256, row count and format, never its rows; the data's sha256 is part of the
    checkpoint's identity, so a changed file never resumes an old run.
    """
    cfg = cfg or TrainConfig()
    base = BaseRef.of(base)
    out = Path(out)
    if out.exists() and not overwrite:
        raise PortLLMError(f"output {out} already exists; choose another path or pass --overwrite")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise PortLLMError("--steps and --batch-size must be at least 1")
    src = read_sft(data)
    held_src = read_sft(eval_data) if eval_data is not None else None
    train_rows, held_rows = split_heldout(src, held_src, eval_fraction)
    warm = WarmStart.open(init, base, cfg) if init is not None else None
    cfg = warm.cfg if warm else _paper_lora(cfg, base)
    ckpt = out.parent / f".{out.name}.ckpt"
    with measure() as usage:
        model, tok = load_model_for_training(base, cfg)
        enc = encode_rows(tok, train_rows[: cfg.max_examples], cfg.max_length)
        held = encode_rows(tok, held_rows, cfg.max_length)
        for what, e in (("train", enc), ("held-out", held)):
            if e.dropped:
                log(f"note: dropped {e.dropped} {what} rows: completion alone over --max-length {cfg.max_length}")
        _check_count(len(enc.examples), cfg, src.path.name)
        device = resolve_device(cfg.device)
        model.to(device)
        model = with_lora(model, cfg, warm)
        before = completion_loglik(model, held.examples, tok.pad_token_id, cfg.batch_size) if held.examples else None
        identity = {
            "recipe": cfg.key(),
            "base": base.fingerprint,
            "task": None,
            "data sha256": src.sha256,
            "train data": examples_digest(enc.examples),
            "init patch": warm.record["weights_sha256"] if warm else None,
        }
        losses, start, n_trainable = fit(
            model, enc.examples, cfg, tok.pad_token_id, ckpt, f"train {src.path.name}", progress, callback, identity
        )
    result = TrainResult(out, losses, usage.wall_s, usage.peak_rss_mb, usage.peak_gpu_mb, n_trainable, start)
    result.init = warm.record if warm else None
    data_record = {
        **src.record(),
        "train_rows": len(enc.examples),
        "dropped_too_long": enc.dropped,
        "heldout": _heldout_record(held_src, eval_fraction, held),
    }
    if held.examples:
        after = completion_loglik(model, held.examples, tok.pad_token_id, cfg.batch_size)
        result.heldout = {"rows": len(held.examples), "loglik_per_token_before": before}
        result.heldout["loglik_per_token_after"] = after
        data_record["heldout"] |= result.heldout
    record = {**_training_record(cfg, None, len(enc.examples), result, device), "data": data_record}
    save_trained_patch(model, base, None, {"training": record}, warm, out, overwrite)
    shutil.rmtree(ckpt, ignore_errors=True)
    return result


def _heldout_record(held_src: SFTData | None, fraction: float | None, held: Encoded) -> dict[str, Any]:
    """Where the held-out rows came from (their file's sha256 and rows, or the fraction), never their text."""
    where = {"source": "file", **held_src.record()} if held_src else {"source": "fraction", "fraction": fraction}
    return {**where, "dropped_too_long": held.dropped}


def _paper_lora(cfg: TrainConfig, base: BaseRef) -> TrainConfig:
    """A cold start's LoRA shape: what `cfg` names, else the paper's rank 8, alpha 16 on every linear projection."""
    return replace(
        cfg,
        rank=PAPER_RANK if cfg.rank is None else cfg.rank,
        alpha=PAPER_ALPHA if cfg.alpha is None else cfg.alpha,
        target_modules=cfg.target_modules or base.arch.lora_targets,
    )


def _load_for_training(
    base: BaseRef, task: Any, cfg: TrainConfig, data: str | Path | None
) -> tuple[Any, Any, list[tuple[list[int], list[int]]]]:
    """The base model, its tokenizer (padding with EOS where it has no pad token) and the tokenized train
    examples; refuses a run with fewer examples than one batch, or one that would repeat them too often."""
    model, tok = load_model_for_training(base, cfg)
    examples = training_examples(task, tok, cfg.max_length, data, cfg.max_examples)
    _check_count(len(examples), cfg, task.name)
    return model, tok, examples


def load_model_for_training(base: BaseRef, cfg: TrainConfig) -> tuple[Any, Any]:
    """The base model and its tokenizer, padding with EOS where it has no pad token."""
    model, tok = load_base(base, dtype=cfg.dtype)
    if tok is None:
        raise PortLLMError(f"{base} has no tokenizer; training needs one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _check_count(n: int, cfg: TrainConfig, name: str) -> None:
    """Refuse fewer examples than one batch, or so few that each would be repeated over `cfg.max_epochs` times."""
    if n < cfg.batch_size:
        raise PortLLMError(f"too few examples: {name} has {n} train examples, fewer than one batch of {cfg.batch_size}")
    if cfg.steps * cfg.batch_size > n * cfg.max_epochs:
        raise PortLLMError(
            f"too few examples for {cfg.steps} steps x {cfg.batch_size}: {name} has {n} "
            "train examples, "
            f"each would be seen more than {cfg.max_epochs} times; lower --steps or use more examples"
        )


def with_lora(model: Any, cfg: TrainConfig, warm: WarmStart | None) -> Any:
    """The model wrapped in fresh LoRA modules (seeded init), holding the init patch's factors on a warm start."""
    from peft import LoraConfig, get_peft_model  # deferred: peft's import is slow, and only training needs it

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
            **(warm.lora_extra if warm else {}),
        ),
    )
    if warm:
        warm.load_into(model)
    return model


def _training_record(
    cfg: TrainConfig, task: str | None, available: int, result: TrainResult, device: str
) -> dict[str, Any]:
    """The manifest's `training` record: the recipe, what the run saw and cost, its losses and init."""
    losses = result.losses
    return {
        **asdict(cfg),
        "target_modules": list(cfg.target_modules),
        "task": task,
        "examples_available": available,
        "examples_seen": cfg.steps * cfg.batch_size,
        "trainable_params": result.trainable_params,
        "wall_s": round(result.wall_s, 2),
        "peak_rss_mb": round(result.peak_rss_mb, 1),
        "peak_gpu_mb": result.peak_gpu_mb,
        "device": device,
        "resumed_from": result.resumed_from,
        "loss_first": losses[0] if losses else None,
        "loss_last": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "losses": [round(x, 4) for x in losses],
        "init": result.init,
    }


def save_trained_patch(
    model: Any,
    base: BaseRef,
    task: str | None,
    extra: dict[str, Any],
    warm: WarmStart | None,
    out: Path,
    overwrite: bool,
    event: dict[str, Any] | None = None,
) -> None:
    """Write the trained LoRA as a portllm patch of `base`; a warm start's lineage continues its init's.

    `event`: fields added to this run's lineage entry (a repair records its method and cost there)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        config, tensors = read_adapter(Path(tmp))
    config = dict(config, base_model_name_or_path=str(base))
    manifest = new_manifest(base.info, config, tensors, (event or {}).get("event", "trained"), task, extra)
    manifest.lineage[-1].update(event or {})
    if warm:  # the factors descend from the init patch: its history, then this run
        event = dict(manifest.lineage[-1], init={k: warm.record[k] for k in ("path", "weights_sha256")})
        manifest.lineage = [*warm.lineage, event]
    Patch(config, tensors, manifest).save(out, overwrite=overwrite)


def fit(
    model: Any,
    examples: list[tuple[list[int], list[int]]],
    cfg: Any,
    pad_id: int,
    ckpt: Path,
    label: str,
    progress: bool = False,
    callback: Callable[[int, float], None] | None = None,
    identity: dict[str, Any] | None = None,
) -> tuple[list[float], int, int]:
    """The shared training loop (patches and evolved bases): seeded order, AdamW, warmup + linear decay,
    checkpoints every `cfg.checkpoint_every` steps, resuming from one only if it was made by the same run.

    `identity` is everything that determines the result (JSON values; default: the recipe alone): a
    checkpoint of another base, task, data or init would otherwise resume the wrong weights.
    """
    identity = identity if identity is not None else {"recipe": cfg.key()}
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, losses = _resume(ckpt, identity, names, params, opt)
    order = example_order(len(examples), cfg.steps, cfg.batch_size, cfg.seed)
    model.train()
    with Bar(progress, cfg.steps, label, start=start, loss="-") as bar:
        for step in range(start, cfg.steps):
            batch = [examples[i] for i in order[step * cfg.batch_size : (step + 1) * cfg.batch_size]]
            ids, labels, mask = collate(batch, pad_id, device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            loss = lm_loss(model, ids, mask, labels)
            if not torch.isfinite(loss):
                raise PortLLMError(f"loss became {float(loss)} at step {step}; lower --lr")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(step + 1, loss=f"{losses[-1]:.4f}")
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                _save_ckpt(ckpt, identity, names, params, opt, step + 1, losses)
            if callback:
                callback(step + 1, losses[-1])
    model.eval()
    return losses, start, sum(p.numel() for p in params)


def collate(batch: list[tuple[list[int], list[int]]], pad: int, device: str):
    """Right-padded ids, labels (-100 on padding) and attention mask for one batch (training and PHATGOOSE gates)."""
    width = max(len(x) for x, _ in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for j, (x, y) in enumerate(batch):
        ids[j, : len(x)] = torch.tensor(x)
        labels[j, : len(y)] = torch.tensor(y)
        mask[j, : len(x)] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def examples_digest(examples: list[tuple[list[int], list[int]]]) -> str:
    """sha256 of the tokenized examples: the data, its slice, the tokenizer and max_length in one identity."""
    h = hashlib.sha256()
    for ids, labels in examples:
        h.update(len(ids).to_bytes(4, "little"))
        h.update(array("q", ids).tobytes())
        h.update(array("q", labels).tobytes())
    return h.hexdigest()[:16]


def _save_ckpt(
    ckpt: Path,
    identity: dict[str, Any],
    names: list[str],
    params: list[torch.Tensor],
    opt: torch.optim.Optimizer,
    step: int,
    losses: list[float],
) -> None:
    tmp = ckpt.parent / f"{ckpt.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {}
    for i, (n, p) in enumerate(zip(names, params)):
        tensors[f"param.{n}"] = p.detach().cpu().contiguous()
        for k, v in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "identity": identity, "losses": losses}))
    shutil.rmtree(ckpt, ignore_errors=True)
    tmp.rename(ckpt)


def _resume(
    ckpt: Path, identity: dict[str, Any], names: list[str], params: list[torch.Tensor], opt: torch.optim.Optimizer
) -> tuple[int, list[float]]:
    if not (ckpt / "state.json").is_file():
        return 0, []
    try:
        meta = json.loads((ckpt / "state.json").read_text())
    except ValueError:
        meta = {}
    # JSON round trip, so tuples and lists compare alike
    if meta.get("identity") != json.loads(json.dumps(identity)):
        was = meta.get("identity") if isinstance(meta.get("identity"), dict) else {}
        diff = [k for k in identity if was.get(k) != identity[k]] if was else ["version of portllm"]
        print(f"note: checkpoint {ckpt} is of another {', '.join(diff)}; discarded, starting over", file=sys.stderr)
        shutil.rmtree(ckpt, ignore_errors=True)
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
    lm = LM(model, tok, str(base))
    run = run_task(lm, task, load_examples(task, "eval", data, limit))
    return {"metric": run.metric, "value": run.value, "stderr": run.stderr, "n": run.n}
