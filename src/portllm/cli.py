"""`portllm` command line: a thin layer over the library API.

Exit codes: 0 success (check: compatible), 1 check: compatible with warnings,
2 check: incompatible, 3 any error (printed as one line), 130 interrupted.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Optional

import click
import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from .errors import PortLLMError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Portable model patches: carry LoRA fine-tunes onto evolved base LLMs without training.")
out = Console()
err = Console(stderr=True)

SPEC_HELP = "model directory, hub id, .gguf file, or embedded name (smollm2-135m, gemma3-270m)"
_LEVEL_STYLE = {"ok": "green", "info": "cyan", "warn": "yellow", "error": "red"}
_VERDICT_STYLE = {"compatible": "bold green", "compatible with warnings": "bold yellow", "incompatible": "bold red"}


def _json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


@app.command("export-base")
def export_base_cmd(spec: str = typer.Argument(..., help=SPEC_HELP),
                    out_dir: Path = typer.Argument(..., help="directory to write"),
                    overwrite: bool = typer.Option(False, help="replace OUT_DIR if it exists")) -> None:
    """Write any base as a plain safetensors model directory (config + tokenizer)."""
    from .models import export_base, fingerprint

    path = export_base(spec, out_dir, overwrite=overwrite)
    out.print(f"[green]exported[/green] {spec} -> {path}  ({fingerprint(path)})")


@app.command("fingerprint")
def fingerprint_cmd(spec: str = typer.Argument(..., help=SPEC_HELP)) -> None:
    """Print the content fingerprint of a base (identifies which base a patch was made on)."""
    from .models import fingerprint

    print(fingerprint(spec))


@app.command("import-adapter")
def import_adapter_cmd(adapter_dir: Path = typer.Argument(..., help="PEFT LoRA adapter directory"),
                       base: str = typer.Option(..., "--base", help=f"the base it was trained on: {SPEC_HELP}"),
                       out_path: Path = typer.Option(..., "--out", help="patch directory to write"),
                       task: Optional[str] = typer.Option(None, help="task the adapter was trained for"),
                       overwrite: bool = typer.Option(False, help="replace --out if it exists")) -> None:
    """Turn an existing PEFT LoRA adapter into a portllm patch stamped with its base."""
    from .patch import import_adapter

    p = import_adapter(adapter_dir, base, out_path, task=task, overwrite=overwrite)
    out.print(f"[green]patch written[/green] {out_path}: {len(p.modules)} modules, {p.n_params:,} parameters, "
              f"base {p.source['fingerprint']}")


@app.command("inspect")
def inspect_cmd(patch_dir: Path = typer.Argument(..., help="patch (or plain PEFT adapter) directory"),
                as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables")) -> None:
    """Show a patch's modules, ranks, size, per-layer update norms, provenance and lineage."""
    from .patch import Patch, describe

    d = describe(Patch.load(patch_dir, require_manifest=False))
    if as_json:
        _json(d)
        return
    man = d["manifest"] or {}
    base = man.get("base", {})
    lines = [
        f"[bold]{patch_dir}[/bold]",
        f"task: {man.get('task') or '-'}    created: {man.get('created', '-')}    tool: {man.get('tool_version', '-')}",
        f"modules: {d['n_modules']} ({', '.join(d['target_types'])})    rank: {', '.join(map(str, d['ranks']))}    "
        f"parameters: {d['n_params']:,}    ||ΔW|| total: {d['total_delta_norm']:.4f}",
        f"base: {base.get('name', '- (plain adapter, no manifest)')}  {base.get('fingerprint', '')}  "
        f"{base.get('architecture') or ''} L={base.get('num_layers')} d={base.get('hidden_size')} V={base.get('vocab_size')}",
    ]
    if d["replaced"]:
        lines.append("replaced tensors: " + ", ".join(f"{k} {v}" for k, v in d["replaced"].items()))
    out.print(Panel("\n".join(lines), title="patch"))
    out.print(_norm_table(d["modules"]))
    if man.get("lineage"):
        t = Table(title="lineage")
        for c in ("#", "event", "time", "base", "fingerprint", "details"):
            t.add_column(c)
        for i, e in enumerate(man["lineage"]):
            details = ", ".join(f"{k}={v}" for k, v in e.items() if k in ("mode", "scale", "forced") and v not in (None, False))
            t.add_row(str(i), e.get("event", "?"), e.get("time", ""), str(e.get("base", {}).get("name")),
                      str(e.get("base", {}).get("fingerprint")), details)
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
def check_cmd(patch_dir: Path = typer.Argument(..., help="patch directory"),
              base: str = typer.Option(..., "--base", help=f"target base: {SPEC_HELP}"),
              old: Optional[str] = typer.Option(None, "--from", help="the base the patch was made on, to measure drift"),
              as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables")) -> None:
    """Will the patch fit BASE? Exit 0 compatible, 1 with warnings, 2 incompatible."""
    from .check import check

    rep = check(patch_dir, base, old)
    if as_json:
        _json(rep.to_dict())
        raise typer.Exit(rep.exit_code)
    t = Table(title=f"check {patch_dir} -> {base}")
    t.add_column("", width=5)
    t.add_column("topic")
    t.add_column("finding")
    for f in rep.findings:
        t.add_row(f"[{_LEVEL_STYLE[f.level]}]{f.level}[/]", f.topic, f.detail)
    out.print(t)
    if rep.drift:
        from .check import drift_summary

        d = Table(title=f"drift under the patch (--from {old}), mean per layer type")
        for c in ("type", "n", "rel drift ||W'-W||/||W||", "cos(drift, ΔW)", "drift in patch subspace", "||ΔW||/||drift||"):
            d.add_column(c, justify="right")
        for k, v in drift_summary(rep.drift).items():
            d.add_row(k, str(v["n"]), f"{v['rel_drift']:.4%}", f"{v['cos']:+.4f}", f"{v['overlap']:.4f}", f"{v['patch_to_drift']:.3f}")
        out.print(d)
    out.print(f"verdict: [{_VERDICT_STYLE[rep.verdict]}]{rep.verdict}[/]  ({rep.source_fingerprint} -> {rep.target_fingerprint})")
    raise typer.Exit(rep.exit_code)


@app.command("port")
def port_cmd(patch_dir: Path = typer.Argument(..., help="patch directory"),
             base: str = typer.Option(..., "--base", help=f"the evolved base: {SPEC_HELP}"),
             out_path: Path = typer.Option(..., "--out", help="directory to write"),
             scale: float = typer.Option(1.0, "--scale", help="multiply the update by this λ"),
             as_adapter: bool = typer.Option(False, "--as-adapter", help="write a re-stamped patch instead of a merged model"),
             force: bool = typer.Option(False, "--force", help="port an incompatible patch when shapes still fit"),
             overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
             as_json: bool = typer.Option(False, "--json", help="print the result as JSON")) -> None:
    """Carry a patch onto an evolved base with no training: write BASE + λ·ΔW (or a re-stamped adapter)."""
    from .port import port

    res = port(patch_dir, base, out_path, scale=scale, as_adapter=as_adapter, force=force, overwrite=overwrite,
               progress=err.is_terminal)
    if as_json:
        _json(res.to_dict())
        return
    for f in res.report.findings:
        if f.level in ("warn", "error"):
            err.print(f"[{_LEVEL_STYLE[f.level]}]{f.level}[/] {f.topic}: {f.detail}")
    what = "adapter for" if res.mode == "adapter" else "model"
    out.print(f"[green]ported[/green] {what} {base} -> {res.out}  ({res.applied} matrices updated"
              + (f", {res.replaced} replaced" if res.replaced else "") + f", λ={scale:g}, "
              f"{res.usage.wall_s:.1f} s, peak RSS {res.usage.peak_rss_mb:.0f} MB)")


@app.command("eval")
def eval_cmd(model: str = typer.Option(..., "--model", help=f"base or ported model: {SPEC_HELP}"),
             tasks: str = typer.Option("sst2,boolq,winogrande", "--tasks", help="comma-separated task names, or 'paper' for the seven"),
             patch: Optional[Path] = typer.Option(None, "--patch", help="attach this patch at runtime (PEFT)"),
             limit: Optional[int] = typer.Option(None, "--limit", help="the first N examples of each eval split"),
             out_dir: Optional[Path] = typer.Option(None, "--out", help="write results.json and samples_<task>.jsonl here"),
             data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="benchmark data directory (default $PORTLLM_DATA)"),
             batch_size: int = typer.Option(16, "--batch-size", help="at most this many rows per forward pass"),
             max_batch_tokens: Optional[int] = typer.Option(None, "--max-batch-tokens", min=1,
                                                            help="at most this many padded tokens per forward pass (default 640 on CPU)"),
             dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16"),
             threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads"),
             as_json: bool = typer.Option(False, "--json", help="print results as JSON")) -> None:
    """Score a model (optionally with a patch) on the task suite."""
    from .evaluate import evaluate, open_lm
    from .tasks import parse_tasks

    if limit is not None and limit < 1:
        raise PortLLMError("--limit must be at least 1")
    task_list = parse_tasks(tasks)
    from .tasks import data_dir as resolve_data

    data = resolve_data(data_dir)
    lm = open_lm(model, patch, dtype=dtype, threads=threads)
    res = evaluate(lm, task_list, limit=limit, data=data, out=out_dir, batch_size=batch_size,
                   show_progress=not as_json and err.is_terminal, max_tokens=max_batch_tokens)
    if as_json:
        _json(res)
        return
    out.print(results_table(res))
    if out_dir:
        out.print(f"[dim]results: {out_dir / 'results.json'}[/dim]")


