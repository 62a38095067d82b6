"""The drift sweep end to end on a tiny random model and tiny data."""

import json

import pytest

import tiny
from portllm.sweep import Evolution, SweepPlan, TaskRecipe, sweep


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    data = tiny.sentiment_data(root / "data", text=True)
    base = tiny.make_base(root / "base", bpe=True, vocab_size=320, hidden=32, layers=2, initializer_range=0.3)
    return {"root": root, "data": data, "base": base}


PLAN = SweepPlan(
    "tiny",
    {"sst2": TaskRecipe(steps=12, lr=2e-2, max_length=64, eval_limit=24)},
    seeds=(0, 1),
    direction=Evolution("text", steps=6, lr=5e-2, max_length=32),
    levels=(0.0, 0.5, 1.0, 2.0),
    retune_levels=(2.0,),
    correct_levels=(2.0,),
    correct_inputs=8,
    dtype="float32",
    kl_texts=8,
)


def test_sweep_writes_every_artefact_and_the_control_is_exact(toy, tmp_path):
    out = tmp_path / "out"
    r = sweep(PLAN, str(toy["base"]), out, toy["data"], tmp_path / "cache", log=lambda m: None)
    for f in ("report.json", "report.md", "loss.png", "forecast.png", "calibration.json"):
        assert (out / f).is_file(), f
    cells = r["cells"]
    assert len(cells) == 1 * 2 * 4
    keys = {
        "task",
        "seed",
        "drift",
        "evolution",
        "n",
        "majority",
        "base",
        "evolved",
        "base+patch",
        "evolved+patch",
        "evolved+retuned",
        "neg_flips",
        "pos_flips",
        "forecast",
    }
    assert keys <= set(cells[0]) and {"loss", "neg_flip_rate"} <= set(cells[0]["forecast"])
    for c in cells:
        assert 0 <= c["base+patch"] <= 1 and 0 <= c["evolved+patch"] <= 1 and 0 <= c["drift"] < 1
    control = [c for c in cells if c["t"] == 0.0]
    assert control and all(c["identical_predictions"] and c["loss"] == 0 and c["neg_flips"] == 0 for c in control)
    assert all(c["drift"] == 0 and c["forecast"]["raw_loss"] == 0 for c in control)
    drifts = {c["t"]: c["drift"] for c in cells}
    assert drifts[0.0] < drifts[0.5] < drifts[1.0] < drifts[2.0]
    assert drifts[2.0] == pytest.approx(2 * drifts[1.0], rel=1e-3)  # the levels walk one straight line
    assert [c["evolved+retuned"] is not None for c in cells if c["seed"] == 0 and c["t"] == 2.0] == [True]
    fixed = [c for c in cells if c.get("corrected")]
    assert [(c["seed"], c["t"]) for c in fixed] == [(0, 2.0)]
    x = fixed[0]["corrected"]
    assert x["scale"] in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0) and x["inputs"] == 8 and len(x["agreement"]) == 6
    assert x["agreement"][f"{x['scale']:g}"] == max(x["agreement"].values())  # chosen by agreement, no labels
    if x["scale"] == 1.0:
        assert x["evolved+patch"] == fixed[0]["evolved+patch"] and x["gain_over_plain"] == 0
    assert r["correction"]["cells"] == 1 and r["correction"]["verdict"] in ("helps", "hurts", "no clear effect")
    v = r["forecast_validation"]
    assert v["cells"] == len(cells) and "spearman_loss" in v and "mae_neg_flip_rate_points" in v
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["c"] == 0 and cal["flip_c"] == 0  # through the origin: no signal, no forecast
    assert all(c["forecast"]["loss"] == 0 and c["forecast"]["neg_flip_rate"] == 0 for c in control)
    assert json.loads((out / "report.json").read_text())["cells"] == json.loads(json.dumps(cells, default=str))
    md = (out / "report.md").read_text()
    assert "## sst2" in md and "Forecast, validated out of sample" in md and "t=2" in md
    assert "training-free correction" in md
    assert "per layer type" in md and "| q_proj |" in md


