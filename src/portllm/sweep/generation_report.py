"""The generation sweep's report: markdown tables and one chart, from report.json alone (so it re-renders)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _f(v: Any, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# Generation sweep: {r['base']['name']} ({r['base']['model_family']})",
        "",
        f"Plan `{r['plan']['name']}`: {len(r['tasks'])} generation tasks x {len(r['plan']['seeds'])} seeds; signals "
        f"from {r['plan']['signal_rows']} train rows and greedy answers to {r['plan']['signal_outputs']} of their "
        f"prompts; scored on the eval rows. Wall {r['wall_s'] / 60:.1f} min "
        f"({r['machine']['cpus']} CPUs, {r['machine']['platform']}).",
        "",
        "## Did the patches learn? (θ+Δθ against θ, reference log-likelihood on the eval rows, paired)",
        "",
        "| task | seed | θ nats/token | θ+Δθ | gain [95% CI] | z | learned (z > 2) |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in r["tasks"]:
        for s, x in t["seeds"].items():
            lo, hi = x["gain_ci"]
            lines.append(
                f"| {t['task']} | {s} | {x['loglik_theta']:.4f} | {x['loglik_patched']:.4f} | "
                f"{x['gain']:+.4f} [{lo:+.4f}, {hi:+.4f}] | {_f(x['z'], '.1f')} | {'yes' if x['learned'] else 'NO'} |"
            )
    lines += [
        "",
        "## Cells: the port (θ'+Δθ) against θ+Δθ on the eval rows, and the signals from the train rows",
        "",
        "| task | base | drift | seed | loglik change, measured [95% CI] | signal | answers changed, measured | "
        "signal | chrF θ+Δθ -> θ'+Δθ | θ'+Δθ over θ' (nats/token) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in sorted(r["cells"], key=lambda c: (c["task"], c["drift"], c["seed"])):
        m, s = c["measured"], c["signals"]
        lo, hi = m["loglik_change_ci"]
        chrf = f"{m['chrf_a']:.1f} -> {m['chrf_b']:.1f}" if "chrf_a" in m else "–"
        e = c.get("patch_on_evolved")
        over = f"{e['gain']:+.4f} [{e['gain_ci'][0]:+.4f}, {e['gain_ci'][1]:+.4f}]" if e else "–"
        lines.append(
            f"| {c['task']} | {c['level']} | {100 * c['drift']:.2f}% | {c['seed']} | {m['loglik_change']:+.4f} "
            f"[{lo:+.4f}, {hi:+.4f}] | {s['loglik_change']:+.4f} | {100 * m['outputs_changed']:.1f}% | "
            f"{100 * s['outputs_changed']:.1f}% | {chrf} | {over} |"
        )
    v = r["forecast_validation"]
    lines += [
        "",
        f"## Forecast validation ({v['cells']} cells; {v['controls']} t = 0 controls left out; signals from "
        f"{v['signals_inputs']})",
        "",
        "raw: the change measured on the train rows taken as the forecast (`--calibration raw`); leave one task "
        "out: the slope fitted on the other task's cells (a user's task is never in the calibration); leave one "
        "level out: fitted without that level and without the held-out patch. Intervals: the signal's sampling "
        "interval scaled by the slope, widened by 1.96 x the fold's own residual sd.",
        "",
        "| target | protocol | cells | MAE | bias (forecast − measured) | Spearman ρ | 95% interval coverage |",
        "|---|---|---|---|---|---|---|",
    ]
    for what, label in (("loglik", "loglik change"), ("changed", "answers changed")):
        for proto in ("raw", "leave_one_task_out", "leave_one_level_out"):
            x = v[what][proto]
            if not x.get("cells"):
                lines.append(f"| {label} | {proto} | 0 | {x.get('reason', '–')} | | | |")
                continue
            unit = x["unit"]
            lines.append(
                f"| {label} | {proto} | {x['cells']} | {x['mae']:.4g} {unit} | {x['bias']:+.4g} | "
                f"{_f(x['spearman'], '.3f')} | {_f(x['interval_coverage'], '.1%')} |"
            )
    cal = r.get("calibration")
    if cal:
        lines += [
            "",
            "## Shipped calibration (src/portllm/forecast_calibration_generation.json)",
            "",
            f"loglik change = {cal['gen_loglik_a']:.3f} x signal (out-of-sample sd {_f(cal['gen_loglik_sd'], '.4f')} "
            f"nats/token); answers changed = {cal['gen_changed_a']:.3f} x signal (sd "
            f"{_f(cal['gen_changed_sd_points'], '.1f')} points). {cal['gen_source']}.",
        ]
    return "\n".join(lines) + "\n"


def chart(r: dict[str, Any], out: Path) -> None:
    """generation.png: the loglik change against drift per task (real bases as their own markers), and the
    forecast's raw signal against what was measured, for both targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    tasks = sorted({c["task"] for c in r["cells"]})
    for i, task in enumerate(tasks):
        color = f"C{i}"
        mine = [c for c in r["cells"] if c["task"] == task]
        interp = sorted({c["drift"] for c in mine if not c["real"]})
        ys = [
            sum(c["measured"]["loglik_change"] for c in mine if c["drift"] == d and not c["real"])
            / max(1, sum(1 for c in mine if c["drift"] == d and not c["real"]))
            for d in interp
        ]
        axes[0].plot([100 * d for d in interp], ys, "o-", color=color, label=f"{task} (interpolated)")
        real = [c for c in mine if c["real"]]
        if real:
            axes[0].plot(
                [100 * c["drift"] for c in real],
                [c["measured"]["loglik_change"] for c in real],
                "s",
                color=color,
                mfc="none",
                label=f"{task} (real update)",
            )
        for ax, (m, s, scale) in zip(
            axes[1:], (("loglik_change", "loglik_change", 1), ("outputs_changed", "outputs_changed", 100))
        ):
            ax.plot([scale * c["signals"][s] for c in mine], [scale * c["measured"][m] for c in mine], "o", color=color)
    axes[0].axhline(0, color="grey", lw=0.5)
    axes[0].set_xlabel("projection drift (%)")
    axes[0].set_ylabel("loglik change on eval rows (nats/token)")
    axes[0].legend(fontsize=7)
    for ax, name in zip(axes[1:], ("loglik change (nats/token)", "greedy answers changed (%)")):
        lims = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
        ax.plot(lims, lims, color="grey", lw=0.5)
        ax.set_xlabel(f"signal on train rows: {name}")
        ax.set_ylabel(f"measured on eval rows: {name}")
    fig.tight_layout()
    fig.savefig(out / "generation.png", dpi=110)
    plt.close(fig)
