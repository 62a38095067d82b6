"""Will this patch fit that base? A weight-level answer before any port.

PEFT loads an adapter onto any model whose module names match, silently. `check` compares
what the patch recorded about its source base with the target: architecture, every target
matrix and its shape, vocabulary, tokenizer and chat template; and, given the old base too,
how far each patched matrix moved and how much of that movement lies along the patch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import PortLLMError
from .models import BaseInfo, BaseRef, token_strings
from .patch import Patch, structural_problems
from .stream import Index, paired_tensors

__all__ = ["CheckReport", "Finding", "check", "drift_summary", "measure_drift", "structural_problems"]

LEVELS = ("ok", "info", "warn", "error")
GATE_MODES = ("attach", "merge", "shapes")
DRIFT_WARN = 1.0  # a matrix that moved by more than its own norm is a different model


@dataclass
class Finding:
    level: str
    topic: str
    detail: str


@dataclass
class CheckReport:
    patch: str
    base: str
    source_fingerprint: str | None
    target_fingerprint: str
    findings: list[Finding] = field(default_factory=list)
    drift: list[dict[str, Any]] = field(default_factory=list)
    target_info: BaseInfo = field(default_factory=BaseInfo)

    @property
    def verdict(self) -> str:
        levels = {f.level for f in self.findings}
        return "incompatible" if "error" in levels else "compatible with warnings" if "warn" in levels else "compatible"

    @property
    def exit_code(self) -> int:
        return {"compatible": 0, "compatible with warnings": 1, "incompatible": 2}[self.verdict]

    @property
    def shape_compatible(self) -> bool:
        return not self.blocking("shapes")

    def add(self, level: str, topic: str, detail: str) -> None:
        self.findings.append(Finding(level, topic, detail))

    def blocking(self, mode: str) -> list[Finding]:
        """The errors that stop `mode`: "attach" (B·A added beside the weights at run time: a quantized base is
        fine), "merge" (ΔW written into the weights) or "shapes" (only a missing or misshapen target blocks: what
        a forced port or a drift measurement still needs). The one gate port, eval, serve, the vLLM export,
        a patch set and a warm start all ask."""
        if mode not in GATE_MODES:
            raise ValueError(f"gate mode {mode!r}: use one of {', '.join(GATE_MODES)}")
        errors = [f for f in self.findings if f.level == "error"]
        if mode == "attach":
            return [f for f in errors if f.topic != "quantization"]
        if mode == "shapes":
            return [f for f in errors if f.topic in ("targets", "shapes")]
        return errors

    def require(self, mode: str, what: str, hint: str = "") -> None:
        """Raise one line, `what: topic: detail` + `hint`, when `blocking(mode)` holds anything."""
        errors = self.blocking(mode)
        if errors:
            raise PortLLMError(f"{what}: {errors[0].topic}: {errors[0].detail}{hint}")

    def warnings(self) -> list[str]:
        """The warn-level findings, one `topic: detail` line each."""
        return [f"{f.topic}: {f.detail}" for f in self.findings if f.level == "warn"]

    def first_error(self) -> str | None:
        return next((f"{f.topic}: {f.detail}" for f in self.findings if f.level == "error"), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "patch": self.patch,
            "base": self.base,
            "source_fingerprint": self.source_fingerprint,
            "target_fingerprint": self.target_fingerprint,
            "findings": [asdict(f) for f in self.findings],
            "drift": self.drift,
            "drift_summary": drift_summary(self.drift),
        }


def check(
    patch: Patch | str | Path, base: str | Path | BaseRef, old: str | Path | BaseRef | None = None
) -> CheckReport:
    """Compare a patch with a target base (and, with `old`, measure the drift under the patch)."""
    if not isinstance(patch, Patch):
        patch = Patch.load(patch)
    src = patch.source or BaseInfo()
    target = BaseRef.of(base)
    new = target.info
    rep = CheckReport(str(patch.path), target.name, src.fingerprint, new.fingerprint, target_info=new)

    # architecture
    if src.model_type and new.model_type and src.model_type != new.model_type:
        rep.add("error", "architecture", f"patch made on a {src.model_type} model, target is {new.model_type}")
    elif src.architecture and new.architecture and src.architecture != new.architecture:
        rep.add("warn", "architecture", f"class changed: {src.architecture} -> {new.architecture}")
    else:
        rep.add("ok", "architecture", f"{new.architecture or new.model_type}")
    for key in ("hidden_size", "num_layers"):
        a, b = getattr(src, key), getattr(new, key)
        if a is not None and b is not None and a != b:
            rep.add("info", "shape", f"{key} {a} -> {b}")
    _check_quantization(rep, patch, target)

    # targets
    index = target.index
    problems = structural_problems(patch, target.logical_index)  # a tied head is there, as the embedding
    for p in problems[:20]:
        rep.add("error", "targets", p)
    if len(problems) > 20:
        rep.add("error", "targets", f"... and {len(problems) - 20} more")
    if not problems:
        rep.add(
            "ok",
            "targets",
            f"all {len(patch.modules)} target matrices present with matching shapes"
            + (f", {len(patch.full_weights)} replaced tensors fit" if patch.full_weights else ""),
        )

    # identity
    if src.fingerprint == new.fingerprint:
        rep.add("info", "identity", "target is the very base this patch was made on")
    elif src.fingerprint:
        rep.add("info", "identity", f"base changed: {src.fingerprint} -> {new.fingerprint}")

    _check_vocab(rep, patch, src, target)
    from_ref = BaseRef.of(old) if old is not None else None
    _check_tokenizer(rep, src.tokenizer, new.tokenizer, from_ref, target.path)

    if from_ref is not None:
        old_fp = from_ref.fingerprint if src.fingerprint else None
        if old_fp and old_fp != src.fingerprint:
            rep.add(
                "warn", "identity", f"--from base {old_fp} is not the one the patch was made on ({src.fingerprint})"
            )
        if not problems:
            rep.drift = measure_drift(patch, from_ref.index, index)
            _judge_drift(rep)
    return rep


FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
QUANTIZED_DTYPES = ("I8", "U8", "F8_E4M3", "F8_E5M2")
QUANT_SUFFIXES = (  # tensors quantization schemes store beside (or instead of) a weight
    ".qweight",
    ".qzeros",
    ".scales",
    ".g_idx",
    ".weight_scale",
    ".weight_scale_inv",
    ".weight_zero_point",
    ".input_scale",
    ".SCB",
    ".weight.absmax",
    ".weight.quant_map",
)
DEQUANTIZE = (
    "portllm adds ΔW to full-precision weights: dequantize first (port onto the original bf16/fp32 checkpoint, "
    "or export a GGUF with `portllm export-base`)"
)


def _check_quantization(rep: CheckReport, patch: Patch, target: BaseRef) -> None:
    """A quantized base stores scaled integers or fp8 codes: adding ΔW to them (and copying their scales
    unchanged) writes a broken model, so it is an error, whatever --force says."""
    cfg = target.config
    q = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config")
    if q:
        method = q.get("quant_method", "quantized") if isinstance(q, dict) else "quantized"
        rep.add("error", "quantization", f"base is quantized ({method}, config.json quantization_config); {DEQUANTIZE}")
        return
    index = target.index
    for name in [m.weight_name for m in patch.modules.values()] + list(patch.full_weights):
        entry, module = index.get(name), name.removesuffix(".weight")
        if entry is not None and entry[1].dtype not in FLOAT_DTYPES:
            rep.add("error", "quantization", f"{name} is stored as {entry[1].dtype}; {DEQUANTIZE}")
            return
        side = next((module + s for s in QUANT_SUFFIXES if module + s in index), None)
        if side is not None:
            rep.add("error", "quantization", f"{module} is quantized ({side} beside it); {DEQUANTIZE}")
            return
    for name, (_, info) in sorted(index.items()):  # quantized layers the patch does not touch
        if name.endswith(QUANT_SUFFIXES) or (name.endswith(".weight") and info.dtype in QUANTIZED_DTYPES):
            rep.add("error", "quantization", f"{name} ({info.dtype}) marks a quantized checkpoint; {DEQUANTIZE}")
            return


def _check_vocab(rep: CheckReport, patch: Patch, src: BaseInfo, target: BaseRef) -> None:
    a, b = src.vocab_size, target.info.vocab_size
    if a is None or b is None or a == b:
        rep.add("ok", "vocabulary", f"{b} tokens")
        return
    touches = [n for n, t in patch.full_weights.items() if _follows_vocab(target, n, t.shape, a)]
    level = "error" if touches else "warn"
    rep.add(level, "vocabulary", f"vocab size {a} -> {b}" + (f"; the patch replaces {touches[0]}" if touches else ""))


def _follows_vocab(target: BaseRef, name: str, shape: tuple[int, ...], vocab: int) -> bool:
    """An embedding or head tensor, by the architecture table (by its shape where the architecture is unknown)."""
    try:
        return target.arch.is_vocab_tensor(name)
    except PortLLMError:
        return vocab in tuple(shape)


def _check_tokenizer(
    rep: CheckReport,
    old_tok: dict[str, Any] | None,
    new_tok: dict[str, Any] | None,
    old_ref: BaseRef | None,
    new_dir: Path,
) -> None:
    if not old_tok or not new_tok:
        rep.add(
            "info",
            "tokenizer",
            "not compared (no tokenizer recorded for " + ("the source" if not old_tok else "the target") + ")",
        )
        return
    if old_tok["sha256"] == new_tok["sha256"]:
        rep.add("ok", "tokenizer", f"same token strings ({new_tok['size']})")
    else:
        n = min(old_tok["size"], new_tok["size"])
        exact = _changed_tokens(old_ref.path, new_dir, n) if old_ref is not None else None
        if exact is not None:
            detail = f"{exact} of the first {n} token strings changed"
        else:
            blocks = sum(1 for x, y in zip(old_tok["blocks"], new_tok["blocks"]) if x != y)
            total = min(len(old_tok["blocks"]), len(new_tok["blocks"]))
            detail = f"token strings differ in {blocks} of {total} blocks of {old_tok['block_size']}"
        if old_tok["size"] != new_tok["size"]:
            detail += f"; size {old_tok['size']} -> {new_tok['size']}"
        rep.add("warn", "tokenizer", detail)
    changed = {
        k
        for k in set(old_tok["special_tokens"]) | set(new_tok["special_tokens"])
        if old_tok["special_tokens"].get(k) != new_tok["special_tokens"].get(k)
    }
    if changed:
        k = sorted(changed)[0]
        rep.add(
            "warn",
            "special tokens",
            f"{', '.join(sorted(changed))} changed (e.g. {k}: {old_tok['special_tokens'].get(k)!r} -> "
            f"{new_tok['special_tokens'].get(k)!r})",
        )
    if old_tok.get("chat_template_sha256") != new_tok.get("chat_template_sha256"):
        rep.add("warn", "chat template", "changed: prompts formatted for the old template may behave differently")


def _changed_tokens(old_dir: Path, new_dir: Path, n: int) -> int | None:
    from transformers import AutoTokenizer

    try:
        a = token_strings(AutoTokenizer.from_pretrained(old_dir))
        b = token_strings(AutoTokenizer.from_pretrained(new_dir))
    except Exception:
        return None
    return sum(1 for x, y in zip(a[:n], b[:n]) if x != y)


def measure_drift(patch: Patch, old_index: Index, new_index: Index) -> list[dict[str, Any]]:
    """Per patched matrix: how far the base moved, and how much of that move lies along the patch.

    rel_drift = ||W_new - W_old|| / ||W_old||; cos = <D, ΔW> / (||D|| ||ΔW||) with D = W_new - W_old;
    overlap = ||U_B^T D V_A|| / ||D||, the share of the drift inside the patch's rank-r subspace;
    patch_to_drift = ||ΔW|| / ||D||.
    """
    rows = []
    by_weight = {m.weight_name: m for m in patch.modules.values()}
    for name, w_old, w_new in paired_tensors(old_index, new_index, by_weight):
        m = by_weight[name]
        d = w_new - w_old
        dn, on = float(d.norm()), float(w_old.norm())
        delta = m.delta()
        pn = float(delta.norm())
        b, a = (m.B.float(), m.A.float()) if not m.fan_in_fan_out else (m.A.float().T, m.B.float().T)
        ub = torch.linalg.qr(b).Q
        va = torch.linalg.qr(a.T).Q
        inside = float((ub.T @ d @ va).norm())
        rows.append(
            {
                "module": m.name,
                "rel_drift": dn / on if on else math.inf,
                "cos": float((d * delta).sum()) / (dn * pn) if dn and pn else 0.0,
                "overlap": inside / dn if dn else 0.0,
                "patch_to_drift": pn / dn if dn else math.inf,
            }
        )
    return rows


def drift_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Means per layer type (q_proj, up_proj, ...)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["module"].rsplit(".", 1)[-1], []).append(r)
    return {
        k: {key: sum(r[key] for r in v) / len(v) for key in ("rel_drift", "cos", "overlap", "patch_to_drift")}
        | {"n": len(v)}
        for k, v in sorted(groups.items())
    }


def _judge_drift(rep: CheckReport) -> None:
    if not rep.drift:
        return
    big = [r for r in rep.drift if r["rel_drift"] > DRIFT_WARN]
    mean = sum(r["rel_drift"] for r in rep.drift) / len(rep.drift)
    if big:
        rep.add(
            "warn",
            "drift",
            f"{len(big)} patched matrices moved by more than {DRIFT_WARN:.0%} of their norm "
            f"(max {max(r['rel_drift'] for r in big):.2f} at {max(big, key=lambda r: r['rel_drift'])['module']})",
        )
    else:
        rep.add(
            "info",
            "drift",
            f"patched matrices moved {mean:.2%} on average "
            f"(max {max(r['rel_drift'] for r in rep.drift):.2%}); mean |cos| with the patch "
            f"{sum(abs(r['cos']) for r in rep.drift) / len(rep.drift):.3f}",
        )
