"""Patches: import, inspect, check, port."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import typer
from rich.panel import Panel
from rich.table import Table

from ..errors import PortLLMError
from ._app import INCLUDE_PATH, LEVEL_STYLE, SPEC_HELP, VERDICT_STYLE, app, err, out, print_json, say


@app.command("import-adapter")
def import_adapter_cmd(
    adapter_dir: Path = typer.Argument(..., help="PEFT LoRA adapter directory"),
    base: str = typer.Option(..., "--base", help=f"the base it was trained on: {SPEC_HELP}"),
    out_path: Path = typer.Option(..., "--out", help="patch directory to write"),
    task: Optional[str] = typer.Option(None, help="task the adapter was trained for"),
    overwrite: bool = typer.Option(False, help="replace --out if it exists"),
) -> None:
    """Turn an existing PEFT LoRA adapter into a portllm patch stamped with its base."""
    from ..patch import import_adapter

    p = import_adapter(adapter_dir, base, out_path, task=task, overwrite=overwrite)
    out.print(
        f"[green]patch written[/green] {out_path}: {len(p.modules)} modules, {p.n_params:,} parameters, "
        f"base {p.source_fingerprint}"
    )


@app.command("inspect")
def inspect_cmd(
    patch_dir: Path = typer.Argument(..., help="patch (or plain PEFT adapter) directory"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """Show a patch's modules, ranks, size, per-layer update norms, provenance and lineage."""
    from ..patch import Patch, describe
    from ..sign import signature_record

    d = describe(Patch.load(patch_dir, require_manifest=False))
    if as_json:
        print_json(d)
        return
    man = d["manifest"] or {}
    base = man.get("base", {})
    lines = [
        f"[bold]{patch_dir}[/bold]",
        f"task: {man.get('task') or '-'}    created: {man.get('created', '-')}    tool: {man.get('tool_version', '-')}",
        f"modules: {d['n_modules']} ({', '.join(d['target_types'])})    rank: {', '.join(map(str, d['ranks']))}    "
        f"parameters: {d['n_params']:,}    ||ΔW|| total: {d['total_delta_norm']:.4f}",
        f"base: {base.get('name', '- (plain adapter, no manifest)')}  {base.get('fingerprint', '')}  "
        f"{base.get('architecture') or ''} L={base.get('num_layers')} d={base.get('hidden_size')} "
        f"V={base.get('vocab_size')}",
    ]
    if d["replaced"]:
        lines.append("replaced tensors: " + ", ".join(f"{k} {v}" for k, v in d["replaced"].items()))
    sig = signature_record(patch_dir)
    if sig:
        lines.append(
            f"signed: {sig['algorithm']} key {sig['key_fingerprint'][:16]}… on {sig['signed']} "
            "(not verified here: `portllm verify PATCH --trust KEY.pub`)"
        )
    out.print(Panel("\n".join(lines), title="patch"))
    out.print(_norm_table(d["modules"]))
    if man.get("lineage"):
        t = Table(title="lineage")
        for c in ("#", "event", "time", "base", "fingerprint", "details"):
            t.add_column(c)
        for i, e in enumerate(man["lineage"]):
            details = ", ".join(
                f"{k}={v}" for k, v in e.items() if k in ("mode", "scale", "forced") and v not in (None, False)
            )
            if e.get("signature"):
                details += (
                    f"{', ' if details else ''}source signed by {e['signature'].get('key_fingerprint', '?')[:16]}…"
                )
            t.add_row(
                str(i),
                e.get("event", "?"),
                e.get("time", ""),
                str(e.get("base", {}).get("name")),
                str(e.get("base", {}).get("fingerprint")),
                details,
            )
        out.print(t)


def _norm_table(mods: list[dict[str, Any]]) -> Table:
    """Layers as rows, module types as columns, ||ΔW||_F in the cells."""
    grid: dict[str, dict[str, float]] = {}
    types: list[str] = []
    for m in mods:
        match = re.search(r"layers\.(\d+)\.", m["module"])
        row = match.group(1) if match else m["module"].rsplit(".", 1)[0]
        kind = m["module"].rsplit(".", 1)[-1]
        if kind not in types:
            types.append(kind)
        grid.setdefault(row, {})[kind] = m["delta_norm"]
    t = Table(title="per-layer update norm ||ΔW||_F = ||(α/r)·B·A||")
    t.add_column("layer", justify="right")
    for k in types:
        t.add_column(k, justify="right")
    for row, cells in grid.items():
        t.add_row(row, *[f"{cells[k]:.4f}" if k in cells else "-" for k in types])
    return t


