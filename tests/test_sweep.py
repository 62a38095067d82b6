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
    v = r["forecast_validation"]
    assert v["cells"] == len(cells) and "spearman_loss" in v and "mae_neg_flip_rate_points" in v
    assert json.loads((out / "report.json").read_text())["cells"] == json.loads(json.dumps(cells, default=str))
    md = (out / "report.md").read_text()
    assert "## sst2" in md and "Forecast, validated out of sample" in md and "t=2" in md


def test_sweep_resumes_from_its_cache(toy, tmp_path):
    cache = tmp_path / "cache"
    first = sweep(PLAN, str(toy["base"]), tmp_path / "a", toy["data"], cache, log=lambda m: None)
    said: list[str] = []
    again = sweep(PLAN, str(toy["base"]), tmp_path / "b", toy["data"], cache, log=said.append)
    assert [c["evolved+patch"] for c in again["cells"]] == [c["evolved+patch"] for c in first["cells"]]
    assert not any("training" in m or "scoring" in m or "evolving" in m for m in said)  # nothing recomputed
