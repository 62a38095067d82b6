"""Task definition files (defs/*.yaml, after lm-evaluation-harness's task YAMLs) -> Task records.

Adding a task is adding a file; Python is needed only when a template cannot say it (hooks.py).
Every mistake in a file is one line naming the file and the field.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import yaml

from ..errors import PortLLMError
from .examples import ENV, Gold, Maker, Template
from .hooks import HOOKS
from .readers import FORMATS, Reader, format_of
from .schema import DATA_VAR, GEN_METRICS, KINDS, METRIC_KINDS, METRICS, Hub, Split, Task

DEFS = Path(__file__).with_name("defs")

KEYS = {
    "name": "the task's name (the file's name without .yaml)",
    "description": "one line for `portllm tasks`",
    "order": "position in listings (smaller first)",
    "paper": "true for the seven tasks of the PortLLM paper",
    "aliases": "other names `--tasks` accepts",
    "kind": "mc | gen",
    "metric": "acc | acc_norm | exact_match",
    "reader": "{format: jsonl|json|csv|tsv|parquet (default: the files' suffix), header: {file: [columns]}, labels}",
    "train": "{file, rows: [start, stop], note}; a user's file: relative to its folder, or ${PORTLLM_DATA}/...",
    "eval": "{file, rows: [start, stop], note}; a user's file: relative to its folder, or ${PORTLLM_DATA}/...",
    "hub": "{path, config, splits: {train, eval}, fields, rename, cast}",
    "fields": "[name, ...] or {variable: field | [field, fallback]}",
    "missing": "error message for a missing field",
    "builder": "a hook from hooks.py",
    "gold": "{field, map: {'true/1/yes': 1}}",
    "prompt": "Jinja2 template of the shared context (mc) or the generation prompt",
    "contexts": "one Jinja2 context per choice (partial scoring)",
    "choices": "Jinja2 continuation per choice, or the variable that holds the list",
    "continuation": "Jinja2 continuation shared by every choice",
    "target": "Jinja2 text a fine-tune learns after the prompt (gen)",
    "target_delimiter": "between context and continuation (default ' ')",
    "generation": "{stop: [...], max_new_tokens: N, metrics: [loglik, exact_match, chrf] (against target)}",
}


class _Def:
    """One parsed file, with typed getters whose errors name the file and the field."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path, self.data = path, data

    def fail(self, key: str, what: str) -> PortLLMError:
        return PortLLMError(f"{self.path}: {key}: {what}")

    def get(self, key: str, types: type | tuple[type, ...], default: Any = ..., within: dict | None = None) -> Any:
        """`key` is the dotted path for messages; its last part is looked up in `within` (default: the file)."""
        data, name = (self.data if within is None else within), key.rsplit(".", 1)[-1]
        if name not in data or data[name] is None:
            if default is ...:
                raise self.fail(key, "missing")
            return default
        value = data[name]
        if not isinstance(value, types) or (isinstance(value, bool) and types in (int, str)):
            names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise self.fail(key, f"expected {names}, found {type(value).__name__} {value!r}")
        return value

    def strings(self, key: str, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not value or not all(isinstance(s, str) for s in value):
            raise self.fail(key, f"expected a string or a list of strings (quote yes/no/true/false), found {value!r}")
        return tuple(value)

    def template(self, key: str, text: Any, known: set[str]) -> Template:
        if not isinstance(text, str):
            raise self.fail(key, f"expected a template string (quote yes/no/true/false), found {text!r}")
        try:
            unknown = sorted(jinja2.meta.find_undeclared_variables(ENV.parse(text)) - known)
            if unknown:
                raise self.fail(key, f"unknown variable {unknown[0]!r}; known: {', '.join(sorted(known)) or 'none'}")
            return Template.compile(text)
        except jinja2.TemplateSyntaxError as e:
            raise self.fail(key, f"bad template ({e.message})") from None


def _split(d: _Def, key: str) -> Split:
    spec = d.get(key, dict)
    for k in spec:
        if k not in ("file", "rows", "note"):
            raise d.fail(f"{key}.{k}", "unknown key; expected file, rows, note")
    files = d.strings(f"{key}.file", d.get(f"{key}.file", (str, list), within=spec))
    rows = d.get(f"{key}.rows", list, [None, None], within=spec)
    if len(rows) != 2 or not all(r is None or (isinstance(r, int) and not isinstance(r, bool)) for r in rows):
        raise d.fail(f"{key}.rows", f"expected [start, stop] (integers or null), found {rows!r}")
    return Split("+".join(files), (rows[0], rows[1]), d.get(f"{key}.note", str, "", within=spec))


def _reader(d: _Def, splits: dict[str, Split]) -> Reader:
    """The `reader:` block; without a format, each data file is read as its suffix says (`auto`)."""
    spec = d.get("reader", dict, {})
    for key, sp in splits.items():
        unnamed = next((f for f in sp.file.split("+") if format_of(f) is None), None)
        if "format" not in spec and unnamed is not None:
            names = ", ".join(FORMATS)
            raise d.fail(f"{key}.file", f"{unnamed}: a suffix naming its format ({names}), or give reader.format")
    fmt = d.get("reader.format", str, "auto", within=spec)
    if fmt not in FORMATS and not (fmt == "auto" and "format" not in spec):
        raise d.fail("reader.format", f"unknown format {fmt!r}; expected {' or '.join(FORMATS)}")
    headers = d.get("reader.header", dict, {}, within=spec)
    labels = d.get("reader.labels", str, None, within=spec)
    for k in spec:
        if k not in ("format", "header", "labels"):
            raise d.fail(f"reader.{k}", "unknown key; expected format, header, labels")
    return Reader(fmt, tuple((f, d.strings(f"reader.header.{f}", c)) for f, c in headers.items()), labels)


def _hub(d: _Def) -> Hub | None:
    spec = d.get("hub", dict, None)
    if spec is None:
        return None
    for k in spec:
        if k not in ("path", "config", "splits", "fields", "rename", "cast"):
            raise d.fail(f"hub.{k}", "unknown key; expected path, config, splits, fields, rename, cast")
    splits = d.get("hub.splits", dict, within=spec)
    if sorted(splits) != ["eval", "train"]:
        raise d.fail("hub.splits", f"expected {{train: ..., eval: ...}}, found {splits!r}")
    fields = d.get("hub.fields", dict, {}, within=spec)
    for k, src in fields.items():
        records = src.get("records") if isinstance(src, dict) else None
        ok = isinstance(src, str) or (
            isinstance(records, dict) and len(src) == 1 and all(isinstance(p, str) for p in records.values())
        )
        if not ok:
            raise d.fail(f"hub.fields.{k}", f"expected a field path or {{records: {{key: path}}}}, found {src!r}")
    cast = d.get("hub.cast", dict, {}, within=spec)
    for k, t in cast.items():
        if t not in ("str", "int"):
            raise d.fail(f"hub.cast.{k}", f"expected str or int, found {t!r}")
    return Hub(
        d.get("hub.path", str, within=spec),
        d.get("hub.config", str, None, within=spec),
        {k: str(v) for k, v in splits.items()},
        fields,
        d.get("hub.rename", dict, {}, within=spec),
        cast,
    )


def _fields(d: _Def) -> tuple[tuple[str, tuple[str, ...]], ...]:
    spec = d.get("fields", (list, dict), [])
    pairs = [(s, s) for s in d.strings("fields", spec)] if isinstance(spec, list) and spec else []
    if isinstance(spec, dict):
        pairs = list(spec.items())
    out = []
    for var, src in pairs:
        if not isinstance(var, str) or not var.isidentifier():
            raise d.fail("fields", f"{var!r} is not a usable template variable; map it: {{name: {var!r}}}")
        out.append((var, d.strings(f"fields.{var}", src)))
    return tuple(out)


def _gold(d: _Def, known: set[str]) -> Gold:
    spec = d.get("gold", dict)
    for k in spec:
        if k not in ("field", "map"):
            raise d.fail(f"gold.{k}", "unknown key; expected field, map")
    field = d.get("gold.field", str, within=spec)
    if field not in known:
        raise d.fail("gold.field", f"unknown variable {field!r}; known: {', '.join(sorted(known)) or 'none'}")
    mapping = d.get("gold.map", dict, None, within=spec)
    if mapping is None:
        return Gold(field)
    pairs = [(s.strip().lower(), v) for k, v in mapping.items() for s in str(k).split("/")]
    return Gold(field, tuple(pairs), "/".join(str(k).split("/")[0] for k in mapping))


def _maker(d: _Def, kind: str) -> Maker:
    fields = _fields(d)
    known = {v for v, _ in fields}
    hook = None
    if "builder" in d.data:
        name = d.get("builder", str)
        if name not in HOOKS:
            raise d.fail("builder", f"unknown hook {name!r}; known: {', '.join(sorted(HOOKS))}")
        hook = HOOKS[name]
        lacking = [v for v in hook.needs if v not in known]
        if lacking:
            raise d.fail("fields", f"hook {name!r} needs the variable {lacking[0]!r}")
        known |= set(hook.provides)
    gold = _gold(d, known)
    t = {k: d.template(k, d.data[k], known) for k in ("prompt", "continuation", "target") if k in d.data}
    contexts = tuple(d.template(f"contexts[{n}]", c, known) for n, c in enumerate(d.get("contexts", list, [])))
    choices: Any = d.get("choices", (list, str), ())
    if isinstance(choices, str):
        if choices not in known:
            raise d.fail("choices", f"unknown variable {choices!r}; give a list of templates or a list variable")
    else:
        choices = tuple(d.template(f"choices[{n}]", c, known) for n, c in enumerate(choices))
    if kind == "gen":
        for k in ("prompt", "target"):
            if k not in t:
                raise d.fail(k, "missing (a generation task needs prompt and target)")
        for k in ("contexts", "choices", "continuation"):
            if k in d.data:
                raise d.fail(k, "only multiple-choice tasks (kind: mc) have choices")
    else:
        if ("prompt" in t) == bool(contexts):
            raise d.fail("prompt", "a multiple-choice task needs exactly one of prompt and contexts")
        if bool(choices) == ("continuation" in t):
            raise d.fail("choices", "a multiple-choice task needs exactly one of choices and continuation")
        if contexts and not isinstance(choices, str) and choices and len(choices) != len(contexts):
            raise d.fail("contexts", f"{len(contexts)} contexts for {len(choices)} choices")
        if "continuation" in t and not contexts:
            raise d.fail("continuation", "a shared continuation needs one context per choice (contexts)")
    return Maker(
        kind,
        fields,
        d.get("missing", str, ""),
        hook,
        gold,
        t.get("prompt"),
        contexts,
        choices,
        t.get("continuation"),
        t.get("target"),
        d.get("target_delimiter", str, " "),
    )


def _parse(path: Path) -> _Def:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise PortLLMError(f"{where}: malformed YAML ({getattr(e, 'problem', None) or e.__class__.__name__})") from None
    except OSError as e:
        raise PortLLMError(f"{path}: cannot read task definition ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise PortLLMError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x}); re-save it as UTF-8") from None
    if not isinstance(data, dict):
        raise PortLLMError(f"{path}: a task definition is a YAML mapping (name:, kind:, metric:, ...)")
    d = _Def(path, data)
    for k in data:
        if k not in KEYS:
            raise d.fail(str(k), f"unknown key; expected one of {', '.join(KEYS)}")
    return d


def _task(d: _Def) -> Task:
    path = d.path
    name = d.get("name", str)
    if name != path.stem:
        raise d.fail("name", f"{name!r} differs from the file name {path.stem!r}")
    kind = d.get("kind", str)
    if kind not in KINDS:
        raise d.fail("kind", f"unknown kind {kind!r}; expected {' or '.join(KINDS)}")
    metric = d.get("metric", str)
    if metric not in METRICS:
        raise d.fail("metric", f"unknown metric {metric!r}; expected {', '.join(METRICS)}")
    if METRIC_KINDS[metric] != kind:
        raise d.fail("metric", f"{metric} does not score a {kind} task")
    gen = d.get("generation", dict, {})
    if gen and kind != "gen":
        raise d.fail("generation", "only generation tasks (kind: gen) take stop and max_new_tokens")
    for k in gen:
        if k not in ("stop", "max_new_tokens", "metrics"):
            raise d.fail(f"generation.{k}", "unknown key; expected stop, max_new_tokens, metrics")
    metrics = d.strings("generation.metrics", gen["metrics"]) if "metrics" in gen else ()
    unknown = [m for m in metrics if m not in GEN_METRICS]
    if unknown:
        raise d.fail("generation.metrics", f"unknown metric {unknown[0]!r}; expected {', '.join(GEN_METRICS)}")
    train, ev = _split(d, "train"), _split(d, "eval")
    return Task(
        name,
        kind,
        metric,
        train,
        ev,
        _reader(d, {"train": train, "eval": ev}),
        _maker(d, kind),
        hub=_hub(d),
        stop=d.strings("generation.stop", gen["stop"]) if gen.get("stop") else (),
        max_new_tokens=d.get("generation.max_new_tokens", int, 256, within=gen),
        description=d.get("description", str, ""),
        aliases=d.strings("aliases", d.data["aliases"]) if d.data.get("aliases") else (),
        paper=d.get("paper", bool, False),
        source=str(path),
        gen_metrics=tuple(dict.fromkeys(metrics)),
    )


def load_task_file(path: str | Path) -> Task:
    """One definition file -> Task, or a one-line PortLLMError naming the file and the field."""
    return _task(_parse(Path(path)))


def load_user_file(path: str | Path) -> Task:
    """A user's task file (outside the package) -> Task: its data paths resolve against its own folder
    (absolute paths as they are, `${PORTLLM_DATA}/...` against the data directory), and the Task carries
    the file's sha256 for caches. Data files that are missing are refused here, naming the field."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PortLLMError(f"{path}: task file does not exist")
    d = _parse(path)
    task = _task(d)
    if task.hub is not None:
        raise d.fail("hub", "a user's task file reads its own data files; drop hub:")
    root = path.resolve().parent
    for split in ("train", "eval"):
        for rel in getattr(task, split).file.split("+"):
            f = root / Path(rel).expanduser()
            if not rel.startswith(DATA_VAR) and not f.is_file():
                raise d.fail(f"{split}.file", f"data file {f} does not exist")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return replace(task, root=root, sha256=digest, source=str(path))


def load_dir(directory: str | Path = DEFS) -> dict[str, Task]:
    """Every *.yaml in `directory` (a task is named after its file), ordered by `order:`, then name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PortLLMError(f"task definition directory {directory} does not exist")
    ranked = []
    for f in sorted(directory.glob("*.yaml")):
        d = _parse(f)
        ranked.append((d.get("order", int, 1 << 30), _task(d)))
    return {t.name: t for _, t in sorted(ranked, key=lambda ot: (ot[0], ot[1].name))}
