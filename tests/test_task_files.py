"""A user's own task files: from anywhere, by path or by name (--include-path, $PORTLLM_TASKS_PATH),
in every data format, through train, eval and forecast; malformed ones are one-line errors."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiny
from conftest import require_module
from portllm import Patch, PortLLMError
from portllm.tasks import get_task, include_path, load_examples, parse_tasks, registry, task_key

POS = ["good", "great", "fine", "lovely", "superb"]
NEG = ["bad", "awful", "boring", "poor", "dull"]
FORMATS = ("jsonl", "json", "csv", "tsv", "parquet")

# a user's task: the shipped schema, no reader block (the format is the data files' suffix)
TASK = {
    "name": "toy_review",
    "description": "a user's toy sentiment task",
    "kind": "mc",
    "metric": "acc",
    "train": {"file": "data/train.jsonl"},
    "eval": {"file": "data/eval.jsonl"},
    "fields": {"review": "text", "label": "label"},
    "gold": {"field": "label", "map": {"1": 1, "0": 0}},
    "prompt": "Review: {{ review }}\nSentiment:",
    "choices": ["negative", "positive"],
}


def reviews(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.randint(0, 1)
        rows.append({"text": f"the movie was {rng.choice(POS if y else NEG)} .", "label": y})
    return rows


def write_rows(f: Path, rows: list[dict]) -> None:
    """The rows in the format the file's suffix names, written with the standard tools for it."""
    f.parent.mkdir(parents=True, exist_ok=True)
    fmt = f.suffix[1:]
    if fmt == "jsonl":
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        f.write_text(json.dumps(rows))
    elif fmt in ("csv", "tsv"):
        buf = io.StringIO()
        w = csv.DictWriter(buf, ["text", "label"], delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        f.write_text(buf.getvalue())
    else:
        pa = require_module("pyarrow")
        require_module("pyarrow.parquet").write_table(pa.Table.from_pylist(rows), f)


def write_task(folder: Path, fmt: str = "jsonl", n_train: int = 64, n_eval: int = 16, **changes) -> Path:
    doc = {**TASK, "train": {"file": f"data/train.{fmt}"}, "eval": {"file": f"data/eval.{fmt}"}, **changes}
    write_rows(folder / f"data/train.{fmt}", reviews(n_train, 0))
    write_rows(folder / f"data/eval.{fmt}", reviews(n_eval, 1))
    f = folder / f"{doc['name']}.yaml"
    f.write_text(yaml.safe_dump(doc, sort_keys=False))
    return f


@pytest.fixture(autouse=True)
def _no_included_folders(monkeypatch):
    """--include-path folders are process state: each test starts with none, and no $PORTLLM_TASKS_PATH."""
    monkeypatch.setattr(registry, "INCLUDED", [])
    monkeypatch.delenv("PORTLLM_TASKS_PATH", raising=False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_task_file_outside_the_package_loads_in_every_format(fmt, tmp_path, monkeypatch):
    f = write_task(tmp_path / "mine", fmt)
    monkeypatch.chdir(tmp_path)  # data paths are relative to the task file's folder, not to the working directory
    task = get_task(str(f))
    assert task.name == "toy_review" and task.root == (tmp_path / "mine").resolve()
    ev = load_examples(task, "eval", data=None)  # no data directory: a user's files need none
    rows = reviews(16, 1)
    assert len(ev) == 16 and len(load_examples(task, "train")) == 64
    for e, r in zip(ev, rows):
        ctx = f"Review: {r['text']}\nSentiment:"
        assert e.contexts == (ctx, ctx) and e.continuations == (" negative", " positive")
        assert e.gold == r["label"]


def test_data_paths_absolute_and_in_the_data_directory(tmp_path):
    data = tmp_path / "benchmarks"
    write_rows(data / "toy/eval.jsonl", reviews(5, 1))
    write_rows(tmp_path / "elsewhere/train.json", reviews(3, 0))
    f = write_task(
        tmp_path / "mine",
        train={"file": str(tmp_path / "elsewhere/train.json")},
        eval={"file": "${PORTLLM_DATA}/toy/eval.jsonl"},
    )
    task = get_task(f)
    assert [e.gold for e in load_examples(task, "eval", data)] == [r["label"] for r in reviews(5, 1)]
    assert len(load_examples(task, "train", data)) == 3
    (tmp_path / "nowhere").mkdir()
    with pytest.raises(PortLLMError, match=r"toy_review.yaml: eval.file: data file .*nowhere/toy/eval.jsonl"):
        load_examples(task, "eval", tmp_path / "nowhere")


def test_cache_identity_is_the_name_plus_the_files_hash(tmp_path):
    a = write_task(tmp_path / "a")
    b = write_task(tmp_path / "b", description="the same name, another file")
    ka, kb = task_key(str(a)), task_key(str(b))
    assert ka == "toy_review@sha256:" + hashlib.sha256(a.read_bytes()).hexdigest()
    assert ka != kb and kb.startswith("toy_review@sha256:")
    assert task_key("sst2") == "sst2" and task_key(" SST2") == " SST2"  # shipped keys as before: caches resume
    with pytest.raises(PortLLMError, match=r"two tasks named 'toy_review'"):
        parse_tasks(f"{a},{b}")


def test_include_path_and_env_find_tasks_by_name(tmp_path, monkeypatch):
    with pytest.raises(PortLLMError, match=r"unknown task 'toy_review'.*--include-path"):
        get_task("toy_review")
    first = write_task(tmp_path / "one")
    include_path(tmp_path / "one")
    assert get_task("toy_review").source == str(first)
    other = write_task(tmp_path / "two", name="toy_other")
    monkeypatch.setenv("PORTLLM_TASKS_PATH", os.pathsep.join([str(tmp_path / "empty"), str(tmp_path / "two")]))
    with pytest.raises(PortLLMError, match=r"PORTLLM_TASKS_PATH: .*empty is not a directory"):
        get_task("toy_other")
    (tmp_path / "empty").mkdir()
    assert get_task("toy_other").source == str(other) and get_task("sst2").root is None
    assert [t.name for t in parse_tasks("toy_review,sst2,toy_other")] == ["toy_review", "sst2", "toy_other"]
    write_task(tmp_path / "three")  # a second toy_review on the search path: ambiguous, refused
    monkeypatch.setenv("PORTLLM_TASKS_PATH", str(tmp_path / "three"))
    with pytest.raises(PortLLMError, match=r"three/toy_review.yaml: name: 'toy_review' is also the task of"):
        get_task("toy_other")
    with pytest.raises(PortLLMError, match=r"--include-path .*nope: not a directory"):
        include_path(tmp_path / "nope")


# ---------------------------------------------------------------- malformed files, fuzzed

WRONG = [0, 1.5, True, [1], {"a": 1}, "text"]
TYPES = {  # field -> the types it accepts (a value of any other type must be refused naming the field)
    "name": (str,),
    "kind": (str,),
    "metric": (str,),
    "train": (dict,),
    "eval": (dict,),
    "gold": (dict,),
    "fields": (list, dict),
    "prompt": (str,),
    "choices": (list, str),
    "train.file": (str, list),
    "gold.field": (str,),
}
REQUIRED = {"name": "name", "kind": "kind", "metric": "metric", "train": "train", "eval": "eval", "gold": "gold"}
REQUIRED |= {"prompt": "prompt", "choices": "choices", "fields": "gold.field", "train.file": "train.file"}


@st.composite
def broken_task(draw) -> tuple[str, object, str]:
    """A task document with one mistake, as text; and the field the error must name."""
    doc = json.loads(json.dumps(TASK))
    how = draw(st.sampled_from(["missing", "type", "data", "yaml", "clash"]), label="mistake")
    if how in ("missing", "type"):
        key = draw(st.sampled_from(sorted(REQUIRED if how == "missing" else TYPES)), label="field")
        *parents, leaf = key.split(".")
        node = doc
        for p in parents:
            node = node[p]
        if how == "missing":
            del node[leaf]
            return yaml.safe_dump(doc), REQUIRED[key]
        ok = TYPES[key]
        node[leaf] = draw(st.sampled_from([v for v in WRONG if not isinstance(v, ok) or isinstance(v, bool)]))
        return yaml.safe_dump(doc), key
    if how == "data":
        split = draw(st.sampled_from(["train", "eval"]), label="split")
        doc[split]["file"] = draw(st.sampled_from(["data/missing.jsonl", "/no/such/dir/x.csv", "data"]))
        return yaml.safe_dump(doc), f"{split}.file"
    if how == "yaml":
        lines = yaml.safe_dump(doc).splitlines(keepends=True)
        keys = [n for n, line in enumerate(lines) if line[:1].isalpha()] + [len(lines)]  # outside any scalar
        cut = draw(st.sampled_from(keys), label="at line")
        junk = draw(st.sampled_from(["kind: [mc\n", 'prompt: "open\n', "name: {a\n", "\xff\xfe\n", "train: [\n"]))
        return "".join(lines[:cut]) + junk + "".join(lines[cut:]), ""
    field = draw(st.sampled_from(["name", "aliases"]), label="clash")
    if field == "name":
        doc["name"] = draw(st.sampled_from(["sst2", "boolq", "GSM8K", "arc-easy"]))
    else:
        doc["aliases"] = [draw(st.sampled_from(["sst2", "winogrande"]))]
    return yaml.safe_dump(doc), field


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=broken_task())
def test_malformed_task_files_are_one_line_naming_file_and_field(tmp_path, case):
    text, field = case
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        write_rows(Path(d) / "data/train.jsonl", reviews(4, 0))
        write_rows(Path(d) / "data/eval.jsonl", reviews(4, 1))
        name = re.search(r"^name: (\S+)$", text, re.M)
        f = Path(d) / f"{name.group(1) if name else 'toy_review'}.yaml"  # named after the task, as a file must be
        f.write_bytes(text.encode("utf-8", "surrogateescape") if "\xff" not in text else text.encode("latin-1"))
        with pytest.raises(PortLLMError) as e:
            load_examples(get_task(str(f)), "eval")
        msg = str(e.value)
        assert "\n" not in msg and len(msg) < 800, msg
        assert msg.startswith(str(f)), msg  # names the file
        if field:  # names the field (a YAML mistake names the line instead, or says the file is not text)
            assert re.match(re.escape(str(f)) + r": " + re.escape(field) + r"\b", msg), (field, msg)
        else:
            assert re.match(re.escape(str(f)) + r"(:\d+: malformed YAML|: not UTF-8|: a task definition is a)", msg)


# ---------------------------------------------------------------- train, eval, forecast on a tiny model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base = tiny.make_base(root / "base", bpe=True, vocab_size=320, hidden=32, layers=2, initializer_range=0.3)
    return {"root": root, "base": base, "new": tiny.evolve(base, root / "new", eps=0.05)}


def test_a_task_file_trains_evaluates_and_forecasts(models, tmp_path):
    from portllm.eval import evaluate, open_lm
    from portllm.forecast import forecast
    from portllm.train import TrainConfig, train

    f = write_task(tmp_path / "mine", "csv", n_train=64, n_eval=16)
    cfg = TrainConfig(steps=24, batch_size=8, lr=2e-2, max_length=64)
    r = train(models["base"], str(f), tmp_path / "patch", cfg)
    assert sum(r.losses[-4:]) < 0.6 * sum(r.losses[:4])  # it learned the user's data
    record = Patch.load(tmp_path / "patch").extra["training"]
    assert record["task"] == "toy_review@sha256:" + hashlib.sha256(f.read_bytes()).hexdigest()

    res = evaluate(open_lm(models["base"], tmp_path / "patch"), [get_task(str(f))], limit=16)
    before = evaluate(open_lm(models["base"]), [get_task(str(f))], limit=16)
    share = sum(r["label"] for r in reviews(16, 1)) / 16
    assert res.tasks["toy_review"].n == 16 and res.tasks["toy_review"].majority == max(share, 1 - share)
    assert res.tasks["toy_review"].value > before.tasks["toy_review"].value

    fc = forecast(tmp_path / "patch", models["new"], models["base"], inputs=str(f), n=12)
    assert fc.outputs is not None and fc.outputs.kind == "choices" and fc.outputs.n == 12
    assert fc.outputs.source == "toy_review" and fc.loss_points is not None


# ---------------------------------------------------------------- the CLI


def portllm(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "portllm.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PORTLLM_TASKS_PATH": "", **(env or {})},
    )


