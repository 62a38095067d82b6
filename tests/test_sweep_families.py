"""Two base families in one sweep report (issue 21): `--join` adds another family's sweep, the validation then
leaves one family out without a patch or family on both sides of a fold, calibration.json carries the pooled fit
and one per family, `forecast` uses the patch's own family's fit (or the pooled one, saying the family was never
fitted), and every joined file that cannot be joined is refused in one line. Toy reports, no models."""

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest

from portllm import forecast as forecast_mod
from portllm.errors import PortLLMError
from portllm.forecast import Calibration, OutputSignals, WeightSignals
from portllm.sweep import calibrate
from portllm.sweep import report as rep

SLOPE = {"a": 1.0, "b": 1.4, "c": 0.6}  # per task: loss = slope · family · raw signal
FAMILIES = {  # base name -> (model family, how much more the port loses on it)
    "fam-a": ("llama 8x2 v10", 1.0),
    "fam-b": ("gemma3_text 16x2 v20", 2.5),
}
TS = (0, 1, 2, 3)


def toy_cells(base, seeds=(0, 1, 2), noise=0.003):
    rng = np.random.default_rng(len(base))
    scale = FAMILIES[base][1]
    cells = []
    for task, k in SLOPE.items():
        for seed in seeds:
            for t in TS:
                raw = 0.02 * t * (1 + 0.3 * rng.random()) if t else 0.0
                e = noise * rng.standard_normal() if t else 0.0
                loss = scale * k * raw + e
                cells.append(
                    {
                        "task": task,
                        "seed": seed,
                        "level": f"t={t}",
                        "t": float(t),
                        "drift": 0.01 * t,
                        "n": 400,
                        "majority": 0.5,
                        "base": 0.55,
                        "evolved": 0.55 - 0.01 * t,
                        "base+patch": 0.85,
                        "evolved+patch": 0.85 - loss,
                        "evolved+retuned": None,
                        "loss": loss,
                        "loss_ci": [loss - 0.02, loss + 0.02],
                        "neg_flip_rate": 0.7 * scale * k * raw + abs(e),
                        "forecast": {
                            "raw_loss": raw,
                            "subspace_disturbance": 0.04 * t,
                            "raw_neg_flip_rate": raw,
                            "disagreement": 1.5 * raw,
                        },
                    }
                )
    return cells


def toy_report(base, plan="toy"):
    """A sweep report as run.py writes it (before `finish`): its cells name no family, as old reports did."""
    levels = [
        {"label": f"t={t}", "t": float(t), "evolution": "interpolated", "drift": 0.01 * t, "kl_text": 0.001 * t}
        for t in TS
    ]
    retunes = [
        {"task": "a", "level": "t=3", "drift": 0.03, "seed": 0, "retuned": 0.8, "ported": 0.75}
        | {"ported_minus_retuned": -0.05, "ci": [-0.09, -0.01], "mcnemar_p": 0.02, "steps": 10}
    ]
    return {
        "plan": {"name": plan, "kind": "mc", "real": [], "seeds": [0, 1, 2]},
        "base": {"name": base, "fingerprint": "fp1:" + base, "model_family": FAMILIES[base][0]},
        "levels": levels,
        "cells": toy_cells(base),
        "retunes": retunes,
        "warm_start": [],
        "correction": None,
        "forecast_validation": None,
        "calibration": None,
        "machine": {"platform": "toy", "cpus": 1, "python": "3"},
        "wall_s": 1.0,
    }


def written(tmp_path, base, plan="toy"):
    """A finished sweep of `base`, written to tmp/<base>/report.json."""
    out = tmp_path / base
    out.mkdir()
    for c in (r := toy_report(base, plan))["cells"]:
        c["family"] = base
    rep.write(rep.forecast_fields(r), out)
    return out / "report.json"


