"""The port itself: θ' + λ·Δθ, training-free, streamed tensor by tensor.

Two outputs. Merged (default): a standalone model directory that transformers loads, written
shard by shard and tensor by tensor, so peak memory is one tensor plus the patch, not the
model. Adapter (`as_adapter`): the same factors re-stamped for the new base, for runtime
attach by PEFT or vLLM.

The merged model behaves as PEFT's runtime attach of the patch does. On a base whose head is
tied to its input embedding (SmolLM2, Gemma), a patch that replaces or adapts one of the two
changes only that one at runtime (PEFT wraps one module; the other keeps the shared weight), so
the merged model is written untied: both tensors stored, `tie_word_embeddings` false.

A merged port starts copying the base's shards (`BaseCopy`) before it imports torch, loads the patch or checks it:
this module imports nothing that needs torch until `port` runs, and the copy, most of a port's time as it is of a
`cp -r`, runs while they load. A port refused after that stops the copy and removes its temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import __version__
from .atomic import atomic_dir
from .errors import PortLLMError
from .models import BaseRef, copy_side_files, fingerprint, weight_files
from .progress import Bar
from .resources import Usage, measure
from .stream import Header, ShardWriter, TensorInfo, WriteBehind, read_header, read_tensor

if TYPE_CHECKING:
    import torch

    from .check import CheckReport
    from .patch import Patch
    from .sign import TrustedKey, Verification

PROVENANCE = "portllm_provenance.json"


@dataclass
class PortTimings:
    """Where a merged port's time went, in seconds (`benchmarks/port_speed.py` prints it).

    The loop maps (`read`: a shard's bytes, copied in the kernel, mapped; read into memory only in the shards of an
    untie) and adds; `write` (into the page cache: the kernel copies, or writes from memory) and `sync` (fsync of each
    shard, so that the output is on disk before it is renamed into place) are the busy seconds of the threads beside it,
    `wait` is what the loop spent blocked on them (the part of their cost the wall time shows) and `sync_wait` what it
    then spent waiting for the last fsyncs: durability's visible cost. `check` includes importing torch and hashing a
    base this machine has not hashed before (later ports find it in the cache); the copy runs beside it from the
    port's start (`overlap`: its seconds before the loop began). The output itself is not hashed: see `PortResult`.
    """

    check: float = 0.0  # resolving the base, importing torch, loading the patch, the compatibility check
    overlap: float = 0.0  # the copy's seconds before the merge loop began: torch's import and the check beside it
    read: float = 0.0
    add: float = 0.0
    write: float = 0.0
    sync: float = 0.0
    wait: float = 0.0
    sync_wait: float = 0.0
    finish: float = 0.0  # provenance, the output's fingerprint, the rename into place
    total: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class PortResult:
    """What a port wrote. A merged output's sampled `result_fingerprint` is taken at port time; its full content
    sha256 is not (a second pass over every byte): `models.content_sha256(out)` takes it on
    first use and remembers it by file identity. The provenance file records what determines the output
    instead: the base's content sha256 and fingerprint, the patch manifest (sha256 of each patch file), scale.
    """

    out: Path
    mode: str
    report: CheckReport
    applied: int = 0
    replaced: int = 0
    usage: Usage = field(default_factory=Usage)
    result_fingerprint: str | None = None
    verification: Verification | None = None  # set when a signature was required
    timings: PortTimings = field(default_factory=PortTimings)  # merged ports; not part of to_dict

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "mode": self.mode,
            "verdict": self.report.verdict,
            "applied": self.applied,
            "replaced": self.replaced,
            "result_fingerprint": self.result_fingerprint,
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
    by another key is refused before any of its tensors is read, and nothing is left written (the copy of the
    base's own bytes, begun meanwhile, is stopped and removed).
    """
    t0 = time.perf_counter()
    with ExitStack() as stack:
        copy = None
        if not as_adapter:  # before anything imports torch: the base's bytes are on their way while it loads
            ref = BaseRef.of(base)  # resolved once: the copy, check, the merge and the provenance share it
            copy = stack.enter_context(BaseCopy(ref, stack.enter_context(atomic_dir(out, overwrite=overwrite))))
        with measure() as usage:
            # deferred: torch (the check, the patch format and its signatures import it)
            from .check import check
            from .patch import now
            from .sign import load_patch, signature_record

            patch, verification = load_patch(patch, require_signature, trusted)
            ref = copy.ref if copy else BaseRef.of(base)
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
            checked = time.perf_counter()
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
            if copy is None:
                patch.restamped(target, event, scale).save(out, overwrite=overwrite)
                result = PortResult(Path(out), "adapter", rep, applied=len(patch.modules))
            else:
                result = _merge_streaming(patch, copy, Path(out), scale, event, rep, progress)
    result.usage = usage
    result.verification = verification
    result.timings.check = checked - t0
    result.timings.total = time.perf_counter() - t0
    if copy is not None:
        result.timings.finish = time.perf_counter() - copy.finishing  # the rename into place included
        usage.wall_s = result.timings.total  # the copy began before `measure` (whose import of torch it overlaps)
    return result


