"""`repair`: a patch for the new base that keeps what Δθ did on the old one, without labels.

The methods, behind one registry (`METHODS`):
- `distill`: a LoRA on θ' started from Δθ and trained to match θ+Δθ's outputs on unlabeled inputs
  (`distill.py`); the only method that learns, and the one that costs steps.
- `rescale`: one scale per layer type, chosen by agreement with θ+Δθ (`scales.py`); no training.
- `none`: Δθ declared for θ' unchanged (what `port` merges), for when nothing needs repairing.
- `auto`: the forecast decides: `none` below the margin, else `distill` (the only method the sweep shows
  winning back most of the loss at large drift: docs/sweep/repair).

The output is a normal patch of θ' (PEFT loads it, `port` merges it, `serve` serves it) whose lineage
records the method, the inputs' sha256 (never their content), the steps, wall time and peak memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..check import check
from ..device import resolve_device
from ..errors import PortLLMError
from ..models import BaseRef
from ..patch import Patch
from ..resources import measure
from ..train import TrainConfig, WarmStart, load_model_for_training, save_trained_patch, with_lora
from .distill import Agreement, DistillConfig, distill, split
from .inputs import RepairInputs, read_inputs
from .scales import GRID, choose_scales, scaled_by_type
from .teacher import teacher_targets

DEFAULT_MARGIN = 1.0  # points of predicted loss below which `auto` leaves the patch as it is


@dataclass
class RepairResult:
    """What a repair made, from what, and what it cost; `to_dict()` is `portllm repair --json`."""

    patch_dir: Path
    method: str
    inputs: dict[str, Any]
    steps: int = 0
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float | None = None
    before: Agreement | None = None  # θ'+Δθ (the plain port) against θ+Δθ on held-out inputs
    after: Agreement | None = None  # the repaired patch against θ+Δθ, same inputs
    losses: list[float] = field(default_factory=list)
    student_tokens: int = 0
    detail: dict[str, Any] = field(default_factory=dict)  # per-type scales, the forecast behind `auto`

    @property
    def warning(self) -> str | None:
        """Set where the repair missed its own objective: on the held-out inputs the repaired patch agrees with
        θ+Δθ less often than the plain port did (label-free; docs/sweep: it marked both Gemma cells where the
        repaired patch scored 2.0-2.4 points under the plain port, and one SmolLM2 cell where it gained 3.7)."""
        b, a = self.before, self.after
        if b is None or a is None or b.agreement is None or a.agreement is None or a.agreement >= b.agreement:
            return None
        return (
            f"on {a.n} held-out inputs the repaired patch agrees with θ+Δθ less than the plain port does "
            f"({b.agreement:.1%} -> {a.agreement:.1%}): it may score under the plain port; compare both with "
            "`portllm eval` on labelled data before choosing"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["warning"] = self.warning
        d["patch_dir"] = str(self.patch_dir)
        d["loss_first"] = self.losses[0] if self.losses else None
        d["loss_last"] = self.losses[-1] if self.losses else None
        d["losses"] = [round(x, 5) for x in self.losses]
        return d

    def event(self, old_fp: str | None, cfg: DistillConfig) -> dict[str, Any]:
        """The lineage entry of the repaired patch."""
        return {
            "event": "repair",
            "method": self.method,
            "from_fingerprint": old_fp,
            "inputs": self.inputs,
            "steps": self.steps,
            "wall_s": round(self.wall_s, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "peak_gpu_mb": self.peak_gpu_mb,
            "recipe": asdict(cfg) if self.method == "distill" else None,
            "detail": self.detail or None,
        }


@dataclass
class RepairJob:
    """One repair's fixed facts, handed to the method."""

    patch: Patch
    patch_path: Path
    new: BaseRef
    old: str | Path
    inputs_spec: str
    n: int
    data: str | Path | None
    cfg: DistillConfig
    dtype: str  # the student's training dtype (LoRA weights stay fp32)
    teacher_dtype: str
    device: str
    margin: float
    progress: Callable[[int, float], None] | None = None


def _distill(job: RepairJob, out: Path, overwrite: bool) -> RepairResult:
    inputs = read_inputs(job.inputs_spec, job.n, job.data)
    with measure() as usage:
        targets = teacher_targets(
            job.old, job.patch_path, inputs, job.cfg.max_length, job.cfg.gen_tokens, job.cfg.top_k, job.cfg.seed,
            job.teacher_dtype, job.device,
        )  # fmt: skip
        tcfg = TrainConfig(dtype=job.dtype, seed=job.cfg.seed)
        model, tok = load_model_for_training(job.new, tcfg)
        model.to(job.device)
        warm = WarmStart.open(job.patch, job.new, tcfg)
        model = with_lora(model, warm.cfg, warm)
        run = distill(model, tok.pad_token_id, targets, job.cfg, job.progress)
    record = _inputs_record(inputs, targets)
    result = RepairResult(
        out, "distill", record, job.cfg.steps, usage.wall_s, usage.peak_rss_mb, usage.peak_gpu_mb,
        run.before, run.after, run.losses, run.student_tokens, {"trained_on": run.trained_on},
    )  # fmt: skip
    event = result.event(job.patch.source_fingerprint, job.cfg)
    save_trained_patch(model, job.new, job.patch.task, {"repair": event}, warm, out, overwrite, event=event)
    return result


