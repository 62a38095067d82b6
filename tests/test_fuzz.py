"""Hostile inputs, through the entry points a user hits: every case ends in success or one one-line PortLLMError.

Each test damages one kind of file a user hands portllm (a patch's adapter_config.json, portllm.json and
portllm.sig, the safetensors header of a patch and of a base, a base's config and tokenizer files, task
data) and runs what a user would run on it: `Patch.load`, inspect's `describe` (and the `inspect` command),
`check`, `port`, `base_info`, `fingerprint`, `read_header`/`read_tensor`, `load_examples`. Any other
exception type, a message of more than one line, a case that outlives its time bound or tries to take
more memory than its allowance (a header claiming a huge size must be refused before anything is
allocated) is a bug. Seeds are fixed (derandomize), so CI runs the same cases every time.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiny
from portllm import check, import_adapter, port
from portllm.errors import PortLLMError
from portllm.models import BaseRef, base_info, fingerprint
from portllm.patch import Patch, describe
from portllm.stream import read_header, read_tensor
from portllm.tasks import Example, get_task, load_examples

CASE_SECONDS = 20  # per case, on a loaded 2-core machine; a case takes milliseconds
CASE_MEMORY = 2 << 30  # address space a case may add
SCALE = int(os.environ.get("PORTLLM_FUZZ_SCALE", "1"))  # >1: a deeper hunt, SCALE times the cases, fresh seeds
FUZZ = settings(
    derandomize=SCALE == 1,  # CI: the same cases on every run
    database=None,
    deadline=None,  # model loading varies; the per-case bound is CASE_SECONDS
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


class CaseOverrun(BaseException):
    """A case outlived its time bound (a BaseException, so no `except Exception` in the code hides it)."""


def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def bounded() -> Iterator[None]:
    """A time bound (SIGALRM) and an address-space allowance (RLIMIT_AS) around one case."""

    def overrun(*_):
        raise CaseOverrun(f"case ran over {CASE_SECONDS} s")

    old_handler = signal.signal(signal.SIGALRM, overrun)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = _vm_bytes()
    if vm:
        limit = vm + CASE_MEMORY
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def outcome(fn, *args, **kwargs) -> Any:
    """Run one entry point: its result, or the PortLLMError it raised (one line, saying something)."""
    try:
        return fn(*args, **kwargs)
    except PortLLMError as e:
        return vetted(e)


def vetted(e: PortLLMError) -> PortLLMError:
    """A refusal as the CLI prints it: one short line, no control characters, not a late allocation failure."""
    msg = str(e)
    assert msg.strip() and len(msg) < 800, f"empty or overlong message: {msg!r}"
    assert not re.search(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]", msg), f"not one clean line: {msg!r}"
    assert not re.search(r"MemoryError|can't allocate|out of memory", msg), f"allocation refused late: {msg}"
    return e


# ---------------------------------------------------------------- hostile values

INTS = [0, 1, 2, 3, -1, -2, 7, 255, 2**31, 2**32, 2**53 + 1, 2**62, 2**63, 2**64, -(2**63), 10**30, 10**400]
FLOATS = [0.5, -0.0, 2.0, 1e308, float("nan"), float("inf"), float("-inf")]
STRS = [
    "",
    " ",
    "(",
    "[",
    "*",
    ".*",
    "\\",
    "q_proj",
    "v_proj",
    "lm_head",
    "model.layers.0.self_attn.q_proj",
    "LORA",
    "F32",
    "<s>",
    "é",
    "\ud800",  # a lone surrogate: valid JSON, not valid Unicode
    "\x00",
    "a" * 300,
    "../portllm.json",
    "/dev/zero",
    "adapter_model.safetensors",
    "1",
    "true",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(INTS),
    st.integers(-5, 40),
    st.sampled_from(FLOATS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(STRS),
    st.text(max_size=6),
)
keys = st.sampled_from(STRS) | st.text(max_size=5)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(keys, c, max_size=3), max_leaves=6)

GARBAGE = [
    b"",
    b"{",
    b"[" * 100_000,  # nests deeper than any parser's recursion
    b'{"a":' * 50_000,
    b"\xff\xfe\xfa",
    b'{"a": "\xff"}',
    b"null",
    b"NaN",
    b"1e999",
    b'"text"',
    b"[1, 2]",
    b'{"a": 1}{"b": 2}',
    b"\x00" * 16,
]
garbage = st.sampled_from(GARBAGE) | st.binary(max_size=48)


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


def json_paths(doc: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from json_paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from json_paths(v, prefix + (i,))


def _edit(doc: Any, path: tuple, value: Any, delete: bool) -> Any:
    if not path:
        return value
    node = doc
    for k in path[:-1]:
        node = node[k]
    if delete:
        del node[path[-1]]
    elif isinstance(node, list) and path[-1] >= len(node):
        node.append(value)
    else:
        node[path[-1]] = value
    return doc


@st.composite
def hostile_json(draw, doc: Any, extra: tuple[tuple, ...] = (), domain: Any = None, edits: int = 3) -> bytes:
    """A JSON file damaged as someone might: fields retyped, removed or added; or not JSON at all.

    `extra`: paths worth adding (keys the file may have); `domain(path)`: a strategy of values that
    matter at that path, or None."""
    kind = draw(st.sampled_from(["edit"] * 6 + ["whole", "raw"]))
    if kind == "raw":
        return draw(garbage)
    if kind == "whole":
        return dumps(draw(values))
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, edits))):
        if not isinstance(doc, (dict, list)):
            break
        path = draw(st.sampled_from(sorted(set(json_paths(doc)) | set(extra), key=repr)))
        try:
            node = doc
            for k in path[:-1]:
                node = node[k]
            present = path and (path[-1] in node if isinstance(node, dict) else path[-1] < len(node))
        except (KeyError, IndexError, TypeError):
            continue  # an extra path whose parent an earlier edit removed
        if present and draw(st.integers(0, 4)) == 0:
            doc = _edit(doc, path, None, delete=True)
            continue
        special = domain(path) if domain else None
        doc = _edit(doc, path, draw(special | values if special is not None else values), delete=False)
    return dumps(doc)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Any]:
    """A tiny base (and a sharded copy), a tiny imported patch replacing lm_head too, a signed copy; built once."""
    import peft  # noqa: F401  (imported once, outside the per-case memory allowance)
    import safetensors.torch  # noqa: F401
    import transformers  # noqa: F401

    from portllm.sign import keygen, sign_patch

    root = tmp_path_factory.mktemp("fuzz")
    base = tiny.make_base(root / "base", vocab_size=64, hidden=16, layers=1)
    tiny.make_base(root / "sharded", vocab_size=64, hidden=16, layers=1, max_shard_size="8KB")
    targets = ["q_proj", "v_proj", "down_proj"]
    adapter = tiny.make_adapter(base, root / "adapter", r=2, alpha=4, target=targets, modules_to_save=["lm_head"])
    patch = import_adapter(adapter, base, root / "patch", task="toy").path
    keys = keygen(root / "key")
    signed = root / "signed"
    shutil.copytree(patch, signed)
    sign_patch(signed, keys.private)
    ref = BaseRef.of(base)
    ref.info  # noqa: B018  (resolved once: later cases reuse it)
    for entry in (lambda: check(Patch.load(patch), ref), lambda: port(patch, ref, root / "warm")):
        entry()  # first-use imports happen here, not inside a case's bounds
    world = {"root": root, "base": base, "sharded": root / "sharded", "patch": patch, "signed": signed}
    return world | {"pub": keys.public, "ref": ref}


@contextlib.contextmanager
def case_dir(world: dict[str, Any], *copies: str) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(dir=world["root"]))
    try:
        for name in copies:
            shutil.copytree(world[name], d / name)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def restamp(patch: Path) -> None:
    """Make the manifest vouch for the damaged files: a hostile patch is checksummed like any other."""
    f = patch / "portllm.json"
    man = json.loads(f.read_text())
    man["files"] = {n: hashlib.sha256((patch / n).read_bytes()).hexdigest() for n in man["files"]}
    f.write_text(json.dumps(man))


def through_patch(patch: Path, ref: Any, out: Path) -> None:
    """What a user does with a patch: load it, inspect it, check it, port it both ways."""
    loaded = outcome(Patch.load, patch)
    if isinstance(loaded, Patch):
        d = outcome(describe, loaded)
        if isinstance(d, dict):
            json.dumps(d, default=str)  # `inspect --json`
        outcome(check, loaded, ref)
    outcome(port, patch, ref, out / "as_adapter", as_adapter=True)
    outcome(port, patch, ref, out / "merged")


def through_base(base: Path, patch: Path, out: Path) -> None:
    """What a user does with a base directory: identify it, check a patch against it, port onto it."""
    outcome(base_info, base)
    outcome(fingerprint, base)
    loaded = Patch.load(patch)
    outcome(check, loaded, base)
    outcome(port, patch, base, out / "merged")


def through_safetensors(f: Path) -> None:
    h = outcome(read_header, f)
    if not isinstance(h, PortLLMError):
        for info in h.tensors.values():
            t = outcome(read_tensor, info, f)
            assert isinstance(t, PortLLMError) or tuple(t.shape) == info.shape


# ---------------------------------------------------------------- the patch: adapter_config.json

CONFIG_KEYS = (
    ("rank_pattern", "q_proj"),
    ("alpha_pattern", "v_proj"),
    ("rank_pattern", "("),
    ("alpha_pattern", "model.layers.0.mlp.down_proj"),
    ("use_rslora",),
    ("layers_to_transform",),
    ("layers_pattern",),
    ("modules_to_save",),
    ("use_dora",),
)


def _config_domain(path: tuple) -> Any:
    last = path[-1] if path else None
    if last in ("r", "lora_alpha") or path[:1] in (("rank_pattern",), ("alpha_pattern",)):
        return st.sampled_from(INTS + FLOATS + ["2", None, True, [2]])
    if last == "target_modules" or path[:1] == ("target_modules",):
        return st.sampled_from(["all-linear", "(", ".*q_proj", "*", 5, ["q_proj", 5], [None], {"q_proj": 1}, []])
    if last in ("rank_pattern", "alpha_pattern"):
        pattern = st.sampled_from(["q_proj", "(", "[", "*", ".*", "v_proj", "down_proj", 5])
        return st.dictionaries(pattern, st.sampled_from(INTS + FLOATS + ["2", None]), max_size=2) | values
    if last == "peft_type":
        return st.sampled_from(["LORA", "lora", "IA3", "PREFIX_TUNING", "", 5, None])
    return None


@settings(FUZZ, max_examples=120 * SCALE)
@given(data=st.data())
def test_adapter_config(world, data):
    original = json.loads((world["patch"] / "adapter_config.json").read_text())
    blob = data.draw(hostile_json(original, CONFIG_KEYS, _config_domain), label="adapter_config.json")
    with case_dir(world, "patch") as d, bounded():
        (d / "patch" / "adapter_config.json").write_bytes(blob)
        restamp(d / "patch")
        through_patch(d / "patch", world["ref"], d)


# ---------------------------------------------------------------- the patch: portllm.json

MANIFEST_KEYS = (
    ("files", "../portllm.json"),
    ("files", "/dev/zero"),
    ("files", "adapter_config.json"),
    ("lineage", 1),
    ("lineage", 0, "signature"),
    ("base", "tokenizer", "special_tokens", "bos_token"),
    ("other_key",),
)


def _manifest_domain(path: tuple) -> Any:
    last = path[-1] if path else None
    if last == "format_version":
        return st.sampled_from([1, 0, 2, -1, "1", "2", 1.5, 2**64, 10**400, True, None, float("nan"), [1]])
    if last == "format":
        return st.sampled_from(["portllm-patch", "", "peft", 5])
    if path[:1] == ("files",) and len(path) == 2:
        return st.sampled_from(["0" * 64, "", 5, None, ["x"]])
    if last in ("size", "block_size", "hidden_size", "num_layers", "vocab_size"):
        return st.sampled_from(INTS + ["64", None, 1.5])
    return None


@settings(FUZZ, max_examples=150 * SCALE)
@given(data=st.data())
def test_manifest(world, data):
    from typer.testing import CliRunner

    from portllm.cli import app

    original = json.loads((world["patch"] / "portllm.json").read_text())
    blob = data.draw(hostile_json(original, MANIFEST_KEYS, _manifest_domain), label="portllm.json")
    with case_dir(world, "patch") as d, bounded():
        (d / "patch" / "portllm.json").write_bytes(blob)
        through_patch(d / "patch", world["ref"], d)
        result = CliRunner().invoke(app, ["inspect", str(d / "patch")])  # prints what describe leaves raw
        e = result.exception
        assert e is None or isinstance(e, (PortLLMError, SystemExit)), repr(e)
        if isinstance(e, PortLLMError):
            vetted(e)


# ---------------------------------------------------------------- safetensors headers

DTYPE_NAMES = ["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "I64", "F8_E4M3", "U16", "C64", "f32", "", "X"]
OFFSETS = [0, 1, 4, 7, 8, -1, -8, 2**31, 2**63, 2**64, 10**30]


@st.composite
def hostile_safetensors(draw, original: bytes) -> bytes:
    """A safetensors file damaged in its length field, its header JSON, its entries or its size."""
    (n,) = struct.unpack("<Q", original[:8])
    header, data = json.loads(original[8 : 8 + n]), original[8 + n :]
    names = [k for k in header if k != "__metadata__"]
    size = len(data)
    kind = draw(st.sampled_from(["entry"] * 5 + ["overlap", "length", "truncate", "header", "metadata", "grow"]))
    if kind == "length":
        claimed = draw(
            st.sampled_from([0, 1, 7, n - 1, n + 1, n + 8 + size, 2**31, 2**63, 2**64 - 1, 100 * 2**20 + 1])
            | st.integers(0, 2**64 - 1)
        )
        return struct.pack("<Q", claimed) + original[8:]
    if kind == "truncate":
        return original[: draw(st.integers(0, len(original) - 1))]
    if kind == "header":
        blob = draw(garbage)
        return struct.pack("<Q", len(blob)) + blob + data
    header = copy.deepcopy(header)
    if kind == "metadata":
        header["__metadata__"] = draw(values)
    elif kind == "grow":  # a tensor claiming far more than the file holds (its byte range consistent, or empty)
        name = draw(st.sampled_from(names))
        dim = draw(st.sampled_from([2**20, 2**31, 2**40, 2**61]))
        header[name] = {"dtype": "F32", "shape": [dim], "data_offsets": [0, draw(st.sampled_from([4 * dim, 0]))]}
    elif kind == "overlap":
        a, b = draw(st.sampled_from(names)), draw(st.sampled_from(names))
        header[a] = dict(header[a], data_offsets=list(header[b]["data_offsets"]))
        if draw(st.booleans()):
            header[a]["shape"] = header[b]["shape"]
            header[a]["dtype"] = header[b]["dtype"]
    else:
        for _ in range(draw(st.integers(1, 3))):
            name = draw(st.sampled_from(names + ["extra.weight"]))
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "data_offsets", "whole", "delete"]))
            if not isinstance(header.get(name), dict):
                header[name] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
            entry = header[name]
            if field == "whole":
                header[name] = draw(values)
            elif field == "delete":
                header.pop(name, None)
            elif field == "dtype":
                entry["dtype"] = draw(st.sampled_from(DTYPE_NAMES) | values)
            elif field == "shape":
                dims = st.sampled_from([0, 1, 2, 4, 16, -1, -4, 2**31, 2**62, 2**64]) | st.integers(-3, 40)
                entry["shape"] = draw(st.lists(dims, max_size=4) | values)
            else:
                ends = st.sampled_from(OFFSETS + [size, size + 1, size - 1]) | st.integers(-4, size + 4)
                entry["data_offsets"] = draw(
                    st.lists(ends, min_size=2, max_size=2) | st.lists(ends, max_size=3) | values
                )
    blob = dumps(header)
    return struct.pack("<Q", len(blob)) + blob + data


@settings(FUZZ, max_examples=120 * SCALE)
@given(data=st.data())
def test_patch_weights_header(world, data):
    original = (world["patch"] / "adapter_model.safetensors").read_bytes()
    blob = data.draw(hostile_safetensors(original), label="adapter_model.safetensors")
    with case_dir(world, "patch") as d, bounded():
        f = d / "patch" / "adapter_model.safetensors"
        f.write_bytes(blob)
        restamp(d / "patch")
        through_safetensors(f)
        through_patch(d / "patch", world["ref"], d)


@settings(FUZZ, max_examples=100 * SCALE)
@given(data=st.data())
def test_base_weights_header(world, data):
    original = (world["base"] / "model.safetensors").read_bytes()
    blob = data.draw(hostile_safetensors(original), label="model.safetensors")
    with case_dir(world, "base") as d, bounded():
        f = d / "base" / "model.safetensors"
        f.write_bytes(blob)
        through_safetensors(f)
        through_base(d / "base", world["patch"], d)


# ---------------------------------------------------------------- well-formed files, hostile tensors

SHAPES = [(), (0,), (3,), (0, 16), (2, 0), (1, 16), (2, 16), (16, 2), (16, 1), (32, 2), (2, 3, 4), (64, 16)]
TENSOR_DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "I64", "F8_E4M3"]
FILLS = [0.0, 1.0, float("nan"), float("inf"), -1e30]


@st.composite
def hostile_tensors(draw, original: bytes, patch: bool) -> bytes:
    """A well-formed safetensors file whose tensors are renamed, dropped, added, reshaped or retyped."""
    import torch
    from safetensors.torch import load, save

    from portllm.stream import DTYPES

    tensors = load(original)
    names = sorted(tensors)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["reshape", "reshape", "retype", "fill", "drop", "add", "rename"]))
        name = draw(st.sampled_from(names))
        if name not in tensors:
            continue
        if kind == "drop":
            del tensors[name]
        elif kind == "rename":
            new = draw(
                st.sampled_from(
                    [
                        name.replace("lora_A", "lora_B"),
                        name.replace(".weight", ".default.weight"),
                        name.replace("lora_A", "lora_embedding_A"),
                        name.replace("lora_A", "lora_magnitude_vector"),
                        name.replace("base_model.model.", ""),
                        "base_model.model.lm_head.weight",
                        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",
                        "model.layers.7.self_attn.q_proj.weight",
                        "\u00e9.lora_A.weight",
                    ]
                )
            )
            tensors[new] = tensors.pop(name)
        else:
            t = tensors[name]
            shape = draw(st.sampled_from(SHAPES)) if kind in ("reshape", "add") else tuple(t.shape)
            dtype = DTYPES[draw(st.sampled_from(TENSOR_DTYPES))] if kind in ("retype", "add") else t.dtype
            fill = draw(st.sampled_from(FILLS)) if kind == "fill" else 0.5
            made = torch.full(shape, fill) if dtype.is_floating_point else torch.ones(shape)
            if kind == "reshape" and t.numel() == made.numel():
                made = t.reshape(shape).float()
            tensors[name if kind != "add" else name.replace(".weight", ".extra.weight")] = made.to(dtype)
    if not tensors:
        tensors = {"unrelated": torch.zeros(1)}
    return save(tensors, metadata={"format": "pt"} if patch else None)


@settings(FUZZ, max_examples=100 * SCALE)
@given(data=st.data())
def test_patch_tensors(world, data):
    original = (world["patch"] / "adapter_model.safetensors").read_bytes()
    blob = data.draw(hostile_tensors(original, patch=True), label="adapter_model.safetensors")
    with case_dir(world, "patch") as d, bounded():
        (d / "patch" / "adapter_model.safetensors").write_bytes(blob)
        restamp(d / "patch")
        through_patch(d / "patch", world["ref"], d)


@settings(FUZZ, max_examples=60 * SCALE)
@given(data=st.data())
def test_base_tensors(world, data):
    original = (world["base"] / "model.safetensors").read_bytes()
    blob = data.draw(hostile_tensors(original, patch=False), label="model.safetensors")
    with case_dir(world, "base") as d, bounded():
        (d / "base" / "model.safetensors").write_bytes(blob)
        through_base(d / "base", world["patch"], d)


# ---------------------------------------------------------------- a base's config and tokenizer files


def _model_config_domain(path: tuple) -> Any:
    last = path[-1] if path else None
    if last in ("architectures", "model_type"):
        return st.sampled_from(["llama", "gemma3", "", 5, None, ["LlamaForCausalLM"], [5], "LlamaForCausalLM"])
    if last in ("hidden_size", "num_hidden_layers", "vocab_size", "tie_word_embeddings"):
        return st.sampled_from(INTS + ["16", None, 1.5, True])
    if last == "text_config":
        return st.sampled_from([{}, {"vocab_size": "x"}, [1], "x", None])
    return None


@settings(FUZZ, max_examples=60 * SCALE)
@given(data=st.data())
def test_base_config(world, data):
    original = json.loads((world["base"] / "config.json").read_text())
    extra = (("text_config",), ("architectures", 1))
    blob = data.draw(hostile_json(original, extra, _model_config_domain), label="config.json")
    with case_dir(world, "base") as d, bounded():
        (d / "base" / "config.json").write_bytes(blob)
        through_base(d / "base", world["patch"], d)


def _index_domain(path: tuple) -> Any:
    if path[:1] == ("weight_map",) and len(path) == 2:
        names = ["model-00001-of-00002.safetensors", "../base/model.safetensors", "/dev/zero", "/proc/self/fd/0"]
        return st.sampled_from(names + ["", ".", "..", "config.json", "nope.safetensors", 5, None, ["x"]])
    return None


@settings(FUZZ, max_examples=50 * SCALE)
@given(data=st.data())
def test_shard_index(world, data):
    original = json.loads((world["sharded"] / "model.safetensors.index.json").read_text())
    extra = (("weight_map", "lm_head.weight"), ("weight_map", "extra.weight"))
    blob = data.draw(hostile_json(original, extra, _index_domain), label="model.safetensors.index.json")
    with case_dir(world, "sharded") as d, bounded():
        (d / "sharded" / "model.safetensors.index.json").write_bytes(blob)
        through_base(d / "sharded", world["patch"], d)


TOKENIZER_CONFIG_KEYS = (
    ("tokenizer_class",),
    ("auto_map",),
    ("chat_template",),
    ("add_bos_token",),
    ("added_tokens_decoder",),
    ("extra_special_tokens",),
)


def _tokenizer_domain(path: tuple) -> Any:
    last = path[-1] if path else None
    if last == "tokenizer_class":
        names = ["LlamaTokenizer", "GPT2Tokenizer", "GemmaTokenizer", "PreTrainedTokenizerFast", "Nope", "", 5]
        return st.sampled_from(names)
    if last == "auto_map":
        return st.sampled_from([{"AutoTokenizer": ["someone/repo--tok.Tok", None]}, {"AutoTokenizer": 5}, "x"])
    if last in ("bos_token", "eos_token", "pad_token", "unk_token"):
        return st.sampled_from(["<s>", "</s>", "nope", "", 5, None, {"content": 5}, {"content": "<s>"}, ["<s>"]])
    if last in ("chat_template",):
        return st.sampled_from(["{{ messages }}", "{% if %}", 5, [{"name": "default", "template": "x"}], [5], {}])
    if last == "added_tokens_decoder":
        return st.sampled_from([{"99999999": {"content": "x"}}, {"x": {}}, {"5": {"content": 5}}, []])
    if path[:2] == ("model", "vocab") and len(path) == 3:
        return st.sampled_from([2**32 - 1, 2**31, 2**40, -1, 1, 5.5, "3", None])
    if last == "id":
        return st.sampled_from([2**32 - 1, 2**31, -1, 0, 63, 64, "1", None])
    if last == "type" and path[:1] == ("model",):
        return st.sampled_from(["WordLevel", "BPE", "Unigram", "WordPiece", "Nope", 5])
    return None


@settings(FUZZ, max_examples=80 * SCALE)
@given(data=st.data())
def test_tokenizer_files(world, data):
    which = data.draw(st.sampled_from(["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]), label="file")
    with case_dir(world, "base") as d, bounded():
        f = d / "base" / which
        if which == "chat_template.jinja":
            blob = data.draw(garbage | st.sampled_from([b"{% if %}", b"{{ messages", b"\xff{{ x }}"]), label=which)
        else:
            original = json.loads(f.read_text())
            extra = TOKENIZER_CONFIG_KEYS if which == "tokenizer_config.json" else (("model", "vocab", "w0"),)
            blob = data.draw(hostile_json(original, extra, _tokenizer_domain), label=which)
        f.write_bytes(blob)
        through_base(d / "base", world["patch"], d)


# ---------------------------------------------------------------- portllm.sig


@settings(FUZZ, max_examples=50 * SCALE)
@given(data=st.data())
def test_signature(world, data):
    from portllm.sign import check_signature, signature_record

    original = json.loads((world["signed"] / "portllm.sig").read_text())
    extra = (("algorithm",), ("context",), ("signed",), ("format_version",))
    blob = data.draw(hostile_json(original, extra), label="portllm.sig")
    with case_dir(world, "signed") as d, bounded():
        (d / "signed" / "portllm.sig").write_bytes(blob)
        outcome(signature_record, d / "signed")
        v = outcome(check_signature, d / "signed", [world["pub"]])
        assert isinstance(v, PortLLMError) or "\n" not in v.reason
        outcome(port, d / "signed", world["ref"], d / "out", require_signature=True, trusted=[world["pub"]])
        outcome(port, d / "signed", world["ref"], d / "out2", as_adapter=True)  # unverified: record only


# ---------------------------------------------------------------- task data through a task definition

ROWS: dict[str, Any] = {  # task -> one well-formed row (JSONL) or (header, row) (TSV)
    "boolq": {"question": "is it", "passage": "It is.", "label": True},
    "winogrande": {"sentence": "Sarah beat _ at chess.", "option1": "Maria", "option2": "Ann", "answer": "1"},
    "piqa": {"goal": "open a jar", "sol1": "twist", "sol2": "bite"},
    "arc_easy": {
        "id": "q1",
        "question": {"stem": "What is hot?", "choices": [{"text": "sun", "label": "A"}, {"text": "ice", "label": "B"}]},
        "answerKey": "A",
    },
    "gsm8k": {"question": "1+1?", "answer": "It is 2.\n#### 2"},
    "sst2": (["sentence", "label"], ["a fine movie", "1"]),
    "mrpc": (["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], ["1", "7", "8", "He ran.", "He sprinted."]),
    "openbookqa": (
        ["id", "Question Stem", "Choices", "Complete Question", "Answer Key"],
        ["q1", "Sun is", "(A) hot (B) cold (C) wet (D) dry", "Sun is hot", "A"],
    ),
}
LABELS = {"winogrande": ["1", "2"], "piqa": ["0", "1"]}
FIELD_TEXT = st.sampled_from(["", "x", "1", "0", "2", "-1", "yes", "true", "A", "E", "_", "#### 5", "(A) a (B) b"])


def _row_domain(path: tuple) -> Any:
    return FIELD_TEXT if path else None


@st.composite
def row_edit(draw, row: dict[str, Any]) -> dict[str, Any]:
    """A well-formed JSON object whose fields are retyped, emptied or removed (what reaches the hooks)."""
    row = copy.deepcopy(row)
    for _ in range(draw(st.integers(1, 3))):
        paths = sorted(set(json_paths(row)) - {()}, key=repr)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        try:
            _edit(row, path, draw(FIELD_TEXT | values), delete=draw(st.integers(0, 4)) == 0)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier edit removed the parent
    return row


@st.composite
def jsonl_file(draw, row: dict[str, Any]) -> tuple[bytes, int]:
    """JSONL text, mostly objects with damaged fields, some lines not objects or not JSON; and its row count."""
    lines, n = [], 0
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["row"] * 2 + ["edit"] * 6 + ["hostile", "raw", "blank"]))
        if kind == "row":
            lines.append(dumps(row))
        elif kind == "edit":
            lines.append(dumps(draw(row_edit(row))))
        elif kind == "hostile":
            lines.append(draw(hostile_json(row, (("label",), ("answer",), ("question", "choices", 2)), _row_domain)))
        elif kind == "raw":
            lines.append(draw(garbage))
        else:
            lines.append(draw(st.sampled_from([b"", b"   ", b"\r"])))
        n += kind in ("row", "edit", "hostile")
    return b"\n".join(lines) + draw(st.sampled_from([b"\n", b"", b"\r\n"])), n


tsv_field = (
    FIELD_TEXT.map(str.encode)
    | st.text(max_size=8).map(str.encode)
    | st.sampled_from([b'"quoted', b"a\rb", b"\x00", b"a" * 70, b"\xff\xfe"])
)


@st.composite
def tsv_file(draw, header: list[str], row: list[str]) -> tuple[bytes, int]:
    head = [c.encode() for c in header]
    if draw(st.integers(0, 5)) == 0:
        head = draw(st.lists(tsv_field, max_size=6))
    lines = [b"\t".join(head)]
    for _ in range(draw(st.integers(0, 4))):
        fields = [c.encode() for c in row]
        kind = draw(st.sampled_from(["row", "edit", "edit", "edit", "count", "raw"]))
        if kind == "edit":
            for _ in range(draw(st.integers(1, 2))):
                fields[draw(st.integers(0, len(fields) - 1))] = draw(tsv_field)
        elif kind == "count":
            fields = draw(st.lists(tsv_field, max_size=len(fields) + 2))
        elif kind == "raw":
            fields = [draw(garbage)]
        lines.append(b"\t".join(fields))
    return b"\n".join(lines) + b"\n", len(lines) - 1


@settings(FUZZ, max_examples=200 * SCALE)
@given(data=st.data())
def test_task_data(world, data):
    name = data.draw(st.sampled_from(sorted(ROWS)), label="task")
    task = get_task(name)
    template = ROWS[name]
    blob, rows = data.draw(tsv_file(*template) if isinstance(template, tuple) else jsonl_file(template), label="data")
    with case_dir(world) as d, bounded():
        f = d / task.eval.file
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(blob)
        if name in LABELS and data.draw(st.integers(0, 5), label="labels file") > 0:
            lab = st.sampled_from(LABELS[name] * 3 + ["3", "-1", "x", "", "1.0", "\xff"]).map(
                lambda x: x.encode("latin-1")
            )
            count = st.just(rows) | st.integers(0, rows + 1)
            lines = data.draw(count.flatmap(lambda k: st.lists(lab, min_size=k, max_size=k)), label="labels")
            f.with_name(f.stem + "-labels.lst").write_bytes(b"\n".join(lines))
        examples = outcome(load_examples, task, "eval", d)
        if isinstance(examples, list):
            for e in examples:
                assert isinstance(e, Example)
                if task.kind == "mc":
                    assert len(e.contexts) == len(e.continuations) >= 1
                    assert all(isinstance(x, str) for x in e.contexts + e.continuations)
                    assert isinstance(e.gold, int) and 0 <= e.gold < len(e.continuations)
                else:
                    assert isinstance(e.prompt, str) and isinstance(e.gold, str)
