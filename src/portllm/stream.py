"""Bounded-memory safetensors I/O.

The safetensors library maps whole files and writes whole shards at once. Porting a 70B
base on a laptop needs less: read one tensor at a time with plain reads (no mmap pages
held in RSS) and write a shard tensor by tensor, knowing the header up front.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import struct
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from .errors import PortLLMError

if TYPE_CHECKING:
    import torch

# safetensors dtype -> (bytes per element, torch's name). Headers, layouts and kernel copies need only the sizes:
# this module does not import torch until a tensor is made (`portllm port` copies the base while torch loads)
DTYPE_SPECS: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
}
_MAX_HEADER = 100 * 1024 * 1024
MADV_POPULATE_WRITE = 23  # linux/mman.h; Python's mmap module names it only from 3.13 on
SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of the range's dirty pages, do not wait for it


@cache
def torch_dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype -> torch dtype (`DTYPES`), built on first use."""
    import torch  # deferred: torch

    return {k: getattr(torch, name) for k, (_, name) in DTYPE_SPECS.items()}


@cache
def dtype_names() -> dict[torch.dtype, str]:
    """torch dtype -> safetensors dtype (`DTYPE_NAMES`)."""
    return {v: k for k, v in torch_dtypes().items()}


def __getattr__(name: str) -> Any:
    """`DTYPES` and `DTYPE_NAMES`, the maps to and from torch's dtypes, import torch: made on first use."""
    if name == "DTYPES":
        return torch_dtypes()
    if name == "DTYPE_NAMES":
        return dtype_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    """Parse a safetensors header, refusing anything malformed with a one-line reason.

    Every rule the safetensors library enforces on load is checked here, before any tensor is read:
    a header that claims a huge size, a shape its byte range does not hold, or ranges that overlap
    or leave the file is refused up front, so no read allocates more than the file holds.
    """
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
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise PortLLMError(
            f"{path}: cannot read safetensors header ({e.__class__.__name__}); re-export or re-download it"
        ) from None
    if not isinstance(header, dict):
        raise PortLLMError(f"{path}: corrupt safetensors header (not a JSON object); re-export or re-download it")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise PortLLMError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    base, data_size = 8 + n, size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, spec in header.items():
        problem = _entry_problem(spec, data_size)
        if problem:
            raise PortLLMError(
                f"{path}: corrupt safetensors entry for {_brief(name)} ({problem}); re-export or re-download it"
            )
        a, b = spec["data_offsets"]
        tensors[name] = TensorInfo(name, spec["dtype"], tuple(spec["shape"]), base + a, base + b)
    end = base  # as the safetensors library: the tensors tile the data section, no overlap, gap or tail
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if t.start != end:
            what = "overlaps another tensor's bytes" if t.start < end else "starts after a gap in the data"
            raise PortLLMError(f"{path}: tensor {_brief(t.name)} {what}; re-export or re-download it")
        end = t.end
    if end != size:
        raise PortLLMError(
            f"{path}: {size - end} bytes after the last tensor (corrupt file); re-export or re-download it"
        )
    return Header(path, tensors, dict(meta))


def _entry_problem(spec: Any, data_size: int) -> str | None:
    """What is wrong with one header entry, or None: the safetensors format's own rules."""
    if not isinstance(spec, dict):
        return "not a JSON object"
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SPECS:
        return f"unsupported dtype {_brief(dtype)}"
    if not isinstance(shape, list) or not all(_is_index(s, 1 << 62) for s in shape):
        return f"shape {_brief(shape)} is not a list of non-negative integers"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_index(o, data_size) for o in offsets):
        return (
            f"data_offsets {_brief(offsets)} are not [begin, end] within the file's {data_size} data bytes (truncated?)"
        )
    if offsets[0] > offsets[1]:
        return f"data_offsets {_brief(offsets)} begin after they end"
    if _numel(shape) * _itemsize(dtype) != offsets[1] - offsets[0]:
        return f"shape {_brief(shape)} of {dtype} does not fill its {offsets[1] - offsets[0]} bytes"
    return None


