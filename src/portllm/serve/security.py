"""What a client of `portllm serve` may do: API keys, the runtime-loading policy, request limits, request ids.

The server is meant to be reachable from a network, so everything a client sends is hostile until checked:

- API keys: every path but `/health` needs `Authorization: Bearer <key>` once keys are set (`ApiKeyAuth`,
  an ASGI middleware, so unknown paths, /docs and /openapi.json are covered too and a refused client's body
  is never read). Each key is compared in constant time (hmac.compare_digest over SHA-256 digests, so not
  even a key's length leaks), against every key; keys are never logged, printed or repeated in an answer.
- Runtime loading (`/v1/load_lora_adapter`) is off unless allowed; then `lora_path` must resolve (symlinks
  and `..` followed, `Path.resolve(strict=True)`) to a directory inside one of the patch roots, and so must
  every file in it. A path outside the roots and a path that does not exist get the same 403, so a client
  cannot probe the server's disk. Names are `[A-Za-z0-9._-]{1,64}`; patches given at start-up cannot be
  unloaded by a client unless allowed.
- Limits: the body size (`BodyLimit`: 413 from Content-Length before anything is read, else counted chunk by
  chunk and stopped at the limit), prompt + max_tokens within the context (`check_context`), the 64-bit seed
  range (`SEED_MIN`..`SEED_MAX`, as vLLM's schema).
- Internals stay inside: a 5xx answer says "internal error (request id X)"; what happened is logged here
  with the same id (`internal_error`), and every answer carries its id in `x-request-id` (`RequestIds`).

The middlewares are plain ASGI (no FastAPI import here: the engine imports `check_context`).
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PortLLMError
from .errors import BadRequest, ContextTooLong, ServeError

log = logging.getLogger("portllm.serve")

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: a long prompt is ~100 KB of JSON
DEFAULT_MAX_PATCHES = 16
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # vLLM's seed range (int64); torch seeds take all of it
PATCH_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
OPEN_PATHS = frozenset({"/health"})  # reachable without a key (load balancers' probes)
REQUEST_ID_KEY = "portllm.request_id"  # where `RequestIds` puts the id in the ASGI scope
MAX_PATCH_FILES = 1000  # files looked at inside a runtime patch directory (a patch has a handful)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("portllm_request_id", default=None)


class Forbidden(ServeError):
    """The server's policy refuses this (runtime loading off, a path outside the roots, a start-up patch)."""

    status = 403
    kind = "permission_error"
    code = "forbidden"


# ---------------------------------------------------------------- keys and where the server listens


def parse_api_keys(given: Iterable[str] | None, env: str | None = None) -> tuple[str, ...]:
    """The keys the server accepts: `--api-key` values if any, else PORTLLM_API_KEY (comma-separated).
    A key with spaces or control characters cannot travel in a header: refused here, never echoed."""
    keys = [k for k in (given or []) if k is not None]
    if not keys and env:
        keys = [k.strip() for k in env.split(",") if k.strip()]
    for i, k in enumerate(keys):
        if not k or any(c.isspace() or not c.isprintable() or ord(c) > 126 for c in k):
            raise PortLLMError(
                f"API key #{i + 1} is empty or has spaces or non-ASCII characters; a Bearer token cannot carry them"
            )
    return tuple(dict.fromkeys(keys))


def is_loopback(host: str) -> bool:
    """Whether `host` only listens on this machine (a name counts when every address it resolves to does)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def exposure_warning(host: str, keys: tuple[str, ...], runtime_loading: bool) -> str | None:
    """The start-up warning for a server anyone on the network can use, else None."""
    if keys or is_loopback(host):
        return None
    what = "use it and load patches from the patch roots" if runtime_loading else "use it"
    return f"listening on {host} without --api-key: anyone who can reach the port can {what}"


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def key_matches(given: bytes, digests: Iterable[bytes]) -> bool:
    """Constant time in the key and its length: every key's digest is compared, whatever matched first."""
    mine = _digest(given)
    ok = False
    for d in digests:
        ok |= hmac.compare_digest(mine, d)
    return ok


# ---------------------------------------------------------------- the policy create_app is given


