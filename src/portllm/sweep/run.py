"""The sweep: drift levels × tasks × seeds, every step cached by content and resumable.

For each task and seed a patch Δθ is trained on θ once; for each evolved base θ_L it is ported
(the real merged port, then scored and deleted) and scored against θ+Δθ on the same examples.
θ_L zero-shot, re-tunes at chosen levels and warm starts complete the cells. The forecast of each
cell uses only what a user has without labels (the weights, and the two models' choice
probabilities on the inputs); its calibration is validated on drift levels it did not see.

The steps, in order: open the sweep (`SweepContext.open`), build the bases (`build_bases`), then per
task: train the patches and score θ and θ+Δθ (`prepare_task`), the ported cells with their correction
(`evaluate_cells`, `correct`), re-tunes (`retune`), warm starts (`warm_start`); after every task the
forecast is validated and the report written (`write_report`). Each step finds its artefacts in the
`SweepCache` before it computes them.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import steps
from ..device import BF16_IF_NATIVE, native_bf16, training_dtype
from ..errors import PortLLMError
from ..eval import open_lm, read_run, run_task
from ..evolve import EvolveConfig, EvolveResult, drift_sums, evolve
from ..forecast import choice_signals, weight_signals
from ..interpolate import interpolate
from ..models import architecture_of, cache_root, family_of, fingerprint, resolve_base
from ..patch import Patch
from ..rescale import SCALES, choose_scale, scaled_patch
from ..stats import Paired, majority, paired
from ..tasks import Example, Task, data_dir, get_task, load_examples, task_key
from ..train import TrainConfig
from .cache import SweepCache
from .plan import PLANS, Evolution, SweepPlan, TaskRecipe
from .repaired import repairs, retune_wall
from .repaired import summary as repair_summary
from .report import SIGNALS_SAME_AS_SCORED, finish, read_joins

Log = Callable[[str], None]
Records = list[dict[str, Any]]  # one eval run's per-example records of one task


def projection_drift(sums: dict[str, tuple[float, float]], targets: tuple[str, ...]) -> float:
    """||θ' − θ||_F / ||θ||_F over all LoRA-target projection matrices together (from `evolve.drift_sums`)."""
    num = sum(n for k, (n, _) in sums.items() if k in targets)
    den = sum(d for k, (_, d) in sums.items() if k in targets)
    return math.sqrt(num / den) if den else 0.0


def text_kl(old_dir: Path, new_dir: Path, data: Path, n: int, dtype: str, device: str = "cpu") -> float:
    """Mean per-token KL(θ ‖ θ') on held-out text (wikitext-2 test lines): how much behaviour moved."""
    f = data / "text" / "wikitext-2" / "test.txt"
    lines = [x.strip() for x in f.read_text(errors="replace").splitlines() if len(x.strip()) > 40][:n]
    if not lines:
        return float("nan")
    a, b = open_lm(old_dir, dtype=dtype, device=device), open_lm(new_dir, dtype=dtype, device=device)
    total = count = 0.0
    with torch.inference_mode():
        for t in lines:
            ids = a.tokenizer(t, return_tensors="pt").input_ids[:, :128].to(device)
            la = torch.log_softmax(a.model(ids).logits[0].float(), -1)
            lb = torch.log_softmax(b.model(ids).logits[0].float(), -1)
            total += float((la.exp() * (la - lb)).sum())
            count += ids.shape[1]
    return total / count


def _accuracy(recs: Records) -> float:
    return sum(float(x["correct"]) for x in recs) / len(recs)


def _correct_flags(recs: Records) -> list[float]:
    return [float(x["correct"]) for x in recs]


