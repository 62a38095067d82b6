"""The sweep's repair columns: `portllm repair` on a cell, scored paired against θ+Δθ and the plain port.

Per cell where the plan asks (seed 0): one repair per kind of unlabeled input — the task's own train
inputs ("task"), plain text from another distribution ("text": wikitext-2 validation lines, never the test
lines the KL uses) and θ+Δθ's own samples ("self": no data at all). Each repaired patch is attached to θ'
and scored on the cell's eval examples; its cost (steps, wall, peak RSS of its own process) sits beside it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import steps
from ..patch import Patch
from ..repair import DistillConfig
from ..stats import paired

TEXT_FILE = ("text", "wikitext-2", "valid.txt")


def inputs_spec(kind: str, task: str, data: Path) -> str:
    """What `--inputs` is for one kind of repair input."""
    if kind == "task":
        return task
    if kind == "text":
        return str(data.joinpath(*TEXT_FILE))
    if kind == "self":
        return "self"
    raise ValueError(f"unknown repair input kind {kind!r}")


def repair_config(ctx: Any, ts: Any) -> DistillConfig:
    plan = ctx.plan
    return DistillConfig(
        steps=plan.repair_steps, max_length=ts.recipe.max_length, seed=0, gen_tokens=plan.repair_gen_tokens
    )


def repairs(ctx: Any, ts: Any, lv: dict[str, Any], ported: list[dict]) -> dict[str, dict[str, Any]]:
    """kind -> the repaired patch's accuracy, flips and cost on one cell (seed 0)."""
    plan, seed = ctx.plan, ts.first_seed
    patch = ts.patches[seed]
    sha = Patch.load(patch, verify=False).weights_sha256
    cfg = repair_config(ctx, ts)
    target = [float(x["correct"]) for x in ts.with_patch[seed]]
    plain = [float(x["correct"]) for x in ported]
    out = {}
    for kind in plan.repair_inputs if ts.recipe.repair_inputs is None else ts.recipe.repair_inputs:
        spec = inputs_spec(kind, ts.name, ctx.data)
        n = plan.repair_n if kind == "task" else plan.repair_text_n
        key = (sha, lv["fingerprint"], kind, ts.name if kind == "task" else None, n, asdict(cfg))
        if plan.dtype != "bfloat16":  # the student's dtype (bf16, the committed studies', keeps their keys)
            key += (plan.dtype,)

        def make(p: Path, spec: str = spec, n: int = n, kind: str = kind) -> None:
            ctx.log(f"  repairing on {lv['label']} from {kind} inputs ...")
            r = steps.repair_step(
                patch, lv["dir"], ctx.theta, p, inputs=spec, n=n, cfg=cfg, data=ctx.data, dtype=plan.dtype,
                device=ctx.device,
            )  # fmt: skip
            (p / "repair_result.json").write_text(json.dumps(r.to_dict(), default=str))

        d = ctx.cache.directory("repaired", key, "repair_result.json", make)
        rec = json.loads((d / "repair_result.json").read_text())
        recs = ctx.score(lv["dir"], lv["fingerprint"], d, False, ts.name, ts.recipe.eval_limit)
        fixed = [float(x["correct"]) for x in recs]
        vs_target = paired(target, fixed, iters=2000, seed=seed)
        vs_plain = paired(plain, fixed, iters=2000, seed=seed)
        lost = sum(target) / len(target) - sum(plain) / len(plain)
        out[kind] = {
            "method": rec["method"],
            "inputs": rec["inputs"],
            "accuracy": vs_target.acc_b,
            "loss": -vs_target.diff,
            "loss_ci": [-vs_target.ci_high, -vs_target.ci_low],
            "neg_flips": vs_target.negative_flips,
            "neg_flip_rate": vs_target.negative_flips / vs_target.n,
            "gain_over_plain": vs_plain.diff,
            "gain_ci": [vs_plain.ci_low, vs_plain.ci_high],
            "gain_mcnemar_p": vs_plain.mcnemar_p,
            "recovered": (vs_plain.diff / lost) if lost > 0 else None,
            "steps": rec["steps"],
            "wall_s": rec["wall_s"],
            "peak_rss_mb": rec["peak_rss_mb"],
            "peak_gpu_mb": rec.get("peak_gpu_mb"),  # on CUDA
            "student_tokens": rec["student_tokens"],
            "heldout_agreement": [
                (rec["before"] or {}).get("agreement"),
                (rec["after"] or {}).get("agreement"),
            ],
        }
    return out


