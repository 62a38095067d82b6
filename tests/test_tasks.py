"""Task loaders on the real benchmark files, prompt snapshots, and bad data."""

import dataclasses
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from portllm import PortLLMError
from portllm.tasks import (
    DEFS,
    PAPER_TASKS,
    TASKS,
    Example,
    get_task,
    load_dir,
    load_examples,
    load_rows,
    load_task_file,
    markdown_table,
    parse_tasks,
)

DATA = Path(os.environ.get("PORTLLM_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="benchmark data directory not present")

KNOWN_OVERLAP = {"sst2_heldout": 75, "cola": 16, "social_iqa": 11}  # documented in tasks/defs/<task>.yaml
EXPECTED = {  # task: (train n, eval n, eval label counts)
    "boolq": (1270, 2000, {1: 1256, 0: 744}),
    "sst2": (60614, 872, {1: 444, 0: 428}),
    "mrpc": (3668, 408, {1: 279, 0: 129}),
    "rte": (100, 177, {0: 95, 1: 82}),
    "wnli": (635, 71, {0: 40, 1: 31}),
    "winogrande": (10234, 1267, {1: 639, 0: 628}),
    "gsm8k": (7473, 1319, None),
    "arc_easy": (570, 2376, None),
    "arc_challenge": (299, 1172, None),
    "piqa": (500, 1338, {1: 682, 0: 656}),
    "qnli": (4463, 1000, {1: 527, 0: 473}),
    "sst2_heldout": (60614, 6735, {1: 3741, 0: 2994}),
    "openbookqa": (4957, 500, {0: 138, 2: 132, 1: 126, 3: 104}),
    "cola": (8551, 1043, {1: 721, 0: 322}),
    "commonsense_qa": (500, 721, {1: 155, 2: 148, 0: 142, 3: 141, 4: 135}),
    "social_iqa": (954, 1000, {2: 337, 0: 337, 1: 326}),
}


def _key(row):
    return tuple(
        str(row.get(k))
        for k in (
            "question",
            "context",
            "options",
            "passage",
            "premise",
            "hypothesis",
            "sentence",
            "sentence1",
            "sentence2",
            "#1 String",
            "#2 String",
            "goal",
            "sol1",
            "Question Stem",
            "Choices",
            "id",
            "qID",
        )
    )


@needs_data
@pytest.mark.parametrize("name", list(TASKS))
def test_loader_counts_balance_and_no_overlap(name):
    task = get_task(name)
    n_train, n_eval, labels = EXPECTED[name]
    train, ev = load_examples(task, "train", DATA), load_examples(task, "eval", DATA)
    assert (len(train), len(ev)) == (n_train, n_eval)
    if labels:
        assert dict(Counter(e.gold for e in ev)) == labels
    assert [e.idx for e in ev] == list(range(len(ev)))
    train_keys = {_key(r) for r in load_rows(task, "train", DATA)}
    eval_keys = [_key(r) for r in load_rows(task, "eval", DATA)]
    shared = train_keys & set(eval_keys)
    # GLUE's SST-2 train holds short phrases more than once; ALPS's dev.tsv repeats 75 of them (e.g. "elegantly ")
    assert len(shared) == KNOWN_OVERLAP.get(name, 0), "an eval example is also in the train part"
    for e in ev[:50]:
        assert e.target  # every example can also be a training target
        if task.kind == "mc":
            assert 0 <= e.gold < len(e.continuations) == len(e.contexts)


@needs_data
def test_limit_is_first_n_in_file_order():
    t = get_task("sst2")
    assert load_examples(t, "eval", DATA, limit=5) == load_examples(t, "eval", DATA)[:5]


SNAPSHOTS = {
    "boolq": (
        "Ethanol fuel -- All biomass goes through",
        "\nQuestion: does ethanol take more energy make that produces?\nAnswer:",
        (" no", " yes"),
        0,
    ),
    "sst2": (
        "it 's a charming and often affecting journey . ",
        "\nQuestion: Is this sentence positive or negative?\nAnswer:",
        (" negative", " positive"),
        1,
    ),
    "mrpc": (
        "Sentence 1: He said the foodservice pie business doesn't fit the company's long-term growth "
        "strategy.\nSentence 2: ",
        "\nQuestion: Do both sentences mean the same thing?\nAnswer:",
        (" no", " yes"),
        1,
    ),
    "rte": (
        "Dana Reeve, the widow of the actor Christopher Reeve",
        "\nQuestion: Christopher Reeve had an accident. True or False?\nAnswer:",
        (" True", " False"),
        1,
    ),
    "wnli": (
        "The drain is clogged with hair. It has to be cleaned.",
        "\nQuestion: The hair has to be cleaned. True or False?\nAnswer:",
        (" False", " True"),
        0,
    ),
    "arc_easy": (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?",
        "\nAnswer:",
        (" Sunlight is the source of energy for nearly all ecosystems.",),
        0,
    ),
    "piqa": ("Question: How do I ready a guinea pig cage for it's new occupants?", "\nAnswer:", None, 0),
    "commonsense_qa": (
        "Question: A revolving door is convenient for two direction travel",
        "\nAnswer:",
        (" bank", " library", " department store", " mall", " new york"),
        0,
    ),
    "openbookqa": (
        "A person wants to start saving money",
        "the best way to save money is to",
        (" make more phone calls", " quit eating lunch out"),
        1,
    ),
}


@needs_data
@pytest.mark.parametrize("name", list(SNAPSHOTS))
def test_prompt_snapshots(name):
    start, end, conts, gold = SNAPSHOTS[name]
    e = load_examples(get_task(name), "eval", DATA, limit=1)[0]
    assert e.contexts[0].startswith(start) and e.contexts[0].endswith(end)
    if conts:
        assert e.continuations[: len(conts)] == conts
    assert e.gold == gold


@needs_data
def test_winogrande_partial_scoring_and_gsm8k_prompt():
    w = load_examples(get_task("winogrande"), "eval", DATA, limit=1)[0]
    assert w.contexts == (
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    )
    assert w.continuations == (" always got the easier cases.",) * 2 and w.gold == 1
    g = load_examples(get_task("gsm8k"), "eval", DATA, limit=1)[0]
    assert g.prompt.startswith("Question: Janet") and g.prompt.endswith("\nAnswer:") and g.gold == "18"


def test_unknown_task_and_missing_data_dir(tmp_path):
    with pytest.raises(PortLLMError, match="unknown task 'sst3'.*known: boolq"):
        parse_tasks("sst2,sst3")
    with pytest.raises(PortLLMError, match="does not exist"):
        load_examples(get_task("sst2"), "eval", tmp_path / "nowhere")
    with pytest.raises(PortLLMError, match="sst2/test.tsv is missing"):
        load_examples(get_task("sst2"), "eval", tmp_path)
    assert [t.name for t in parse_tasks("paper")] == list(PAPER_TASKS)


@pytest.mark.parametrize(
    "task,rel,text,error",
    [
        (
            "boolq",
            "boolq/val.jsonl",
            '{"question": "q", "passage": "p", "label": "true"}\n{"question": oops}\n',
            r"boolq/val.jsonl:2: malformed JSON",
        ),
        (
            "boolq",
            "boolq/val.jsonl",
            '{"question": "q", "passage": "p", "label": "maybe"}\n',
            r"val.jsonl:1: label 'maybe' is not true/false",
        ),
        (
            "sst2",
            "sst2/test.tsv",
            "sentence\tlabel\ngood movie\t1\nbad\tmovie\t0\n",
            r"test.tsv:3: expected 2 tab-separated fields, found 3",
        ),
        ("sst2", "sst2/test.tsv", "text\tlabel\ngood movie\t1\n", r"test.tsv:2: missing field 'sentence'"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, task, rel, text, error):
    (tmp_path / rel).parent.mkdir()
    (tmp_path / rel).write_text(text)
    with pytest.raises(PortLLMError, match=error):
        load_examples(get_task(task), "eval", tmp_path)


# ---------------------------------------------------------------- tasks as definition files


def test_every_shipped_definition_loads():
    files = sorted(DEFS.glob("*.yaml"))
    assert sorted(f.stem for f in files) == sorted(TASKS) and len(files) == 16
    for f in files:
        t = load_task_file(f)
        assert t.name == f.stem and t.source == str(f)
        assert t.kind in ("mc", "gen") and t.metric in ("acc", "acc_norm", "exact_match")
    assert list(load_dir(DEFS)) == list(TASKS)  # `order:` keeps the suite's order (boolq first)
    assert PAPER_TASKS == ("boolq", "sst2", "mrpc", "rte", "wnli", "winogrande", "gsm8k")
    g = dataclasses.replace(get_task("gsm8k"), max_new_tokens=32)  # reproduce.py shortens generation this way
    assert g.max_new_tokens == 32 and g.stop == ("Question:", "</s>", "<|im_end|>") and g.kind == "gen"


NEW_TASK = """
name: toy_nli
description: a task added without Python
kind: mc
metric: acc
reader: {format: jsonl}
train: {file: toy/all.jsonl, rows: [2, null], note: rows 2 on}
eval: {file: toy/all.jsonl, rows: [0, 2], note: rows 0-1}
fields: {premise: text, hypothesis: claim, label: verdict}
gold: {field: label, map: {"yes/true": 1, "no/false": 0}}
prompt: "{{ premise }}\\nQuestion: {{ hypothesis | lower }}?\\nAnswer:"
choices: ["no", "yes"]
"""


def test_a_dropped_in_definition_is_a_usable_task(tmp_path):
    (tmp_path / "defs").mkdir()
    (tmp_path / "defs" / "toy_nli.yaml").write_text(NEW_TASK)
    (tmp_path / "data" / "toy").mkdir(parents=True)
    (tmp_path / "data" / "toy" / "all.jsonl").write_text(
        '{"text": "A cat sat.", "claim": "A CAT SAT", "verdict": "Yes"}\n'
        '{"text": "It rained.", "claim": "It was dry", "verdict": "no"}\n'
        '{"text": "x", "claim": "y", "verdict": "true"}\n'
    )
    task = load_dir(tmp_path / "defs")["toy_nli"]
    ev = load_examples(task, "eval", tmp_path / "data")
    ctx = "A cat sat.\nQuestion: a cat sat?\nAnswer:"
    assert ev[0] == Example(0, 1, (ctx, ctx), (" no", " yes"), target=" yes")
    assert [e.gold for e in ev] == [1, 0] and len(load_examples(task, "train", tmp_path / "data")) == 1
    (tmp_path / "data" / "toy" / "all.jsonl").write_text('{"text": "a", "verdict": "no"}\n')
    with pytest.raises(PortLLMError, match=r"all.jsonl:1: missing field 'claim'"):
        load_examples(task, "eval", tmp_path / "data")


@pytest.mark.parametrize(
    "edit,error",
    [
        (("metric: acc\n", ""), r"toy_nli.yaml: metric: missing"),
        (("kind: mc", "kind: ranking"), r"toy_nli.yaml: kind: unknown kind 'ranking'"),
        (("metric: acc\n", "metric: f1\n"), r"toy_nli.yaml: metric: unknown metric 'f1'"),
        (("metric: acc\n", "metric: exact_match\n"), r"toy_nli.yaml: metric: exact_match does not score a mc task"),
        (
            ("kind: mc", "kind: mc\nbuilder: magic"),
            r"toy_nli.yaml: builder: unknown hook 'magic'; known: answer_text_choices, arc_choices",
        ),
        (("kind: mc", "kind: mc\nprompts: x"), r"toy_nli.yaml: prompts: unknown key"),
        (('["no", "yes"]', "[no, yes]"), r"toy_nli.yaml: choices\[0\]: expected a template string \(quote yes/no"),
        (("{{ premise }}", "{{ passage }}"), r"toy_nli.yaml: prompt: unknown variable 'passage'"),
        (("{{ premise }}", "{{ premise }"), r"toy_nli.yaml: prompt: bad template"),
        (("field: label", "field: answer"), r"toy_nli.yaml: gold.field: unknown variable 'answer'"),
        (("rows: [2, null]", "rows: [2]"), r"toy_nli.yaml: train.rows: expected \[start, stop\]"),
        (("format: jsonl", "format: xml"), r"toy_nli.yaml: reader.format: unknown format 'xml'"),
        (("name: toy_nli", "name: other"), r"toy_nli.yaml: name: 'other' differs from the file name"),
        (("kind: mc", "kind: [mc"), r"toy_nli.yaml:\d+: malformed YAML"),
    ],
)
def test_malformed_definition_is_one_line_naming_file_and_field(tmp_path, edit, error):
    assert edit[0] in NEW_TASK
    (tmp_path / "toy_nli.yaml").write_text(NEW_TASK.replace(*edit))
    with pytest.raises(PortLLMError, match=error) as e:
        load_dir(tmp_path)
    assert "\n" not in str(e.value)


def test_readme_task_table_is_the_generated_one():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown_table() in readme
    r = subprocess.run(
        [sys.executable, "-m", "portllm.cli", "tasks", "--markdown"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and r.stdout.strip() == markdown_table()