@dataclass
class SweepContext:
    """What every step of one sweep shares: the plan, θ and its facts, the data, the cache, the log.

    Its methods are the cached units of work (evolve, train, score); each returns the cached artefact
    when there is one, so a step only computes what no earlier run left behind."""

    plan: SweepPlan
    theta: Path
    fp: str  # θ's fingerprint
    targets: tuple[str, ...]  # θ's LoRA-target projections
    data: Path
    cache: SweepCache
    log: Log = print
    progress: bool = False
    device: str = "cpu"  # a resolved device: training, scoring, signals and repairs run there (port/drift: CPU)

    @classmethod
    def open(
        cls, plan: SweepPlan, base: str, data: Path, cache: str | Path | None, log: Log, progress: bool,
        device: str = "cpu",
    ) -> SweepContext:  # fmt: skip
        if plan.dtype == BF16_IF_NATIVE and not native_bf16(device):
            log(f"bf16 is not native on {device} (no AMX / AVX512-BF16): the patches train in float32")
        plan = replace(plan, dtype=training_dtype(plan.dtype, device))  # the cache keys and the report: concrete
        theta = resolve_base(base)
        fp = fingerprint(theta)
        root = Path(cache) if cache else cache_root() / "sweep"
        # steps on another device give other bits (bf16 kernels, reduction order): their own entries, never mixed
        store = SweepCache(root if device == "cpu" else root / f"on-{device.split(':')[0]}")
        ctx = cls(plan, theta, fp, architecture_of(theta).lora_targets, data, store, log, progress, device)
        log(f"θ = {base} ({fp}); plan {plan.name}: {len(plan.tasks)} tasks x {len(plan.seeds)} seeds on {device}")
        return ctx

    def evolved(self, ev: Evolution) -> Path:
        """θ after the real continued-pretraining run `ev`."""
        cfg = EvolveConfig(
            mode="full",
            steps=ev.steps,
            lr=ev.lr,
            batch_size=self.plan.batch_size,
            max_length=ev.max_length,
            seed=0,
            dtype="float32",
            targets=self.targets,
            device=self.device,
        )

        def make(d: Path) -> None:
            self.log(f"evolving θ -> {ev.label} ...")
            evolve(self.theta, ev.corpus, d, cfg, data=self.data, overwrite=True, progress=self.progress)

        return self.cache.directory("evolved", (self.fp, ev.corpus, cfg.key()), "portllm_lineage.json", make)

    def train_config(self, r: TaskRecipe, seed: int, steps_: int | None = None) -> TrainConfig:
        return TrainConfig(
            lr=r.lr,
            steps=steps_ or r.steps,
            batch_size=self.plan.batch_size,
            max_length=r.max_length,
            seed=seed,
            dtype=self.plan.dtype,
            target_modules=self.targets,
            device=self.device,  # the sweep's, never TrainConfig's auto
        )

    def patch_on(self, model_dir: Path, model_fp: str, task: str, r: TaskRecipe, seed: int) -> Path:
        """Δ for `task` trained on the model (θ, or a θ' for a re-tune)."""
        cfg = self.train_config(r, seed)

        def make(p: Path) -> None:
            self.log(f"  training Δ for {task} (seed {seed}) on {model_fp[:12]} ...")
            steps.train_patch_step(model_dir, task, p, cfg, self.data, progress=self.progress)

        return self.cache.directory("patches", (model_fp, task_key(task), cfg.key()), "portllm.json", make)

    def score(
        self, model_dir: Path, model_fp: str, patch: Path | None, ported: bool, task: str, limit: int | None
    ) -> Records:
        """The task's per-example records of the model, with the patch attached or (`ported`) merged into
        it first; the ported directory is scored, then deleted."""
        sha = Patch.load(patch, verify=False).weights_sha256 if patch else None

        def make(d: Path) -> None:
            if ported:
                tmp = self.cache.root / "ported" / d.name
                self.log(f"  porting onto {model_fp[:12]} and scoring {task} ...")
                steps.port_step(patch, model_dir, tmp)
                steps.eval_step(tmp, None, task, limit, self.data, d, self.plan.eval_dtype, device=self.device)
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                self.log(f"  scoring {task} on {model_fp[:12]}" + (" + patch" if patch else "") + " ...")
                steps.eval_step(model_dir, patch, task, limit, self.data, d, self.plan.eval_dtype, device=self.device)

        parts = (model_fp, sha, ported, task_key(task), limit, self.plan.eval_dtype)
        return read_run(self.cache.directory("evals", parts, "results.json", make))[1][get_task(task).name]

    def signal_records(self, model_dir: Path, model_fp: str, patch: Path, ts: TaskState) -> Records:
        """The model with `patch` attached at runtime (what `forecast` compares; equal to the port, test_port)
        on the task's signal inputs: per-choice records whose gold labels the forecast never reads."""
        sha = Patch.load(patch, verify=False).weights_sha256
        idx = [e.idx for e in ts.signal_examples]

        def make() -> Records:
            self.log(f"  signals: {ts.name} on {model_fp[:12]} + patch ({len(idx)} {self.plan.signal_split} inputs)")
            lm = open_lm(model_dir, patch, dtype=self.plan.eval_dtype, device=self.device)
            return run_task(lm, ts.task, ts.signal_examples).records

        parts = (model_fp, sha, task_key(ts.name), self.plan.signal_split, idx, self.plan.eval_dtype)
        return self.cache.json("signals", parts, make)


