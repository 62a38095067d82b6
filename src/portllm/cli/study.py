"""Studies of porting: the drift sweep, and the forecast a user runs before porting."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..device import DEVICE_HELP, DTYPE_HELP, resolve_device, resolve_dtype
from ..errors import PortLLMError
from ..models import family_of
from ._app import INCLUDE_PATH, SPEC_HELP, app, err, log_line, out, print_json


@app.command("sweep")
def sweep_cmd(
    plan: str = typer.Option(
        "full",
        "--plan",
        help="full (the committed study, hours; resumable), repair, smollm2, gemma, gemma-repair, generation or pilot",
    ),
    base: str = typer.Option("smollm2-135m", "--base", help=f"the base θ: {SPEC_HELP}"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="only these of the plan's tasks, comma-separated"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="override the plan's seeds, e.g. 0,1,2"),
    levels: Optional[str] = typer.Option(None, "--levels", help="override the drift levels t, e.g. 0,0.5,1,2"),
    real: bool = typer.Option(True, "--real/--no-real", help="include the plan's other real evolved bases"),
    repair_inputs: Optional[str] = typer.Option(
        None,
        "--repair-inputs",
        help="only these kinds of the plan's repair inputs (task, text, self), comma-separated: e.g. task first, "
        "the rest in a later run from the same cache",
    ),
    retune: bool = typer.Option(True, "--retune/--no-retune", help="re-tune θ' at the plan's levels"),
    warm: bool = typer.Option(True, "--warm/--no-warm", help="measure warm-start vs cold re-tuning"),
    correct: bool = typer.Option(
        True, "--correct/--no-correct", help="try the training-free rescale correction (λ chosen without labels)"
    ),
    out_dir: Path = typer.Option(Path("runs/sweep"), "--out", help="where report.json/.md and charts go"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="benchmark data (default $PORTLLM_DATA)"),
    cache: Optional[Path] = typer.Option(None, "--cache", help="step cache (default $PORTLLM_CACHE/sweep)"),
    device: str = typer.Option(
        "cpu",
        "--device",
        help=f"{DEVICE_HELP}; training, scoring, signals and repairs run there (ports and drift on the CPU; the "
        "rescale correction and the generation plan on the CPU only). Default cpu: the committed studies' device",
    ),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help=f"scoring dtype (default: the plan's, float32): {DTYPE_HELP}"
    ),
    join: Optional[list[Path]] = typer.Option(
        None,
        "--join",
        help="another base family's sweep report.json: its cells join the forecast's validation (leave one family "
        "out), calibration (one fit per family) and charts (repeatable)",
    ),
    as_json: bool = typer.Option(False, "--json", help="print report.json instead of tables"),
) -> None:
    """Drift levels × tasks × seeds: what porting loses as the base drifts, and the forecast's validation."""
    from dataclasses import replace

    from ..sweep import PLANS, sweep
    from ..sweep.plan import only_repair_inputs
    from ..sweep.report import read_joins

    dev = resolve_device(device)  # an absent device fails inside, with its own line
    if plan not in PLANS:
        raise PortLLMError(f"unknown plan {plan!r}; choose from {', '.join(PLANS)}")
    p = PLANS[plan]
    joins = tuple(join or ())
    if joins:  # refused now, not after hours of sweeping
        if p.kind == "generation":
            raise PortLLMError("--join joins multiple-choice sweeps; the generation sweep has no cells to join to")
        read_joins({"name": base, "model_family": family_of(base)}, joins)
    if tasks:
        names = [t for t in tasks.split(",") if t]
        missing = [t for t in names if t not in p.tasks]
        if missing:
            raise PortLLMError(f"plan {plan} has no recipe for {missing[0]}; its tasks: {', '.join(p.tasks)}")
        p = replace(p, tasks={t: p.tasks[t] for t in names})
    if seeds:
        try:
            p = replace(p, seeds=tuple(int(s) for s in seeds.split(",") if s))
        except ValueError:
            raise PortLLMError(f"--seeds must be integers separated by commas, got {seeds!r}") from None
    if levels:
        try:
            p = replace(p, levels=tuple(float(t) for t in levels.split(",") if t))
        except ValueError:
            raise PortLLMError(f"--levels must be numbers separated by commas, got {levels!r}") from None
    if repair_inputs:
        p = only_repair_inputs(p, tuple(k for k in repair_inputs.split(",") if k))
    if not retune:  # a task recipe's own re-tune levels too
        p = replace(p, tasks={k: replace(r, retune_levels=()) for k, r in p.tasks.items()})
    p = replace(
        p,
        real=p.real if real else (),
        retune_levels=p.retune_levels if retune else (),
        warm_steps=p.warm_steps if warm else (),
        correct_levels=p.correct_levels if correct else (),
        correct_real=p.correct_real and correct,
    )
    if dtype is not None:
        p = replace(p, eval_dtype=resolve_dtype(dtype, dev))  # the eval cache keys by it
    log = log_line if not as_json else (lambda m: None)
    r = sweep(p, base, out_dir, data_dir, cache, log=log, progress=err.is_terminal, join=joins, device=dev)
    if as_json:
        print_json(r)
        return
    if p.kind == "generation":
        _print_generation_sweep(r, out_dir)
        return
    _print_sweep(r, out_dir)


