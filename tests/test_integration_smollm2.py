"""The real embedded SmolLM2-135M: export, patch, evolve, port, reload, compare with PEFT."""

import json
import math

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from portllm import resolve_base

    return resolve_base("smollm2-135m")


def test_smollm2_port_matches_peft(smol, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from portllm import check, fingerprint, import_adapter, port
    from portllm.models import copy_side_files

    assert (smol / "config.json").is_file()
    fp = fingerprint(smol)
    # θ': a perturbed copy of θ
    evolved = tmp_path / "evolved"
    evolved.mkdir()
    copy_side_files(smol, evolved)
    g = torch.Generator().manual_seed(0)
    sd = {
        k: v + 0.01 * v.std() * torch.randn(v.shape, generator=g) if v.ndim == 2 else v
        for k, v in load_file(smol / "model.safetensors").items()
    }
    save_file(sd, evolved / "model.safetensors", metadata={"format": "pt"})
    del sd
    assert fingerprint(evolved) != fp

    # a LoRA patch with non-zero B, rank 8 on every linear projection, as in the paper
    model = AutoModelForCausalLM.from_pretrained(smol)
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    del pm, model
    patch = import_adapter(tmp_path / "adapter", "smollm2-135m", tmp_path / "patch", task="demo")
    assert len(patch.modules) == 30 * 7 and patch.source_fingerprint == fp

    rep = check(tmp_path / "patch", evolved, old="smollm2-135m")
    assert rep.verdict == "compatible" and len(rep.drift) == 210
    res = port(tmp_path / "patch", evolved, tmp_path / "ported")
    assert res.applied == 210

    tok = AutoTokenizer.from_pretrained(tmp_path / "ported")
    ids = tok(["Is the sky blue? Answer:", "The movie was wonderful. Sentiment:"], return_tensors="pt", padding=True)
    ported = AutoModelForCausalLM.from_pretrained(tmp_path / "ported").eval()
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(evolved), tmp_path / "adapter").eval()
    plain = AutoModelForCausalLM.from_pretrained(evolved).eval()
    with torch.no_grad():
        a = ported(**ids).logits
        b = ref(**ids).logits
        c = plain(**ids).logits
    assert (a - b).abs().max() < 2e-3
    assert (a - c).abs().max() > 0.1  # the patch is really there


def test_smollm2_train_few_steps_on_real_sst2(smol, tmp_path):
    import os

    from portllm import Patch
    from portllm.train import TrainConfig, train

    data = os.environ.get("PORTLLM_DATA")
    if not data or not os.path.isdir(data):
        pytest.skip("PORTLLM_DATA not set")
    cfg = TrainConfig(steps=4, batch_size=2, max_length=48, lr=1e-3, max_examples=16, dtype="bfloat16")
    r = train("smollm2-135m", "sst2", tmp_path / "p", cfg, data=data)
    vocab = json.loads((smol / "config.json").read_text())["vocab_size"]
    # each step's loss is a real cross-entropy on the answer tokens: finite, positive, and a pretrained model
    # does better than a uniform guess over its vocabulary (ln V)
    assert len(r.losses) == 4 and all(math.isfinite(x) and 0 < x < math.log(vocab) for x in r.losses), r.losses
    p = Patch.load(tmp_path / "p")
    assert len(p.modules) == 210 and p.extra["training"]["examples_seen"] == 8
    assert any(float(m.B.abs().max()) > 0 for m in p.modules.values())  # B moved off its zero init


def test_smollm2_batched_scores_equal_one_at_a_time(smol):
    import os

    from portllm.eval import loglikelihoods, open_lm
    from portllm.tasks import get_task, load_examples

    data = os.environ.get("PORTLLM_DATA")
    if not data or not os.path.isdir(data):
        pytest.skip("PORTLLM_DATA not set")
    lm = open_lm("smollm2-135m")
    pairs = []
    for name in ("boolq", "winogrande", "arc_easy"):
        for e in load_examples(get_task(name), "eval", data, limit=3):
            pairs += list(zip(e.contexts, e.continuations))
    batched, _ = loglikelihoods(lm, pairs, batch_size=8)
    single = [loglikelihoods(lm, [p], batch_size=1)[0][0] for p in pairs]
    assert max(abs(a - b) for a, b in zip(batched, single)) < 1e-3