@pytest.fixture
def joined(tmp_path, monkeypatch):
    """fam-a's sweep with fam-b's joined; the folds leave one family out handed the validation are recorded."""
    folds = []
    real = calibrate.family_folds

    def spy(cells):
        out = real(cells)
        folds.extend(out)
        return out

    monkeypatch.setattr(calibrate, "family_folds", spy)
    other = written(tmp_path, "fam-b", plan="gemma")
    out = tmp_path / "joined"
    out.mkdir()
    r = toy_report("fam-a")
    for c in r["cells"]:
        c["family"] = "fam-a"
    mine = r["cells"]
    rep.finish(r, out, [other])
    return SimpleNamespace(report=r, out=out, other=other, folds=folds, mine=mine)


def _lstsq(cells):
    used = [c for c in cells if c["t"] != 0]
    x = np.array([[100 * c["forecast"]["raw_loss"]] for c in used])  # the shipped form: loss ≈ a · raw_loss
    return np.append(np.linalg.lstsq(x, np.array([100 * c["loss"] for c in used]), rcond=None)[0], 0.0)


def _loto_sd(cells):
    """The out-of-sample residual sd within some cells: each task predicted from the others' fit."""
    used = [c for c in cells if c["t"] != 0]
    res = []
    for task in SLOPE:
        w = _lstsq([c for c in used if c["task"] != task])
        for c in (c for c in used if c["task"] == task):
            res.append(w[0] * 100 * c["forecast"]["raw_loss"] - 100 * c["loss"])
    return float(np.sqrt(np.mean(np.square(res))))


def test_the_joined_report_leaves_one_family_out_without_a_family_on_both_sides(joined):
    r = joined.report
    v = r["forecast_validation"]["leave_one_family_out"]
    assert v["families"] == ["fam-a", "fam-b"] and v.get("reason") is None
    assert v["cells"] == 2 * 27  # every non-control cell of both families, held out once
    assert v["spearman_loss"] is not None and v["mae_loss_points"] is not None and v["interval_coverage"] is not None
    assert {f.held for f in joined.folds} == {"fam-a", "fam-b"}
    for f in joined.folds:
        assert {c["family"] for c in f.test} == {f.held} and f.held not in {c["family"] for c in f.train}
    assert not any(calibrate.is_control(c) for f in joined.folds for c in f.test + f.train)
    saved = json.loads((joined.out / "report.json").read_text())
    assert [c["family"] for c in saved["cells"]] == ["fam-a"] * 36 + ["fam-b"] * 36
    assert [x["family"] for x in saved["retunes"]] == ["fam-a", "fam-b"]
    (j,) = saved["joined"]
    assert set(j) == {"report", "base", "levels", "plan"} and (j["report"], j["plan"]) == (str(joined.other), "gemma")
    assert j["base"]["name"] == "fam-b" and [lv["label"] for lv in j["levels"]] == [f"t={t}" for t in TS]
    assert len(joined.mine) == 36  # the running sweep's own list is never extended (it is written after each task)


def test_a_report_that_had_joined_another_family_is_joined_with_its_own_cells_only(joined, tmp_path):
    """fam-b's sweep joins fam-a's report, which had joined fam-b: only fam-a's own cells and re-tunes come."""
    r = toy_report("fam-b")
    rep.finish(r, tmp_path, [joined.out / "report.json"])
    count = {f: sum(c["family"] == f for c in r["cells"]) for f in FAMILIES}
    assert count == {"fam-a": 36, "fam-b": 36}
    assert [x["family"] for x in r["retunes"]] == ["fam-b", "fam-a"]


