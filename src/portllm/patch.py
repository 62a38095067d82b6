"""The portable patch: a PEFT LoRA adapter directory plus a provenance manifest.

A patch directory is loadable by PEFT as it stands (`adapter_config.json` +
`adapter_model.safetensors`); `portllm.json` adds what PEFT does not record: which base the
factors were learned on (by content fingerprint), the tokenizer it saw, file checksums, and
a lineage of every port, so a patch can be checked before it is applied to another base.
The manifest is typed (`Manifest`, with the source base as a `models.BaseInfo`) and keeps any
key it does not know, so files written by another portllm version load and save unchanged.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch

from . import __version__
from .atomic import atomic_dir
from .errors import PortLLMError
from .models import BaseInfo, BaseRef, sha256_file
from .stream import Index, read_header

MANIFEST = "portllm.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class LoraModule:
    """One adapted linear layer: ΔW = scaling · B · A (transposed for fan-in-fan-out layers)."""

    name: str
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scaling: float
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def weight_shape(self) -> tuple[int, int]:
        out, inp = self.B.shape[0], self.A.shape[1]
        return (inp, out) if self.fan_in_fan_out else (out, inp)

    def delta(self, scale: float = 1.0) -> torch.Tensor:
        d = (self.B.float() @ self.A.float()) * (self.scaling * scale)
        return d.T if self.fan_in_fan_out else d

    def add_to(self, w: torch.Tensor, scale: float = 1.0, rows: int = 64) -> torch.Tensor:
        """w + scale·ΔW, written into `w` itself and returned: fp32 sums, one rounding to w's dtype.

        The same values as `(w.float() + delta(scale)).to(w.dtype)`, computed `rows` rows at a time: ΔW is
        never formed whole and the fp32 copy is one block, so a port's memory traffic is w's own bytes
        (forming ΔW, adding and converting whole matrices made the merge several times slower than a copy).
        """
        if tuple(w.shape) != self.weight_shape:
            raise PortLLMError(f"{self.weight_name} is {tuple(w.shape)}; the patch expects {self.weight_shape}")
        a, b = self.A.float(), self.B.float()
        left, right = (a.T, b.T) if self.fan_in_fan_out else (b, a)  # ΔW = scaling · left @ right
        alpha = self.scaling * scale
        block = None if w.dtype == torch.float32 else torch.empty(min(rows, w.shape[0]), w.shape[1])
        for r0 in range(0, w.shape[0], rows):
            part = w[r0 : r0 + rows]
            if block is None:
                part.addmm_(left[r0 : r0 + rows], right, alpha=alpha)
            else:
                t = block[: part.shape[0]]
                t.copy_(part)
                t.addmm_(left[r0 : r0 + rows], right, alpha=alpha)
                part.copy_(t)
        return w

    def delta_norm(self) -> float:
        """||ΔW||_F from r×r Gram matrices, never forming ΔW."""
        a, b = self.A.double(), self.B.double()
        return abs(self.scaling) * math.sqrt(max(0.0, float(torch.trace((b.T @ b) @ (a @ a.T)))))


@dataclass
class Manifest:
    """`portllm.json`: what PEFT does not record about a patch (source base, checksums, lineage, records).

    `lora`, `lineage` entries and `extra` stay plain dicts: they are records, read by people and
    by the command that wrote them. `other` holds unknown top-level keys, written back as read.
    """

    base: BaseInfo = field(default_factory=BaseInfo)
    task: str | None = None
    lora: dict[str, Any] = field(default_factory=dict)
    lineage: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256, set by Patch.save
    format: str = "portllm-patch"
    format_version: int = FORMAT_VERSION
    tool_version: str = __version__
    created: str = field(default_factory=now)
    other: dict[str, Any] = field(default_factory=dict)

    _KEYS: ClassVar[tuple[str, ...]] = (
        "format",
        "format_version",
        "tool_version",
        "created",
        "task",
        "base",
        "lora",
        "lineage",
        "extra",
        "files",
    )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if not isinstance(d, dict):
            raise PortLLMError(f"manifest must be a JSON object, got {type(d).__name__}")
        known = {k: d[k] for k in cls._KEYS if k in d and d[k] is not None and k != "task"}
        known["base"] = BaseInfo.from_dict(d.get("base"))
        return cls(**known, task=d.get("task"), other={k: v for k, v in d.items() if k not in cls._KEYS})

    def to_dict(self) -> dict[str, Any]:
        """The JSON object on disk; `files` appears once the patch has been saved."""
        out = {k: getattr(self, k) for k in self._KEYS if k != "files" or self.files}
        out["base"] = self.base.to_dict()
        return out | self.other

    def copy(self) -> Manifest:
        """An independent copy (records included), for derived patches."""
        return copy.deepcopy(self)


def read_manifest(path: Path) -> Manifest:
    """Parse and vet `portllm.json`: refuse other formats and newer format versions with one line."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; RecursionError: nesting
        raise PortLLMError(f"{path}: not valid JSON ({_first_line(e)})") from None
    return parse_manifest(raw, path)


