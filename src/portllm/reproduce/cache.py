"""Where the reproduction keeps each step's artefact under its cache directory, named by what made it.

Only the names live here; the steps decide what to compute on a miss. The layout and keys are those of
every earlier version (`evolved/KEY`, `patches/TASK-KEY`, `ports/KEY.json`, `ported/KEY`,
`evals/TASK-VARIANT-KEY`), so an existing cache keeps serving a rerun.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def key(*parts: Any) -> str:
    """16 hex digits of sha256 over the parts as sorted-key JSON (paths and other objects as str)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def files_key(files: list[Path]) -> list[tuple[str, int]]:
    """A corpus's identity in the θ' key: its files' names and sizes."""
    return [(f.name, f.stat().st_size) for f in files]


class ReproduceCache:
    """The paths of the cached artefacts under `root`."""

    def __init__(self, root: Path):
        self.root = root

    def evolved(self, fp_theta: str, corpus: str, files: list[Path], recipe: str) -> Path:
        """θ' made from θ by continued pretraining on the corpus with the recipe (`EvolveConfig.key()`)."""
        return self.root / "evolved" / key(fp_theta, corpus, files_key(files), recipe)

    def patch(self, task: str, model_fp: str, recipe: str) -> Path:
        """A patch for the task trained on the model with the recipe (`recipe_key`)."""
        return self.root / "patches" / f"{task}-{key(model_fp, recipe)}"

    def port_record(self, patch_sha: str | None, model_fp: str) -> Path:
        """The port step's own record (wall time, memory) of the patch ported onto the model."""
        return self.root / "ports" / f"{key(patch_sha, model_fp)}.json"

    def ported(self, record: Path) -> Path:
        """The ported model directory of a port record: scored, then deleted."""
        return self.root / "ported" / record.stem

    def eval_dir(self, task: str, variant: str, *parts: Any) -> Path:
        """An eval run of one variant on the task, keyed by what it scored and how."""
        return self.root / "evals" / f"{task}-{variant.replace('+', '_')}-{key(*parts)}"
