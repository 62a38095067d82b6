"""The sweep as a person reads it: what the user loses as the base drifts, with bands across seeds."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _band(xs: list[float]) -> tuple[float, float, float]:
    """Mean and a 95% band across seeds (t-based; the single value when there is one seed)."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, m, m
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    tq = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}.get(n, 2.26)
    h = tq * sd / math.sqrt(n)
    return m, m - h, m + h


def by_level(report: dict[str, Any], task: str, key: Any) -> list[dict[str, Any]]:
    """Per level (in drift order): mean and seed band of `key(cell)` over the task's seeds."""
    rows = []
    for lv in sorted(report["levels"], key=lambda x: x["drift"]):
        vals = [key(c) for c in report["cells"] if c["task"] == task and c["level"] == lv["label"]]
        vals = [v for v in vals if v is not None]
        if vals:
            m, lo, hi = _band(vals)
            rows.append({"level": lv["label"], "drift": lv["drift"], "mean": m, "lo": lo, "hi": hi, "n": len(vals)})
    return rows


def _learned(report: dict[str, Any], task: str) -> bool:
    """The patch learned: θ+Δθ beats θ zero-shot and the majority class by > 2 standard errors (all seeds)."""
    cs = [c for c in report["cells"] if c["task"] == task and c["t"] == 0.0] or [
        c for c in report["cells"] if c["task"] == task
    ]
    for c in cs:
        se = math.sqrt(max(c["base+patch"] * (1 - c["base+patch"]), 1e-9) / c["n"])
        if c["base+patch"] - max(c["base"], c["majority"]) <= 2 * se:
            return False
    return bool(cs)


def _cell(rows: list[dict[str, Any]], level: str, band: bool, sign: bool) -> str:
    x = next((y for y in rows if y["level"] == level), None)
    if x is None:
        return "-"
    s = f"{100 * x['mean']:+.1f}" if sign else f"{100 * x['mean']:.1f}"
    return s + (f" [{100 * x['lo']:+.1f}, {100 * x['hi']:+.1f}]" if band and x["n"] > 1 else "")


def markdown(r: dict[str, Any]) -> str:
    """report.md: the evolved bases, each task's loss by level, re-tunes, warm starts, the correction and
    the forecast's out-of-sample validation, section by section."""
    tasks = list(dict.fromkeys(c["task"] for c in r["cells"]))
    lines = _intro(r) + _bases(r)
    for task in tasks:
        lines += _task(r, task)
    lines += _retunes(r) + _warm_start(r) + _correction(r) + _forecast(r) + _footer(r)
    return "\n".join(lines)


