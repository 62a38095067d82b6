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
    assert "Table 2" in (tmp_path / "out" / "report.md").read_text()
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
