"""Where a split's rows come from: the local data directory (fixed files and slices), else the hub."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import PortLLMError
from .readers import Rows
from .schema import DATA_VAR, Example, Hub, Task


def data_dir(explicit: str | Path | None = None) -> Path | None:
    """--data-dir, else $PORTLLM_DATA; None means: try the Hugging Face hub."""
    d = explicit or os.environ.get("PORTLLM_DATA")
    if not d:
        return None
    d = Path(d).expanduser()
    if not d.is_dir():
        raise PortLLMError(
            f"data directory {d} does not exist; point --data-dir or PORTLLM_DATA at a copy of the benchmark data"
        )
    return d


def load_rows(task: Task, split: str, data: str | Path | None = None) -> Rows:
    sp = task.train if split == "train" else task.eval
    if task.root is not None:
        rows = [r for f in user_files(task, split, data) for r in task.reader(f)]
        return rows[sp.rows[0] : sp.rows[1]]
    d = data_dir(data)
    if d is None:
        return hub_rows(task, split)
    rows: Rows = []
    for rel in sp.file.split("+"):
        f = d / rel
        if not f.is_file():
            raise PortLLMError(f"{task.name}: {f} is missing from the data directory {d}")
        rows += task.reader(f)
    return rows[sp.rows[0] : sp.rows[1]]


def user_files(task: Task, split: str, data: str | Path | None = None) -> list[Path]:
    """A user's task file's data files for `split`: relative to the task file's folder, absolute as they
    are, `${PORTLLM_DATA}/...` in the data directory (--data-dir, else $PORTLLM_DATA)."""
    files = []
    for rel in (task.train if split == "train" else task.eval).file.split("+"):
        if rel.startswith(DATA_VAR):
            d = data_dir(data)
            if d is None:
                raise PortLLMError(
                    f"{task.source}: {split}.file: {rel} needs a data directory; set PORTLLM_DATA or --data-dir"
                )
            f = d / rel[len(DATA_VAR) :]
        else:
            f = task.root / Path(rel).expanduser()
        if not f.is_file():
            raise PortLLMError(f"{task.source}: {split}.file: data file {f} does not exist")
        files.append(f)
    return files


def load_examples(
    task: Task, split: str = "eval", data: str | Path | None = None, limit: int | None = None
) -> list[Example]:
    """The split's examples in file order; `limit` keeps the first N."""
    rows = load_rows(task, split, data)
    if limit is not None:
        rows = rows[:limit]
    return [task.make(i, r) for i, r in enumerate(rows)]


def _lookup(row: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        row = row[part]
    return row


def hub_row(hub: Hub, row: dict[str, Any]) -> dict[str, Any]:
    """Reshape a hub row into the local files' layout, as the definition's `hub:` block says."""
    built = {}
    for target, src in hub.fields.items():
        if isinstance(src, dict):  # {"records": {"label": "choices.label", ...}}: parallel lists -> records
            cols = {k: _lookup(row, p) for k, p in src["records"].items()}
            built[target] = [dict(zip(cols, vals)) for vals in zip(*cols.values())]
        else:
            built[target] = _lookup(row, src)
    for target, value in built.items():
        *parents, leaf = target.split(".")
        node = row
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[leaf] = value
    for old, new in hub.rename.items():
        if old in row:
            row[new] = row.pop(old)
    for key, typ in hub.cast.items():
        v = row.get(key)
        if v is not None and not isinstance(v, str if typ == "str" else int):
            row[key] = str(v) if typ == "str" else int(v)
    return row


def hub_rows(task: Task, split: str) -> Rows:
    if task.hub is None:
        raise PortLLMError(f"{task.name}: no data directory set and no hub source; set PORTLLM_DATA or --data-dir")
    hub = task.hub
    try:
        from datasets import load_dataset

        ds = load_dataset(hub.path, hub.config, split=hub.splits[split])
    except Exception as e:
        raise PortLLMError(
            f"{task.name}: no data directory set (PORTLLM_DATA / --data-dir) and the Hugging Face hub is unreachable "
            f"({e.__class__.__name__}); point --data-dir at a local copy"
        ) from None
    where = f"hub:{hub.path}/{hub.config}/{hub.splits[split]}"
    return [hub_row(hub, dict(r, _line=n + 1, _file=where)) for n, r in enumerate(ds)]
