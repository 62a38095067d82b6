"""All-or-nothing outputs, even under kill -9.

Every command that writes a model or a patch builds it in a hidden sibling directory and
renames it into place at the end, so an interrupted or failed run leaves nothing half-written.
An exception (the CLI turns SIGINT and SIGTERM into one) removes the temporary directory at once.
SIGKILL, an OOM kill or a power cut cannot, and a hidden directory the size of the model would stay
forever: so every temporary name says who owns it (host, pid and the pid's start time, which tells a
live owner from a dead one whose pid was reused), and the next write into the same directory removes
what dead owners left, and puts back an output whose replacement was cut off between its two renames.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import PortLLMError

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
# .NAME.tmp-HOST-PID-START-RAND (being written) or .NAME.old-HOST-PID-START-RAND (replaced, about to go)
_OWNED = re.compile(
    r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]{8}$"
)


def owned_temp(path: str | Path, kind: str = "tmp") -> Path:
    """A fresh hidden sibling name for `path` that records this process as its owner."""
    path = Path(path)
    pid = os.getpid()
    return path.parent / f".{path.name}.{kind}-{_HOST}-{pid}-{_start_time(pid) or 0}-{uuid.uuid4().hex[:8]}"


def sweep_stale(parent: str | Path, name: str | None = None) -> None:
    """Remove temporaries in `parent` (only those of `name`, if given) whose owning process is gone.

    A stale `.old` whose output is missing is the previous output of a replacement cut off between
    its two renames: it is put back rather than removed. Names of other hosts are left alone.
    """
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for e in entries:
        m = _OWNED.match(e.name)
        if not m or (name is not None and m["name"] != name) or _alive(m["host"], int(m["pid"]), int(m["start"])):
            continue
        if m["kind"] == "old":
            target = Path(parent) / m["name"]
            if not os.path.lexists(target):
                try:
                    os.rename(e.path, target)
                    continue
                except OSError:
                    pass
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                os.unlink(e.path)
        except OSError:
            pass  # another process cleaned it first


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only if the block succeeds."""
    out = Path(out).absolute()
    if out.parent.is_dir():
        sweep_stale(out.parent)  # what killed writers left here, this output's included
    if out.exists() and not overwrite:
        raise PortLLMError(f"output {out} already exists; choose another path or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise PortLLMError(f"output {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = owned_temp(out)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir(tmp)
        if out.exists():
            old = owned_temp(out, "old")
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)  # the previous output goes back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        _fsync_dir(out.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise PortLLMError(f"disk full while writing {out}; nothing was written, free space and retry") from None
        raise PortLLMError(f"could not write {out}: {e.strerror or e}; nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a small file through a temp file and rename (removing temp files of this name that dead writers left)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path.parent, path.name)
    tmp = owned_temp(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise PortLLMError(f"could not write {path}: {e.strerror or e}") from None
        raise


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22); -1 for a zombie;
    None where /proc cannot tell (not Linux, or no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    if fields[0] in ("Z", "X"):
        return -1
    return int(fields[19])


def _alive(host: str, pid: int, start: int) -> bool:
    """Whether the owner of a temporary may still be writing it (unknown counts as alive)."""
    if host != _HOST or pid <= 0:
        return True  # another machine sharing this directory: its processes are not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except (OSError, OverflowError):
        return True
    now = _start_time(pid)
    if now == -1:
        return False  # a zombie writes nothing
    return now is None or not start or now == start  # another start time: the pid was reused


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