@dataclass
class TaskState:
    """One task's shared inputs to its cells: the examples, θ's and θ+Δθ's answers, the patches."""

    name: str
    recipe: TaskRecipe
    task: Task
    examples: list[Example]
    majority: float
    zero: Records  # θ zero-shot
    patches: dict[int, Path]  # seed -> Δθ trained on θ
    with_patch: dict[int, Records]  # seed -> θ+Δθ
    levels: list[dict[str, Any]]  # the bases this task is scored on
    signal_examples: list[Example] = field(default_factory=list)  # the forecast's inputs (plan.signal_split)
    signal_with_patch: dict[int, Records] = field(default_factory=dict)  # seed -> θ+Δθ on them

    @property
    def first_seed(self) -> int:
        return next(iter(self.patches))


@dataclass
class SweepResults:
    """Everything measured so far; the report is written from it after every task."""

    levels: list[dict[str, Any]]
    behaviour: dict[str, dict[str, float]] = field(default_factory=dict)  # level -> task -> agreement with θ
    cells: list[dict[str, Any]] = field(default_factory=list)
    retunes: list[dict[str, Any]] = field(default_factory=list)
    warm: list[dict[str, Any]] = field(default_factory=list)


def sweep(
    plan: str | SweepPlan = "full",
    base: str = "smollm2-135m",
    out: str | Path = "runs/sweep",
    data: str | Path | None = None,
    cache: str | Path | None = None,
    log: Log = print,
    progress: bool = False,
    join: tuple[str | Path, ...] = (),
    device: str = "cpu",
) -> dict[str, Any]:
    """Run (or resume) the grid and write OUT/report.json, OUT/report.md, OUT/*.png, OUT/calibration.json.
    `join`: other base families' sweep report.json files whose cells join the validation and calibration.
    `device`: a resolved device (device.resolve_device) for training, scoring, signals and repairs."""
    plan = PLANS[plan] if isinstance(plan, str) else plan
    _runs_on(plan, device)
    data = data_dir(data)
    if data is None:
        raise PortLLMError("sweep needs the benchmark data: set --data-dir or PORTLLM_DATA")
    if join and plan.kind == "generation":
        raise PortLLMError("--join is for multiple-choice sweeps: a generation sweep has its own calibration")
    read_joins({"name": base, "model_family": family_of(resolve_base(base))}, join)  # refused before any work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if plan.kind == "generation":
        from .generation import generation_sweep  # deferred: generation.py builds on this module

        return generation_sweep(plan, base, out, data, cache, log, progress)
    t_start = time.perf_counter()
    ctx = SweepContext.open(plan, base, data, cache, log, progress, device)
    results = SweepResults(build_bases(ctx))
    report: dict[str, Any] = {}
    for name, recipe in plan.tasks.items():
        ts = prepare_task(ctx, name, recipe, results.levels)
        evaluate_cells(ctx, ts, results)
        results.retunes += retune(ctx, ts, results.cells)
        if plan.warm_steps and recipe.warm:
            results.warm += warm_start(ctx, ts)
        # a report after every task, so a run stopped mid-way still shows what it measured
        report = write_report(ctx, results, base, out, t_start, join)
    return report


def _runs_on(plan: SweepPlan, device: str) -> None:
    """Refuse, before any work, what this plan would do on the CPU although `device` was asked for."""
    if device == "cpu":
        return
    if plan.kind == "generation":
        raise PortLLMError(f"sweep --device {device}: the generation plan runs on the CPU only (its signals are not "
                           "threaded to a device); use --device cpu")  # fmt: skip
    if any(r.correct for r in plan.tasks.values()) and (plan.correct_levels or plan.correct_real):
        raise PortLLMError(f"sweep --device {device}: the rescale correction runs on the CPU only; pass --no-correct "
                           "or use --device cpu")  # fmt: skip


