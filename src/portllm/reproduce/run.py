"""The grid: for each task, train Δθ on θ and Δθ' on θ', port Δθ onto θ', score the five variants.

Every step is cached by content under the cache directory (`ReproduceCache`), so a rerun (or a resumed,
interrupted run) only does what changed. Training and porting run in their own processes (`steps`), so
the cost each records is its own, not the experiment's.

The steps, in order: choose the tasks (`select_profile`), evolve θ into θ' (`evolve_base`), then per task
train Δθ and Δθ' (`train_patches`), score the five variants (`score_variants`) and compare them
(`compare_variants`); last, the report (`build_report`, `write_report`).

The statistics come from the eval runs' per-example samples (so cached evals of any age serve): a
Wilson interval per score, the majority-class baseline, and paired comparisons between variants
(result.COMPARISONS). The headline average is over the tasks whose patch learned (`learned`).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import steps
from ..atomic import write_text_atomic
from ..device import BF16_IF_NATIVE, native_bf16, resolve_device, resolve_dtype, training_dtype
from ..errors import PortLLMError
from ..eval import DEFAULT_MARGIN, EvalResult, TaskFlips, accuracy, aligned_correct, flips, paired_records, read_run
from ..evolve import LINEAGE, EvolveConfig, EvolveResult, corpus_files, evolve
from ..models import architecture_of, cache_root, fingerprint, resolve_base
from ..patch import MANIFEST, Patch
from ..stats import Paired
from ..tasks import data_dir, get_task
from ..train import TrainConfig
from .cache import ReproduceCache, key
from .profiles import LABELS, NOTES, PLANS, PROFILES, VARIANTS, Profile, TaskPlan
from .report import charts, fmt_drift, fmt_paired, markdown
from .result import COMPARISONS, Cost, Efficiency, EvolvedBase, ReproduceReport, RetuneCost, TaskCost, TaskScores

ENGINE_VERSION = "1"  # bump when scoring changes, to invalidate cached evals

Log = Callable[[str], None]


def _recipe_args(plan: TaskPlan, prof: Profile, data: Path) -> list[str]:
    """The training recipe as the patch cache keys it: the `portllm train` options of earlier versions,
    kept in that form so existing caches stay valid."""
    return [
        "--steps",
        str(plan.steps),
        "--batch-size",
        str(prof.batch_size),
        "--lr",
        str(plan.lr),
        "--max-length",
        str(plan.max_length),
        "--seed",
        str(prof.seed),
        "--dtype",
        prof.dtype,
        "--eval-limit",
        "0",
        "--data-dir",
        str(data),
    ]


def _train_config(plan: TaskPlan, prof: Profile, device: str) -> TrainConfig:
    return TrainConfig(
        lr=plan.lr,
        steps=plan.steps,
        batch_size=prof.batch_size,
        max_length=plan.max_length,
        seed=prof.seed,
        dtype=prof.dtype,
        device=device,
    )


def _patch_sha(p: Path | None) -> str | None:
    return None if p is None else Patch.load(p, verify=False).weights_sha256


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def learned(t: TaskScores, vs_base: Paired) -> bool:
    """Did the patch learn the task? θ + Δθ must beat both θ zero-shot and the majority class by more
    than noise, made exact with 95% intervals (about ±2 standard errors): the paired 95% CI of
    (θ + Δθ) − θ lies above 0, and the Wilson 95% lower bound of θ + Δθ lies above the majority-class
    baseline (generation tasks have none). A task the patch did not learn cannot show that porting
    keeps what was learned, so averaging it in only pulls "ported − re-tuned" towards 0."""
    low, _ = t.interval("base+patch")
    return vs_base.ci_low > 0 and (t.majority is None or low > t.majority)


def macro_interval(diffs: list[list[float]], iters: int = 10_000, level: float = 0.95, seed: int = 0) -> list[float]:
    """95% interval of the mean over tasks of each task's mean paired difference: each task's examples
    are resampled on their own (a stratified paired bootstrap), so every task weighs as in the mean."""
    ds = [np.asarray(d, dtype=np.float64) for d in diffs if len(d)]
    if not ds:
        return []
    rng = np.random.default_rng(seed)
    total = np.zeros(iters)
    for d in ds:
        for start in range(0, iters, 1000):  # bounded memory for large n
            m = min(1000, iters - start)
            total[start : start + m] += d[rng.integers(0, len(d), size=(m, len(d)))].mean(axis=1)
    lo, hi = np.quantile(total / len(ds), [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def _average(scores: dict[str, TaskScores], diffs: dict[str, list[float]], names: list[str]) -> dict[str, Any]:
    """Each variant's mean over `names`, and ported − re-tuned's mean with its 95% interval ([] for none)."""
    return {v: _mean([scores[n].scores[v] for n in names]) for v in VARIANTS} | {
        "ported_minus_retuned": _mean([scores[n].ported_minus_retuned for n in names]),
        "ported_minus_retuned_ci": macro_interval([diffs[n] for n in names]),
    }


@dataclass
class ReproduceContext:
    """What every step of one reproduction shares: the profile, the data, the cache, how to report."""

    prof: Profile
    data: Path
    cache: ReproduceCache
    log: Log = print
    show_progress: bool = False
    margin: float = DEFAULT_MARGIN
    device: str = "cpu"  # resolved (device.resolve_device): where every step trains, evolves and scores


@dataclass
class Bases:
    """θ and the evolved θ' the grid compares, with θ''s lineage (steps, drift, cost)."""

    theta: Path
    fp_theta: str
    evolved: Path
    fp_evolved: str
    lineage: EvolveResult
    targets: tuple[str, ...]  # the LoRA targets θ' was evolved on (and the settings name)


