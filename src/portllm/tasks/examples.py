"""How one row becomes an Example: gather fields, run the hook, map the label, render the templates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jinja2

from .hooks import Hook
from .readers import row_error
from .schema import Example

# Templates are plain text prompts, never HTML: no autoescape; an unknown variable is an error, not "".
ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


@dataclass(frozen=True)
class Template:
    """A Jinja2 template. Text plus `{{ name }}` only is joined directly, as Jinja would render it:
    Jinja's per-render setup costs more than all the rest of loading a 60k-row train split."""

    text: str
    parts: tuple[tuple[bool, str], ...] | None  # (is a variable, text or name); None: render with Jinja
    jinja: jinja2.Template = field(compare=False, repr=False)

    @classmethod
    def compile(cls, text: str) -> Template:
        body = ENV.parse(text).body
        nodes = body[0].nodes if len(body) == 1 and isinstance(body[0], jinja2.nodes.Output) else [None]
        parts = []
        for node in nodes:
            if isinstance(node, jinja2.nodes.TemplateData):
                parts.append((False, node.data))
            elif isinstance(node, jinja2.nodes.Name):
                parts.append((True, node.name))
            else:
                return cls(text, None, ENV.from_string(text))
        return cls(text, tuple(parts), ENV.from_string(text))

    def render(self, v: dict[str, Any]) -> str:
        if self.parts is None:
            return self.jinja.render(v)
        return "".join(str(v[x]) if var else x for var, x in self.parts)


@dataclass(frozen=True)
class Gold:
    """`gold:` - a field taken as is, or mapped through {"true/1/yes": 1, ...} (case-insensitive)."""

    field: str
    map: tuple[tuple[str, Any], ...] | None = None  # (lower-cased spelling, value)
    expect: str = ""  # "true/false": the first spelling of each value, for the error message

    def __call__(self, row: dict[str, Any], v: dict[str, Any]) -> Any:
        value = v[self.field]
        if self.map is None:
            return value
        s = str(value).strip().lower()
        for spelling, gold in self.map:
            if s == spelling:
                return gold
        raise row_error(row, f"{self.field} {value!r} is not {self.expect}")


@dataclass(frozen=True, eq=False)
class Maker:
    """A task's `make(i, row) -> Example`, compiled from its definition file."""

    kind: str
    fields: tuple[tuple[str, tuple[str, ...]], ...]  # (variable, source fields: the first present one is used)
    missing: str  # message when a field is missing; "" = "missing field 'x'"
    hook: Hook | None
    gold: Gold
    prompt: Template | None = None  # one context for every choice, or the generation prompt
    contexts: tuple[Template, ...] = ()  # one context per choice (partial scoring)
    choices: tuple[Template, ...] | str = ()  # continuation templates, or the variable holding a list
    continuation: Template | None = None  # one continuation shared by every choice
    target: Template | None = None  # what a fine-tune on a generation task learns to write
    delimiter: str = " "  # between context and continuation / prompt and target, as in lm-eval

    def _vars(self, row: dict[str, Any]) -> dict[str, Any]:
        v = {}
        for var, sources in self.fields:
            key = next((k for k in sources if k in row), sources[-1])
            if row.get(key) is None:
                raise row_error(row, self.missing or f"missing field {key!r}")
            if isinstance(row[key], (dict, list)):  # it would be pasted into the prompt as Python's repr
                raise row_error(row, f"field {key!r} holds a JSON {type(row[key]).__name__}, not text or a number")
            v[var] = row[key]
        if self.hook is not None:
            v.update(self.hook.fn(row, v))
        return v

    def __call__(self, i: int, row: dict[str, Any]) -> Example:
        v = self._vars(row)
        gold = self.gold(row, v)
        try:
            if self.kind == "gen":
                return Example(i, gold, prompt=self.prompt.render(v), target=self.delimiter + self.target.render(v))
            if isinstance(self.choices, str):
                conts = tuple(self.delimiter + str(c) for c in v[self.choices])
            elif self.choices:
                conts = tuple(self.delimiter + c.render(v) for c in self.choices)
            else:
                conts = (self.delimiter + self.continuation.render(v),) * len(self.contexts)
            ctxs = tuple(c.render(v) for c in self.contexts) or (self.prompt.render(v),) * len(conts)
        except jinja2.TemplateError as e:
            raise row_error(row, f"template: {e}") from None
        if not isinstance(gold, int) or not 0 <= gold < len(conts):
            raise row_error(row, f"{self.gold.field} {gold!r} is not a choice index below {len(conts)}")
        return Example(i, gold, ctxs, conts, target=conts[gold])