def build_bases(ctx: SweepContext) -> list[dict[str, Any]]:
    """The evolved bases: θ + t·(θ'−θ) at the plan's levels along one real update, then the plan's other
    real evolved bases; each with its drift from θ (per layer type, and over the LoRA targets) and KL."""
    plan = ctx.plan
    direction = ctx.evolved(plan.direction)
    fp_dir = EvolveResult.read(direction).fingerprint
    levels: list[dict[str, Any]] = []
    for t in plan.levels:

        def make(d: Path, t: float = t) -> None:
            ctx.log(f"interpolating θ(t={t:g}) along {plan.direction.label} ...")
            interpolate(ctx.theta, direction, t, d, overwrite=True)

        d = ctx.cache.directory("levels", (ctx.fp, fp_dir, t), "portllm_lineage.json", make)
        levels.append({"label": f"t={t:g}", "t": t, "evolution": f"interpolated:{plan.direction.label}", "dir": d})
    for ev in plan.real:
        d = ctx.evolved(ev)
        levels.append({"label": ev.label, "t": None, "evolution": ev.label, "corpus": ev.corpus, "dir": d})
    for lv in levels:
        _measure_drift(ctx, lv)
    return levels


def _measure_drift(ctx: SweepContext, lv: dict[str, Any]) -> None:
    """Fill in the level's fingerprint, projection drift, drift per layer type and KL on held-out text."""
    plan = ctx.plan
    lv["fingerprint"] = fingerprint(lv["dir"])
    sums = ctx.cache.json("drift_sums", (ctx.fp, lv["fingerprint"]), lambda: drift_sums(ctx.theta, lv["dir"]))
    lv["drift"] = projection_drift(sums, ctx.targets)
    lv["drift_by_type"] = {k: math.sqrt(n / d) if d else 0.0 for k, (n, d) in sums.items()}
    lv["kl_text"] = ctx.cache.json(
        "kl_text",
        (ctx.fp, lv["fingerprint"], plan.kl_texts),
        lambda: (
            text_kl(ctx.theta, lv["dir"], ctx.data, plan.kl_texts, plan.eval_dtype, ctx.device)
            if plan.kl_texts
            else None
        ),
    )
    ctx.log(f"  {lv['label']}: projection drift {lv['drift']:.3%}, KL on text {lv['kl_text']}")


def prepare_task(ctx: SweepContext, name: str, r: TaskRecipe, levels: list[dict[str, Any]]) -> TaskState:
    """The task's eval examples, θ zero-shot, a patch per seed trained on θ and θ+Δθ's answers."""
    t = get_task(name)
    examples = load_examples(t, "eval", ctx.data, r.eval_limit)
    maj = majority([e.gold for e in examples])[1]
    ctx.log(f"[{name}] {len(examples)} eval examples, majority class {maj:.3f}")
    zero = ctx.score(ctx.theta, ctx.fp, None, False, name, r.eval_limit)
    patches = {s: ctx.patch_on(ctx.theta, ctx.fp, name, r, s) for s in ctx.plan.seeds}
    with_patch = {s: ctx.score(ctx.theta, ctx.fp, patches[s], False, name, r.eval_limit) for s in ctx.plan.seeds}
    ts = TaskState(name, r, t, examples, maj, zero, patches, with_patch, [lv for lv in levels if on_grid(r, lv)])
    if ctx.plan.signal_split != "eval":
        n = r.signal_rows or ctx.plan.signal_rows
        ts.signal_examples = signal_examples(t, ctx.plan.signal_split, ctx.data, n, examples)
        ts.signal_with_patch = {s: ctx.signal_records(ctx.theta, ctx.fp, patches[s], ts) for s in ctx.plan.seeds}
    return ts


UNSCORED = "eval-unscored"  # plan.signal_split: the eval split's rows after the scored ones