@dataclass
class TaskOutcome:
    """One task's measurements: its Table 2 row, flips, paired comparisons, per-example ported − re-tuned
    differences (for the averages' intervals) and what porting and re-tuning cost."""

    scores: TaskScores
    flips: TaskFlips
    paired: dict[str, Paired]
    diffs: list[float]
    cost: TaskCost


def reproduce(
    base: str = "smollm2-135m",
    profile: str | Profile = "quick",
    tasks: list[str] | None = None,
    out: str | Path = "runs/reproduce",
    data: str | Path | None = None,
    cache: str | Path | None = None,
    log: Log = print,
    show_progress: bool = False,
    margin: float = DEFAULT_MARGIN,
    device: str = "auto",
    dtype: str | None = None,
) -> ReproduceReport:
    """Run the grid and write OUT/report.json, OUT/report.md and OUT/*.png. `margin` is what the paired
    verdicts call "no difference" (the whole 95% interval within ±margin). `device`: where every step runs
    (device.py: auto = CUDA when present); `dtype`: the scoring dtype (default: the profile's eval_dtype)."""
    if not 0 < margin < 1:
        raise PortLLMError(f"margin {margin} must be a fraction between 0 and 1 (0.01 = 1 point)")
    dev = resolve_device(device)
    prof = select_profile(profile, tasks)
    if prof.dtype == BF16_IF_NATIVE and not native_bf16(dev):
        log(f"bf16 is not native on {dev} (no AMX / AVX512-BF16; emulated it runs many times slower): the patches "
            "train in float32")  # fmt: skip
    prof = replace(prof, dtype=training_dtype(prof.dtype, dev))  # what the report and cache keys record
    if dtype is not None:
        prof = replace(prof, eval_dtype=resolve_dtype(dtype, dev))  # the eval cache keys by it
    data = data_dir(data)
    if data is None:
        raise PortLLMError("reproduce needs the benchmark data: set --data-dir or PORTLLM_DATA")
    store = ReproduceCache(Path(cache) if cache else cache_root() / "reproduce")
    ctx = ReproduceContext(prof, data, store, log, show_progress, margin, dev)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    bases = evolve_base(ctx, base, timings)
    outcomes = {name: run_task(ctx, bases, name, plan) for name, plan in prof.tasks.items()}
    timings["total"] = time.perf_counter() - t_start
    report = build_report(ctx, base, bases, outcomes, timings)
    write_report(report, out)
    return report


