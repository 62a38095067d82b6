"""The few things a prompt template cannot say, as named hooks a definition's `builder:` picks.

A hook sees the raw row and the template variables gathered from `fields:`, checks what it needs,
and returns more variables for the templates and `gold:` (like lm-evaluation-harness's utils.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .readers import row_error

Vars = dict[str, Any]


@dataclass(frozen=True)
class Hook:
    fn: Callable[[dict[str, Any], Vars], Vars]
    needs: tuple[str, ...]  # template variables it reads (declared under `fields:`)
    provides: tuple[str, ...]  # template variables it adds


HOOKS: dict[str, Hook] = {}


def hook(name: str, needs: tuple[str, ...] = (), provides: tuple[str, ...] = ()):
    def register(fn):
        HOOKS[name] = Hook(fn, needs, provides)
        return fn

    return register


def gsm8k_reference(answer: str) -> str:
    """The number after '####', commas dropped: what GSM8K generations are scored against."""
    return answer.split("####")[-1].strip().replace(",", "")


@hook("gsm8k_reference", needs=("answer",), provides=("reference",))
def _gsm8k(row: dict[str, Any], v: Vars) -> Vars:
    if not isinstance(v["answer"], str) or "####" not in v["answer"]:
        raise row_error(row, "GSM8K answer has no '#### N' line")
    return {"reference": gsm8k_reference(v["answer"])}


@hook("winogrande_partial", needs=("sentence",), provides=("before", "after"))
def _winogrande(row: dict[str, Any], v: Vars) -> Vars:
    """Partial scoring: each option fills the blank in its own context; the rest is the shared continuation."""
    sentence = v["sentence"]
    if not isinstance(sentence, str) or "_" not in sentence:
        raise row_error(row, "WinoGrande sentence has no '_' blank")
    cut = sentence.index("_")
    return {"before": sentence[:cut], "after": sentence[cut + 1 :].strip()}


@hook("arc_choices", provides=("stem", "options", "answer_index"))
def _arc(row: dict[str, Any], v: Vars) -> Vars:
    """ARC has 3-5 choices with letter or digit labels; the answer key names one of them."""
    q = row.get("question")
    if not isinstance(q, dict) or not isinstance(q.get("stem"), str) or not isinstance(q.get("choices"), list):
        raise row_error(row, "ARC row needs question.stem (text) and question.choices (a list)")
    choices = q["choices"]
    if not choices or not all(
        isinstance(c, dict) and _scalar(c.get("label")) and _scalar(c.get("text")) for c in choices
    ):
        raise row_error(row, "ARC question.choices must be records with a label and a text")
    labels = [str(c["label"]) for c in choices]
    key = str(row.get("answerKey", "")).strip()
    if key not in labels:
        raise row_error(row, f"answerKey {key[:20]!r} not among {labels}")
    return {"stem": q["stem"], "options": [str(c["text"]) for c in choices], "answer_index": labels.index(key)}


def _scalar(x: Any) -> bool:
    """Text or a number (what a label or a choice may be in a data file); not null, a list or an object."""
    return isinstance(x, (str, int, float)) and not isinstance(x, bool)


@hook("labeled_choices", provides=("stem", "options", "answer_index"))
def _labeled(row: dict[str, Any], v: Vars) -> Vars:
    """The hub's flattened layout (CommonsenseQA): question text, choices as parallel label/text lists."""
    c = row.get("choices")
    if not isinstance(row.get("question"), str) or not isinstance(c, dict):
        raise row_error(row, "row needs question (text) and choices {label: [...], text: [...]}")
    labels, texts = c.get("label"), c.get("text")
    if not isinstance(labels, list) or not isinstance(texts, list) or len(labels) != len(texts) or not labels:
        raise row_error(row, "choices.label and choices.text must be lists of the same length")
    if not all(_scalar(x) for x in labels + texts):
        raise row_error(row, "choices.label and choices.text must hold text")
    labels = [str(x) for x in labels]
    key = str(row.get("answerKey", "")).strip()
    if key not in labels:
        raise row_error(row, f"answerKey {key[:20]!r} not among {labels}")
    return {"stem": row["question"], "options": [str(x) for x in texts], "answer_index": labels.index(key)}


@hook("answer_text_choices", needs=("answer",), provides=("options", "answer_index"))
def _answer_text(row: dict[str, Any], v: Vars) -> Vars:
    """Choices as a list `options` and the answer as the text of one of them (Social IQa, common-bench's layout)."""
    opts, answer = row.get("options"), v["answer"]
    if not isinstance(opts, list) or not opts or not all(_scalar(o) for o in opts) or not isinstance(answer, str):
        raise row_error(row, "row needs options (a list of texts) and answer (the text of one of them)")
    texts = [str(o) for o in opts]
    if answer not in texts:
        raise row_error(row, f"answer {answer[:40]!r} is not one of the options")
    # an option written twice (a few Social IQa rows) scores the same twice, and argmax takes the first: so does gold
    return {"options": texts, "answer_index": texts.index(answer)}


@hook("obqa_choices", needs=("choice_text", "answer_key"), provides=("options", "answer_index"))
def _obqa(row: dict[str, Any], v: Vars) -> Vars:
    """OpenBookQA's TSV packs the four choices into one '(A) ... (B) ... (C) ... (D) ...' string."""
    if not isinstance(v["choice_text"], str):
        raise row_error(row, "OpenBookQA row needs choices (A)-(D) and an answer key")
    parts = re.split(r"\(([A-D])\)\s*", v["choice_text"])
    opts = {parts[k]: parts[k + 1].strip() for k in range(1, len(parts) - 1, 2)}
    key = v["answer_key"]
    if sorted(opts) != ["A", "B", "C", "D"] or key not in opts:
        raise row_error(row, "OpenBookQA row needs choices (A)-(D) and an answer key")
    return {"options": [opts[k] for k in "ABCD"], "answer_index": "ABCD".index(key)}
