"""The reproduction as a person reads it: report.md (Tables 2 and 6 of the paper, paired comparisons,
flips, settings) and two charts.

Every accuracy is shown with its Wilson 95% interval (never "± stderr", which reads "0.0 ± 0.0" at 0 of
n) beside the majority-class baseline, and every difference between variants is paired: B − A on the
same examples with its paired-bootstrap 95% interval and the exact McNemar p-value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..stats import Paired
from .profiles import LABELS, VARIANTS
from .result import ReproduceReport, TaskScores

LEARNED_RULE = (
    "θ + Δθ beats θ zero-shot (paired 95% CI of the difference above 0) and the majority class "
    "(Wilson 95% lower bound above it)"
)


def fmt_drift(d: dict[str, float]) -> str:
    keys = [k for k in ("q_proj", "up_proj", "embed_tokens") if k in d]
    return ", ".join(f"{k} {d[k]:.3%}" for k in keys)


def fmt(x: float | None, spec: str) -> str:
    """A number, or "-" where a step left none (no port was run)."""
    return "-" if x is None else format(x, spec)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def fmt_score(t: TaskScores, v: str) -> str:
    """'61.0 [57.7, 64.2]': accuracy (%) and its Wilson 95% interval."""
    lo, hi = t.interval(v)
    return f"{100 * t.scores[v]:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def fmt_diff(d: float | None, ci: Any = None) -> str:
    """'+1.4 [-0.9, +3.7]': a difference in points with its 95% interval, where there is one."""
    if d is None:
        return "-"
    return f"{100 * d:+.1f}" + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "")


def fmt_paired(p: Paired, margin: float) -> str:
    return f"{fmt_diff(p.diff, (p.ci_low, p.ci_high))} points, McNemar p {p.mcnemar_p:.2g}: {p.verdict(margin)}"


def accuracy_rows(r: ReproduceReport) -> tuple[list[str], list[tuple[list[str], bool]]]:
    """Table 2 as header and (cells, bold) rows, shared by report.md and the console.

    The headline average is over the tasks whose patch learned (`r.learned`); the all-task average
    follows as a secondary row. Reports older than the paired statistics keep their single average row.
    """
    header = ["task", "n", "metric", "majority", *[LABELS[v] for v in VARIANTS]]
    header += ["ported − re-tuned [95% CI]", "McNemar p", "neg. flips"]
    rows: list[tuple[list[str], bool]] = []
    for name, t in r.tasks.items():
        p = r.paired.get(name, {}).get("ported_minus_retuned")
        f = r.flips[name]
        rows.append(
            (
                [name, str(t.n), t.metric, pct(t.majority), *[fmt_score(t, v) for v in VARIANTS]]
                + [
                    fmt_diff(t.ported_minus_retuned, p and (p.ci_low, p.ci_high)),
                    "-" if p is None else f"{p.mcnemar_p:.2g}",
                    f"{f.negative_flips} ({100 * f.negative_flip_rate:.1f}%)",
                ],
                False,
            )
        )

    def average(label: str, a: dict[str, Any], bold: bool) -> tuple[list[str], bool]:
        cells = [pct(a.get(v)) for v in VARIANTS]
        return [
            label,
            "",
            "",
            "",
            *cells,
            fmt_diff(a.get("ported_minus_retuned"), a.get("ported_minus_retuned_ci")),
            "",
            "",
        ], bold

    if r.learned is None or r.average_learned is None:
        rows.append(average("average", r.average, True))
    else:
        rows.append(average("average, learned", r.average_learned, True))
        rows.append(average("average, all tasks", r.average, False))
    return header, rows


def learned_line(r: ReproduceReport) -> str | None:
    """Which tasks' patches learned, by what rule, and what that means for the averages (None for older reports)."""
    if r.learned is None:
        return None
    rest = [n for n in r.tasks if n not in r.learned]
    return f"Patch learned: {', '.join(r.learned) or 'no task'} (rule: {LEARNED_RULE}). " + (
        f"Not learned: {', '.join(rest)}; there the port has nothing learned to keep or lose, so the headline "
        "average ('average, learned') leaves them out and 'average, all tasks' is the secondary line."
        if rest
        else "The headline average is over all tasks."
    )


def markdown(r: ReproduceReport) -> str:
    """report.md: Table 2 (accuracy with intervals and the majority baseline), paired comparisons,
    Table 6 (cost), flips, settings."""
    lines = _accuracy(r) + _paired(r) + _cost(r) + _flips(r) + _settings(r)
    return "\n".join(lines)


def _accuracy(r: ReproduceReport) -> list[str]:
    """The title, θ and θ', and Table 2 with which tasks' patches learned."""
    ev = r.evolved
    lines = [
        f"# PortLLM reproduction ({r.profile} profile)",
        "",
        f"Base θ: `{r.base['name']}` ({r.base['fingerprint']}). Evolved θ': continued pretraining "
        f"({ev.mode}, {ev.steps} steps on `{ev.corpus}`), "
        f"{ev.fingerprint}. Drift ||θ'−θ||/||θ||: {fmt_drift(ev.drift)}.",
        "",
        "## Accuracy (Table 2 of the paper)",
        "",
        "Accuracy (%) with its Wilson 95% interval. majority: the accuracy of always answering the most "
        "frequent gold label of the slice (none for generation). ported − re-tuned: the paired difference on "
        "the same examples, with its paired-bootstrap 95% interval and the exact McNemar p-value "
        "(averages: the mean over tasks, with a bootstrap interval resampling each task's examples). "
        "neg. flips: right with θ + Δθ, wrong when ported.",
        "",
    ]
    header, rows = accuracy_rows(r)
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cells, bold in rows:
        lines.append("| " + " | ".join(f"**{c}**" if bold and c else c for c in cells) + " |")
    line = learned_line(r)
    return lines + (["", line] if line else [])


