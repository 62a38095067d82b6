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
import hashlib
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
from .models import BaseInfo, BaseRef
from .stream import Index, read_header

MANIFEST = "portllm.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


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
    except ValueError as e:
        raise PortLLMError(f"{path}: not valid JSON ({e})") from None
    return parse_manifest(raw, path)


def parse_manifest(raw: Any, path: Path) -> Manifest:
    """Vet a manifest already read as JSON (signature checks read the file once and use the same bytes)."""
    if not isinstance(raw, dict) or raw.get("format") != "portllm-patch":
        raise PortLLMError(f"{path}: not a portllm patch manifest")
    if int(raw.get("format_version", 0)) > FORMAT_VERSION:
        raise PortLLMError(
            f"{path.parent}: patch format {raw['format_version']} is newer than this portllm; upgrade portllm"
        )
    return Manifest.from_dict(raw)


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
        for name in sorted(parts, key=_natural):
            ab = parts[name]
            if set(ab) != {"A", "B"}:
                raise PortLLMError(f"patch: module {name} has lora_{'A' if 'A' in ab else 'B'} but not its partner")
            A, B = ab["A"], ab["B"]
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
                raise PortLLMError(
                    f"patch: module {name} has mismatched LoRA factor shapes A{tuple(A.shape)} B{tuple(B.shape)}"
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
            except (TypeError, ValueError, KeyError) as e:
                raise PortLLMError(f"{ADAPTER_CONFIG}: PEFT rejects it ({str(e).splitlines()[0][:160]})") from None

    def _scaling(self, name: str, r: int) -> float:
        """PEFT's own rule: the first rank/alpha pattern key matching the module, resolved by PEFT's helper.

        With no pattern and r, lora_alpha given there is nothing to resolve, and importing PEFT (seconds)
        would be most of a small port's time: then r and lora_alpha are used as they stand.
        """
        cfg = self.config
        if not cfg.get("rank_pattern") and not cfg.get("alpha_pattern") and "r" in cfg and "lora_alpha" in cfg:
            rank, alpha, rslora = cfg["r"], cfg["lora_alpha"], bool(cfg.get("use_rslora"))
        else:
            from peft.utils.other import get_pattern_key

            c = self.peft_config
            ranks, alphas = c.rank_pattern or {}, c.alpha_pattern or {}
            rank = ranks.get(get_pattern_key(ranks.keys(), name), c.r)
            alpha = alphas.get(get_pattern_key(alphas.keys(), name), c.lora_alpha)
            rslora = c.use_rslora
        if rank != r:
            raise PortLLMError(
                f"patch: module {name} has rank {r} but {ADAPTER_CONFIG} gives {rank} (r / rank_pattern); "
                "PEFT would not load it"
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
    except ValueError as e:
        raise PortLLMError(f"{cfg_file}: not valid JSON ({e})") from None
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise PortLLMError(f"{path}: PEFT type {config.get('peft_type')} is not LoRA; only LoRA patches are supported")
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
    problems = structural_problems(Patch(config, tensors), ref.index)
    if problems:
        raise PortLLMError(
            f"adapter {adapter_dir} does not fit base {ref.name}: {problems[0]}"
            + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
        )
    manifest = new_manifest(ref.info, config, tensors, "imported", task, {"imported_from": str(adapter_dir.absolute())})
    patch = Patch(dict(config, base_model_name_or_path=ref.name), tensors, manifest)
    return patch.save(out, overwrite=overwrite)


def _natural(s: str) -> list:
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
        "target_modules": sorted(ranks, key=_natural),
        "modules_to_save": modules_to_save or None,
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "base_model_name_or_path": base_name,
    }
