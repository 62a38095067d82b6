"""Forecasts on generation data (issue 19): a generation task file's rows give the same log-likelihoods `eval`
scores, greedy answers are compared, the calibration maps signals to a forecast with an interval, the output says
where the calibration was fitted and warns on another base family; the generation sweep's validation keeps the
controls out and never fits a held-out task's own cells."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

import tiny
from portllm import import_adapter
from portllm.eval import open_lm, run_task
from portllm.forecast import Calibration, GenerationForecast, OutputSignals, forecast
from portllm.sweep import generation as gs
from portllm.tasks import get_task, load_examples

TASK = """name: tiny_gen
description: a user's generation task
kind: gen
metric: exact_match
train: {file: rows.jsonl, rows: [0, 12]}
eval: {file: rows.jsonl, rows: [12, null]}
fields: [q, a]
gold: {field: a}
prompt: "Q: {{ q }}\\nA:"
target: " {{ a }}"
generation: {max_new_tokens: 6, metrics: [loglik]}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    words = ("good", "bad", "dull", "fine")
    rows = [{"q": f"the movie was {w} {k}", "a": f"it is {w}"} for k in range(4) for w in words]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "tiny_gen.yaml").write_text(TASK)
    base = tiny.make_base(root / "base", bpe=True, vocab_size=320, hidden=32, layers=2, initializer_range=0.3)
    patch = root / "patch"
    import_adapter(tiny.make_adapter(base, root / "adapter"), base, patch, task="sst2")
    w = load_file(base / "model.safetensors")
    moved = {k: v + 0.5 * v.std() * np.random.default_rng(0).standard_normal(v.shape).astype("float32") for k, v in
             w.items()}  # fmt: skip
    (root / "moved").mkdir()
    save_file({k: v.contiguous() for k, v in moved.items()}, root / "moved" / "model.safetensors", {"format": "pt"})
    for f in base.iterdir():
        if f.suffix != ".safetensors":
            (root / "moved" / f.name).write_bytes(f.read_bytes())
    return SimpleNamespace(root=root, base=base, moved=root / "moved", patch=patch, task=str(root / "tiny_gen.yaml"))


def test_a_task_files_rows_give_evals_logliks_and_greedy_answers(setup):
    """The forecast on a generation task file: per-row reference log-likelihoods equal `eval`'s own (another
    code path: packed log-likelihood requests), the greedy answers equal `eval`'s, and the train split is read
    when asked (disjoint from the scored rows)."""
    task = get_task(setup.task)
    f = forecast(setup.patch, setup.moved, old=setup.base, inputs=setup.task, n=50, split="eval")
    o = f.outputs
    ev_a = run_task(open_lm(setup.base, setup.patch), task, load_examples(task, "eval")).records
    ev_b = run_task(open_lm(setup.moved, setup.patch), task, load_examples(task, "eval")).records
    la, lb = [r["loglik"] for r in ev_a], [r["loglik"] for r in ev_b]
    assert o.kind == "completions" and o.n == len(ev_a) == 4
    assert o.loglik_a == pytest.approx(np.mean(la), abs=1e-5) and o.loglik_b == pytest.approx(np.mean(lb), abs=1e-5)
    assert abs(o.loglik_change) > 1e-3  # the drift moves them: the equality above can fail
    changed = np.mean([a["output"] != b["output"] for a, b in zip(ev_a, ev_b)])
    assert o.generated == 4 and o.outputs_changed == pytest.approx(changed)
    t = forecast(setup.patch, setup.moved, old=setup.base, inputs=setup.task, n=50, split="train")
    assert t.outputs.n == 12 and t.outputs.loglik_a != o.loglik_a
    assert f.generation is not None and f.loss_points is None