def select_profile(profile: str | Profile, tasks: list[str] | None) -> Profile:
    """The profile, narrowed to `tasks` (each with its shared recipe) when given."""
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    if not tasks:
        return prof
    unknown = [t for t in tasks if get_task(t).name not in PLANS]
    if unknown:
        raise PortLLMError(f"no recipe for task {unknown[0]}")
    names = [get_task(t).name for t in tasks]
    return replace(prof, tasks={n: PLANS[n] for n in names}, notes=[NOTES[n] for n in names])


def evolve_base(ctx: ReproduceContext, base: str, timings: dict[str, float]) -> Bases:
    """θ' from θ by continued pretraining, cached by parent, corpus and recipe (its time in `timings`)."""
    prof = ctx.prof
    theta = resolve_base(base)
    fp_theta = fingerprint(theta)
    ctx.log(f"θ  = {base} ({fp_theta})")
    ecfg = EvolveConfig(
        mode=prof.evolve_mode,
        steps=prof.evolve_steps,
        lr=prof.evolve_lr,
        batch_size=prof.batch_size,
        max_length=prof.evolve_max_length,
        seed=prof.seed,
        dtype="float32" if prof.evolve_mode == "full" else prof.dtype,  # bf16 AdamW would lose small updates
        targets=architecture_of(theta).lora_targets,  # resolved before keying, so the cache key names them
        device=ctx.device,
    )
    evolved = ctx.cache.evolved(fp_theta, prof.corpus, corpus_files(prof.corpus, ctx.data), ecfg.key())
    t0 = time.perf_counter()
    if not (evolved / LINEAGE).is_file():
        ctx.log(f"evolving θ -> θ' ({prof.evolve_mode}, {prof.evolve_steps} steps on '{prof.corpus}')...")
        evolve(theta, prof.corpus, evolved, ecfg, data=ctx.data, overwrite=True, progress=ctx.show_progress)
    lineage = EvolveResult.read(evolved)
    timings["evolve"] = time.perf_counter() - t0
    ctx.log(f"θ' = {evolved} ({lineage.fingerprint}); drift {fmt_drift(lineage.drift)}")
    return Bases(theta, fp_theta, evolved, lineage.fingerprint, lineage, ecfg.targets)


def run_task(ctx: ReproduceContext, bases: Bases, name: str, plan: TaskPlan) -> TaskOutcome:
    """One task of the grid: train, port and score (each step cached), then compare."""
    prof = ctx.prof
    ctx.log(f"\n[{name}] {plan.steps} steps x {prof.batch_size}, eval on {plan.eval_limit or 'all'} examples")
    patch, retuned = train_patches(ctx, bases, name, plan)
    dirs, port_rec = score_variants(ctx, bases, name, plan, patch, retuned)
    train_rec = Patch.load(retuned, verify=False).extra["training"]
    outcome = compare_variants(ctx, name, dirs, port_rec, train_rec)
    ctx.log(f"  {name}: " + "  ".join(f"{LABELS[v]} {outcome.scores.scores[v]:.3f}" for v in VARIANTS))
    ctx.log(f"  ported − re-tuned: {fmt_paired(outcome.paired['ported_minus_retuned'], ctx.margin)}")
    gc.collect()
    return outcome


def train_patches(ctx: ReproduceContext, bases: Bases, name: str, plan: TaskPlan) -> tuple[Path, Path]:
    """Δθ trained on θ and Δθ' on θ' with the same recipe, each in its own process."""
    tkey = _recipe_key(name, plan, ctx.prof, ctx.data)
    patch = ctx.cache.patch(name, bases.fp_theta, tkey)
    retuned = ctx.cache.patch(name, bases.fp_evolved, tkey)
    for where, base_dir, dest in (("θ", bases.theta, patch), ("θ'", bases.evolved, retuned)):
        if not (dest / MANIFEST).is_file():
            ctx.log(f"  training Δ on {where}...")
            cfg = _train_config(plan, ctx.prof, ctx.device)
            steps.train_patch_step(base_dir, name, dest, cfg, ctx.data, ctx.show_progress)
    return patch, retuned


