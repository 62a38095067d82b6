"""Controlled base updates: θ(t) = θ + t·(θ' − θ) along one real update direction.

Real continued pretraining gives a handful of evolved bases, each a long run. Walking the
straight line from θ to a real θ' gives as many drift levels as a study needs, in seconds and
with the direction of a real update: t = 0 is θ itself (the zero-drift control), t = 1 is θ',
t > 1 extrapolates the same update further. Streamed tensor by tensor, like the port.
`portllm evolve --interpolate T --toward θ'` on the command line; `InterpolateResult.read` (or
`evolve.read_lineage`) reads the lineage the directory carries.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_dir
from .errors import PortLLMError
from .evolve import drift_by_type
from .models import copy_side_files, fingerprint, resolve_base, weight_files, weight_index
from .progress import Bar
from .stream import ShardWriter, read_header, read_tensor

LINEAGE = "portllm_lineage.json"


@dataclass
class InterpolateResult:
    """θ(t) and its lineage; `lineage()` is the directory's portllm_lineage.json, `to_dict()` adds `out` and `t`."""

    out: Path
    t: float
    fingerprint: str
    drift: dict[str, float]  # ||θ(t) − θ|| / ||θ|| per layer type
    wall_s: float
    parent: dict[str, str] = field(default_factory=dict)  # θ: name, fingerprint
    toward: dict[str, str] = field(default_factory=dict)  # θ': name, fingerprint

    def lineage(self) -> dict[str, Any]:
        return {
            "parent": self.parent,
            "interpolated": {
                "toward": self.toward.get("name"),
                "toward_fingerprint": self.toward.get("fingerprint"),
                "t": self.t,
            },
            "drift": self.drift,
            "fingerprint": self.fingerprint,
            "wall_s": self.wall_s,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "t": self.t, **self.lineage()}

    @classmethod
    def read(cls, model_dir: str | Path) -> InterpolateResult:
        """The lineage an interpolated model directory carries."""
        f = Path(model_dir) / LINEAGE
        if not f.is_file():
            raise PortLLMError(f"{model_dir} has no {LINEAGE}: it was not made by `portllm evolve --interpolate`")
        try:
            d = json.loads(f.read_text())
            i = d["interpolated"]
            return cls(
                Path(model_dir),
                float(i["t"]),
                d["fingerprint"],
                d["drift"],
                d["wall_s"],
                d["parent"],
                {"name": i["toward"], "fingerprint": i["toward_fingerprint"]},
            )
        except (ValueError, KeyError, TypeError) as e:
            raise PortLLMError(f"{f}: not the lineage of an interpolated model ({e!r})") from None


def interpolate(
    base: str | Path,
    evolved: str | Path,
    t: float,
    out: str | Path,
    overwrite: bool = False,
    progress: bool = False,
) -> InterpolateResult:
    """Write θ + t·(θ' − θ) with θ's shards, dtypes and side files; tensors θ' lacks stay θ's."""
    if not -1.0 <= t <= 4.0:
        raise PortLLMError(f"--interpolate {t} is outside [-1, 4]: that is no longer an update of this base")
    t0 = time.perf_counter()
    base_dir, new_dir = resolve_base(base), resolve_base(evolved)
    new_index = weight_index(new_dir)
    files = weight_files(base_dir)
    headers = [read_header(f) for f in files]
    mismatched = [
        n for h in headers for n, i in h.tensors.items() if n in new_index and new_index[n][1].shape != i.shape
    ]
    if mismatched:
        raise PortLLMError(f"{mismatched[0]} has another shape in {evolved}: not an update of {base}")
    with Bar(progress, sum(len(h.tensors) for h in headers), "interpolate") as bar, atomic_dir(out, overwrite) as tmp:
        copy_side_files(base_dir, tmp)
        if (base_dir / "model.safetensors.index.json").is_file():
            shutil.copy2(base_dir / "model.safetensors.index.json", tmp / "model.safetensors.index.json")
        for f, h in zip(files, headers):
            infos = sorted(h.tensors.values(), key=lambda i: i.start)
            writer = ShardWriter(tmp / f.name, [(i.name, i.dtype, i.shape) for i in infos], h.metadata)
            try:
                for info in infos:
                    w = read_tensor(info, f)
                    if info.name in new_index and t != 0.0:
                        nf, ni = new_index[info.name]
                        w0 = w.float()
                        w = (w0 + t * (read_tensor(ni, nf).float() - w0)).to(w.dtype)
                    writer.write(info.name, w)
                    bar.advance()
                writer.close()
            except BaseException:
                writer.abort()
                raise
        result = InterpolateResult(
            Path(out),
            t,
            fingerprint(tmp),
            drift_by_type(base_dir, tmp),
            0.0,
            {"name": str(base), "fingerprint": fingerprint(base_dir)},
            {"name": str(evolved), "fingerprint": fingerprint(new_dir)},
        )
        result.wall_s = time.perf_counter() - t0
        (tmp / LINEAGE).write_text(json.dumps(result.lineage(), indent=2))
    return result
