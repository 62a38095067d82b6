"""Serving: an OpenAI-compatible server over a base and its patches, or the same patch set for vLLM."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import PortLLMError
from ._app import SPEC_HELP, _json, app, err, out

PATCH_HELP = "NAME=PATH: serve the patch at PATH as model NAME; repeat for more"


def parse_patches(specs: list[str] | None) -> dict[str, Path]:
    """--patch NAME=PATH options as a name -> path map (names unique)."""
    found: dict[str, Path] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise PortLLMError(f"--patch {spec!r}: expected NAME=PATH (e.g. --patch sst2=patches/sst2)")
        if name in found:
            raise PortLLMError(f"--patch: the name {name!r} is given twice")
        found[name] = Path(path)
    return found


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a taken port is a one-line error and --port 0 picks a free one."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise PortLLMError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise PortLLMError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


@app.command("serve")
def serve_cmd(
    base: str = typer.Option(..., "--base", help=f"the base every patch is served on: {SPEC_HELP}"),
    patch: Optional[list[str]] = typer.Option(None, "--patch", help=PATCH_HELP),
    router: Optional[str] = typer.Option(
        None, "--router", help="route requests for model 'auto': glider (= global; glider:threshold=0.3) or arrow"
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="port to listen on (0: any free one)"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16"),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="at most this many requests in one forward pass"),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="requests waiting beyond this are refused (429)"),
    request_timeout: float = typer.Option(600.0, "--request-timeout", min=1, help="seconds a request may take (504)"),
    served_name: Optional[str] = typer.Option(None, "--served-name", help="the base's model name (default: BASE)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads"),
    runtime_loading: bool = typer.Option(
        True, "--runtime-loading/--no-runtime-loading", help="allow POST /v1/load_lora_adapter and unload"
    ),
    access_log: bool = typer.Option(False, "--access-log", help="log every HTTP request to stderr"),
    engine: str = typer.Option("portllm", "--engine", help="portllm (this process) or vllm (export, then run vLLM)"),
    vllm_dir: Path = typer.Option(Path("vllm-modules"), "--vllm-dir", help="--engine vllm: where the modules go"),
    require_signature: bool = typer.Option(
        False, "--require-signature", help="refuse a patch not signed by a --trust key, or altered since"
    ),
    trust: Optional[list[Path]] = typer.Option(None, "--trust", help="a trusted public key (PREFIX.pub); repeatable"),
) -> None:
    """Serve BASE and its patches behind OpenAI's API (/v1/completions, /v1/chat/completions, /v1/models)."""
    patches = parse_patches(patch)
    if require_signature and not trust:
        raise PortLLMError("--require-signature needs at least one --trust KEY.pub")
    if engine == "vllm":
        if router:
            raise PortLLMError("--router is served by portllm's own engine only; drop it with --engine vllm")
        _exec_vllm(base, patches, vllm_dir, served_name, host, port, require_signature, trust)
        return
    if engine != "portllm":
        raise PortLLMError(f"--engine {engine!r}: use portllm or vllm")
    try:
        import uvicorn

        from ..serve import create_app
    except ImportError as e:
        raise PortLLMError(f"serving needs FastAPI and uvicorn: pip install 'portllm[serve]' ({e})") from None
    from ..serve import Engine, EngineConfig, router_factory

    make_router = router_factory(router) if router else None  # before the model loads: fail fast
    cfg = EngineConfig(
        max_batch=max_batch,
        max_queue=max_queue,
        request_timeout_s=request_timeout,
        dtype=dtype,
        threads=threads,
        require_signature=require_signature,
        trusted=trust,
    )
    eng = Engine(base, {}, cfg, name=served_name or base)
    if make_router is not None:
        eng.router = make_router(eng)
    for name, path in patches.items():
        info = eng.load_patch(name, path)
        for w in info.warnings:
            err.print(f"[yellow]warn[/yellow] {name}: {w}", highlight=False, soft_wrap=True)
    check = getattr(eng.router, "check", None)
    if check is not None:
        check(eng)  # e.g. a patch the router cannot route to: one line now, not a 400 on every `auto` request
    if router and access_log:  # each routing decision (patch and scores) on stderr, with the access log
        import logging

        rlog = logging.getLogger("portllm.routing.serving")
        rlog.setLevel(logging.INFO)
        rlog.addHandler(logging.StreamHandler(sys.stderr))
    sock = _listen(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    names = ", ".join(patches) or "none"
    out.print(
        f"[green]serving[/green] {eng.name} on http://{shown}:{bound}/v1  (patches: {names}"
        + (f"; router: {router}" if router else "")
        + f"; max batch {max_batch}, queue {max_queue})",
        highlight=False,
        soft_wrap=True,
    )
    sys.stdout.flush()
    config = uvicorn.Config(
        create_app(eng, runtime_loading=runtime_loading),
        log_level="info" if access_log else "warning",
        access_log=access_log,
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run(sockets=[sock])


def _exec_vllm(
    base: str,
    patches: dict[str, Path],
    vllm_dir: Path,
    served_name: Optional[str],
    host: str,
    port: int,
    require_signature: bool,
    trust: Optional[list[Path]],
) -> None:
    from ..serve import export_vllm

    res = export_vllm(
        base,
        patches,
        vllm_dir,
        overwrite=True,
        served_name=served_name,
        host=host,
        port=port,
        require_signature=require_signature,
        trusted=trust,
    )
    _report_export(res)
    exe = os.environ.get("PORTLLM_VLLM", "vllm")
    found = shutil.which(exe)
    if found is None:
        raise PortLLMError(
            f"vLLM is not installed here ({exe} not found): run the command above where it is (vLLM pins its own "
            "torch and transformers: give it a virtualenv of its own and set PORTLLM_VLLM to its vllm)"
        )
    sys.stdout.flush()
    os.execv(found, [found, *res.command[1:]])


def _report_export(res) -> None:
    for name, warnings in res.warnings.items():
        for w in warnings:
            err.print(f"[yellow]warn[/yellow] {name}: {w}", highlight=False, soft_wrap=True)
    for name, path in res.modules.items():
        out.print(f"[green]checked and written[/green] {name} -> {path}", highlight=False, soft_wrap=True)
    print(res.shell)


@app.command("export-vllm")
def export_vllm_cmd(
    base: str = typer.Option(..., "--base", help=f"the base vLLM will serve: {SPEC_HELP}"),
    patch: Optional[list[str]] = typer.Option(None, "--patch", help=PATCH_HELP),
    out_dir: Path = typer.Option(..., "--out", help="directory to write one LoRA module per patch into"),
    served_name: Optional[str] = typer.Option(None, "--served-name", help="the base's model name (default: BASE)"),
    host: Optional[str] = typer.Option(None, "--host", help="put --host in the command"),
    port: Optional[int] = typer.Option(None, "--port", min=1, max=65535, help="put --port in the command"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace modules that exist"),
    require_signature: bool = typer.Option(
        False, "--require-signature", help="refuse a patch not signed by a --trust key, or altered since"
    ),
    trust: Optional[list[Path]] = typer.Option(None, "--trust", help="a trusted public key (PREFIX.pub); repeatable"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Check each patch against BASE, write it as a vLLM LoRA module, print the `vllm serve` command."""
    from ..serve import export_vllm

    if require_signature and not trust:
        raise PortLLMError("--require-signature needs at least one --trust KEY.pub")
    res = export_vllm(
        base,
        parse_patches(patch),
        out_dir,
        overwrite=overwrite,
        served_name=served_name,
        host=host,
        port=port,
        require_signature=require_signature,
        trusted=trust,
    )
    if as_json:
        _json(res.to_dict())
        return
    _report_export(res)
