"""The drift sweep end to end on a tiny random model and tiny data."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

import tiny
from portllm.sweep import Evolution, SweepPlan, TaskRecipe, sweep


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    data = tiny.sentiment_data(root / "data", n_eval=24 + 64, text=True)
    # the first 24 eval rows are scored (PLAN's eval_limit), the next 64 are the forecast's unscored inputs; the
    # toy's few words would repeat every scored sentence there, so they get another wording (real data does not)
    test = data / "sst2" / "test.tsv"
    head, *rows = test.read_text().splitlines()
    test.write_text("\n".join([head, *rows[:24], *(r.replace("the movie was", "that film is") for r in rows[24:])]))
    base = tiny.make_base(root / "base", bpe=True, vocab_size=320, hidden=32, layers=2, initializer_range=0.3)
    return {"root": root, "data": data, "base": base}


PLAN = SweepPlan(
    "tiny",
    {"sst2": TaskRecipe(steps=12, lr=2e-2, max_length=64, eval_limit=24)},
    seeds=(0, 1),
    direction=Evolution("text", steps=6, lr=5e-2, max_length=32),
    levels=(0.0, 0.5, 1.0, 2.0),
    retune_levels=(2.0,),
    correct_levels=(0.0, 2.0),  # at t = 0 (θ' = θ) the right λ is known: 1
    correct_inputs=8,
    dtype="float32",
    kl_texts=8,
)


@pytest.fixture(scope="module")
def ran(toy, tmp_path_factory):
    """PLAN run once on a fresh cache: its report, its log, and the cache (the resume test reruns on it)."""
    root = tmp_path_factory.mktemp("ran")
    said: list[str] = []
    r = sweep(PLAN, str(toy["base"]), root / "out", toy["data"], root / "cache", log=said.append)
    return {"report": r, "out": root / "out", "cache": root / "cache", "log": said}


def _held_out_forecast(cells):
    """Leave one level out grouped by patch, computed here from the cells' raw signals with numpy alone: the
    t = 0 controls dropped; per held-out (level, seed), least squares through the origin on the cells of the
    other levels AND the other seeds (one task: a seed is a patch), in points. None for the controls."""
    used = [i for i, c in enumerate(cells) if c["t"] != 0]
    pred, fpred = {}, {}
    for i in used:
        held = cells[i]
        train = [cells[j] for j in used if cells[j]["level"] != held["level"] and cells[j]["seed"] != held["seed"]]
        f = [c["forecast"] for c in train]
        x = np.array([[100 * g["raw_loss"]] for g in f])  # the shipped form: one signal per figure
        ab = np.linalg.lstsq(x, np.array([100 * c["loss"] for c in train]), rcond=None)[0]
        fx = np.array([[100 * g["raw_neg_flip_rate"]] for g in f])
        fab = np.linalg.lstsq(fx, np.array([100 * c["neg_flip_rate"] for c in train]), rcond=None)[0]
        g = held["forecast"]
        pred[i] = ab @ [100 * g["raw_loss"]]
        fpred[i] = max(0.0, fab @ [100 * g["raw_neg_flip_rate"]])
    return [pred.get(i) for i in range(len(cells))], [fpred.get(i) for i in range(len(cells))]


def test_sweep_writes_every_artefact_and_the_control_is_exact(toy, ran):
    out, r = ran["out"], ran["report"]
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
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["c"] == 0 and cal["flip_c"] == 0  # through the origin: no signal, no forecast
    assert all(c["forecast"]["loss"] == 0 and c["forecast"]["neg_flip_rate"] == 0 for c in control)
    assert json.loads((out / "report.json").read_text())["cells"] == json.loads(json.dumps(cells, default=str))
    md = (out / "report.md").read_text()
    assert "## sst2" in md and "Forecast, validated the way a user meets it" in md and "t=2" in md
    assert {c["family"] for c in cells} == {str(toy["base"].name)}
    assert {c["signals_inputs"] for c in cells} == {"eval-unscored: 64 inputs, none of them scored"}
    assert "training-free correction" in md
    assert "per layer type" in md and "| q_proj |" in md


def test_the_correction_at_zero_drift_keeps_the_patch_and_the_verdict_follows_the_cells(ran):
    """θ' = θ at t = 0, so λ = 1 reproduces θ+Δθ exactly and must be chosen; with that cell's zero gain beside
    any other single gain g, the mean g/2 always lies inside its 95% interval (±0.98|g|): no clear effect."""
    cells = ran["report"]["cells"]
    fixed = [c for c in cells if c.get("corrected")]
    assert [(c["seed"], c["t"]) for c in fixed] == [(0, 0.0), (0, 2.0)]
    zero, far = fixed[0], fixed[1]
    x = zero["corrected"]
    assert x["scale"] == 1.0 and x["agreement"]["1"] == 1.0 and x["inputs"] == 8 and len(x["agreement"]) == 6
    assert x["evolved+patch"] == zero["evolved+patch"] == zero["base+patch"] and x["gain_over_plain"] == 0
    y = far["corrected"]
    assert y["agreement"][f"{y['scale']:g}"] == max(y["agreement"].values())  # chosen by agreement, no labels
    assert y["gain_over_plain"] == pytest.approx(y["evolved+patch"] - far["evolved+patch"])
    assert y["loss"] == pytest.approx(far["base+patch"] - y["evolved+patch"])
    summary = ran["report"]["correction"]
    gains = np.array([c["corrected"]["gain_over_plain"] for c in fixed])
    half = 1.96 * gains.std(ddof=1) / np.sqrt(len(gains))
    assert summary["cells"] == 2 and summary["verdict"] == "no clear effect"
    assert summary["mean_gain_points"] == pytest.approx(100 * gains.mean(), abs=1e-9)
    assert summary["ci_points"] == pytest.approx([100 * (gains.mean() - half), 100 * (gains.mean() + half)], abs=1e-9)
    assert summary["scale_not_1"] == int(y["scale"] != 1.0)


def test_a_correction_that_removes_the_patch_is_judged_to_hurt(toy, ran, monkeypatch):
    """λ = 0 makes θ'+λΔθ θ' itself; at t = 0 that is θ zero-shot, which loses what the patch learned, so the
    sweep must measure exactly that loss and call the correction harmful."""
    from dataclasses import replace

    import portllm.sweep.run as sweep_run
    from portllm.rescale import ScaleChoice

    asked = []

    def drop_the_patch(patch, old, new, task, n, scales, data):
        asked.append(n)
        return ScaleChoice(0.0, n, {f"{s:g}": 0.0 for s in scales}, {f"{s:g}": 0.0 for s in scales})

    monkeypatch.setattr(sweep_run, "choose_scale", drop_the_patch)
    # everything but the correction (another input count: another cache key) comes from the first run's cache
    plan = replace(PLAN, seeds=(0,), levels=(0.0,), retune_levels=(), correct_levels=(0.0,), correct_inputs=7)
    r = sweep(plan, str(toy["base"]), ran["cache"].parent / "hurt", toy["data"], ran["cache"], log=lambda m: None)
    assert asked == [7]
    (c,) = r["cells"]
    assert c["evolved"] == c["base"] and c["evolved+patch"] == c["base+patch"] > c["base"]  # the toy patch learned
    x = c["corrected"]
    assert x["scale"] == 0.0 and x["evolved+patch"] == c["base"]
    assert x["gain_over_plain"] == pytest.approx(c["base"] - c["base+patch"]) and x["gain_ci"][0] < 0
    assert x["loss"] == pytest.approx(c["base+patch"] - c["base"])
    fix = r["correction"]
    assert fix["verdict"] == "hurts" and fix["mean_gain_points"] == pytest.approx(100 * (c["base"] - c["base+patch"]))
    assert fix["scale_not_1"] == 1 and fix["helped"] == 0


def test_correction_verdict_needs_the_interval_to_exclude_zero():
    from portllm.sweep.run import correction_summary

    def cells(gains, lows=None):
        return [
            {"corrected": {"gain_over_plain": g, "gain_ci": [lo, g + 0.05], "scale": 1.25}}
            for g, lo in zip(gains, lows or [g - 0.05 for g in gains])
        ]

    assert correction_summary([{"corrected": None}]) is None
    assert correction_summary(cells([0.10, 0.12, 0.08]))["verdict"] == "helps"
    assert correction_summary(cells([-0.10, -0.12, -0.08]))["verdict"] == "hurts"
    mixed = correction_summary(cells([0.10, -0.06, 0.02]))  # mean +2 points, interval about ±9
    assert mixed["verdict"] == "no clear effect" and mixed["mean_gain_points"] == pytest.approx(2.0)
    assert correction_summary(cells([0.10, 0.12, 0.08]))["helped"] == 3 and mixed["helped"] == 1


def _check_validation(cells, v):
    """`validate`'s figures and the forecasts it filled in, against numpy least squares, scipy's Spearman ρ
    and plain mean absolute errors over the same held-out cells (the toy has one task, so the headline is
    leave one level out, grouped by patch; the two t = 0 controls are in no figure)."""
    from scipy.stats import spearmanr

    pred, fpred = _held_out_forecast(cells)
    held = [i for i, p in enumerate(pred) if p is not None]
    assert len(held) == len(cells) - 2 and v["controls"] == 2
    assert [cells[i]["forecast"]["loss"] for i in held] == pytest.approx([pred[i] / 100 for i in held], abs=1e-9)
    assert [cells[i]["forecast"]["neg_flip_rate"] for i in held] == pytest.approx(
        [fpred[i] / 100 for i in held], abs=1e-9
    )
    pred, fpred = [pred[i] for i in held], [fpred[i] for i in held]
    loss = [100 * cells[i]["loss"] for i in held]
    nfr = [100 * cells[i]["neg_flip_rate"] for i in held]
    lv = v["leave_one_level_out"]
    assert v["headline"] == "leave_one_level_out" and lv["grouped_by_patch"] and v["cells"] == lv["cells"] == len(held)
    assert v["spearman_loss"] == pytest.approx(spearmanr(pred, loss).statistic, abs=1e-9)
    assert v["mae_loss_points"] == pytest.approx(np.mean(np.abs(np.subtract(pred, loss))), abs=1e-9)
    assert v["mae_neg_flip_rate_points"] == pytest.approx(np.mean(np.abs(np.subtract(fpred, nfr))), abs=1e-9)
    assert v["leave_one_task_out"]["cells"] == 0 and "one task" in v["leave_one_task_out"]["reason"]


def test_forecast_validation_matches_an_independent_computation(ran):
    """The sweep's validation recomputed independently on its own cells, then on the same
    cells with the measured outcomes moved off the fitted plane (on the toy every flip is negative, so the
    flip forecast is exact there and its MAE 0 whatever the averaging)."""
    import copy

    from portllm.sweep.calibrate import validate

    r = ran["report"]
    cells = r["cells"]
    assert len(cells) == 8
    _check_validation(cells, r["forecast_validation"])
    moved = copy.deepcopy(cells)
    for i, c in enumerate(moved):
        c["loss"] += 0.01 * (i % 3)
        c["neg_flip_rate"] += 0.02 * ((i * 5) % 7) / 7
    v = validate(moved)
    assert v["mae_neg_flip_rate_points"] > 0.1
    _check_validation(moved, v)
    # the calibration written beside the report: the same least squares on every cell
    x = np.array([[100 * c["forecast"]["raw_loss"]] for c in cells])
    (a,) = np.linalg.lstsq(x, np.array([100 * c["loss"] for c in cells]), rcond=None)[0]
    b = 0.0
    cal = json.loads((ran["out"] / "calibration.json").read_text())
    assert (cal["a"], cal["b"]) == pytest.approx((a, b), rel=1e-6, abs=1e-9)


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


def test_sweep_resumes_from_its_cache(toy, ran, tmp_path):
    computed = ("training", "scoring", "evolving", "interpolating", "porting")
    assert any("training" in m for m in ran["log"]) and any("evolving" in m for m in ran["log"])  # the first run did
    said: list[str] = []
    again = sweep(PLAN, str(toy["base"]), tmp_path / "b", toy["data"], ran["cache"], log=said.append)
    assert again["cells"] == ran["report"]["cells"]
    assert not any(m.lstrip().startswith(computed) for m in said)  # nothing recomputed
    assert said[0].startswith("θ = ") and any(m.startswith("[sst2]") for m in said)


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
                    "family": "f",
                    "task": task,
                    "seed": 0,
                    "level": level,
                    "t": t,
                    "loss": 2 * raw,
                    "neg_flip_rate": 0.5 * raw,
                    "forecast": {
                        "raw_loss": raw,
                        "subspace_disturbance": 0.0,
                        "raw_neg_flip_rate": raw,
                        "disagreement": dis,
                    },
                }
            )
    f = fit(cells)
    assert f.a == pytest.approx(2) and f.flip_a == pytest.approx(0.5) and f.b == f.flip_b == 0  # one signal each
    v = validate(cells)
    assert v["form"] == "raw" and set(v["forms"]) == {"raw", "raw+weights+disagreement"}
    for form in v["forms"].values():  # both forms hold the exact map here; each is scored out of sample
        assert form["leave_one_task_out"]["cells"] == 6 and form["leave_one_task_out"]["mae_loss_points"] < 1e-6
    assert v["forms"]["raw"]["leave_one_family_out"]["cells"] == 0  # one family: nothing to leave out
    assert v["controls"] == 2 and v["headline"] == "leave_one_task_out"
    assert v["cells"] == 6 and v["spearman_loss"] == pytest.approx(1) and v["mae_neg_flip_rate_points"] < 1e-6
    assert v["leave_one_task_out"]["tasks"] == 2 and v["leave_one_task_out"]["cells"] == 6
    assert v["leave_one_level_out"]["grouped_by_patch"] is False  # one seed per task
    assert [c["forecast"]["loss"] for c in cells if c["level"] == "t=0"] == [0.0, 0.0]


def test_the_forecast_signals_never_see_a_scored_item(toy, tmp_path, monkeypatch):
    """Every cell's signals come from unscored inputs, none of them a scored eval item, even where the unscored
    part repeats one (placed first there, so a filter that forgot it would take it); from train rows likewise."""
    from portllm.sweep import run
    from portllm.tasks import get_task, load_examples

    data = tmp_path / "data"
    shutil.copytree(toy["data"], data)
    test = data / "sst2" / "test.tsv"
    head, *rows = test.read_text().splitlines()
    scored_row = rows[0]
    test.write_text("\n".join([head, *rows[:24], scored_row, *rows[24:]]) + "\n")
    seen: list = []
    real = run.choice_signals
    monkeypatch.setattr(run, "choice_signals", lambda a, b, ex, t: seen.append(ex) or real(a, b, ex, t))
    plan = replace(PLAN, seeds=(0,), levels=(0.0, 1.0), retune_levels=(), correct_levels=(), signal_rows=16)
    sweep(plan, str(toy["base"]), tmp_path / "out", data, tmp_path / "cache", log=lambda _: None)
    scored = load_examples(get_task("sst2"), "eval", data, PLAN.tasks["sst2"].eval_limit)
    evals = {tuple(e.contexts) for e in scored}
    assert len(seen) == 2 and all(len(ex) == 16 for ex in seen)
    assert all(tuple(e.contexts) not in evals for ex in seen for e in ex)
    assert all(e.idx >= 24 for ex in seen for e in ex)  # rows after the scored ones
    train = data / "sst2" / "train.tsv"
    head, *rows = train.read_text().splitlines()
    other = [r.replace("the movie was", "that film is") for r in rows]
    train.write_text("\n".join([head, scored_row, *other]) + "\n")
    kept = run.signal_examples(get_task("sst2"), "train", data, 8, scored)
    assert len(kept) == 8 and all(tuple(e.contexts) not in evals for e in kept)


class Stop(Exception):
    """Raised by a stand-in where the real step would start working on its device."""


def test_the_sweep_device_reaches_every_step_and_keeps_its_own_cache(toy, tmp_path, monkeypatch):
    """`sweep --device cuda`: training, evolving, scoring, signals, KL and repairs are asked for on that device (no
    step quietly on the CPU), and its artefacts live apart from the CPU's (other bits: never mixed)."""
    from types import SimpleNamespace

    import portllm.sweep.repaired as repaired
    import portllm.sweep.run as run
    from portllm import steps

    ctx = run.SweepContext.open(PLAN, str(toy["base"]), toy["data"], tmp_path / "c", lambda m: None, False, "cuda:0")
    assert ctx.cache.root == tmp_path / "c" / "on-cuda"
    assert ctx.train_config(PLAN.tasks["sst2"], 0).device == "cuda:0"
    seen: list[tuple[str, object]] = []

    def stop(name, device):
        seen.append((name, device))
        raise Stop

    monkeypatch.setattr(run, "evolve", lambda *a, **k: stop("evolve", a[3].device))
    monkeypatch.setattr(run, "open_lm", lambda *a, **k: stop("open_lm", k.get("device")))
    monkeypatch.setattr(steps, "eval_step", lambda *a, **k: stop("eval", k.get("device")))
    monkeypatch.setattr(steps, "repair_step", lambda *a, **k: stop("repair", k.get("device")))
    monkeypatch.setattr(repaired.Patch, "load", lambda *a, **k: SimpleNamespace(weights_sha256="0" * 64))
    ts = SimpleNamespace(
        name="sst2", recipe=PLAN.tasks["sst2"], first_seed=0, patches={0: tmp_path / "p"}, with_patch={0: []},
        task=None, signal_examples=[],
    )  # fmt: skip
    lv = {"label": "t=1", "dir": toy["base"], "fingerprint": "f" * 32}
    calls = (
        lambda: ctx.evolved(PLAN.direction),
        lambda: ctx.score(toy["base"], "f" * 32, None, False, "sst2", 24),
        lambda: ctx.signal_records(toy["base"], "f" * 32, tmp_path / "p", ts),
        lambda: run.text_kl(toy["base"], toy["base"], toy["data"], 2, "float32", ctx.device),
        lambda: repaired.repairs(ctx, ts, lv, []),
    )
    for call in calls:
        with pytest.raises(Stop):
            call()
    assert seen == [("evolve", "cuda:0"), ("eval", "cuda:0"), ("open_lm", "cuda:0"), ("open_lm", "cuda:0"),
                    ("repair", "cuda:0")]  # fmt: skip


