import json
import shutil

import pytest
import torch

import tiny
from portllm import Patch, PortLLMError, check, fingerprint, import_adapter
from portllm.models import resolve_base
from portllm.patch import describe


def test_manifest_records_provenance(world):
    p = Patch.load(world["patch"])
    m = p.manifest
    assert m.format == "portllm-patch" and m.task == "toy" == p.task
    assert m.base.fingerprint == fingerprint(world["old"]) == p.source_fingerprint
    assert m.base.architecture == "LlamaForCausalLM"
    assert (m.base.num_layers, m.base.hidden_size, m.base.vocab_size) == (2, 32, 96)
    assert m.base.tokenizer["size"] == 96
    assert m.lora["rank"] == 4 and m.lora["alpha"] == 8
    assert set(m.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert m.lineage[0]["event"] == "imported"
    assert set(m.lora["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_patch_is_loadable_by_peft(world):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["old"]), world["patch"])
    ours = Patch.load(world["patch"])
    m = ours.modules["model.layers.1.mlp.up_proj"]
    layer = model.base_model.model.model.layers[1].mlp.up_proj
    assert torch.equal(layer.lora_A["default"].weight, m.A)
    assert torch.equal(layer.lora_B["default"].weight, m.B)


def test_delta_norm_and_describe(world):
    p = Patch.load(world["patch"])
    d = describe(p)
    assert d["n_modules"] == 14 and d["ranks"] == [4]
    for row in d["modules"]:
        m = p.modules[row["module"]]
        assert row["delta_norm"] == pytest.approx(float(m.delta().norm()), rel=1e-5)
        assert m.scaling == 2.0
    assert d["n_params"] == sum(t.numel() for t in p.tensors.values())


def test_rslora_and_alpha_pattern_scaling(tmp_path, world):
    ad = tiny.make_adapter(world["old"], tmp_path / "ad", r=4, alpha=8, use_rslora=True, alpha_pattern={"q_proj": 2})
    p = Patch(*__import__("portllm.patch", fromlist=["read_adapter"]).read_adapter(ad))
    assert p.modules["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(2 / 2)
    assert p.modules["model.layers.0.mlp.up_proj"].scaling == pytest.approx(8 / 2)
    # our scaling matches PEFT's merge
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["old"]), ad)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"):
        layer = peft.base_model.model.get_submodule(name)
        assert layer.scaling["default"] == pytest.approx(p.modules[name].scaling)


def test_check_same_and_evolved(world):
    same = check(world["patch"], world["old"])
    assert same.verdict == "compatible" and same.exit_code == 0
    assert any("very base" in f.detail for f in same.findings)
    evolved = check(world["patch"], world["new"], old=world["old"])
    assert evolved.verdict == "compatible"
    assert len(evolved.drift) == 14
    for r in evolved.drift:  # tiny.evolve adds 2% noise relative to each tensor's std
        assert 0.005 < r["rel_drift"] < 0.05
        assert -1 <= r["cos"] <= 1 and 0 <= r["overlap"] <= 1
    d = evolved.to_dict()
    assert d["drift_summary"]["q_proj"]["n"] == 2
    json.dumps(d)


def test_drift_along_the_patch_is_measured(world, tmp_path):
    """A base that moved exactly along the patch shows cos = 1 and overlap = 1."""
    from portllm import port

    port(world["patch"], world["old"], tmp_path / "moved")
    rep = check(world["patch"], tmp_path / "moved", old=world["old"])
    for r in rep.drift:
        assert r["cos"] == pytest.approx(1.0, abs=1e-4)
        assert r["overlap"] == pytest.approx(1.0, abs=1e-4)
        assert r["patch_to_drift"] == pytest.approx(1.0, abs=1e-3)


def test_check_tokenizer_and_template_changes(world, tmp_path):
    renamed = tiny.make_base(tmp_path / "ren", tokenizer_rename=7, template="{{ other }}")
    rep = check(world["patch"], renamed, old=world["old"])
    assert rep.verdict == "compatible with warnings" and rep.exit_code == 1
    topics = {f.topic: f.detail for f in rep.findings if f.level == "warn"}
    assert "7 of the first 96 token strings changed" in topics["tokenizer"]
    assert "chat template" in topics
    # without --from the change is still seen, by block hashes
    rep2 = check(world["patch"], renamed)
    assert "blocks" in {f.topic: f.detail for f in rep2.findings}["tokenizer"]


def test_check_special_token_change(world, tmp_path):
    from transformers import AutoTokenizer

    d = tmp_path / "spec"
    shutil.copytree(world["old"], d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.eos_token = "w5"
    tok.save_pretrained(d)
    rep = check(world["patch"], d)
    assert any(f.topic == "special tokens" and "eos_token" in f.detail for f in rep.findings)


def test_check_incompatible(world, tmp_path):
    wide = tiny.make_base(tmp_path / "wide", hidden=48)
    rep = check(world["patch"], wide)
    assert rep.verdict == "incompatible" and rep.exit_code == 2
    assert any(f.topic == "targets" and "expects" in f.detail for f in rep.findings)
    from transformers import GPT2Config, GPT2LMHeadModel

    g = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=96)).save_pretrained(g)
    rep = check(world["patch"], g)
    assert rep.verdict == "incompatible"
    assert any(f.topic == "architecture" and "gpt2" in f.detail for f in rep.findings)
    assert any(f.topic == "targets" and "absent" in f.detail for f in rep.findings)


# ---------------------------------------------------------------- bad input


def test_wrong_sha256_refused(world, tmp_path):
    p = tmp_path / "p"
    shutil.copytree(world["patch"], p)
    cfg = json.loads((p / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 64
    (p / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PortLLMError, match="does not match its sha256"):
        Patch.load(p)


def test_pickle_adapter_refused(world, tmp_path):
    p = tmp_path / "pk"
    shutil.copytree(world["adapter"], p)
    (p / "adapter_model.safetensors").rename(p / "adapter_model.bin")
    with pytest.raises(PortLLMError, match="never unpickles"):
        import_adapter(p, world["old"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pickle_base_refused(world, tmp_path):
    b = tmp_path / "pkbase"
    b.mkdir()
    shutil.copy(world["old"] / "config.json", b)
    (b / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(PortLLMError, match="never unpickles"):
        resolve_base(b)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_corrupt_or_missing_safetensors(world, tmp_path, damage):
    b = tmp_path / "bad"
    shutil.copytree(world["new"], b)
    f = b / "model.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:5000])
        msg = "runs past the end|corrupt"
    elif damage == "garbage":
        f.write_bytes(b"\xff" * 64)
        msg = "corrupt safetensors header"
    else:
        f.unlink()
        msg = "no .safetensors weights"
    with pytest.raises(PortLLMError, match=msg):
        check(world["patch"], b)
    from portllm import port

    with pytest.raises(PortLLMError):
        port(world["patch"], b, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_patch_weights(world, tmp_path):
    p = tmp_path / "p"
    shutil.copytree(world["adapter"], p)
    (p / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(PortLLMError, match="no LoRA factors|corrupt"):
        import_adapter(p, world["old"], tmp_path / "o")


def test_import_adapter_onto_wrong_base(world, tmp_path):
    wide = tiny.make_base(tmp_path / "wide", hidden=48)
    with pytest.raises(PortLLMError, match="does not fit base"):
        import_adapter(world["adapter"], wide, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_plain_adapter_needs_import(world):
    with pytest.raises(PortLLMError, match="import-adapter"):
        Patch.load(world["adapter"])
    assert len(Patch.load(world["adapter"], require_manifest=False).modules) == 14


def test_modules_to_save_ported(world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from portllm import port

    ad = tiny.make_adapter(world["old"], tmp_path / "ad", modules_to_save=["lm_head"])
    import_adapter(ad, world["old"], tmp_path / "p")
    res = port(tmp_path / "p", world["new"], tmp_path / "out")
    assert res.replaced == 1
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["new"]), ad).merge_and_unload()
    assert torch.allclose(merged.lm_head.weight, ref.lm_head.weight)


# ---------------------------------------------------------------- typed manifest, save, import graph


def test_manifest_round_trip_keeps_unknown_keys(world, tmp_path):
    from portllm.models import BaseInfo
    from portllm.patch import Manifest

    raw = json.loads((world["patch"] / "portllm.json").read_text())
    assert Manifest.from_dict(raw).to_dict() == raw
    assert list(Manifest.from_dict(raw).to_dict()) == list(raw)  # same key order on disk
    raw["from_the_future"] = {"x": [1, 2]}
    raw["base"]["also_new"] = 7
    raw["extra"]["someone_elses"] = {"y": 1}
    m = Manifest.from_dict(raw)
    assert m.to_dict() == raw and m.other == {"from_the_future": {"x": [1, 2]}}
    assert m.base.other == {"also_new": 7} and BaseInfo.from_dict(raw["base"]).to_dict() == raw["base"]
    # and through a save and a load
    p = Patch.load(world["patch"])
    p.manifest = m
    saved = json.loads((p.save(tmp_path / "future").path / "portllm.json").read_text())
    assert saved["from_the_future"] == {"x": [1, 2]} and saved["base"]["also_new"] == 7
    assert Patch.load(tmp_path / "future").manifest.to_dict() == saved


def test_save_leaves_the_patch_unchanged(world, tmp_path):
    from portllm.patch import new_manifest

    p = Patch.load(world["patch"])
    before = json.loads(json.dumps(p.manifest.to_dict()))
    q = p.save(tmp_path / "copy")
    assert p.path == world["patch"] and p.manifest.to_dict() == before
    assert q.path == tmp_path / "copy" and q.weights_sha256 == p.weights_sha256
    q.extra["note"] = 1
    assert "note" not in p.extra  # the saved patch's records are its own
    fresh = Patch(p.config, p.tensors, new_manifest(p.source, p.config, p.tensors, "created"))
    r = fresh.save(tmp_path / "fresh")
    assert fresh.path is None and fresh.manifest.files == {} and fresh.weights_sha256 is None
    assert r.weights_sha256 and Patch.load(tmp_path / "fresh").weights_sha256 == r.weights_sha256


def _portllm_imports(module: str) -> set[str]:
    """portllm modules a module imports anywhere in its source (lazy imports in functions included)."""
    import ast
    from pathlib import Path

    import portllm

    root = Path(portllm.__file__).parent
    rel = module.split(".")[1:]
    f = root.joinpath(*rel).with_suffix(".py")
    pkg = rel[:-1]
    if not f.is_file():
        f, pkg = root.joinpath(*rel, "__init__.py"), rel
    found = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg[: len(pkg) - node.level + 1]
            parts = base + (node.module.split(".") if node.module else [])
            names = [parts] if node.module else [parts + [a.name] for a in node.names]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            names = [m.split(".")[1:] for m in mods if m.startswith("portllm.")]
        else:
            continue
        for parts in names:
            if parts and (root.joinpath(*parts).with_suffix(".py").is_file() or root.joinpath(*parts).is_dir()):
                found.add(".".join(["portllm", *parts]))
    return found


def test_patch_does_not_import_check():
    """The patch format stands alone: check builds on it, never the other way (no import circle)."""
    seen, todo = set(), ["portllm.patch"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += _portllm_imports(m)
    assert "portllm.models" in seen and "portllm.check" not in seen and "portllm.port" not in seen
    assert "portllm.patch" in _portllm_imports("portllm.check")