def _brief(v: Any) -> str:
    """A value from a (possibly hostile) header, quoted and cut short enough for a one-line message."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _is_index(v: Any, limit: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= limit


def read_tensor(
    info: TensorInfo, path: str | Path, fd: int | None = None, into: torch.Tensor | None = None
) -> torch.Tensor:
    """Read one tensor with a plain pread: memory is that tensor and nothing else.

    `into` (uint8, at least `info.nbytes`) is a buffer to read into and view, reused by a caller that reads
    many tensors: a fresh allocation per tensor costs page faults and zeroing of every byte, as much as the read.
    """
    import torch  # deferred: torch

    dtype = torch_dtypes()[info.dtype]
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    if into is not None and (into.dtype != torch.uint8 or into.numel() < info.nbytes or not into.is_contiguous()):
        raise PortLLMError(f"internal: read buffer too small or not contiguous bytes for {info.name!r}")
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY)
    try:
        # not zero-filled: every byte is read into it
        buf = torch.empty(info.nbytes, dtype=torch.uint8) if into is None else into[: info.nbytes]
        view = memoryview(buf.numpy())
        got = 0
        while got < info.nbytes:
            chunk = os.preadv(fd, [view[got:]], info.start + got)
            if chunk <= 0:
                raise PortLLMError(f"{path}: unexpected end of file reading {info.name!r}")
            got += chunk
    finally:
        if own:
            os.close(fd)
    return buf.view(dtype).reshape(info.shape)


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


class WriteBehind:
    """What a streaming writer leaves to background threads, in order: writing each tensor into its shard and
    fsyncing each finished shard.

    File writes and fsync release the GIL, so both overlap the caller's next read and add, and the output is durable
    before it is renamed into place: `finish` returns only once every shard is on disk. `writeback` lets the disk start
    on a finished byte range at once (the fsync thread asks the kernel), so that the fsync of a shard finds most of its
    pages already written, not all of them at the end. Nothing is hashed here: a full content hash of the output is
    taken on first use (`models.content_sha256`), not by every write. The caller must leave a tensor's memory alone
    until the future `write` returned is done (`wait`), which also bounds the memory in flight. The first error of the
    writer (a full disk) stops its later writes and is raised by `wait`/`finish`. `write_s` and `sync_s` are the
    threads' busy seconds, `wait_s` the caller's time blocked on them before `finish`, `sync_wait_s` its time in
    `finish` (the part of the fsyncs that nothing else overlapped).
    """

    def __init__(self) -> None:
        self.write_s = self.sync_s = self.wait_s = self.sync_wait_s = 0.0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="portllm-write")
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="portllm-fsync")
        self._pending: list[Future] = []  # writes and copies, in submission order
        self._syncing: list[tuple[Future, BinaryIO]] = []
        self._failed: BaseException | None = None

    def write(self, writer: ShardWriter, name: str, tensor: torch.Tensor) -> Future:
        """Write `tensor` into `writer` after what was queued before."""
        return self._queue(self._writer.submit(self._timed, writer.write, name, tensor))

    def copy(self, writer: ShardWriter, name: str, info: TensorInfo, src: str | Path) -> Future:
        """Copy tensor `info` of `src` unchanged into `writer` after what was queued before (`ShardWriter.copy`)."""
        return self._queue(self._writer.submit(self._timed, writer.copy, name, info, src))

    def copy_run(self, writer: ShardWriter, infos: list[TensorInfo], src: str | Path) -> Future:
        """Copy the adjacent tensors `infos` of `src` unchanged into `writer`, after what was queued before
        (`ShardWriter.copy_run`)."""
        return self._queue(self._writer.submit(self._timed, writer.copy_run, infos, src))

    def _queue(self, fut: Future) -> Future:
        self._pending = [f for f in self._pending if not f.done() or f.exception() is not None] + [fut]
        return fut

    def close_shard(self, writer: ShardWriter) -> None:
        """Close `writer` once its tensors are written; its fsync then runs on the fsync thread."""
        self._pending.append(self._writer.submit(self._close, writer))

    def wait(self, futures: Iterable[Future]) -> None:
        """Block until `futures` are done, re-raising the first error, counted in `wait_s`."""
        t0 = time.perf_counter()
        try:
            for fut in futures:
                fut.result()
        finally:
            self.wait_s += time.perf_counter() - t0

    def finish(self) -> None:
        """Wait for every write and fsync (the time counted in `sync_wait_s`)."""
        waited = self.wait_s
        try:
            self.wait(self._pending)
            self.wait([fut for fut, _ in self._syncing])
        finally:
            self.sync_wait_s, self.wait_s = self.wait_s - waited, waited
            self.close()

    def close(self) -> None:
        """Stop the threads (work not yet started is dropped) and close every file handed over for fsync."""
        for pool in (self._writer, self._syncer):
            pool.shutdown(wait=True, cancel_futures=True)
        for _, f in self._syncing:
            f.close()

    def _timed(self, step: Any, *args: Any) -> None:
        """One write or copy on the writer thread, skipped once an earlier one failed, counted in `write_s`."""
        if self._failed is not None:
            raise self._failed
        t0 = time.perf_counter()
        try:
            step(*args)
        except BaseException as e:
            self._failed = e
            raise
        finally:
            self.write_s += time.perf_counter() - t0

    def _close(self, writer: ShardWriter) -> None:
        if self._failed is not None:
            raise self._failed
        writer.close()

    def writeback(self, writer: ShardWriter, start: int, end: int) -> None:
        """Start writing bytes `start`..`end` of `writer`'s file to disk, on the fsync thread, without waiting for
        the disk: a hint (the shard's fsync still writes and waits for every page, and reports any error)."""
        self._syncer.submit(self._writeback, writer, start, end)

    def _writeback(self, writer: ShardWriter, start: int, end: int) -> None:
        t0 = time.perf_counter()
        start_writeback(writer.fileno(), start, end - start)
        self.sync_s += time.perf_counter() - t0

    def sync(self, f: BinaryIO) -> None:
        """fsync and close `f` (flushed) on the fsync thread; `finish` waits for it."""
        self._syncing.append((self._syncer.submit(self._fsync, f), f))

    def _fsync(self, f: BinaryIO) -> None:
        t0 = time.perf_counter()
        try:
            os.fsync(f.fileno())
        finally:
            f.close()
        self.sync_s += time.perf_counter() - t0


def _sync_file_range() -> Any:
    """libc's sync_file_range (Linux), or None where there is none: Python's os module does not wrap it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()


def _madvise() -> Any:
    """libc's madvise through ctypes, which lets go of the GIL for the call (Python's `mmap.madvise` holds it), so
    that the merge's worker threads make their pages writable side by side; None where libc has none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()


