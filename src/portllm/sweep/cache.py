"""The sweep's cache: every artefact (a model directory or a JSON value) under PORTLLM_CACHE/sweep,
named by its kind and a hash of what made it, so a rerun finds it and a stopped sweep resumes.

Only lookup and storage live here; what makes an artefact is the caller's. The layout is
`ROOT/KIND/KEY` (directories) and `ROOT/KIND/KEY.json` (values), KEY = `key(ENGINE, *parts)`: it must
stay as it is, or every existing sweep cache is recomputed from scratch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic

ENGINE = "sweep-1"  # bump when a cached artefact's meaning changes


def key(*parts: Any) -> str:
    """16 hex digits of sha256 over the parts as sorted-key JSON (paths and other objects as str)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class SweepCache:
    """Cached artefacts by kind and key under `root`."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, kind: str, *parts: Any) -> Path:
        return self.root / kind / key(ENGINE, *parts)

    def json(self, kind: str, parts: tuple, make: Callable[[], Any]) -> Any:
        """The cached value of `make()` for these parts, computed and stored on a miss."""
        f = self.path(kind, *parts).with_suffix(".json")
        if f.is_file():
            return json.loads(f.read_text())
        value = make()
        write_text_atomic(f, json.dumps(value))
        return value

    def directory(self, kind: str, parts: tuple, done: str, make: Callable[[Path], Any]) -> Path:
        """The cached directory for these parts; `make(dir)` fills it on a miss. It counts as made once
        the file `done` (written last by its maker: a manifest, a lineage, results.json) exists."""
        d = self.path(kind, *parts)
        if not (d / done).is_file():
            make(d)
        return d