def _print_sweep(r: dict, out_dir: Path) -> None:
    """Each (base family, task): the loss, flips and gain by level; then the forecast's held-out figures."""
    from ..sweep.report import by_level

    for family, task in dict.fromkeys((c.get("family"), c["task"]) for c in r["cells"]):
        t = Table(title=f"{task} on {family}: what porting loses as the base drifts (mean over seeds, 95% band)")
        for c in ("level", "drift", "loss (points)", "neg. flip rate", "gain over θ' (points)"):
            t.add_column(c, justify="right")
        loss = by_level(r, task, lambda c: c["loss"], family)
        nfr = {x["level"]: x for x in by_level(r, task, lambda c: c["neg_flip_rate"], family)}
        gain = {x["level"]: x for x in by_level(r, task, lambda c: c["evolved+patch"] - c["evolved"], family)}
        for x in loss:
            n, g = nfr[x["level"]], gain[x["level"]]
            t.add_row(
                x["level"],
                f"{100 * x['drift']:.2f}%",
                f"{100 * x['mean']:+.1f} [{100 * x['lo']:+.1f}, {100 * x['hi']:+.1f}]",
                f"{100 * n['mean']:.1f}%",
                f"{100 * g['mean']:+.1f}",
            )
        out.print(t)
    v = r["forecast_validation"]
    for key in ("leave_one_task_out", "leave_one_family_out", "leave_one_level_out"):
        x = v.get(key) or {}
        if x.get("cells"):
            rho, loss, nfr, cov = (_num(x[k], f) for k, f in zip(_FIGURES, (".3f", ".2f", ".2f", ".0%")))
            out.print(
                f"forecast, {key.replace('_', ' ')} ({x['cells']} cells): Spearman ρ {rho}, loss MAE {loss}, "
                f"neg-flip-rate MAE {nfr} points, 95% interval coverage {cov}",
                markup=False,
            )
    out.print(f"[dim]report: {out_dir / 'report.md'}  {out_dir / 'report.json'}  charts: {out_dir / 'loss.png'}[/dim]")


_FIGURES = ("spearman_loss", "mae_loss_points", "mae_neg_flip_rate_points", "interval_coverage")