@app.command("check")
def check_cmd(
    patch_dir: Path = typer.Argument(..., help="patch directory"),
    base: str = typer.Option(..., "--base", help=f"target base: {SPEC_HELP}"),
    old: Optional[str] = typer.Option(None, "--from", help="the base the patch was made on, to measure drift"),
    inputs: Optional[str] = typer.Option(
        None,
        "--inputs",
        help="with --from: forecast the loss on this task's unlabeled inputs (a task, a task file, a text file, or a "
        "prompt/completion or chat .jsonl)",
    ),
    include: Optional[list[Path]] = INCLUDE_PATH,
    n: int = typer.Option(200, "--n", min=1, help="with --inputs: how many inputs"),
    calibration: str = typer.Option(
        "builtin", "--calibration", help="with --inputs: builtin (fitted on docs/sweep), raw, or a calibration.json"
    ),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """Will the patch fit BASE? Exit 0 compatible, 1 with warnings, 2 incompatible."""
    from ..check import check
    from ..repair.advice import advice

    if inputs and not old:
        raise PortLLMError("--inputs needs --from OLD: the forecast compares θ+Δθ with θ'+Δθ")
    rep = check(patch_dir, base, old)
    fc = None
    if inputs and rep.verdict != "incompatible":
        from ..forecast import forecast

        fc = forecast(patch_dir, base, old, inputs, n, calibration=calibration, report=rep)
    if as_json:
        tip = advice(fc.loss_points, patch_dir, base, old, inputs) if fc else None
        print_json(rep.to_dict() | ({"forecast": fc.to_dict(), "advice": tip} if fc else {}))
        raise typer.Exit(rep.exit_code)
    t = Table(title=f"check {patch_dir} -> {base}")
    t.add_column("", width=5)
    t.add_column("topic")
    t.add_column("finding")
    for f in rep.findings:
        t.add_row(f"[{LEVEL_STYLE[f.level]}]{f.level}[/]", f.topic, f.detail)
    out.print(t)
    if rep.drift:
        from ..check import drift_summary

        d = Table(title=f"drift under the patch (--from {old}), mean per layer type")
        for c in (
            "type",
            "n",
            "rel drift ||W'-W||/||W||",
            "cos(drift, ΔW)",
            "drift in patch subspace",
            "||ΔW||/||drift||",
        ):
            d.add_column(c, justify="right")
        for k, v in drift_summary(rep.drift).items():
            d.add_row(
                k,
                str(v["n"]),
                f"{v['rel_drift']:.4%}",
                f"{v['cos']:+.4f}",
                f"{v['overlap']:.4f}",
                f"{v['patch_to_drift']:.3f}",
            )
        out.print(d)
    if fc is not None:
        src = fc.calibration.gen_source if fc.generation else fc.calibration.source
        out.print(f"forecast: {fc.sentence()}  ({src})", markup=False)
        for note in fc.notes:
            if note.startswith("warning:"):
                out.print(note, markup=False)
        if tip := advice(fc.loss_points, patch_dir, base, old, inputs):
            out.print(f"advice: {tip}", markup=False)
    out.print(
        f"verdict: [{VERDICT_STYLE[rep.verdict]}]{rep.verdict}[/]  ({rep.source_fingerprint} -> "
        f"{rep.target_fingerprint})"
    )
    raise typer.Exit(rep.exit_code)


@app.command("port")
def port_cmd(
    patch_dir: Path = typer.Argument(..., help="patch directory"),
    base: str = typer.Option(..., "--base", help=f"the evolved base: {SPEC_HELP}"),
    out_path: Path = typer.Option(..., "--out", help="directory to write"),
    scale: float = typer.Option(1.0, "--scale", help="multiply the update by this λ"),
    as_adapter: bool = typer.Option(False, "--as-adapter", help="write a re-stamped patch instead of a merged model"),
    force: bool = typer.Option(False, "--force", help="port an incompatible patch when shapes still fit"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
    require_signature: bool = typer.Option(
        False, "--require-signature", help="refuse a patch not signed by a --trust key, or altered since"
    ),
    trust: Optional[list[Path]] = typer.Option(
        None, "--trust", help="a trusted public key (PREFIX.pub) for --require-signature; repeat for more"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Carry a patch onto an evolved base with no training: write BASE + λ·ΔW (or a re-stamped adapter)."""
    from ..port import port

    if require_signature and not trust:
        raise PortLLMError("--require-signature needs at least one --trust KEY.pub")
    res = port(
        patch_dir,
        base,
        out_path,
        scale=scale,
        as_adapter=as_adapter,
        force=force,
        overwrite=overwrite,
        progress=err.is_terminal,
        require_signature=require_signature,
        trusted=trust,
    )
    if as_json:
        print_json(res.to_dict())
        return
    if res.verification:
        say("signature", res.verification.reason, "green")
    for f in res.report.findings:
        if f.level in ("warn", "error"):
            say(f.level, f"{f.topic}: {f.detail}", LEVEL_STYLE[f.level])
    what = "adapter for" if res.mode == "adapter" else "model"
    out.print(
        f"[green]ported[/green] {what} {base} -> {res.out}  ({res.applied} matrices updated"
        + (f", {res.replaced} replaced" if res.replaced else "")
        + f", λ={scale:g}, "
        f"{res.usage.wall_s:.1f} s, peak RSS {res.usage.peak_rss_mb:.0f} MB)"
    )