def test_calibration_json_has_the_pooled_fit_and_one_per_family(joined):
    cal = json.loads((joined.out / "calibration.json").read_text())
    assert cal["family"] is None and "2 base families" in cal["source"] and "--join" in cal["source"]
    assert set(cal["families"]) == {"llama 8x2 v10", "gemma3_text 16x2 v20"}
    every = joined.report["cells"]
    assert [cal["a"], cal["b"]] == pytest.approx(_lstsq(every), rel=1e-9)
    for base, (model, _) in FAMILIES.items():
        own = [c for c in every if c["family"] == base]
        x = cal["families"][model]
        assert x["cells"] == 27 and set(x) == {*forecast_mod.MC_FIELDS, "cells"}
        assert [x["a"], x["b"]] == pytest.approx(_lstsq(own), rel=1e-9)
        assert x["residual_sd_points"] == pytest.approx(_loto_sd(own), rel=1e-9)  # out of sample, within family
        assert f"--base {base}" in x["source"] and "leave one task out" in x["source"]
    a, b = (cal["families"][FAMILIES[k][0]]["a"] for k in FAMILIES)
    assert b > 1.8 * a  # the toy families differ: a pooled fit alone would fit neither


def test_one_family_keeps_todays_calibration_json_and_adds_its_one_entry(tmp_path):
    cal = json.loads((written(tmp_path, "fam-a").parent / "calibration.json").read_text())
    assert list(cal) == [*forecast_mod.MC_FIELDS, "family", "families"]
    assert cal["family"] == "llama 8x2 v10" and list(cal["families"]) == ["llama 8x2 v10"]
    assert cal["families"]["llama 8x2 v10"]["a"] == pytest.approx(cal["a"], rel=1e-12)
    assert cal["source"].startswith("portllm sweep --plan toy (36 cells): fitted on 27 sweep cells")


def test_for_family_picks_the_familys_own_fit_or_says_it_was_never_fitted(joined):
    pooled = Calibration.load(joined.out / "calibration.json")
    file = json.loads((joined.out / "calibration.json").read_text())
    own, note = pooled.for_family("gemma3_text 16x2 v20")
    assert own.a == file["families"]["gemma3_text 16x2 v20"]["a"] and own.family == "gemma3_text 16x2 v20"
    assert note.startswith("calibration: fitted on gemma3_text 16x2 v20 bases (27 cells): portllm sweep")
    other, note = pooled.for_family("qwen2 896x24 v151936")
    assert other.a == file["a"] and other.residual_sd_points == file["residual_sd_points"]
    assert "never in the calibration" in note and "qwen2 896x24 v151936" in note
    assert "llama 8x2 v10" in note and "gemma3_text 16x2 v20" in note and "not validated" in note
    old = {k: v for k, v in file.items() if k != "families"}  # the format shipped before: as today
    (joined.out / "old.json").write_text(json.dumps(old))
    assert Calibration.load(joined.out / "old.json").families == {}


@pytest.mark.parametrize("family", ["gemma3_text 16x2 v20", "qwen2 896x24 v151936"])
def test_forecast_uses_the_chosen_calibration_for_loss_interval_and_flips(joined, monkeypatch, family):
    """forecast() on stub signals: the MC loss, interval and flips come from the family's own fit where it has
    one, else the pooled one; the note says which."""
    file = json.loads((joined.out / "calibration.json").read_text())
    x = file["families"].get(family, file)
    w = WeightSignals(0.02, 0.05, 0.1, 1.0)
    o = OutputSignals("sst2", "choices", 100, 0.12, 0.01, 0.8, -0.04, (-0.06, -0.02), 0.05)
    monkeypatch.setattr(forecast_mod, "Patch", SimpleNamespace(load=lambda p: SimpleNamespace(source_name=None)))
    monkeypatch.setattr(forecast_mod, "weight_signals", lambda *a, **k: w)
    monkeypatch.setattr(forecast_mod, "output_signals", lambda *a, **k: o)
    monkeypatch.setattr(forecast_mod, "family_of", lambda spec: family)
    f = forecast_mod.forecast("p", "new", "old", inputs="sst2", calibration=joined.out / "calibration.json")
    loss = x["a"] * 4.0 + x["b"] * 0.05
    assert f.loss_points == pytest.approx(loss, rel=1e-9)
    half = 1.96 * x["residual_sd_points"]
    assert f.loss_interval == pytest.approx((x["a"] * 2 + x["b"] * 0.05 - half, x["a"] * 6 + x["b"] * 0.05 + half))
    assert f.neg_flip_rate_points == pytest.approx(x["flip_a"] * 5 + x["flip_b"] * 12, rel=1e-9)
    said = [n for n in f.notes if n.startswith("calibration:")]
    assert len(said) == 1 and (("never in the calibration" in said[0]) == (family not in file["families"]))


