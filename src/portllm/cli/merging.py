"""Patches from full fine-tunes, merging, similarity."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer
from rich.table import Table

from ..errors import PortLLMError
from ..merge.methods import DENSITY, GAMMA, METHODS, Param, methods_with
from ._app import SPEC_HELP, app, err, log_line, out, print_json

MethodName = Literal[tuple(METHODS)]  # --method's choices: whatever is registered
MERGE_HELP = "Merge patches into one patch (PEFT-loadable), on the full updates, re-factored by SVD.\n\n" + "\n\n".join(
    f"{n}: {cls.summary()}" for n, cls in METHODS.items()
)


def _param_help(p: Param) -> str:
    return f"{p.help} ({', '.join(methods_with(p.name))}; ignored by the others)"


@app.command("extract")
def extract_cmd(
    tuned: str = typer.Option(..., "--tuned", help=f"the fully fine-tuned model: {SPEC_HELP}"),
    base: str = typer.Option(..., "--base", help="the base it was fine-tuned from"),
    out_path: Path = typer.Option(..., "--out", help="patch directory to write"),
    rank: int = typer.Option(8, "--rank", help="rank of every layer (ignored with --energy)"),
    energy: Optional[float] = typer.Option(
        None, "--energy", help="per-layer rank: smallest keeping this share of Σσ², e.g. 0.9"
    ),
    embeddings: bool = typer.Option(
        False, "--embeddings", help="keep changed embedding/lm_head tensors whole (modules_to_save)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Turn a full fine-tune into a LoRA patch: SVD of W_tuned − W_base per linear layer."""
    from ..extract import extract

    r = extract(
        tuned,
        base,
        out_path,
        rank=None if energy else rank,
        energy=energy,
        include_embeddings=embeddings,
        overwrite=overwrite,
        progress=err.is_terminal,
    )
    if as_json:
        print_json(r.to_dict())
        return
    t = Table(title=f"extracted {out_path}: share of each layer's ||ΔW||_F kept")
    for c in ("module", "rank", "norm kept", "||ΔW||/||W||"):
        t.add_column(c, justify="right")
    for row in r.rows:
        t.add_row(row.module, str(row.rank or "full"), f"{row.kept:.2%}", f"{row.rel_change:.3%}")
    out.print(t)
    out.print(
        f"[green]patch written[/green] {out_path}: {r.layers} layers, ranks {r.ranks}, mean norm kept "
        f"{r.mean_norm_kept:.2%} (min {r.min_norm_kept:.2%})"
        + (f"; {len(r.skipped_1d)} changed 1-D tensors not represented" if r.skipped_1d else "")
    )


@app.command("merge", help=MERGE_HELP)
def merge_cmd(
    patches: list[Path] = typer.Argument(..., help="patch directories (same base)"),
    method: MethodName = typer.Option(
        "linear", "--method", help="merge method (listed above); normalize defaults as mergekit's"
    ),
    weights: Optional[str] = typer.Option(None, "--weights", help="comma-separated, one per patch (default all 1)"),
    density: float = typer.Option(DENSITY.default, "--density", help=_param_help(DENSITY)),
    lam: float = typer.Option(1.0, "--lambda", help="scale of the merged update"),
    gamma: float = typer.Option(GAMMA.default, "--gamma", help=_param_help(GAMMA)),
    rank: Optional[int] = typer.Option(None, "--rank", help="rank of the merged patch (default: largest input rank)"),
    seed: int = typer.Option(
        0, "--seed", help=f"seed of the random drop ({', '.join(n for n, c in METHODS.items() if c.random)})"
    ),
    normalize: Optional[bool] = typer.Option(
        None, "--normalize/--no-normalize", help="divide by the weights' sum (default: per method, as mergekit)"
    ),
    select: Optional[str] = typer.Option(None, "--select", help="'greedy': Model-GLUE selective merging"),
    task: Optional[str] = typer.Option(
        None, "--task", help="with --select: task(s) scoring each step, comma-separated"
    ),
    base: Optional[str] = typer.Option(
        None, "--base", help="with --select: base to score on (default: the patches' base)"
    ),
    select_limit: int = typer.Option(
        100, "--select-limit", help="held-out examples per task (from the train part's end)"
    ),
    order: str = typer.Option("score", "--order", help="with --select: score or similarity"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
    out_path: Path = typer.Option(..., "--out", help="patch directory to write"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    require_signature: bool = typer.Option(
        False, "--require-signature", help="refuse a patch not signed by a --trust key, or altered since"
    ),
    trust: Optional[list[Path]] = typer.Option(None, "--trust", help="a trusted public key (PREFIX.pub); repeatable"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Merge patches into one patch; the help text is MERGE_HELP (lists the registered methods)."""
    from ..merge import greedy_select, merge

    if require_signature and not trust:
        raise PortLLMError("--require-signature needs at least one --trust KEY.pub")
    ws = [float(w) for w in weights.split(",")] if weights else None
    kw = dict(density=density, lam=lam, rank=rank, seed=seed, gamma=gamma, normalize=normalize)
    if select:
        if select != "greedy" or not task:
            raise PortLLMError("selective merging needs --select greedy and --task T")
        from ..merge import heldout_scorer
        from ..sign import load_patch

        ps = [load_patch(p, require_signature, trust)[0] for p in patches]
        scorer = heldout_scorer(base or ps[0].source_name, task, select_limit, data_dir)
        merged, traj = greedy_select(ps, scorer, method, order=order, log=log_line, **kw)
        report = merged.extra["merge"] | {"selection": traj}
    else:
        merged, rep = merge(patches, method, ws, **kw, require_signature=require_signature, trusted=trust)
        report = rep.to_dict()
    merged.save(out_path, overwrite=overwrite)
    if as_json:
        print_json({k: v for k, v in report.items() if k != "energy_kept"} | {"out": str(out_path)})
        return
    out.print(
        f"[green]merged[/green] {len(report['inputs'])} patches with {report['method']} -> {out_path} (rank "
        f"{report['rank']}, "
        f"energy kept mean {report['energy_kept_mean']:.2%}, min {report['energy_kept_min']:.2%})"
    )


@app.command("similarity")
def similarity_cmd(
    patches: list[Path] = typer.Argument(..., help="patch directories"),
    threshold: float = typer.Option(0.3, "--threshold", help="cosine at or above which patches group together"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Cosine similarity of patches' updates, and the groups that look mergeable."""
    from ..merge import clusters, similarity
    from ..patch import Patch

    ps = [Patch.load(p) for p in patches]
    sim = similarity(ps)
    groups = clusters(sim, threshold)
    if as_json:
        print_json(
            {
                "patches": [str(p) for p in patches],
                "cosine": sim,
                "groups": [[str(patches[i]) for i in g] for g in groups],
            }
        )
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
