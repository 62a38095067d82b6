"""Wall time and peak memory of a block of work, the same way for train, port and reproduce.

On CPU the peak is the process's resident-set high-water mark, reset at the start of the
block through /proc/self/clear_refs (Linux) so successive steps are measured separately; on
GPU it is torch.cuda.max_memory_allocated. Blocks nest: before an inner block resets the
high-water mark, the outer blocks take note of it, so each block's peak covers its whole span.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Usage:
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float | None = None
    rss_reset: bool = False  # False: the peak covers the whole process so far, not just this block

    def to_dict(self) -> dict[str, float | None | bool]:
        return {
            "wall_s": round(self.wall_s, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "peak_gpu_mb": None if self.peak_gpu_mb is None else round(self.peak_gpu_mb, 1),
            "rss_reset": self.rss_reset,
        }


_open: list[Usage] = []  # the blocks being measured, outermost first


def _status_kb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    if _open:  # the high-water mark is about to be lost: the enclosing blocks keep it
        peak = peak_rss_mb()
        for u in _open:
            u.peak_rss_mb = max(u.peak_rss_mb, peak)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


@contextmanager
def measure() -> Iterator[Usage]:
    """`with measure() as u: ...` fills u.wall_s and u.peak_rss_mb (and u.peak_gpu_mb on CUDA)."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        gpu = torch.cuda.max_memory_allocated() / 2**20
        for outer in _open:
            outer.peak_gpu_mb = max(outer.peak_gpu_mb or 0.0, gpu)
        torch.cuda.reset_peak_memory_stats()
    u = Usage(rss_reset=reset_peak_rss())
    _open.append(u)
    t0 = time.perf_counter()
    try:
        yield u
    finally:
        u.wall_s = time.perf_counter() - t0
        _open.remove(u)
        u.peak_rss_mb = max(u.peak_rss_mb, peak_rss_mb())
        if cuda:
            u.peak_gpu_mb = max(u.peak_gpu_mb or 0.0, torch.cuda.max_memory_allocated() / 2**20)
