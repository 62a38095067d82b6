"""Evaluation: eval, compare, the task list. Scores come with Wilson intervals and the majority baseline;
comparisons are paired (see stats.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from ..device import DEVICE_HELP, DTYPE_HELP
from ..errors import PortLLMError
from ..routing.routers import PER_TOKEN, router_class, router_names
from ._app import INCLUDE_PATH, SPEC_HELP, app, err, log_line, out, print_json

VERDICT_STYLE = {"B better": "bold green", "B worse": "bold red", "inconclusive": "yellow"}

if TYPE_CHECKING:
    from ..eval import EvalResult


@app.command("eval")
def eval_cmd(
    model: str = typer.Option(..., "--model", help=f"base or ported model: {SPEC_HELP}"),
    tasks: str = typer.Option(
        "sst2,boolq,winogrande",
        "--tasks",
        help="comma-separated task names or task files (my/task.yaml), or 'paper' for the seven",
    ),
    include: Optional[list[Path]] = INCLUDE_PATH,
    patch: Optional[Path] = typer.Option(None, "--patch", help="attach this patch at runtime (PEFT)"),
    patches: Optional[str] = typer.Option(
        None, "--patches", help="comma-separated patches on this base, routed among per request (see --router)"
    ),
    router: Optional[str] = typer.Option(
        None, "--router", help=f"with --patches: {', '.join(router_names(PER_TOKEN))} (default glider)"
    ),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="with --router: patches mixed per token"),
    alpha: Optional[float] = typer.Option(
        None, "--alpha", min=0.0, help="with --router glider/mixture: weight of the description (global) bias"
    ),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="with --router: softmax temperature"),
    local: Optional[str] = typer.Option(None, "--local", help="with --router glider: phatgoose (default) or arrow"),
    threshold: Optional[float] = typer.Option(
        None, "--threshold", help="with --router mixture: cosine at or above which patches share a cluster"
    ),
    limit: Optional[int] = typer.Option(None, "--limit", help="the first N examples of each eval split"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="write results.json and samples_<task>.jsonl here"),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", help="benchmark data directory (default $PORTLLM_DATA)"
    ),
    batch_size: int = typer.Option(16, "--batch-size", help="at most this many rows per forward pass"),
    max_batch_tokens: Optional[int] = typer.Option(
        None, "--max-batch-tokens", min=1, help="at most this many padded tokens per forward pass (default 640 on CPU)"
    ),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads"),
    require_signature: bool = typer.Option(
        False, "--require-signature", help="refuse a patch not signed by a --trust key, or altered since"
    ),
    trust: Optional[list[Path]] = typer.Option(None, "--trust", help="a trusted public key (PREFIX.pub); repeatable"),
    as_json: bool = typer.Option(False, "--json", help="print results as JSON"),
) -> None:
    """Score a model (optionally with a patch, or several routed by --router) on the task suite."""
    from ..device import resolve_device, resolve_dtype
    from ..eval import evaluate, open_lm
    from ..tasks import parse_tasks

    if limit is not None and limit < 1:
        raise PortLLMError("--limit must be at least 1")
    resolve_dtype(dtype, resolve_device(device))  # an absent device fails here, before any model is read
    task_list = parse_tasks(tasks)
    from ..tasks import data_dir as resolve_data

    data = resolve_data(data_dir)
    if require_signature and not trust:
        raise PortLLMError("--require-signature needs at least one --trust KEY.pub")
    knobs = dict(top_k=top_k, alpha=alpha, temperature=temperature, local=local, threshold=threshold)
    if patches is None and (router is not None or any(v is not None for v in knobs.values())):
        raise PortLLMError("--router and its options need --patches P1,P2,...")
    if patches is not None:
        if patch is not None:
            raise PortLLMError("give --patch (one patch) or --patches (routed), not both")
        if resolve_device(device) != "cpu":
            raise PortLLMError(f"routed scoring (--patches) runs on the CPU only for now; drop --device {device}")
        dtype = resolve_dtype(dtype, "cpu")
        res = _eval_routed(
            model, patches, router or "glider", knobs, task_list, limit, data, out_dir, batch_size, max_batch_tokens,
            dtype, threads, require_signature, trust, not as_json and err.is_terminal,
        )  # fmt: skip
    else:
        lm = open_lm(
            model,
            patch,
            dtype=dtype,
            threads=threads,
            require_signature=require_signature,
            trusted=trust,
            device=device,
        )
        res = evaluate(
            lm,
            task_list,
            limit=limit,
            data=data,
            out=out_dir,
            batch_size=batch_size,
            show_progress=not as_json and err.is_terminal,
            max_tokens=max_batch_tokens,
        )
    if as_json:
        print_json(res.to_dict())
        return
    out.print(results_table(res))
    if out_dir:
        out.print(f"[dim]results: {out_dir / 'results.json'}[/dim]")


def _eval_routed(
    model,
    patches,
    router,
    knobs,
    task_list,
    limit,
    data,
    out_dir,
    batch_size,
    max_tokens,
    dtype,
    threads,
    req,
    trust,
    bar,
) -> EvalResult:
    """`eval --patches --router`: one copy of the base, the patches stacked, each request routed on its own."""
    import torch

    from ..routing import PatchSet, get_router
    from ..routing.score import evaluate_routed

    if threads:
        torch.set_num_threads(threads)
    paths = [Path(p) for p in patches.split(",") if p.strip()]
    if not paths:
        raise PortLLMError("--patches needs at least one patch directory")
    given = {k: v for k, v in knobs.items() if v is not None}
    takes = [k.name for k in router_class(router, PER_TOKEN).knobs]
    unused = sorted(set(given) - set(takes))
    if unused:  # said in the CLI's option names (get_router would say it in the knobs' own)
        raise PortLLMError(
            f"--router {router} takes no --{unused[0].replace('_', '-')}; its options: "
            + (", ".join(f"--{k.replace('_', '-')}" for k in takes) or "none")
        )
    r = get_router(router, **given)
    ps = PatchSet(model, paths, dtype=dtype, require_signature=req, trusted=trust)
    ps.data = data
    ps.log = log_line
    err.print(f"routing {len(paths)} patches: " + ", ".join(f"{k}={v}" for k, v in r.params().items()), highlight=False)
    return evaluate_routed(ps, r, task_list, limit, data, out_dir, batch_size, bar, max_tokens)


def _interval(lo: float | None, hi: float | None, spec: str = ".4f") -> str:
    return "-" if lo is None or hi is None else f"[{lo:{spec}}, {hi:{spec}}]"


def results_table(res: EvalResult) -> Table:
    """One row per task: the score with its Wilson 95% interval and the majority-class baseline it must beat."""
    title = f"{res.model}" + (f" + {res.patch}" if res.patch else "") + f" ({res.dtype})"
    t = Table(title=title, caption="95% CI: Wilson; majority: always answering the most frequent gold")
    for c in ("task", "metric", "value", "95% CI", "majority", "n", "time s", "tokens/s"):
        t.add_column(c, justify="right")
    for name, r in res.tasks.items():
        t.add_row(
            name,
            r.metric,
            f"{r.value:.4f}",
            _interval(r.ci_low, r.ci_high),
            "-" if r.majority is None else f"{r.majority:.4f}",
            str(r.n),
            f"{r.time_s:.1f}",
            f"{r.tokens_per_s:.0f}" if r.tokens_per_s else "-",
        )
    return t


@app.command("compare")
def compare_cmd(
    run_a: Path = typer.Argument(..., help="eval output directory A (e.g. before the update)"),
    run_b: Path = typer.Argument(..., help="eval output directory B (e.g. after)"),
    margin: float = typer.Option(
        0.01,
        "--margin",
        help="claim 'no difference' only if the whole 95% CI of B − A lies within ±margin (a fraction: 0.01 = 1 point)",
    ),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Accuracy, paired difference B − A (95% CI, McNemar p, verdict), agreement and flips, per task."""
    from ..eval import compare

    c = compare(run_a, run_b, margin)
    if as_json:
        print_json(c.to_dict())
        return
    t = Table(
        title=f"A = {run_a}   B = {run_b}",
        caption="Δ = acc B − acc A, 95% CI by paired bootstrap, exact McNemar p; "
        "neg flip: right in A, wrong in B; NFR: negative flip rate",
    )
    cols = ("task", "n", "acc A", "acc B", "Δ", "95% CI", "McNemar p", "verdict", "agree", "neg flips", "pos flips")
    for col in (*cols, "NFR"):
        t.add_column(col, justify="right")
    for name, f in c.tasks.items():
        if not f.n:
            t.add_row(name, "0", *["-"] * 10)
            continue
        t.add_row(
            name,
            str(f.n),
            f"{f.acc_a:.4f}",
            f"{f.acc_b:.4f}",
            f"{f.diff:+.4f}",
            _interval(f.ci_low, f.ci_high, "+.4f"),
            f"{f.mcnemar_p:.2g}",
            f"[{VERDICT_STYLE.get(f.verdict, 'bold')}]{f.verdict}[/]",
            f"{f.agreement:.4f}",
            f"[red]{f.negative_flips}[/red]",
            f"[green]{f.positive_flips}[/green]",
            f"{f.negative_flip_rate:.2%}",
        )
    out.print(t)
    if any(f.metrics for f in c.tasks.values()):
        out.print(metrics_table(c))