def test_rescale_on_the_same_base_keeps_the_patch_as_it_is(toy, tmp_path):
    """θ' = θ: λ = 1 reproduces θ+Δθ exactly (KL 0), so it must win over any λ that merely ties on agreement."""
    from portllm.patch import Patch
    from portllm.rescale import choose_scale, scaled_patch
    from portllm.train import TrainConfig, train

    p = tmp_path / "p"
    train(str(toy["base"]), "sst2", p, TrainConfig(steps=6, lr=2e-2, max_length=64), data=toy["data"], eval_limit=0)
    c = choose_scale(p, toy["base"], toy["base"], "sst2", n=12, data=toy["data"])
    assert c.scale == 1.0 and c.agreement["1"] == 1.0 and c.kl["1"] == pytest.approx(0, abs=1e-9)
    assert c.kl["2"] > 0 and c.kl["0.5"] > 0
    half = Patch.load(scaled_patch(p, 0.5, tmp_path / "half"))
    orig = Patch.load(p)
    name = next(iter(orig.modules))
    assert (half.modules[name].delta() - 0.5 * orig.modules[name].delta()).abs().max() < 1e-6


def test_sweep_resumes_from_its_cache(toy, tmp_path):
    cache = tmp_path / "cache"
    first = sweep(PLAN, str(toy["base"]), tmp_path / "a", toy["data"], cache, log=lambda m: None)
    said: list[str] = []
    again = sweep(PLAN, str(toy["base"]), tmp_path / "b", toy["data"], cache, log=said.append)
    assert [c["evolved+patch"] for c in again["cells"]] == [c["evolved+patch"] for c in first["cells"]]
    assert not any("training" in m or "scoring" in m or "evolving" in m for m in said)  # nothing recomputed


def test_a_task_recipe_can_narrow_the_grid(toy, tmp_path):
    from dataclasses import replace

    narrow = TaskRecipe(
        steps=12, lr=2e-2, max_length=64, eval_limit=24, levels=(0.0, 2.0), real=(), warm=False, correct=False
    )
    plan = replace(PLAN, tasks={"sst2": narrow}, seeds=(0,), real=(Evolution("text", steps=2, lr=5e-2, max_length=32),))
    r = sweep(plan, str(toy["base"]), tmp_path / "out", toy["data"], tmp_path / "cache", log=lambda m: None)
    assert sorted(c["t"] for c in r["cells"]) == [0.0, 2.0]  # not 0.5, 1 nor the real base
    assert not any(c.get("corrected") for c in r["cells"])  # correction off ...
    assert r["warm_start"] == [] and [x["level"] for x in r["retunes"]] == ["t=2"]  # ... plan's re-tune kept


def test_rescale_cli_prints_the_choice_and_refuses_bad_scales(toy, tmp_path):
    import os
    import subprocess
    import sys

    from portllm.train import TrainConfig, train

    p = tmp_path / "p"
    train(str(toy["base"]), "sst2", p, TrainConfig(steps=4, lr=2e-2, max_length=64), data=toy["data"], eval_limit=0)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "portllm.cli", "rescale", str(p), "--base", str(toy["base"])]
    cmd += ["--from", str(toy["base"]), "--inputs", "sst2", "--n", "8", "--data-dir", str(toy["data"])]
    r = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["scale"] == 1.0 and got["n"] == 8  # same base: λ = 1 is exact
    r = subprocess.run([*cmd, "--scales", "1,-2"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 3 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr


def test_validation_leaves_levels_and_tasks_out_on_synthetic_cells():
    import random

    from portllm.sweep.calibrate import fit, validate

    rng = random.Random(0)
    cells = []
    for task in ("a", "b"):
        for level, t in (("t=0", 0.0), ("t=1", 1.0), ("t=2", 2.0), ("t=3", 3.0)):
            raw, dis = 0.05 * t + rng.uniform(0, 0.01) * t, 0.1 * t
            cells.append(
                {
                    "task": task,
                    "level": level,
                    "loss": 2 * raw,
                    "neg_flip_rate": 0.5 * raw + 0.5 * dis,
                    "forecast": {
                        "raw_loss": raw,
                        "subspace_disturbance": 0.0,
                        "raw_neg_flip_rate": raw,
                        "disagreement": dis,
                    },
                }
            )
    f = fit(cells)
    assert f.a == pytest.approx(2) and f.flip_a == pytest.approx(0.5) and f.flip_b == pytest.approx(0.5)
    v = validate(cells)
    assert v["cells"] == 8 and v["spearman_loss"] == pytest.approx(1) and v["mae_neg_flip_rate_points"] < 1e-6
    assert v["leave_one_task_out"]["tasks"] == 2 and v["leave_one_task_out"]["cells"] == 8
    assert [c["forecast"]["loss"] for c in cells if c["level"] == "t=0"] == [0.0, 0.0]