def populate_write(m: mmap.mmap) -> None:
    """Make every page of the shared mapping `m` writable at once, in one call, rather than one write fault per page
    (MADV_POPULATE_WRITE, Linux 5.14+). A hint: where the kernel or libc lacks it, the pages fault in as written."""
    if _MADVISE is None:
        return
    view = (ctypes.c_char * len(m)).from_buffer(m)
    try:
        _MADVISE(ctypes.addressof(view), len(m), MADV_POPULATE_WRITE)  # an error return is ignored: a hint
    finally:
        del view  # the buffer export must go before the mapping can be closed


def start_writeback(fd: int, start: int, n: int) -> None:
    """Ask the kernel to start writing the dirty pages of bytes `start`..`start + n` of `fd` now, not when its
    flusher gets to them. Only a hint, and ignored where the call does not exist or fails: the data is on disk
    only once the file is fsynced, and the fsync reports what went wrong."""
    if _SYNC_FILE_RANGE is not None and n > 0:
        _SYNC_FILE_RANGE(fd, start, n, SYNC_FILE_RANGE_WRITE)


def tensor_bytes(t: torch.Tensor) -> Any:
    """A tensor's bytes as a buffer (no copy when contiguous): what a safetensors file stores for it."""
    import torch  # deferred: torch

    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


