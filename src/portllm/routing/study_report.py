"""The routing study's report.md and routing.png, read from report.json's content (study.py writes all three).
Original and paraphrased wordings side by side, so the template leak's size is visible at a glance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHART = "routing.png"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _ci(r: dict[str, Any] | None) -> str:
    return "-" if not r else f"{100 * r['value']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"


def _share(x: float | None, o: float | None) -> str:
    return _fmt(x / o if o and x is not None else None)


def _headline(rep: dict[str, Any]) -> list[str]:
    """One row per scorer: held-in (original wording), held-in (paraphrased), held-out."""
    hi, ho, pa = rep["held_in"], rep["held_out"], rep.get("held_in_paraphrased") or {}
    cols = "| | held-in avg | % of oracle | paraphrased avg | % of oracle | held-out avg |"
    lines = [cols, "|---|---:|---:|---:|---:|---:|"]
    rows = [("base", hi["base"], pa.get("base"), ho["base"]), ("oracle", hi["oracle"], pa.get("oracle"), None)]
    rows.append((f"best merge ({hi['best_merge_method']})", hi["best_merge"], pa.get("best_merge"), None))
    rows += [(n, v, (pa.get("routers") or {}).get(n), ho["routers"].get(n)) for n, v in hi["routers"].items()]
    for name, a, b, c in rows:
        share_b = _share(b, pa.get("oracle"))
        lines.append(f"| {name} | {_fmt(a)} | {_share(a, hi['oracle'])} | {_fmt(b)} | {share_b} | {_fmt(c)} |")
    return lines


def _per_task(title: str, per_task: dict[str, Any], names: list[str], merge: bool = True) -> list[str]:
    cols = ["majority", "base", *(["oracle", "best merge"] if merge else []), *names]
    lines = ["", f"## {title}", "", "| task | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for t, r in per_task.items():
        cells = [_fmt(r["majority"]), _ci(r["base"])]
        cells += [_ci(r["oracle"]), _ci(r["best_merge"])] if merge else []
        cells += [_ci(r["routers"].get(n)) for n in names]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return lines


def _tuning(tu: dict[str, Any]) -> list[str]:
    lo, hi_ = tu["dev_rows"]
    alphas = sorted({g["alpha"] for g in tu["grid"]})
    lines = [
        "## Tuning glider's k and α (dev slice, not the test examples)",
        "",
        f"Held-in eval rows {lo}–{hi_ - 1} of each task (disjoint from the {lo} test rows above); "
        f"chosen: top-k {tu['chosen']['top_k']}, α {tu['chosen']['alpha']:g} "
        f"(dev avg {_fmt(tu['chosen']['dev'])}), "
        'scored on the test suites as "glider (tuned)".',
        "",
        "| top-k | " + " | ".join(f"α {a:g}" for a in alphas) + " |",
        "|---|" + "---:|" * len(alphas),
    ]
    for k in sorted({g["top_k"] for g in tu["grid"]}):
        row = {g["alpha"]: g["dev"] for g in tu["grid"] if g["top_k"] == k}
        lines.append(f"| {k} | " + " | ".join(_fmt(row.get(a)) for a in sorted(row)) + " |")
    return lines + [""]


def markdown(rep: dict[str, Any]) -> str:
    hi, ho, pa = rep["held_in"], rep["held_out"], rep.get("held_in_paraphrased")
    names = list(hi["routers"])
    lines = [
        "# Routing among patches: held-in (original and paraphrased wordings) and held-out",
        "",
        f"Base `{rep['base']}`, {len(rep['patches'])} patches ({rep['patches_learned']} learned their task: "
        f"> 2 SE above θ and the majority class), {rep['limit']} eval examples per task. "
        + (f"Made by `{rep['command']}`." if rep.get("command") else ""),
        "",
        *_headline(rep),
        "",
        f"## Goals on {rep['goals_suite']} (≥ 95% of oracle and above the best merge; held-out ≥ base)",
        "",
        "| router | share of oracle | − best merge (points) | held-out − base (points) | met |",
        "|---|---:|---:|---:|---|",
    ]
    for n, g in rep["goals"].items():
        met = g["meets_95pct_oracle"] and g["above_best_merge"] and (g["held_out_at_least_base"] or not ho["tasks"])
        lines.append(
            f"| {n} | {_fmt(g['share_of_oracle'])}% | {_fmt(g['minus_best_merge'])} | "
            f"{_fmt(g['held_out_minus_base'])} | {'yes' if met else 'no'} |"
        )
    lines += _per_task("Held-in, original wording, per task (accuracy %, Wilson 95% CI)", hi["per_task"], names)
    if pa:
        lines += _per_task("Held-in, paraphrased wordings (mean over wordings)", pa["per_task"], names)
    if ho["tasks"]:
        lines += _per_task("Held-out, per task", ho["per_task"], names, merge=False)
    lines += ["", "## Patches: did each learn its task?", ""]
    lines += ["| task | patch | θ | majority | z vs θ | z vs majority | learned |", "|---|" + "---:|" * 5 + "---|"]
    for t, r in rep["patch_learning"].items():
        lines.append(
            f"| {t} | {_fmt(r['patch'])} | {_fmt(r['base'])} | {_fmt(r['majority'])} | {r['z_vs_base']:.1f} | "
            f"{r['z_vs_majority']:.1f} | {'yes' if r['learned'] else 'no'} |"
        )
    lines += ["", "## Routers' parameters", ""]
    for n, p in rep["routers_params"].items():
        lines.append(f"- `{n}`: " + (", ".join(f"{k}={v}" for k, v in p.items() if k != "router") or "no parameters"))
    if hi["merges_dev"]:
        lines += ["", "Merges on the dev slice: " + ", ".join(f"{m} {_fmt(v)}" for m, v in hi["merges_dev"].items())]
    lines.append("")
    if rep.get("tuning"):
        lines += _tuning(rep["tuning"])
    lines += ["## Patches", ""]
    for p in rep["patches"]:
        lines.append(f"- `{p['name']}` ({p['task']}): {p['description']!r} — {p['source']}")
    if pa:
        lines += ["", "## Paraphrased wordings (never seen by a description, gate or dev-slice choice)", ""]
        for t, ws in pa["wordings"].items():
            lines += [f"- {t}: " + "; ".join(repr(w) for w in ws)]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in rep["notes"]] + [""]
    return "\n".join(lines)


def chart(rep: dict[str, Any], path: Path) -> None:
    """Bars per router on each suite (held-in, paraphrased held-in, held-out), with oracle, best-merge and base."""
    import matplotlib  # deferred on purpose: only the chart needs it, and it is slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hi, ho, pa = rep["held_in"], rep["held_out"], rep.get("held_in_paraphrased")
    names = list(hi["routers"])
    panels = [("held-in, original wording", hi)] + ([("held-in, paraphrased", pa)] if pa else [])
    panels += [("held-out", ho)] if ho["tasks"] else []
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, suite) in zip(axes[0], panels):
        vals = [100 * suite["routers"][n] for n in names]
        ax.bar(names, vals, color="#4c72b0")
        for i, v in enumerate(vals):
            ax.text(i, v + 0.3, f"{v:.1f}", ha="center", fontsize=8)
        ax.axhline(100 * suite["base"], color="gray", ls="--", label=f"base {100 * suite['base']:.1f}")
        if suite.get("oracle") is not None:
            ax.axhline(100 * suite["oracle"], color="green", ls="-", label=f"oracle {100 * suite['oracle']:.1f}")
        if suite.get("best_merge") is not None:
            ax.axhline(
                100 * suite["best_merge"], color="orange", ls=":", label=f"best merge {100 * suite['best_merge']:.1f}"
            )
        lo = min(vals + [100 * suite["base"]]) - 5
        ax.set_ylim(max(0, lo), None)
        ax.set_title(f"{title}: {', '.join(suite['tasks'])}", fontsize=8)
        ax.set_ylabel("mean accuracy %")
        ax.legend(fontsize=7, loc="lower right")
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
