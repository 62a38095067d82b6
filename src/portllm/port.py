"""The port itself: θ' + λ·Δθ, training-free, streamed tensor by tensor.

Two outputs. Merged (default): a standalone model directory that transformers loads, written
shard by shard and tensor by tensor, so peak memory is one tensor plus the patch, not the
model. Adapter (`as_adapter`): the same factors re-stamped for the new base, for runtime
attach by PEFT or vLLM.

The merged model behaves as PEFT's runtime attach of the patch does. On a base whose head is
tied to its input embedding (SmolLM2, Gemma), a patch that replaces or adapts one of the two
changes only that one at runtime (PEFT wraps one module; the other keeps the shared weight), so
the merged model is written untied: both tensors stored, `tie_word_embeddings` false.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .atomic import atomic_dir
from .check import FLOAT_DTYPES, CheckReport, check
from .errors import PortLLMError
from .models import BaseRef, content_sha256, copy_side_files, fingerprint, record_tensor_hashes, weight_files
from .patch import Patch, now
from .progress import Bar
from .resources import Usage, measure
from .sign import TrustedKey, Verification, load_patch, signature_record
from .stream import ShardWriter, read_header, read_tensor

PROVENANCE = "portllm_provenance.json"
ADDABLE = FLOAT_DTYPES  # dtypes ΔW can be added to; F8 and integers hold scaled (quantized) values


@dataclass
class PortResult:
    out: Path
    mode: str
    report: CheckReport
    applied: int = 0
    replaced: int = 0
    usage: Usage = field(default_factory=Usage)
    result_fingerprint: str | None = None
    result_content_sha256: str | None = None
    verification: Verification | None = None  # set when a signature was required

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "mode": self.mode,
            "verdict": self.report.verdict,
            "applied": self.applied,
            "replaced": self.replaced,
            "result_fingerprint": self.result_fingerprint,
            "result_content_sha256": self.result_content_sha256,
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
        # a quantized base cannot take ΔW into its values, whatever --force says; an adapter for it is fine
        errors = rep.blocking("attach" if as_adapter else "merge")
        if errors:
            # --force overrides identity/vocabulary errors, never a missing target or a quantized merge
            hard = rep.blocking("shapes") + [f for f in errors if f.topic == "quantization"]
            if not force:
                hint = "" if hard else "; pass --force to port anyway"
                rep.require("attach" if as_adapter else "merge", f"refusing to port {patch.path}", hint)
            if hard:
                raise PortLLMError(f"cannot port {patch.path} even with --force: {hard[0].topic}: {hard[0].detail}")
        target = rep.target_info
        event = {
            "event": "ported",
            "time": now(),
            "mode": "adapter" if as_adapter else "merged",
            "from": {"name": patch.source_name, "fingerprint": patch.source_fingerprint},
            "base": {"name": ref.name, "fingerprint": target.fingerprint},
            "scale": scale,
            "forced": bool(force and errors),
            "tool_version": __version__,
        }
        signed = signature_record(patch.path)  # the source's signature stays on record in the derived output
        if signed:
            event["signature"] = dict(signed, verified=verification is not None)
        if as_adapter:
            patch.restamped(target, event, scale).save(out, overwrite=overwrite)
            result = PortResult(Path(out), "adapter", rep, applied=len(patch.modules))
        else:
            result = _merge_streaming(patch, ref, Path(out), scale, overwrite, event, rep, progress)
    result.usage = usage
    result.verification = verification
    return result


def _merge_streaming(
    patch: Patch,
    ref: BaseRef,
    out: Path,
    scale: float,
    overwrite: bool,
    event: dict[str, Any],
    rep: CheckReport,
    progress: bool,
) -> PortResult:
    base_dir = ref.path
    by_weight = {m.weight_name: m for m in patch.modules.values()}
    full = patch.full_weights
    files = weight_files(base_dir)
    headers = [read_header(f) for f in files]
    for h in headers:  # before anything is written: never add ΔW to raw quantized values
        for info in h.tensors.values():
            if (info.name in by_weight or info.name in full) and info.dtype not in ADDABLE:
                raise PortLLMError(
                    f"cannot port onto {ref.name}: {info.name} is stored as {info.dtype} (quantized or integer "
                    "values, ΔW cannot be added to them); use an unquantized (bf16/fp32) base"
                )
    untie = _untie(patch, ref)
    emb, head = untie or (None, None)
    head_stored = head in ref.index
    total = sum(len(h.tensors) for h in headers) + (1 if untie and not head_stored else 0)
    result = PortResult(out, "merged", rep)
    bar = Bar(progress, total, "porting")

    def patched(name: str, w: torch.Tensor) -> torch.Tensor:
        if name in by_weight:
            result.applied += 1
            return (w.float() + by_weight[name].delta(scale)).to(w.dtype)
        if name in full:
            result.replaced += 1
            return full[name].to(w.dtype)
        return w

    with bar, atomic_dir(out, overwrite=overwrite) as tmp:
        copy_side_files(base_dir, tmp)
        if untie:
            _write_untied_config(ref, tmp)
        index_file = base_dir / "model.safetensors.index.json"
        if index_file.is_file():
            shutil.copy2(index_file, tmp / index_file.name)
        digests: dict[Path, dict[str, str]] = {}
        for f, h in zip(files, headers):
            infos = sorted(h.tensors.values(), key=lambda t: t.start)
            layout = [(t.name, t.dtype, t.shape) for t in infos]
            if untie and not head_stored and emb in h.tensors:  # the head gets its own tensor, after the embedding
                e = h.tensors[emb]
                layout.insert(layout.index((e.name, e.dtype, e.shape)) + 1, (head, e.dtype, e.shape))
                if index_file.is_file():
                    _add_to_index(tmp / index_file.name, head, f.name, e.nbytes)
            writer = ShardWriter(tmp / f.name, layout, h.metadata)
            sums = digests.setdefault(tmp / f.name, {})

            def write(name: str, w: torch.Tensor, writer: ShardWriter = writer, sums: dict[str, str] = sums) -> None:
                writer.write(name, w)
                sums[name] = hashlib.sha256(w.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
                bar.advance()

            try:
                with open(f, "rb") as fh:
                    fd = fh.fileno()
                    for info in infos:
                        w = read_tensor(info, f, fd)
                        if info.name == head and untie:  # stored, but tied: at runtime it is the embedding
                            w = _read(ref, emb)
                        write(info.name, patched(info.name, w))
                        if info.name == emb and untie and not head_stored:
                            write(head, patched(head, w))
                        del w
                writer.close()
            except BaseException:
                writer.abort()
                raise
        record_tensor_hashes(digests)  # hashed while written: the content hash below reads nothing
        result.result_fingerprint = fingerprint(tmp)
        result.result_content_sha256 = content_sha256(tmp)
        provenance = {
            "tool": "portllm",
            "tool_version": __version__,
            "base": rep.target_info.to_dict(),
            "patch": patch.manifest.to_dict() if patch.manifest else None,
            "patch_path": str(patch.path) if patch.path else None,
            "port": event,
            "result_fingerprint": result.result_fingerprint,
            "result_content_sha256": result.result_content_sha256,
        }
        if untie:
            provenance["untied"] = {"embedding": emb, "head": head}
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2))
    return result


def _untie(patch: Patch, ref: BaseRef) -> tuple[str, str] | None:
    """(embedding, head) when the base ties them and the patch changes either: the port must untie them."""
    if ref.tied is None:
        return None
    touched = {m.weight_name for m in patch.modules.values()} | set(patch.full_weights)
    if not touched & set(ref.tied):
        return None
    if not ref.arch.tie_key:
        raise PortLLMError(
            f"cannot port onto {ref.name}: the patch changes {sorted(touched & set(ref.tied))[0]}, which this "
            f"architecture ({ref.arch.model_type}) always ties, and the merged model cannot be untied"
        )
    return ref.tied


def _write_untied_config(ref: BaseRef, tmp: Path) -> None:
    cfg = dict(ref.config)
    cfg[ref.arch.tie_key] = False
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"] = dict(cfg["text_config"], **{ref.arch.tie_key: False})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))


def _add_to_index(index: Path, name: str, shard: str, nbytes: int) -> None:
    data = json.loads(index.read_text())
    data["weight_map"][name] = shard
    if isinstance(data.get("metadata"), dict) and "total_size" in data["metadata"]:
        data["metadata"]["total_size"] += nbytes
    index.write_text(json.dumps(data, indent=2))


def _read(ref: BaseRef, name: str) -> torch.Tensor:
    f, info = ref.index[name]
    return read_tensor(info, f)
