"""A port applies exactly what PEFT applies: each module's rank and alpha resolved as PEFT resolves them.

PEFT picks, per module, the first `rank_pattern` / `alpha_pattern` key matching `(.*\\.)?(KEY)$`, so keys
may overlap (a full module name and a short one) or be regexes with alternation. The property test draws
adapter configs over those cases and checks the port against PEFT's `merge_and_unload` and against
runtime attach, on a tiny Llama.
"""

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import tiny
from portllm import Patch, PortLLMError, import_adapter, port

LAYERS = 4
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# short names, full module names, dotted suffixes, alternations and regexes, overlapping one another
PATTERN_KEYS = (
    "q_proj",
    "k_proj",
    "down_proj",
    "q_proj|k_proj",
    "gate_proj|up_proj|down_proj",
    "v_proj|o_proj|q_proj",
    "self_attn.q_proj",
    "mlp.up_proj",
    "model.layers.3.self_attn.q_proj",
    "model.layers.0.mlp.down_proj",
    "layers.1.self_attn.k_proj",
    r"layers\.2\..*",
    r"self_attn\.(q|v)_proj",
    r".*_proj",
)
BRIEF_CASE = {  # the trust issue's example: a full module name and an alternation both match layer 3's q_proj
    "target": "all-linear",
    "r": 4,
    "alpha": 8,
    "use_rslora": True,
    "rank_pattern": {"model.layers.3.self_attn.q_proj": 8, "q_proj|k_proj": 2},
    "alpha_pattern": {"model.layers.3.self_attn.q_proj": 64, "q_proj|k_proj": 4},
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_semantics")
    old = tiny.make_base(root / "theta", layers=LAYERS)
    return {"old": old, "new": tiny.evolve(old, root / "theta2")}


@st.composite
def adapter_configs(draw):
    def pattern(values):
        keys = draw(st.lists(st.sampled_from(PATTERN_KEYS), max_size=4, unique=True))
        # PEFT writes adapter_config.json with sorted keys and resolves patterns in dict order, so an adapter
        # trained with another order may not load at all: draw them in the order PEFT will read them back
        return {k: draw(values) for k in sorted(keys)}

    return {
        "target": draw(
            st.one_of(st.just("all-linear"), st.lists(st.sampled_from(TYPES), min_size=1, max_size=7, unique=True))
        ),
        "r": draw(st.integers(1, 8)),
        "alpha": draw(st.sampled_from([1, 2, 4, 8, 16, 32])),
        "use_rslora": draw(st.booleans()),
        "rank_pattern": pattern(st.integers(1, 8)),
        "alpha_pattern": pattern(st.sampled_from([1, 2, 4, 16, 64])),
    }


def _weights(d):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI never flakes on a new draw
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning")
@example(spec=BRIEF_CASE)
@given(spec=adapter_configs())
def test_port_equals_peft_merge_and_runtime_attach(bases, spec):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        tiny.make_adapter(
            bases["old"],
            d / "adapter",
            r=spec["r"],
            alpha=spec["alpha"],
            target=spec["target"],
            use_rslora=spec["use_rslora"],
            rank_pattern=spec["rank_pattern"],
            alpha_pattern=spec["alpha_pattern"],
        )
        import_adapter(d / "adapter", bases["old"], d / "patch")
        patch = Patch.load(d / "patch")
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bases["new"]), d / "adapter").eval()
        for name, m in patch.modules.items():  # rank and scaling, module by module, exactly PEFT's
            layer = peft.base_model.model.get_submodule(name)
            assert (m.rank, m.scaling) == (layer.r["default"], pytest.approx(layer.scaling["default"], rel=1e-12)), name

        ids = torch.randint(4, 96, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            attached = peft(ids).logits
            reference = peft.merge_and_unload()
            merged_ref = reference(ids).logits
        port(d / "patch", bases["new"], d / "ported")
        ours = _weights(d / "ported")
        ref = reference.state_dict()
        for k, w in ours.items():
            assert (w - ref[k]).abs().max() <= 1e-5 * max(1.0, float(ref[k].abs().max())), k
        with torch.no_grad():
            logits = AutoModelForCausalLM.from_pretrained(d / "ported").eval()(ids).logits
        tol = 2e-4 * max(1.0, float(attached.abs().max()))  # fp32 rounding; a wrong scaling is orders larger
        assert (logits - merged_ref).abs().max() <= tol
        assert (logits - attached).abs().max() <= tol


def test_config_defaults_and_rank_disagreement_follow_peft(bases, tmp_path):
    ad = tiny.make_adapter(bases["old"], tmp_path / "ad", r=4, alpha=8, target=["q_proj"])
    p = Patch.load(ad, require_manifest=False)
    cfg = {k: v for k, v in p.config.items() if k != "lora_alpha"}  # PEFT's default alpha is 8, not r
    assert Patch(cfg, p.tensors).modules["model.layers.0.self_attn.q_proj"].scaling == 8 / 4
    with pytest.raises(PortLLMError, match=r"model\.layers\.0\.self_attn\.q_proj has rank 4 .* gives 2"):
        _ = Patch(dict(p.config, r=2), p.tensors).modules
