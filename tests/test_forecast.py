"""portllm forecast: weight signals, unlabeled output signals, the zero-drift control."""

import random
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from portllm import Patch, import_adapter
from portllm.forecast import choice_signals, forecast


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("forecast")
    rng = random.Random(0)
    data = root / "data"
    (data / "sst2").mkdir(parents=True)
    words = (["good", "great", "fine"], ["bad", "awful", "dull"])
    lines = []
    for _ in range(40):
        y = rng.randint(0, 1)
        lines.append(f"the movie was {rng.choice(words[y])} .\t{y}")
    for f in ("train.tsv", "test.tsv"):
        (data / "sst2" / f).write_text("sentence\tlabel\n" + "\n".join(lines) + "\n")
    base = tiny.make_base(root / "base", bpe=True, vocab_size=320, hidden=32, layers=2, initializer_range=0.3)
    adapter = tiny.make_adapter(base, root / "adapter")
    patch = root / "patch"
    import_adapter(adapter, base, patch, task="sst2")
    p = Patch.load(patch)
    w = load_file(base / "model.safetensors")
    along, orth = dict(w), dict(w)
    g = torch.Generator().manual_seed(0)
    for m in p.modules.values():
        d = m.delta()
        along[m.weight_name] = w[m.weight_name] - 0.8 * d  # undoes 80% of the patch
        u = torch.linalg.qr(m.B.float()).Q
        v = torch.linalg.qr(m.A.float().T).Q
        r = torch.randn(d.shape, generator=g)
        r = r - u @ (u.T @ r)  # outside the patch's column space ...
        r = r - (r @ v) @ v.T  # ... and its row space
        orth[m.weight_name] = w[m.weight_name] + r * (0.8 * d.norm() / r.norm())
    for name, sd in (("along", along), ("orth", orth)):
        (root / name).mkdir()
        save_file({k: t.contiguous() for k, t in sd.items()}, root / name / "model.safetensors", {"format": "pt"})
        for f in base.iterdir():
            if f.suffix != ".safetensors":
                (root / name / f.name).write_bytes(f.read_bytes())
    return SimpleNamespace(root=root, data=data, base=base, patch=patch, along=root / "along", orth=root / "orth")


def test_drift_inside_the_patch_subspace_is_flagged_and_orthogonal_drift_is_not(setup):
    a = forecast(setup.patch, setup.along, old=setup.base)
    o = forecast(setup.patch, setup.orth, old=setup.base)
    assert a.weights.drift_to_patch == pytest.approx(o.weights.drift_to_patch, rel=1e-3)  # equally large drifts
    assert a.weights.subspace_disturbance == pytest.approx(0.8, rel=1e-3)
    assert o.weights.subspace_disturbance < 1e-4
    assert a.weights.cos == pytest.approx(-1.0, abs=1e-4) and abs(o.weights.cos) < 1e-4
    assert a.loss_points is None and "--inputs" in a.notes[0]


def test_zero_drift_control_forecasts_nothing_lost(setup):
    f = forecast(setup.patch, setup.base, old=setup.base, inputs="sst2", n=40, data=setup.data)
    assert f.outputs.disagreement == 0 and f.outputs.mean_kl == pytest.approx(0, abs=1e-9)
    assert f.loss_points == pytest.approx(0, abs=1e-9) and f.neg_flip_rate_points == 0
    assert f.to_dict()["verdict"].startswith("expected to lose ~0.0 points")


def test_output_signals_are_consistent_bounds(setup):
    """The unlabeled estimate never forecasts a gain from changed answers, and flips to wrong never
    exceed the answers that changed. (Which signal predicts the real loss is the sweep's question:
    on this random model an equally large orthogonal drift moves outputs more than undoing the patch.)"""
    for base in (setup.along, setup.orth):
        f = forecast(setup.patch, base, old=setup.base, inputs="sst2", n=40, data=setup.data)
        o = f.outputs
        assert o.n == 40 and 0 <= o.disagreement <= 1 and o.mean_kl > 0
        assert f.loss_points >= 0 and o.expected_change <= 0
        assert o.expected_neg_flip_rate <= o.disagreement + 1e-12
        assert o.expected_change_ci[0] <= o.expected_change <= o.expected_change_ci[1]


def test_without_old_base_uses_the_recorded_one_or_says_what_it_cannot_tell(setup, tmp_path):
    import json
    import shutil

    f = forecast(setup.patch, setup.along)  # the manifest names the base, a local directory: found and used
    assert f.old == str(Patch.load(setup.patch).source_name) and f.weights is not None
    assert "using the base the patch records" in f.notes[0] and "--inputs" in f.sentence()
    moved = tmp_path / "patch"
    shutil.copytree(setup.patch, moved)
    raw = json.loads((moved / "portllm.json").read_text())
    raw["base"]["name"] = str(tmp_path / "gone")  # the recorded base is not here
    (moved / "portllm.json").write_text(json.dumps(raw))
    f = forecast(moved, setup.along)
    assert f.loss_points is None and f.weights is None and "without --from OLD" in f.sentence()


def test_choice_signals_formula():
    task = SimpleNamespace(name="t", metric="acc")
    ex = [SimpleNamespace(continuations=(" a", " b"))] * 2
    ra = [{"pred": 0, "scores": [0.0, -1.0]}, {"pred": 1, "scores": [-2.0, 0.0]}]
    rb = [{"pred": 1, "scores": [-1.0, 0.0]}, {"pred": 1, "scores": [-2.0, 0.0]}]
    s = choice_signals(ra, rb, ex, task)
    p = 1 / (1 + torch.exp(torch.tensor(-1.0)).item())  # p_A(answer 0) on the first example
    assert s.disagreement == 0.5
    assert s.expected_change == pytest.approx(((1 - p) - p) / 2)
    assert s.expected_neg_flip_rate == pytest.approx(p / 2)


def _cli(*args, data):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PORTLLM_DATA=str(data))
    cmd = [sys.executable, "-m", "portllm.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_check_prints_the_forecast_verdict_and_forecast_cli_speaks_json(setup):
    r = _cli(
        "check",
        setup.patch,
        "--base",
        setup.along,
        "--from",
        setup.base,
        "--inputs",
        "sst2",
        "--n",
        "20",
        data=setup.data,
    )
    assert r.returncode in (0, 1), r.stderr
    assert "forecast: expected to lose ~" in r.stdout and "verdict:" in r.stdout
    r = _cli(
        "forecast",
        setup.patch,
        "--base",
        setup.along,
        "--from",
        setup.base,
        "--inputs",
        "sst2",
        "--n",
        "20",
        "--json",
        data=setup.data,
    )
    import json

    d = json.loads(r.stdout)
    assert d["outputs"]["n"] == 20 and d["loss_points"] >= 0 and d["verdict"].startswith("expected to lose")
    r = _cli("check", setup.patch, "--base", setup.along, "--inputs", "sst2", data=setup.data)
    assert r.returncode == 3 and "--inputs needs --from" in r.stderr and "Traceback" not in r.stderr


def test_builtin_calibration_ships_with_the_package_and_raw_is_uncalibrated():
    from portllm.forecast import Calibration

    b = Calibration.load("builtin")
    assert "sweep" in b.source and b.c == 0 and b.flip_c == 0 and b.a > 0
    assert b.flips(0.0, 0.0) == 0 and b.loss(0.0, 0.0) == 0  # no signal, no forecast
    assert Calibration.load("raw") == Calibration() == Calibration.load(None)
