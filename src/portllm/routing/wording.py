"""A held-in task's prompt wording: the fixed text of its eval template, the leak check on descriptions, and
paraphrased wordings of the template that the routing study scores but no router, description or gate sees.

The leak (issue 21): a description built from the task's own prompts, and PHATGOOSE gates trained on them,
recognise the eval template itself, so routing a request that carries the template is nearly being told the
task. Two defences: (1) a description may not contain a held-in template's fixed wording (`leaked`); (2) the
study also scores every router on the same test rows rendered through other wordings (`paraphrases.yaml`),
which nothing the routers were built from ever contained.

"The template's fixed wording", concretely: the text outside `{{ ... }}` of the task definition's `prompt`
(or per-choice `contexts`, and the shared `continuation`), lower-cased with whitespace collapsed, one
segment per stretch between variables. A text *contains the template* when it shares a run of at least
`LEAK_CHARS` (24) characters with one of those segments; shorter runs ("question:", "answer:", "positive
or negative") are generic wording any honest description of the task may use.
"""

from __future__ import annotations

import dataclasses
from difflib import SequenceMatcher
from importlib import resources
from pathlib import Path

import jinja2
import yaml
from jinja2 import meta

from ..errors import PortLLMError
from ..tasks import Task, get_task
from ..tasks.examples import ENV, Maker, Template

LEAK_CHARS = 24  # a shared run this long (after normalising) is the template, not a description of the task
PARAPHRASES = "paraphrases.yaml"  # shipped with the package, next to this module


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def fixed_segments(template_text: str) -> list[str]:
    """The template's text outside its `{{ }}` / `{% %}` tags, one normalised segment per stretch."""
    body = ENV.parse(template_text)
    segs = [normalise(n.data) for n in body.find_all(jinja2.nodes.TemplateData)]
    return [s for s in segs if s]


def template_texts(task: Task) -> list[str]:
    """The Jinja sources a task renders its request text from (prompt, per-choice contexts, continuation)."""
    mk = task.make
    if not isinstance(mk, Maker):
        raise PortLLMError(f"{task.name} is not defined by a task file's templates; its wording cannot be checked")
    parts = [mk.prompt, *mk.contexts, mk.continuation]
    return [t.text for t in parts if t is not None]


def task_wording(task: Task) -> list[str]:
    """The normalised fixed segments of a task's eval template."""
    return [s for t in template_texts(task) for s in fixed_segments(t)]


def strip_wording(task: Task, text: str) -> str:
    """A rendered request with its template's fixed text cut out: the row's own inputs, one per line."""
    for src in template_texts(task):
        for node in ENV.parse(src).find_all(jinja2.nodes.TemplateData):
            if node.data.strip():
                text = text.replace(node.data.strip(), "\n")
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def leaked(text: str, segments: list[str], n: int = LEAK_CHARS) -> str | None:
    """The longest run of ≥ n characters `text` shares with one of `segments` (normalised), else None."""
    t = normalise(text)
    best = ""
    for s in segments:
        m = SequenceMatcher(None, s, t, autojunk=False).find_longest_match(0, len(s), 0, len(t))
        if m.size >= n and m.size > len(best):
            best = s[m.a : m.a + m.size]
    return best or None


def load_paraphrases(path: str | Path | None = None) -> dict[str, list[str]]:
    """{task name: [prompt template, ...]} from a paraphrase file (default: the shipped one)."""
    if path is None:
        src = resources.files("portllm.routing").joinpath(PARAPHRASES)
        where, text = f"portllm/routing/{PARAPHRASES}", src.read_text(encoding="utf-8")
    else:
        p = Path(path)
        if not p.is_file():
            raise PortLLMError(f"paraphrase file {p} does not exist")
        where, text = str(p), p.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PortLLMError(f"{where} is not valid YAML: {str(e).splitlines()[0]}") from None
    ok = isinstance(raw, dict) and all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in raw.values())
    if not ok:
        raise PortLLMError(f"{where} must map each task name to a list of prompt templates (strings)")
    return {get_task(k).name: list(v) for k, v in raw.items()}


def paraphrased(task: Task, template: str) -> Task:
    """The task with its prompt rendered through `template` instead: same rows, variables and answer options.
    Refused (one line) unless the task has a single `prompt` and the wording uses exactly its variables and
    shares none of its fixed wording."""
    mk = task.make
    if not isinstance(mk, Maker) or mk.prompt is None or mk.contexts:
        raise PortLLMError(f"{task.name} has no single prompt template to paraphrase (per-choice contexts?)")
    try:
        want = meta.find_undeclared_variables(ENV.parse(mk.prompt.text))
        got = meta.find_undeclared_variables(ENV.parse(template))
    except jinja2.TemplateSyntaxError as e:
        raise PortLLMError(f"{task.name} paraphrase {template!r}: {e}") from None
    if got != want:
        raise PortLLMError(
            f"{task.name} paraphrase {template!r} uses variables {sorted(got)}; the task's prompt uses {sorted(want)}"
        )
    same = leaked(" ".join(fixed_segments(template)), fixed_segments(mk.prompt.text))
    if fixed_segments(template) == fixed_segments(mk.prompt.text):
        same = mk.prompt.text
    if same:
        raise PortLLMError(f"{task.name} paraphrase {template!r} repeats the original wording {same!r}")
    return dataclasses.replace(task, make=dataclasses.replace(mk, prompt=Template.compile(template)))


def wordings_for(tasks: list[str], table: dict[str, list[str]], minimum: int = 2) -> dict[str, list[Task]]:
    """{task: its paraphrased variants}; every held-in task needs `minimum` distinct wordings in the table."""
    out = {}
    for t in tasks:
        name = get_task(t).name
        ws = list(dict.fromkeys(table.get(name, [])))
        if len(ws) < minimum:
            raise PortLLMError(
                f"{t} has {len(ws)} paraphrased wording(s) in the paraphrase file; the study needs {minimum} per "
                "held-in task (add them, or run without paraphrases)"
            )
        out[t] = [paraphrased(get_task(t), w) for w in ws]
    return out
