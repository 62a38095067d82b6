"""Training: train, evolve, and the paper's experiment."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Group
from rich.table import Table

from ..errors import PortLLMError
from ._app import SPEC_HELP, _json, app, err, out

if TYPE_CHECKING:
    from ..reproduce import ReproduceReport


@app.command("train")
def train_cmd(
    base: str = typer.Option(..., "--base", help=f"base to fine-tune: {SPEC_HELP}"),
    task: str = typer.Option(..., "--task", help="task to learn (see `portllm tasks`)"),
    out_path: Path = typer.Option(..., "--out", help="patch directory to write"),
    steps: int = typer.Option(100, "--steps", help="optimizer steps"),
    batch_size: int = typer.Option(8, "--batch-size"),
    lr: float = typer.Option(2e-4, "--lr"),
    rank: int = typer.Option(8, "--rank", help="LoRA rank (paper: 8)"),
    alpha: float = typer.Option(16.0, "--alpha", help="LoRA alpha (paper: 16)"),
    targets: str = typer.Option(
        "",
        "--targets",
        help="comma-separated module names (default: the architecture's linear projections, e.g. llama's "
        "q,k,v,o,gate,up,down_proj, from architectures.json)",
    ),
    max_length: int = typer.Option(256, "--max-length", help="tokens per example (prompt cut from the left)"),
    max_examples: Optional[int] = typer.Option(None, "--max-examples", help="use only the first N train examples"),
    seed: int = typer.Option(0, "--seed"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16"),
    eval_limit: int = typer.Option(100, "--eval-limit", help="score the patch on this many eval examples (0: skip)"),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", help="benchmark data directory (default $PORTLLM_DATA)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Fine-tune a LoRA patch on one task (resumes from its checkpoint if interrupted)."""
    from ..train import TrainConfig, train

    cfg = TrainConfig(
        rank=rank,
        alpha=alpha,
        target_modules=tuple(t for t in targets.split(",") if t),
        lr=lr,
        steps=steps,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        dtype=dtype,
        max_examples=max_examples,
    )
    r = train(
        base, task, out_path, cfg, data=data_dir, eval_limit=eval_limit, overwrite=overwrite, progress=err.is_terminal
    )
    if as_json:
        _json(r.to_dict())
        return
    out.print(
        f"[green]patch written[/green] {out_path}: {r.trainable_params:,} trainable parameters, {len(r.losses)} steps"
        + (f" (resumed at {r.resumed_from})" if r.resumed_from else "")
        + f", loss {r.losses[0]:.3f} -> {r.losses[-1]:.3f}, {r.wall_s:.0f} s, peak RSS "
        f"{r.peak_rss_mb:.0f} MB"
    )
    if r.eval:
        out.print(
            f"score on its base: {r.eval['metric']} {r.eval['value']:.4f} ± {r.eval['stderr']:.4f} (n={r.eval['n']})"
        )


