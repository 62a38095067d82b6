"""The routing study without the template leak (issue 21): descriptions that contain an eval template are refused,
paraphrased wordings reach no description, gate or dev-slice choice, the best merge is chosen on the dev slice,
and `describe --generate-with` writes from the inputs, not the template. Tiny random models throughout."""

import json
import shutil
from types import SimpleNamespace

import pytest

import tiny
from portllm import PortLLMError, import_adapter
from portllm.routing import describe
from portllm.routing.phatgoose import GateConfig
from portllm.routing.study import StudyConfig, patch_learning, refuse_leak, run_study
from portllm.routing.wording import load_paraphrases, paraphrased, task_wording, wordings_for
from portllm.tasks import get_task, load_examples

SST2_TEMPLATE = "Question: Is this sentence positive or negative?"


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """A tiny base and two patches whose tasks (sst2, sst2_heldout) share the toy sentiment data: 16 train
    rows, 10 eval rows (6 test + 4 dev)."""
    root = tmp_path_factory.mktemp("leak")
    base = tiny.make_base(root / "base", bpe=True, vocab_size=320, hidden=48, layers=2)
    data = tiny.sentiment_data(root / "data", n_train=16, n_eval=10)
    shutil.copy(data / "sst2" / "test.tsv", data / "sst2" / "dev.tsv")
    paths = []
    for i, task in enumerate(["sst2", "sst2_heldout"]):
        a = tiny.make_adapter(base, root / f"a{i}", r=4, alpha=8, seed=30 + i)
        paths.append(import_adapter(a, base, root / task, task=task).path)
    return {"root": root, "base": base, "data": data, "paths": paths}


def _copy(two, tmp_path, text=None):
    """The two patches copied, described with `text` (a list, one per patch) when given."""
    out = []
    for i, p in enumerate(two["paths"]):
        q = tmp_path / p.name
        shutil.copytree(p, q)
        if text is not None:
            describe(q, text[i])
        out.append(str(q))
    return out


def _cfg(two, patches, **kw):
    base = dict(base=str(two["base"]), patches=patches, held_out=[], routers=["arrow"], limit=6, merges=[], dev=0)
    return StudyConfig(**(base | kw))


# ------------------------------------------------------------------ the paraphrase file and the leak rule


def test_shipped_paraphrases_are_valid_rewordings():
    table = load_paraphrases()
    made = wordings_for(list(table), table)  # every named task: its variables, none of its original wording
    assert {"sst2", "cola", "qnli", "mrpc", "arc_easy", "boolq", "piqa", "openbookqa"} <= set(made)
    for t, variants in made.items():
        original = get_task(t).make.prompt.text
        assert len(variants) >= 2 and all(v.make.prompt.text != original for v in variants), t
        assert all(v.make.choices == get_task(t).make.choices for v in variants), t  # same answer options
    sst2 = get_task("sst2")
    with pytest.raises(PortLLMError, match=r"uses variables \['text'\]; the task's prompt uses \['sentence'\]"):
        paraphrased(sst2, "{{ text }}\nSentiment:")
    with pytest.raises(PortLLMError, match="repeats the original wording"):
        paraphrased(sst2, "Review: {{ sentence }}\nQuestion: Is this sentence positive or negative?")
    with pytest.raises(PortLLMError, match="repeats the original wording"):  # short templates: not the same text
        paraphrased(get_task("arc_easy"), "Question: {{ stem }}\nAnswer:")
    with pytest.raises(PortLLMError, match="no single prompt template"):
        paraphrased(get_task("winogrande"), "{{ before }}")
    with pytest.raises(PortLLMError, match="sst2 has 1 paraphrased wording"):
        wordings_for(["sst2"], {"sst2": ["Text: {{ sentence }}\nMood:", "Text: {{ sentence }}\nMood:"]})


def test_paraphrased_rows_are_the_same_rows_in_another_wording(two):
    t = get_task("sst2")
    w = paraphrased(t, "Review excerpt: {{ sentence }}\nThe opinion expressed here is")
    orig, para = load_examples(t, "eval", two["data"], 4), load_examples(w, "eval", two["data"], 4)
    for a, b in zip(orig, para):
        assert (a.idx, a.gold, a.continuations) == (b.idx, b.gold, b.continuations)
        assert a.contexts[0].split("\n")[0] in b.contexts[0] and SST2_TEMPLATE not in b.contexts[0]
        assert b.contexts[0].startswith("Review excerpt: ")