def _write(path, obj):
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return path


def test_each_join_that_cannot_be_joined_is_refused_in_one_line(joined, tmp_path):
    good = json.loads(joined.other.read_text())
    gen = copy.deepcopy(good)
    gen["plan"]["kind"] = "generation"
    same_model = copy.deepcopy(good)
    same_model["base"]["name"] = "fam-b-copy"
    same_model["base"]["model_family"] = FAMILIES["fam-a"][0]
    same_name = copy.deepcopy(good)
    same_name["base"] |= {"name": "/elsewhere/fam-a", "model_family": "qwen2 8x2 v30"}  # cells name fam-b
    cases = {
        "missing": (tmp_path / "nowhere.json", "unreadable"),
        "not json": (_write(tmp_path / "x.json", "{not json"), "unreadable"),
        "not a report": (_write(tmp_path / "y.json", {"cells": []}), "not a sweep's report.json"),
        "cells unscored": (_write(tmp_path / "z.json", good | {"cells": [{"task": "a"}]}), "not a sweep's report"),
        "generation": (_write(tmp_path / "g.json", gen), "generation sweep"),
        "this sweep's family": (written(tmp_path, "fam-a"), "fam-a .* already in this report"),
        "same model family": (_write(tmp_path / "m.json", same_model), "already in this report"),
        "same base name": (_write(tmp_path / "n.json", same_name), "fam-a .* already in this report"),
    }
    for what, (path, msg) in cases.items():
        r = toy_report("fam-a")
        with pytest.raises(PortLLMError, match=msg) as e:
            rep.finish(r, tmp_path, [path])
        assert "\n" not in str(e.value), what
    with pytest.raises(PortLLMError, match="fam-b .* already in this report"):  # the same family joined twice
        rep.finish(toy_report("fam-a"), tmp_path, [joined.other, joined.other])


def test_rerender_with_join_keeps_every_measured_value(joined, tmp_path):
    mine = written(tmp_path, "fam-a")
    before = json.loads(mine.read_text())["cells"] + json.loads(joined.other.read_text())["cells"]
    out = tmp_path / "re"
    out.mkdir()
    r = rep.rerender(mine, out, join=[joined.other])
    assert [rep.measured(c) for c in r["cells"]] == [rep.measured(c) for c in before]
    assert r["forecast_validation"]["leave_one_family_out"]["cells"] == 54
    again = rep.rerender(out / "report.json", tmp_path / "re2", join=[joined.other])  # no family joined twice
    assert [rep.measured(c) for c in again["cells"]] == [rep.measured(c) for c in before]
    alone = rep.rerender(out / "report.json", tmp_path / "re3")  # without join: its own cells only
    assert {c["family"] for c in alone["cells"]} == {"fam-a"} and "joined" not in alone


def test_report_md_shows_every_protocol_and_each_familys_calibration(joined):
    md = (joined.out / "report.md").read_text()
    assert "## Evolved bases of fam-a (llama 8x2 v10)" in md and "## Evolved bases of fam-b" in md
    assert "## a on fam-a" in md and "## c on fam-b" in md
    v = joined.report["forecast_validation"]
    assert f"| **leave one task out** (headline), 3 tasks | {v['leave_one_task_out']['cells']} |" in md
    assert f"| leave one family out | {v['leave_one_family_out']['cells']} | " in md
    assert f"| leave one level out, grouped by patch | {v['leave_one_level_out']['cells']} | " in md
    assert "95% interval coverage (leave one task out)" in md
    assert "- llama 8x2 v10, 27 cells:" in md and "- gemma3_text 16x2 v20, 27 cells:" in md
    assert "| base | task | level |" in md and "| fam-b | a | t=3 |" in md