@app.command("evolve")
def evolve_cmd(
    base: str = typer.Option(..., "--base", help=f"base to continue pretraining: {SPEC_HELP}"),
    corpus: str = typer.Option(
        "mix", "--corpus", help="instruct | text | mix, a file, or files joined with '+' (relative to the data dir)"
    ),
    out_path: Path = typer.Option(..., "--out", help="model directory to write"),
    mode: str = typer.Option("full", "--mode", help="full (all parameters) or lora (merged back in)"),
    rank: int = typer.Option(64, "--rank", help="LoRA rank in lora mode"),
    steps: int = typer.Option(100, "--steps"),
    batch_size: int = typer.Option(8, "--batch-size"),
    lr: float = typer.Option(5e-5, "--lr"),
    max_length: int = typer.Option(256, "--max-length"),
    seed: int = typer.Option(0, "--seed"),
    dtype: str = typer.Option("float32", "--dtype"),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", help="benchmark data directory (default $PORTLLM_DATA)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Make an evolved base θ' by continued pretraining of θ on a corpus; reports the drift."""
    from ..evolve import EvolveConfig, evolve

    cfg = EvolveConfig(
        mode=mode,
        rank=rank,
        alpha=2.0 * rank,
        lr=lr,
        steps=steps,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        dtype=dtype,
    )
    lin = evolve(base, corpus, out_path, cfg, data=data_dir, overwrite=overwrite, progress=err.is_terminal)
    if as_json:
        _json(lin.to_dict())
        return
    t = Table(title=f"drift ||θ'−θ||/||θ|| per layer type ({out_path})")
    t.add_column("layer type")
    t.add_column("relative drift", justify="right")
    for k, v in lin.drift.items():
        t.add_row(k, f"{v:.4%}")
    out.print(t)
    out.print(
        f"[green]evolved[/green] {base} -> {out_path} ({lin.fingerprint}): {lin.steps} steps on {corpus}, "
        f"loss {lin.loss_first:.3f} -> {lin.loss_last:.3f}, {lin.wall_s:.0f} s"
    )


@app.command("reproduce")
def reproduce_cmd(
    base: str = typer.Option("smollm2-135m", "--base", help=f"the base θ: {SPEC_HELP}"),
    quick: bool = typer.Option(
        False, "--quick", help="SST-2 + WinoGrande, about 20-25 min on a 2-core CPU (the default)"
    ),
    full: bool = typer.Option(False, "--full", help="all seven paper tasks, under 90 min on a 2-core CPU"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="override the profile's task list"),
    out_dir: Path = typer.Option(Path("runs/reproduce"), "--out", help="where report.json/.md and charts go"),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", help="benchmark data directory (default $PORTLLM_DATA)"
    ),
    cache: Optional[Path] = typer.Option(None, "--cache", help="step cache (default $PORTLLM_CACHE/reproduce)"),
    as_json: bool = typer.Option(False, "--json", help="print report.json instead of tables"),
) -> None:
    """The paper's experiment: θ, θ', θ+Δθ, θ'+Δθ (ported, no training), θ'+Δθ' (re-tuned), with costs and flips."""
    from ..reproduce import reproduce

    if quick and full:
        raise PortLLMError("choose one of --quick and --full")
    profile = "full" if full else "quick"
    r = reproduce(
        base,
        profile,
        [t for t in tasks.split(",") if t] if tasks else None,
        out_dir,
        data_dir,
        cache,
        log=(lambda m: err.print(m, highlight=False, markup=False)) if not as_json else (lambda m: None),
        show_progress=err.is_terminal,
    )
    if as_json:
        _json(r.to_dict())
        return
    out.print(reproduce_tables(r))
    out.print(
        f"[dim]report: {out_dir / 'report.md'}  {out_dir / 'report.json'}  charts: {out_dir / 'accuracy.png'}, "
        f"{out_dir / 'efficiency.png'}[/dim]"
    )


def reproduce_tables(r: ReproduceReport) -> Group:
    """Table 2 (accuracy, flips) and Table 6 (cost) of the paper, as rich tables."""
    from ..reproduce import LABELS, VARIANTS
    from ..reproduce.report import fmt

    acc = Table(title=f"accuracy (%), {r.profile} profile — cf. Table 2 of the paper")
    for c in ("task", "n", *[LABELS[v] for v in VARIANTS], "ported − re-tuned", "neg. flips"):
        acc.add_column(c, justify="right")
    for name, t in r.tasks.items():
        f = r.flips[name]
        acc.add_row(
            name,
            str(t.n),
            *[f"{100 * t.scores[v]:.1f}" for v in VARIANTS],
            f"{100 * t.ported_minus_retuned:+.1f}",
            f"{f.negative_flips} ({100 * f.negative_flip_rate:.1f}%)",
        )
    a = r.average
    acc.add_row(
        "average",
        "",
        *[f"{100 * a[v]:.1f}" for v in VARIANTS],
        f"{100 * a['ported_minus_retuned']:+.1f}",
        "",
        style="bold",
    )
    e = r.efficiency
    eff = Table(title="cost of porting vs re-tuning — cf. Table 6 of the paper")
    for c in ("", "trainable params", "peak RSS MB", "wall s"):
        eff.add_column(c, justify="right")
    eff.add_row("port θ'+Δθ", "0", fmt(e.port.peak_rss_mb, ".0f"), fmt(e.port.wall_s, ".1f"))
    eff.add_row(
        "re-tune Δθ'",
        f"{e.retune.trainable_params:,}",
        fmt(e.retune.peak_rss_mb, ".0f"),
        fmt(e.retune.wall_s, ".1f"),
    )
    eff.add_row(
        "re-tune / port",
        "",
        fmt(e.memory_retune_over_port, ".1f") + "x",
        fmt(e.time_retune_over_port, ".1f") + "x",
        style="bold",
    )
    return Group(acc, eff)