def _num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _print_generation_sweep(r: dict, out_dir: Path) -> None:
    """The generation sweep's cells as a table (mean over seeds per task and base) and its validation."""
    t = Table(title="generation: what porting does to the completions (mean over seeds)")
    for c in ("task", "base", "drift", "loglik change (nats/token)", "signal (train rows)", "answers changed"):
        t.add_column(c, justify="right")
    groups: dict[tuple, list] = {}
    for c in r["cells"]:
        groups.setdefault((c["task"], c["level"], c["drift"]), []).append(c)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    for (task, level, drift), cs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2])):
        t.add_row(
            task,
            level,
            f"{100 * drift:.2f}%",
            f"{mean([c['measured']['loglik_change'] for c in cs]):+.4f}",
            f"{mean([c['signals']['loglik_change'] for c in cs]):+.4f}",
            f"{100 * mean([c['measured']['outputs_changed'] for c in cs]):.1f}%",
        )
    out.print(t)
    v = r["forecast_validation"]
    for what, unit in (("loglik", "nats/token"), ("changed", "points")):
        x = v[what]["leave_one_task_out"]
        if x.get("cells"):
            out.print(
                f"forecast of {what}, leave one task out ({x['cells']} cells): MAE {x['mae']:.4g} {unit}, "
                f"Spearman ρ {x['spearman']}, 95% interval coverage {x['interval_coverage']:.0%}",
                markup=False,
            )
    out.print(f"report: {out_dir / 'report.md'}  {out_dir / 'report.json'}  chart: {out_dir / 'generation.png'}")


