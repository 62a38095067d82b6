"""Routing among patches: describe a patch for the global router, train PHATGOOSE gates, the routing study.
(`portllm eval --patches ... --router R` lives with eval in evaluation.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..device import DEVICE_HELP, DTYPE_HELP, resolve_device, resolve_dtype
from ..errors import PortLLMError
from ..models import cache_root
from ..routing import PatchSet, describe
from ..routing.phatgoose import GateConfig, gates_file, load_gates
from ..routing.routers import PER_TOKEN, router_names
from ..routing.study import DEFAULT_ROUTERS, StudyConfig, run_study
from ..tasks import data_dir as resolve_data
from ._app import INCLUDE_PATH, SPEC_HELP, app, err, log_line, out, print_json


@app.command("describe")
def describe_cmd(
    patch: Path = typer.Argument(..., help="patch directory"),
    text: Optional[str] = typer.Argument(None, help="what the patch does, in a sentence (default: its task's)"),
    task: Optional[str] = typer.Option(
        None, "--task", help="the patch's task (or task file), when its manifest records none"
    ),
    include: Optional[list[Path]] = INCLUDE_PATH,
    examples: int = typer.Option(
        0, "--examples", min=0, help="average this many of the task's train prompts into the embedding"
    ),
    generate: Optional[str] = typer.Option(
        None,
        "--generate-with",
        help=f"let this base write the description from 3 train inputs and their answers (no template): {SPEC_HELP}",
    ),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", help="benchmark data directory (default $PORTLLM_DATA)"
    ),
    device: str = typer.Option(
        "auto", "--device", help=f"where --generate-with's base runs: {DEVICE_HELP} (the small encoder: the CPU)"
    ),
    dtype: str = typer.Option("auto", "--dtype", help=f"--generate-with's base: {DTYPE_HELP}"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Store a task description (and its all-MiniLM-L6-v2 embedding) in a patch's manifest, for routing."""
    if text is not None and generate is not None:
        raise PortLLMError("give the description text or --generate-with BASE, not both")
    dev = resolve_device(device)  # an absent device fails here, before any model is read
    where = {"device": dev, "dtype": resolve_dtype(dtype, dev)}
    data = resolve_data(data_dir) if (text is None or examples) else None
    d = describe(patch, text, examples=examples, generate_with=generate, task=task, data=data, **where)
    if as_json:
        print_json(d.to_dict())
        return
    out.print(f"[green]described[/green] {patch}: {d.description!r} ({d.source}; {d.examples} train prompts embedded)")
    if d.was_signed:
        err.print(
            f"[yellow]note:[/yellow] {patch}/portllm.json changed, so its signature no longer verifies; "
            f"re-sign it: portllm sign {patch} --key KEY.key",
            highlight=False,
        )


@app.command("route-gates")
def gates_cmd(
    patches: list[Path] = typer.Argument(..., help="patch directories (one base)"),
    base: str = typer.Option(..., "--base", help=f"the base they share: {SPEC_HELP}"),
    steps: int = typer.Option(100, "--steps", min=1),
    lr: float = typer.Option(5e-3, "--lr"),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    max_length: int = typer.Option(128, "--max-length", min=8),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
    device: str = typer.Option("cpu", "--device", help=f"{DEVICE_HELP}; a patch set runs on the CPU only for now"),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
) -> None:
    """Train (and cache) each patch's PHATGOOSE gates on its own task's train data, base and patch frozen."""
    ps = PatchSet(base, patches, dtype=patch_set_dtype("route-gates", device, dtype))
    ps.gate_config = GateConfig(steps, batch_size, lr, max_length)
    ps.data = resolve_data(data_dir)
    load_gates(ps, log=log_line, progress=err.is_terminal)
    for i, e in enumerate(ps.experts):
        out.print(f"{e.name}: {gates_file(ps, i, ps.gate_config)}")