def _recipe_key(name: str, plan: TaskPlan, prof: Profile, data: Path) -> str:
    """The patch cache's recipe key (the same on θ and θ', so Δθ and Δθ' share one recipe)."""
    return key(name, _recipe_args(plan, prof, data), ENGINE_VERSION)


def score_variants(
    ctx: ReproduceContext, bases: Bases, name: str, plan: TaskPlan, patch: Path, retuned: Path
) -> tuple[dict[str, Path], dict[str, Any]]:
    """Each variant's eval run directory, and the port step's record ({} when no port ran for this cache).

    θ' + Δθ is the real merged port, measured in its own process; the ported directory is scored, then
    dropped."""
    prof = ctx.prof
    port_rec_file = ctx.cache.port_record(_patch_sha(patch), bases.fp_evolved)
    ported = ctx.cache.ported(port_rec_file)
    dirs = {}
    for v, (model, attached, model_fp, patch_for_key) in _variants(bases, patch, retuned, ported).items():
        ekey = (model_fp, _patch_sha(patch_for_key), v == "evolved+patch", name, plan.eval_limit)
        edir = ctx.cache.eval_dir(name, v, *ekey, prof.eval_dtype, ENGINE_VERSION, str(ctx.data))
        if not (edir / "results.json").is_file():
            if v == "evolved+patch" and not (ported / "config.json").is_file():
                ctx.log("  porting Δθ onto θ' (no training)...")
                rec = steps.port_step(patch, bases.evolved, ported, ctx.show_progress)
                port_rec_file.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(port_rec_file, json.dumps(rec.to_dict()))
            ctx.log(f"  eval {LABELS[v]}...")
            limit, dtype = plan.eval_limit, prof.eval_dtype
            steps.eval_step(
                model, attached, name, limit, ctx.data, edir, dtype, prof.gen_tokens, ctx.show_progress, ctx.device
            )
        dirs[v] = edir
    if ported.exists():
        shutil.rmtree(ported, ignore_errors=True)
    return dirs, json.loads(port_rec_file.read_text()) if port_rec_file.is_file() else {}


def _variants(
    bases: Bases, patch: Path, retuned: Path, ported: Path
) -> dict[str, tuple[Path, Path | None, str, Path | None]]:
    """Per variant: the model to score, the patch attached at runtime, and (for the eval's cache key) the
    fingerprint of the base and the patch the score stands for."""
    b = bases
    specs = {
        "base": (b.theta, None, b.fp_theta, None),
        "evolved": (b.evolved, None, b.fp_evolved, None),
        "base+patch": (b.theta, patch, b.fp_theta, patch),
        "evolved+patch": (ported, None, b.fp_evolved, patch),
        "evolved+retuned": (b.evolved, retuned, b.fp_evolved, retuned),
    }
    return {v: specs[v] for v in VARIANTS}