@dataclass
class BaseCopy:
    """The base's shards copied into the output's temporary directory on the write thread, from a merged port's first
    moment: a kernel copy of every byte, as `cp` makes, `RUN` bytes at a time, queued at once. torch's import, loading
    the patch and the check run meanwhile; the merge then waits for each run and updates its patched tensors in place
    (`_Merge`). A context manager: leaving it on an error stops the copy (the run under way finishes, the rest is
    dropped) and closes every output file, so that the temporary directory can go.
    """

    RUN = 64 << 20

    ref: BaseRef
    tmp: Path

    def __post_init__(self) -> None:
        self.started = time.perf_counter()
        self.finishing = 0.0  # when the merge loop was done: the `finish` stage starts there
        self.files = weight_files(self.ref.path)
        self.headers = [read_header(f) for f in self.files]
        self.behind = WriteBehind()
        self.writers: list[ShardWriter] = []  # every output shard's, closed by `stop`
        # shard name -> its writer and its runs, in file order: the tensors of each and its copy
        self.shards: dict[str, tuple[ShardWriter, list[tuple[list[TensorInfo], Future]]]] = {}
        try:
            for f, h in zip(self.files, self.headers):
                infos = sorted(h.tensors.values(), key=lambda t: t.start)
                layout = [(t.name, t.dtype, t.shape) for t in infos]
                writer = ShardWriter(self.tmp / f.name, layout, h.metadata, self.behind)
                self.writers.append(writer)
                runs = [(part, self.behind.copy_run(writer, part, f)) for part in _runs(infos, self.RUN)]
                self.shards[f.name] = (writer, runs)
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> BaseCopy:
        return self

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None:
            self.stop()

    def stop(self) -> None:
        self.behind.close()  # threads stopped first: no write is under way when the files are closed
        for w in self.writers:
            w.abort()

    def wait(self, runs: list[Future], shard: str) -> None:
        """Until the copy of `runs` (of `shard`) is done. A copy that failed other than as a file system fails (an
        OSError, which `atomic_dir` words), or that was stopped, is a one-line error."""
        try:
            self.behind.wait(runs)
        except (OSError, PortLLMError, KeyboardInterrupt):
            raise
        except CancelledError:
            raise PortLLMError(
                f"the copy of {self.ref.name}'s shards stopped before {shard}; nothing was written"
            ) from None
        except Exception as e:
            why = str(e).splitlines()[0] if str(e) else "no message"
            raise PortLLMError(
                f"copying {shard} of {self.ref.name} failed ({e.__class__.__name__}: {why}); nothing was written"
            ) from e


