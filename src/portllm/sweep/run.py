"""The sweep: drift levels × tasks × seeds, every step cached by content and resumable.

For each task and seed a patch Δθ is trained on θ once; for each evolved base θ_L it is ported
(the real merged port, then scored and deleted) and scored against θ+Δθ on the same examples.
θ_L zero-shot, re-tunes at chosen levels and warm starts complete the cells. The forecast of each
cell uses only what a user has without labels (the weights, and the two models' choice
probabilities on the inputs); its calibration is validated on drift levels it did not see.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import steps
from ..atomic import write_text_atomic
from ..errors import PortLLMError
from .calibrate import fit, validate
from .plan import PLANS, Evolution, SweepPlan

ENGINE = "sweep-1"  # bump when a cached artefact's meaning changes
Log = Callable[[str], None]


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def projection_drift(sums: dict[str, tuple[float, float]], targets: tuple[str, ...]) -> float:
    """||θ' − θ||_F / ||θ||_F over all LoRA-target projection matrices together (from `evolve.drift_sums`)."""
    num = sum(n for k, (n, _) in sums.items() if k in targets)
    den = sum(d for k, (_, d) in sums.items() if k in targets)
    return math.sqrt(num / den) if den else 0.0


def text_kl(old_dir: Path, new_dir: Path, data: Path, n: int, dtype: str) -> float:
    """Mean per-token KL(θ ‖ θ') on held-out text (wikitext-2 test lines): how much behaviour moved."""
    import torch

    from ..evaluate import open_lm

    f = data / "text" / "wikitext-2" / "test.txt"
    lines = [x.strip() for x in f.read_text(errors="replace").splitlines() if len(x.strip()) > 40][:n]
    if not lines:
        return float("nan")
    a, b = open_lm(old_dir, dtype=dtype), open_lm(new_dir, dtype=dtype)
    total = count = 0.0
    with torch.inference_mode():
        for t in lines:
            ids = a.tokenizer(t, return_tensors="pt").input_ids[:, :128]
            la = torch.log_softmax(a.model(ids).logits[0].float(), -1)
            lb = torch.log_softmax(b.model(ids).logits[0].float(), -1)
            total += float((la.exp() * (la - lb)).sum())
            count += ids.shape[1]
    return total / count


