"""The task suite: the seven tasks of the PortLLM paper plus four commonsense extras.

Each task says where its train and eval splits come from, how a row becomes a prompt,
the answer choices (or the generation and extraction rule) and its metric. Prompts follow
lm-evaluation-harness's zero-shot conventions so our numbers can be checked against theirs.

Data comes from a directory laid out like the project's shared data (flag `--data-dir`, env
`PORTLLM_DATA`); without one, the Hugging Face hub is tried. Splits are fixed: where no
labelled train split with the needed fields exists (BoolQ with passages, RTE, PIQA), a
documented slice of the labelled file is held out for training and never evaluated on.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PortLLMError

csv.field_size_limit(1 << 24)


@dataclass(frozen=True)
class Example:
    """One evaluation item: per-choice (context, continuation) pairs, or a generation prompt."""

    idx: int
    gold: Any  # index of the right choice, or the reference answer string for generation
    contexts: tuple[str, ...] = ()  # one per choice (multiple-choice); identical except WinoGrande
    continuations: tuple[str, ...] = ()
    prompt: str = ""  # generation tasks
    target: str = ""  # text a fine-tune learns to produce after the prompt


@dataclass(frozen=True)
class Split:
    file: str  # relative to the data dir; "a+b" concatenates files
    rows: tuple[int | None, int | None] = (None, None)  # [start, stop) slice of the rows in file order
    note: str = ""


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "mc" (log-likelihood multiple choice) or "gen" (greedy generation)
    metric: str  # "acc", "acc_norm" or "exact_match"
    train: Split
    eval: Split
    reader: Callable[[Path], list[dict[str, Any]]]
    make: Callable[[int, dict[str, Any]], Example]
    hub: tuple[str, str | None, dict[str, str]] | None = None  # (path, config, {"train": split, "eval": split})
    stop: tuple[str, ...] = ()
    max_new_tokens: int = 256
    description: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------- file readers (file + line in every error)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise PortLLMError(f"{path}:{n}: malformed JSON line ({e.msg})") from None
            if not isinstance(row, dict):
                raise PortLLMError(f"{path}:{n}: expected a JSON object")
            rows.append({**row, "_line": n, "_file": str(path)})
    return rows


def read_tsv(path: Path, header: list[str] | None = None) -> list[dict[str, Any]]:
    """GLUE-style TSV; `header` for files that have none. quoting off, as GLUE files need."""
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        cols = header
        for n, rec in enumerate(reader, 1):
            if cols is None:
                cols = rec
                continue
            if not rec or rec == [""]:
                continue
            if len(rec) != len(cols):
                raise PortLLMError(f"{path}:{n}: expected {len(cols)} tab-separated fields, found {len(rec)}")
            rows.append({**dict(zip(cols, rec)), "_line": n, "_file": str(path)})
    return rows


def with_labels(reader: Callable[[Path], list[dict[str, Any]]], suffix: str = "-labels.lst"):
    """WinoGrande/PIQA keep labels in a sibling .lst file, line for line."""

    def read(path: Path) -> list[dict[str, Any]]:
        rows = reader(path)
        lst = path.with_name(path.stem + suffix)
        if lst.is_file():
            labels = [line.strip() for line in lst.read_text().splitlines() if line.strip()]
            if len(labels) != len(rows):
                raise PortLLMError(f"{lst}: {len(labels)} labels for {len(rows)} rows in {path.name}")
            for r, lab in zip(rows, labels):
                r.setdefault("label", lab)
        return rows

    return read


def _need(row: dict[str, Any], *keys: str) -> list[Any]:
    missing = [k for k in keys if k not in row or row[k] is None]
    if missing:
        raise PortLLMError(f"{row.get('_file', '?')}:{row.get('_line', '?')}: missing field {missing[0]!r}")
    return [row[k] for k in keys]


def _bad(row: dict[str, Any], what: str) -> PortLLMError:
    return PortLLMError(f"{row.get('_file', '?')}:{row.get('_line', '?')}: {what}")


def _truthy(row: dict[str, Any], v: Any) -> int:
    s = str(v).strip().lower()
    if s in ("true", "1", "yes"):
        return 1
    if s in ("false", "0", "no"):
        return 0
    raise _bad(row, f"label {v!r} is not true/false")


# ---------------------------------------------------------------- prompts (lm-evaluation-harness zero-shot)


def _mc(idx: int, context: str, choices: list[str], gold: int) -> Example:
    conts = tuple(" " + c for c in choices)
    return Example(idx, gold, (context,) * len(choices), conts, target=conts[gold])


def make_boolq(i: int, r: dict[str, Any]) -> Example:
    passage, question, label = _need(r, "passage", "question", "label")
    return _mc(i, f"{passage}\nQuestion: {question}?\nAnswer:", ["no", "yes"], _truthy(r, label))


def make_sst2(i: int, r: dict[str, Any]) -> Example:
    sentence, label = _need(r, "sentence", "label")
    return _mc(
        i,
        f"{sentence}\nQuestion: Is this sentence positive or negative?\nAnswer:",
        ["negative", "positive"],
        _truthy(r, label),
    )


def make_mrpc(i: int, r: dict[str, Any]) -> Example:
    s1 = r.get("sentence1", r.get("#1 String"))
    s2 = r.get("sentence2", r.get("#2 String"))
    label = r.get("label", r.get("Quality"))
    if s1 is None or s2 is None or label is None:
        raise _bad(r, "MRPC row needs #1 String, #2 String and Quality")
    return _mc(
        i,
        f"Sentence 1: {s1}\nSentence 2: {s2}\nQuestion: Do both sentences mean the same thing?\nAnswer:",
        ["no", "yes"],
        _truthy(r, label),
    )


def _entail(r: dict[str, Any], v: Any) -> int:
    s = str(v).strip().lower()
    if s in ("entailment", "0"):
        return 0
    if s in ("not_entailment", "1"):
        return 1
    raise _bad(r, f"label {v!r} is not entailment/not_entailment")


def make_rte(i: int, r: dict[str, Any]) -> Example:
    premise = r.get("premise", r.get("sentence1"))
    hyp = r.get("hypothesis", r.get("sentence2"))
    if premise is None or hyp is None or "label" not in r:
        raise _bad(r, "RTE row needs premise, hypothesis and label")
    return _mc(i, f"{premise}\nQuestion: {hyp} True or False?\nAnswer:", ["True", "False"], _entail(r, r["label"]))


def make_wnli(i: int, r: dict[str, Any]) -> Example:
    s1, s2, label = _need(r, "sentence1", "sentence2", "label")
    return _mc(i, f"{s1}\nQuestion: {s2} True or False?\nAnswer:", ["False", "True"], _truthy(r, label))


def make_winogrande(i: int, r: dict[str, Any]) -> Example:
    """Partial scoring: the two contexts differ (sentence up to the blank, with each option) and
    the shared rest of the sentence is the scored continuation."""
    sentence, o1, o2, answer = _need(r, "sentence", "option1", "option2", "label" if "label" in r else "answer")
    if "_" not in sentence:
        raise _bad(r, "WinoGrande sentence has no '_' blank")
    cut = sentence.index("_")
    rest = " " + sentence[cut + 1 :].strip()
    gold = {"1": 0, "2": 1}.get(str(answer).strip())
    if gold is None:
        raise _bad(r, f"answer {answer!r} is not 1/2")
    ctxs = (sentence[:cut] + o1, sentence[:cut] + o2)
    return Example(i, gold, ctxs, (rest, rest), target=rest)


def gsm8k_reference(answer: str) -> str:
    return answer.split("####")[-1].strip().replace(",", "")


def make_gsm8k(i: int, r: dict[str, Any]) -> Example:
    q, a = _need(r, "question", "answer")
    if "####" not in a:
        raise _bad(r, "GSM8K answer has no '#### N' line")
    return Example(i, gsm8k_reference(a), prompt=f"Question: {q}\nAnswer:", target=" " + a)


def make_arc(i: int, r: dict[str, Any]) -> Example:
    q = r.get("question")
    if not isinstance(q, dict) or "choices" not in q:
        raise _bad(r, "ARC row needs question.stem and question.choices")
    labels = [c["label"] for c in q["choices"]]
    key = str(r.get("answerKey", "")).strip()
    if key not in labels:
        raise _bad(r, f"answerKey {key!r} not among {labels}")
    return _mc(i, f"Question: {q['stem']}\nAnswer:", [c["text"] for c in q["choices"]], labels.index(key))


def make_piqa(i: int, r: dict[str, Any]) -> Example:
    goal, s1, s2, label = _need(r, "goal", "sol1", "sol2", "label")
    return Example(
        i, int(label), (f"Question: {goal}\nAnswer:",) * 2, (" " + s1, " " + s2), target=" " + (s1, s2)[int(label)]
    )


def make_obqa(i: int, r: dict[str, Any]) -> Example:
    stem, choices, key = _need(r, "Question Stem", "Choices", "Answer Key")
    parts = re.split(r"\(([A-D])\)\s*", choices)
    opts = {parts[k]: parts[k + 1].strip() for k in range(1, len(parts) - 1, 2)}
    if sorted(opts) != ["A", "B", "C", "D"] or key not in opts:
        raise _bad(r, "OpenBookQA row needs choices (A)-(D) and an answer key")
    return _mc(i, stem, [opts[k] for k in "ABCD"], "ABCD".index(key))


# ---------------------------------------------------------------- the registry

_GLUE_PAIR = ["index", "sentence1", "sentence2", "label"]

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            "boolq",
            "mc",
            "acc",
            Split(
                "boolq/val.jsonl",
                (2000, None),
                "BoolQ validation rows 2000-3269 (no train split with passages is available)",
            ),
            Split("boolq/val.jsonl", (0, 2000), "BoolQ validation rows 0-1999"),
            read_jsonl,
            make_boolq,
            hub=("super_glue", "boolq", {"train": "train", "eval": "validation"}),
            description="yes/no questions about a passage",
        ),
        Task(
            "sst2",
            "mc",
            "acc",
            Split("sst2/train.tsv", note="GLUE SST-2 train (ALPS train part, 60,614)"),
            Split("sst2/test.tsv", note="GLUE SST-2 dev (872; the file is named test.tsv)"),
            read_tsv,
            make_sst2,
            hub=("glue", "sst2", {"train": "train", "eval": "validation"}),
            description="movie-review sentiment",
        ),
        Task(
            "mrpc",
            "mc",
            "acc",
            Split("mrpc/train.tsv", note="GLUE MRPC train (3,668)"),
            Split("mrpc/dev.tsv", note="GLUE MRPC dev (408)"),
            read_tsv,
            make_mrpc,
            hub=("glue", "mrpc", {"train": "train", "eval": "validation"}),
            description="paraphrase detection",
        ),
        Task(
            "rte",
            "mc",
            "acc",
            Split("rte/val.jsonl", (177, None), "RTE validation rows 177-276 (the train split is not available)"),
            Split("rte/val.jsonl", (0, 177), "RTE validation rows 0-176"),
            read_jsonl,
            make_rte,
            hub=("super_glue", "rte", {"train": "train", "eval": "validation"}),
            description="textual entailment",
        ),
        Task(
            "wnli",
            "mc",
            "acc",
            Split("wnli/train.tsv+wnli/val.tsv", note="GLUE WNLI train (518 + 117 = 635)"),
            Split("wnli/dev.tsv", note="GLUE WNLI dev (71)"),
            lambda p: read_tsv(p, None if p.name != "val.tsv" else _GLUE_PAIR),
            make_wnli,
            hub=("glue", "wnli", {"train": "train", "eval": "validation"}),
            description="Winograd NLI",
        ),
        Task(
            "winogrande",
            "mc",
            "acc",
            Split("winogrande/train_l.jsonl", note="WinoGrande train_l (10,234)"),
            Split("winogrande/dev.jsonl", note="WinoGrande v1.1 dev (1,267)"),
            with_labels(read_jsonl),
            make_winogrande,
            hub=("winogrande", "winogrande_xl", {"train": "train", "eval": "validation"}),
            description="pronoun resolution, partial scoring",
        ),
        Task(
            "gsm8k",
            "gen",
            "exact_match",
            Split("gsm8k/train.jsonl", note="GSM8K train (7,473)"),
            Split("gsm8k/test.jsonl", note="GSM8K test (1,319)"),
            read_jsonl,
            make_gsm8k,
            hub=("gsm8k", "main", {"train": "train", "eval": "test"}),
            stop=("Question:", "</s>", "<|im_end|>"),
            description="grade-school math, greedy generation, '#### N' answers",
        ),
        Task(
            "arc_easy",
            "mc",
            "acc_norm",
            Split("arc/ARC-Easy-Dev.jsonl", note="ARC-Easy dev (570)"),
            Split("arc/ARC-Easy-Test.jsonl", note="ARC-Easy test (2,376)"),
            read_jsonl,
            make_arc,
            hub=("allenai/ai2_arc", "ARC-Easy", {"train": "validation", "eval": "test"}),
            description="grade-school science (easy)",
        ),
        Task(
            "arc_challenge",
            "mc",
            "acc_norm",
            Split("arc/ARC-Challenge-Dev.jsonl", note="ARC-Challenge dev (299)"),
            Split("arc/ARC-Challenge-Test.jsonl", note="ARC-Challenge test (1,172)"),
            read_jsonl,
            make_arc,
            hub=("allenai/ai2_arc", "ARC-Challenge", {"train": "validation", "eval": "test"}),
            description="grade-school science (hard)",
        ),
        Task(
            "piqa",
            "mc",
            "acc_norm",
            Split("piqa/valid.jsonl", (1338, None), "PIQA validation rows 1338-1837 (train not available)"),
            Split("piqa/valid.jsonl", (0, 1338), "PIQA validation rows 0-1337"),
            with_labels(read_jsonl, "-labels.lst"),
            make_piqa,
            hub=("piqa", None, {"train": "train", "eval": "validation"}),
            description="physical commonsense",
        ),
        Task(
            "openbookqa",
            "mc",
            "acc_norm",
            Split("obqa/train.tsv", note="OpenBookQA train (4,957)"),
            Split("obqa/test.tsv", note="OpenBookQA test (500)"),
            read_tsv,
            make_obqa,
            hub=None,
            description="open-book science questions",
        ),
    ]
}
PAPER_TASKS = ("boolq", "sst2", "mrpc", "rte", "wnli", "winogrande", "gsm8k")


def get_task(name: str) -> Task:
    key = name.strip().lower().replace("-", "_")
    if key not in TASKS:
        raise PortLLMError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[key]


def parse_tasks(spec: str) -> list[Task]:
    names = [s for s in spec.split(",") if s.strip()]
    if not names:
        raise PortLLMError("no task given; e.g. --tasks sst2,boolq")
    if names == ["paper"]:
        names = list(PAPER_TASKS)
    return [get_task(n) for n in names]


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


def load_rows(task: Task, split: str, data: str | Path | None = None) -> list[dict[str, Any]]:
    sp = task.train if split == "train" else task.eval
    d = data_dir(data)
    if d is None:
        return _hub_rows(task, split)
    rows: list[dict[str, Any]] = []
    for rel in sp.file.split("+"):
        f = d / rel
        if not f.is_file():
            raise PortLLMError(f"{task.name}: {f} is missing from the data directory {d}")
        rows += task.reader(f)
    return rows[sp.rows[0] : sp.rows[1]]


def load_examples(
    task: Task, split: str = "eval", data: str | Path | None = None, limit: int | None = None
) -> list[Example]:
    """The split's examples in file order; `limit` keeps the first N."""
    rows = load_rows(task, split, data)
    if limit is not None:
        rows = rows[:limit]
    return [task.make(i, r) for i, r in enumerate(rows)]


def _hub_rows(task: Task, split: str) -> list[dict[str, Any]]:
    if task.hub is None:
        raise PortLLMError(f"{task.name}: no data directory set and no hub source; set PORTLLM_DATA or --data-dir")
    path, name, splits = task.hub
    try:
        from datasets import load_dataset

        ds = load_dataset(path, name, split=splits[split])
    except Exception as e:
        raise PortLLMError(
            f"{task.name}: no data directory set (PORTLLM_DATA / --data-dir) and the Hugging Face hub is unreachable "
            f"({e.__class__.__name__}); point --data-dir at a local copy"
        ) from None
    rows = []
    for n, r in enumerate(ds):
        r = dict(r, _line=n + 1, _file=f"hub:{path}/{name}/{splits[split]}")
        if task.name == "arc_easy" or task.name == "arc_challenge":  # hub layout: choices{label,text}
            r["question"] = {
                "stem": r["question"],
                "choices": [{"label": lab, "text": t} for lab, t in zip(r["choices"]["label"], r["choices"]["text"])],
            }
        if task.name == "rte" and isinstance(r.get("label"), int):
            r["label"] = str(r["label"])
        if task.name == "winogrande":
            r["label"] = r.pop("answer")
        rows.append(r)
    return rows