@app.command("forecast")
def forecast_cmd(
    patch: Path = typer.Argument(..., help="patch directory"),
    base: str = typer.Option(..., "--base", help=f"the new base you plan to port onto: {SPEC_HELP}"),
    old: Optional[str] = typer.Option(None, "--from", help="the base the patch was made on (needed for a loss)"),
    inputs: Optional[str] = typer.Option(
        None,
        "--inputs",
        help="a task's unlabeled inputs (a name or a task file, my/task.yaml), a text file, or a prompt/completion "
        "or chat .jsonl (train --data's rows: also the change in the completions' log-likelihood)",
    ),
    include: Optional[list[Path]] = INCLUDE_PATH,
    n: int = typer.Option(200, "--n", min=1, help="how many inputs to compare the two models on"),
    split: str = typer.Option(
        "eval", "--split", help="with a task: which of its splits supplies the inputs (train or eval)"
    ),
    gen_n: int = typer.Option(
        32, "--gen-n", min=0, help="generation data: how many of the prompts get greedy answers from both models"
    ),
    gen_tokens: int = typer.Option(
        48, "--gen-tokens", min=1, help="generation data from a JSONL: new tokens per greedy answer (a task file's own)"
    ),
    calibration: str = typer.Option(
        "builtin",
        "--calibration",
        help="builtin (fitted on docs/sweep and docs/sweep/generation), raw (uncalibrated), or a calibration.json",
    ),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="benchmark data (default $PORTLLM_DATA)"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Before any labelled evaluation: the points a port will lose and the share of answers that flip to wrong.
    With --inputs it scores θ+Δθ, frees it, then θ'+Δθ: one model in memory at a time."""
    from ..forecast import Generation, forecast
    from ..repair.advice import advice

    if split not in ("train", "eval"):
        raise PortLLMError(f"--split must be train or eval, got {split!r}")
    dev = resolve_device(device)
    gen = Generation(gen_n, gen_tokens)
    f = forecast(
        patch, base, old, inputs, n, data_dir, calibration, resolve_dtype(dtype, dev), device=dev, split=split, gen=gen
    )
    tip = advice(f.loss_points, patch, base, old, inputs)
    if as_json:
        print_json(f.to_dict() | {"advice": tip})
        return
    t = Table(title=f"forecast: {patch} -> {base}")
    t.add_column("signal")
    t.add_column("value", justify="right")
    t.add_column("meaning")
    if f.weights:
        w = f.weights
        t.add_row("drift of the patched matrices", f"{w.rel_drift:.3%}", "||W'−W|| / ||W||, mean")
        t.add_row("drift inside the patch subspace", f"{w.subspace_disturbance:.3f}", "in units of ||ΔW||")
        t.add_row("cos(drift, ΔW)", f"{w.cos:+.3f}", "negative: the update undoes part of the patch")
    if f.outputs:
        o = f.outputs
        what = "answers that change" if o.kind == "choices" else "next tokens that change (where answers start)"
        t.add_row(f"{what} ({o.source}, n={o.n})", f"{o.disagreement:.1%}", "θ+Δθ vs θ'+Δθ")
        t.add_row("KL(θ+Δθ ‖ θ'+Δθ)", f"{o.mean_kl:.4f}", "mean over inputs")
        if o.loglik_change is not None:
            lo, hi = o.loglik_change_ci
            t.add_row("reference log-lik.", f"{o.loglik_a:.4f} -> {o.loglik_b:.4f}", "nats/token: θ+Δθ -> θ'+Δθ")
            t.add_row("its change", f"{o.loglik_change:+.4f} [{lo:+.4f}, {hi:+.4f}]", "paired 95% CI; not in points")
        if o.outputs_changed is not None:
            lo, hi = o.outputs_changed_ci
            t.add_row(
                f"greedy answers that change (n={o.generated})",
                f"{o.outputs_changed:.1%} [{lo:.1%}, {hi:.1%}]",
                "θ+Δθ vs θ'+Δθ, bootstrap 95% CI",
            )
    out.print(t)
    out.print(f"verdict: {f.sentence()}", markup=False)
    said = f.notes[-1:] if f.loss_points is None and f.generation is None else []  # already in the verdict
    for note in f.notes:
        if note not in said:
            out.print(note, style="dim", markup=False)
    if tip:
        out.print(f"advice: {tip}", markup=False)


@app.command("rescale")
def rescale_cmd(
    patch: Path = typer.Argument(..., help="patch directory"),
    base: str = typer.Option(..., "--base", help=f"the new base you plan to port onto: {SPEC_HELP}"),
    old: str = typer.Option(..., "--from", help="the base the patch was made on"),
    inputs: str = typer.Option(
        ..., "--inputs", help="a task (or task file) whose unlabeled train-split inputs choose λ"
    ),
    include: Optional[list[Path]] = INCLUDE_PATH,
    n: int = typer.Option(150, "--n", min=1, help="how many inputs"),
    scales: str = typer.Option("0.5,0.75,1,1.25,1.5,2", "--scales", help="the λ values to try"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="benchmark data (default $PORTLLM_DATA)"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Training-free correction: the λ for `port --scale` under which θ'+λΔθ answers most like θ+Δθ (no labels)."""
    from ..rescale import choose_scale

    try:
        grid = tuple(float(x) for x in scales.split(",") if x)
    except ValueError:
        raise PortLLMError(f"--scales must be numbers separated by commas, got {scales!r}") from None
    if not grid or any(not (0 < x < 100) for x in grid):
        raise PortLLMError("--scales needs at least one λ, each above 0 (e.g. 0.5,1,1.5,2)")
    dev = resolve_device(device)
    c = choose_scale(patch, old, base, inputs, n, grid, data_dir, resolve_dtype(dtype, dev), dev)
    if as_json:
        print_json(c.to_dict())
        return
    t = Table(title=f"rescale: {patch} -> {base} ({c.n} unlabeled {inputs} inputs)")
    t.add_column("λ", justify="right")
    t.add_column("agreement with θ+Δθ", justify="right")
    t.add_column("KL(θ+Δθ ‖ θ'+λΔθ)", justify="right")
    for k in c.agreement:
        mark = " ←" if float(k) == c.scale else ""
        t.add_row(k + mark, f"{c.agreement[k]:.1%}", f"{c.kl[k]:.4f}")
    out.print(t)
    out.print(f"port with: portllm port {patch} --base {base} --scale {c.scale:g} --out DIR")
    out.print(
        "[dim]measured in docs/sweep at 2.3–4.5% drift: +5 to +8 points over the plain port on SST-2, no effect "
        "on CommonsenseQA; check it on your task before relying on it.[/dim]"
    )


@app.command("repair")
def repair_cmd(
    patch: Path = typer.Argument(..., help="patch directory (made on --from)"),
    base: str = typer.Option(..., "--base", help=f"the new base the patch should work on: {SPEC_HELP}"),
    old: str = typer.Option(..., "--from", help="the base the patch was made on (θ+Δθ is what the repair matches)"),
    out_dir: Path = typer.Option(..., "--out", help="where the repaired patch (a patch of --base) goes"),
    inputs: str = typer.Option(
        "self",
        "--inputs",
        help="unlabeled inputs: a task or task file (its train split), a .txt/.jsonl file (prompts only), or "
        "self / self:SEEDS (θ+Δθ writes them, from nothing or from a file's or task's prompts)",
    ),
    include: Optional[list[Path]] = INCLUDE_PATH,
    method: str = typer.Option("distill", "--method", help="distill, rescale (per layer type), none, or auto"),
    n: int = typer.Option(256, "--n", min=1, help="how many inputs (for self: how many samples θ+Δθ writes)"),
    steps: int = typer.Option(40, "--steps", min=0, help="distillation steps"),
    lr: float = typer.Option(1e-3, "--lr", help="distillation learning rate"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="inputs per step"),
    max_length: int = typer.Option(256, "--max-length", min=8, help="tokens per input, the context cut from the left"),
    flip_weight: float = typer.Option(
        1.0, "--flip-weight", min=0.0, help="extra weight of inputs θ+Δθ is sure of and the student gets wrong"
    ),
    gen_tokens: int = typer.Option(48, "--gen-tokens", min=1, help="θ+Δθ's continuation of each text prompt"),
    seed: int = typer.Option(0, "--seed", help="data order and self-generated inputs"),
    margin: float = typer.Option(1.0, "--margin", help="auto: predicted loss in points below which nothing is done"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="benchmark data (default $PORTLLM_DATA)"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option(
        "float32",
        "--dtype",
        help="the student's base weights while training (LoRA stays fp32): float32, bfloat16, auto",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Win back what a port loses where the base moved far, without labels: a patch of --base trained (or
    rescaled) so θ'+Δθ' answers as θ+Δθ did. Check it with `portllm eval` before relying on it."""
    from ..progress import Bar
    from ..repair import DistillConfig, repair

    dev = resolve_device(device)
    cfg = DistillConfig(steps, lr, batch_size, max_length, seed, flip_weight=flip_weight, gen_tokens=gen_tokens)
    with Bar(err.is_terminal and not as_json, max(1, steps), f"repair ({method})", loss="-") as bar:
        r = repair(
            patch, base, old, out_dir, inputs, method, n, cfg, data_dir,
            dtype=resolve_dtype(dtype, dev),
            device=dev, margin=margin, overwrite=overwrite,
            progress=lambda step, loss: bar.update(step, loss=f"{loss:.4f}"),
        )  # fmt: skip
    if as_json:
        print_json(r.to_dict())
        return
    t = Table(title=f"repair ({r.method}): {patch} -> {base}, {r.inputs.get('n', '-')} {r.inputs['source']} inputs")
    t.add_column("held-out inputs", justify="left")
    t.add_column("agreement with θ+Δθ", justify="right")
    t.add_column("KL(θ+Δθ ‖ ·)", justify="right")
    for label, a in (("plain port (θ'+Δθ)", r.before), ("repaired", r.after)):
        if a is not None:
            agree = "-" if a.agreement is None else f"{a.agreement:.1%}"
            t.add_row(f"{label}, n={a.n}", agree, f"{a.kl:.4f}")
    out.print(t)
    out.print(f"wrote {out_dir}: {r.steps} steps, {r.wall_s:.1f} s, peak RSS {r.peak_rss_mb:.0f} MB; {r.detail}")
    if r.warning:
        out.print(f"[yellow]warning: {escape(r.warning)}[/yellow]")
    out.print(
        "[dim]measure it on labelled data before relying on it: "
        + escape(f"portllm eval --model {base} --patch {out_dir} --tasks TASK")
        + "[/dim]"
    )
