"""portllm forecast: weight signals, unlabeled output signals, the zero-drift control.

The output signals are checked against a hand computation: the two models (θ+Δθ and θ'+Δθ, each
PEFT's own merge of the adapter, not portllm's patch) score every answer option with plain
transformers, and numpy turns the scores into the expected change and negative flips."""

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from portllm import Patch, import_adapter
from portllm.forecast import Calibration, choice_signals, forecast
from portllm.stats import paired_bootstrap
from portllm.tasks import get_task, load_examples

N = 40  # inputs the forecast compares the models on (the data file's rows)


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
    peft_delta = {k: v - w[k] for k, v in _peft_merged(base, adapter).state_dict().items() if k in w}
    undo = {k: w[k] - peft_delta[k] for k in w}  # θ' = θ − ΔW (PEFT's ΔW): θ'+Δθ is θ again, the patch is gone
    for name, sd in (("along", along), ("orth", orth), ("undo", undo)):
        (root / name).mkdir()
        save_file({k: t.contiguous() for k, t in sd.items()}, root / name / "model.safetensors", {"format": "pt"})
        for f in base.iterdir():
            if f.suffix != ".safetensors":
                (root / name / f.name).write_bytes(f.read_bytes())
    return SimpleNamespace(
        root=root,
        data=data,
        base=base,
        adapter=adapter,
        patch=patch,
        along=root / "along",
        orth=root / "orth",
        undo=root / "undo",
    )


def _peft_merged(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload().eval()


def _option_scores(model, tok, examples) -> np.ndarray:
    """log p(continuation | context) of every answer option, one forward pass per option (no batching,
    no packing): the context's tokens, then whatever tokens the continuation adds."""
    rows = []
    with torch.no_grad():
        for e in examples:
            row = []
            for ctx, cont in zip(e.contexts, e.continuations):
                c = tok.encode(ctx, add_special_tokens=False)
                whole = tok.encode(ctx + cont, add_special_tokens=False)
                assert whole[: len(c)] == c and len(whole) > len(c)
                logp = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
                row.append(sum(float(logp[len(c) - 1 + j, t]) for j, t in enumerate(whole[len(c) :])))
            rows.append(row)
    return np.array(rows)


def _hand_signals(sa: np.ndarray, sb: np.ndarray) -> dict:
    """The forecast's definitions, from scratch: A's softmax over the options is the belief about the right
    answer; expected change = mean(p_A(answer_B) − p_A(answer_A)); negative flips = mean of p_A(answer_A)
    where the answers differ."""
    pa = np.exp(sa - sa.max(1, keepdims=True))
    pa /= pa.sum(1, keepdims=True)
    pb = np.exp(sb - sb.max(1, keepdims=True))
    pb /= pb.sum(1, keepdims=True)
    a, b, i = sa.argmax(1), sb.argmax(1), np.arange(len(sa))
    change = pa[i, b] - pa[i, a]
    return {
        "disagreement": float((a != b).mean()),
        "mean_kl": float((pa * (np.log(pa) - np.log(pb))).sum(1).mean()),
        "confidence": float(pa[i, a].mean()),
        "change": change,
        "expected_change": float(change.mean()),
        "expected_neg_flip_rate": float(np.where(a != b, pa[i, a], 0.0).mean()),
    }


@pytest.fixture(scope="module")
def scores(setup):
    """Hand-computed option scores of θ+Δθ ("old") and of θ'+Δθ for every θ' (and of plain θ)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(setup.base)
    examples = load_examples(get_task("sst2"), "eval", setup.data, N)
    out = {"plain": _option_scores(AutoModelForCausalLM.from_pretrained(setup.base).eval(), tok, examples)}
    for name in ("old", "along", "orth", "undo"):
        d = setup.base if name == "old" else getattr(setup, name)
        out[name] = _option_scores(_peft_merged(d, setup.adapter), tok, examples)
    return out


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


@pytest.mark.parametrize("drift", ["along", "orth", "undo"])
def test_output_signals_equal_the_hand_computation(setup, scores, drift):
    """Every output signal, and the raw loss and flip rate in points, equal the definitions computed by hand
    from the two models' option probabilities (the bounds change ≤ 0, flips ≤ disagreement hold for any
    argmax task, so they are not what is checked)."""
    h = _hand_signals(scores["old"], scores[drift])
    f = forecast(setup.patch, getattr(setup, drift), old=setup.base, inputs="sst2", n=N, data=setup.data)
    o = f.outputs
    assert o.kind == "choices" and o.n == N
    assert o.disagreement == pytest.approx(h["disagreement"], abs=1e-12)
    assert o.mean_kl == pytest.approx(h["mean_kl"], rel=1e-3, abs=1e-6)
    assert o.confidence == pytest.approx(h["confidence"], abs=1e-5)
    assert o.expected_change == pytest.approx(h["expected_change"], abs=1e-5)
    assert o.expected_neg_flip_rate == pytest.approx(h["expected_neg_flip_rate"], abs=1e-5)
    _, lo, hi = paired_bootstrap([0.0] * N, h["change"], iters=2000)  # the interval of the per-input changes
    assert o.expected_change_ci == pytest.approx((lo, hi), abs=1e-5)
    assert f.calibration == Calibration()  # raw: the points are the hand values × 100
    assert f.loss_points == pytest.approx(-100 * h["expected_change"], abs=1e-3)
    assert f.loss_interval == pytest.approx((-100 * hi, -100 * lo), abs=1e-3)
    assert f.neg_flip_rate_points == pytest.approx(100 * h["expected_neg_flip_rate"], abs=1e-3)


def test_a_drift_that_undoes_the_patch_forecasts_the_patchs_own_effect(setup, scores):
    """θ' = θ − ΔW: the port gives back plain θ, so the forecast is what the patch's answers lose when
    θ answers instead (nonzero: the patch changes some answers of θ), and the drift lies wholly in the
    patch's subspace."""
    h = _hand_signals(scores["old"], scores["plain"])
    assert h["disagreement"] >= 0.1  # the fixture's patch does change answers
    f = forecast(setup.patch, setup.undo, old=setup.base, inputs="sst2", n=N, data=setup.data)
    assert f.weights.subspace_disturbance == pytest.approx(1.0, abs=1e-4)
    assert f.weights.cos == pytest.approx(-1.0, abs=1e-4)
    assert f.outputs.disagreement == pytest.approx(h["disagreement"], abs=1e-12)
    assert f.loss_points == pytest.approx(-100 * h["expected_change"], abs=1e-3) and f.loss_points > 1.0
    assert f.neg_flip_rate_points == pytest.approx(100 * h["expected_neg_flip_rate"], abs=1e-3)
    assert f.to_dict()["verdict"].startswith(f"expected to lose ~{f.loss_points:.1f} points")