def _by_level_sorted(r: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(r["levels"], key=lambda x: x["drift"])


def _intro(r: dict[str, Any]) -> list[str]:
    p = r["plan"]
    return [
        f"# Where does a ported patch break? (sweep `{p['name']}`)",
        "",
        f"Base θ: `{r['base']['name']}` ({r['base']['fingerprint']}). Levels: θ + t·(θ'−θ) along "
        f"one real continued-pretraining update{', plus real evolved bases' if p['real'] else ''}. "
        f"{len(p['seeds'])} seeds per task.",
        "Loss = acc(θ+Δθ) − acc(θ'+Δθ) on the same examples (paired); negative flips: right with θ+Δθ, "
        "wrong after the port. Bands: 95% across seeds.",
    ]


def _bases(r: dict[str, Any]) -> list[str]:
    """The evolved bases: drift, KL and agreement with θ; then the drift per layer type."""
    lines = [
        "",
        "## Evolved bases",
        "",
        "| level | evolution | projection drift | KL on held-out text | agreement with θ zero-shot |",
        "|---|---|---|---|---|",
    ]
    for lv in _by_level_sorted(r):
        agree = lv.get("agreement_with_base") or {}
        ag = ", ".join(f"{t} {100 * v:.1f}%" for t, v in agree.items())
        kl = "-" if lv.get("kl_text") is None else f"{lv['kl_text']:.4f}"
        lines.append(f"| {lv['label']} | {lv['evolution']} | {100 * lv['drift']:.2f}% | {kl} | {ag} |")
    seen = {k for lv in r["levels"] for k in lv.get("drift_by_type") or {}}
    types = sorted(seen, key=lambda k: (not k.endswith("_proj"), k))  # the patched projections first
    if types:
        lines += ["", "Relative drift ‖θ'−θ‖/‖θ‖ per layer type (%):", ""]
        lines += ["| level | " + " | ".join(types) + " |", "|---|" + "---:|" * len(types)]
        for lv in _by_level_sorted(r):
            d = lv.get("drift_by_type") or {}
            lines.append(
                f"| {lv['label']} | " + " | ".join("-" if k not in d else f"{100 * d[k]:.2f}" for k in types) + " |"
            )
    return lines


_TASK_COLUMNS = {  # the task table's columns after level and drift: mean (and band) by level across seeds
    "ev": lambda c: c["evolved"],
    "bp": lambda c: c["base+patch"],
    "ep": lambda c: c["evolved+patch"],
    "loss": lambda c: c["loss"],
    "nfr": lambda c: c["neg_flip_rate"],
    "gain": lambda c: c["evolved+patch"] - c["evolved"],
    "fc": lambda c: c["forecast"]["loss"],
    "rt": lambda c: c["evolved+retuned"],
}


def _task(r: dict[str, Any], task: str) -> list[str]:
    """One task: per level, the scores, the loss of the port with its seed band, and the forecast."""
    first = next(c for c in r["cells"] if c["task"] == task)
    learned = _learned(r, task)
    lines = [
        "",
        f"## {task} (n = {first['n']}, majority class {100 * first['majority']:.1f}%, θ zero-shot "
        f"{100 * first['base']:.1f}%; patch {'learned' if learned else 'did NOT clearly learn'})",
        "",
        "| level | drift | θ' zero-shot | θ+Δθ | θ'+Δθ (ported) | loss (points) | neg. flip rate | "
        "gain over θ' | forecast loss | θ'+Δθ' re-tuned |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = {k: by_level(r, task, f) for k, f in _TASK_COLUMNS.items()}
    for row in rows["loss"]:

        def c(k: str, band: bool = False, sign: bool = False, lv: str = row["level"]) -> str:
            return _cell(rows[k], lv, band, sign)

        lines.append(
            f"| {row['level']} | {100 * row['drift']:.2f}% | {c('ev')} | {c('bp')} | {c('ep')} | "
            f"{c('loss', True, True)} | {c('nfr', True)} | {c('gain', True, True)} | "
            f"{c('fc', sign=True)} | {c('rt')} |"
        )
    return lines


def _retunes(r: dict[str, Any]) -> list[str]:
    if not r["retunes"]:
        return []
    lines = [
        "",
        "## Ported against re-tuned (paired, seed 0)",
        "",
        "| task | level | drift | ported | re-tuned | ported − re-tuned [95% CI] | McNemar p |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in r["retunes"]:
        lines.append(
            f"| {x['task']} | {x['level']} | {100 * x['drift']:.2f}% | {100 * x['ported']:.1f} | "
            f"{100 * x['retuned']:.1f} | {100 * x['ported_minus_retuned']:+.1f} "
            f"[{100 * x['ci'][0]:+.1f}, {100 * x['ci'][1]:+.1f}] | {x['mcnemar_p']:.3g} |"
        )
    return lines


def _warm_start(r: dict[str, Any]) -> list[str]:
    if not r["warm_start"]:
        return []
    lines = [
        "",
        "## The cheapest fix at the largest drift: warm start from Δθ vs cold re-tune",
        "",
        "| task | steps | mode | accuracy | θ+Δθ | reached θ+Δθ |",
        "|---|---|---|---|---|---|",
    ]
    for x in r["warm_start"]:
        lines.append(
            f"| {x['task']} | {x['steps']} | {x['mode']} | {100 * x['accuracy']:.1f} | "
            f"{100 * x['base+patch']:.1f} | {'yes' if x['reached'] else 'no'} |"
        )
    return lines


def _correction(r: dict[str, Any]) -> list[str]:
    """The rescale correction: each corrected cell against its plain port, then the verdict over cells."""
    fix = r.get("correction")
    if not fix:
        return []
    corrected = [c for c in r["cells"] if c.get("corrected")]
    lines = [
        "",
        "## A training-free correction: rescale Δθ by the λ that agrees most with θ+Δθ (no labels)",
        "",
        f"λ chosen from {', '.join(corrected[0]['corrected']['agreement'])} "
        "on unlabeled train-split inputs of the task; scored on the eval examples, paired against the plain port.",
        "",
        "| task | level | drift | λ | plain port | corrected | gain [95% CI] | McNemar p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in corrected:
        x = c["corrected"]
        lines.append(
            f"| {c['task']} | {c['level']} | {100 * c['drift']:.2f}% | {x['scale']:g} | "
            f"{100 * c['evolved+patch']:.1f} | {100 * x['evolved+patch']:.1f} | {100 * x['gain_over_plain']:+.1f} "
            f"[{100 * x['gain_ci'][0]:+.1f}, {100 * x['gain_ci'][1]:+.1f}] | {x['mcnemar_p']:.3g} |"
        )
    return lines + [
        "",
        f"Over {fix['cells']} cells: mean gain {fix['mean_gain_points']:+.2f} points "
        f"[{fix['ci_points'][0]:+.2f}, {fix['ci_points'][1]:+.2f}]; λ ≠ 1 chosen in {fix['scale_not_1']}; "
        f"significantly better in {fix['helped']}, worse in {fix['hurt']}. Verdict: **{fix['verdict']}**.",
    ]


def _forecast(r: dict[str, Any]) -> list[str]:
    """The forecast's out-of-sample validation: leave one level out, and (≥ 2 tasks) leave one task out."""
    v = r["forecast_validation"]
    if not v.get("cells"):
        return []
    rho = "-" if v["spearman_loss"] is None else f"{v['spearman_loss']:.3f}"
    mae = "-" if v["mae_neg_flip_rate_points"] is None else f"{v['mae_neg_flip_rate_points']:.2f}"
    lines = [
        "",
        "## Forecast, validated out of sample",
        "",
        f"{v['protocol']}. Cells: {v['cells']}.",
        "",
        f"- Spearman ρ(forecast loss, measured loss): **{rho}** (goal ≥ 0.8: "
        f"{'met' if v['met']['spearman_loss'] else 'not met'})",
        f"- negative-flip-rate MAE: **{mae} points** (goal ≤ 1.5: "
        f"{'met' if v['met']['mae_neg_flip_rate_points'] else 'not met'})",
        f"- loss MAE: {v['mae_loss_points']:.2f} points",
    ]
    t = v.get("leave_one_task_out")
    if t and t.get("cells"):
        trho = "-" if t["spearman_loss"] is None else f"{t['spearman_loss']:.3f}"
        lines.append(
            f"- a harder protocol, leave one task out ({t['tasks']} tasks; {t['protocol']}): ρ {trho}, "
            f"negative-flip-rate MAE {t['mae_neg_flip_rate_points']:.2f} points, loss MAE "
            f"{t['mae_loss_points']:.2f} points"
        )
    return lines


def _footer(r: dict[str, Any]) -> list[str]:
    return [
        "",
        f"Machine: {r['machine']['platform']}, {r['machine']['cpus']} CPUs; wall time of this run "
        f"{r['wall_s'] / 60:.1f} min (cached steps are not re-run).",
        "",
        "![loss vs drift](loss.png)",
        "",
        "![forecast](forecast.png)",
        "",
    ]


def charts(r: dict[str, Any], out: Path) -> None:
    """loss.png (four panels against drift, bands across seeds) and forecast.png (forecast vs measured)."""
    import matplotlib  # deferred: only drawing charts needs it, and the Agg backend must be set first

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(c["task"] for c in r["cells"]))
    panels = [
        ("loss = acc(θ+Δθ) − acc(θ'+Δθ) (points)", lambda c: c["loss"]),
        ("negative-flip rate (%)", lambda c: c["neg_flip_rate"]),
        ("gain of θ'+Δθ over θ' zero-shot (points)", lambda c: c["evolved+patch"] - c["evolved"]),
        ("ported − re-tuned (points)", None),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (title, key) in zip(axes.flat, panels):
        for task in tasks:
            if key is None:
                xs = [x for x in r["retunes"] if x["task"] == task]
                if xs:
                    ax.errorbar(
                        [100 * x["drift"] for x in xs],
                        [100 * x["ported_minus_retuned"] for x in xs],
                        yerr=[
                            [100 * (x["ported_minus_retuned"] - x["ci"][0]) for x in xs],
                            [100 * (x["ci"][1] - x["ported_minus_retuned"]) for x in xs],
                        ],
                        marker="o",
                        capsize=3,
                        label=task,
                    )
                continue
            rows = by_level(r, task, key)
            d = [100 * x["drift"] for x in rows]
            ax.plot(d, [100 * x["mean"] for x in rows], marker="o", label=task)
            ax.fill_between(d, [100 * x["lo"] for x in rows], [100 * x["hi"] for x in rows], alpha=0.2)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("relative drift of the projection matrices (%)")
        ax.legend(fontsize=8)
    fig.suptitle("Where does a ported patch break?")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for task in tasks:
        cs = [c for c in r["cells"] if c["task"] == task and c["forecast"]["loss"] is not None]
        ax.scatter([100 * c["forecast"]["loss"] for c in cs], [100 * c["loss"] for c in cs], label=task, s=18)
    lim = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
    ax.plot(lim, lim, color="grey", lw=0.8)
    ax.set_xlabel("forecast loss (points, out of sample)")
    ax.set_ylabel("measured loss (points)")
    ax.set_title("forecast vs measured, leave one drift level out", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "forecast.png", dpi=110)
    plt.close(fig)