@dataclass
class _Update:
    """What the patch does to each base tensor: LoRA modules add ΔW, full weights replace the tensor."""

    patch: Patch
    scale: float
    result: PortResult

    def __post_init__(self) -> None:
        self.by_weight = {m.weight_name: m for m in self.patch.modules.values()}
        self.full = self.patch.full_weights
        self.lock = threading.Lock()  # the merge's worker threads count side by side

    def touches(self, name: str) -> bool:
        return name in self.by_weight or name in self.full

    def __call__(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """The tensor to write for `name`; a LoRA update is added into `w` itself (the caller's own buffer)."""
        if name in self.by_weight:
            with self.lock:
                self.result.applied += 1
            return self.by_weight[name].add_to(w, self.scale)
        if name in self.full:
            with self.lock:
                self.result.replaced += 1
            return self.full[name].to(w.dtype)
        return w


def _merge_streaming(
    patch: Patch, copy: BaseCopy, out: Path, scale: float, event: dict[str, Any], rep: CheckReport, progress: bool
) -> PortResult:
    import torch  # deferred: torch (loaded by the check by now)

    ref, tmp = copy.ref, copy.tmp
    result = PortResult(out, "merged", rep)
    update = _Update(patch, scale, result)
    _refuse_quantized_targets(ref, copy.headers, update)
    untie = _untie(patch, ref)
    total = sum(len(h.tensors) for h in copy.headers) + (1 if untie and untie[1] not in ref.index else 0)
    timings = result.timings
    threads = torch.get_num_threads()
    with Bar(progress, total, "porting") as bar:
        index_file = _write_side_files(ref, tmp, untie)
        merge = _Merge(copy, update, untie, index_file, timings, bar)
        # each update runs single-threaded on its worker (`_Merge.WORKERS` of them, one tensor each); writing and
        # fsync run on their own threads. torch's intra-op pool would compete with them all, and on a busy machine
        # turns each small block update into a slow barrier
        torch.set_num_threads(1)
        timings.overlap = time.perf_counter() - copy.started
        try:  # on an error `BaseCopy` stops the threads, then closes every shard's file
            merge.run()
            copy.behind.finish()
        finally:
            torch.set_num_threads(threads)
    behind = copy.behind
    timings.write, timings.sync, timings.wait = behind.write_s, behind.sync_s, behind.wait_s
    timings.sync_wait = behind.sync_wait_s
    copy.finishing = time.perf_counter()
    result.result_fingerprint = fingerprint(tmp)  # sampled: reads 64 small slices of each tensor
    _write_provenance(tmp, patch, event, rep, result, untie)
    _fsync_side_files(tmp)
    return result


def _runs(infos: list[TensorInfo], size: int) -> list[list[TensorInfo]]:
    """`infos` (in file order) cut into runs of adjacent tensors of at least `size` bytes (the last may be less)."""
    runs: list[list[TensorInfo]] = [[]]
    n = 0
    for info in infos:
        if n >= size:
            runs.append([])
            n = 0
        runs[-1].append(info)
        n += info.nbytes
    return runs


def _refuse_quantized_targets(ref: BaseRef, headers: list[Header], update: _Update) -> None:
    """Before any tensor is updated: never add ΔW to (or replace) raw quantized or integer values."""
    from .check import FLOAT_DTYPES  # deferred: torch. ΔW adds to these; F8 and integers hold scaled values

    for h in headers:
        for info in h.tensors.values():
            if update.touches(info.name) and info.dtype not in FLOAT_DTYPES:
                raise PortLLMError(
                    f"cannot port onto {ref.name}: {info.name} is stored as {info.dtype} (quantized or integer "
                    "values, ΔW cannot be added to them); use an unquantized (bf16/fp32) base"
                )


def _write_side_files(ref: BaseRef, tmp: Path, untie: tuple[str, str] | None) -> Path | None:
    """Config, tokenizer and the shard index; the output's index file when the base has one."""
    copy_side_files(ref.path, tmp)
    if untie:
        _write_untied_config(ref, tmp)
    index_file = ref.path / "model.safetensors.index.json"
    if not index_file.is_file():
        return None
    shutil.copy2(index_file, tmp / index_file.name)
    return tmp / index_file.name


@dataclass
class _Merge:
    """Writes the output shards: copies of the base's bytes updated in place, or read, updated and written.

    In place (every shard but those holding an untied embedding or head): `BaseCopy` has the `WriteBehind` thread copy
    the shard's bytes in the kernel, as `cp` does, a run of tensors at a time; each patched tensor is then updated
    where it lies in the output's page cache, through a shared mapping. A tensor is never read into this process
    nor written from it: one copy of each byte, as `cp` makes, plus the update. A run is updated once the run after it
    is copied too, so no page it shares with its neighbour is written while it is updated. Once updated, a run's
    writeback starts (`WRITEBACK`): the fsync before the rename, which makes the output all or nothing even after a
    power cut, then waits only for what the disk has not yet taken. The update is the same function on the same values
    in either path (an fp32 tensor not aligned as our buffers are is updated on an aligned copy: `_update_in_place`), so
    the bytes are the same.

    Read, update, write (the untie shards): read buffers are reused, `SLOTS` of them (one being filled, the
    others waiting to be written): a fresh allocation per tensor costs page faults and zeroing of every byte.
    """

    SLOTS = 3
    WRITEBACK = True
    ALIGN = 64  # torch's CPU allocator aligns every buffer to 64 bytes
    WORKERS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)

    copy: BaseCopy
    update: _Update
    untie: tuple[str, str] | None
    index_file: Path | None
    timings: PortTimings
    bar: Bar

    def __post_init__(self) -> None:
        self.ref, self.tmp, self.behind = self.copy.ref, self.copy.tmp, self.copy.behind
        self.slots: list[list[Any]] = [[None, []] for _ in range(self.SLOTS)]  # [buffer, futures using it]
        self.turn = 0
        self.lock = threading.Lock()  # the timings, summed over the worker threads
        # runs whose patched tensors are being updated by the workers: (writer, tensors, their updates, last run)
        self.updating: deque[tuple[ShardWriter, list[TensorInfo], list[Future], bool]] = deque()

    def run(self) -> None:
        """Every output shard, in the base's file order. The patched tensors of the in-place shards are updated by
        `WORKERS` threads (torch lets go of the GIL in its kernels, and the page-populating call is made without
        it), each tensor whole on one thread; the loop hands them out a run at a time and finishes the runs in order.
        On an error the workers finish the tensor in hand and drop the rest (`BaseCopy` then removes the output)."""
        with ThreadPoolExecutor(self.WORKERS, thread_name_prefix="portllm-update") as pool:
            try:
                self._run(pool)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise

    def _run(self, pool: ThreadPoolExecutor) -> None:
        runs: deque[tuple[ShardWriter, list[TensorInfo], Future, bool]] = deque()  # copied or being copied
        emb, head = self.untie or (None, None)
        for f, h in zip(self.copy.files, self.copy.headers):
            writer, copied = self.copy.shards[f.name]
            if self.untie and (emb in h.tensors or head in h.tensors):
                while runs:
                    self._update_run(runs, pool)
                while self.updating:
                    self._finish_run()
                self.rewrite(f, h)
                continue
            for k, (part, fut) in enumerate(copied):
                runs.append((writer, part, fut, k == len(copied) - 1))
                while len(runs) > 1:  # a run is updated once the run after it is copied too
                    self._update_run(runs, pool)
        while runs:
            self._update_run(runs, pool)
        while self.updating:
            self._finish_run()

    def _update_run(self, runs: deque[tuple[ShardWriter, list[TensorInfo], Future, bool]], pool: Any) -> None:
        """Hand the patched tensors of the oldest copied run to the workers; finish the runs they are done with."""
        writer, part, copied, last = runs.popleft()
        after = [runs[0][2]] if runs and runs[0][0] is writer else []  # the next run, where it shares a page
        self.copy.wait([copied, *after], writer.path.name)
        todo = [pool.submit(self._update_mapped, writer, i.name) for i in part if self.update.touches(i.name)]
        self.updating.append((writer, part, todo, last))
        # at most two runs in the workers' hands: enough to keep every worker busy at a run's end
        while self.updating and (len(self.updating) > 2 or all(f.done() for f in self.updating[0][2])):
            self._finish_run()

    def _finish_run(self) -> None:
        """Once the oldest run's tensors are updated: start its writeback; close its shard after its last run."""
        writer, part, todo, last = self.updating.popleft()
        for fut in todo:
            fut.result()  # a worker's error is raised here, in the loop
        self.bar.advance(len(part))
        if self.WRITEBACK and part:  # the run is final: the disk can take it now rather than all at once in the fsync
            self.behind.writeback(writer, *writer.span(part[0].name, part[-1].name))
        if last:
            writer.close()  # every byte is in place: its fsync runs on the fsync thread

    def _update_mapped(self, writer: ShardWriter, name: str) -> None:
        """One patched tensor, updated where it lies in the output's page cache (on a worker thread)."""
        t0 = time.perf_counter()
        with writer.mapped(name) as w:
            mapped = time.perf_counter()
            self._update_in_place(name, w)
            del w
        with self.lock:
            self.timings.read += mapped - t0
            self.timings.add += time.perf_counter() - mapped

    def _update_in_place(self, name: str, w: torch.Tensor) -> None:
        """`_Update` on the mapped bytes `w`. An fp32 weight takes its update from a GEMM straight into it, whose
        kernel may round differently at another alignment: one not aligned as torch's own buffers are is updated
        on an aligned copy. Other dtypes are updated through an aligned fp32 block, element by element."""
        import torch  # deferred: torch (loaded by the check by now)

        align = self.ALIGN if w.dtype == torch.float32 else w.element_size()
        work = w if w.data_ptr() % align == 0 else w.clone()
        new = self.update(name, work)
        if tuple(new.shape) != tuple(w.shape) or new.dtype != w.dtype:
            raise PortLLMError(f"internal: the update of {name!r} does not match its planned layout")
        if new is not w:
            w.copy_(new)

    def rewrite(self, f: Path, h: Header) -> None:
        """The output shard of `f` written anew (`shard`) over its copy, once that copy is done."""
        writer, copied = self.copy.shards[f.name]
        self.copy.wait([fut for _, fut in copied], f.name)
        writer.abort()
        self.shard(f, h)

    def shard(self, f: Path, h: Header) -> None:
        """One output shard read, updated and written; an untied head goes right after its embedding."""
        emb, head = self.untie or (None, None)
        new_head = bool(self.untie) and head not in self.ref.index
        infos = sorted(h.tensors.values(), key=lambda t: t.start)
        layout = [(t.name, t.dtype, t.shape) for t in infos]
        if new_head and emb in h.tensors:
            e = h.tensors[emb]
            layout.insert(layout.index((e.name, e.dtype, e.shape)) + 1, (head, e.dtype, e.shape))
            if self.index_file is not None:
                _add_to_index(self.index_file, head, f.name, e.nbytes)
        writer = ShardWriter(self.tmp / f.name, layout, h.metadata, self.behind)
        self.copy.writers.append(writer)  # closed by `BaseCopy` on an error
        with open(f, "rb") as fh:
            for info in infos:
                if self._copies(info, emb, head):  # the base's bytes: a kernel copy, no read
                    self.behind.copy(writer, info.name, info, f)
                    self.bar.advance()
                    continue
                slot = self._slot(info.nbytes)
                t0 = time.perf_counter()
                w = read_tensor(info, f, fh.fileno(), slot[0])
                if info.name == head and self.untie:  # stored, but tied: at runtime it is the embedding
                    w = _read(self.ref, emb)
                self.timings.read += time.perf_counter() - t0
                base_emb = w.clone() if new_head and info.name == emb else None  # w takes emb's update
                slot[1] = self._apply(writer, info.name, w)
                if base_emb is not None:  # the untied head starts from the base embedding
                    slot[1] += self._apply(writer, head, base_emb)
                del w, base_emb
        self.behind.close_shard(writer)

    def _copies(self, info: TensorInfo, emb: str | None, head: str | None) -> bool:
        """Whether `info` goes to the output as the base stores it: not touched by the patch, not the head or
        embedding of an untie (those are read: one is rewritten, the other cloned)."""
        return not self.update.touches(info.name) and info.name not in (emb, head)

    def _slot(self, nbytes: int) -> list[Any]:
        """The next read buffer, once the tensors last read into it are written."""
        import torch  # deferred: torch (loaded by the check by now)

        slot = self.slots[self.turn % len(self.slots)]
        self.turn += 1
        self.behind.wait(slot[1])
        slot[1] = []
        if slot[0] is None or slot[0].numel() < nbytes:
            slot[0] = None  # free the old buffer before the larger one is allocated
            slot[0] = torch.empty(nbytes, dtype=torch.uint8)
        return slot

    def _apply(self, writer: ShardWriter, name: str, w: torch.Tensor) -> list[Future]:
        """Update one tensor and queue it; the futures to wait for before its memory is reused."""
        t0 = time.perf_counter()
        new = self.update(name, w)
        self.timings.add += time.perf_counter() - t0
        self.bar.advance()
        return [self.behind.write(writer, name, new)]


def _write_provenance(
    tmp: Path, patch: Patch, event: dict[str, Any], rep: CheckReport, result: PortResult, untie: tuple[str, str] | None
) -> None:
    provenance = {
        "tool": "portllm",
        "tool_version": __version__,
        "base": rep.target_info.to_dict(),
        "patch": patch.manifest.to_dict() if patch.manifest else None,
        "patch_path": str(patch.path) if patch.path else None,
        "port": event,
        "result_fingerprint": result.result_fingerprint,
    }
    if untie:
        provenance["untied"] = {"embedding": untie[0], "head": untie[1]}
    (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2))


def _fsync_side_files(tmp: Path) -> None:
    """Config, tokenizer, index and provenance on disk before the rename, as the shards are (`WriteBehind`): a
    power cut after the rename must not leave an output whose small files are empty."""
    for p in tmp.iterdir():
        if p.is_file() and p.suffix != ".safetensors":
            with open(p, "rb") as f:
                os.fsync(f.fileno())


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