@dataclass(frozen=True)
class ServerSecurity:
    """Who may call the server and what a call may change; `create_app(engine, security)` enforces it.

    The default is the safe one: no keys (for a loopback server), runtime loading off, 1 MiB bodies."""

    api_keys: tuple[str, ...] = field(default=(), repr=False)  # never in a repr, a log or a traceback
    allow_runtime_loading: bool = False
    patch_roots: tuple[Path, ...] = ()
    allow_unload_startup_patches: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_keys", parse_api_keys(self.api_keys))
        if self.max_body_bytes < 1:
            raise PortLLMError(f"max_body_bytes must be at least 1, got {self.max_body_bytes}")
        roots = []
        for r in self.patch_roots:
            try:
                resolved = Path(r).expanduser().resolve(strict=True)
            except (OSError, RuntimeError):
                raise PortLLMError(f"--patch-root {r}: no such directory") from None
            if not resolved.is_dir():
                raise PortLLMError(f"--patch-root {r}: not a directory")
            roots.append(resolved)
        object.__setattr__(self, "patch_roots", tuple(dict.fromkeys(roots)))
        if self.allow_runtime_loading and not self.patch_roots:
            raise PortLLMError(
                "runtime loading needs at least one --patch-root DIR: the only directories clients may load from"
            )

    @property
    def key_digests(self) -> tuple[bytes, ...]:
        return tuple(_digest(k) for k in self.api_keys)

    def authorize_load(self, name: str, path: str) -> Path:
        """The resolved directory a client may load as patch `name`; Forbidden (403) or BadRequest (400) else."""
        if not self.allow_runtime_loading:
            raise Forbidden(
                "runtime loading is disabled on this server (start it with --allow-runtime-loading --patch-root DIR)"
            )
        check_patch_name(name)
        return resolve_patch_path(path, self.patch_roots)

    def authorize_unload(self, patch: Any) -> None:
        """Forbidden unless runtime loading is on and (for a patch given at start-up) unloading those is allowed.
        `patch`: the engine's LoadedPatch, or None when no such patch is loaded (the engine answers 404)."""
        if not self.allow_runtime_loading:
            raise Forbidden("runtime loading is disabled on this server (start it with --allow-runtime-loading)")
        if patch is not None and getattr(patch, "startup", False) and not self.allow_unload_startup_patches:
            raise Forbidden(
                f"patch {patch.name!r} was given at start-up and cannot be unloaded by a client "
                "(start the server with --allow-unload-startup-patches to allow it)",
                param="lora_name",
            )


def check_patch_name(name: str) -> None:
    """A client-given patch name: letters, digits, '.', '_', '-', 1 to 64 of them, not '.' or '..'."""
    if not isinstance(name, str) or not PATCH_NAME.fullmatch(name) or name in (".", ".."):
        raise BadRequest(
            "lora_name must be 1 to 64 letters, digits, '.', '_' or '-' (no path separators, not '.' or '..')",
            param="lora_name",
        )


PATH_REFUSED = (
    "lora_path is not a patch directory under this server's patch roots (paths are resolved on the server; "
    "a relative path is taken from each root in turn)"
)


def resolve_patch_path(path: str, roots: Iterable[Path]) -> Path:
    """`path` resolved (symlinks and `..` followed) to a directory inside one of `roots` (themselves resolved),
    with every file in it inside that root too. Outside, missing or unreadable all answer the same 403:
    which of them it was would tell a client what exists on the server's disk."""
    roots = tuple(roots)
    given = Path(path) if isinstance(path, str) and path and "\x00" not in path else None
    if given is None:
        raise Forbidden(PATH_REFUSED, param="lora_path")
    candidates = [given] if given.is_absolute() else [r / given for r in roots]
    for cand in candidates:
        try:
            resolved = cand.resolve(strict=True)
        except (OSError, RuntimeError, ValueError):  # missing, a symlink loop, a name the OS refuses
            continue
        root = next((r for r in roots if resolved.is_relative_to(r)), None)
        if root is not None and resolved.is_dir() and _inside(resolved, root):
            return resolved
    raise Forbidden(PATH_REFUSED, param="lora_path")