def _rescale(job: RepairJob, out: Path, overwrite: bool) -> RepairResult:
    inputs = read_inputs(job.inputs_spec, job.n, job.data)
    if inputs.kind != "choices":
        raise PortLLMError(
            "--method rescale needs answer options to agree on: pass --inputs TASK (multiple choice) or use distill"
        )
    with measure() as usage:
        targets = teacher_targets(
            job.old, job.patch_path, inputs, job.cfg.max_length, 0, 0, job.cfg.seed, job.teacher_dtype, job.device
        )
        train_idx, held = split(len(targets.pairs), job.cfg.heldout)
        scales, before, after = choose_scales(
            job.patch_path, job.new.name, targets, train_idx, held, GRID, job.teacher_dtype, job.device
        )
    result = RepairResult(
        out, "rescale", _inputs_record(inputs, targets), 0, usage.wall_s, usage.peak_rss_mb, usage.peak_gpu_mb,
        before, after, detail={"scales": scales},
    )  # fmt: skip
    _write_restamped(job, out, overwrite, result, scaled_by_type(job.patch, scales))
    return result


def _none(job: RepairJob, out: Path, overwrite: bool, detail: dict[str, Any] | None = None) -> RepairResult:
    result = RepairResult(out, "none", {"source": job.inputs_spec}, detail=detail or {})
    _write_restamped(job, out, overwrite, result, dict(job.patch.tensors))
    return result


def _auto(job: RepairJob, out: Path, overwrite: bool) -> RepairResult:
    from ..forecast import forecast  # deferred: forecast imports the evaluation stack only when asked

    f = forecast(job.patch_path, job.new.name, job.old, job.inputs_spec, min(job.n, 200), job.data, None,
                 job.teacher_dtype, None, job.device)  # fmt: skip
    if f.loss_points is None:
        raise PortLLMError(
            "--method auto decides by the forecast, which needs a multiple-choice task's inputs (--inputs TASK); "
            "choose --method distill for text or self inputs"
        )
    detail = {"forecast_loss_points": round(f.loss_points, 2), "margin": job.margin}
    if f.loss_points < job.margin:
        return _none(job, out, overwrite, dict(detail, chose="none"))
    result = _distill(job, out, overwrite)
    result.detail.update(detail, chose="distill")
    return result


METHODS: dict[str, Callable[[RepairJob, Path, bool], RepairResult]] = {
    "distill": _distill,
    "rescale": _rescale,
    "none": _none,
    "auto": _auto,
}


def _inputs_record(inputs: RepairInputs, targets: Any) -> dict[str, Any]:
    rec = inputs.record()
    if inputs.generated:  # what θ+Δθ wrote is the data: its hash, and the seed prompts' beside it
        rec = dict(rec, seed_prompts_sha256=rec["sha256"], seed_prompts=len(inputs.prompts), sha256=targets.sha256)
    return rec


def _write_restamped(job: RepairJob, out: Path, overwrite: bool, result: RepairResult, tensors: dict[str, Any]) -> None:
    """Δθ's factors (rescaled or not) declared for θ', with the repair in its lineage."""
    p = job.patch.restamped(job.new.info, result.event(job.patch.source_fingerprint, job.cfg))
    p.manifest.extra = dict(p.manifest.extra or {}, repair=p.manifest.lineage[-1])
    Patch(p.config, tensors, p.manifest).save(out, overwrite=overwrite)


def repair(
    patch: str | Path,
    base: str | Path,
    old: str | Path,
    out: str | Path,
    inputs: str = "self",
    method: str = "distill",
    n: int = 256,
    cfg: DistillConfig | None = None,
    data: str | Path | None = None,
    dtype: str = "bfloat16",
    teacher_dtype: str = "float32",
    device: str = "cpu",
    margin: float = DEFAULT_MARGIN,
    overwrite: bool = False,
    progress: Callable[[int, float], None] | None = None,
) -> RepairResult:
    """Repair `patch` (made on `old`) for `base`, writing a patch of `base` to `out`."""
    if method not in METHODS:
        raise PortLLMError(f"unknown repair method {method!r}; choose from {', '.join(METHODS)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise PortLLMError(f"output {out} already exists; choose another path or pass --overwrite")
    cfg = cfg or DistillConfig()
    if cfg.steps < 0 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise PortLLMError("--steps must be ≥ 0, --batch-size ≥ 1 and --lr above 0")
    p = Patch.load(patch)
    if p.full_weights:
        raise PortLLMError(f"{patch} replaces whole tensors; repair works on LoRA factors only")
    new = BaseRef.of(base)
    check(p, new).require("merge", f"patch {patch} does not fit base {base}")
    job = RepairJob(
        p, Path(patch), new, old, inputs, n, data, cfg, dtype, teacher_dtype, resolve_device(device), margin, progress
    )
    return METHODS[method](job, out, overwrite)