@app.command("route-study")
def study_cmd(
    base: str = typer.Option("smollm2-135m", "--base", help=f"the base: {SPEC_HELP}"),
    patches: str = typer.Option(..., "--patches", help="comma-separated patch directories: the held-in tasks"),
    held_out: str = typer.Option("", "--held-out", help="comma-separated tasks with no patch"),
    routers: Optional[str] = typer.Option(
        None,
        "--routers",
        help=f"comma-separated routers, of {', '.join(router_names(PER_TOKEN))} (default: {','.join(DEFAULT_ROUTERS)})",
    ),
    limit: int = typer.Option(200, "--limit", min=1, help="eval examples per task"),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="for every router that takes it"),
    alpha: Optional[float] = typer.Option(None, "--alpha", min=0.0, help="for every router that takes it"),
    merges: str = typer.Option("linear,ties,dare_ties", "--merges", help="merge methods tried for the best merge"),
    out_dir: Path = typer.Option(Path("docs/routing"), "--out"),
    cache: Optional[Path] = typer.Option(None, "--cache", help="results cache (default $PORTLLM_CACHE/routing/study)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    dev: int = typer.Option(
        100,
        "--dev",
        min=0,
        help="dev slice: this many eval examples per task after --limit; the best merge "
        "(and with --tune glider's top-k and α) is chosen on it, never on the test rows",
    ),
    tune: bool = typer.Option(False, "--tune", help="choose glider's top-k and α on the dev slice"),
    paraphrases: Optional[Path] = typer.Option(
        None, "--paraphrases", help="paraphrased prompt wordings per held-in task (default: the shipped file)"
    ),
    no_paraphrases: bool = typer.Option(False, "--no-paraphrases", help="score the original wording only"),
    descriptions: Optional[Path] = typer.Option(
        None, "--descriptions", help="folder of hand-written descriptions, <patch name>.txt (default: the manifests')"
    ),
    device: str = typer.Option("cpu", "--device", help=f"{DEVICE_HELP}; a patch set runs on the CPU only for now"),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
) -> None:
    """Held-in (mixed; original and paraphrased wordings) and held-out suites: each router against the oracle,
    the best merge (chosen on the dev slice) and the base."""
    if paraphrases and no_paraphrases:
        raise PortLLMError("give --paraphrases FILE or --no-paraphrases, not both")
    cfg = StudyConfig(
        base=base,
        patches=[p for p in patches.split(",") if p],
        held_out=[t for t in held_out.split(",") if t],
        routers=[r for r in routers.split(",") if r] if routers else list(DEFAULT_ROUTERS),
        limit=limit,
        top_k=top_k,
        alpha=alpha,
        merges=[m for m in merges.split(",") if m],
        batch_size=batch_size,
        dev=dev,
        tune=tune,
        paraphrases=not no_paraphrases,
        paraphrase_file=str(paraphrases) if paraphrases else None,
        descriptions=str(descriptions) if descriptions else None,
        dtype=patch_set_dtype("route-study", device, dtype),
    )
    rep = run_study(
        cfg,
        out_dir,
        cache or cache_root() / "routing" / "study",
        resolve_data(data_dir),
        log=log_line,
    )
    out.print((out_dir / "report.md").read_text())
    out.print(f"[dim]report: {out_dir / 'report.json'}; chart: {out_dir / rep['chart']}[/dim]")


def patch_set_dtype(command: str, device: str, dtype: str) -> str:
    """The dtype a patch set (PatchSet) is opened in; any device but the CPU is a one-line error, since a patch
    set is loaded onto the CPU (as `portllm eval --patches`), never a device that was asked for and ignored."""
    dev = resolve_device(device)  # an absent device: its own one-line error first
    if dev != "cpu":
        raise PortLLMError(f"{command} runs its patch set on the CPU only for now; drop --device {device} (or use cpu)")
    return resolve_dtype(dtype, dev)
