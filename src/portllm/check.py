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

from .models import base_info, resolve_base, token_strings, weight_index
from .patch import Patch
from .stream import TensorInfo, read_tensor

LEVELS = ("ok", "info", "warn", "error")
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
    target_info: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        levels = {f.level for f in self.findings}
        return "incompatible" if "error" in levels else "compatible with warnings" if "warn" in levels else "compatible"

    @property
    def exit_code(self) -> int:
        return {"compatible": 0, "compatible with warnings": 1, "incompatible": 2}[self.verdict]

    @property
    def shape_compatible(self) -> bool:
        return not any(f.level == "error" and f.topic in ("targets", "shapes") for f in self.findings)

    def add(self, level: str, topic: str, detail: str) -> None:
        self.findings.append(Finding(level, topic, detail))

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


def structural_problems(patch: Patch, index: dict[str, tuple[Path, TensorInfo]]) -> list[str]:
    """Target matrices the base lacks or has in another shape."""
    problems = []
    for m in patch.modules.values():
        if m.weight_name not in index:
            problems.append(f"target {m.weight_name} is absent from the base")
        elif tuple(index[m.weight_name][1].shape) != m.weight_shape:
            problems.append(
                f"{m.weight_name} is {tuple(index[m.weight_name][1].shape)} in the base but the patch expects "
                f"{m.weight_shape}"
            )
    for name, t in patch.full_weights.items():
        if name not in index:
            problems.append(f"replaced tensor {name} is absent from the base")
        elif tuple(index[name][1].shape) != tuple(t.shape):
            problems.append(
                f"{name} is {tuple(index[name][1].shape)} in the base but the patch replaces it with {tuple(t.shape)}"
            )
    return problems


def check(patch: Patch | str | Path, base: str | Path, old: str | Path | None = None) -> CheckReport:
    """Compare a patch with a target base (and, with `old`, measure the drift under the patch)."""
    if not isinstance(patch, Patch):
        patch = Patch.load(patch)
    src = patch.source
    new_dir = resolve_base(base)
    new = base_info(base)
    rep = CheckReport(str(patch.path), str(base), src.get("fingerprint"), new["fingerprint"], target_info=new)

    # architecture
    if src.get("model_type") and new["model_type"] and src["model_type"] != new["model_type"]:
        rep.add("error", "architecture", f"patch made on a {src['model_type']} model, target is {new['model_type']}")
    elif src.get("architecture") and new["architecture"] and src["architecture"] != new["architecture"]:
        rep.add("warn", "architecture", f"class changed: {src['architecture']} -> {new['architecture']}")
    else:
        rep.add("ok", "architecture", f"{new['architecture'] or new['model_type']}")
    for key in ("hidden_size", "num_layers"):
        if src.get(key) is not None and new[key] is not None and src[key] != new[key]:
            rep.add("info", "shape", f"{key} {src[key]} -> {new[key]}")

    # targets
    index = weight_index(new_dir)
    problems = structural_problems(patch, index)
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
    if src.get("fingerprint") == new["fingerprint"]:
        rep.add("info", "identity", "target is the very base this patch was made on")
    elif src.get("fingerprint"):
        rep.add("info", "identity", f"base changed: {src['fingerprint']} -> {new['fingerprint']}")

    _check_vocab(rep, patch, src, new)
    _check_tokenizer(rep, src.get("tokenizer"), new["tokenizer"], old, new_dir)

    if old is not None:
        old_dir = resolve_base(old)
        old_fp = base_info(old)["fingerprint"] if src.get("fingerprint") else None
        if old_fp and src.get("fingerprint") and old_fp != src["fingerprint"]:
            rep.add(
                "warn", "identity", f"--from base {old_fp} is not the one the patch was made on ({src['fingerprint']})"
            )
        if not problems:
            rep.drift = measure_drift(patch, weight_index(old_dir), index)
            _judge_drift(rep)
    return rep


def _check_vocab(rep: CheckReport, patch: Patch, src: dict[str, Any], new: dict[str, Any]) -> None:
    a, b = src.get("vocab_size"), new["vocab_size"]
    if a is None or b is None or a == b:
        rep.add("ok", "vocabulary", f"{b} tokens")
        return
    touches = [n for n in patch.full_weights if "embed" in n or "lm_head" in n]
    level = "error" if touches else "warn"
    rep.add(level, "vocabulary", f"vocab size {a} -> {b}" + (f"; the patch replaces {touches[0]}" if touches else ""))


def _check_tokenizer(
    rep: CheckReport,
    old_tok: dict[str, Any] | None,
    new_tok: dict[str, Any] | None,
    old_spec: str | Path | None,
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
        exact = _changed_tokens(old_spec, new_dir, n) if old_spec is not None else None
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


def _changed_tokens(old_spec: str | Path, new_dir: Path, n: int) -> int | None:
    from transformers import AutoTokenizer

    old_dir = resolve_base(old_spec)
    try:
        a = token_strings(AutoTokenizer.from_pretrained(old_dir))
        b = token_strings(AutoTokenizer.from_pretrained(new_dir))
    except Exception:
        return None
    return sum(1 for x, y in zip(a[:n], b[:n]) if x != y)


def measure_drift(
    patch: Patch, old_index: dict[str, tuple[Path, TensorInfo]], new_index: dict[str, tuple[Path, TensorInfo]]
) -> list[dict[str, Any]]:
    """Per patched matrix: how far the base moved, and how much of that move lies along the patch.

    rel_drift = ||W_new - W_old|| / ||W_old||; cos = <D, ΔW> / (||D|| ||ΔW||) with D = W_new - W_old;
    overlap = ||U_B^T D V_A|| / ||D||, the share of the drift inside the patch's rank-r subspace;
    patch_to_drift = ||ΔW|| / ||D||.
    """
    rows = []
    for m in patch.modules.values():
        if m.weight_name not in old_index:
            continue
        w_old = read_tensor(old_index[m.weight_name][1], old_index[m.weight_name][0]).float()
        w_new = read_tensor(new_index[m.weight_name][1], new_index[m.weight_name][0]).float()
        if w_old.shape != w_new.shape:
            continue
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