def parse_manifest(raw: Any, path: Path) -> Manifest:
    """Vet a manifest already read as JSON (signature checks read the file once and use the same bytes).

    Every field this version reads must have the type it writes: a hand-edited or hostile manifest is
    refused here, by name, rather than failing later inside `check`, `port` or `inspect`.
    """
    if not isinstance(raw, dict) or raw.get("format") != "portllm-patch":
        raise PortLLMError(f"{path}: not a portllm patch manifest")
    version = raw.get("format_version", 0)
    if not _is_int(version):
        raise PortLLMError(f"{path}: format_version {version!r:.40} is not an integer; re-create the patch")
    if version > FORMAT_VERSION:
        raise PortLLMError(
            f"{path.parent}: patch format {str(version)[:40]} is newer than this portllm; upgrade portllm"
        )
    problem = _manifest_problem(raw)
    if problem:
        raise PortLLMError(f"{path}: {problem}; restore the file or re-create the patch")
    return Manifest.from_dict(raw)


_BASE_TYPES: dict[str, type] = {
    "name": str,
    "fingerprint": str,
    "architecture": str,
    "model_type": str,
    "content_sha256": str,
    "hidden_size": int,
    "num_layers": int,
    "vocab_size": int,
    "tokenizer": dict,
}
_TOKENIZER_TYPES: dict[str, type] = {
    "size": int,
    "sha256": str,
    "block_size": int,
    "blocks": list,
    "special_tokens": dict,
}


