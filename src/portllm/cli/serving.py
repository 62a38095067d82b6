"""Serving: an OpenAI-compatible server over a base and its patches, or the same patch set for vLLM."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from ..device import DEVICE_HELP, DTYPE_HELP, DTYPES, resolve_device, resolve_dtype
from ..errors import PortLLMError
from ..routing.routers import PER_REQUEST, router_names
from ..serve.security import exposure_warning, parse_api_keys
from ._app import SPEC_HELP, app, out, print_json, say

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


def listen_socket(host: str, port: int) -> socket.socket:
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
        None,
        "--router",
        help=f"route requests for model 'auto', one patch per request: {' or '.join(router_names(PER_REQUEST))} "
        "(knobs after a colon: description:threshold=0.3)",
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="port to listen on (0: any free one)"),
    api_key: Optional[list[str]] = typer.Option(
        None,
        "--api-key",
        help="clients must send 'Authorization: Bearer KEY' (every path but /health); repeatable; default: "
        "PORTLLM_API_KEY (comma-separated)",
        show_default=False,
    ),
    allow_runtime_loading: bool = typer.Option(
        False, "--allow-runtime-loading", help="allow POST /v1/load_lora_adapter and unload (needs --patch-root)"
    ),
    patch_root: Optional[list[Path]] = typer.Option(
        None, "--patch-root", help="runtime loading: the only directories lora_path may lie in; repeatable"
    ),
    max_patches: Optional[int] = typer.Option(
        None, "--max-patches", min=1, help="patches held at once, start-up and runtime (default 16)"
    ),
    allow_unload_startup_patches: bool = typer.Option(
        False, "--allow-unload-startup-patches", help="let clients unload the --patch patches too"
    ),
    max_body_bytes: Optional[int] = typer.Option(
        None, "--max-body-bytes", min=1, help="larger request bodies get 413 (default 1 MiB)"
    ),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", min=1, help="requests in one forward pass (16)"),
    max_queue: Optional[int] = typer.Option(None, "--max-queue", min=1, help="waiting beyond this: 429 (64)"),
    request_timeout: Optional[float] = typer.Option(
        None, "--request-timeout", min=1, help="seconds a request may take: 504 (600)"
    ),
    served_name: Optional[str] = typer.Option(None, "--served-name", help="the base's model name (default: BASE)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads"),
    access_log: bool = typer.Option(False, "--access-log", help="log every HTTP request to stderr"),
    engine: str = typer.Option("portllm", "--engine", help="portllm (this process) or vllm (export, then run vLLM)"),
    vllm_dir: Path = typer.Option(Path("vllm-modules"), "--vllm-dir", help="--engine vllm: where the modules go"),
    max_lora_rank: Optional[int] = typer.Option(
        None, "--max-lora-rank", help="--engine vllm: vLLM's --max-lora-rank (default: the patches' largest)"
    ),
    require_signature: bool = typer.Option(
        False, "--require-signature", help="refuse a patch not signed by a --trust key, or altered since"
    ),
    trust: Optional[list[Path]] = typer.Option(None, "--trust", help="a trusted public key (PREFIX.pub); repeatable"),
) -> None:
    """Serve BASE and its patches behind OpenAI's API (/v1/completions, /v1/chat/completions, /v1/models)."""
    args = ServeArgs(**{k: v for k, v in locals().items() if k in ServeArgs.__dataclass_fields__})
    if require_signature and not trust:
        raise PortLLMError("--require-signature needs at least one --trust KEY.pub")
    if max_patches is not None and len(args.patches) > max_patches:
        raise PortLLMError(f"{len(args.patches)} patches given and --max-patches is {max_patches}; raise --max-patches")
    if engine == "vllm":
        _serve_vllm(args)
    elif engine == "portllm":
        _serve_portllm(args)
    else:
        raise PortLLMError(f"--engine {engine!r}: use portllm or vllm")