def _paired(r: ReproduceReport) -> list[str]:
    """Each task's paired comparisons with their verdicts (none in reports older than them)."""
    if not r.paired:
        return []
    lines = [
        "",
        "## Paired comparisons (B − A on the same examples, points)",
        "",
        f'Verdicts: "no difference" only where the whole 95% interval lies within ±{100 * r.margin:g} points; '
        "otherwise better, worse, or inconclusive.",
        "",
        "| task | ported − re-tuned | McNemar p | verdict | ported − (θ + Δθ) | McNemar p | verdict "
        "| (θ + Δθ) − θ | McNemar p | learned |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, cmp in r.paired.items():
        cells = [name]
        for k in ("ported_minus_retuned", "ported_minus_patched", "patched_minus_base"):
            p = cmp[k]
            cells += [fmt_diff(p.diff, (p.ci_low, p.ci_high)), f"{p.mcnemar_p:.2g}"]
            if k != "patched_minus_base":
                cells.append(_short(p.verdict(r.margin)))
        cells.append("yes" if r.learned and name in r.learned else "no")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _cost(r: ReproduceReport) -> list[str]:
    """Table 6: what porting and re-tuning cost."""
    e = r.efficiency
    return [
        "",
        "## Cost of porting vs re-tuning (Table 6 of the paper)",
        "",
        "| | trainable parameters | peak memory (RSS, MB) | wall time (s) |",
        "|---|---|---|---|",
        f"| port θ' + Δθ (no training) | 0 | {fmt(e.port.peak_rss_mb, '.0f')} | {fmt(e.port.wall_s, '.1f')} |",
        f"| re-tune Δθ' on θ' (LoRA) | {e.retune.trainable_params:,} | "
        f"{fmt(e.retune.peak_rss_mb, '.0f')} | {fmt(e.retune.wall_s, '.1f')} |",
        f"| ratio re-tune / port | | {fmt(e.memory_retune_over_port, '.1f')}x | "
        f"{fmt(e.time_retune_over_port, '.1f')}x |",
        "",
        e.note + ".",
    ]


def _flips(r: ReproduceReport) -> list[str]:
    """θ' + Δθ against θ + Δθ, example by example."""
    lines = [
        "",
        "## What the update broke: θ' + Δθ against θ + Δθ",
        "",
        "| task | n | agreement | negative flips (right before, wrong after) | positive flips | negative flip rate "
        "| Δ [95% CI] | McNemar p | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, f in r.flips.items():
        paired = bool(f.verdict)  # reports older than the paired statistics have none
        lines.append(
            f"| {name} | {f.n} | {100 * f.agreement:.1f}% | {f.negative_flips} | {f.positive_flips} "
            f"| {100 * f.negative_flip_rate:.1f}% | {fmt_diff(f.diff, (f.ci_low, f.ci_high)) if paired else '-'} "
            f"| {f'{f.mcnemar_p:.2g}' if paired else '-'} | {_short(f.verdict) or '-'} |"
        )
    return lines


def _settings(r: ReproduceReport) -> list[str]:
    return [
        "",
        "## Settings",
        "",
        f"- LoRA: {json.dumps(r.settings['train'])}",
        f"- eval dtype: {r.settings['eval_dtype']}",
        *[f"- {n}" for n in r.settings["notes"]],
        f"- machine: {r.machine['platform']}, {r.machine['cpus']} CPUs",
        f"- total time: {r.timings_s['total'] / 60:.1f} min",
        "",
        "![accuracy](accuracy.png)",
        "",
        "![cost](efficiency.png)",
        "",
    ]


def _short(verdict: str) -> str:
    """'B worse' reads 'worse' in a column whose header says what B is."""
    return verdict.removeprefix("B ")


def charts(r: ReproduceReport, out: Path) -> None:
    """accuracy.png (each variant per task with its Wilson 95% interval, and the majority baseline) and
    efficiency.png (port against re-tune)."""
    import matplotlib  # deferred: only drawing charts needs it, and the Agg backend must be set first

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r.tasks)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names) + 2), 4))
    w = 0.8 / len(VARIANTS)
    for k, v in enumerate(VARIANTS):
        xs = [i + (k - 2) * w for i in range(len(names))]
        ys = [r.tasks[n].scores[v] for n in names]
        ivs = [r.tasks[n].interval(v) for n in names]
        ax.bar(
            xs,
            [100 * y for y in ys],
            w,
            label=LABELS[v],
            yerr=[[100 * (y - lo) for y, (lo, _) in zip(ys, ivs)], [100 * (hi - y) for y, (_, hi) in zip(ys, ivs)]],
            capsize=2,
        )
    maj = [(i, r.tasks[n].majority) for i, n in enumerate(names) if r.tasks[n].majority is not None]
    if maj:
        ax.hlines(
            [100 * m for _, m in maj],
            [i - 0.45 for i, _ in maj],
            [i + 0.45 for i, _ in maj],
            colors="black",
            linestyles="dashed",
            linewidth=1,
            label="majority class",
        )
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("PortLLM: does the patch survive the base update?")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)

    e = r.efficiency
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, label in ((axes[0], "peak_rss_mb", "peak memory (MB)"), (axes[1], "wall_s", "wall time (s)")):
        vals = [getattr(e.port, key) or 0, getattr(e.retune, key) or 0]
        ax.bar(["port (θ'+Δθ)", "re-tune (Δθ')"], vals, color=["tab:green", "tab:red"])
        ax.set_title(label)
        ax.set_ylim(0, 1.15 * max(vals + [1e-9]))
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(out / "efficiency.png", dpi=120)
    plt.close(fig)