def metrics_table(c) -> Table:
    """Per task and generation metric both runs recorded: the means, B − A and its paired-bootstrap 95% CI."""
    t = Table(
        title="generation metrics, paired by example",
        caption="loglik: mean per-token log-likelihood of the reference (nats); exact_match: share of outputs "
        "equal to the reference; chrf: sentence chrF 0-100; 95% CI by paired bootstrap",
    )
    for col in ("task", "metric", "n", "A", "B", "Δ", "95% CI"):
        t.add_column(col, justify="right")
    for name, f in c.tasks.items():
        for m, d in f.metrics.items():
            t.add_row(
                name, m, str(d.n), f"{d.a:.4f}", f"{d.b:.4f}", f"{d.diff:+.4f}", _interval(d.ci_low, d.ci_high, "+.4f")
            )
    return t


@app.command("tasks")
def tasks_cmd(
    markdown: bool = typer.Option(False, "--markdown", help="print the README's task-suite table (Markdown)"),
    check: Optional[Path] = typer.Option(
        None, "--check", help="validate this task file (every row of both splits) and print three examples"
    ),
    include: Optional[list[Path]] = INCLUDE_PATH,
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", help="with --check: the data directory ${PORTLLM_DATA}/ paths use (default $PORTLLM_DATA)"
    ),
) -> None:
    """List the tasks (shipped, then yours from --include-path / $PORTLLM_TASKS_PATH), or --check a task file."""
    from ..tasks import PAPER_TASKS, TASKS, markdown_table, user_tasks

    if check is not None:
        _check_task_file(check, data_dir)
        return
    if markdown:
        typer.echo(markdown_table())
        return
    t = Table(title="tasks (* = the seven of the PortLLM paper)")
    for c in ("task", "kind", "metric", "train split", "eval split"):
        t.add_column(c)
    yours = {t.name: t for t in user_tasks().values()}
    for name, task in {**TASKS, **yours}.items():
        t.add_row(
            name + (" *" if name in PAPER_TASKS else "") + (f" ({task.source})" if name in yours else ""),
            task.kind,
            task.metric,
            task.train.note or task.train.file,
            task.eval.note or task.eval.file,
        )
    out.print(t)


def _check_task_file(path: Path, data_dir: Optional[Path]) -> None:
    from ..tasks import check_task_file, render_example

    c = check_task_file(path, data_dir)
    t = c.task
    out.print(
        f"[green]ok[/green] {path}: task {t.name!r} ({t.kind}, {t.metric}), "
        f"{c.n_train} train and {c.n_eval} eval examples; sha256 {t.sha256[:16]}",
        highlight=False,
    )
    for e in c.examples:
        out.print(f"\n[bold]eval example {e.idx}[/bold] (answer: {e.gold!r})", highlight=False)
        out.print(render_example(t, e), highlight=False, markup=False)
