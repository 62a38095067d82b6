"""Trust: ML-DSA-65 key pairs, signing patches, verifying them."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import app, out, print_json


@app.command("keygen")
def keygen_cmd(
    prefix: Path = typer.Argument(..., help="writes PREFIX.key (private, mode 0600) and PREFIX.pub"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing key pair"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Make an ML-DSA-65 (FIPS 204) key pair for signing patches."""
    from ..sign import keygen

    kp = keygen(prefix, overwrite=overwrite)
    if as_json:
        print_json(kp.to_dict())
        return
    out.print(
        f"[green]key pair written[/green] {kp.private} (private: keep it secret) and {kp.public} (share it)  "
        f"fingerprint {kp.fingerprint}",
        highlight=False,
        soft_wrap=True,
    )


@app.command("sign")
def sign_cmd(
    patch_dir: Path = typer.Argument(..., help="patch directory"),
    key: Path = typer.Option(..., "--key", help="private key (PREFIX.key from `portllm keygen`)"),
    as_json: bool = typer.Option(False, "--json", help="print the signature record as JSON"),
) -> None:
    """Sign a patch: write PATCH/portllm.sig over its manifest (checksums of every file, lineage)."""
    from ..sign import SIGNATURE, sign_patch

    sig = sign_patch(patch_dir, key)
    if as_json:
        print_json(sig.to_dict())
        return
    out.print(
        f"[green]signed[/green] {patch_dir} ({sig.algorithm}, key {sig.key_fingerprint}) -> {patch_dir / SIGNATURE}",
        highlight=False,
        soft_wrap=True,
    )


@app.command("verify")
def verify_cmd(
    patch_dir: Path = typer.Argument(..., help="patch directory"),
    trust: list[Path] = typer.Option(..., "--trust", help="a trusted public key (PREFIX.pub); repeat for more"),
    as_json: bool = typer.Option(False, "--json", help="print the verdict as JSON"),
) -> None:
    """Is PATCH signed by a trusted key and unchanged since? Exit 0 valid, 2 invalid, unsigned or untrusted."""
    from ..sign import check_signature

    v = check_signature(patch_dir, trust)
    if as_json:
        print_json(v.to_dict())
    else:
        style = "green" if v.valid else "red"
        text = v.reason if v.valid else f"invalid: {v.reason}"
        out.print(f"[{style}]{text}[/{style}]", highlight=False, soft_wrap=True)
    raise typer.Exit(v.exit_code)