def _inside(directory: Path, root: Path) -> bool:
    """Every entry under `directory` resolves inside `root` (a symlinked weights file must not reach out)."""
    try:
        for n, entry in enumerate(directory.rglob("*")):
            if n >= MAX_PATCH_FILES or not entry.resolve(strict=True).is_relative_to(root):
                return False
    except (OSError, RuntimeError):
        return False
    return True


# ---------------------------------------------------------------- limits on what a request asks for


def check_context(prompt_len: int, max_tokens: int, context: int) -> None:
    """Prompt tokens + max_tokens must fit the model's context: ContextTooLong (400) naming all three numbers."""
    need = prompt_len + max_tokens
    if need > context:
        raise ContextTooLong(
            f"This model's maximum context length is {context} tokens. However, you requested {need} "
            f"tokens ({prompt_len} in the prompt, {max_tokens} for the completion). Please reduce "
            "the prompt or max_tokens.",
            param="max_tokens",
        )


# ---------------------------------------------------------------- request ids and internal errors


def request_id() -> str:
    """The current request's id (set by `RequestIds`), or a fresh one outside a request."""
    return _request_id.get() or new_request_id()


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def scope_request_id(scope: Scope) -> str:
    """The id `RequestIds` gave this request (handlers outside the middleware read it from the scope)."""
    return scope.get(REQUEST_ID_KEY) or request_id()


def internal_error(detail: str, rid: str | None = None, exc: BaseException | None = None) -> str:
    """Log what went wrong with the request's id; return what the client is told (the id, nothing else)."""
    rid = rid or request_id()
    log.error("request %s failed: %s", rid, detail, exc_info=exc)
    return f"internal error (request id {rid})"


# ---------------------------------------------------------------- ASGI middlewares


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers") or ():
        if k.lower() == name:
            return v
    return None


async def send_error(
    send: Send,
    status: int,
    message: str,
    kind: str,
    code: str | None = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """OpenAI's error object, sent straight from a middleware (before any route runs)."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class RequestIds:
    """Gives each request an id (the scope, a context variable) and sends it back in `x-request-id`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = new_request_id()
        scope[REQUEST_ID_KEY] = rid
        _request_id.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                message["headers"] = [*headers, (b"x-request-id", rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class ApiKeyAuth:
    """401 (OpenAI's `invalid_api_key`) for every path but `OPEN_PATHS` without a valid Bearer key."""

    def __init__(self, app: ASGIApp, digests: tuple[bytes, ...]) -> None:
        self.app = app
        self.digests = digests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.digests or scope.get("path") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        auth = _header(scope, b"authorization") or b""
        scheme, _, token = auth.partition(b" ")
        token = token.strip()
        if scheme.lower() == b"bearer" and token and key_matches(token, self.digests):
            return await self.app(scope, receive, send)
        what = "a wrong API key" if token else "no API key (send 'Authorization: Bearer <key>')"
        await send_error(
            send, 401, f"Incorrect API key provided: {what}.", "invalid_request_error", "invalid_api_key",
            [(b"www-authenticate", b"Bearer")],
        )  # fmt: skip


class BodyLimit:
    """413 for a body over `max_bytes`: from Content-Length before anything is read, else counted as it
    arrives and stopped at the limit (the app is then told the client went away; its answer is dropped)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, send: Send) -> Awaitable[None]:
        msg = f"The request body is larger than this server accepts ({self.max_bytes} bytes; --max-body-bytes)."
        return send_error(send, 413, msg, "invalid_request_error", "request_too_large", [(b"connection", b"close")])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            return await self._too_large(send)
        seen = 0
        state = {"started": False, "refused": False}

        async def counted() -> Message:
            nonlocal seen
            if state["refused"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    state["refused"] = True
                    if not state["started"]:
                        state["started"] = True
                        await self._too_large(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            if state["refused"]:
                return  # the 413 went out; whatever the app answers after that is dropped
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        await self.app(scope, counted, guarded)


def install(app: Any, security: ServerSecurity) -> None:
    """The middlewares on a Starlette/FastAPI app, outermost first: request ids, keys, body size (a refused
    client's body is never read)."""
    app.add_middleware(BodyLimit, max_bytes=security.max_body_bytes)
    app.add_middleware(ApiKeyAuth, digests=security.key_digests)
    app.add_middleware(RequestIds)  # added last: the outermost