def test_a_calibration_maps_the_raw_signals_to_points(setup, scores, tmp_path):
    """loss = a·raw + b·disturbance + c, its interval shifted the same way and widened by 1.96 residual sd;
    flips = max(0, flip_a·raw flips + flip_b·disagreement + flip_c), all in points."""
    cal = {"a": 2.0, "b": 3.0, "c": 0.5, "flip_a": 0.5, "flip_b": 0.1, "flip_c": -0.2, "residual_sd_points": 1.5}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(cal | {"source": "hand", "ignored": 1}))
    h = _hand_signals(scores["old"], scores["undo"])
    _, lo, hi = paired_bootstrap([0.0] * N, h["change"], iters=2000)
    raw, raw_lo, raw_hi = -100 * h["expected_change"], -100 * hi, -100 * lo
    f = forecast(setup.patch, setup.undo, old=setup.base, inputs="sst2", n=N, data=setup.data, calibration=path)
    assert f.calibration.source == "hand" and f.calibration.a == 2.0
    disturbance = 1.0  # θ' − θ = −ΔW: all of the drift is inside the patch's subspace
    assert f.loss_points == pytest.approx(2.0 * raw + 3.0 * disturbance + 0.5, abs=2e-3)
    spread = 1.96 * 1.5
    assert f.loss_interval == pytest.approx((2.0 * raw_lo + 3.5 - spread, 2.0 * raw_hi + 3.5 + spread), abs=2e-3)
    flips = 0.5 * 100 * h["expected_neg_flip_rate"] + 0.1 * 100 * h["disagreement"] - 0.2
    assert f.neg_flip_rate_points == pytest.approx(flips, abs=1e-3)
    assert Calibration.load(path).flips(0.0, 0.0) == 0.0  # flip_c < 0 alone never forecasts negative flips


def test_without_old_base_uses_the_recorded_one_or_says_what_it_cannot_tell(setup, tmp_path):
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


