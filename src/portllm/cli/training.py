"""Training: train, evolve, and the paper's experiment."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Group
from rich.table import Table
from rich.text import Text

from ..device import DEVICE_HELP, DTYPE_HELP, resolve_device, resolve_dtype
from ..errors import PortLLMError
from ._app import INCLUDE_PATH, SPEC_HELP, app, err, log_line, out, print_json

if TYPE_CHECKING:
    from ..reproduce import ReproduceReport
    from ..train import TrainResult


@app.command("train")
def train_cmd(
    base: str = typer.Option(..., "--base", help=f"base to fine-tune: {SPEC_HELP}"),
    task: Optional[str] = typer.Option(
        None, "--task", help="task to learn (see `portllm tasks`), or a task file (my/task.yaml); or --data"
    ),
    include: Optional[list[Path]] = INCLUDE_PATH,
    data: Optional[Path] = typer.Option(
        None,
        "--data",
        help='instead of --task: your JSONL of {"prompt", "completion"} or {"messages": [...]} rows (as TRL reads '
        "them); loss on the completion / assistant turns only",
    ),
    eval_data: Optional[Path] = typer.Option(
        None, "--eval-data", help="with --data: held-out rows (same format) to score before and after training"
    ),
    eval_fraction: Optional[float] = typer.Option(
        None, "--eval-fraction", help="with --data: hold out this share of its rows, seeded (default 0.1, >= 1 row)"
    ),
    out_path: Path = typer.Option(..., "--out", help="patch directory to write"),
    steps: int = typer.Option(100, "--steps", help="optimizer steps"),
    batch_size: int = typer.Option(8, "--batch-size"),
    lr: float = typer.Option(2e-4, "--lr"),
    rank: Optional[int] = typer.Option(None, "--rank", help="LoRA rank (default: 8 as in the paper, or --init's)"),
    alpha: Optional[float] = typer.Option(
        None, "--alpha", help="LoRA alpha (default: 16 as in the paper, or --init's)"
    ),
    targets: str = typer.Option(
        "",
        "--targets",
        help="comma-separated module names (default: --init's, else the architecture's linear projections, e.g. "
        "llama's q,k,v,o,gate,up,down_proj, from architectures.json)",
    ),
    init: Optional[Path] = typer.Option(
        None,
        "--init",
        help="warm start: begin from this patch's LoRA factors (e.g. Δθ made on θ, re-tuned on θ') instead of a "
        "fresh init; its rank, alpha and targets are kept",
    ),
    max_length: int = typer.Option(256, "--max-length", help="tokens per example (prompt cut from the left)"),
    max_examples: Optional[int] = typer.Option(None, "--max-examples", help="use only the first N train examples"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option(
        "float32", "--dtype", help="float32 (the recipe's default: LoRA trained in full precision), bfloat16, auto"
    ),
    eval_limit: int = typer.Option(100, "--eval-limit", help="score the patch on this many eval examples (0: skip)"),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", help="benchmark data directory (default $PORTLLM_DATA)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Fine-tune a LoRA patch on one task or your own data (resumes from its checkpoint if interrupted),
    optionally from --init."""
    from ..train import TrainConfig, train, train_on_data

    if (task is None) == (data is None):
        raise PortLLMError("pass one of --task NAME and --data FILE.jsonl")
    if data is None and (eval_data is not None or eval_fraction is not None):
        raise PortLLMError("--eval-data and --eval-fraction go with --data (a task is scored with --eval-limit)")
    dev = resolve_device(device)
    cfg = TrainConfig(
        device=dev,
        rank=rank,
        alpha=alpha,
        target_modules=tuple(t for t in targets.split(",") if t),
        lr=lr,
        steps=steps,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        dtype=resolve_dtype(dtype, dev),
        max_examples=max_examples,
    )
    if data is not None:
        fraction = eval_fraction if eval_fraction is not None or eval_data is not None else 0.1
        r = train_on_data(base, data, out_path, cfg, eval_data, fraction, overwrite, err.is_terminal, init=init)
    else:
        r = train(
            base,
            task,
            out_path,
            cfg,
            data=data_dir,
            eval_limit=eval_limit,
            overwrite=overwrite,
            progress=err.is_terminal,
            init=init,
        )
    if as_json:
        print_json(r.to_dict())
        return
    _print_trained(r, out_path, init)


def _print_trained(r: TrainResult, out_path: Path, init: Optional[Path]) -> None:
    """`portllm train`'s summary: the patch, its steps and loss, and its score on the base or held-out rows."""
    out.print(
        f"[green]patch written[/green] {out_path}: {r.trainable_params:,} trainable parameters, {len(r.losses)} steps"
        + (f" from {init}" if init else "")
        + (f" (resumed at {r.resumed_from})" if r.resumed_from else "")
        + f", loss {r.losses[0]:.3f} -> {r.losses[-1]:.3f}, {r.wall_s:.0f} s, peak RSS "
        f"{r.peak_rss_mb:.0f} MB"
    )
    if r.eval:
        out.print(
            f"score on its base: {r.eval['metric']} {r.eval['value']:.4f} ± {r.eval['stderr']:.4f} (n={r.eval['n']})"
        )
    if r.heldout:
        h = r.heldout
        out.print(
            f"held-out reference log-likelihood per token: {h['loglik_per_token_before']:.4f} -> "
            f"{h['loglik_per_token_after']:.4f} (n={h['rows']})"
        )


