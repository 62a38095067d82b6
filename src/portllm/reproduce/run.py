"""The grid: for each task, train Δθ on θ and Δθ' on θ', port Δθ onto θ', score the five variants.

Every step is cached by content under the cache directory, so a rerun (or a resumed, interrupted
run) only does what changed. Training and porting run in their own processes (`steps`), so the
cost each records is its own, not the experiment's.

The statistics come from the eval runs' per-example samples (so cached evals of any age serve): a
Wilson interval per score, the majority-class baseline, and paired comparisons between variants
(result.COMPARISONS). The headline average is over the tasks whose patch learned (`learned`).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import steps
from ..atomic import write_text_atomic
from ..errors import PortLLMError
from ..evaluate import DEFAULT_MARGIN
from ..stats import Paired
from .profiles import LABELS, NOTES, PLANS, PROFILES, VARIANTS, Profile, TaskPlan
from .report import charts, fmt_drift, fmt_paired, markdown
from .result import COMPARISONS, Cost, Efficiency, EvolvedBase, ReproduceReport, RetuneCost, TaskCost, TaskScores

ENGINE_VERSION = "1"  # bump when scoring changes, to invalidate cached evals

Log = Callable[[str], None]


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _files_key(files: list[Path]) -> list[tuple[str, int]]:
    return [(f.name, f.stat().st_size) for f in files]


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


def _train_config(plan: TaskPlan, prof: Profile) -> Any:
    from ..train import TrainConfig

    return TrainConfig(
        lr=plan.lr,
        steps=plan.steps,
        batch_size=prof.batch_size,
        max_length=plan.max_length,
        seed=prof.seed,
        dtype=prof.dtype,
    )


def _patch_sha(p: Path | None) -> str | None:
    if p is None:
        return None
    from ..patch import Patch

    return Patch.load(p, verify=False).weights_sha256


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
    import numpy as np

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
) -> ReproduceReport:
    """Run the grid and write OUT/report.json, OUT/report.md and OUT/*.png. `margin` is what the paired
    verdicts call "no difference" (the whole 95% interval within ±margin)."""
    from ..evaluate import EvalResult, accuracy, aligned_correct, flips, paired_records, read_run
    from ..evolve import LINEAGE, EvolveConfig, EvolveResult, corpus_files, evolve
    from ..models import architecture_of, cache_root, fingerprint, resolve_base
    from ..patch import MANIFEST, Patch
    from ..tasks import data_dir, get_task

    if not 0 < margin < 1:
        raise PortLLMError(f"margin {margin} must be a fraction between 0 and 1 (0.01 = 1 point)")
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    if tasks:
        unknown = [t for t in tasks if get_task(t).name not in PLANS]
        if unknown:
            raise PortLLMError(f"no recipe for task {unknown[0]}")
        names = [get_task(t).name for t in tasks]
        prof = replace(prof, tasks={n: PLANS[n] for n in names}, notes=[NOTES[n] for n in names])
    data = data_dir(data)
    if data is None:
        raise PortLLMError("reproduce needs the benchmark data: set --data-dir or PORTLLM_DATA")
    cache = Path(cache) if cache else cache_root() / "reproduce"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    theta = resolve_base(base)
    fp_theta = fingerprint(theta)
    log(f"θ  = {base} ({fp_theta})")

    # θ': continued pretraining, cached by parent, corpus and recipe
    ecfg = EvolveConfig(
        mode=prof.evolve_mode,
        steps=prof.evolve_steps,
        lr=prof.evolve_lr,
        batch_size=prof.batch_size,
        max_length=prof.evolve_max_length,
        seed=prof.seed,
        dtype="float32" if prof.evolve_mode == "full" else prof.dtype,  # bf16 AdamW would lose small updates
        targets=architecture_of(theta).lora_targets,  # resolved before keying, so the cache key names them
    )
    evolved = cache / "evolved" / _key(fp_theta, prof.corpus, _files_key(corpus_files(prof.corpus, data)), ecfg.key())
    t0 = time.perf_counter()
    if not (evolved / LINEAGE).is_file():
        log(f"evolving θ -> θ' ({prof.evolve_mode}, {prof.evolve_steps} steps on '{prof.corpus}')...")
        evolve(theta, prof.corpus, evolved, ecfg, data=data, overwrite=True, progress=show_progress)
    lineage = EvolveResult.read(evolved)
    timings["evolve"] = time.perf_counter() - t0
    fp_evolved = lineage.fingerprint
    log(f"θ' = {evolved} ({fp_evolved}); drift {fmt_drift(lineage.drift)}")

    scores: dict[str, TaskScores] = {}
    task_flips = {}
    paired: dict[str, dict[str, Paired]] = {}
    diffs: dict[str, list[float]] = {}  # per example: ported correct − re-tuned correct
    costs: dict[str, TaskCost] = {}
    for name, plan in prof.tasks.items():
        log(f"\n[{name}] {plan.steps} steps x {prof.batch_size}, eval on {plan.eval_limit or 'all'} examples")
        tkey = _key(name, _recipe_args(plan, prof, data), ENGINE_VERSION)
        patch = cache / "patches" / f"{name}-{_key(fp_theta, tkey)}"
        retuned = cache / "patches" / f"{name}-{_key(fp_evolved, tkey)}"
        for where, base_dir, dest in (("θ", theta, patch), ("θ'", evolved, retuned)):
            if not (dest / MANIFEST).is_file():
                log(f"  training Δ on {where}...")
                steps.train_patch_step(base_dir, name, dest, _train_config(plan, prof), data, show_progress)
        train_rec = Patch.load(retuned, verify=False).extra["training"]

        # the port itself, measured in its own process; the ported directory is evaluated, then dropped
        port_rec_file = cache / "ports" / f"{_key(_patch_sha(patch), fp_evolved)}.json"
        ported = cache / "ported" / port_rec_file.stem
        specs = {
            "base": (theta, None),
            "evolved": (evolved, None),
            "base+patch": (theta, patch),
            "evolved+patch": (ported, None),
            "evolved+retuned": (evolved, retuned),
        }
        fps = {"base": fp_theta, "evolved": fp_evolved}
        evals = {}
        dirs = {}
        for v in VARIANTS:
            model_fp = fps.get(v, fp_evolved if v != "base+patch" else fp_theta)
            pkey = _patch_sha(
                patch if v in ("base+patch", "evolved+patch") else retuned if v == "evolved+retuned" else None
            )
            ekey = _key(
                model_fp, pkey, v == "evolved+patch", name, plan.eval_limit, prof.eval_dtype, ENGINE_VERSION, str(data)
            )
            edir = cache / "evals" / f"{name}-{v.replace('+', '_')}-{ekey}"
            if not (edir / "results.json").is_file():
                if v == "evolved+patch" and not (ported / "config.json").is_file():
                    log("  porting Δθ onto θ' (no training)...")
                    rec = steps.port_step(patch, evolved, ported, show_progress)
                    port_rec_file.parent.mkdir(parents=True, exist_ok=True)
                    write_text_atomic(port_rec_file, json.dumps(rec.to_dict()))
                log(f"  eval {LABELS[v]}...")
                model, attached = specs[v]
                steps.eval_step(
                    model, attached, name, plan.eval_limit, data, edir, prof.eval_dtype, prof.gen_tokens, show_progress
                )
            evals[v] = EvalResult.read(edir).tasks[name]
            dirs[v] = edir
        if ported.exists():
            shutil.rmtree(ported, ignore_errors=True)
        port_rec = json.loads(port_rec_file.read_text()) if port_rec_file.is_file() else {}
        recs = {v: read_run(dirs[v])[1][name] for v in VARIANTS}
        accs = {v: accuracy(recs[v], generative=get_task(name).kind != "mc") for v in VARIANTS}
        scores[name] = TaskScores(
            {v: evals[v].value for v in VARIANTS},
            evals["base"].metric,
            evals["base"].n,
            {v: evals[v].stderr for v in VARIANTS},
            evals["evolved+patch"].value - evals["evolved+retuned"].value,
            evals["evolved+patch"].value - evals["evolved"].value,
            accs["base"].majority,
            {v: [accs[v].ci_low, accs[v].ci_high] for v in VARIANTS},
        )
        task_flips[name] = flips(recs["base+patch"], recs["evolved+patch"], margin)
        paired[name] = {k: paired_records(recs[a], recs[b]) for k, (a, b) in COMPARISONS.items()}
        retuned_ok, ported_ok = aligned_correct(recs["evolved+retuned"], recs["evolved+patch"])
        diffs[name] = [p - r for p, r in zip(ported_ok, retuned_ok)]
        costs[name] = TaskCost(
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
        log(f"  {name}: " + "  ".join(f"{LABELS[v]} {scores[name].scores[v]:.3f}" for v in VARIANTS))
        log(f"  ported − re-tuned: {fmt_paired(paired[name]['ported_minus_retuned'], margin)}")
        gc.collect()

    learned_tasks = [n for n in scores if learned(scores[n], paired[n]["patched_minus_base"])]
    timings["total"] = time.perf_counter() - t_start
    report = ReproduceReport(
        profile=prof.name,
        base={"name": base, "fingerprint": fp_theta},
        evolved=EvolvedBase(
            str(evolved), fp_evolved, prof.corpus, lineage.steps, prof.evolve_mode, lineage.drift, lineage.wall_s
        ),
        settings={
            "train": {
                "rank": 8,
                "alpha": 16,
                "targets": ",".join(t.removesuffix("_proj") for t in ecfg.targets),
                "batch_size": prof.batch_size,
                "dtype": prof.dtype,
                "seed": prof.seed,
            },
            "eval_dtype": prof.eval_dtype,
            "notes": prof.notes,
        },
        tasks=scores,
        efficiency=_efficiency(list(costs.values())),
        flips=task_flips,
        per_task_cost=costs,
        average=_average(scores, diffs, list(scores)),
        machine={
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        timings_s=timings,
        paired=paired,
        learned=learned_tasks,
        average_learned=_average(scores, diffs, learned_tasks),
        margin=margin,
    )
    write_text_atomic(out / "report.json", json.dumps(report.to_dict(), indent=2))
    write_text_atomic(out / "report.md", markdown(report))
    charts(report, out)
    return report


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