def test_the_generation_forecast_applies_the_calibration_with_its_interval():
    o = OutputSignals("x", "completions", 10, 0.1, 0.2, 0.5, loglik_change=-0.1, loglik_change_ci=(-0.14, -0.06),
                      outputs_changed=0.25, outputs_changed_ci=(0.1, 0.4), generated=10)  # fmt: skip
    cal = Calibration(gen_loglik_a=1.5, gen_loglik_sd=0.02, gen_changed_a=0.8, gen_changed_sd_points=5.0)
    g = GenerationForecast.of(o, cal)
    assert g.loglik_change == pytest.approx(-0.15)
    assert g.loglik_interval == pytest.approx((-0.21 - 0.0392, -0.09 + 0.0392))
    assert g.outputs_changed_points == pytest.approx(20.0)
    assert g.outputs_changed_interval == pytest.approx((0.0, 32 + 9.8))  # 8 − 9.8 < 0: clipped at 0
    raw = GenerationForecast.of(o, Calibration())
    assert raw.loglik_change == -0.1 and raw.loglik_interval == pytest.approx((-0.14, -0.06))


def test_forecast_says_where_its_calibration_was_fitted_and_warns_on_another_family(setup, tmp_path):
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"gen_source": "fitted on toy cells", "gen_family": "llama 4096x32 v128256"}))
    f = forecast(setup.patch, setup.moved, old=setup.base, inputs=setup.task, calibration=cal)
    assert "calibration: fitted on toy cells" in f.notes
    warn = [n for n in f.notes if n.startswith("warning:")]
    assert len(warn) == 1 and "llama 4096x32 v128256" in warn[0] and "llama 32x2 v320" in warn[0], f.notes
    cal.write_text(json.dumps({"gen_source": "fitted on toy cells", "gen_family": "llama 32x2 v320"}))
    same = forecast(setup.patch, setup.moved, old=setup.base, inputs=setup.task, calibration=cal)
    assert not [n for n in same.notes if n.startswith("warning:")]


def toy_cells(slopes=None, noise=0.002):
    """Two tasks x 3 seeds x t = 0 (control), 1, 2, 3: measured = slope[task] · signal + noise."""
    slopes = slopes or {"a": 1.0, "b": 2.0}
    rng = np.random.default_rng(3)
    cells = []
    for task, k in slopes.items():
        for seed in range(3):
            for t in (0, 1, 2, 3):
                x = -0.05 * t * (1 + 0.3 * rng.random())
                y = k * x + (noise * rng.standard_normal() if t else 0.0)
                sh = 0.1 * t
                cells.append({"task": task, "seed": seed, "family": "f", "level": f"t={t}", "t": float(t),
                              "drift": 0.01 * t,
                              "signals": {"loglik_change": x, "loglik_change_ci": [x - 0.01, x + 0.01],
                                          "outputs_changed": sh, "outputs_changed_ci": [sh - 0.05, sh + 0.05]},
                              "measured": {"loglik_change": y, "outputs_changed": min(1.0, 1.2 * sh)}})  # fmt: skip
    return cells


def test_generation_validation_leaves_the_controls_out_and_the_held_out_task_unseen():
    cells = toy_cells()
    v = gs.validate(cells)
    assert v["controls"] == 6 and v["cells"] == 18
    loto = v["loglik"]["leave_one_task_out"]
    # by hand: task b's cells forecast with task a's slope (~1) and vice versa
    used = [c for c in cells if c["t"]]
    err = []
    for c in used:
        train = [d for d in used if d["task"] != c["task"]]
        xs = np.array([d["signals"]["loglik_change"] for d in train])
        ys = np.array([d["measured"]["loglik_change"] for d in train])
        a = float(xs @ ys / (xs @ xs))
        err.append(abs(a * c["signals"]["loglik_change"] - c["measured"]["loglik_change"]))
    assert loto["cells"] == 18 and loto["mae"] == pytest.approx(np.mean(err))
    assert loto["mae"] > 0.02  # slopes 1 vs 2: an unseen task is missed by about half its change
    assert v["loglik"]["raw"]["mae"] == pytest.approx(
        np.mean([abs(c["signals"]["loglik_change"] - c["measured"]["loglik_change"]) for c in used])
    )
    same = gs.validate(toy_cells({"a": 1.0, "b": 1.0}))["loglik"]["leave_one_task_out"]
    assert same["mae"] < 0.005 and same["interval_coverage"] >= 0.8