def test_what_runs_only_on_the_cpu_is_refused_on_a_device_before_any_work():
    from portllm.errors import PortLLMError
    from portllm.sweep import PLANS
    from portllm.sweep.run import _runs_on

    _runs_on(PLANS["gemma-repair"], "cuda:0")  # no correction, multiple choice: runs there
    _runs_on(PLANS["full"], "cpu")
    for name, why in (("full", "rescale correction"), ("generation", "generation plan")):
        with pytest.raises(PortLLMError, match=why):
            _runs_on(PLANS[name], "cuda:0")


def test_repair_inputs_narrow_the_plan_and_each_task_without_falling_back():
    from portllm.errors import PortLLMError
    from portllm.sweep import PLANS
    from portllm.sweep.plan import only_repair_inputs

    p = only_repair_inputs(PLANS["repair"], ("text",))
    assert p.repair_inputs == ("text",) and p.tasks["sst2_heldout"].repair_inputs is None  # the plan's: text
    assert p.tasks["commonsense_qa"].repair_inputs == ()  # it never had text: nothing, not the plan's
    keep = only_repair_inputs(PLANS["gemma-repair"], ("task", "self"))
    assert keep.tasks == PLANS["gemma-repair"].tasks and keep.repair_inputs == ("task", "self")
    with pytest.raises(PortLLMError, match="repairs from task, text, self"):
        only_repair_inputs(PLANS["repair"], ("nope",))


def test_no_retune_clears_every_task_recipes_retune_levels(monkeypatch, tmp_path):
    """`sweep --no-retune` re-tunes nothing, also where a task's recipe names its own re-tune levels."""
    from typer.testing import CliRunner

    import portllm.sweep as sweep_pkg
    from portllm.cli import app

    seen = {}

    def fake_sweep(plan, *a, **kw):
        seen["plan"] = plan
        raise SystemExit(0)

    monkeypatch.setattr(sweep_pkg, "sweep", fake_sweep)
    args = ["sweep", "--plan", "gemma-repair", "--out", str(tmp_path), "--device", "cpu"]
    assert sweep_pkg.PLANS["gemma-repair"].tasks["commonsense_qa"].retune_levels  # the case this guards
    CliRunner().invoke(app, [*args, "--no-retune"])
    assert seen["plan"].retune_levels == () and all(r.retune_levels == () for r in seen["plan"].tasks.values())
    CliRunner().invoke(app, args)
    assert seen["plan"].tasks["commonsense_qa"].retune_levels == (0.4,)