class ShardWriter:
    """Write a safetensors file tensor by tensor; the layout is fixed before the first byte.

    With a `WriteBehind`, `close` leaves the fsync (and the close) of the finished file to its thread.
    """

    def __init__(
        self,
        path: str | Path,
        layout: list[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
        behind: WriteBehind | None = None,
    ):
        self.path = Path(path)
        self.behind = behind
        self._handed = False
        header: dict = {}
        if metadata:
            header["__metadata__"] = metadata
        offset = 0
        self._expected: list[tuple[str, str, tuple[int, ...], int]] = []
        self._offsets: dict[str, tuple[int, int]] = {}  # name -> (index in the layout, data offset)
        for name, dtype, shape in layout:
            n = _numel(shape) * _itemsize(dtype)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._offsets[name] = (len(self._expected), offset)
            self._expected.append((name, dtype, tuple(shape), n))
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._data_start = 8 + len(blob)
        # unbuffered: each tensor is one write straight from its own memory, and `copy` may move the offset;
        # readable too, for `mapped`
        self._f = open(self.path, "w+b", buffering=0)
        _write_all(self._f.fileno(), memoryview(struct.pack("<Q", len(blob)) + blob))
        self._i = 0

    def _next(self, name: str, dtype: str, shape: tuple[int, ...]) -> int:
        """The planned byte count of the next tensor, once `name`, `dtype` and `shape` match the plan."""
        exp_name, exp_dtype, exp_shape, n = self._expected[self._i]
        if name != exp_name or dtype != exp_dtype or tuple(shape) != exp_shape:
            raise PortLLMError(f"internal: tensor {name!r} does not match the planned layout of {self.path.name}")
        return n

    def write(self, name: str, tensor: torch.Tensor) -> None:
        n = self._next(name, dtype_names()[tensor.dtype], tuple(tensor.shape))
        if n:
            _write_all(self._f.fileno(), memoryview(tensor_bytes(tensor)).cast("B"))
        self._i += 1

    def copy(self, name: str, info: TensorInfo, src: str | Path) -> None:
        """Write tensor `info` of file `src` unchanged: a kernel copy of its byte range (as `cp` does), no
        read into this process. The bytes are those `write` would store after reading it."""
        n = self._next(name, info.dtype, info.shape)
        if n:
            fd = os.open(src, os.O_RDONLY)
            try:
                _copy_range(fd, self._f.fileno(), info.start, n)
            finally:
                os.close(fd)
        self._i += 1

    def copy_run(self, infos: list[TensorInfo], src: str | Path) -> None:
        """`copy` of adjacent tensors of `src` (each ending where the next starts), as one kernel copy."""
        for a, b in zip(infos, infos[1:]):
            if a.end != b.start:
                raise PortLLMError(f"internal: {a.name!r} and {b.name!r} are not adjacent in {Path(src).name}")
        for info in infos:
            self._next(info.name, info.dtype, info.shape)
            self._i += 1
        n = sum(info.nbytes for info in infos)
        if n:
            fd = os.open(src, os.O_RDONLY)
            try:
                _copy_range(fd, self._f.fileno(), infos[0].start, n)
            finally:
                os.close(fd)

    def fileno(self) -> int:
        return self._f.fileno()

    def span(self, first: str, last: str) -> tuple[int, int]:
        """The file's byte range from the start of tensor `first` to the end of tensor `last`."""
        (_, a), (j, b) = self._offsets[first], self._offsets[last]
        return self._data_start + a, self._data_start + b + self._expected[j][3]

    @contextmanager
    def mapped(self, name: str) -> Iterator[torch.Tensor]:
        """Tensor `name`, already written, as a writable tensor over the file's own pages (a shared mapping):
        changed in place, with no read into this process's memory and no write back from it. Its address is
        aligned as its offset in the file is, so to its dtype only if the file's layout is. Its pages are this
        process's until the caller drops the tensor (and every view of it)."""
        import torch  # deferred: torch

        i, offset = self._offsets[name]
        _, dtype, shape, n = self._expected[i]
        if i >= self._i:
            raise PortLLMError(f"internal: {name!r} is mapped in {self.path.name} before it is written")
        start = self._data_start + offset
        if n == 0:
            yield torch.empty(shape, dtype=torch_dtypes()[dtype])
            return
        page = start - start % mmap.PAGESIZE
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # the pages are in the page cache: map them all
        m = mmap.mmap(self._f.fileno(), start + n - page, flags=flags, offset=page)
        populate_write(m)
        # the tensor holds the mapping (never closed here: a view kept elsewhere would point at nothing); it is
        # unmapped when the last view of it goes
        view = (
            torch.frombuffer(m, dtype=torch.uint8, count=n, offset=start - page).view(torch_dtypes()[dtype]).view(shape)
        )
        del m
        yield view

    def close(self) -> None:
        if self._i != len(self._expected):
            self._f.close()
            raise PortLLMError(f"internal: {self.path.name} got {self._i} of {len(self._expected)} tensors")
        if self.behind is not None:
            self.behind.sync(self._f)  # its thread fsyncs and closes the file
            self._handed = True
            return
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        if not self._f.closed and not self._handed:  # a handed-over file is closed by its WriteBehind
            self._f.close()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: str) -> int:
    return DTYPE_SPECS[dtype][0]


def _write_all(fd: int, view: memoryview) -> None:
    """Write every byte of `view` at the file's offset (a single write call may store less than asked)."""
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])


def _copy_range(src: int, dst: int, start: int, n: int) -> None:
    """Copy `n` bytes of `src` from `start` to `dst`'s offset: copy_file_range (in the kernel), or, where the
    two files cannot use it (different file systems), a plain read and write of 8 MiB blocks."""
    done = 0
    try:
        while done < n:
            got = os.copy_file_range(src, dst, n - done, start + done)
            if got <= 0:
                raise PortLLMError(f"unexpected end of file copying bytes {start}-{start + n} of a source shard")
            done += got
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    buf = bytearray(min(n - done, 8 << 20))
    while done < n:
        got = os.preadv(src, [memoryview(buf)[: n - done]], start + done)
        if got <= 0:
            raise PortLLMError(f"unexpected end of file copying bytes {start}-{start + n} of a source shard")
        _write_all(dst, memoryview(buf)[:got])
        done += got