def test_a_description_containing_the_template_is_refused():
    tasks = ["sst2", "cola"]
    para = {"sst2": [paraphrased(get_task("sst2"), "Review excerpt: {{ sentence }}\nThe opinion expressed here is")]}
    refuse_leak("p", "movie reviews: is the writer's opinion positive or negative", tasks, para)  # own words: fine
    with pytest.raises(PortLLMError, match=r"^patch p's description contains task sst2's eval prompt template"):
        refuse_leak("p", "Answer: question: is this   SENTENCE positive or negative? yes", tasks, para)
    with pytest.raises(PortLLMError, match="contains task cola's eval prompt template"):  # another task's, too
        refuse_leak("p", "sentences. Question: Does this sentence make sense?", tasks, para)
    with pytest.raises(PortLLMError, match="a paraphrased wording of task sst2"):
        refuse_leak("p", "the opinion expressed here is what matters", tasks, para)


def test_the_study_refuses_a_leaky_description_before_scoring(two, tmp_path):
    logs = []
    patches = _copy(two, tmp_path, [f"sentiment. {SST2_TEMPLATE}", "movie reviews"])
    with pytest.raises(PortLLMError, match=r"patch sst2's description contains task sst2's eval prompt template"):
        run_study(_cfg(two, patches), tmp_path / "out", tmp_path / "cache", two["data"], log=logs.append)
    assert not [m for m in logs if m.startswith("scoring")]
    # a stored embedding that averaged in train prompts carries the template too
    q = tmp_path / "ex" / "sst2"
    shutil.copytree(two["paths"][0], q)
    describe(q, "movie reviews", examples=2, data=two["data"])
    with pytest.raises(PortLLMError, match=r"patch sst2 \(task sst2\): its stored embedding averages 2 train prompts"):
        run_study(_cfg(two, [str(q)]), tmp_path / "out", tmp_path / "cache", two["data"], log=logs.append)
    # hand-written descriptions from a folder replace them (in memory), and are checked the same way
    folder = tmp_path / "desc"
    folder.mkdir()
    (folder / "sst2.txt").write_text("film review mood\n")
    rep = run_study(_cfg(two, [str(q)], descriptions=str(folder), paraphrases=False), tmp_path / "o2",
                    tmp_path / "cache", two["data"], log=logs.append)  # fmt: skip
    assert rep["patches"][0]["description"] == "film review mood" and str(folder) in rep["patches"][0]["source"]
    (folder / "sst2.txt").write_text(f"{SST2_TEMPLATE}\n")
    with pytest.raises(PortLLMError, match="patch sst2's description contains task sst2's eval prompt template"):
        run_study(_cfg(two, [str(q)], descriptions=str(folder)), tmp_path / "o3", tmp_path / "cache", two["data"])


# ------------------------------------------------------------------ nothing built from the paraphrases


def test_paraphrases_reach_no_gate_description_or_dev_choice(two, tmp_path, monkeypatch):
    """Spies on every text gate training, description building and dev-slice scoring receive; the paraphrased
    suite itself is scored (on test rows only) and reported beside the original wording."""
    import portllm.routing.study as study
    import portllm.train as train

    seen = {"gates": [], "descriptions": [], "scored": []}
    real_load, real_record, real_score = train.load_examples, study.routing_record, study.score_tasks

    def gate_rows(task, split="eval", data=None, limit=None):
        ex = real_load(task, split, data, limit)
        seen["gates"] += [c for e in ex for c in e.contexts]
        return ex

    def record(description, source, examples, encoder):
        seen["descriptions"] += [description, *examples]
        return real_record(description, source, examples, encoder)

    def score(pset, router, loaded, *a, **k):
        seen["scored"] += [(e.idx, e.contexts[0]) for _, ex in loaded.values() for e in ex]
        return real_score(pset, router, loaded, *a, **k)

    monkeypatch.setattr(train, "load_examples", gate_rows)
    monkeypatch.setattr(study, "routing_record", record)
    monkeypatch.setattr(study, "score_tasks", score)
    gates = GateConfig(steps=2, batch_size=2, max_length=32, seed=41)  # a recipe no other test caches
    cfg = _cfg(two, _copy(two, tmp_path), routers=["glider", "phatgoose"], merges=["linear"], dev=4, tune=True,
               tune_top_k=(1,), tune_alpha=(1.0,), gates=gates)  # fmt: skip
    rep = run_study(cfg, tmp_path / "out", tmp_path / "cache", two["data"], log=lambda m: None)
    wordings = [w for t in ("sst2", "sst2_heldout") for w in wordings_for([t], load_paraphrases())[t]]
    fixed = {s for w in wordings for s in task_wording(w)}
    assert seen["gates"] and seen["descriptions"]  # gates were trained and descriptions built here, and spied on

    def has_para(text):
        return any(s in " ".join(text.lower().split()) for s in fixed)

    assert not [x for x in seen["gates"] + seen["descriptions"] if has_para(x)]
    assert not [x for i, x in seen["scored"] if i >= cfg.limit and has_para(x)]  # the dev slice: original wording
    assert [x for i, x in seen["scored"] if i < cfg.limit and has_para(x)]  # the paraphrased test rows were scored
    pa = rep["held_in_paraphrased"]
    assert set(pa) >= {"tasks", "oracle", "best_merge", "base", "routers"} and pa["tasks"] == ["sst2", "sst2_heldout"]
    assert set(pa["routers"]) == {"glider", "phatgoose", "glider (tuned)"}
    assert pa["per_task"]["sst2"]["oracle"]["n"] == 2 * cfg.limit  # both wordings, the test rows
    assert rep["goals_suite"] == "held_in_paraphrased"
    assert "paraphrased avg" in (tmp_path / "out" / "report.md").read_text()


