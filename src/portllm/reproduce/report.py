"""The reproduction as a person reads it: report.md (Tables 2 and 6 of the paper, flips, settings)
and two charts."""

from __future__ import annotations

import json
from pathlib import Path

from .profiles import LABELS, VARIANTS
from .result import ReproduceReport


def fmt_drift(d: dict[str, float]) -> str:
    keys = [k for k in ("q_proj", "up_proj", "embed_tokens") if k in d]
    return ", ".join(f"{k} {d[k]:.3%}" for k in keys)


def fmt(x: float | None, spec: str) -> str:
    """A number, or "-" where a step left none (no port was run)."""
    return "-" if x is None else format(x, spec)


def markdown(r: ReproduceReport) -> str:
    """report.md: Table 2 (accuracy), Table 6 (cost), flips, settings."""
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
        "| task | n | metric | " + " | ".join(LABELS[v] for v in VARIANTS) + " | ported − re-tuned |",
        "|---|---|---|" + "---|" * len(VARIANTS) + "---|",
    ]
    for name, t in r.tasks.items():
        lines.append(
            f"| {name} | {t.n} | {t.metric} | "
            + " | ".join(f"{100 * t.scores[v]:.1f} ± {100 * t.stderr[v]:.1f}" for v in VARIANTS)
            + f" | {100 * t.ported_minus_retuned:+.1f} |"
        )
    a = r.average
    lines.append(
        "| **average** | | | "
        + " | ".join(f"**{100 * a[v]:.1f}**" for v in VARIANTS)
        + f" | **{100 * a['ported_minus_retuned']:+.1f}** |"
    )
    e = r.efficiency
    lines += [
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
        "",
        "## What the update broke: θ' + Δθ against θ + Δθ",
        "",
        "| task | n | agreement | negative flips (right before, wrong after) | positive flips | negative flip rate |",
        "|---|---|---|---|---|---|",
    ]
    for name, f in r.flips.items():
        lines.append(
            f"| {name} | {f.n} | {100 * f.agreement:.1f}% | {f.negative_flips} | {f.positive_flips} "
            f"| {100 * f.negative_flip_rate:.1f}% |"
        )
    lines += [
        "",
        "## Settings",
        "",
        f"- LoRA: {json.dumps(r.settings['train'])}",
        f"- eval dtype: {r.settings['eval_dtype']}",
    ]
    lines += [f"- {n}" for n in r.settings["notes"]]
    lines += [
        f"- machine: {r.machine['platform']}, {r.machine['cpus']} CPUs",
        f"- total time: {r.timings_s['total'] / 60:.1f} min",
        "",
        "![accuracy](accuracy.png)",
        "",
        "![cost](efficiency.png)",
        "",
    ]
    return "\n".join(lines)


def charts(r: ReproduceReport, out: Path) -> None:
    """accuracy.png (each variant per task, ± stderr) and efficiency.png (port against re-tune)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r.tasks)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names) + 2), 4))
    w = 0.8 / len(VARIANTS)
    for k, v in enumerate(VARIANTS):
        xs = [i + (k - 2) * w for i in range(len(names))]
        ax.bar(
            xs,
            [100 * r.tasks[n].scores[v] for n in names],
            w,
            label=LABELS[v],
            yerr=[100 * r.tasks[n].stderr[v] for n in names],
            capsize=2,
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