class _Store:
    """Cached artefacts by kind and key under the sweep cache."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, kind: str, *parts: Any) -> Path:
        return self.root / kind / _key(ENGINE, *parts)

    def json(self, kind: str, parts: tuple, make: Callable[[], Any]) -> Any:
        f = self.path(kind, *parts).with_suffix(".json")
        if f.is_file():
            return json.loads(f.read_text())
        value = make()
        write_text_atomic(f, json.dumps(value))
        return value


def sweep(
    plan: str | SweepPlan = "full",
    base: str = "smollm2-135m",
    out: str | Path = "runs/sweep",
    data: str | Path | None = None,
    cache: str | Path | None = None,
    log: Log = print,
    progress: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the grid and write OUT/report.json, OUT/report.md, OUT/*.png, OUT/calibration.json."""
    from ..evaluate import read_run
    from ..evolve import EvolveConfig, EvolveResult, drift_sums, evolve
    from ..forecast import choice_signals, weight_signals
    from ..interpolate import interpolate
    from ..models import architecture_of, cache_root, fingerprint, resolve_base
    from ..patch import Patch
    from ..stats import majority, paired
    from ..tasks import data_dir, get_task, load_examples
    from ..train import TrainConfig

    plan = PLANS[plan] if isinstance(plan, str) else plan
    data = data_dir(data)
    if data is None:
        raise PortLLMError("sweep needs the benchmark data: set --data-dir or PORTLLM_DATA")
    store = _Store(Path(cache) if cache else cache_root() / "sweep")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    theta = resolve_base(base)
    fp = fingerprint(theta)
    targets = architecture_of(theta).lora_targets
    log(f"θ = {base} ({fp}); plan {plan.name}: {len(plan.tasks)} tasks x {len(plan.seeds)} seeds")

    def evolved(ev: Evolution) -> Path:
        cfg = EvolveConfig(
            mode="full",
            steps=ev.steps,
            lr=ev.lr,
            batch_size=plan.batch_size,
            max_length=ev.max_length,
            seed=0,
            dtype="float32",
            targets=targets,
        )
        d = store.path("evolved", fp, ev.corpus, cfg.key())
        if not (d / "portllm_lineage.json").is_file():
            log(f"evolving θ -> {ev.label} ...")
            evolve(theta, ev.corpus, d, cfg, data=data, overwrite=True, progress=progress)
        return d

    direction = evolved(plan.direction)
    fp_dir = EvolveResult.read(direction).fingerprint
    levels: list[dict[str, Any]] = []
    for t in plan.levels:
        d = store.path("levels", fp, fp_dir, t)
        if not (d / "portllm_lineage.json").is_file():
            log(f"interpolating θ(t={t:g}) along {plan.direction.label} ...")
            interpolate(theta, direction, t, d, overwrite=True)
        levels.append({"label": f"t={t:g}", "t": t, "evolution": f"interpolated:{plan.direction.label}", "dir": d})
    for ev in plan.real:
        levels.append({"label": ev.label, "t": None, "evolution": ev.label, "corpus": ev.corpus, "dir": evolved(ev)})
    for lv in levels:
        lv["fingerprint"] = fingerprint(lv["dir"])
        sums = store.json("drift_sums", (fp, lv["fingerprint"]), lambda lv=lv: drift_sums(theta, lv["dir"]))
        lv["drift"] = projection_drift(sums, targets)
        lv["drift_by_type"] = {k: math.sqrt(n / d) if d else 0.0 for k, (n, d) in sums.items()}
        lv["kl_text"] = store.json(
            "kl_text",
            (fp, lv["fingerprint"], plan.kl_texts),
            lambda lv=lv: text_kl(theta, lv["dir"], data, plan.kl_texts, plan.eval_dtype) if plan.kl_texts else None,
        )
        log(f"  {lv['label']}: projection drift {lv['drift']:.3%}, KL on text {lv['kl_text']}")

    def train_cfg(r, seed, steps_=None) -> TrainConfig:
        return TrainConfig(
            lr=r.lr,
            steps=steps_ or r.steps,
            batch_size=plan.batch_size,
            max_length=r.max_length,
            seed=seed,
            dtype=plan.dtype,
            target_modules=targets,
        )

    def patch_on(model_dir: Path, model_fp: str, task: str, r, seed: int) -> Path:
        cfg = train_cfg(r, seed)
        p = store.path("patches", model_fp, task, cfg.key())
        if not (p / "portllm.json").is_file():
            log(f"  training Δ for {task} (seed {seed}) on {model_fp[:12]} ...")
            steps.train_patch_step(model_dir, task, p, cfg, data, progress=progress)
        return p

    def scored(model_dir: Path, model_fp: str, patch: Path | None, ported: bool, task: str, limit) -> Path:
        sha = Patch.load(patch, verify=False).weights_sha256 if patch else None
        d = store.path("evals", model_fp, sha, ported, task, limit, plan.eval_dtype)
        if (d / "results.json").is_file():
            return d
        if ported:
            tmp = store.root / "ported" / d.name
            log(f"  porting onto {model_fp[:12]} and scoring {task} ...")
            steps.port_step(patch, model_dir, tmp)
            steps.eval_step(tmp, None, task, limit, data, d, plan.eval_dtype)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"  scoring {task} on {model_fp[:12]}" + (" + patch" if patch else "") + " ...")
            steps.eval_step(model_dir, patch, task, limit, data, d, plan.eval_dtype)
        return d

    def records(d: Path, task: str) -> list[dict[str, Any]]:
        return read_run(d)[1][task]

    report: dict[str, Any] = {}
    cells: list[dict[str, Any]] = []
    retunes: list[dict[str, Any]] = []
    warm: list[dict[str, Any]] = []
    behaviour: dict[str, dict[str, float]] = {}
    for task, r in plan.tasks.items():
        t = get_task(task)
        examples = load_examples(t, "eval", data, r.eval_limit)
        maj = majority([e.gold for e in examples])[1]
        log(f"[{task}] {len(examples)} eval examples, majority class {maj:.3f}")
        zero = records(scored(theta, fp, None, False, task, r.eval_limit), task)
        patches = {s: patch_on(theta, fp, task, r, s) for s in plan.seeds}
        with_patch = {s: records(scored(theta, fp, patches[s], False, task, r.eval_limit), task) for s in plan.seeds}
        task_levels = [lv for lv in levels if _scores(r, lv)]
        for lv in task_levels:
            ev = records(scored(lv["dir"], lv["fingerprint"], None, False, task, r.eval_limit), task)
            behaviour.setdefault(lv["label"], {})[task] = sum(a["pred"] == b["pred"] for a, b in zip(zero, ev)) / len(
                ev
            )
            for s in plan.seeds:
                ported = records(scored(lv["dir"], lv["fingerprint"], patches[s], True, task, r.eval_limit), task)
                a = [float(x["correct"]) for x in with_patch[s]]
                b = [float(x["correct"]) for x in ported]
                pr = paired(a, b, iters=2000, seed=s)
                ws = store.json(
                    "weights",
                    (patches[s].name, lv["fingerprint"]),
                    lambda p=patches[s], lv=lv: asdict(weight_signals(p, lv["dir"], theta)),
                )
                sig = choice_signals(with_patch[s], ported, examples, t)
                acc = lambda recs: sum(float(x["correct"]) for x in recs) / len(recs)  # noqa: E731
                cells.append(
                    {
                        "task": task,
                        "seed": s,
                        "level": lv["label"],
                        "t": lv["t"],
                        "evolution": lv["evolution"],
                        "drift": lv["drift"],
                        "n": len(examples),
                        "majority": maj,
                        "base": acc(zero),
                        "evolved": acc(ev),
                        "base+patch": pr.acc_a,
                        "evolved+patch": pr.acc_b,
                        "evolved+retuned": None,
                        "loss": pr.acc_a - pr.acc_b,
                        "loss_ci": [-pr.ci_high, -pr.ci_low],
                        "mcnemar_p": pr.mcnemar_p,
                        "neg_flips": pr.negative_flips,
                        "pos_flips": pr.positive_flips,
                        "neg_flip_rate": pr.negative_flips / pr.n,
                        "identical_predictions": all(x["pred"] == y["pred"] for x, y in zip(with_patch[s], ported)),
                        "forecast": {
                            "raw_loss": -sig.expected_change,
                            "raw_neg_flip_rate": sig.expected_neg_flip_rate,
                            "disagreement": sig.disagreement,
                            "mean_kl": sig.mean_kl,
                            "subspace_disturbance": ws["subspace_disturbance"],
                            "cos": ws["cos"],
                            "drift_to_patch": ws["drift_to_patch"],
                            "loss": None,
                            "neg_flip_rate": None,
                        },
                    }
                )
                if s == plan.seeds[0] and r.correct and _corrects(plan, lv):
                    cells[-1]["corrected"] = _correct(
                        plan, task, r, lv, patches[s], theta, fp, store, data, scored, records, with_patch[s], ported
                    )
            log(
                f"  {lv['label']}: ported "
                + ", ".join(
                    f"{c['evolved+patch']:.3f}" for c in cells if c["task"] == task and c["level"] == lv["label"]
                )
            )
        for tr in plan.retune_levels if r.retune_levels is None else r.retune_levels:
            lv = next((x for x in task_levels if x["t"] == tr), None)
            if lv is None:
                continue
            p2 = patch_on(lv["dir"], lv["fingerprint"], task, r, plan.seeds[0])
            rt = records(scored(lv["dir"], lv["fingerprint"], p2, False, task, r.eval_limit), task)
            ported = records(
                scored(lv["dir"], lv["fingerprint"], patches[plan.seeds[0]], True, task, r.eval_limit), task
            )
            pr = paired([float(x["correct"]) for x in rt], [float(x["correct"]) for x in ported], iters=2000)
            retunes.append(
                {
                    "task": task,
                    "level": lv["label"],
                    "drift": lv["drift"],
                    "seed": plan.seeds[0],
                    "retuned": pr.acc_a,
                    "ported": pr.acc_b,
                    "ported_minus_retuned": pr.diff,
                    "ci": [pr.ci_low, pr.ci_high],
                    "mcnemar_p": pr.mcnemar_p,
                    "steps": r.steps,
                }
            )
            for c in cells:
                if c["task"] == task and c["level"] == lv["label"] and c["seed"] == plan.seeds[0]:
                    c["evolved+retuned"] = pr.acc_a
        if plan.warm_steps and r.warm:
            warm += _warm_start(
                plan,
                task,
                r,
                task_levels,
                patches[plan.seeds[0]],
                store,
                data,
                train_cfg,
                scored,
                records,
                with_patch[plan.seeds[0]],
                log,
                progress,
            )

        # a report after every task, so a run stopped mid-way still shows what it measured
        report = _write(plan, base, fp, levels, behaviour, cells, retunes, warm, out, t_start)
    return report