@dataclass(frozen=True)
class ServeArgs:
    """`portllm serve`'s options, as given (None: not given), handed to the engine that runs them."""

    base: str
    patch: Optional[list[str]]
    router: Optional[str]
    host: str
    port: int
    api_key: Optional[list[str]]
    allow_runtime_loading: bool
    patch_root: Optional[list[Path]]
    max_patches: Optional[int]
    allow_unload_startup_patches: bool
    max_body_bytes: Optional[int]
    device: str
    dtype: Optional[str]
    max_batch: Optional[int]
    max_queue: Optional[int]
    request_timeout: Optional[float]
    served_name: Optional[str]
    threads: Optional[int]
    access_log: bool
    vllm_dir: Path
    max_lora_rank: Optional[int]
    require_signature: bool
    trust: Optional[list[Path]]

    @property
    def patches(self) -> dict[str, Path]:
        return parse_patches(self.patch)

    @property
    def keys(self) -> tuple[str, ...]:
        return parse_api_keys(self.api_key, os.environ.get("PORTLLM_API_KEY"))


def _warn_exposure(a: ServeArgs) -> None:
    warning = exposure_warning(a.host, a.keys, a.allow_runtime_loading)
    if warning:
        say("warn", warning, "yellow")


def _serve_vllm(a: ServeArgs) -> None:
    """Export the patches and hand over to vLLM; an option vLLM has no equivalent for is refused by name."""
    given = {
        "--router": bool(a.router),
        "--max-queue": a.max_queue is not None,
        "--request-timeout": a.request_timeout is not None,
        "--threads": a.threads is not None,
        "--access-log": a.access_log,
        "--patch-root": bool(a.patch_root),
        "--allow-unload-startup-patches": a.allow_unload_startup_patches,
        "--max-body-bytes": a.max_body_bytes is not None,
        "--device": a.device != "auto",
        "--port 0": a.port == 0,  # any free port: vLLM would take its own default (8000) instead
    }  # portllm's own engine only: refused by name, never dropped
    if any(given.values()):
        names = ", ".join(flag for flag, on in given.items() if on)
        raise PortLLMError(f"--engine vllm has no equivalent for {names}: drop them or use --engine portllm")
    dtype = None if a.dtype is None else a.dtype.strip().lower()
    if dtype is not None and dtype not in DTYPES:  # vLLM's --dtype takes each of these by the same name
        raise PortLLMError(f"--dtype {a.dtype!r}: use {', '.join(DTYPES)}")
    _warn_exposure(a)
    if a.allow_runtime_loading:
        say("warn", "vLLM loads a runtime lora_path from anywhere its process can read (no --patch-root)", "yellow")
    run = VllmRun(a.base, a.patches, a.vllm_dir, a.served_name, a.host, a.port, a.require_signature, a.trust)
    _exec_vllm(run, a.keys, dtype, a.max_batch, a.max_patches, a.max_lora_rank, a.allow_runtime_loading)