def results_table(res: dict[str, Any]) -> Table:
    title = f"{res['model']}" + (f" + {res['patch']}" if res.get("patch") else "") + f" ({res['dtype']})"
    t = Table(title=title)
    for c in ("task", "metric", "value", "± stderr", "n", "time s", "tokens/s"):
        t.add_column(c, justify="right")
    for name, r in res["tasks"].items():
        t.add_row(name, r["metric"], f"{r['value']:.4f}", f"{r['stderr']:.4f}", str(r["n"]), f"{r['time_s']:.1f}",
                  f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-")
    return t


@app.command("compare")
def compare_cmd(run_a: Path = typer.Argument(..., help="eval output directory A (e.g. before the update)"),
                run_b: Path = typer.Argument(..., help="eval output directory B (e.g. after)"),
                as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Accuracy, agreement and negative/positive flips between two eval runs, per task."""
    from .evaluate import compare

    c = compare(run_a, run_b)
    if as_json:
        _json(c)
        return
    t = Table(title=f"A = {run_a}   B = {run_b}", caption="neg flip: right in A, wrong in B; NFR: negative flip rate")
    for col in ("task", "n", "acc A", "acc B", "agree", "neg flips", "pos flips", "NFR"):
        t.add_column(col, justify="right")
    for name, f in c["tasks"].items():
        if not f["n"]:
            t.add_row(name, "0", *["-"] * 6)
            continue
        t.add_row(name, str(f["n"]), f"{f['acc_a']:.4f}", f"{f['acc_b']:.4f}", f"{f['agreement']:.4f}",
                  f"[red]{f['negative_flips']}[/red]", f"[green]{f['positive_flips']}[/green]", f"{f['negative_flip_rate']:.2%}")
    out.print(t)


@app.command("train")
def train_cmd(base: str = typer.Option(..., "--base", help=f"base to fine-tune: {SPEC_HELP}"),
              task: str = typer.Option(..., "--task", help="task to learn (see `portllm tasks`)"),
              out_path: Path = typer.Option(..., "--out", help="patch directory to write"),
              steps: int = typer.Option(100, "--steps", help="optimizer steps"),
              batch_size: int = typer.Option(8, "--batch-size"),
              lr: float = typer.Option(2e-4, "--lr"),
              rank: int = typer.Option(8, "--rank", help="LoRA rank (paper: 8)"),
              alpha: float = typer.Option(16.0, "--alpha", help="LoRA alpha (paper: 16)"),
              targets: str = typer.Option(",".join(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
                                          "--targets", help="comma-separated module names"),
              max_length: int = typer.Option(256, "--max-length", help="tokens per example (prompt cut from the left)"),
              max_examples: Optional[int] = typer.Option(None, "--max-examples", help="use only the first N train examples"),
              seed: int = typer.Option(0, "--seed"),
              dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16"),
              eval_limit: int = typer.Option(100, "--eval-limit", help="score the patch on this many eval examples (0: skip)"),
              data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="benchmark data directory (default $PORTLLM_DATA)"),
              overwrite: bool = typer.Option(False, "--overwrite"),
              as_json: bool = typer.Option(False, "--json", help="print the result as JSON")) -> None:
    """Fine-tune a LoRA patch on one task (resumes from its checkpoint if interrupted)."""
    from .train import TrainConfig, train

    cfg = TrainConfig(rank=rank, alpha=alpha, target_modules=tuple(t for t in targets.split(",") if t), lr=lr, steps=steps,
                      batch_size=batch_size, max_length=max_length, seed=seed, dtype=dtype, max_examples=max_examples)
    r = train(base, task, out_path, cfg, data=data_dir, eval_limit=eval_limit, overwrite=overwrite,
              progress=err.is_terminal)
    summary = {"patch": str(out_path), "steps": len(r.losses), "resumed_from": r.resumed_from,
               "loss_first": r.losses[0] if r.losses else None, "loss_last": r.losses[-1] if r.losses else None,
               "trainable_params": r.trainable_params, "wall_s": round(r.wall_s, 2), "peak_rss_mb": round(r.peak_rss_mb, 1),
               "peak_gpu_mb": r.peak_gpu_mb, "eval": r.eval}
    if as_json:
        _json(summary)
        return
    out.print(f"[green]patch written[/green] {out_path}: {r.trainable_params:,} trainable parameters, {len(r.losses)} steps"
              + (f" (resumed at {r.resumed_from})" if r.resumed_from else "")
              + f", loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}, {r.wall_s:.0f} s, peak RSS {r.peak_rss_mb:.0f} MB")
    if r.eval:
        out.print(f"score on its base: {r.eval['metric']} {r.eval['value']:.4f} ± {r.eval['stderr']:.4f} (n={r.eval['n']})")


@app.command("evolve")
def evolve_cmd(base: str = typer.Option(..., "--base", help=f"base to continue pretraining: {SPEC_HELP}"),
               corpus: str = typer.Option("mix", "--corpus", help="instruct | text | mix, a file, or files joined with '+' (relative to the data dir)"),
               out_path: Path = typer.Option(..., "--out", help="model directory to write"),
               mode: str = typer.Option("full", "--mode", help="full (all parameters) or lora (merged back in)"),
               rank: int = typer.Option(64, "--rank", help="LoRA rank in lora mode"),
               steps: int = typer.Option(100, "--steps"),
               batch_size: int = typer.Option(8, "--batch-size"),
               lr: float = typer.Option(5e-5, "--lr"),
               max_length: int = typer.Option(256, "--max-length"),
               seed: int = typer.Option(0, "--seed"),
               dtype: str = typer.Option("float32", "--dtype"),
               data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="benchmark data directory (default $PORTLLM_DATA)"),
               overwrite: bool = typer.Option(False, "--overwrite"),
               as_json: bool = typer.Option(False, "--json")) -> None:
    """Make an evolved base θ' by continued pretraining of θ on a corpus; reports the drift."""
    from .evolve import EvolveConfig, evolve

    cfg = EvolveConfig(mode=mode, rank=rank, alpha=2.0 * rank, lr=lr, steps=steps, batch_size=batch_size,
                       max_length=max_length, seed=seed, dtype=dtype)
    lin = evolve(base, corpus, out_path, cfg, data=data_dir, overwrite=overwrite, progress=err.is_terminal)
    if as_json:
        _json(lin)
        return
    t = Table(title=f"drift ||θ'−θ||/||θ|| per layer type ({out_path})")
    t.add_column("layer type")
    t.add_column("relative drift", justify="right")
    for k, v in lin["drift"].items():
        t.add_row(k, f"{v:.4%}")
    out.print(t)
    out.print(f"[green]evolved[/green] {base} -> {out_path} ({lin['fingerprint']}): {lin['steps']} steps on {corpus}, "
              f"loss {lin['loss_first']:.3f} -> {lin['loss_last']:.3f}, {lin['wall_s']:.0f} s")


@app.command("tasks")
def tasks_cmd() -> None:
    """List the tasks, their splits and metrics."""
    from .tasks import PAPER_TASKS, TASKS

    t = Table(title="tasks (* = the seven of the PortLLM paper)")
    for c in ("task", "kind", "metric", "train split", "eval split"):
        t.add_column(c)
    for name, task in TASKS.items():
        t.add_row(name + (" *" if name in PAPER_TASKS else ""), task.kind, task.metric, task.train.note or task.train.file,
                  task.eval.note or task.eval.file)
    out.print(t)


@app.command("reproduce")
def reproduce_cmd(base: str = typer.Option("smollm2-135m", "--base", help=f"the base θ: {SPEC_HELP}"),
                  quick: bool = typer.Option(False, "--quick", help="SST-2 + WinoGrande, about 20-25 min on a 2-core CPU (the default)"),
                  full: bool = typer.Option(False, "--full", help="all seven paper tasks, under 90 min on a 2-core CPU"),
                  tasks: Optional[str] = typer.Option(None, "--tasks", help="override the profile's task list"),
                  out_dir: Path = typer.Option(Path("runs/reproduce"), "--out", help="where report.json/.md and charts go"),
                  data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="benchmark data directory (default $PORTLLM_DATA)"),
                  cache: Optional[Path] = typer.Option(None, "--cache", help="step cache (default $PORTLLM_CACHE/reproduce)"),
                  as_json: bool = typer.Option(False, "--json", help="print report.json instead of tables")) -> None:
    """The paper's experiment: θ, θ', θ+Δθ, θ'+Δθ (ported, no training), θ'+Δθ' (re-tuned), with costs and flips."""
    from .reproduce import reproduce

    if quick and full:
        raise PortLLMError("choose one of --quick and --full")
    profile = "full" if full else "quick"
    r = reproduce(base, profile, [t for t in tasks.split(",") if t] if tasks else None, out_dir, data_dir, cache,
                  log=(lambda m: err.print(m, highlight=False, markup=False)) if not as_json else (lambda m: None),
                  show_progress=err.is_terminal)
    if as_json:
        _json(r)
        return
    out.print(reproduce_tables(r))
    out.print(f"[dim]report: {out_dir / 'report.md'}  {out_dir / 'report.json'}  charts: {out_dir / 'accuracy.png'}, {out_dir / 'efficiency.png'}[/dim]")


def reproduce_tables(r: dict[str, Any]):
    from rich.console import Group

    from .reproduce import LABELS, VARIANTS

    acc = Table(title=f"accuracy (%), {r['profile']} profile — cf. Table 2 of the paper")
    for c in ("task", "n", *[LABELS[v] for v in VARIANTS], "ported − re-tuned", "neg. flips"):
        acc.add_column(c, justify="right")
    for name, t in r["tasks"].items():
        f = r["flips"][name]
        acc.add_row(name, str(t["n"]), *[f"{100 * t[v]:.1f}" for v in VARIANTS], f"{100 * t['ported_minus_retuned']:+.1f}",
                    f"{f['negative_flips']} ({100 * f['negative_flip_rate']:.1f}%)")
    a = r["average"]
    acc.add_row("average", "", *[f"{100 * a[v]:.1f}" for v in VARIANTS], f"{100 * a['ported_minus_retuned']:+.1f}", "", style="bold")
    e = r["efficiency"]
    eff = Table(title="cost of porting vs re-tuning — cf. Table 6 of the paper")
    for c in ("", "trainable params", "peak RSS MB", "wall s"):
        eff.add_column(c, justify="right")
    eff.add_row("port θ'+Δθ", "0", f"{e['port']['peak_rss_mb']:.0f}", f"{e['port']['wall_s']:.1f}")
    eff.add_row("re-tune Δθ'", f"{e['retune']['trainable_params']:,}", f"{e['retune']['peak_rss_mb']:.0f}", f"{e['retune']['wall_s']:.1f}")
    eff.add_row("re-tune / port", "", f"{e['ratios']['memory_retune_over_port']:.1f}x", f"{e['ratios']['time_retune_over_port']:.1f}x", style="bold")
    return Group(acc, eff)


@app.command("extract")
def extract_cmd(tuned: str = typer.Option(..., "--tuned", help=f"the fully fine-tuned model: {SPEC_HELP}"),
                base: str = typer.Option(..., "--base", help="the base it was fine-tuned from"),
                out_path: Path = typer.Option(..., "--out", help="patch directory to write"),
                rank: int = typer.Option(8, "--rank", help="rank of every layer (ignored with --energy)"),
                energy: Optional[float] = typer.Option(None, "--energy", help="per-layer rank: smallest keeping this share of Σσ², e.g. 0.9"),
                embeddings: bool = typer.Option(False, "--embeddings", help="keep changed embedding/lm_head tensors whole (modules_to_save)"),
                overwrite: bool = typer.Option(False, "--overwrite"),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """Turn a full fine-tune into a LoRA patch: SVD of W_tuned − W_base per linear layer."""
    from .extract import extract

    r = extract(tuned, base, out_path, rank=None if energy else rank, energy=energy, include_embeddings=embeddings,
                overwrite=overwrite, progress=err.is_terminal)
    if as_json:
        _json(r)
        return
    t = Table(title=f"extracted {out_path}: share of each layer's ||ΔW||_F kept")
    for c in ("module", "rank", "norm kept", "||ΔW||/||W||"):
        t.add_column(c, justify="right")
    for row in r["rows"]:
        t.add_row(row["module"], str(row["rank"] or "full"), f"{row['kept']:.2%}", f"{row['rel_change']:.3%}")
    out.print(t)
    out.print(f"[green]patch written[/green] {out_path}: {r['layers']} layers, ranks {r['ranks']}, mean norm kept "
              f"{r['mean_norm_kept']:.2%} (min {r['min_norm_kept']:.2%})"
              + (f"; {len(r['skipped_1d'])} changed 1-D tensors not represented" if r["skipped_1d"] else ""))


@app.command("merge")
def merge_cmd(patches: list[Path] = typer.Argument(..., help="patch directories (same base)"),
              method: str = typer.Option("linear", "--method", help="linear, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs"),
              weights: Optional[str] = typer.Option(None, "--weights", help="comma-separated, one per patch (default all 1)"),
              density: float = typer.Option(0.5, "--density", help="share of entries kept (ties, dare, breadcrumbs)"),
              lam: float = typer.Option(1.0, "--lambda", help="scale of the merged update"),
              gamma: float = typer.Option(0.01, "--gamma", help="breadcrumbs: share of largest entries dropped"),
              rank: Optional[int] = typer.Option(None, "--rank", help="rank of the merged patch (default: largest input rank)"),
              seed: int = typer.Option(0, "--seed", help="DARE's random drop"),
              normalize: Optional[bool] = typer.Option(None, "--normalize/--no-normalize", help="divide by the weights' sum (default: per method, as mergekit)"),
              select: Optional[str] = typer.Option(None, "--select", help="'greedy': Model-GLUE selective merging"),
              task: Optional[str] = typer.Option(None, "--task", help="with --select: task(s) scoring each step, comma-separated"),
              base: Optional[str] = typer.Option(None, "--base", help="with --select: base to score on (default: the patches' base)"),
              select_limit: int = typer.Option(100, "--select-limit", help="held-out examples per task (from the train part's end)"),
              order: str = typer.Option("score", "--order", help="with --select: score or similarity"),
              data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
              out_path: Path = typer.Option(..., "--out", help="patch directory to write"),
              overwrite: bool = typer.Option(False, "--overwrite"),
              as_json: bool = typer.Option(False, "--json")) -> None:
    """Merge patches into one patch (PEFT-loadable), on the full updates, re-factored by SVD."""
    from .merge import greedy_select, merge
    from .patch import Patch

    ws = [float(w) for w in weights.split(",")] if weights else None
    kw = dict(density=density, lam=lam, rank=rank, seed=seed, gamma=gamma, normalize=normalize)
    if select:
        if select != "greedy" or not task:
            raise PortLLMError("selective merging needs --select greedy and --task T")
        from .selection import heldout_scorer

        ps = [Patch.load(p) for p in patches]
        scorer = heldout_scorer(base or ps[0].source.get("name"), task, select_limit, data_dir)
        merged, traj = greedy_select(ps, scorer, method, order=order, log=lambda m: err.print(m, highlight=False), **kw)
        report = merged.manifest["extra"]["merge"] | {"selection": traj}
    else:
        merged, report = merge(patches, method, ws, **kw)
    merged.save(out_path, overwrite=overwrite)
    if as_json:
        _json({k: v for k, v in report.items() if k != "energy_kept"} | {"out": str(out_path)})
        return
    out.print(f"[green]merged[/green] {len(report['inputs'])} patches with {report['method']} -> {out_path} (rank {report['rank']}, "
              f"energy kept mean {report['energy_kept_mean']:.2%}, min {report['energy_kept_min']:.2%})")


@app.command("similarity")
def similarity_cmd(patches: list[Path] = typer.Argument(..., help="patch directories"),
                   threshold: float = typer.Option(0.3, "--threshold", help="cosine at or above which patches group together"),
                   as_json: bool = typer.Option(False, "--json")) -> None:
    """Cosine similarity of patches' updates, and the groups that look mergeable."""
    from .merge import clusters, similarity
    from .patch import Patch

    ps = [Patch.load(p) for p in patches]
    sim = similarity(ps)
    groups = clusters(sim, threshold)
    if as_json:
        _json({"patches": [str(p) for p in patches], "cosine": sim, "groups": [[str(patches[i]) for i in g] for g in groups]})
        return
    t = Table(title="cosine similarity of the updates ΔW (all layers)")
    t.add_column("")
    for i in range(len(ps)):
        t.add_column(str(i), justify="right")
    for i, row in enumerate(sim):
        t.add_row(f"{i} {patches[i]}", *[f"{v:+.3f}" for v in row])
    out.print(t)
    for g in groups:
        out.print(f"group (cos ≥ {threshold}): " + ", ".join(str(patches[i]) for i in g))


def _click_classes(name: str) -> tuple[type, ...]:
    """Typer >= 0.20 raises its own vendored copy of click's exceptions, older ones click's."""
    found = [getattr(click.exceptions, name)]
    try:
        from typer._click import exceptions as vendored
        found.append(getattr(vendored, name))
    except (ImportError, AttributeError):
        pass
    return tuple(found)


_ABORTS = _click_classes("Abort")
_USAGE_ERRORS = _click_classes("ClickException")


def main() -> None:
    """Entry point: one-line errors, meaningful exit codes, no tracebacks for user mistakes."""
    try:
        rc = app(standalone_mode=False)
    except PortLLMError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(3)
    except (KeyboardInterrupt, *_ABORTS):
        err.print("interrupted")
        sys.exit(130)
    except _USAGE_ERRORS as e:
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        if not e.format_message():  # the help was just shown for a bare command
            sys.exit(0)
        err.print(f"[red]error:[/red] {e.format_message()}{hint}", highlight=False, soft_wrap=True)
        sys.exit(3)  # not click's 2, which `check` uses for "incompatible"
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
