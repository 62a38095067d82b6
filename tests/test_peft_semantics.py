"""A port applies exactly what PEFT applies: each module's rank and alpha resolved as PEFT resolves them.

PEFT picks, per module, the first `rank_pattern` / `alpha_pattern` key matching `(.*\\.)?(KEY)$`, so keys
may overlap (a full module name and a short one) or be regexes with alternation. The property tests draw
adapter configs (targets, r, lora_alpha, use_rslora, rank/alpha patterns) and check the port against PEFT's
`merge_and_unload`: on a tiny fp32 Llama (and against runtime attach), on a tiny bf16 Llama, and on a tiny
GPT-2, whose Conv1D layers store weights transposed (`fan_in_fan_out=True`).
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


GPT2_TYPES = ("c_attn", "c_proj", "c_fc")  # GPT-2's Conv1D layers: weights stored (in, out), so ΔW is transposed
BF16_ULP = 2.0**-7  # bf16 keeps 8 significant bits: neighbouring values are 2^-7 to 2^-8 apart, relative


def _gpt2_base(out: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tiny.make_tokenizer(96).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def other_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_semantics_more")
    gpt2 = _gpt2_base(root / "gpt2")
    llama = tiny.make_base(root / "bf16", layers=LAYERS, dtype=torch.bfloat16)
    return {
        "gpt2-fan-in-fan-out": (gpt2, tiny.evolve(gpt2, root / "gpt2-2"), torch.float32),
        "llama-bf16": (llama, tiny.evolve(llama, root / "bf16-2"), torch.bfloat16),
    }


@st.composite
def gpt2_configs(draw):
    return {
        "target": draw(st.lists(st.sampled_from(GPT2_TYPES), min_size=1, max_size=3, unique=True)),
        "r": draw(st.integers(1, 8)),
        "alpha": draw(st.sampled_from([1, 2, 4, 8, 16, 32])),
        "use_rslora": draw(st.booleans()),
        "rank_pattern": {},
        "alpha_pattern": {},
        "fan_in_fan_out": True,
    }


def _assert_bf16_merge_equal(ours: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    """PEFT (CPU) adds its fp32 ΔW to the bf16 weight with one rounding, as the port does: the two agree value for
    value, except where a different order of fp32 operations moves a value across a bf16 rounding boundary (one
    bf16 step, rarely). Rounding twice, truncating or a wrong ΔW differs on many elements or by more."""
    assert ours.dtype == ref.dtype == torch.bfloat16, name
    a, b = ours.float(), ref.float()
    assert bool(((a - b).abs() <= BF16_ULP * torch.maximum(a.abs(), b.abs())).all()), name
    assert float((a != b).float().mean()) <= 0.01, name


@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning")
@pytest.mark.parametrize("case", ["gpt2-fan-in-fan-out", "llama-bf16"])
@given(data=st.data())
def test_port_equals_peft_merge_fan_in_fan_out_and_bf16(other_bases, case, data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    old, new, dtype = other_bases[case]
    spec = data.draw(gpt2_configs() if case.startswith("gpt2") else adapter_configs(), label="adapter")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        kw = {k: v for k, v in spec.items() if k not in ("target", "alpha")}
        tiny.make_adapter(old, d / "adapter", alpha=spec["alpha"], target=spec["target"], **kw)
        import_adapter(d / "adapter", old, d / "patch")
        patch = Patch.load(d / "patch")
        assert all(m.fan_in_fan_out == case.startswith("gpt2") for m in patch.modules.values())
        port(d / "patch", new, d / "ported")
        ours, before = _weights(d / "ported"), _weights(new)
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(new, dtype=dtype), d / "adapter").eval()
        ids = torch.randint(4, 96, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            attached = peft(ids).logits
            reference = peft.merge_and_unload()
        ref = reference.state_dict()
        assert {k for k in ours if not torch.equal(ours[k], before[k])} == {
            m.weight_name for m in patch.modules.values()
        }
        for k, w in ours.items():
            assert w.dtype == before[k].dtype == dtype, k  # the port keeps the base's dtype
            if dtype == torch.bfloat16:
                _assert_bf16_merge_equal(w, ref[k], k)
            else:
                assert (w - ref[k]).abs().max() <= 1e-5 * max(1.0, float(ref[k].abs().max())), k
        if dtype == torch.float32:  # runtime attach too (bf16 logits round too coarsely to tell a wrong ΔW apart)
            with torch.no_grad():
                logits = AutoModelForCausalLM.from_pretrained(d / "ported").eval()(ids).logits
            assert (logits - attached).abs().max() <= 2e-4 * max(1.0, float(attached.abs().max()))