def test_cli_tasks_check_prints_three_examples_with_their_answers(tmp_path):
    f = write_task(tmp_path / "mine", "tsv")
    r = portllm("tasks", "--check", str(f))
    assert r.returncode == 0, r.stderr
    assert "'toy_review' (mc, acc), 64 train and 16 eval examples" in r.stdout
    blocks = r.stdout.split("eval example ")[1:]
    assert len(blocks) == 3
    for i, (block, row) in enumerate(zip(blocks, reviews(3, 1))):
        assert block.startswith(f"{i} (answer: {row['label']})")
        assert f"Review: {row['text']}\nSentiment:" in block
        right = ["negative", "positive"][row["label"]]
        assert f" * [{row['label']}] ' {right}'" in block  # the answer is the marked choice
        assert block.count(" * [") == 1
    bad = tmp_path / "mine" / "toy_review.yaml"
    bad.write_text(bad.read_text().replace("metric: acc", "metric: f1"))
    r = portllm("tasks", "--check", str(bad))
    assert r.returncode != 0 and re.search(r"toy_review.yaml: metric: unknown metric 'f1'", r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_eval_on_a_task_file_and_by_include_path(models, tmp_path):
    f = write_task(tmp_path / "mine", "json", n_eval=6)
    r = portllm("eval", "--model", str(models["base"]), "--tasks", str(f), "--limit", "5", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert list(out["tasks"]) == ["toy_review"] and out["tasks"]["toy_review"]["n"] == 5
    args = ["eval", "--model", str(models["base"]), "--tasks", "toy_review,sst2", "--limit", "2", "--json"]
    r = portllm(*args, "--include-path", str(tmp_path / "mine"), "--data-dir", str(tiny.sentiment_data(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert list(json.loads(r.stdout)["tasks"]) == ["toy_review", "sst2"]
    r = portllm(*args[:-1], env={"PORTLLM_TASKS_PATH": str(tmp_path / "mine"), "PORTLLM_DATA": str(tmp_path)})
    assert r.returncode == 0, r.stderr


def test_social_iqa_gold_is_the_index_of_the_answer_text(tmp_path):
    """The shipped social_iqa definition reads common-bench's layout (options as a list, the answer as the text of
    one): gold is that option's index, never a position guessed; an answer that is no option is a one-line error
    naming the row."""
    rows = [
        {"context": f"C{i}", "question": f"Q{i}?", "options": ["a", "b", "c"], "answer": "abc"[i % 3]}
        for i in range(1200)
    ]
    write_rows(tmp_path / "socialiqa/dev.jsonl", rows)
    task = get_task("social_iqa")
    ev = load_examples(task, "eval", tmp_path)
    assert len(ev) == 1000 and len(load_examples(task, "train", tmp_path)) == 200  # rows 0-999 / 1000-
    assert [e.gold for e in ev[:6]] == [0, 1, 2, 0, 1, 2]
    assert ev[4].contexts[0] == "C4\nQuestion: Q4?\nAnswer:" and ev[4].continuations == (" a", " b", " c")
    # an option written twice scores the same twice and argmax takes the first: gold is the first too
    write_rows(tmp_path / "socialiqa/dev.jsonl", [dict(rows[0], options=["c", "b", "c"], answer="c")] * 1200)
    assert load_examples(task, "eval", tmp_path, limit=1)[0].gold == 0
    write_rows(tmp_path / "socialiqa/dev.jsonl", [dict(rows[0], answer="d")] * 1200)
    with pytest.raises(PortLLMError, match=r"dev.jsonl:1: answer 'd' is not one of the options"):
        load_examples(task, "eval", tmp_path)
