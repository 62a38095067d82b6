"""The sweep as a person reads it: what the user loses as the base drifts, with bands across seeds."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..errors import PortLLMError
from ..forecast import MC_FIELDS
from ..models import family_of
from .calibrate import fit_families, is_control, validate
from .repaired import markdown as repair_markdown
from .repaired import summary as repair_summary


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


def by_level(report: dict[str, Any], task: str, key: Any, family: str | None = None) -> list[dict[str, Any]]:
    """Per level (in drift order): mean and seed band of `key(cell)` over the task's seeds (of one base family,
    when given). `real` marks a real evolved base, which is not a point on the interpolated line."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for c in report["cells"]:
        if c["task"] == task and (family is None or c.get("family") == family):
            groups.setdefault(c["level"], []).append(c)
    rows = []
    for label, cs in groups.items():
        vals = [v for v in (key(c) for c in cs) if v is not None]
        if vals:
            m, lo, hi = _band(vals)
            real = cs[0].get("t") is None
            rows.append(
                {"level": label, "drift": cs[0]["drift"], "real": real, "mean": m, "lo": lo, "hi": hi, "n": len(vals)}
            )
    return sorted(rows, key=lambda x: x["drift"])


def _learned(report: dict[str, Any], task: str, family: str | None = None) -> bool:
    """The patch learned: θ+Δθ beats θ zero-shot and the majority class by > 2 standard errors (all seeds)."""
    mine = [c for c in report["cells"] if c["task"] == task and (family is None or c.get("family") == family)]
    cs = [c for c in mine if c["t"] == 0.0] or mine
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
    families = list(dict.fromkeys(c.get("family") for c in r["cells"]))
    pairs = list(dict.fromkeys((c.get("family"), c["task"]) for c in r["cells"]))
    lines = _intro(r) + _bases(r)
    for family, task in pairs:
        lines += _task(r, task, family if len(families) > 1 else None)
    lines += _retunes(r) + _warm_start(r) + _correction(r) + _forecast(r) + _footer(r)
    return "\n".join(lines)


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
    ] + [
        f"Joined: the sweep `{j['plan']}` on base `{j['base']['name']}` ({j['base'].get('model_family', '?')}), "
        f"from `{j['report']}`: its cells and re-tunes are in every table, chart and figure below."
        for j in r.get("joined", [])
    ]


def _bases(r: dict[str, Any]) -> list[str]:
    """The evolved bases of each base family (this sweep's, then each joined one's)."""
    if not r.get("joined"):
        return _bases_of(r["levels"], "")
    lines = _bases_of(r["levels"], f" of {r['base']['name']} ({r['base'].get('model_family', '?')})")
    for j in r["joined"]:
        lines += _bases_of(j["levels"], f" of {j['base']['name']} ({j['base'].get('model_family', '?')})")
    return lines


def _bases_of(levels: list[dict[str, Any]], title: str) -> list[str]:
    """One family's evolved bases: drift, KL and agreement with θ; then the drift per layer type."""
    levels = sorted(levels, key=lambda x: x["drift"])
    lines = [
        "",
        f"## Evolved bases{title}",
        "",
        "| level | evolution | projection drift | KL on held-out text | agreement with θ zero-shot |",
        "|---|---|---|---|---|",
    ]
    for lv in levels:
        agree = lv.get("agreement_with_base") or {}
        ag = ", ".join(f"{t} {100 * v:.1f}%" for t, v in agree.items())
        kl = "-" if lv.get("kl_text") is None else f"{lv['kl_text']:.4f}"
        lines.append(f"| {lv['label']} | {lv['evolution']} | {100 * lv['drift']:.2f}% | {kl} | {ag} |")
    seen = {k for lv in levels for k in lv.get("drift_by_type") or {}}
    types = sorted(seen, key=lambda k: (not k.endswith("_proj"), k))  # the patched projections first
    if types:
        lines += ["", "Relative drift ‖θ'−θ‖/‖θ‖ per layer type (%):", ""]
        lines += ["| level | " + " | ".join(types) + " |", "|---|" + "---:|" * len(types)]
        for lv in levels:
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


