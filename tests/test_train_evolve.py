"""Training, evolving and the reproduce pipeline on a tiny random model and tiny data."""

import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file

import tiny
from portllm import Patch, PortLLMError, fingerprint
from portllm.evolve import EvolveConfig, EvolveResult, evolve
from portllm.stats import majority, wilson
from portllm.train import TrainConfig, train

POS = ["good", "great", "fine", "lovely", "superb"]
NEG = ["bad", "awful", "boring", "poor", "dull"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    rng = random.Random(0)
    data = root / "data"
    (data / "sst2").mkdir(parents=True)
    (data / "text").mkdir()

    def rows(n):
        out = []
        for _ in range(n):
            y = rng.randint(0, 1)
            out.append(f"the movie was {rng.choice(POS if y else NEG)} .\t{y}")
        return "sentence\tlabel\n" + "\n".join(out) + "\n"

    (data / "sst2" / "train.tsv").write_text(rows(64))
    (data / "sst2" / "test.tsv").write_text(rows(24))
    words = lambda n: " ".join(rng.choice(POS + NEG + ["the", "movie", "was", "."]) for _ in range(n))  # noqa: E731
    (data / "text" / "corpus.txt").write_text(words(3000))
    # the "mix" corpus of the reproduce profiles, in miniature
    (data / "text" / "wikitext-2").mkdir()
    (data / "text" / "wikitext-2" / "valid.txt").write_text(words(2000))
    (data / "instruct").mkdir()
    for f in ("alpaca_data_1k.json", "math_data.json"):
        rows = [{"instruction": words(8), "input": "", "output": words(12)} for _ in range(20)]
        (data / "instruct" / f).write_text(json.dumps(rows))
    # a wide init: with the default 0.02 a 32-wide random model cannot express confident logits
    base = tiny.make_base(root / "base", bpe=True, vocab_size=320, hidden=32, layers=2, initializer_range=0.3)
    return {"root": root, "data": data, "base": base}


CFG = dict(steps=24, batch_size=8, lr=2e-2, max_length=64, checkpoint_every=5)


def test_train_reduces_loss_and_writes_a_patch(toy, tmp_path):
    r = train(toy["base"], "sst2", tmp_path / "p", TrainConfig(**CFG), data=toy["data"], eval_limit=24)
    assert len(r.losses) == 24
    assert sum(r.losses[-4:]) / 4 < 0.6 * sum(r.losses[:4]) / 4
    p = Patch.load(tmp_path / "p")
    tr = p.extra["training"]
    assert tr["examples_seen"] == 24 * 8 and tr["task"] == "sst2" and tr["wall_s"] > 0 and tr["peak_rss_mb"] > 0
    assert p.task == "sst2" and p.source_fingerprint == fingerprint(toy["base"])
    assert p.extra["eval_on_base"]["n"] == 24
    d = r.to_dict()
    assert d["patch"] == str(tmp_path / "p") and d["steps"] == 24 and d["eval"]["n"] == 24
    assert d["loss_first"] == r.losses[0] and d["wall_s"] == round(r.wall_s, 2)
    assert {m.rsplit(".", 1)[-1] for m in p.modules} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert all(m.rank == 8 and m.scaling == 2.0 for m in p.modules.values())
    assert not (tmp_path / ".p.ckpt").exists()


def test_training_is_deterministic(toy, tmp_path):
    train(toy["base"], "sst2", tmp_path / "a", TrainConfig(**{**CFG, "steps": 6}), data=toy["data"])
    train(toy["base"], "sst2", tmp_path / "b", TrainConfig(**{**CFG, "steps": 6}), data=toy["data"])
    a, b = (
        load_file(tmp_path / "a" / "adapter_model.safetensors"),
        load_file(tmp_path / "b" / "adapter_model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_training_resumes_from_checkpoint(toy, tmp_path):
    ref = train(toy["base"], "sst2", tmp_path / "ref", TrainConfig(**CFG), data=toy["data"])

    def stop(step, loss):
        if step == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(toy["base"], "sst2", tmp_path / "p", TrainConfig(**CFG), data=toy["data"], callback=stop)
    assert not (tmp_path / "p").exists() and (tmp_path / ".p.ckpt" / "state.json").is_file()
    r = train(toy["base"], "sst2", tmp_path / "p", TrainConfig(**CFG), data=toy["data"])
    assert r.resumed_from == 10 and len(r.losses) == 24
    assert r.losses == pytest.approx(ref.losses, abs=1e-5)
    a, b = (
        load_file(tmp_path / "p" / "adapter_model.safetensors"),
        load_file(tmp_path / "ref" / "adapter_model.safetensors"),
    )
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert Patch.load(tmp_path / "p").extra["training"]["resumed_from"] == 10


def test_train_bad_input(toy, tmp_path):
    with pytest.raises(PortLLMError, match="unknown task"):
        train(toy["base"], "sst5", tmp_path / "x", TrainConfig(**CFG), data=toy["data"])
    with pytest.raises(PortLLMError, match="too few examples"):
        train(toy["base"], "sst2", tmp_path / "x", TrainConfig(**{**CFG, "steps": 500}), data=toy["data"])
    with pytest.raises(PortLLMError, match="fewer than one batch"):
        train(toy["base"], "sst2", tmp_path / "x", TrainConfig(**{**CFG, "max_examples": 4}), data=toy["data"])
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_evolve_changes_weights_and_records_lineage(toy, tmp_path, mode):
    cfg = EvolveConfig(mode=mode, steps=6, batch_size=4, max_length=64, lr=1e-3, rank=4, alpha=8)
    lin = evolve(toy["base"], "text/corpus.txt", tmp_path / "evolved", cfg, data=toy["data"])
    assert lin.parent["fingerprint"] == fingerprint(toy["base"])
    assert lin.fingerprint == fingerprint(tmp_path / "evolved") != lin.parent["fingerprint"]
    assert lin.steps == 6 and lin.corpus["windows"] > 4
    assert lin.drift["q_proj"] > 0 and lin.drift["up_proj"] > 0
    if mode == "lora":
        assert lin.drift["input_layernorm"] == 0  # LoRA touches only the linear projections
    saved = json.loads((tmp_path / "evolved" / "portllm_lineage.json").read_text())
    assert saved == lin.to_dict() and EvolveResult.read(tmp_path / "evolved") == lin


def test_evolve_bad_input(toy, tmp_path):
    with pytest.raises(PortLLMError, match="corpus file text/nothing.txt not found"):
        evolve(toy["base"], "text/nothing.txt", tmp_path / "e", EvolveConfig(steps=2), data=toy["data"])
    with pytest.raises(PortLLMError, match="mode"):
        evolve(toy["base"], "text/corpus.txt", tmp_path / "e", EvolveConfig(mode="half"), data=toy["data"])


def test_reproduce_end_to_end_and_cache(toy, tmp_path, monkeypatch):
    from portllm import reproduce as rp

    prof = rp.Profile(
        "tiny",
        {"sst2": rp.TaskPlan(steps=16, eval_limit=None, max_length=64, lr=2e-2)},
        corpus="text/corpus.txt",
        evolve_steps=4,
        evolve_lr=1e-3,
        batch_size=8,
        dtype="float32",
    )
    from portllm import steps

    calls = []
    for name in ("train_patch_step", "port_step"):
        real = getattr(steps, name)
        monkeypatch.setattr(steps, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    r = rp.reproduce(
        str(toy["base"]), prof, out=tmp_path / "out", data=toy["data"], cache=tmp_path / "cache", log=lambda m: None
    )
    assert calls == ["train_patch_step", "train_patch_step", "port_step"]
    for f in ("report.json", "report.md", "accuracy.png", "efficiency.png"):
        assert (tmp_path / "out" / f).is_file() and (tmp_path / "out" / f).stat().st_size > 100
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved == r.to_dict() and rp.ReproduceReport.from_dict(saved) == r
    t = saved["tasks"]["sst2"]
    assert set(rp.VARIANTS) <= set(t) and all(0 <= t[v] <= 1 for v in rp.VARIANTS) and t["n"] == 24
    assert t["base+patch"] > t["base"]  # the patch learned the toy task
    eff = saved["efficiency"]
    assert eff["port"]["peak_rss_mb"] > 0 and eff["retune"]["wall_s"] > 0 and eff["retune"]["trainable_params"] > 0
    assert saved["flips"]["sst2"]["n"] == 24
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Table 2" in md and "±" not in md.split("## Paired")[0] and "± 0.0" not in md
    assert "| majority |" in md and "McNemar p" in md and "average, learned" in md and "Patch learned" in md
    # every score with its Wilson interval, the majority baseline of the slice, paired comparisons
    (samples,) = (tmp_path / "cache" / "evals").glob("sst2-base-*/samples_sst2.jsonl")
    golds = [json.loads(x)["gold"] for x in samples.read_text().splitlines()]
    assert len(golds) == 24 and t["majority"] == majority(golds)[1]
    for v in rp.VARIANTS:
        assert t["ci"][v] == list(wilson(round(t[v] * 24), 24)) and t["ci"][v][0] <= t[v] <= t["ci"][v][1]
    pr = saved["paired"]["sst2"]
    assert set(pr) == {"ported_minus_retuned", "ported_minus_patched", "patched_minus_base"}
    assert pr["ported_minus_retuned"]["diff"] == pytest.approx(t["ported_minus_retuned"])
    assert pr["patched_minus_base"]["diff"] == pytest.approx(t["base+patch"] - t["base"])
    f = saved["flips"]["sst2"]
    assert pr["ported_minus_patched"]["negative_flips"] == f["negative_flips"] and f["verdict"]
    assert pr["ported_minus_patched"]["mcnemar_p"] == f["mcnemar_p"]
    for p in pr.values():
        assert p["ci_low"] <= p["diff"] <= p["ci_high"] and 0 <= p["mcnemar_p"] <= 1 and p["verdict"]
    learned = pr["patched_minus_base"]["ci_low"] > 0 and t["ci"]["base+patch"][0] > t["majority"]
    assert saved["learned"] == (["sst2"] if learned else [])
    none = {v: None for v in rp.VARIANTS} | {"ported_minus_retuned": None, "ported_minus_retuned_ci": []}
    assert saved["average_learned"] == (saved["average"] if learned else none)
    lo, hi = saved["average"]["ported_minus_retuned_ci"]
    assert lo <= saved["average"]["ported_minus_retuned"] <= hi
    # the port's cost is the port step's own process, as `portllm port --json` reports it
    (rec_file,) = (tmp_path / "cache" / "ports").glob("*.json")
    rec = json.loads(rec_file.read_text())
    assert set(rec) >= {"out", "mode", "verdict", "applied", "wall_s", "peak_rss_mb", "rss_reset"}
    assert r.per_task_cost["sst2"].port.wall_s == rec["wall_s"] and rec["applied"] > 0
    # the second run trains, ports and evaluates nothing
    calls.clear()
    r2 = rp.reproduce(
        str(toy["base"]), prof, out=tmp_path / "out2", data=toy["data"], cache=tmp_path / "cache", log=lambda m: None
    )
    assert calls == []
    assert r2.tasks == r.tasks and r2.flips == r.flips and r2.per_task_cost == r.per_task_cost


def test_committed_report_reads_and_renders_without_stderr_bars():
    """docs/reproduce/report.json predates the paired statistics: it still reads, keeps its keys, and its
    report.md shows Wilson intervals (0 of 80 is [0.0, 4.6], not "0.0 ± 0.0")."""
    from pathlib import Path

    from portllm import reproduce as rp
    from portllm.cli.training import reproduce_tables

    d = json.loads((Path(__file__).parents[1] / "docs" / "reproduce" / "report.json").read_text())
    r = rp.ReproduceReport.from_dict(d)
    assert r.learned is None and r.paired == {} and r.tasks["sst2"].majority is None
    again = r.to_dict()
    assert set(again) >= set(d) and all(again[k] == d[k] for k in d if k not in ("tasks", "flips"))
    assert all(again["tasks"][n][k] == v for n in d["tasks"] for k, v in d["tasks"][n].items())
    md = rp.markdown(r)
    assert "± 0.0" not in md and "0.0 [0.0, 4.6]" in md and "| majority |" in md
    assert reproduce_tables(r) is not None


def test_reproduce_cli_tables_full_width_when_piped(toy, tmp_path):
    """`portllm reproduce --tasks sst2 | cat`: the real profile's recipe on the tiny model, each step
    isolated from the CLI's own process; the tables keep whole columns, library warnings stay out."""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "portllm.cli", "reproduce", "--base", str(toy["base"]), "--tasks", "sst2"]
        + ["--data-dir", str(toy["data"]), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="60"),
        timeout=900,
    )
    assert r.returncode == 0, r.stderr
    header = next(line for line in r.stdout.splitlines() if line.startswith("┃") and "task ┃" in line)
    assert "θ' + Δθ' (re-tuned)" in header and "neg. flips" in header and "…" not in r.stdout
    assert "majority" in header and "McNemar p" in header and "average, all tasks" in r.stdout
    assert "training Δ on θ'" in r.stderr and "porting Δθ onto θ'" in r.stderr
    assert "Warning" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["profile"] == "quick" and list(report["tasks"]) == ["sst2"]


# ---------------------------------------------------------------- isolated steps (module-level: the child imports them)


def _grow(mb: int) -> int:
    block = bytearray(b"\x01") * (mb << 20)  # written, so resident
    del block
    return os.getpid()


def _fail(message: str) -> None:
    raise PortLLMError(message)


def test_isolated_step_returns_result_and_its_own_usage():
    from portllm import isolate

    pid, usage = isolate.run(_grow, 300)
    assert pid != os.getpid()
    assert usage.wall_s > 0 and usage.peak_rss_mb >= 300 and usage.rss_reset


def test_isolated_step_errors_are_one_line():
    from portllm import isolate

    with pytest.raises(PortLLMError) as e:
        isolate.run(_fail, "too few examples:\n  lower --steps")
    assert str(e.value) == "too few examples: lower --steps"
    with pytest.raises(PortLLMError, match=r"^int failed: ValueError: invalid literal") as e:
        isolate.run(int, "x")
    assert "\n" not in str(e.value)


def test_isolated_step_keeps_stdout_clean(capfd):
    from portllm import isolate

    isolate.run(print, "from the child")
    out, err = capfd.readouterr()
    assert "from the child" not in out and "from the child" in err


# ---------------------------------------------------------------- warm start (train --init) and the resume identity


@pytest.fixture(scope="module")
def warm(toy, tmp_path_factory):
    """Δθ trained on θ, and θ' (θ perturbed) to re-tune it on."""
    root = tmp_path_factory.mktemp("warm")
    train(toy["base"], "sst2", root / "patch", TrainConfig(**CFG), data=toy["data"])
    return {"patch": root / "patch", "evolved": tiny.evolve(toy["base"], root / "evolved")}


def _lora_factors(model):
    """A PEFT model's LoRA factors, keyed as a patch keys them."""
    from portllm.patch import PEFT_PREFIX

    return {
        k.removeprefix(PEFT_PREFIX).replace(".default", ""): v.detach().clone()
        for k, v in model.state_dict().items()
        if ".lora_" in k
    }


def test_train_init_starts_from_the_patch(toy, warm, tmp_path, monkeypatch):
    import portllm.train as tr

    before = {}
    real_fit = tr.fit
    monkeypatch.setattr(
        tr, "fit", lambda model, *a, **k: before.update(_lora_factors(model)) or real_fit(model, *a, **k)
    )
    init = Patch.load(warm["patch"])
    cfg = TrainConfig(**{**CFG, "steps": 1, "lr": 0.0})
    r = train(warm["evolved"], "sst2", tmp_path / "w", cfg, data=toy["data"], init=warm["patch"])
    # step 0, before any update: the LoRA modules hold the patch's factors exactly
    assert before.keys() == init.tensors.keys() and all(torch.equal(before[k], init.tensors[k]) for k in before)
    # one step at lr 0 writes the init patch back, now stamped with θ'
    w = Patch.load(tmp_path / "w")
    assert w.tensors.keys() == init.tensors.keys()
    assert all(torch.allclose(w.tensors[k], init.tensors[k], atol=1e-7) for k in w.tensors)
    assert (w.config["r"], w.config["lora_alpha"]) == (init.config["r"], init.config["lora_alpha"])
    assert w.source_fingerprint == fingerprint(warm["evolved"]) != init.source_fingerprint
    rec = w.extra["training"]["init"]
    assert rec == r.init == r.to_dict()["init"]
    assert rec["path"] == str(warm["patch"].absolute()) and rec["weights_sha256"] == init.weights_sha256
    assert rec["base_fingerprint"] == init.source_fingerprint and rec["task"] == "sst2"
    # lineage: the init's history, then this run naming its init
    assert w.manifest.lineage[:-1] == init.manifest.lineage
    assert w.manifest.lineage[-1]["event"] == "trained"
    assert w.manifest.lineage[-1]["init"] == {"path": rec["path"], "weights_sha256": init.weights_sha256}


def test_train_init_continues_where_the_patch_left_off(toy, warm, tmp_path):
    cfg = TrainConfig(**{**CFG, "steps": 4})
    cold = train(warm["evolved"], "sst2", tmp_path / "cold", cfg, data=toy["data"])
    hot = train(warm["evolved"], "sst2", tmp_path / "hot", cfg, data=toy["data"], init=warm["patch"])
    assert hot.losses[0] < 0.8 * cold.losses[0]  # same first batch (same seed): only the start differs
    assert cold.init is None and Patch.load(tmp_path / "cold").extra["training"]["init"] is None


def test_train_init_refuses_conflicts_and_misfits(toy, warm, tmp_path):
    def run(base=warm["evolved"], **kw):
        train(base, "sst2", tmp_path / "x", TrainConfig(**CFG, **kw), data=toy["data"], init=warm["patch"])

    with pytest.raises(PortLLMError, match=r"--rank 4 conflicts with init patch .* \(rank 8\); omit it"):
        run(rank=4)
    with pytest.raises(PortLLMError, match=r"--alpha 8 conflicts"):
        run(alpha=8.0)
    with pytest.raises(PortLLMError, match=r"--targets q_proj conflicts"):
        run(target_modules=("q_proj",))
    wide = tiny.make_base(tmp_path / "wide", bpe=True, vocab_size=320, hidden=48, layers=2)
    with pytest.raises(PortLLMError, match=r"does not fit base .*wide: targets: .* in the base but the patch expects"):
        run(base=wide)
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.ckpt").exists()
    run(rank=8, alpha=16.0)  # agreeing with the patch is no conflict


def _stop_at_12(step, loss):
    if step == 12:
        raise KeyboardInterrupt


def test_checkpoint_of_another_run_is_not_resumed(toy, warm, tmp_path, capsys):
    """The checkpoint is keyed on recipe + base + task + train data + init, not on the recipe alone."""
    import shutil

    out = tmp_path / "p"

    def interrupted():
        with pytest.raises(KeyboardInterrupt):
            cfg = TrainConfig(**CFG)
            train(toy["base"], "sst2", out, cfg, data=toy["data"], callback=_stop_at_12, overwrite=True)
        assert (tmp_path / ".p.ckpt" / "state.json").is_file()
        capsys.readouterr()

    interrupted()
    r = train(warm["evolved"], "sst2", out, TrainConfig(**CFG), data=toy["data"])
    assert r.resumed_from == 0 and len(r.losses) == 24
    assert "checkpoint" in (note := capsys.readouterr().err) and "another base;" in note

    interrupted()
    r = train(toy["base"], "sst2", out, TrainConfig(**CFG), data=toy["data"], init=warm["patch"], overwrite=True)
    assert r.resumed_from == 0 and "another init patch;" in capsys.readouterr().err

    interrupted()
    other = tmp_path / "data"
    shutil.copytree(toy["data"], other)
    rows = (other / "sst2" / "train.tsv").read_text().splitlines()
    (other / "sst2" / "train.tsv").write_text("\n".join(rows[:1] + rows[2:] + rows[1:2]) + "\n")  # same rows, reordered
    r = train(toy["base"], "sst2", out, TrainConfig(**CFG), data=other, overwrite=True)
    assert r.resumed_from == 0 and "another train data;" in capsys.readouterr().err

    interrupted()  # the same run still resumes
    r = train(toy["base"], "sst2", out, TrainConfig(**CFG), data=toy["data"], overwrite=True)
    assert r.resumed_from == 10 and capsys.readouterr().err == ""


def test_train_patch_step_warm_starts_in_its_own_process(toy, warm, tmp_path):
    from portllm import steps

    cfg = TrainConfig(**{**CFG, "steps": 1, "lr": 0.0})
    r = steps.train_patch_step(warm["evolved"], "sst2", tmp_path / "s", cfg, toy["data"], init=warm["patch"])
    assert r.init["weights_sha256"] == Patch.load(warm["patch"]).weights_sha256 == r.to_dict()["init"]["weights_sha256"]


def test_train_cli_init(toy, warm, tmp_path):
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "portllm.cli", "train", "--base", str(warm["evolved"]), "--task", "sst2"]
            + ["--data-dir", str(toy["data"]), "--steps", "2", "--max-length", "64", "--eval-limit", "0"]
            + ["--init", str(warm["patch"]), *map(str, args)],
            capture_output=True,
            text=True,
            env=dict(os.environ, HF_HUB_OFFLINE="1"),
            timeout=300,
        )

    r = cli("--out", tmp_path / "w", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["steps"] == 2 and d["init"]["path"] == str(warm["patch"].absolute())
    assert Patch.load(tmp_path / "w").config["r"] == 8
    r = cli("--out", tmp_path / "x", "--rank", "4")
    assert r.returncode == 3 and r.stderr.strip().startswith("error: --rank 4 conflicts with init patch"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