def signal_examples(task: Task, split: str, data: Path, n: int, scored: list[Example]) -> list[Example]:
    """The forecast's n inputs, none of them a scored item (not even by its prompt: SST-2's train and held-out
    parts share a few short phrases). `split`: "train" (what the patch was trained on: a small train set is
    memorised, and θ+Δθ is over-confident there), or "eval-unscored" (the eval split's rows after the scored
    ones: inputs the patch never saw, as `forecast --inputs TASK` reads by default)."""
    if split == "eval":
        raise PortLLMError("signal inputs from the eval split are the scored items; use train or eval-unscored")
    rows = load_examples(task, "eval", data)[len(scored) :] if split == UNSCORED else load_examples(task, split, data)
    seen = {tuple(e.contexts) for e in scored}
    kept = [e for e in rows if tuple(e.contexts) not in seen][:n]
    if len(kept) < min(n, 50):
        raise PortLLMError(
            f"{task.name}: {len(kept)} {split} inputs outside the scored items; the forecast's signals need "
            f"{min(n, 50)}: score fewer eval rows or use the train split"
        )
    return kept


def evaluate_cells(ctx: SweepContext, ts: TaskState, results: SweepResults) -> None:
    """Per base and seed: port Δθ onto θ', score it paired against θ+Δθ, record the forecast's raw signals,
    and (seed 0, where the plan says) the rescale correction. Appends to `results`."""
    r = ts.recipe
    for lv in ts.levels:
        ev = ctx.score(lv["dir"], lv["fingerprint"], None, False, ts.name, r.eval_limit)
        agree = sum(a["pred"] == b["pred"] for a, b in zip(ts.zero, ev)) / len(ev)
        results.behaviour.setdefault(lv["label"], {})[ts.name] = agree
        for s in ctx.plan.seeds:
            ported = ctx.score(lv["dir"], lv["fingerprint"], ts.patches[s], True, ts.name, r.eval_limit)
            cell = _cell(ctx, ts, lv, s, ev, ported)
            if s == ctx.plan.seeds[0] and r.correct and _corrects(ctx.plan, lv):
                cell["corrected"] = correct(ctx, ts, lv, ported)
            cell["repaired"] = cell["repaired_by_inputs"] = None
            if s == ctx.plan.seeds[0] and r.repair and _repairs(ctx.plan, lv):
                cell["repaired_by_inputs"] = repairs(ctx, ts, lv, ported)
                cell["repaired"] = cell["repaired_by_inputs"].get("task")
            results.cells.append(cell)
        ctx.log(
            f"  {lv['label']}: ported "
            + ", ".join(
                f"{c['evolved+patch']:.3f}" for c in results.cells if c["task"] == ts.name and c["level"] == lv["label"]
            )
        )


def _cell(ctx: SweepContext, ts: TaskState, lv: dict[str, Any], s: int, ev: Records, ported: Records) -> dict[str, Any]:
    """One cell (task, seed, base): accuracies, the paired loss of the port, flips, the forecast's signals."""
    target = ts.with_patch[s]
    pr = paired(_correct_flags(target), _correct_flags(ported), iters=2000, seed=s)
    patch = ts.patches[s]
    ws = ctx.cache.json(
        "weights", (patch.name, lv["fingerprint"]), lambda: asdict(weight_signals(patch, lv["dir"], ctx.theta))
    )
    if ts.signal_examples:
        on_evolved = ctx.signal_records(lv["dir"], lv["fingerprint"], patch, ts)
        sig = choice_signals(ts.signal_with_patch[s], on_evolved, ts.signal_examples, ts.task)
        inputs = f"{ctx.plan.signal_split}: {len(ts.signal_examples)} inputs, none of them scored"
    else:
        sig, inputs = choice_signals(target, ported, ts.examples, ts.task), SIGNALS_SAME_AS_SCORED
    return {
        "task": ts.name,
        "seed": s,
        "level": lv["label"],
        "t": lv["t"],
        "evolution": lv["evolution"],
        "drift": lv["drift"],
        "n": len(ts.examples),
        "majority": ts.majority,
        "base": _accuracy(ts.zero),
        "evolved": _accuracy(ev),
        "base+patch": pr.acc_a,
        "evolved+patch": pr.acc_b,
        "evolved+retuned": None,
        "loss": pr.acc_a - pr.acc_b,
        "loss_ci": [-pr.ci_high, -pr.ci_low],
        "mcnemar_p": pr.mcnemar_p,
        "neg_flips": pr.negative_flips,
        "pos_flips": pr.positive_flips,
        "neg_flip_rate": pr.negative_flips / pr.n,
        "identical_predictions": all(x["pred"] == y["pred"] for x, y in zip(target, ported)),
        "signals_inputs": inputs,
        "forecast": {
            "raw_loss": -sig.expected_change,
            "raw_neg_flip_rate": sig.expected_neg_flip_rate,
            "disagreement": sig.disagreement,
            "mean_kl": sig.mean_kl,
            "subspace_disturbance": ws["subspace_disturbance"],
            "cos": ws["cos"],
            "drift_to_patch": ws["drift_to_patch"],
            "loss": None,  # filled out of sample by the validation (calibrate.validate)
            "neg_flip_rate": None,
        },
    }


