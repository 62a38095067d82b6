"""The forecast's validation protocol (issue 21) on toy cells: controls out, patches never on both sides of a
fold, interval coverage measured on held-out cells from out-of-sample widths, one family says why it has no
figures; and a re-render that recomputes nothing."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from portllm.errors import PortLLMError
from portllm.sweep import calibrate
from portllm.sweep.calibrate import family_folds, fit, level_folds, patch_of, task_folds, validate

SCALE = {"a": 1.0, "b": 1.3, "c": 0.45}  # task c's raw signal overstates its loss: unseen, it is missed


def toy_cells(families=("fam",), seeds=(0, 1, 2), noise=0.004):
    """Three tasks × seeds × levels t = 0 (the control), 1, 2, 3 per family: loss = SCALE[task]·raw + noise."""
    rng = np.random.default_rng(7)
    cells = []
    for family in families:
        for task, k in SCALE.items():
            for seed in seeds:
                for t in (0, 1, 2, 3):
                    raw = 0.03 * t * (1 + 0.2 * rng.random()) if t else 0.0
                    dist = 0.05 * t
                    dis = 1.6 * raw
                    e = noise * rng.standard_normal() if t else 0.0
                    cells.append(
                        {
                            "family": family,
                            "task": task,
                            "seed": seed,
                            "level": f"t={t}",
                            "t": float(t),
                            "drift": 0.01 * t,
                            "loss": k * raw + e,
                            "neg_flip_rate": 0.8 * k * dis + abs(e),
                            "forecast": {
                                "raw_loss": raw,
                                "subspace_disturbance": dist,
                                "raw_neg_flip_rate": raw,
                                "disagreement": dis,
                            },
                        }
                    )
    return cells


def _loto(cells):
    """Leave one task out with numpy alone: per held-out task, least squares through the origin on the other
    tasks' cells (points); the prediction and the training fit's in-sample residual sd for each cell."""
    pred, insample = [], []
    for c in cells:
        train = [d for d in cells if d["task"] != c["task"]]
        x = np.array([[100 * d["forecast"]["raw_loss"]] for d in train])  # the shipped form
        y = np.array([100 * d["loss"] for d in train])
        w = np.linalg.lstsq(x, y, rcond=None)[0]
        pred.append(float(w @ [100 * c["forecast"]["raw_loss"]]))
        insample.append(float((y - x @ w).std(ddof=2)))
    return np.array(pred), np.array(insample)


def test_controls_are_counted_and_left_out_of_every_figure():
    cells = toy_cells()
    v = validate(cells)
    assert v["controls"] == 9  # 3 tasks × 3 seeds at t = 0
    without = validate([c for c in cells if c["t"] != 0])
    for key in ("leave_one_task_out", "leave_one_level_out"):
        assert v[key]["cells"] == v[key]["interval_cells"] == 27
        assert v[key] == without[key]  # the controls change no figure
    assert without["controls"] == 0
    assert all(c["forecast"]["held_out_by"].startswith("control") for c in cells if c["t"] == 0)
    assert all(c["forecast"]["held_out_by"].startswith("leave_one_task_out") for c in cells if c["t"] != 0)
    # fit: the controls add no row, and its sd is the out-of-sample one of the 27 others
    assert "27 sweep cells (9 t = 0 controls left out)" in fit(cells).source


def test_no_patch_sits_on_both_sides_of_any_fold():
    cells = [c for c in toy_cells(families=("f1", "f2")) if c["t"] != 0]
    for protocol in (task_folds, family_folds, level_folds):
        folds = protocol(cells)
        assert len(folds) >= 2
        for f in folds:
            assert f.test and f.train
            assert not {patch_of(c) for c in f.test} & {patch_of(c) for c in f.train}, (protocol, f.held)
    lv = level_folds(cells)
    assert calibrate.grouped_by_patch(cells) and len(lv) == 3 * 3  # one level × one seed per fold
    for f in lv:
        assert len({(c["level"], c["seed"]) for c in f.test}) == 1
        assert f.test[0]["level"] not in {c["level"] for c in f.train}
    # every held-out cell is predicted exactly once by leave one task out and by leave one level out
    for protocol in (task_folds, level_folds):
        held = [id(c) for f in protocol(cells) for c in f.test]
        assert sorted(held) == sorted(id(c) for c in cells)
    # one seed: no grouping is possible, and the validation says so
    one = [c for c in cells if c["seed"] == 0 and c["family"] == "f1"]
    v = validate(one)
    assert v["leave_one_level_out"]["grouped_by_patch"] is False
    assert "patches are on both sides" in v["leave_one_level_out"]["protocol"]


def test_interval_coverage_is_measured_on_held_out_cells_with_out_of_sample_widths():
    """Coverage recomputed with numpy: each held-out task's width is 1.96 × the RMS of the other tasks'
    held-out residuals. On these cells the in-sample spread of the training fit would give another coverage
    (task c is missed when unseen), so a validation that used it would fail here."""
    cells = toy_cells()
    v = validate(cells)
    used = [c for c in cells if c["t"] != 0]
    pred, insample = _loto(used)
    meas = np.array([100 * c["loss"] for c in used])
    resid = pred - meas
    tasks = np.array([c["task"] for c in used])
    half = np.array([1.96 * np.sqrt(np.mean(resid[tasks != t] ** 2)) for t in tasks])
    coverage = float(np.mean(np.abs(resid) <= half))
    in_sample = float(np.mean(np.abs(resid) <= 1.96 * insample))
    assert in_sample != pytest.approx(coverage, abs=0.05)  # the cells tell the two apart
    t = v["leave_one_task_out"]
    assert v["interval_coverage"] == t["interval_coverage"] == pytest.approx(coverage, abs=1e-12)
    assert t["interval_cells"] == len(used) and t["interval_half_width_points"] == pytest.approx(np.median(half))
    assert t["spearman_loss"] == pytest.approx(spearmanr(pred, meas).statistic, abs=1e-9)
    assert t["mae_loss_points"] == pytest.approx(np.mean(np.abs(resid)), abs=1e-9)
    # each cell carries its own interval, in accuracy units
    for c, p, h in zip(used, pred, half):
        assert c["forecast"]["loss"] == pytest.approx(p / 100, abs=1e-12)
        assert c["forecast"]["loss_interval"] == pytest.approx([(p - h) / 100, (p + h) / 100], abs=1e-12)
    # the shipped sd is the RMS of the same out-of-sample residuals, not the fit's own
    assert fit(cells).residual_sd_points == pytest.approx(np.sqrt(np.mean(resid**2)), abs=1e-9)
    # goals read off the figures
    assert v["met"]["interval_coverage"] == (0.90 <= coverage <= 0.98)
    assert v["met"]["leave_one_task_out.mae_loss_points"] == (t["mae_loss_points"] <= 2.5)


def test_leave_one_family_out_with_one_family_gives_the_reason_not_a_number():
    v = validate(toy_cells())
    f = v["leave_one_family_out"]
    assert f["cells"] == 0 and f["spearman_loss"] is None and f["mae_loss_points"] is None
    assert "one family (fam)" in f["reason"] and f["families"] == ["fam"]
    assert v["met"]["leave_one_family_out.spearman_loss"] is None
    two = validate(toy_cells(families=("f1", "f2")))["leave_one_family_out"]
    assert "reason" not in two and two["cells"] == 54 and two["families"] == ["f1", "f2"]
    with pytest.raises(PortLLMError, match="family"):
        validate([{k: v for k, v in c.items() if k != "family"} for c in toy_cells()])


def test_the_chart_never_joins_a_real_base_to_the_interpolated_line():
    from portllm.sweep.report import by_level, draw_series

    class Axis:
        def __init__(self):
            self.calls = []

        def __getattr__(self, name):
            return lambda *a, **k: self.calls.append((name, a, k))

    report = {"cells": toy_cells()}
    report["cells"].append(dict(report["cells"][5], level="real", t=None, drift=0.015, loss=0.2))
    rows = by_level(report, "a", lambda c: c["loss"])
    ax = Axis()
    draw_series(ax, rows, "a", "C0", ("-", "o"))
    (line,) = [a for n, a, _ in ax.calls if n == "plot"]
    assert line[0] == pytest.approx([0, 1, 2, 3])  # the interpolated levels only, in drift order
    (real,) = [(a, k) for n, a, k in ax.calls if n == "errorbar"]
    assert real[0][0] == pytest.approx([1.5]) and real[1]["linestyle"] == "none"


DOCS = Path(__file__).parents[1] / "docs" / "sweep" / "full" / "report.json"


@pytest.mark.skipif(not DOCS.is_file(), reason="needs the committed sweep")
def test_rerender_keeps_every_measured_value_and_refuses_to_change_one(tmp_path, monkeypatch):
    from portllm.sweep import report as rep

    src = tmp_path / "in.json"
    src.write_text(DOCS.read_text())
    before = json.loads(src.read_text())
    r = rep.rerender(src, tmp_path)
    assert [rep.measured(c) for c in r["cells"]] == [rep.measured(c) for c in before["cells"]]
    assert {c["family"] for c in r["cells"]} == {before["base"]["name"]}
    for f in ("report.json", "report.md", "loss.png", "forecast.png", "calibration.json"):
        assert (tmp_path / f).is_file()
    assert "**leave one task out** (headline)" in (tmp_path / "report.md").read_text()

    real_validate = rep.validate

    def meddling(cells):
        out = real_validate(cells)
        cells[3]["loss"] += 0.01
        return out

    monkeypatch.setattr(rep, "validate", meddling)
    src.write_text(json.dumps(copy.deepcopy(before)))
    with pytest.raises(PortLLMError, match="changed a measured cell value"):
        rep.rerender(src, tmp_path / "x")