def retune_wall(patch: Path) -> float | None:
    """The cold re-tune's own training wall time, as its manifest records it."""
    return (Patch.load(patch, verify=False).extra.get("training") or {}).get("wall_s")


def summary(cells: list[dict[str, Any]], retunes: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per task, base and kind of inputs: what the plain port lost, what the repair won back, its flips and its
    cost against the cold re-tune at that base (where one was run); and the issue's goals, met or not."""
    rows = []
    for c in cells:
        for kind, r in (c.get("repaired_by_inputs") or {}).items():
            rt = next((x for x in retunes if x["task"] == c["task"] and x["level"] == c["level"]), None)
            wall = rt.get("retune_wall_s") if rt else None
            rows.append(
                {
                    "task": c["task"],
                    "level": c["level"],
                    "drift": c["drift"],
                    "inputs": kind,
                    "base+patch": c["base+patch"],
                    "evolved+patch": c["evolved+patch"],
                    "evolved+retuned": c.get("evolved+retuned"),
                    "repaired": r["accuracy"],
                    "port_loss": c["loss"],
                    "repaired_loss": r["loss"],
                    "recovered": r["recovered"],
                    "gain_ci": r["gain_ci"],
                    "port_neg_flips": c["neg_flips"],
                    "repaired_neg_flips": r["neg_flips"],
                    "wall_s": r["wall_s"],
                    "retune_wall_s": wall,
                    "cost_vs_retune": (r["wall_s"] / wall) if wall else None,
                }
            )
    if not rows:
        return None
    return {"rows": rows, "goals": goals(rows)}


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The repair issue's goals, each as cells meeting / cells, per kind of inputs: the large-drift cells
    (≥ 2% drift, where the port lost) and the small ones (≤ 1.13%: never significantly worse)."""
    big = [r for r in rows if r["drift"] >= 0.02 and r["port_loss"] > 0]

    def share(kind: str, xs: list[dict[str, Any]], f: Any) -> str:
        xs = [x for x in xs if x["inputs"] == kind]
        return f"{sum(bool(f(x)) for x in xs)}/{len(xs)}"

    out: dict[str, Any] = {}
    for kind in dict.fromkeys(r["inputs"] for r in rows):
        out[kind] = {
            "recover_50pct": share(kind, big, lambda r: (r["recovered"] or 0) >= 0.5),
            "recover_75pct": share(kind, big, lambda r: (r["recovered"] or 0) >= 0.75),
            "recover_30pct": share(kind, big, lambda r: (r["recovered"] or 0) >= 0.3),
            "neg_flips_halved": share(kind, big, lambda r: r["repaired_neg_flips"] <= r["port_neg_flips"] / 2),
            "cost_within_10pct_of_retune": share(
                kind, [r for r in big if r["cost_vs_retune"] is not None], lambda r: r["cost_vs_retune"] <= 0.10
            ),
            "never_significantly_worse_small_drift": share(
                kind, [r for r in rows if r["drift"] <= 0.0115], lambda r: r["gain_ci"][1] >= 0
            ),
        }
    return out


def markdown(s: dict[str, Any] | None) -> str:
    """The repair section of report.md."""
    if not s:
        return ""
    lines = [
        "",
        "## Repair (`portllm repair --method distill`, no labels)",
        "",
        "| task | base | drift | inputs | θ+Δθ | port | repaired | re-tuned | recovered | neg. flips port → repaired "
        "| repair wall / re-tune wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        rec = "-" if r["recovered"] is None else f"{100 * r['recovered']:.0f}%"
        rt = "-" if r["evolved+retuned"] is None else f"{100 * r['evolved+retuned']:.1f}"
        cost = "-" if r["cost_vs_retune"] is None else f"{r['wall_s']:.0f} s / {r['retune_wall_s']:.0f} s"
        lines.append(
            f"| {r['task']} | {r['level']} | {100 * r['drift']:.2f}% | {r['inputs']} | {100 * r['base+patch']:.1f} "
            f"| {100 * r['evolved+patch']:.1f} | {100 * r['repaired']:.1f} "
            f"[{100 * r['gain_ci'][0]:+.1f}, {100 * r['gain_ci'][1]:+.1f}] | {rt} | {rec} "
            f"| {r['port_neg_flips']} → {r['repaired_neg_flips']} | {cost} |"
        )
    lines += ["", "Goals (cells meeting / cells), by kind of inputs:", ""]
    lines += [f"- {kind}: " + ", ".join(f"{k} {v}" for k, v in g.items()) for kind, g in s["goals"].items()]
    lines.append("")
    return "\n".join(lines)
