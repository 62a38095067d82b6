"""Serving a patch set with vLLM: each patch checked, re-stamped for the base, and the exact command.

vLLM loads LoRA modules (`--enable-lora --lora-modules NAME=PATH`) but does not ask whether an
adapter was made for the base it serves: one made for another base loads silently and answers
like the base. Here every patch goes through `check` first (an incompatible one stops the export
before anything is written), and is written as `port --as-adapter` writes it: the same PEFT files,
re-stamped with the served base's identity, which is what vLLM reads as a LoRA module.

vLLM pins its own torch and transformers: install it in a virtualenv of its own and run the
printed command there (set PORTLLM_VLLM to its `vllm` executable for `portllm serve --engine vllm`).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PortLLMError

VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a patch name is also a directory name here


@dataclass
class VllmExport:
    """What `export_vllm` wrote and the command that serves it."""

    base: str  # the directory vLLM is given (a resolved local directory: no download on the serving side)
    served_name: str  # the base's model name for clients, as with `portllm serve`
    out: Path
    modules: dict[str, Path] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)
    max_rank: int = 0
    command: list[str] = field(default_factory=list)

    @property
    def shell(self) -> str:
        return shlex.join(self.command)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "served_name": self.served_name,
            "out": str(self.out),
            "modules": {k: str(v) for k, v in self.modules.items()},
            "warnings": self.warnings,
            "max_rank": self.max_rank,
            "command": self.command,
            "shell": self.shell,
        }


def vllm_command(
    base: str,
    modules: dict[str, Path],
    max_rank: int,
    served_name: str | None = None,
    host: str | None = None,
    port: int | None = None,
    executable: str = "vllm",
) -> list[str]:
    """`vllm serve BASE --enable-lora --lora-modules NAME=PATH ...`, sized for these modules: all of them
    in one batch (--max-loras) and a --max-lora-rank vLLM accepts that holds the largest rank."""
    rank = next((r for r in VLLM_RANKS if r >= max_rank), None)
    if rank is None:
        raise PortLLMError(f"a patch has rank {max_rank}; vLLM serves LoRA ranks up to {VLLM_RANKS[-1]}")
    cmd = [executable, "serve", base]
    if served_name:
        cmd += ["--served-model-name", served_name]
    if host:
        cmd += ["--host", host]
    if port:
        cmd += ["--port", str(port)]
    cmd += ["--enable-lora", "--max-loras", str(max(1, len(modules))), "--max-lora-rank", str(rank)]
    if modules:
        cmd += ["--lora-modules", *(f"{n}={p}" for n, p in modules.items())]
    return cmd


def export_vllm(
    base: str | Path,
    patches: dict[str, str | Path],
    out: str | Path,
    overwrite: bool = False,
    served_name: str | None = None,
    host: str | None = None,
    port: int | None = None,
    require_signature: bool = False,
    trusted: Iterable[Any] | None = None,
) -> VllmExport:
    """Check every patch against `base`, then write each as a vLLM LoRA module under OUT/NAME.

    Nothing is written unless every patch fits (warnings are kept and returned); each module is the
    `port(..., as_adapter=True)` output, so its lineage records the export."""
    from ..check import check
    from ..models import BaseRef
    from ..port import port
    from ..sign import load_patch

    if not patches:
        raise PortLLMError("no patches to export: give at least one NAME=PATH")
    for name in patches:
        if not NAME.match(name):
            raise PortLLMError(f"patch name {name!r}: use letters, digits, '.', '_' and '-' (it names a directory)")
    ref = BaseRef.of(base)
    out = Path(out).resolve()
    trusted = list(trusted or ())
    result = VllmExport(str(ref.path), served_name or str(base), out)
    ranks = []
    for name, path in patches.items():
        patch, _ = load_patch(path, require_signature, trusted)
        rep = check(patch, ref)
        rep.require("attach", f"refusing to export {name} ({path}): does not fit {base}")
        result.warnings[name] = rep.warnings()
        ranks += [m.rank for m in patch.modules.values()]
    taken = [name for name in patches if (out / name).exists()]
    if taken and not overwrite:
        raise PortLLMError(f"{out / taken[0]} exists; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    for name, path in patches.items():
        port(
            path,
            ref,
            out / name,
            as_adapter=True,
            overwrite=overwrite,
            require_signature=require_signature,
            trusted=trusted,
        )
        result.modules[name] = out / name
    result.max_rank = max(ranks, default=0)
    result.command = vllm_command(result.base, result.modules, result.max_rank, result.served_name, host, port)
    return result