def _task(r: dict[str, Any], task: str, family: str | None = None) -> list[str]:
    """One task (of one base family, when the report has several): per level, the scores, the loss of the port
    with its seed band, and the forecast (out of sample: the headline protocol's)."""
    first = next(c for c in r["cells"] if c["task"] == task and (family is None or c.get("family") == family))
    learned = _learned(r, task, family)
    lines = [
        "",
        f"## {task}{f' on {family}' if family else ''} (n = {first['n']}, "
        f"majority class {100 * first['majority']:.1f}%, θ zero-shot "
        f"{100 * first['base']:.1f}%; patch {'learned' if learned else 'did NOT clearly learn'})",
        "",
        "| level | drift | θ' zero-shot | θ+Δθ | θ'+Δθ (ported) | loss (points) | neg. flip rate | "
        "gain over θ' | forecast loss | θ'+Δθ' re-tuned |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = {k: by_level(r, task, f, family) for k, f in _TASK_COLUMNS.items()}
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
    several = len({x.get("family") for x in r["retunes"]}) > 1  # joined sweeps: which base each row is on
    lines = [
        "",
        "## Ported against re-tuned (paired, seed 0)",
        "",
        ("| base " if several else "") + "| task | level | drift | ported | re-tuned | ported − re-tuned [95% CI] "
        "| McNemar p |",
        ("|---" if several else "") + "|---|---|---|---|---|---|---|",
    ]
    for x in r["retunes"]:
        lines.append(
            (f"| {x['family']} " if several else "")
            + f"| {x['task']} | {x['level']} | {100 * x['drift']:.2f}% | {100 * x['ported']:.1f} | "
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


SIGNALS_SAME_AS_SCORED = "eval items (same as scored)"  # what `_cell` computes the output signals on today

_PROTOCOLS = (  # report.json key, the row's name in report.md
    ("leave_one_task_out", "leave one task out"),
    ("leave_one_family_out", "leave one family out"),
    ("leave_one_level_out", "leave one level out"),
)


def _num(x: float | None, spec: str, bold: bool = False) -> str:
    if x is None:
        return "-"
    return f"**{x:{spec}}**" if bold else f"{x:{spec}}"


def _forecast(r: dict[str, Any]) -> list[str]:
    """The forecast's validation: one row per protocol (the headline in bold), the controls, where the
    signals came from, and each goal met or not."""
    v = r["forecast_validation"]
    if "controls" not in v:
        return []
    lines = [
        "",
        "## Forecast, validated the way a user meets it",
        "",
        f"Headline: **{v['headline'].replace('_', ' ')}**. The {v['controls']} t = 0 controls (θ' = θ: 0 predicted "
        "= 0 measured by construction) are left out of every figure and of the fit. No fold has one patch "
        "(family, task, seed) on both sides. 95% intervals: the prediction ± 1.96 × the RMS of the other "
        "folds' held-out residuals (each out of sample for its own cell); coverage is measured on the held-out "
        "cells. The strict variant (widths from the same protocol run inside each fold's training cells alone) "
        "is in the last column.",
        "",
        f"Output signals computed on: {', '.join(v['signals_inputs'])}.",
    ]
    if SIGNALS_SAME_AS_SCORED in v["signals_inputs"]:
        lines[-1] += (
            " These are the items whose loss is then measured (on two-choice tasks disagreement = negative + "
            "positive flips, so the flip fit partly regresses on its own target); signals from inputs disjoint "
            "from the scored items need a new sweep."
        )
    lines += [
        "",
        "| protocol | cells | Spearman ρ (loss) | loss MAE (points) | neg.-flip-rate MAE (points) | "
        "95% interval coverage (median half-width) | strict variant |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, name in _PROTOCOLS:
        x = v[key]
        head = key == v["headline"]
        label = f"**{name}** (headline)" if head else name
        if key == "leave_one_task_out":
            label += f", {x['tasks']} tasks"
        if key == "leave_one_level_out":
            label += ", grouped by patch" if x["grouped_by_patch"] else ", NOT grouped by patch (one seed)"
        if x.get("reason"):
            lines.append(f"| {label} | 0 | {x['reason']} | | | | |")
            continue
        lines.append(
            f"| {label} | {x['cells']} | {_num(x['spearman_loss'], '.3f', head)} | "
            f"{_num(x['mae_loss_points'], '.2f', head)} | {_num(x['mae_neg_flip_rate_points'], '.2f', head)} | "
            f"{_coverage(x['interval_coverage'], x['interval_half_width_points'])} | "
            f"{_coverage(x.get('interval_coverage_nested'), x.get('interval_half_width_nested_points'))} |"
        )
    h = v[v["headline"]]
    if h.get("interval_coverage") is not None:
        lines += [
            "",
            f"95% interval coverage ({v['headline'].replace('_', ' ')}): {100 * h['interval_coverage']:.1f}% of "
            f"{h['interval_cells']} held-out cells.",
        ]
    lines += _forms(v)
    return lines + ["", "Goals (issue 21), on held-out cells:", ""] + _goals(v) + _calibrations(r.get("calibration"))


def _forms(v: dict[str, Any]) -> list[str]:
    """Each model form's out-of-sample figures, the shipped one first: the choice between them stays visible."""
    forms = v.get("forms") or {}
    if not forms:
        return []
    lines = [
        "",
        f"Model forms (the shipped one: **{v.get('form')}**), out of sample; ρ / loss MAE / neg.-flip-rate MAE:",
        "",
        "| form | leave one task out | leave one family out | leave one level out |",
        "|---|---|---|---|",
    ]
    for name in sorted(forms, key=lambda n: n != v.get("form")):
        row = [name]
        for key in ("leave_one_task_out", "leave_one_family_out", "leave_one_level_out"):
            x = forms[name][key]
            row.append(
                "-"
                if not x["cells"]
                else f"{_num(x['spearman_loss'], '.2f')} / {x['mae_loss_points']:.2f} / "
                f"{x['mae_neg_flip_rate_points']:.2f} ({x['cells']} cells)"
            )
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _calibrations(cal: dict[str, Any] | None) -> list[str]:
    """The calibration.json `forecast --calibration` reads: the pooled fit, then one line per base family's own
    fit (what `forecast` uses for a patch made on that family)."""
    if not cal:
        return []

    def fit(x: dict[str, Any]) -> str:
        sd = "-" if x["residual_sd_points"] is None else f"{x['residual_sd_points']:.2f}"
        return (
            f"loss = {x['a']:.3f}·raw {x['b']:+.2f}·disturbance, neg. flips = {x['flip_a']:.3f}·raw flips "
            f"{x['flip_b']:+.3f}·disagreement; residual sd {sd} points out of sample"
        )

    lines = ["", "Calibration (calibration.json):", "", f"- pooled: {fit(cal)} ({cal['source']})"]
    for family, x in (cal.get("families") or {}).items():
        lines.append(f"- {family}, {x['cells']} cells: {fit(x)} ({x['source']})")
    return lines


def _coverage(cov: float | None, half: float | None) -> str:
    return "-" if cov is None else f"{100 * cov:.1f}% (±{half:.1f})"


def _goals(v: dict[str, Any]) -> list[str]:
    g, met = v["goal"], v["met"]
    t = g["leave_one_task_out"]
    said = {True: "met", False: "**not met**", None: "not measured"}
    lo, hi = g["interval_coverage"]
    return [
        f"- leave one task out, Spearman ρ ≥ {t['spearman_loss']}: {said[met['leave_one_task_out.spearman_loss']]}",
        f"- leave one task out, negative-flip-rate MAE ≤ {t['mae_neg_flip_rate_points']} points: "
        f"{said[met['leave_one_task_out.mae_neg_flip_rate_points']]}",
        f"- leave one task out, loss MAE ≤ {t['mae_loss_points']} points: "
        f"{said[met['leave_one_task_out.mae_loss_points']]}",
        f"- leave one family out, Spearman ρ ≥ {g['leave_one_family_out']['spearman_loss']}: "
        f"{said[met['leave_one_family_out.spearman_loss']]}"
        + (f" ({v['leave_one_family_out']['reason']})" if v["leave_one_family_out"].get("reason") else ""),
        f"- 95% intervals cover {100 * lo:.0f}–{100 * hi:.0f}% of held-out cells: {said[met['interval_coverage']]}",
    ]


def _footer(r: dict[str, Any]) -> list[str]:
    return [
        "",
        f"Machine: {r['machine']['platform']}, {r['machine']['cpus']} CPUs"
        + (f", steps on an {r['machine']['device']}" if r["machine"].get("device") else "")
        + "; wall time of this run "
        f"{r['wall_s'] / 60:.1f} min (cached steps are not re-run).",
        "",
        "![loss vs drift](loss.png)",
        "",
        "![forecast](forecast.png)",
        "",
    ]


_STYLES = (("-", "o", "s"), ("--", "^", "D"), (":", "v", "P"))  # per base family: line, marker, real base marker


def draw_series(ax: Any, rows: list[dict[str, Any]], label: str, color: Any, style: tuple[str, ...]) -> None:
    """The interpolated levels as one line with its seed band; the real evolved bases as their own hollow
    markers (style[2], default squares) with their band as error bars, never joined to the line (equal drift is
    not the same update)."""
    line = [x for x in rows if not x["real"]]
    real = [x for x in rows if x["real"]]
    d = [100 * x["drift"] for x in line]
    ax.plot(d, [100 * x["mean"] for x in line], linestyle=style[0], marker=style[1], color=color, label=label)
    ax.fill_between(d, [100 * x["lo"] for x in line], [100 * x["hi"] for x in line], color=color, alpha=0.15)
    if real:
        m = [100 * x["mean"] for x in real]
        ax.errorbar(
            [100 * x["drift"] for x in real],
            m,
            yerr=[[a - 100 * x["lo"] for a, x in zip(m, real)], [100 * x["hi"] - a for a, x in zip(m, real)]],
            fmt=style[2] if len(style) > 2 else "s",
            mfc="none",
            color=color,
            capsize=3,
            linestyle="none",
            label=f"{label}: real evolved base",
        )


def legend_handles(r: dict[str, Any], color: dict, style: dict) -> list[Any]:
    """One legend for a chart: a colour per task, then per base family its line and marker and its real evolved
    bases' hollow marker (a family's style is the same in every panel, so one legend says it all)."""
    from matplotlib.lines import Line2D  # deferred with the rest of matplotlib

    handles = [Line2D([], [], color=c, lw=2, label=t) for t, c in color.items()]
    for family, (line, marker, real) in style.items():
        name = "interpolated levels" if len(style) == 1 else f"{family}: interpolated levels"
        handles.append(Line2D([], [], color="black", linestyle=line, marker=marker, label=name))
        if any(c.get("family") == family and c.get("t") is None for c in r["cells"]):
            name = "real evolved base" if len(style) == 1 else f"{family}: real evolved base"
            handles.append(Line2D([], [], color="black", marker=real, mfc="none", linestyle="none", label=name))
    return handles


def charts(r: dict[str, Any], out: Path) -> None:
    """loss.png (four panels against drift, bands across seeds; interpolated levels as lines, real evolved bases
    as separate hollow markers; a colour per task, a line style and marker per base family) and forecast.png
    (out-of-sample forecast vs measured, with each cell's 95% interval, controls left out)."""
    import matplotlib  # deferred: only drawing charts needs it, and the Agg backend must be set first

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(c.get("family") for c in r["cells"]))
    tasks = list(dict.fromkeys(c["task"] for c in r["cells"]))
    color = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(tasks)}
    style = {f: _STYLES[i % len(_STYLES)] for i, f in enumerate(families)}
    panels = [
        ("loss = acc(θ+Δθ) − acc(θ'+Δθ) (points)", lambda c: c["loss"]),
        ("negative-flip rate (%)", lambda c: c["neg_flip_rate"]),
        ("gain of θ'+Δθ over θ' zero-shot (points)", lambda c: c["evolved+patch"] - c["evolved"]),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (title, key) in zip(axes.flat, panels):
        for family in families:
            for task in tasks:
                if rows := by_level(r, task, key, family):
                    draw_series(ax, rows, f"{task} · {family}", color[task], style[family])
        ax.set_title(title, fontsize=10)
    _retune_panel(axes.flat[3], r, color, style)
    for ax in axes.flat:
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("relative drift of the projection matrices (%)")
    axes.flat[0].legend(handles=legend_handles(r, color, style), fontsize=7)
    fig.suptitle("Where does a ported patch break? (lines: interpolated levels; hollow markers: real evolved bases)")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    _forecast_chart(r, out, plt, color, style)


def _retune_panel(ax: Any, r: dict[str, Any], color: dict, style: dict) -> None:
    """Ported − re-tuned per (family, task) with its paired 95% CI; series at one drift are dodged apart."""
    series = [
        (f, t, xs)
        for f in style
        for t in color
        if (xs := [x for x in r["retunes"] if x["task"] == t and x.get("family", f) == f])
    ]
    for k, (family, task, xs) in enumerate(series):
        dx = 0.04 * (k - (len(series) - 1) / 2)
        ax.errorbar(
            [100 * x["drift"] + dx for x in xs],
            [100 * x["ported_minus_retuned"] for x in xs],
            yerr=[
                [100 * (x["ported_minus_retuned"] - x["ci"][0]) for x in xs],
                [100 * (x["ci"][1] - x["ported_minus_retuned"]) for x in xs],
            ],
            marker=style[family][1],
            linestyle=style[family][0],
            color=color[task],
            capsize=3,
        )
    ax.set_title("ported − re-tuned (points; series at one drift set slightly apart)", fontsize=10)


def _forecast_chart(r: dict[str, Any], out: Path, plt: Any, color: dict, style: dict) -> None:
    v = r.get("forecast_validation") or {}
    fig, ax = plt.subplots(figsize=(5.8, 4.8))
    for family in style:
        for task in color:
            cs = [
                c
                for c in r["cells"]
                if c["task"] == task
                and c.get("family") == family
                and c["forecast"].get("loss") is not None
                and not is_control(c)
            ]
            if not cs:
                continue
            x = [100 * c["forecast"]["loss"] for c in cs]
            iv = [c["forecast"].get("loss_interval") for c in cs]
            err = [
                [a - 100 * i[0] if i else 0 for a, i in zip(x, iv)],
                [100 * i[1] - a if i else 0 for a, i in zip(x, iv)],
            ]
            ax.errorbar(
                x,
                [100 * c["loss"] for c in cs],
                xerr=err,
                fmt=style[family][1],
                color=color[task],
                ms=4,
                elinewidth=0.6,
                alpha=0.8,
            )
    lim = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
    ax.plot(lim, lim, color="grey", lw=0.8)
    ax.set_xlabel("forecast loss (points, out of sample; bars: 95% interval)")
    ax.set_ylabel("measured loss (points)")
    head = str(v.get("headline", "out of sample")).replace("_", " ")
    ax.set_title(f"forecast vs measured, {head} ({v.get('controls', 0)} controls left out)", fontsize=9)
    from matplotlib.lines import Line2D  # deferred with the rest of matplotlib

    handles = [Line2D([], [], color=c, lw=2, label=t) for t, c in color.items()]
    if len(style) > 1:  # a marker per family; this chart has no lines
        handles += [Line2D([], [], color="k", marker=m, linestyle="none", label=f) for f, (_, m, _) in style.items()]
    ax.legend(handles=handles, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "forecast.png", dpi=110)
    plt.close(fig)


def finish(report: dict[str, Any], out: Path, join: Iterable[str | Path] = ()) -> dict[str, Any]:
    """Join other base families' sweeps (`join`: their report.json files), validate and fit the forecast on the
    report's cells, then write OUT/calibration.json, report.json, report.md and the charts."""
    write(forecast_fields(join_reports(report, join)), out)
    return report


def family_name(base: str) -> str:
    """The family a sweep's cells name: the base as given (a directory: its last part), as run.py records it."""
    return Path(base).name if os.sep in base else base


MC_CELL = ("task", "seed", "level", "drift", "loss", "neg_flip_rate", "forecast")  # what a joined cell must have


def read_joins(own: dict[str, Any], paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """The joined sweeps' reports, refused (one line each) where a file is missing or not a multiple-choice sweep's
    report.json, or where its base family (base name or model family) is this sweep's or another joined one's:
    leave one family out must never hold out a family that is still in training. `own`: this sweep's base dict."""
    taken = {family_name(own["name"]): own.get("model_family")}
    out = []
    for path in paths:
        where = f"joined report {path}"
        try:
            j = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            what = e.__class__.__name__
            raise PortLLMError(f"{where}: unreadable ({what}); give a report.json `portllm sweep` wrote") from None
        ok = isinstance(j, dict) and all(isinstance(j.get(k), t) for k, t in (("plan", dict), ("base", dict)))
        ok = ok and isinstance(j.get("levels"), list) and isinstance(j.get("cells"), list) and "name" in j["base"]
        if ok and j["plan"].get("kind", "mc") == "generation":
            raise PortLLMError(f"{where}: a generation sweep's report; only multiple-choice sweeps can be joined")
        if not ok or not all(isinstance(c, dict) and all(k in c for k in MC_CELL) for c in j["cells"]):
            raise PortLLMError(f"{where}: not a sweep's report.json (plan, base, levels and scored cells)")
        name = family_name(j["base"]["name"])
        if "model_family" not in j["base"]:  # written before it was recorded: read from the base's config
            j["base"]["model_family"] = family_of(j["base"]["name"])
        model = j["base"]["model_family"]
        if name in taken or model in taken.values():
            raise PortLLMError(f"{where}: its base {name} ({model}) is already in this report; join one per family")
        taken[name] = model
        out.append(j | {"path": str(path)})
    return out


def join_reports(report: dict[str, Any], join: Iterable[str | Path]) -> dict[str, Any]:
    """Add the joined sweeps' own cells and re-tunes (each naming its family; cells a joined report had joined
    itself are left there) and `report["joined"]`; this sweep's cells and re-tune rows that name no family gain
    its own. The cell and re-tune lists are new: the caller's (a running sweep's) are never extended."""
    own = family_name(report["base"]["name"])
    for x in report["cells"] + report["retunes"]:
        x.setdefault("family", own)
    cells, retunes, joined = list(report["cells"]), list(report["retunes"]), []
    for j in read_joins(report["base"], join):
        name = family_name(j["base"]["name"])
        for c in j["cells"]:
            c.setdefault("family", name)
            c.setdefault("signals_inputs", SIGNALS_SAME_AS_SCORED)
        for x in j.get("retunes") or []:
            x.setdefault("family", name)
        cells += [c for c in j["cells"] if c["family"] == name]
        retunes += [x for x in j.get("retunes") or [] if x["family"] == name]
        joined.append({"report": j["path"], "base": j["base"], "levels": j["levels"], "plan": j["plan"]["name"]})
    report |= {"cells": cells, "retunes": retunes}
    report.pop("joined", None)
    if joined:
        report["joined"] = joined
    return report


def forecast_fields(report: dict[str, Any]) -> dict[str, Any]:
    """Fill `forecast_validation` and `calibration` from `report["cells"]` (each cell gains its out-of-sample
    forecast); the calibration is pooled over the base families with one fit per family (calibration.json's
    "families"), each source naming its run."""
    cells = report["cells"]
    report["forecast_validation"] = validate(cells) if len({c["level"] for c in cells}) >= 3 else {"cells": 0}
    report["calibration"] = None
    if sum(not is_control(c) for c in cells) >= 4:
        bases = [report["base"]] + [j["base"] for j in report.get("joined", [])]
        cal = fit_families(cells, {family_name(b["name"]): b["model_family"] for b in bases})
        plans = [report["plan"]["name"]] + [j["plan"] for j in report.get("joined", [])]
        joins = "".join(f" --join {j['report']}" for j in report.get("joined", []))
        run = f"portllm sweep --plan {report['plan']['name']}{joins} ({len(cells)} cells)"
        runs = {b["model_family"]: f"portllm sweep --plan {p} --base {b['name']}" for b, p in zip(bases, plans)}
        report["calibration"] = {k: getattr(cal, k) for k in MC_FIELDS} | {
            "source": f"{run}: {cal.source}",
            "family": cal.family,
            "families": {
                f: {k: getattr(x, k) for k in MC_FIELDS} | {"source": f"{runs[f]}: {x.source}", "cells": x.cells}
                for f, x in cal.families.items()
            },
        }
    return report


def write(report: dict[str, Any], out: Path) -> None:
    """OUT/calibration.json (where there is one), report.json, report.md, loss.png and forecast.png."""
    if report["calibration"]:
        write_text_atomic(out / "calibration.json", json.dumps(report["calibration"], indent=2))
    write_text_atomic(out / "report.json", json.dumps(report, indent=2, default=str))
    write_text_atomic(out / "report.md", markdown(report) + repair_markdown(report.get("repair")))
    charts(report, out)


FILLED = ("loss", "neg_flip_rate", "loss_interval", "held_out_by")  # what the validation writes into a forecast


def measured(c: dict[str, Any]) -> dict[str, Any]:
    """A cell without what the validation fills in or a re-render adds: what must never change."""
    f = {k: v for k, v in c["forecast"].items() if k not in FILLED}
    return {k: v for k, v in c.items() if k not in ("forecast", "family", "signals_inputs")} | {"forecast": f}


def rerender(report_json: str | Path, out: str | Path | None = None, join: Iterable[str | Path] = ()) -> dict[str, Any]:
    """Re-validate and re-draw a written sweep from its report.json alone (and `join`: other base families'
    sweeps' report.json files), computing no model output: cells gain `family` (the report's base) and
    `signals_inputs` where they lack them, every measured value is kept, and the forecast's predictions,
    validation, calibration, report.md and charts are made anew (into OUT, default: beside report.json). Cells a
    report had joined are re-read only from `join`, so a re-made joined sweep is seen as it is now."""
    src = Path(report_json)
    report = json.loads(src.read_text())
    own = family_name(report["base"]["name"])
    report["cells"] = [c for c in report["cells"] if c.get("family", own) == own]
    report["retunes"] = [x for x in report.get("retunes", []) if x.get("family", own) == own]
    before = [measured(c) for c in report["cells"]]
    if "model_family" not in report["base"]:  # reports written before it was recorded: read from the base's config
        report["base"]["model_family"] = family_of(report["base"]["name"])
    for c in report["cells"]:
        c.setdefault("family", own)
        c.setdefault("signals_inputs", SIGNALS_SAME_AS_SCORED)
    join_reports(report, join)
    before += [measured(c) for c in report["cells"][len(before) :]]
    forecast_fields(report)
    if any(c.get("repaired_by_inputs") for c in report["cells"]):
        report["repair"] = repair_summary(report["cells"], report.get("retunes", []))
    if [measured(c) for c in report["cells"]] != before:
        raise PortLLMError(f"re-rendering {src} changed a measured cell value; it must recompute nothing")
    write(report, Path(out) if out else src.parent)
    return report