def _write(plan, base, fp, levels, behaviour, cells, retunes, warm, out: Path, t_start: float) -> dict[str, Any]:
    """Calibrate, validate and write OUT/report.json, report.md, charts from the cells so far."""
    from .report import charts, markdown

    validation = validate(cells) if len({c["level"] for c in cells}) >= 3 else {"cells": 0}
    calibration = fit(cells).to_dict() if len(cells) >= 4 else None
    if calibration:
        calibration["source"] = f"portllm sweep --plan {plan.name} ({len(cells)} cells)"
        write_text_atomic(out / "calibration.json", json.dumps(calibration, indent=2))
    report = {
        "plan": plan.to_dict(),
        "base": {"name": base, "fingerprint": fp},
        "levels": [
            {k: v for k, v in lv.items() if k != "dir"} | {"agreement_with_base": behaviour.get(lv["label"])}
            for lv in levels
        ],
        "cells": cells,
        "retunes": retunes,
        "warm_start": warm,
        "correction": _correction_summary(cells),
        "forecast_validation": validation,
        "calibration": calibration,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "wall_s": time.perf_counter() - t_start,
    }
    write_text_atomic(out / "report.json", json.dumps(report, indent=2, default=str))
    write_text_atomic(out / "report.md", markdown(report))
    charts(report, out)
    return report