def test_the_fitted_generation_calibration_loads_into_forecast(tmp_path):
    cal = gs.fit(toy_cells({"a": 1.5, "b": 1.5}), "toy run", "llama 32x2 v320")
    assert cal["gen_loglik_a"] == pytest.approx(1.5, abs=0.02) and cal["gen_changed_a"] == pytest.approx(1.2)
    assert "leave one task out" in cal["gen_source"] and "train rows" in cal["gen_source"]
    (tmp_path / "c.json").write_text(json.dumps(cal))
    loaded = Calibration.load(tmp_path / "c.json")
    assert loaded.gen_loglik_a == cal["gen_loglik_a"] and loaded.gen_family == "llama 32x2 v320"
    with pytest.raises(Exception, match="≥ 4 cells"):
        gs.fit([c for c in toy_cells() if c["t"] == 0], "toy", "f")


def test_the_generation_sweep_end_to_end_on_a_tiny_model(tmp_path):
    """Two user task files over t = 0 (the control), 1 and 2 with two seeds: the control measures exactly no
    change, signals come from the train split's rows, the report, chart and calibration are written, and a rerun
    finds every step in the cache."""
    from portllm.sweep import Evolution, SweepPlan, TaskRecipe, sweep

    data = tiny.sentiment_data(tmp_path / "data", text=True)
    words = ("good", "bad", "dull", "fine", "great", "awful")
    rows = [{"q": f"the movie was {w} {k}", "a": f"it is {w}"} for k in range(6) for w in words]
    tasks = {}
    for name, prompt in (("gen_one", "Q: {{ q }}\\nA:"), ("gen_two", "{{ q }} so")):
        d = tmp_path / name
        d.mkdir()
        (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        text = TASK.replace("tiny_gen", name).replace('"Q: {{ q }}\\nA:"', f'"{prompt}"')
        text = text.replace("rows: [0, 12]", "rows: [0, 24]").replace("rows: [12, null]", "rows: [24, null]")
        (d / f"{name}.yaml").write_text(text)
        tasks[str(d / f"{name}.yaml")] = TaskRecipe(steps=8, lr=2e-2, max_length=32, eval_limit=12, retune_levels=())
    plan = SweepPlan(
        "tiny-gen",
        tasks,
        seeds=(0, 1),
        direction=Evolution("text", steps=6, lr=5e-2, max_length=32),
        levels=(0.0, 1.0, 2.0),
        retune_levels=(),
        dtype="float32",
        kl_texts=4,
        kind="generation",
        signal_rows=10,
        signal_outputs=5,
    )
    base = tiny.make_base(tmp_path / "base", bpe=True, vocab_size=320, hidden=32, layers=2, initializer_range=0.3)
    r = sweep(plan, str(base), tmp_path / "out", data, tmp_path / "cache", log=lambda m: None)
    assert len(r["cells"]) == 2 * 2 * 3 and r["forecast_validation"]["controls"] == 4
    for c in r["cells"]:
        assert c["signals"]["n"] == 10 and c["signals"]["generated"] == 5 and c["measured"]["n"] == 12
        if c["t"] == 0:
            assert c["measured"]["loglik_change"] == 0 and c["measured"]["outputs_changed"] == 0
            assert c["signals"]["loglik_change"] == 0 and c["signals"]["outputs_changed"] == 0
            # θ' = θ: the port's gain over θ' is the patch's own gain over θ
            own = next(t for t in r["tasks"] if t["task"] == c["task"])["seeds"][c["seed"]]
            assert c["patch_on_evolved"]["gain"] == pytest.approx(own["gain"])
    moved = [c for c in r["cells"] if c["t"] == 2.0]
    assert all(abs(c["measured"]["loglik_change"]) > 1e-4 for c in moved)  # the control's zeros are no accident
    for f in ("report.json", "report.md", "generation.png", "calibration.json"):
        assert (tmp_path / "out" / f).is_file(), f
    assert r["forecast_validation"]["loglik"]["leave_one_task_out"]["cells"] == 8
    said: list[str] = []
    again = sweep(plan, str(base), tmp_path / "out2", data, tmp_path / "cache", log=said.append)
    assert [c["measured"] for c in again["cells"]] == [c["measured"] for c in r["cells"]]
    assert not [m for m in said if "training" in m or "signals:" in m or "scoring" in m], said
