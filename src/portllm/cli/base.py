"""Base models: export, fingerprint."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import SPEC_HELP, app, out


@app.command("export-base")
def export_base_cmd(
    spec: str = typer.Argument(..., help=SPEC_HELP),
    out_dir: Path = typer.Argument(..., help="directory to write"),
    overwrite: bool = typer.Option(False, help="replace OUT_DIR if it exists"),
) -> None:
    """Write any base as a plain safetensors model directory (config + tokenizer)."""
    from ..models import export_base, fingerprint

    path = export_base(spec, out_dir, overwrite=overwrite)
    out.print(f"[green]exported[/green] {spec} -> {path}  ({fingerprint(path)})")


@app.command("fingerprint")
def fingerprint_cmd(spec: str = typer.Argument(..., help=SPEC_HELP)) -> None:
    """Print the content fingerprint of a base (identifies which base a patch was made on)."""
    from ..models import fingerprint

    print(fingerprint(spec))