# ------------------------------------------------------------------ the best merge: chosen on the dev slice


def test_best_merge_is_chosen_on_the_dev_slice_not_the_test_rows(two, tmp_path, monkeypatch):
    """Rigged scores: on the dev rows ties wins, on the test rows linear would. The study must report ties, with
    its test score, and never score linear on the test rows; dev rows are rows limit..limit+dev-1."""
    import portllm.routing.study as study

    calls = []
    rigged = {("linear", "dev"): 0.2, ("ties", "dev"): 0.8, ("linear", "test"): 0.9, ("ties", "test"): 0.3}

    def fake_run(lm, task, examples, batch_size=16):
        method = lm.split("/")[-1].split("-")[0]
        idx = [e.idx for e in examples]
        part = "dev" if min(idx) >= 6 else "test"
        calls.append((method, part, idx))
        v = rigged[(method, part)]
        records = [{"correct": j < round(v * len(idx))} for j in range(len(idx))]
        return SimpleNamespace(records=records, value=v, n=len(idx), majority=0.5)

    monkeypatch.setattr(study, "open_lm", lambda base, d, dtype: str(d))
    monkeypatch.setattr(study, "run_task", fake_run)
    cfg = _cfg(two, _copy(two, tmp_path, ["movie reviews", "film critics"]), merges=["linear", "ties"], dev=4)
    rep = run_study(cfg, tmp_path / "out", tmp_path / "cache", two["data"], log=lambda m: None)
    hi = rep["held_in"]
    assert hi["best_merge_method"] == "ties" and hi["merges_dev"] == {"linear": 0.2, "ties": 0.8}
    assert hi["best_merge"] == pytest.approx(0.3) and rep["held_in_paraphrased"]["best_merge"] == pytest.approx(0.3)
    assert hi["dev_rows"] == [6, 10]
    assert not [c for c in calls if c[0] == "linear" and c[1] == "test"]
    for method, part, idx in calls:
        assert set(idx) <= (set(range(6, 10)) if part == "dev" else set(range(6))), (method, part, idx)
    assert {tuple(c[2]) for c in calls if c[1] == "dev"} == {(6, 7, 8, 9)}
    with pytest.raises(PortLLMError, match="chosen on a dev slice, never on the test rows"):
        run_study(_cfg(two, cfg.patches, merges=["linear"], dev=0), tmp_path / "o", tmp_path / "cache", two["data"])


# ------------------------------------------------------------------ patches that learned their task


def test_patches_learned_needs_two_standard_errors_over_base_and_majority():
    def row(v, maj=0.5, n=100):
        return {"value": v, "n": n, "majority": maj}

    oracle = {"a": row(0.7), "b": row(0.6), "c": row(0.7, 0.68), "d": row(1.0, 0.9)}
    base = {"a": row(0.5), "b": row(0.5), "c": row(0.3, 0.68), "d": row(0.5, 0.9)}
    got = patch_learning(oracle, base, list(oracle))
    # a: (0.7-0.5)/sqrt(.21/100+.25/100) = 2.95 over θ, (0.7-0.5)/sqrt(.21/100) = 4.4 over the majority
    assert got["a"]["z_vs_base"] == pytest.approx(0.2 / (0.46 / 100) ** 0.5) and got["a"]["learned"]
    assert got["b"]["z_vs_base"] == pytest.approx(0.1 / (0.49 / 100) ** 0.5) and not got["b"]["learned"]  # 1.43
    assert got["c"]["z_vs_base"] > 2 and got["c"]["z_vs_majority"] < 2 and not got["c"]["learned"]  # majority only
    assert got["d"]["learned"]  # a perfect patch: zero variance, above both