def _manifest_problem(raw: dict[str, Any]) -> str | None:
    """The first field of a manifest whose type this version cannot work with, or None."""
    try:
        json.dumps(raw, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return "it holds text that is not valid Unicode (a lone surrogate escape)"
    for key, typ in (("tool_version", str), ("created", str), ("task", str), ("lora", dict), ("extra", dict)):
        if raw.get(key) is not None and not isinstance(raw[key], typ):
            return f"{key} must be a {typ.__name__}, found {type(raw[key]).__name__}"
        if typ is str and raw.get(key) is not None and not raw[key].isprintable():
            return f"{key} holds control characters"  # it is printed, by `inspect` and in messages
    files = {} if raw.get("files") is None else raw["files"]
    if not isinstance(files, dict):
        return f"files must map file names to sha256 digests, found {type(files).__name__}"
    for name, digest in files.items():
        if not name or name in (".", "..") or name != Path(name).name or "\\" in name or not name.isprintable():
            return f"files names {name!r:.60}, which is not a file inside the patch"
        if not isinstance(digest, str):
            return f"files gives {name!r:.60} a {type(digest).__name__}, not a sha256 digest"
    lineage = [] if raw.get("lineage") is None else raw["lineage"]
    if not isinstance(lineage, list) or not all(isinstance(e, dict) for e in lineage):
        return "lineage must be a list of records (JSON objects)"
    for e in lineage:
        for key, typ in (("event", str), ("time", str), ("base", dict), ("from", dict), ("signature", dict)):
            if key in e and not isinstance(e[key], typ):  # read as such by `inspect` when present
                return f"a lineage record's {key} must be a {typ.__name__}, found {type(e[key]).__name__}"
            if typ is str and key in e and not e[key].isprintable():
                return f"a lineage record's {key} holds control characters"
    base = raw.get("base")
    if base is None:
        return None
    if not isinstance(base, dict):
        return f"base must be a JSON object, found {type(base).__name__}"
    for key, typ in _BASE_TYPES.items():
        v = base.get(key)
        if v is not None and (not isinstance(v, typ) or (typ is int and not _is_int(v))):
            return f"base.{key} must be a {typ.__name__}, found {type(v).__name__}"
        if isinstance(v, str) and not v.isprintable():
            return f"base.{key} holds control characters"
    tok = base.get("tokenizer")
    if tok is not None:
        for key, typ in _TOKENIZER_TYPES.items():
            if not isinstance(tok.get(key), typ) or (typ is int and not _is_int(tok[key])):
                return f"base.tokenizer.{key} must be a {typ.__name__}, found {type(tok.get(key)).__name__}"
        if not all(isinstance(b, str) for b in tok["blocks"]):
            return "base.tokenizer.blocks must be a list of digests"
        if tok.get("chat_template_sha256") is not None and not isinstance(tok["chat_template_sha256"], str):
            return "base.tokenizer.chat_template_sha256 must be a string"
    return None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class Patch:
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    manifest: Manifest | None = None
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.manifest, dict):  # a manifest as read from JSON
            self.manifest = Manifest.from_dict(self.manifest)

    # ------------------------------------------------------------ reading

    @classmethod
    def load(cls, path: str | Path, verify: bool = True, require_manifest: bool = True) -> Patch:
        """Open a patch directory; with `verify`, refuse files whose sha256 differs from the manifest."""
        path = Path(path)
        if not path.is_dir():
            raise PortLLMError(f"patch {path} does not exist or is not a directory")
        manifest = None
        if (path / MANIFEST).is_file():
            manifest = read_manifest(path / MANIFEST)
        elif require_manifest:
            raise PortLLMError(
                f"{path} has no {MANIFEST}: it is a plain adapter; run `portllm import-adapter {path} --base "
                "BASE --out PATCH` first"
            )
        if verify and manifest:
            for name, digest in manifest.files.items():
                f = path / name
                if not f.is_file():
                    raise PortLLMError(f"patch {path}: {name} listed in {MANIFEST} is missing")
                if sha256_file(f) != digest:
                    raise PortLLMError(
                        f"patch {path}: {name} does not match its sha256 in {MANIFEST} (corrupt or edited); "
                        "re-create the patch"
                    )
        config, tensors = read_adapter(path)
        return cls(config, tensors, manifest, path)

    @cached_property
    def modules(self) -> dict[str, LoraModule]:
        """Adapted layers by module name relative to the causal LM (e.g. model.layers.0.mlp.up_proj)."""
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in self.tensors.items():
            m = _LORA_KEY.match(key)
            if m:
                parts.setdefault(m["module"], {})[m["ab"]] = t
        out = {}
        fifo = bool(self.config.get("fan_in_fan_out", False))
        for name in sorted(parts, key=natural_key):
            ab = parts[name]
            if set(ab) != {"A", "B"}:
                raise PortLLMError(f"patch: module {name} has lora_{'A' if 'A' in ab else 'B'} but not its partner")
            A, B = ab["A"], ab["B"]
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
                raise PortLLMError(
                    f"patch: module {name} has mismatched LoRA factor shapes A{tuple(A.shape)} B{tuple(B.shape)}"
                )
            for part, t in (("A", A), ("B", B)):  # a NaN here would be merged into every weight it touches
                if not t.is_floating_point():
                    raise PortLLMError(f"patch: module {name} stores lora_{part} as {t.dtype}, not floating point")
                if not bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all()):
                    raise PortLLMError(
                        f"patch: module {name} has NaN or infinite values in lora_{part} (diverged training?); "
                        "re-create the patch"
                    )
            out[name] = LoraModule(name, A, B, self._scaling(name, A.shape[0]), fifo)
        return out

    @cached_property
    def full_weights(self) -> dict[str, torch.Tensor]:
        """Whole replacement tensors (PEFT modules_to_save), keyed by base weight name."""
        return {k: v for k, v in self.tensors.items() if not _LORA_KEY.match(k)}

    @cached_property
    def peft_config(self) -> Any:
        """adapter_config.json as PEFT itself reads it (its defaults, its checks): the scaling is then PEFT's."""
        import warnings

        from peft import LoraConfig

        kwargs = {k: v for k, v in self.config.items() if k != "runtime_config"}  # as PEFT's from_json_file
        with warnings.catch_warnings():  # unknown keys from a newer PEFT: dropped with a warning, as PEFT does
            warnings.simplefilter("ignore")
            try:
                return LoraConfig.from_peft_type(**LoraConfig.check_kwargs(**kwargs))
            except Exception as e:  # PEFT's own checks raise several kinds on a malformed config
                raise PortLLMError(f"{ADAPTER_CONFIG}: PEFT rejects it ({_first_line(e)})") from None

    def _scaling(self, name: str, r: int) -> float:
        """PEFT's own rule: the first rank/alpha pattern key matching the module, resolved by PEFT's helper.

        With no pattern and r, lora_alpha given there is nothing to resolve, and importing PEFT (seconds)
        would be most of a small port's time: then r and lora_alpha are used as they stand.
        """
        cfg = self.config
        for key in ("rank_pattern", "alpha_pattern"):
            if cfg.get(key) is not None and not isinstance(cfg[key], dict):
                raise PortLLMError(
                    f"{ADAPTER_CONFIG}: {key} must map module patterns to numbers, found {type(cfg[key]).__name__}"
                )
        if not cfg.get("rank_pattern") and not cfg.get("alpha_pattern") and "r" in cfg and "lora_alpha" in cfg:
            rank, alpha, rslora = cfg["r"], cfg["lora_alpha"], bool(cfg.get("use_rslora"))
        else:
            from peft.utils.other import get_pattern_key

            c = self.peft_config
            ranks, alphas = c.rank_pattern or {}, c.alpha_pattern or {}
            try:
                rank = ranks.get(get_pattern_key(ranks.keys(), name), c.r)
                alpha = alphas.get(get_pattern_key(alphas.keys(), name), c.lora_alpha)
            except (re.error, TypeError, AttributeError) as e:
                raise PortLLMError(
                    f"{ADAPTER_CONFIG}: a rank_pattern/alpha_pattern key is not a usable pattern ({_first_line(e)})"
                ) from None
            rslora = c.use_rslora
        if rank != r:
            raise PortLLMError(
                f"patch: module {name} has rank {r} but {ADAPTER_CONFIG} gives {rank!r:.60} (r / rank_pattern); "
                "PEFT would not load it"
            )
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise PortLLMError(f"patch: module {name} has rank {rank!r:.60}; a LoRA rank is a positive integer")
        if not _finite(alpha):
            raise PortLLMError(
                f"{ADAPTER_CONFIG}: lora_alpha {alpha!r:.60} (for {name}) is not a finite number; fix lora_alpha / "
                "alpha_pattern"
            )
        return alpha / math.sqrt(rank) if rslora else alpha / rank

    @property
    def n_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    @property
    def source(self) -> BaseInfo | None:
        """The base the factors were learned on (None for a plain adapter)."""
        return self.manifest.base if self.manifest else None

    @property
    def source_fingerprint(self) -> str | None:
        """Fingerprint of the base the factors were learned on (None for a plain adapter)."""
        return self.manifest.base.fingerprint if self.manifest else None

    @property
    def source_name(self) -> str | None:
        return self.manifest.base.name if self.manifest else None

    @property
    def task(self) -> str | None:
        return self.manifest.task if self.manifest else None

    @property
    def extra(self) -> dict[str, Any]:
        """Tool-specific records in the manifest (training, merge, selection, ...); a live dict."""
        if self.manifest is None:
            self.manifest = Manifest()
        return self.manifest.extra

    @property
    def weights_sha256(self) -> str | None:
        """sha256 of adapter_model.safetensors as recorded in the manifest (None before the first save)."""
        return self.manifest.files.get(ADAPTER_WEIGHTS) if self.manifest else None

    # ------------------------------------------------------------ writing

    def save(self, out: str | Path, overwrite: bool = False) -> Patch:
        """Write the patch atomically, with checksums of every file in the manifest.

        Returns the saved patch (its path set, its manifest checksummed); `self` is left as it
        was, so a caller may save one patch to several places or keep using it unsaved.
        """
        from safetensors.torch import save_file

        manifest = self.manifest.copy() if self.manifest else Manifest()
        with atomic_dir(out, overwrite=overwrite) as tmp:
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(self.config, indent=2, sort_keys=True))
            save_file(
                {k: v.contiguous() for k, v in peft_state_dict(self.tensors).items()},
                str(tmp / ADAPTER_WEIGHTS),
                metadata={"format": "pt"},
            )
            manifest.files = {n: sha256_file(tmp / n) for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
            (tmp / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2))
        return replace(self, manifest=manifest, path=Path(out))

    def restamped(self, base: BaseInfo | dict[str, Any], event: dict[str, Any], scale: float = 1.0) -> Patch:
        """The same factors declared for another base, with a lineage entry (and B scaled by `scale`)."""
        base = BaseInfo.from_dict(base)
        tensors = dict(self.tensors)
        if scale != 1.0:
            tensors = {k: (v * scale if ".lora_B" in k else v) for k, v in tensors.items()}
        manifest = self.manifest.copy() if self.manifest else Manifest()
        manifest.base = base
        manifest.lineage.append(event)
        manifest.tool_version = __version__
        manifest.files = {}
        config = dict(self.config, base_model_name_or_path=base.name)
        return Patch(config, tensors, manifest)