@app.command("evolve")
def evolve_cmd(
    base: str = typer.Option(..., "--base", help=f"base to continue pretraining: {SPEC_HELP}"),
    corpus: str = typer.Option(
        "mix", "--corpus", help="instruct | text | mix, a file, or files joined with '+' (relative to the data dir)"
    ),
    out_path: Path = typer.Option(..., "--out", help="model directory to write"),
    interpolate: Optional[float] = typer.Option(
        None,
        "--interpolate",
        help="instead of training, write θ + T·(θ'−θ) along the update toward --toward (0: θ, 1: θ', >1 extrapolates)",
    ),
    toward: Optional[str] = typer.Option(None, "--toward", help="the evolved base θ' that --interpolate walks toward"),
    mode: str = typer.Option("full", "--mode", help="full (all parameters) or lora (merged back in)"),
    rank: int = typer.Option(64, "--rank", help="LoRA rank in lora mode"),
    steps: int = typer.Option(100, "--steps"),
    batch_size: int = typer.Option(8, "--batch-size"),
    lr: float = typer.Option(5e-5, "--lr"),
    max_length: int = typer.Option(256, "--max-length"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", "--dtype", help="float32 (default), bfloat16 or auto"),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", help="benchmark data directory (default $PORTLLM_DATA)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Make an evolved base θ' by continued pretraining of θ on a corpus, or θ + T·(θ'−θ); reports the drift."""
    from ..evolve import EvolveConfig, evolve

    if (interpolate is None) != (toward is None):
        raise PortLLMError("--interpolate T and --toward EVOLVED go together")
    if interpolate is not None:
        _interpolate(base, toward, interpolate, out_path, overwrite, as_json)
        return

    dev = resolve_device(device)
    cfg = EvolveConfig(
        device=dev,
        mode=mode,
        rank=rank,
        alpha=2.0 * rank,
        lr=lr,
        steps=steps,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        dtype=resolve_dtype(dtype, dev),
    )
    lin = evolve(base, corpus, out_path, cfg, data=data_dir, overwrite=overwrite, progress=err.is_terminal)
    if as_json:
        print_json(lin.to_dict())
        return
    _drift_table(lin.drift, f"drift ||θ'−θ||/||θ|| per layer type ({out_path})")
    out.print(
        f"[green]evolved[/green] {base} -> {out_path} ({lin.fingerprint}): {lin.steps} steps on {corpus}, "
        f"loss {lin.loss_first:.3f} -> {lin.loss_last:.3f}, {lin.wall_s:.0f} s"
    )


def _interpolate(base: str, toward: str, t: float, out_path: Path, overwrite: bool, as_json: bool) -> None:
    from ..interpolate import interpolate

    r = interpolate(base, toward, t, out_path, overwrite=overwrite, progress=err.is_terminal)
    if as_json:
        print_json(r.to_dict())
        return
    _drift_table(r.drift, f"drift ||θ(t)−θ||/||θ|| per layer type at t = {t:g} ({out_path})")
    out.print(
        f"[green]interpolated[/green] {base} + {t:g}·({toward} − {base}) -> {out_path} ({r.fingerprint}), "
        f"{r.wall_s:.0f} s"
    )


def _drift_table(drift: dict[str, float], title: str) -> None:
    t = Table(title=title)
    t.add_column("layer type")
    t.add_column("relative drift", justify="right")
    for k, v in drift.items():
        t.add_row(k, f"{v:.4%}")
    out.print(t)


@app.command("reproduce")
def reproduce_cmd(
    base: str = typer.Option("smollm2-135m", "--base", help=f"the base θ: {SPEC_HELP}"),
    quick: bool = typer.Option(False, "--quick", help="SST-2 + WinoGrande, about 20 min on a 2-core CPU (the default)"),
    full: bool = typer.Option(False, "--full", help="all seven paper tasks, under 90 min on a 2-core CPU"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="override the profile's task list"),
    out_dir: Path = typer.Option(Path("runs/reproduce"), "--out", help="where report.json/.md and charts go"),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", help="benchmark data directory (default $PORTLLM_DATA)"
    ),
    cache: Optional[Path] = typer.Option(None, "--cache", help="step cache (default $PORTLLM_CACHE/reproduce)"),
    margin: float = typer.Option(
        0.01, "--margin", help="paired verdicts: 'no difference' only within ±margin (a fraction: 0.01 = 1 point)"
    ),
    device: str = typer.Option("auto", "--device", help=f"where it trains, evolves and scores: {DEVICE_HELP}"),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help=f"scoring dtype (default: the profile's, float32): {DTYPE_HELP}"
    ),
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
        log=log_line if not as_json else (lambda m: None),
        show_progress=err.is_terminal,
        margin=margin,
        device=device,
        dtype=dtype,
    )
    if as_json:
        print_json(r.to_dict())
        return
    out.print(reproduce_tables(r))
    out.print(
        f"[dim]report: {out_dir / 'report.md'}  {out_dir / 'report.json'}  charts: {out_dir / 'accuracy.png'}, "
        f"{out_dir / 'efficiency.png'}[/dim]"
    )


def reproduce_tables(r: ReproduceReport) -> Group:
    """Table 2 (accuracy with Wilson intervals, majority baseline, paired ported − re-tuned, flips) and
    Table 6 (cost) of the paper, as rich tables; the rows are report.md's."""
    from ..reproduce.report import accuracy_rows, fmt, learned_line

    header, rows = accuracy_rows(r)
    caption = "accuracy with its Wilson 95% CI; ported − re-tuned: paired, with its bootstrap 95% CI and McNemar p"
    acc = Table(title=f"accuracy (%), {r.profile} profile — cf. Table 2 of the paper", caption=caption)
    for c in header:
        acc.add_column(c, justify="right")
    for cells, bold in rows:
        acc.add_row(*cells, style="bold" if bold else None)
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
    line = learned_line(r)
    return Group(acc, *([Text(line)] if line else []), eff)