def test_report_counts_the_patches_that_learned(two, tmp_path):
    patches = _copy(two, tmp_path, ["movie reviews", "film critics"])
    rep = run_study(_cfg(two, patches, paraphrases=False), tmp_path / "out", tmp_path / "cache", two["data"])
    per = rep["held_in"]["per_task"]
    want = patch_learning({t: per[t]["oracle"] for t in per}, {t: per[t]["base"] for t in per}, list(per))
    assert rep["patches_learned"] == sum(v["learned"] for v in want.values())
    assert rep["held_in_paraphrased"] is None and rep["goals_suite"] == "held_in"
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["patch_learning"]["sst2"]["patch"] == per["sst2"]["oracle"]["value"]


# ------------------------------------------------------------------ describe --generate-with


def test_generate_with_writes_from_the_inputs_without_the_template(two, tmp_path, monkeypatch):
    import importlib

    describe_mod = importlib.import_module("portllm.routing.describe")  # the package re-exports the function
    asked, said = [], []
    real = describe_mod.generate

    def spy(lm, prompts, **kw):
        asked.extend(prompts)
        out = real(lm, prompts, **kw)
        said.extend(out[0])
        return out

    monkeypatch.setattr(describe_mod, "generate", spy)
    q = _copy(two, tmp_path)[0]
    d = describe(q, generate_with=two["base"], data=two["data"])
    assert len(asked) == 1 and SST2_TEMPLATE.lower() not in asked[0].lower()
    for e in load_examples(get_task("sst2"), "train", two["data"], 3):  # the first 3 train inputs and answers
        assert e.contexts[0].split("\n")[0].strip() in asked[0] and "Answer: " + e.target.strip() in asked[0]
    assert d.source == f"generated by {two['base']}"
    assert d.description == f"This task is about {' '.join(said[0].split()).strip(' .')}."  # the model's own text
    stored = json.loads((tmp_path / "sst2" / "portllm.json").read_text())["extra"]["routing"]
    assert stored["description"] == d.description and stored["source"] == d.source
    # what can fail: an empty answer is one clear error; a copied template is refused by the study
    monkeypatch.setattr(describe_mod, "generate", lambda lm, prompts, **kw: ([""], None))
    with pytest.raises(PortLLMError, match="wrote an empty description; give one yourself"):
        describe(q, generate_with=two["base"], data=two["data"])
    monkeypatch.setattr(describe_mod, "generate", lambda lm, prompts, **kw: ([f" judging {SST2_TEMPLATE}\n"], None))
    describe(q, generate_with=two["base"], data=two["data"])
    with pytest.raises(PortLLMError, match="patch sst2's description contains task sst2's eval prompt template"):
        run_study(_cfg(two, [q]), tmp_path / "out", tmp_path / "cache", two["data"])


# ------------------------------------------------------------------ the CLI


def test_cli_route_study_options(two, tmp_path):
    from test_cli import one_line_error, run

    env = {"PORTLLM_DATA": str(two["data"])}
    patch = _copy(two, tmp_path)[0]
    common = ["route-study", "--base", two["base"], "--patches", patch, "--routers", "arrow", "--limit", "4"]
    line = one_line_error(run(*common, "--dev", "0", "--out", tmp_path / "o", env=env))
    assert "chosen on a dev slice, never on the test rows" in line  # merges by default: they need the dev slice
    both = ["--merges", "", "--paraphrases", tmp_path / "p.yaml", "--no-paraphrases"]
    line = one_line_error(run(*common, *both, env=env))
    assert "not both" in line
    (tmp_path / "desc").mkdir()
    (tmp_path / "desc" / "sst2.txt").write_text("film review mood")
    wordings = ["Text: {{ sentence }}\nMood:", "Critic wrote: {{ sentence }}\nVerdict:"]
    (tmp_path / "p.yaml").write_text(json.dumps({"sst2": wordings}))  # JSON is YAML
    r = run(*common, "--merges", "", "--dev", "0", "--paraphrases", tmp_path / "p.yaml", "--descriptions",
            tmp_path / "desc", "--out", tmp_path / "out", "--cache", tmp_path / "cache", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["patches"][0]["description"] == "film review mood"
    assert rep["held_in_paraphrased"]["wordings"]["sst2"] == wordings
    assert rep["held_in_paraphrased"]["per_task"]["sst2"]["base"]["n"] == 8  # 4 test rows x 2 wordings