def structural_problems(patch: Patch, index: Index) -> list[str]:
    """Target matrices the base lacks or has in another shape (shared by `check` and `import_adapter`)."""
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


def read_adapter(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a PEFT LoRA adapter directory (safetensors only) into config + tensors without PEFT's prefix."""
    cfg_file, wfile = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_file.is_file():
        raise PortLLMError(f"{path} has no {ADAPTER_CONFIG}: not a PEFT adapter or portllm patch")
    if not wfile.is_file():
        if (path / "adapter_model.bin").is_file():
            raise PortLLMError(
                f"{path} holds adapter_model.bin (pickle); portllm never unpickles files: re-save the adapter "
                "with safetensors"
            )
        raise PortLLMError(f"{path} has no {ADAPTER_WEIGHTS}")
    try:
        config = json.loads(cfg_file.read_text())
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; RecursionError: absurd nesting
        raise PortLLMError(f"{cfg_file}: not valid JSON ({_first_line(e)})") from None
    if not isinstance(config, dict):
        raise PortLLMError(f"{cfg_file}: expected a JSON object (PEFT's LoraConfig), found {type(config).__name__}")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise PortLLMError(f"{path}: PEFT type {config.get('peft_type')!r:.40} is not LoRA; only LoRA is supported")
    if config.get("use_dora"):
        raise PortLLMError(
            f"{path}: DoRA adapters are not supported (their magnitude vector depends on the base weights)"
        )
    read_header(wfile)  # one-line error on a corrupt file
    from safetensors.torch import load_file

    try:
        raw = load_file(str(wfile))
    except Exception as e:
        raise PortLLMError(f"{wfile}: cannot read ({str(e)[:120]})") from None
    tensors = {}
    for key, t in raw.items():
        k = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        if ".lora_embedding_" in k or ".lora_magnitude" in k or k.endswith(".lora_B.bias"):
            raise PortLLMError(f"{wfile}: {key} is not supported (only LoRA on linear layers, plus modules_to_save)")
        tensors[k] = t
    if not any(_LORA_KEY.match(k) for k in tensors):
        raise PortLLMError(f"{wfile}: no LoRA factors found")
    return config, tensors


def peft_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {PEFT_PREFIX + k: v for k, v in tensors.items()}


def new_manifest(
    base: BaseInfo | dict[str, Any],
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    event: str,
    task: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """A fresh manifest for factors made on `base`."""
    base = BaseInfo.from_dict(base)
    mods = sorted({m["module"].rsplit(".", 1)[-1] for k in tensors if (m := _LORA_KEY.match(k))})
    ranks = sorted({t.shape[0] for k, t in tensors.items() if ".lora_A" in k})
    return Manifest(
        task=task,
        base=base,
        lora={
            "target_modules": mods,
            "rank": ranks[0] if len(ranks) == 1 else ranks,
            "alpha": config.get("lora_alpha"),
            "use_rslora": bool(config.get("use_rslora")),
            "n_params": sum(t.numel() for t in tensors.values()),
        },
        lineage=[{"event": event, "time": now(), "base": base.brief()}],
        extra=extra or {},
    )


def import_adapter(
    adapter_dir: str | Path,
    base: str | Path | BaseRef,
    out: str | Path,
    task: str | None = None,
    overwrite: bool = False,
) -> Patch:
    """Turn any PEFT LoRA adapter into a patch stamped with the base it was trained on; returns the saved patch."""
    adapter_dir = Path(adapter_dir)
    config, tensors = read_adapter(adapter_dir)
    ref = BaseRef.of(base)
    problems = structural_problems(Patch(config, tensors), ref.logical_index)  # a tied head counts as present
    if problems:
        raise PortLLMError(
            f"adapter {adapter_dir} does not fit base {ref.name}: {problems[0]}"
            + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
        )
    manifest = new_manifest(ref.info, config, tensors, "imported", task, {"imported_from": str(adapter_dir.absolute())})
    patch = Patch(dict(config, base_model_name_or_path=ref.name), tensors, manifest)
    return patch.save(out, overwrite=overwrite)


def _first_line(e: BaseException) -> str:
    """An exception as one short printable line, for messages that quote a library's reason."""
    text = str(e).strip()
    text = text.splitlines()[0][:160] if text else e.__class__.__name__
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _finite(x: Any) -> bool:
    """A real number a float can hold (JSON allows NaN, Infinity and 400-digit integers)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def natural_key(s: str) -> list:
    """Sort key that orders numbered names as numbers (layers.2 before layers.10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def describe(patch: Patch) -> dict[str, Any]:
    """Everything `inspect` shows: modules, ranks, sizes, update norms, provenance, lineage."""
    mods = [
        {
            "module": m.name,
            "rank": m.rank,
            "scaling": m.scaling,
            "shape": list(m.weight_shape),
            "params": m.A.numel() + m.B.numel(),
            "delta_norm": m.delta_norm(),
        }
        for m in patch.modules.values()
    ]
    return {
        "path": str(patch.path) if patch.path else None,
        "n_params": patch.n_params,
        "n_modules": len(mods),
        "ranks": sorted({m["rank"] for m in mods}),
        "target_types": sorted({m["module"].rsplit(".", 1)[-1] for m in mods}),
        "replaced": {k: list(v.shape) for k, v in patch.full_weights.items()},
        "total_delta_norm": math.sqrt(sum(m["delta_norm"] ** 2 for m in mods)),
        "modules": mods,
        "manifest": patch.manifest.to_dict() if patch.manifest else None,
    }


def lora_config(
    ranks: dict[str, int], base_name: str | None, modules_to_save: list[str] | None = None
) -> dict[str, Any]:
    """A PEFT LoRA config for factors with scaling 1 and per-module ranks (rank_pattern where they differ)."""
    r = max(ranks.values())
    other = {m: k for m, k in ranks.items() if k != r}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": r,
        "rank_pattern": other,
        "alpha_pattern": dict(other),
        "target_modules": sorted(ranks, key=natural_key),
        "modules_to_save": modules_to_save or None,
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "base_model_name_or_path": base_name,
    }