def _warm_start(
    plan: SweepPlan,
    task,
    r,
    levels,
    init: Path,
    store: _Store,
    data,
    train_cfg,
    scored,
    records,
    target_recs,
    log: Log,
    progress: bool,
) -> list[dict[str, Any]]:
    """At the largest drift: re-tune for k steps from Δθ (warm) and from scratch (cold), scored against θ+Δθ."""
    import inspect

    from ..train import train

    if "init" not in inspect.signature(train).parameters:
        log("  (warm start skipped: this portllm's train has no init)")
        return []
    lv = max((x for x in levels if x["t"] is not None), key=lambda x: x["t"])
    goal = sum(float(x["correct"]) for x in target_recs) / len(target_recs)
    rows = []
    for k in plan.warm_steps:
        for mode in ("warm", "cold"):
            cfg = train_cfg(r, plan.seeds[0], k)
            p = store.path("warm", lv["fingerprint"], task, cfg.key(), mode, init.name)
            if not (p / "portllm.json").is_file():
                log(f"  {mode} re-tune, {k} steps ...")
                steps.train_patch_step(
                    lv["dir"],
                    task,
                    p,
                    cfg,
                    data,
                    progress=progress,
                    **({"init": init} if mode == "warm" else {}),
                )
            recs = records(scored(lv["dir"], lv["fingerprint"], p, False, task, r.eval_limit), task)
            acc = sum(float(x["correct"]) for x in recs) / len(recs)
            rows.append(
                {
                    "task": task,
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


def _scores(r, lv: dict[str, Any]) -> bool:
    """Is this base on the task's grid? (its recipe may narrow the plan's levels and real bases)"""
    if lv["t"] is not None:
        return r.levels is None or lv["t"] in r.levels
    return r.real is None or lv["corpus"] in r.real


def _corrects(plan: SweepPlan, lv: dict[str, Any]) -> bool:
    return (lv["t"] is None and plan.correct_real) or (lv["t"] is not None and lv["t"] in plan.correct_levels)


def _correct(plan, task, r, lv, patch: Path, theta, fp, store: _Store, data, scored, records, target, ported):
    """The rescale correction on one cell: λ chosen without labels, then scored paired against the plain port."""
    from ..patch import Patch
    from ..rescale import SCALES, choose_scale, scaled_patch
    from ..stats import paired

    sha = Patch.load(patch, verify=False).weights_sha256
    choice = store.json(
        "rescale",
        (sha, lv["fingerprint"], task, plan.correct_inputs, SCALES),
        lambda: choose_scale(patch, theta, lv["dir"], task, plan.correct_inputs, SCALES, data).to_dict(),
    )
    lam = choice["scale"]
    if lam == 1.0:
        recs = ported
    else:
        sp = store.path("scaled", sha, lam)
        if not (sp / "portllm.json").is_file():
            scaled_patch(patch, lam, sp)
        recs = records(scored(lv["dir"], lv["fingerprint"], sp, True, task, r.eval_limit), task)
    plain = [float(x["correct"]) for x in ported]
    fixed = [float(x["correct"]) for x in recs]
    vs_plain = paired(plain, fixed, iters=2000)
    vs_target = paired([float(x["correct"]) for x in target], fixed, iters=2000)
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


def _correction_summary(cells: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Does the correction help? Mean gain over the plain port across the cells where it was tried."""
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
