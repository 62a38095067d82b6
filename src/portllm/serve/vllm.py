"""Serving a patch set with vLLM: each patch checked, re-stamped for the base, and the exact command.

vLLM loads LoRA modules (`--enable-lora --lora-modules NAME=PATH`) but does not ask whether an
adapter was made for the base it serves: one made for another base loads silently and answers
like the base. Here every patch goes through `check` first (an incompatible one stops the export
before anything is written), and is written as `port --as-adapter` writes it: the same PEFT files,
re-stamped with the served base's identity, which is what vLLM reads as a LoRA module.

vLLM pins its own torch and transformers: install it in a virtualenv of its own and run the
printed command there (set PORTLLM_VLLM to its `vllm` executable for `portllm serve --engine vllm`).
`vllm_serve_options` maps the `portllm serve` options that have a vLLM equivalent (API keys, dtype, batch size,
runtime loading); `portllm serve` refuses the others by name rather than drop them.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..check import check
from ..errors import PortLLMError
from ..models import BaseRef
from ..port import port as port_patch  # not `port`: export_vllm's `port` is the server's TCP port
from ..sign import load_patch

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
    max_loras: int | None = None,
    max_lora_rank: int | None = None,
) -> list[str]:
    """`vllm serve BASE --enable-lora --lora-modules NAME=PATH ...`, sized for these modules: all of them
    in one batch (--max-loras; `max_loras` for more, e.g. patches loaded at runtime) and a --max-lora-rank
    vLLM accepts that holds the largest rank (`max_lora_rank` for a larger one)."""
    rank = next((r for r in VLLM_RANKS if r >= max_rank), None)
    if rank is None:
        raise PortLLMError(f"a patch has rank {max_rank}; vLLM serves LoRA ranks up to {VLLM_RANKS[-1]}")
    if max_lora_rank is not None:
        if max_lora_rank not in VLLM_RANKS or max_lora_rank < rank:
            raise PortLLMError(
                f"--max-lora-rank {max_lora_rank}: vLLM accepts {', '.join(map(str, VLLM_RANKS))}, and the patches "
                f"need at least {rank}"
            )
        rank = max_lora_rank
    if max_loras is not None and max_loras < len(modules):
        raise PortLLMError(f"--max-patches {max_loras} is fewer than the {len(modules)} patches given")
    cmd = [executable, "serve", base]
    if served_name:
        cmd += ["--served-model-name", served_name]
    if host:
        cmd += ["--host", host]
    if port:
        cmd += ["--port", str(port)]
    loras = max(1, len(modules)) if max_loras is None else max_loras
    cmd += ["--enable-lora", "--max-loras", str(loras), "--max-lora-rank", str(rank)]
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
    max_loras: int | None = None,
    max_lora_rank: int | None = None,
) -> VllmExport:
    """Check every patch against `base`, then write each as a vLLM LoRA module under OUT/NAME.

    Nothing is written unless every patch fits (warnings are kept and returned); each module is the
    `port(..., as_adapter=True)` output, so its lineage records the export."""
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
        port_patch(
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
    result.command = vllm_command(
        result.base, result.modules, result.max_rank, result.served_name, host, port, "vllm", max_loras, max_lora_rank
    )
    return result


HIDDEN = "<hidden>"  # what a printed command shows for an API key


@dataclass
class VllmServeOptions:
    """What `vllm serve` is given beside the export's command: more arguments and environment variables.
    `shown` is `args` with API keys hidden (what may be printed); keys travel in `env` where vLLM allows."""

    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict, repr=False)
    shown: list[str] = field(default_factory=list)

    @property
    def shown_env(self) -> str:
        """The environment as a printable prefix, API keys hidden."""
        return " ".join(f"{k}={HIDDEN if k == 'VLLM_API_KEY' else shlex.quote(v)}" for k, v in self.env.items())


def vllm_serve_options(
    api_keys: tuple[str, ...] = (),
    dtype: str | None = None,
    max_num_seqs: int | None = None,
    runtime_loading: bool = False,
) -> VllmServeOptions:
    """vLLM's spelling of `portllm serve`'s options: one key in VLLM_API_KEY (never on a command line
    another user can read), several as --api-key; --dtype; --max-batch as --max-num-seqs; runtime loading
    as VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (vLLM then loads a client's lora_path from anywhere it can read)."""
    opts = VllmServeOptions()
    if dtype:
        opts.args += ["--dtype", dtype]
    if max_num_seqs is not None:
        opts.args += ["--max-num-seqs", str(max_num_seqs)]
    opts.shown = list(opts.args)
    if len(api_keys) == 1:
        opts.env["VLLM_API_KEY"] = api_keys[0]
    elif api_keys:
        opts.args += ["--api-key", *api_keys]
        opts.shown += ["--api-key", *([HIDDEN] * len(api_keys))]
    if runtime_loading:
        opts.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return opts