def test_choice_signals_under_acc_norm_use_per_character_scores():
    """acc_norm tasks: the belief is the softmax of score / characters of the option (its leading space not
    counted), as the task's own prediction is made."""
    task = SimpleNamespace(name="t", metric="acc_norm")
    ex = [SimpleNamespace(continuations=(" ab", " abcd"))]
    ra = [{"pred": 1, "scores": [-4.0, -6.0]}]  # per character: −2 and −1.5
    rb = [{"pred": 0, "scores": [-2.0, -12.0]}]
    s = choice_signals(ra, rb, ex, task)
    p1 = 1 / (1 + np.exp(-2.0 + 1.5))  # p_A(option 1) = softmax(−2, −1.5)[1]
    assert s.disagreement == 1.0
    assert s.expected_change == pytest.approx((1 - p1) - p1)
    assert s.expected_neg_flip_rate == pytest.approx(p1)
    assert s.confidence == pytest.approx(p1)


def _cli(*args, data):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PORTLLM_DATA=str(data), COLUMNS="200")
    cmd = [sys.executable, "-m", "portllm.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_check_exits_0_on_the_very_base_and_prints_a_zero_forecast(setup):
    """θ' = θ: nothing to warn about (same fingerprint, no drift), so `check` exits 0, and the forecast
    it prints is zero."""
    r = _cli(
        "check",
        setup.patch,
        "--base",
        setup.base,
        "--from",
        setup.base,
        "--inputs",
        "sst2",
        "--n",
        "20",
        data=setup.data,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (
        "forecast: expected to lose ~0.0 points" in r.stdout
        and "verdict: compatible" in r.stdout
        and "with warnings" not in r.stdout
    )


def test_check_exits_1_on_a_drift_larger_than_the_weights_and_forecast_json_equals_the_hand_values(setup, scores):
    """θ' = θ − ΔW moves every patched matrix by more than its own norm (the fixture's patch is large):
    `check` warns about the drift and exits 1; its forecast and `forecast --json` carry the loss computed
    by hand on the first 20 inputs (builtin and raw calibration)."""
    r = _cli(
        "check",
        setup.patch,
        "--base",
        setup.undo,
        "--from",
        setup.base,
        "--inputs",
        "sst2",
        "--n",
        "20",
        "--json",
        data=setup.data,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    d = json.loads(r.stdout)
    assert d["verdict"] == "compatible with warnings" and d["exit_code"] == 1
    warned = [f for f in d["findings"] if f["level"] in ("warn", "error")]
    assert [f["topic"] for f in warned] == ["drift"] and "moved by more than 100% of their norm" in warned[0]["detail"]
    h = _hand_signals(scores["old"][:20], scores["undo"][:20])
    raw = -100 * h["expected_change"]
    assert raw > 1.0
    builtin = Calibration.load("builtin")
    assert d["forecast"]["loss_points"] == pytest.approx(builtin.loss(raw, 1.0), abs=1e-2)
    r = _cli(
        "forecast",
        setup.patch,
        "--base",
        setup.undo,
        "--from",
        setup.base,
        "--inputs",
        "sst2",
        "--n",
        "20",
        "--calibration",
        "raw",
        "--json",
        data=setup.data,
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["outputs"]["n"] == 20 and d["loss_points"] == pytest.approx(raw, abs=1e-3)
    assert d["neg_flip_rate_points"] == pytest.approx(100 * h["expected_neg_flip_rate"], abs=1e-3)
    assert d["verdict"].startswith(f"expected to lose ~{raw:.1f} points")


def test_check_inputs_without_from_is_a_one_line_error(setup):
    r = _cli("check", setup.patch, "--base", setup.along, "--inputs", "sst2", data=setup.data)
    assert r.returncode == 3 and "--inputs needs --from" in r.stderr and "Traceback" not in r.stderr


def test_builtin_calibration_ships_with_the_package_and_raw_is_uncalibrated():
    b = Calibration.load("builtin")
    assert "sweep" in b.source and b.c == 0 and b.flip_c == 0 and b.a > 0
    assert b.flips(0.0, 0.0) == 0 and b.loss(0.0, 0.0) == 0  # no signal, no forecast
    assert Calibration.load("raw") == Calibration() == Calibration.load(None)


@pytest.mark.parametrize("inputs", ["sst2", "text", "jsonl"])
def test_forecast_holds_one_model_at_a_time(setup, monkeypatch, inputs):
    """θ+Δθ is scored and freed before θ'+Δθ opens: the forecast's peak is one model, not two."""
    import gc
    import weakref

    import portllm.forecast as fc

    alive: list[weakref.ref] = []
    most = []
    real_open = fc.open_lm

    def counting_open(*a, **k):
        gc.collect()
        live = sum(r() is not None for r in alive)
        lm = real_open(*a, **k)
        alive.append(weakref.ref(lm.model))
        most.append(live + 1)
        return lm

    monkeypatch.setattr(fc, "open_lm", counting_open)
    if inputs == "text":
        inputs = setup.root / "lines.txt"
        inputs.write_text("the movie was good .\nthe movie was dull .\n")
    if inputs == "jsonl":
        inputs = _completions_file(setup.root / "one_model.jsonl")
    forecast(setup.patch, setup.along, old=setup.base, inputs=str(inputs), n=10, data=setup.data)
    assert len(most) == 2 and max(most) == 1, most


# ---------------------------------------------------------------- a user's prompt/completion or chat data

ROWS = [
    {"prompt": f"the movie was {w} .", "completion": " positive" if k == 0 else " negative"}
    for k, ws in enumerate((["good", "great", "fine"], ["bad", "awful", "dull"]))
    for w in ws
] * 2


def _completions_file(path, rows=ROWS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _hand_greedy(model, tok, rows, new_tokens=48):
    """Per row, the greedy answer after the prompt's tokens (up to EOS), decoded."""
    out = []
    with torch.no_grad():
        for r in rows:
            c = tok.encode(r["prompt"], add_special_tokens=False)
            g = model.generate(torch.tensor([c]), max_new_tokens=new_tokens, do_sample=False)[0, len(c) :].tolist()
            g = g[: g.index(tok.eos_token_id) + 1] if tok.eos_token_id in g else g
            out.append(tok.decode(g, skip_special_tokens=True))
    return out


def _hand_completions(model, tok, rows):
    """Per row, from scratch: the next-token distribution after the prompt's tokens, and the mean log-probability
    of the completion's tokens (what the whole adds to the prompt, then EOS) given everything before them."""
    probs, lls = [], []
    with torch.no_grad():
        for r in rows:
            c = tok.encode(r["prompt"], add_special_tokens=False)
            whole = tok.encode(r["prompt"] + r["completion"], add_special_tokens=False) + [tok.eos_token_id]
            assert whole[: len(c)] == c and len(whole) > len(c) + 1
            logp = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
            probs.append(logp[len(c) - 1].exp())
            lls.append(float(np.mean([float(logp[j - 1, whole[j]]) for j in range(len(c), len(whole))])))
    return probs, lls


@pytest.mark.parametrize("drift", ["along", "undo"])
def test_forecast_on_completions_gives_their_loglik_change_by_hand_and_no_points(setup, drift, tmp_path):
    """A prompt/completion JSONL: next-token disagreement and KL where each completion starts, and the change in
    the completions' mean per-token log-likelihood from θ+Δθ to θ'+Δθ with its paired interval, all equal to
    the hand computation on PEFT's own merges; no points, and the output says why."""
    from transformers import AutoTokenizer

    from portllm.forecast import NO_POINTS_FOR_COMPLETIONS

    tok = AutoTokenizer.from_pretrained(setup.base)
    pa, la = _hand_completions(_peft_merged(setup.base, setup.adapter), tok, ROWS)
    pb, lb = _hand_completions(_peft_merged(getattr(setup, drift), setup.adapter), tok, ROWS)
    f = forecast(
        setup.patch, getattr(setup, drift), old=setup.base, inputs=str(_completions_file(tmp_path / "r.jsonl"))
    )
    o = f.outputs
    assert o.kind == "completions" and o.n == len(ROWS) and o.rows_skipped == 0
    assert o.loglik_a == pytest.approx(np.mean(la), abs=1e-4) and o.loglik_b == pytest.approx(np.mean(lb), abs=1e-4)
    change, lo, hi = paired_bootstrap(la, lb, iters=2000)
    assert abs(change) > 1e-3  # the drift moves the completions' likelihood: the check below can fail
    assert o.loglik_change == pytest.approx(change, abs=1e-4)
    assert o.loglik_change_ci == pytest.approx((lo, hi), abs=1e-4)
    dis = np.mean([int(a.argmax() != b.argmax()) for a, b in zip(pa, pb)])
    kl = np.mean([float((a * (a.log() - b.log())).sum()) for a, b in zip(pa, pb)])
    assert o.disagreement == pytest.approx(dis, abs=1e-12) and o.mean_kl == pytest.approx(kl, rel=1e-3, abs=1e-6)
    assert f.loss_points is None and f.loss_interval is None and f.neg_flip_rate_points is None
    assert f.notes[-1] == NO_POINTS_FOR_COMPLETIONS
    said = f"the reference completions' log-likelihood is expected to change by {o.loglik_change:+.3f} nats/token"
    assert f.sentence().startswith(said)  # raw calibration (the library's default): the change measured here
    # greedy answers from scratch (transformers' generate on PEFT's merges, up to EOS): the share that differ
    ga = _hand_greedy(_peft_merged(setup.base, setup.adapter), tok, ROWS)
    gb = _hand_greedy(_peft_merged(getattr(setup, drift), setup.adapter), tok, ROWS)
    assert o.generated == len(ROWS) and o.outputs_changed == pytest.approx(np.mean([x != y for x, y in zip(ga, gb)]))
    assert f.generation.outputs_changed_points == pytest.approx(100 * o.outputs_changed)


def test_forecast_on_completions_zero_drift_and_bad_rows(setup, tmp_path):
    from portllm.errors import PortLLMError

    f = forecast(setup.patch, setup.base, old=setup.base, inputs=str(_completions_file(tmp_path / "r.jsonl")), n=5)
    o = f.outputs
    assert o.n == 5 and o.loglik_change == 0 and o.loglik_change_ci == (0, 0) and o.disagreement == 0
    lines = tmp_path / "lines.jsonl"
    lines.write_text("the movie was good .\n")  # plain text in a .jsonl: refused, not read as text lines
    with pytest.raises(PortLLMError, match=r"lines.jsonl:1: not a JSON object"):
        forecast(setup.patch, setup.along, old=setup.base, inputs=str(lines))


def test_a_chat_is_cut_before_its_last_assistant_turn(tmp_path):
    """Messages rows: the chat template renders the conversation; the next-token signals are taken where the last
    assistant turn starts (the template's generation prompt included), the log-likelihood on every assistant turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from portllm.eval import open_lm
    from portllm.forecast import Generation, completion_outputs, sft_rows

    template = (
        "{% for m in messages %}{{ '<s> ' + {'user': 'w91', 'assistant': 'w89'}[m['role']] + ' ' + m['content'] "
        "+ ' </s> ' }}{% endfor %}{% if add_generation_prompt %}{{ '<s> w89 ' }}{% endif %}"
    )
    base = tiny.make_base(tmp_path / "chat", template=template, initializer_range=0.3)
    msgs = [
        {"role": "user", "content": "w5 w6"},
        {"role": "assistant", "content": "w7"},
        {"role": "user", "content": "w8"},
        {"role": "assistant", "content": "w9 w10"},
    ]
    lm = open_lm(base)
    total, kept, rows = sft_rows(lm, _completions_file(tmp_path / "chat.jsonl", [{"messages": msgs}]), 5)
    got = completion_outputs(lm, total, kept, rows, Generation(0), "chat.jsonl")
    tok, model = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base).eval()

    def ids(upto, gen):
        return tok.encode(
            tok.apply_chat_template(upto, tokenize=False, add_generation_prompt=gen), add_special_tokens=False
        )

    whole = ids(msgs, False)
    scored = [j for i in (1, 3) for j in range(len(ids(msgs[:i], True)), len(ids(msgs[: i + 1], False)))]
    cut = len(ids(msgs[:3], True))
    assert whole[:cut] == ids(msgs[:3], True) and cut < scored[-1]
    with torch.no_grad():
        logp = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
    assert got.rows == [0] and torch.allclose(got.probs[0].double(), logp[cut - 1].exp(), atol=1e-5)
    assert got.logliks[0] == pytest.approx(np.mean([float(logp[j - 1, whole[j]]) for j in scored]), abs=1e-5)


def test_forecast_cli_prints_the_loglik_change_and_says_it_is_not_in_points(setup, tmp_path):
    rows = _completions_file(tmp_path / "r.jsonl")
    r = _cli("forecast", setup.patch, "--base", setup.along, "--from", setup.base, "--inputs", rows, data=setup.data)
    assert r.returncode == 0, r.stderr
    assert "reference log-lik." in r.stdout and "not in points" in r.stdout, r.stdout
    flat = " ".join(r.stdout.split())  # rich wraps long lines
    assert "nats/token" in flat and "no loss in points for generation data" in flat
    assert "greedy answers that change" in flat and "calibration: portllm sweep --plan generation" in flat
    r = _cli("forecast", setup.patch, "--base", setup.along, "--from", setup.base, "--inputs", rows, "--json",
             data=setup.data)  # fmt: skip
    d = json.loads(r.stdout)
    assert d["loss_points"] is None and d["outputs"]["kind"] == "completions"
    lo, hi = d["outputs"]["loglik_change_ci"]
    assert lo <= d["outputs"]["loglik_change"] <= hi and d["outputs"]["n"] == len(ROWS)
