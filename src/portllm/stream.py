"""Bounded-memory safetensors I/O.

The safetensors library maps whole files and writes whole shards at once. Porting a 70B
base on a laptop needs less: read one tensor at a time with plain reads (no mmap pages
held in RSS) and write a shard tensor by tensor, knowing the header up front.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import PortLLMError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: str | Path) -> Header:
    """Parse a safetensors header, refusing anything malformed with a one-line reason."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise PortLLMError(f"{path}: not a safetensors file (too short); re-export or re-download it")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise PortLLMError(f"{path}: corrupt safetensors header (length {n}); re-export or re-download it")
            header = json.loads(f.read(n))
    except PortLLMError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise PortLLMError(
            f"{path}: cannot read safetensors header ({e.__class__.__name__}); re-export or re-download it"
        ) from None
    if not isinstance(header, dict):
        raise PortLLMError(f"{path}: corrupt safetensors header; re-export or re-download it")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, spec in header.items():
        try:
            dtype, shape, (a, b) = spec["dtype"], tuple(int(s) for s in spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise PortLLMError(f"{path}: corrupt safetensors entry for {name!r}") from None
        if dtype not in DTYPES:
            raise PortLLMError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        if base + b > size or a > b:
            raise PortLLMError(f"{path}: tensor {name!r} runs past the end of the file (truncated download?)")
        tensors[name] = TensorInfo(name, dtype, shape, base + a, base + b)
    return Header(path, tensors, dict(meta))


def read_tensor(info: TensorInfo, path: str | Path, fd: int | None = None) -> torch.Tensor:
    """Read one tensor with a plain pread: memory is that tensor and nothing else."""
    dtype = DTYPES[info.dtype]
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(info.nbytes)
        view = memoryview(buf)
        got = 0
        while got < info.nbytes:
            chunk = os.preadv(fd, [view[got:]], info.start + got)
            if chunk <= 0:
                raise PortLLMError(f"{path}: unexpected end of file reading {info.name!r}")
            got += chunk
    finally:
        if own:
            os.close(fd)
    return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)


Index = dict[str, tuple[Path, TensorInfo]]  # tensor name -> (file, location), as models.weight_index returns


def paired_tensors(
    a: Index, b: Index, names: Iterable[str] | None = None, on_mismatch: str = "skip"
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """The same tensor from two models side by side, as fp32, one pair in memory at a time.

    `names` defaults to every tensor of `a`; names absent from `b` are skipped. Pairs whose
    shapes differ are skipped (`on_mismatch="skip"`) or refused with a one-line error ("raise").
    """
    for name in a if names is None else names:
        if name not in a or name not in b:
            continue
        (fa, ia), (fb, ib) = a[name], b[name]
        if tuple(ia.shape) != tuple(ib.shape):
            if on_mismatch == "raise":
                raise PortLLMError(f"{name} is {tuple(ia.shape)} in one model but {tuple(ib.shape)} in the other")
            continue
        yield name, read_tensor(ia, fa).float(), read_tensor(ib, fb).float()


class ShardWriter:
    """Write a safetensors file tensor by tensor; the layout is fixed before the first byte."""

    def __init__(
        self, path: str | Path, layout: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
    ):
        self.path = Path(path)
        header: dict = {}
        if metadata:
            header["__metadata__"] = metadata
        offset = 0
        self._expected: list[tuple[str, str, tuple[int, ...], int]] = []
        for name, dtype, shape in layout:
            n = _numel(shape) * _itemsize(dtype)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._expected.append((name, dtype, tuple(shape), n))
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)
        self._i = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, dtype, shape, n = self._expected[self._i]
        if name != exp_name or DTYPE_NAMES[tensor.dtype] != dtype or tuple(tensor.shape) != shape:
            raise PortLLMError(f"internal: tensor {name!r} does not match the planned layout of {self.path.name}")
        if n:
            self._f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._i += 1

    def close(self) -> None:
        if self._i != len(self._expected):
            self._f.close()
            raise PortLLMError(f"internal: {self.path.name} got {self._i} of {len(self._expected)} tensors")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()