def _serve_portllm(a: ServeArgs) -> None:
    """Load the base and patches into this process's engine and serve it with uvicorn."""
    if a.max_lora_rank is not None:
        raise PortLLMError("--max-lora-rank sizes vLLM's LoRA slots: use it with --engine vllm")
    if not a.allow_runtime_loading and (a.patch_root or a.allow_unload_startup_patches):
        raise PortLLMError("--patch-root and --allow-unload-startup-patches need --allow-runtime-loading")
    device = resolve_device(a.device)  # an absent GPU: one line now, before the model loads
    try:
        import uvicorn

        from ..serve import create_app
    except ImportError as e:
        raise PortLLMError(f"serving needs FastAPI and uvicorn: pip install 'portllm[serve]' ({e})") from None
    from ..serve import Engine, EngineConfig, router_factory
    from ..serve.security import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_PATCHES, ServerSecurity

    security = ServerSecurity(
        api_keys=a.keys,
        allow_runtime_loading=a.allow_runtime_loading,
        patch_roots=tuple(a.patch_root or ()),
        allow_unload_startup_patches=a.allow_unload_startup_patches,
        max_body_bytes=a.max_body_bytes or DEFAULT_MAX_BODY_BYTES,
    )  # before the model loads: a bad --patch-root is one line now
    make_router = router_factory(a.router) if a.router else None  # before the model loads: fail fast
    cfg = EngineConfig(
        max_batch=a.max_batch or 16,
        max_queue=a.max_queue or 64,
        request_timeout_s=a.request_timeout or 600.0,
        dtype=resolve_dtype(a.dtype or "auto", device),
        device=device,
        threads=a.threads,
        require_signature=a.require_signature,
        trusted=a.trust,
        max_patches=a.max_patches or DEFAULT_MAX_PATCHES,
    )
    patches = a.patches
    eng = _start_engine(Engine(a.base, {}, cfg, name=a.served_name or a.base), patches, make_router)
    if a.router and a.access_log:  # each routing decision (patch and scores) on stderr, with the access log
        rlog = logging.getLogger("portllm.routing.serving")
        rlog.setLevel(logging.INFO)
        rlog.addHandler(logging.StreamHandler(sys.stderr))
    _warn_exposure(a)
    sock = listen_socket(a.host, a.port)
    _announce(eng.name, a.host, sock.getsockname()[1], patches, a.router, cfg, security)
    config = uvicorn.Config(
        create_app(eng, security),
        log_level="info" if a.access_log else "warning",
        access_log=a.access_log,
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run(sockets=[sock])


def _start_engine(eng: Any, patches: dict[str, Path], make_router: Any) -> Any:
    """The engine with its router and its start-up patches (each checked, warnings printed)."""
    if make_router is not None:
        eng.router = make_router(eng)
    for name, path in patches.items():
        info = eng.load_patch(name, path, startup=True)
        for w in info.warnings:
            say("warn", f"{name}: {w}", "yellow")
    check = getattr(eng.router, "check", None)
    if check is not None and patches:  # none given: loaded at runtime (an `auto` request before that is a 400)
        check(eng)  # e.g. a patch the router cannot route to: one line now, not a 400 on every `auto` request
    return eng


def _announce(name: str, host: str, port: int, patches: dict, router: str | None, cfg, security) -> None:
    """The start-up line tests and users read the URL from; keys are counted, never shown."""
    shown = f"[{host}]" if ":" in host else host
    loading = "on" if security.allow_runtime_loading else "off"
    out.print(
        f"[green]serving[/green] {escape(name)} on http://{escape(shown)}:{port}/v1  "
        f"(patches: {escape(', '.join(patches) or 'none')}"
        + (f"; router: {escape(router)}" if router else "")
        + f"; max batch {cfg.max_batch}, queue {cfg.max_queue}; api keys: {len(security.api_keys)}; "
        f"runtime loading: {loading})",
        highlight=False,
        soft_wrap=True,
    )
    sys.stdout.flush()


@dataclass(frozen=True)
class VllmRun:
    """What `portllm serve --engine vllm` exports before it hands over to vLLM."""

    base: str
    patches: dict[str, Path]
    vllm_dir: Path
    served_name: Optional[str]
    host: str
    port: int
    require_signature: bool
    trust: Optional[list[Path]]


def _exec_vllm(
    run: VllmRun,
    keys: tuple[str, ...],
    dtype: Optional[str],
    max_batch: Optional[int],
    max_patches: Optional[int],
    max_lora_rank: Optional[int],
    runtime_loading: bool,
) -> None:
    from ..serve import export_vllm
    from ..serve.vllm import vllm_serve_options

    opts = vllm_serve_options(keys, dtype, max_batch, runtime_loading)
    res = export_vllm(
        run.base,
        run.patches,
        run.vllm_dir,
        overwrite=True,
        served_name=run.served_name,
        host=run.host,
        port=run.port,
        require_signature=run.require_signature,
        trusted=run.trust,
        max_loras=max_patches,
        max_lora_rank=max_lora_rank,
    )
    _report_export(res, opts)
    exe = os.environ.get("PORTLLM_VLLM", "vllm")
    found = shutil.which(exe)
    if found is None:
        raise PortLLMError(
            f"vLLM is not installed here ({exe} not found): run the command above where it is (vLLM pins its own "
            "torch and transformers: give it a virtualenv of its own and set PORTLLM_VLLM to its vllm)"
        )
    sys.stdout.flush()
    os.execve(found, [found, *res.command[1:], *opts.args], {**os.environ, **opts.env})


def _report_export(res, opts=None) -> None:
    """Warnings, the modules written, then the command (with `opts`: its extra arguments and environment, API
    keys hidden)."""
    for name, warnings in res.warnings.items():
        for w in warnings:
            say("warn", f"{name}: {w}", "yellow")
    for name, path in res.modules.items():
        out.print(f"[green]checked and written[/green] {escape(f'{name} -> {path}')}", highlight=False, soft_wrap=True)
    if opts is None:
        print(res.shell)
    else:
        print(" ".join(x for x in (opts.shown_env, shlex.join([*res.command, *opts.shown])) if x))


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
        print_json(res.to_dict())
        return
    _report_export(res)
