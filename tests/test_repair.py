"""`portllm repair` on a tiny model: nothing to repair at zero drift, agreement won back on inputs it never
trained on where a drift broke the patch, no label ever read, the lineage, and a repaired patch that PEFT
loads and `port` merges like any other."""

import json

import pytest
import torch

import tiny
from portllm import Patch, PortLLMError
from portllm.eval import open_lm, run_task
from portllm.port import port
from portllm.repair import DistillConfig, read_inputs, repair
from portllm.tasks import get_task, load_examples
from portllm.train import TrainConfig, train
from test_cli import one_line_error
from test_cli import run as cli

CFG = DistillConfig(steps=20, lr=1e-2, max_length=64, gen_tokens=12, heldout=0.25)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("repair")
    data = tiny.sentiment_data(root / "data", n_train=96, n_eval=48, text=True)
    base = tiny.make_base(root / "base", bpe=True, vocab_size=320, hidden=32, layers=2, initializer_range=0.3)
    train(base, "sst2", root / "p", TrainConfig(steps=24, batch_size=8, lr=2e-2, max_length=64), data=data)
    new = tiny.evolve(base, root / "new", eps=0.3)  # a drift large enough to break the toy patch
    return {"root": root, "data": data, "base": base, "new": new, "patch": root / "p"}


def _preds(model, patch, data):
    t = get_task("sst2")
    return [r["pred"] for r in run_task(open_lm(model, patch), t, load_examples(t, "eval", data)).records]


def test_zero_drift_returns_the_patch(toy, tmp_path):
    r = repair(toy["patch"], toy["base"], toy["base"], tmp_path / "r", "sst2", n=48, cfg=CFG, data=toy["data"],
               dtype="float32")  # fmt: skip
    a, b = Patch.load(toy["patch"]), Patch.load(tmp_path / "r")
    assert set(a.tensors) == set(b.tensors)
    for k in a.tensors:
        assert torch.allclose(a.tensors[k], b.tensors[k], atol=1e-6), k
    assert r.before.agreement == 1.0 and r.after.agreement == 1.0


def test_repair_wins_back_agreement_on_inputs_it_never_saw(toy, tmp_path):
    cfg = DistillConfig(steps=40, lr=1e-2, max_length=64, heldout=0.25)
    r = repair(toy["patch"], toy["new"], toy["base"], tmp_path / "r", "sst2", n=96, cfg=cfg, data=toy["data"],
               dtype="float32")  # fmt: skip
    assert r.after.agreement > r.before.agreement and r.after.kl < r.before.kl
    # the eval split (never an input of the repair) judged against θ+Δθ's own answers
    want = _preds(toy["base"], toy["patch"], toy["data"])
    plain = _preds(toy["new"], toy["patch"], toy["data"])
    fixed = _preds(toy["new"], tmp_path / "r", toy["data"])
    agree = lambda xs: sum(x == y for x, y in zip(xs, want)) / len(want)  # noqa: E731
    assert agree(plain) < 0.9 and agree(fixed) >= agree(plain) + 0.1, (agree(plain), agree(fixed))


def _flip_labels(src, dst):
    """A copy of the toy data with every sst2 label inverted: what a repair reads must not depend on it."""
    for split in ("train.tsv", "test.tsv"):
        lines = (src / "sst2" / split).read_text().splitlines()
        flipped = [lines[0]] + [s.rsplit("\t", 1)[0] + "\t" + str(1 - int(s.rsplit("\t", 1)[1])) for s in lines[1:]]
        (dst / "sst2").mkdir(parents=True, exist_ok=True)
        (dst / "sst2" / split).write_text("\n".join(flipped) + "\n")
    return dst


@pytest.mark.parametrize("inputs", ["sst2", "self", "self:sst2"])
def test_no_label_is_ever_read(toy, tmp_path, inputs):
    poisoned = _flip_labels(toy["data"], tmp_path / "poisoned")
    cfg = DistillConfig(steps=4, lr=1e-2, max_length=64, gen_tokens=8)
    a = repair(toy["patch"], toy["new"], toy["base"], tmp_path / "a", inputs, n=24, cfg=cfg, data=toy["data"])
    b = repair(toy["patch"], toy["new"], toy["base"], tmp_path / "b", inputs, n=24, cfg=cfg, data=poisoned)
    assert a.inputs["sha256"] == b.inputs["sha256"]
    pa, pb = Patch.load(tmp_path / "a"), Patch.load(tmp_path / "b")
    assert all(torch.equal(pa.tensors[k], pb.tensors[k]) for k in pa.tensors)
    assert a.losses == b.losses