def compare_variants(
    ctx: ReproduceContext, name: str, dirs: dict[str, Path], port_rec: dict[str, Any], train_rec: dict[str, Any]
) -> TaskOutcome:
    """From the eval runs' samples: the scores with their intervals, flips, paired comparisons and costs."""
    evals = {v: EvalResult.read(dirs[v]).tasks[name] for v in VARIANTS}
    recs = {v: read_run(dirs[v])[1][name] for v in VARIANTS}
    accs = {v: accuracy(recs[v], generative=get_task(name).kind != "mc") for v in VARIANTS}
    scores = TaskScores(
        {v: evals[v].value for v in VARIANTS},
        evals["base"].metric,
        evals["base"].n,
        {v: evals[v].stderr for v in VARIANTS},
        evals["evolved+patch"].value - evals["evolved+retuned"].value,
        evals["evolved+patch"].value - evals["evolved"].value,
        accs["base"].majority,
        {v: [accs[v].ci_low, accs[v].ci_high] for v in VARIANTS},
    )
    retuned_ok, ported_ok = aligned_correct(recs["evolved+retuned"], recs["evolved+patch"])
    cost = TaskCost(
        Cost(port_rec.get("wall_s"), port_rec.get("peak_rss_mb"), 0),
        RetuneCost(
            train_rec["wall_s"],
            train_rec["peak_rss_mb"],
            train_rec["trainable_params"],
            peak_gpu_mb=train_rec.get("peak_gpu_mb"),
            steps=train_rec["steps"],
            examples_seen=train_rec["examples_seen"],
        ),
    )
    return TaskOutcome(
        scores,
        flips(recs["base+patch"], recs["evolved+patch"], ctx.margin),
        {k: paired_records(recs[a], recs[b]) for k, (a, b) in COMPARISONS.items()},
        [p - r for p, r in zip(ported_ok, retuned_ok)],
        cost,
    )


def build_report(
    ctx: ReproduceContext, base: str, bases: Bases, outcomes: dict[str, TaskOutcome], timings: dict[str, float]
) -> ReproduceReport:
    """The report: Table 2 with the averages (all tasks; the learned ones as the headline), Table 6, flips."""
    prof, lin = ctx.prof, bases.lineage
    scores = {n: o.scores for n, o in outcomes.items()}
    diffs = {n: o.diffs for n, o in outcomes.items()}
    learned_tasks = [n for n, o in outcomes.items() if learned(o.scores, o.paired["patched_minus_base"])]
    return ReproduceReport(
        profile=prof.name,
        base={"name": base, "fingerprint": bases.fp_theta},
        evolved=EvolvedBase(
            str(bases.evolved), bases.fp_evolved, prof.corpus, lin.steps, prof.evolve_mode, lin.drift, lin.wall_s
        ),
        settings={
            "train": {
                "rank": 8,
                "alpha": 16,
                "targets": ",".join(t.removesuffix("_proj") for t in bases.targets),
                "batch_size": prof.batch_size,
                "dtype": prof.dtype,
                "seed": prof.seed,
            },
            "eval_dtype": prof.eval_dtype,
            "notes": prof.notes,
        },
        tasks=scores,
        efficiency=_efficiency([o.cost for o in outcomes.values()]),
        flips={n: o.flips for n, o in outcomes.items()},
        per_task_cost={n: o.cost for n, o in outcomes.items()},
        average=_average(scores, diffs, list(scores)),
        machine={
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        timings_s=timings,
        paired={n: o.paired for n, o in outcomes.items()},
        learned=learned_tasks,
        average_learned=_average(scores, diffs, learned_tasks),
        margin=ctx.margin,
    )


def write_report(report: ReproduceReport, out: Path) -> None:
    write_text_atomic(out / "report.json", json.dumps(report.to_dict(), indent=2))
    write_text_atomic(out / "report.md", markdown(report))
    charts(report, out)


def _efficiency(costs: list[TaskCost]) -> Efficiency:
    """Port: mean time and max memory over the tasks that ported; re-tune: the same over all tasks."""
    ported = [c.port for c in costs if c.port.wall_s is not None]
    port = Cost(
        _mean([c.wall_s for c in ported]),
        max((c.peak_rss_mb for c in ported), default=None),
        0,
    )
    retune = Cost(
        _mean([c.retune.wall_s for c in costs]),
        max(c.retune.peak_rss_mb for c in costs),
        max(c.retune.trainable_params for c in costs),
    )
    return Efficiency(
        port,
        retune,
        retune.peak_rss_mb / port.peak_rss_mb if port.peak_rss_mb else None,
        retune.wall_s / port.wall_s if port.wall_s else None,
        "wall time and peak RSS of each step's own process (CPU); port = merged port of Δθ onto θ' "
        "(mean time, max memory over tasks); retune = LoRA fine-tuning of θ' with the same recipe",
    )
