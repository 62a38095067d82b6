"""Architecture facts as data: the table, and the fallback that reads an unknown model's own modules."""

import json
import shutil

import pytest

import tiny
from portllm.architectures import _from_model, arch_for, known_types, side_files
from portllm.models import architecture_of

PAPER = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_known_type_comes_from_the_table():
    a = arch_for("llama")
    assert a.source == "table" and set(a.lora_targets) == PAPER
    assert a.is_vocab_tensor("model.embed_tokens.weight") and a.is_vocab_tensor("lm_head.weight")
    assert not a.is_vocab_tensor("model.layers.0.mlp.up_proj.weight")
    assert not a.is_vocab_tensor("model.embed_tokens_extra.weight")
    assert a.ties({"tie_word_embeddings": True}) and not a.ties({})  # Llama's default is untied
    assert arch_for("gemma3_text").ties({})
    g = arch_for("gpt2")
    assert g.fan_in_fan_out and set(g.lora_targets) == {"c_attn", "c_proj", "c_fc"}
    assert g.is_vocab_tensor("transformer.wpe.weight")
    assert "tokenizer.json" in side_files("llama") and side_files("no-such-type") == side_files(None)


@pytest.mark.parametrize("model_type", [t for t in known_types() if t != "gemma3"])
def test_table_agrees_with_transformers(model_type):
    """Each entry says what the model's own modules say (gemma3 is multimodal: its vision tower is excluded)."""
    from transformers import AutoConfig

    table, built = arch_for(model_type), _from_model(model_type, AutoConfig.for_model(model_type))
    assert set(table.lora_targets) == set(built.lora_targets)
    assert (table.embedding_names, table.head_names) == (built.embedding_names, built.head_names)
    assert (table.fan_in_fan_out, table.tie_default) == (built.fan_in_fan_out, built.tie_default)


def test_unknown_type_falls_back_to_the_models_linear_layers():
    a = arch_for("portllm-test-unknown-a", tiny.tiny_config())
    assert a.source == "model" and set(a.lora_targets) == PAPER  # lm_head is not a target
    assert a.embedding_names == ("model.embed_tokens",) and a.head_names == ("lm_head",)
    assert not a.fan_in_fan_out and not a.tie_default
    assert arch_for("portllm-test-unknown-a") is a  # cached per model type


def test_unknown_type_of_a_base_directory(world, tmp_path):
    """A config.json whose model_type transformers does not know is read through its architecture class."""
    d = tmp_path / "odd"
    shutil.copytree(world["old"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "portllm-test-unknown-b"
    (d / "config.json").write_text(json.dumps(cfg))
    a = architecture_of(d)
    assert a.source == "model" and set(a.lora_targets) == PAPER