def test_self_inputs_are_seeded(toy, tmp_path):
    cfg = DistillConfig(steps=2, lr=1e-2, max_length=64, gen_tokens=8)
    a = repair(toy["patch"], toy["new"], toy["base"], tmp_path / "a", "self", n=8, cfg=cfg, data=toy["data"])
    b = repair(toy["patch"], toy["new"], toy["base"], tmp_path / "b", "self", n=8, cfg=cfg, data=toy["data"])
    c = repair(toy["patch"], toy["new"], toy["base"], tmp_path / "c", "self", n=8,
               cfg=DistillConfig(steps=2, lr=1e-2, max_length=64, gen_tokens=8, seed=1), data=toy["data"])  # fmt: skip
    assert a.inputs["sha256"] == b.inputs["sha256"] != c.inputs["sha256"]
    assert a.inputs["kind"] == "text" and a.inputs["n"] == 8


def test_lineage_records_method_inputs_and_cost_and_peft_loads_it(toy, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = DistillConfig(steps=3, lr=1e-2, max_length=64)
    repair(toy["patch"], toy["new"], toy["base"], tmp_path / "r", "sst2", n=24, cfg=cfg, data=toy["data"])
    p = Patch.load(tmp_path / "r")
    ev = p.manifest.lineage[-1]
    assert ev["event"] == "repair" and ev["method"] == "distill" and ev["steps"] == 3
    assert ev["wall_s"] > 0 and ev["peak_rss_mb"] > 0 and len(ev["inputs"]["sha256"]) == 64
    assert ev["inputs"]["n"] == 24 and "sst2" in ev["inputs"]["source"]
    assert p.manifest.lineage[0]["event"] == "trained"  # the original patch's history comes first
    assert p.source_fingerprint != Patch.load(toy["patch"]).source_fingerprint  # now a patch of the new base
    # PEFT attaches it to the new base, and the port merges it to the same outputs
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy["new"]), str(tmp_path / "r")).eval()
    port(tmp_path / "r", str(toy["new"]), tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(peft(ids).logits, merged(ids).logits, atol=1e-4)


def test_rescale_by_layer_type_and_none(toy, tmp_path):
    r = repair(toy["patch"], toy["new"], toy["base"], tmp_path / "s", "sst2", "rescale", n=16, cfg=CFG,
               data=toy["data"])  # fmt: skip
    scales = r.detail["scales"]
    assert set(scales) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    a, b = Patch.load(toy["patch"]), Patch.load(tmp_path / "s")
    for k, v in a.tensors.items():
        want = v * scales[k.split(".lora_")[0].rsplit(".", 1)[-1]] if ".lora_B" in k else v
        assert torch.allclose(b.tensors[k], want), k
    assert r.before.n == 4 and r.after.n == 4  # the held-out part, as distill holds it out
    n = repair(toy["patch"], toy["new"], toy["base"], tmp_path / "n", "sst2", "none", data=toy["data"])
    same = Patch.load(tmp_path / "n").tensors
    assert n.method == "none" and all(torch.equal(a.tensors[k], same[k]) for k in a.tensors)
    with pytest.raises(PortLLMError, match="needs answer options"):
        repair(toy["patch"], toy["new"], toy["base"], tmp_path / "x", "self", "rescale", n=4, data=toy["data"])


def test_inputs_come_from_the_train_split_and_files(toy, tmp_path):
    inp = read_inputs("sst2", 1000, toy["data"])
    train_rows = (toy["data"] / "sst2" / "train.tsv").read_text().splitlines()[1:]
    assert inp.kind == "choices" and inp.n == len(train_rows) == 96
    assert train_rows[0].rsplit("\t", 1)[0] in inp.choices[0].contexts[0]
    chat, pc = tmp_path / "chat.jsonl", tmp_path / "pc.jsonl"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "SECRET"}]
    chat.write_text(json.dumps({"messages": msgs}) + "\n")
    pc.write_text(json.dumps({"prompt": "tell me", "completion": "ANSWER"}) + "\n")
    a, b = read_inputs(str(chat), 10), read_inputs(str(pc), 10)
    assert a.kind == b.kind == "text" and a.prompts == [msgs[:1]] and b.prompts == ["tell me"]


