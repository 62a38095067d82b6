"""Benchmark file readers; every row remembers its file and line so data errors can name them."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PortLLMError

csv.field_size_limit(1 << 24)

Rows = list[dict[str, Any]]


def row_error(row: dict[str, Any], what: str) -> PortLLMError:
    return PortLLMError(f"{row.get('_file', '?')}:{row.get('_line', '?')}: {what}")


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """A data file as text; bytes that are not UTF-8 are refused with their line, not a traceback."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PortLLMError(f"{path}: cannot read ({e.strerror or e.__class__.__name__})") from None
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PortLLMError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); re-save it as UTF-8") from None


def read_jsonl(path: Path) -> Rows:
    rows = []
    for n, line in enumerate(io.StringIO(read_text(path), newline=None), 1):  # universal newlines, as open()
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise PortLLMError(f"{path}:{n}: malformed JSON line ({e.msg})") from None
        except RecursionError:
            raise PortLLMError(f"{path}:{n}: malformed JSON line (nested too deeply)") from None
        if not isinstance(row, dict):
            raise PortLLMError(f"{path}:{n}: expected a JSON object")
        rows.append({**row, "_line": n, "_file": str(path)})
    return rows


def read_tsv(path: Path, header: list[str] | None = None) -> Rows:
    """GLUE-style TSV; `header` for files that have none. quoting off, as GLUE files need."""
    rows = []
    reader = csv.reader(io.StringIO(read_text(path, "utf-8-sig"), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    cols = header
    try:
        for n, rec in enumerate(reader, 1):
            if cols is None:
                cols = rec
                continue
            if not rec or rec == [""]:
                continue
            if len(rec) != len(cols):
                raise PortLLMError(f"{path}:{n}: expected {len(cols)} tab-separated fields, found {len(rec)}")
            rows.append({**dict(zip(cols, rec)), "_line": n, "_file": str(path)})
    except csv.Error as e:
        raise PortLLMError(f"{path}:{reader.line_num}: unreadable TSV line ({e})") from None
    return rows


def read_json(path: Path) -> Rows:
    """A JSON file holding a list of objects (one per row); a row's "line" is its position in the list."""
    try:
        data = json.loads(read_text(path))
    except ValueError as e:
        raise PortLLMError(f"{path}: malformed JSON ({getattr(e, 'msg', e)})") from None
    except RecursionError:
        raise PortLLMError(f"{path}: malformed JSON (nested too deeply)") from None
    if not isinstance(data, list):
        raise PortLLMError(f"{path}: expected a JSON list of objects, found a JSON {type(data).__name__}")
    for n, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise PortLLMError(f"{path}: item {n}: expected a JSON object")
    return [{**row, "_line": n, "_file": str(path)} for n, row in enumerate(data, 1)]


def read_csv(path: Path, header: list[str] | None = None) -> Rows:
    """CSV with a header row (or `header`), quoted as spreadsheets write it; every value is text."""
    rows = []
    reader = csv.reader(io.StringIO(read_text(path, "utf-8-sig"), newline=""))
    cols = header
    try:
        for rec in reader:
            n = reader.line_num
            if cols is None:
                cols = rec
                continue
            if not rec:
                continue
            if len(rec) != len(cols):
                raise PortLLMError(f"{path}:{n}: expected {len(cols)} comma-separated fields, found {len(rec)}")
            rows.append({**dict(zip(cols, rec)), "_line": n, "_file": str(path)})
    except csv.Error as e:
        raise PortLLMError(f"{path}:{reader.line_num}: unreadable CSV line ({e})") from None
    return rows


def read_parquet(path: Path) -> Rows:
    """A Parquet table, one row per record; needs pyarrow (installed with datasets)."""
    try:
        import pyarrow.parquet as pq  # deferred: pyarrow is optional and slow to import
    except ImportError:
        raise PortLLMError(f"{path}: reading Parquet needs pyarrow; pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise PortLLMError(f"{path}: unreadable Parquet file ({str(e).splitlines()[0][:200]})") from None
    return [{**row, "_line": n, "_file": str(path)} for n, row in enumerate(table.to_pylist(), 1)]


def attach_labels(path: Path, rows: Rows, suffix: str = "-labels.lst") -> Rows:
    """WinoGrande/PIQA keep labels in a sibling .lst file, line for line; no such file, no labels."""
    lst = path.with_name(path.stem + suffix)
    if lst.is_file():
        labels = [line.strip() for line in read_text(lst).splitlines() if line.strip()]
        if len(labels) != len(rows):
            raise PortLLMError(f"{lst}: {len(labels)} labels for {len(rows)} rows in {path.name}")
        for r, lab in zip(rows, labels):
            r.setdefault("label", lab)
    return rows


def with_labels(reader: Callable[[Path], Rows], suffix: str = "-labels.lst") -> Callable[[Path], Rows]:
    return lambda path: attach_labels(path, reader(path), suffix)


FORMATS = ("jsonl", "json", "csv", "tsv", "parquet")


def format_of(path: str) -> str | None:
    """The format a data file's suffix names (`.jsonl` -> jsonl), or None."""
    suffix = path.rsplit(".", 1)[-1].lower() if "." in path else ""
    return suffix if suffix in FORMATS else None


@dataclass(frozen=True)
class Reader:
    """A definition's `reader:` block: file format, header overrides by file, sibling labels file."""

    format: str = "jsonl"  # one of FORMATS, or "auto": each file as its suffix says
    headers: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (path relative to the data dir, columns)
    labels: str | None = None  # suffix of the sibling labels file, e.g. "-labels.lst"

    def header_for(self, path: Path) -> list[str] | None:
        p = path.as_posix()
        for rel, cols in self.headers:
            if p == rel or p.endswith("/" + rel):
                return list(cols)
        return None

    def __call__(self, path: Path) -> Rows:
        fmt = format_of(path.name) if self.format == "auto" else self.format
        if fmt in ("tsv", "csv"):
            rows = (read_tsv if fmt == "tsv" else read_csv)(path, self.header_for(path))
        else:
            rows = {"jsonl": read_jsonl, "json": read_json, "parquet": read_parquet}[fmt](path)
        return attach_labels(path, rows, self.labels) if self.labels else rows