def correct(ctx: SweepContext, ts: TaskState, lv: dict[str, Any], ported: Records) -> dict[str, Any]:
    """The rescale correction on one cell (seed 0): λ chosen without labels, then scored paired against the
    plain port and against θ+Δθ."""
    plan, seed = ctx.plan, ts.first_seed
    patch = ts.patches[seed]
    sha = Patch.load(patch, verify=False).weights_sha256
    choice = ctx.cache.json(
        "rescale",
        (sha, lv["fingerprint"], ts.name, plan.correct_inputs, SCALES),
        lambda: choose_scale(patch, ctx.theta, lv["dir"], ts.name, plan.correct_inputs, SCALES, ctx.data).to_dict(),
    )
    lam = choice["scale"]
    if lam == 1.0:
        recs = ported
    else:
        scaled = ctx.cache.directory("scaled", (sha, lam), "portllm.json", lambda p: scaled_patch(patch, lam, p))
        recs = ctx.score(lv["dir"], lv["fingerprint"], scaled, True, ts.name, ts.recipe.eval_limit)
    fixed = _correct_flags(recs)
    vs_plain = paired(_correct_flags(ported), fixed, iters=2000)
    vs_target = paired(_correct_flags(ts.with_patch[seed]), fixed, iters=2000)
    return {
        "scale": lam,
        "inputs": choice["n"],
        "agreement": choice["agreement"],
        "evolved+patch": vs_plain.acc_b,
        "gain_over_plain": vs_plain.diff,
        "gain_ci": [vs_plain.ci_low, vs_plain.ci_high],
        "mcnemar_p": vs_plain.mcnemar_p,
        "loss": -vs_target.diff,
    }


