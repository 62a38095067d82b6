"""The port itself: θ' + λ·Δθ, training-free, streamed tensor by tensor.

Two outputs. Merged (default): a standalone model directory that transformers loads, written
shard by shard and tensor by tensor, so peak memory is one tensor plus the patch, not the
model. Adapter (`as_adapter`): the same factors re-stamped for the new base, for runtime
attach by PEFT or vLLM.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .atomic import atomic_dir
from .check import CheckReport, check
from .errors import PortLLMError
from .models import BaseRef, copy_side_files, fingerprint, weight_files
from .patch import Patch, now
from .progress import Bar
from .resources import Usage, measure
from .sign import TrustedKey, Verification, load_patch, signature_record
from .stream import ShardWriter, read_header, read_tensor

PROVENANCE = "portllm_provenance.json"


@dataclass
class PortResult:
    out: Path
    mode: str
    report: CheckReport
    applied: int = 0
    replaced: int = 0
    usage: Usage = field(default_factory=Usage)
    result_fingerprint: str | None = None
    verification: Verification | None = None  # set when a signature was required

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "mode": self.mode,
            "verdict": self.report.verdict,
            "applied": self.applied,
            "replaced": self.replaced,
            "result_fingerprint": self.result_fingerprint,
            "signature": self.verification.to_dict() if self.verification else None,
            **self.usage.to_dict(),
        }


def port(
    patch: Patch | str | Path,
    base: str | Path | BaseRef,
    out: str | Path,
    scale: float = 1.0,
    as_adapter: bool = False,
    force: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    require_signature: bool = False,
    trusted: Iterable[TrustedKey] | None = None,
) -> PortResult:
    """Carry `patch` onto `base`, writing `out` atomically; refuses incompatible patches unless forced.

    With `require_signature` (or `trusted` keys), a patch that is unsigned, altered since signing or signed
    by another key is refused before any tensor is read and before anything is written.
    """
    with measure() as usage:
        patch, verification = load_patch(patch, require_signature, trusted)
        ref = BaseRef.of(base)  # resolved once: check, the merge and the provenance share it
        rep = check(patch, ref)
        if rep.verdict == "incompatible":
            reason = rep.first_error()
            if not force:
                hint = "; pass --force to port anyway" if rep.shape_compatible else ""
                raise PortLLMError(f"refusing to port {patch.path}: {reason}{hint}")
            if not rep.shape_compatible:
                raise PortLLMError(f"cannot port {patch.path} even with --force: {reason}")
        target = rep.target_info
        event = {
            "event": "ported",
            "time": now(),
            "mode": "adapter" if as_adapter else "merged",
            "from": {"name": patch.source_name, "fingerprint": patch.source_fingerprint},
            "base": {"name": ref.name, "fingerprint": target.fingerprint},
            "scale": scale,
            "forced": bool(force and rep.verdict == "incompatible"),
            "tool_version": __version__,
        }
        signed = signature_record(patch.path)  # the source's signature stays on record in the derived output
        if signed:
            event["signature"] = dict(signed, verified=verification is not None)
        if as_adapter:
            patch.restamped(target, event, scale).save(out, overwrite=overwrite)
            result = PortResult(Path(out), "adapter", rep, applied=len(patch.modules))
        else:
            result = _merge_streaming(patch, ref.path, Path(out), scale, overwrite, event, rep, progress)
    result.usage = usage
    result.verification = verification
    return result


def _merge_streaming(
    patch: Patch,
    base_dir: Path,
    out: Path,
    scale: float,
    overwrite: bool,
    event: dict[str, Any],
    rep: CheckReport,
    progress: bool,
) -> PortResult:
    by_weight = {m.weight_name: m for m in patch.modules.values()}
    full = patch.full_weights
    files = weight_files(base_dir)
    headers = [read_header(f) for f in files]
    total = sum(len(h.tensors) for h in headers)
    result = PortResult(out, "merged", rep)
    bar = Bar(progress, total, "porting")
    with bar, atomic_dir(out, overwrite=overwrite) as tmp:
        copy_side_files(base_dir, tmp)
        if (base_dir / "model.safetensors.index.json").is_file():
            shutil.copy2(base_dir / "model.safetensors.index.json", tmp / "model.safetensors.index.json")
        for f, h in zip(files, headers):
            infos = sorted(h.tensors.values(), key=lambda t: t.start)
            writer = ShardWriter(tmp / f.name, [(t.name, t.dtype, t.shape) for t in infos], h.metadata)
            try:
                with open(f, "rb") as fh:
                    fd = fh.fileno()
                    for info in infos:
                        w = read_tensor(info, f, fd)
                        if info.name in by_weight:
                            w = (w.float() + by_weight[info.name].delta(scale)).to(w.dtype)
                            result.applied += 1
                        elif info.name in full:
                            w = full[info.name].to(w.dtype)
                            result.replaced += 1
                        writer.write(info.name, w)
                        del w
                        bar.advance()
                writer.close()
            except BaseException:
                writer.abort()
                raise
        result.result_fingerprint = fingerprint(tmp)
        provenance = {
            "tool": "portllm",
            "tool_version": __version__,
            "base": rep.target_info.to_dict(),
            "patch": patch.manifest.to_dict() if patch.manifest else None,
            "patch_path": str(patch.path) if patch.path else None,
            "port": event,
            "result_fingerprint": result.result_fingerprint,
        }
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2))
    return result