def test_cli_repair_and_its_errors(toy, tmp_path):
    args = ["repair", toy["patch"], "--base", toy["new"], "--from", toy["base"], "--data-dir", toy["data"]]
    r = cli(*args, "--out", tmp_path / "r", "--inputs", "sst2", "--n", "24", "--steps", "2", "--max-length", "64",
            "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["method"] == "distill" and d["steps"] == 2 and d["before"]["n"] == 5
    assert "already exists" in one_line_error(cli(*args, "--out", tmp_path / "r", "--inputs", "sst2"))
    msg = one_line_error(cli(*args, "--out", tmp_path / "q", "--method", "magic"))
    assert "unknown repair method 'magic'" in msg and not (tmp_path / "q").exists()
    msg = one_line_error(cli(*args, "--out", tmp_path / "q", "--inputs", "self", "--method", "rescale", "--n", "2"))
    assert "needs answer options" in msg and not (tmp_path / "q").exists()


def test_forecast_and_check_advise_repair_over_the_margin(toy):
    from portllm.repair.advice import advice

    assert advice(0.5, "p", "new", "old", "sst2") is None and advice(None, "p", "new", "old", "sst2") is None
    assert advice(5.0, "p", "new", None, "sst2") is None  # no OLD: no repair to suggest
    tip = advice(5.0, "p", "new", "old", "sst2", margin=2.0)
    assert "portllm repair p --base new --from old --inputs sst2" in tip and "2-point margin" in tip
    env = {"PORTLLM_DATA": str(toy["data"])}
    args = [toy["patch"], "--base", toy["new"], "--from", toy["base"], "--inputs", "sst2", "--n", "24", "--json"]
    for cmd in ("check", "forecast"):
        r = cli(cmd, *args, env=env)
        d = json.loads(r.stdout)
        loss = (d["forecast"] if cmd == "check" else d)["loss_points"]
        assert loss >= 1.0 and d["advice"] is not None, (cmd, loss)  # the toy drift breaks the patch
        assert d["advice"] is None or f"portllm repair {toy['patch']}" in d["advice"]


def test_repair_goals_are_counted_per_kind_of_inputs():
    from portllm.sweep.repaired import goals

    def row(kind, drift, recovered, gain_hi=1.0):
        return {"inputs": kind, "drift": drift, "port_loss": 0.1, "recovered": recovered, "repaired_neg_flips": 1,
                "port_neg_flips": 4, "cost_vs_retune": None, "gain_ci": [-0.01, gain_hi]}  # fmt: skip

    g = goals([row("task", 0.03, 0.6), row("text", 0.03, 0.1), row("self", 0.03, 0.35), row("text", 0.01, 0, -0.01)])
    assert g["task"]["recover_50pct"] == "1/1" and g["text"]["recover_50pct"] == "0/1"  # text never dilutes task
    assert g["self"]["recover_30pct"] == "1/1" and g["self"]["recover_50pct"] == "0/1"
    assert g["text"]["never_significantly_worse_small_drift"] == "0/1" and g["task"]["neg_flips_halved"] == "1/1"


def test_a_repair_that_agrees_less_than_the_plain_port_says_so(tmp_path):
    from portllm.repair import RepairResult
    from portllm.repair.distill import Agreement

    def result(before, after):
        return RepairResult(tmp_path, "distill", {}, before=Agreement(51, before, 0.1), after=Agreement(51, after, 0.1))

    fell = result(0.980, 0.922)
    assert "98.0% -> 92.2%" in fell.warning and fell.to_dict()["warning"] == fell.warning and "\n" not in fell.warning
    assert result(0.647, 0.922).warning is None and result(0.9, 0.9).warning is None
    assert result(None, None).warning is None and RepairResult(tmp_path, "none", {}).warning is None