def retune(ctx: SweepContext, ts: TaskState, cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At the re-tune levels (seed 0): Δθ' trained cold on θ' against the ported Δθ, paired. Also fills the
    matching cells' evolved+retuned."""
    r, seed = ts.recipe, ts.first_seed
    rows = []
    for t in ctx.plan.retune_levels if r.retune_levels is None else r.retune_levels:
        lv = next((x for x in ts.levels if x["t"] == t), None)
        if lv is None:
            continue
        retuned = ctx.patch_on(lv["dir"], lv["fingerprint"], ts.name, r, seed)
        rt = ctx.score(lv["dir"], lv["fingerprint"], retuned, False, ts.name, r.eval_limit)
        ported = ctx.score(lv["dir"], lv["fingerprint"], ts.patches[seed], True, ts.name, r.eval_limit)
        pr: Paired = paired(_correct_flags(rt), _correct_flags(ported), iters=2000)
        rows.append(
            {
                "task": ts.name,
                "level": lv["label"],
                "drift": lv["drift"],
                "seed": seed,
                "retuned": pr.acc_a,
                "ported": pr.acc_b,
                "ported_minus_retuned": pr.diff,
                "ci": [pr.ci_low, pr.ci_high],
                "mcnemar_p": pr.mcnemar_p,
                "steps": r.steps,
                "retune_wall_s": retune_wall(retuned),
            }
        )
        for c in cells:
            if c["task"] == ts.name and c["level"] == lv["label"] and c["seed"] == seed:
                c["evolved+retuned"] = pr.acc_a
    return rows


def warm_start(ctx: SweepContext, ts: TaskState) -> list[dict[str, Any]]:
    """At the largest drift: re-tune for k steps from Δθ (warm) and from scratch (cold), scored against θ+Δθ."""
    r, seed = ts.recipe, ts.first_seed
    init = ts.patches[seed]
    lv = max((x for x in ts.levels if x["t"] is not None), key=lambda x: x["t"])
    goal = _accuracy(ts.with_patch[seed])
    rows = []
    for k in ctx.plan.warm_steps:
        for mode in ("warm", "cold"):
            cfg = ctx.train_config(r, seed, k)

            def make(p: Path, k: int = k, mode: str = mode, cfg: TrainConfig = cfg) -> None:
                ctx.log(f"  {mode} re-tune, {k} steps ...")
                kw = {"init": init} if mode == "warm" else {}
                steps.train_patch_step(lv["dir"], ts.name, p, cfg, ctx.data, progress=ctx.progress, **kw)

            parts = (lv["fingerprint"], ts.name, cfg.key(), mode, init.name)
            p = ctx.cache.directory("warm", parts, "portllm.json", make)
            acc = _accuracy(ctx.score(lv["dir"], lv["fingerprint"], p, False, ts.name, r.eval_limit))
            rows.append(
                {
                    "task": ts.name,
                    "level": lv["label"],
                    "drift": lv["drift"],
                    "mode": mode,
                    "steps": k,
                    "accuracy": acc,
                    "base+patch": goal,
                    "reached": acc >= goal,
                }
            )
    return rows


def write_report(
    ctx: SweepContext, results: SweepResults, base: str, out: Path, t_start: float, join: tuple = ()
) -> dict[str, Any]:
    """Validate and fit the forecast's calibration on the cells so far (`report.finish`); write OUT/report.json,
    report.md, calibration.json and the charts. Every cell names its base family: the base as given."""
    plan, cells = ctx.plan, results.cells
    for c in cells:
        c.setdefault("family", Path(base).name if os.sep in base else base)
    report = {
        "plan": plan.to_dict(),
        "base": {"name": base, "fingerprint": ctx.fp, "model_family": family_of(ctx.theta)},
        "levels": [
            {k: v for k, v in lv.items() if k != "dir"} | {"agreement_with_base": results.behaviour.get(lv["label"])}
            for lv in results.levels
        ],
        "cells": cells,
        "retunes": results.retunes,
        "warm_start": results.warm,
        "correction": correction_summary(cells),
        "repair": repair_summary(cells, results.retunes),
        "forecast_validation": None,  # filled by report.finish
        "calibration": None,
        "machine": machine(ctx.device),
        "wall_s": time.perf_counter() - t_start,
    }
    return finish(report, out, join)


def machine(device: str) -> dict[str, Any]:
    """Where the sweep ran: the host, and the accelerator its steps used (None on the CPU)."""
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(), "device": gpu}


def on_grid(r: TaskRecipe, lv: dict[str, Any]) -> bool:
    """Is this base on the task's grid? (its recipe may narrow the plan's levels and real bases)"""
    if lv["t"] is not None:
        return r.levels is None or lv["t"] in r.levels
    return r.real is None or lv["corpus"] in r.real


def _repairs(plan: SweepPlan, lv: dict[str, Any]) -> bool:
    return (lv["t"] is None and plan.repair_real) or (lv["t"] is not None and lv["t"] in plan.repair_levels)


def _corrects(plan: SweepPlan, lv: dict[str, Any]) -> bool:
    return (lv["t"] is None and plan.correct_real) or (lv["t"] is not None and lv["t"] in plan.correct_levels)


def correction_summary(cells: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Does the correction help? Mean gain over the plain port across the cells where it was tried, with a
    normal 95% interval across cells; the verdict is "helps" or "hurts" only where that interval excludes 0."""
    tried = [c for c in cells if c.get("corrected")]
    if not tried:
        return None
    gains = [c["corrected"]["gain_over_plain"] for c in tried]
    m = sum(gains) / len(gains)
    sd = math.sqrt(sum((g - m) ** 2 for g in gains) / (len(gains) - 1)) if len(gains) > 1 else 0.0
    half = 1.96 * sd / math.sqrt(len(gains)) if len(gains) > 1 else 0.0
    return {
        "cells": len(tried),
        "mean_gain_points": 100 * m,
        "ci_points": [100 * (m - half), 100 * (m + half)],
        "helped": sum(c["corrected"]["gain_ci"][0] > 0 for c in tried),
        "hurt": sum(c["corrected"]["gain_ci"][1] < 0 for c in tried),
        "scale_not_1": sum(c["corrected"]["scale"] != 1.0 for c in tried),
        "verdict": "helps" if m - half > 0 else ("hurts" if m + half < 0 else "no clear effect"),
    }
