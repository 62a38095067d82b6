"""Merging and extraction against slow references on tiny tensors and tiny models."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import tiny
from portllm import Patch, PortLLMError, import_adapter, port
from portllm.extract import extract
from portllm.merge import (
    DENSITY,
    GAMMA,
    METHODS,
    breadcrumbs,
    clusters,
    dare,
    elect_and_merge,
    get_method,
    greedy_select,
    merge,
    merge_deltas,
    similarity,
    trim_magnitude,
)


def test_ties_matches_slow_reference():
    g = torch.Generator().manual_seed(0)
    ds = [torch.randn(5, 7, generator=g) for _ in range(3)]
    ws = [1.0, 0.5, 2.0]
    density = 0.4
    trimmed = [trim_magnitude(d, density) for d in ds]
    for t in trimmed:
        assert int((t != 0).sum()) == int(density * 35)
    got = merge_deltas(ds, "ties", ws, density=density, lam=1.0)
    want = torch.zeros(5, 7)
    for i in range(5):
        for j in range(7):
            vals = [w * float(t[i, j]) for w, t in zip(ws, trimmed)]
            s = sum(vals)
            sign = 1 if s >= 0 else -1
            num = sum(v for v in vals if v != 0 and ((v > 0) - (v < 0)) == sign)
            den = sum(w for w, v in zip(ws, vals) if v != 0 and ((v > 0) - (v < 0)) == sign)
            want[i, j] = num / den if den else 0.0
    assert torch.allclose(got, want, atol=1e-6)


def test_dare_rescale_keeps_expectation():
    d = torch.linspace(-1, 1, 1000)
    g = torch.Generator().manual_seed(0)
    mean = sum(dare(d, 0.3, g) for _ in range(400)) / 400
    assert float((mean - d).abs().mean()) < 0.05
    kept = dare(d, 0.3, torch.Generator().manual_seed(1))
    assert 0.25 < float((kept != 0).float().mean()) < 0.35
    assert torch.allclose(kept[kept != 0], d[kept != 0] / 0.3)


def test_breadcrumbs_drops_outliers_and_small():
    d = torch.arange(1, 101, dtype=torch.float32)
    out = breadcrumbs(d, density=0.5, gamma=0.1)
    assert torch.equal(out.nonzero().flatten(), torch.arange(40, 90))  # values 41..90 kept


def test_elect_and_merge_disjoint_mean():
    a = torch.tensor([1.0, -2.0, 0.0, 3.0])
    b = torch.tensor([3.0, 1.0, 0.0, -1.0])
    assert torch.allclose(elect_and_merge([a, b], [1.0, 1.0]), torch.tensor([2.0, -2.0, 0.0, 3.0]))
    assert torch.allclose(elect_and_merge([a, b], [1.0, 1.0], normalize=False), torch.tensor([4.0, -2.0, 0.0, 3.0]))


@pytest.fixture(scope="module")
def patches(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("patches")
    out = []
    for k, r in enumerate((4, 8, 4)):
        ad = tiny.make_adapter(world["old"], root / f"ad{k}", r=r, alpha=2 * r, seed=10 + k)
        import_adapter(ad, world["old"], root / f"p{k}", task=f"t{k}")
        out.append(Patch.load(root / f"p{k}"))
    return out


def _deltas(p):
    return {n: m.delta() for n, m in p.modules.items()}


@pytest.mark.parametrize("method", METHODS)
def test_merge_of_one_patch_is_identity(patches, method):
    merged, rep = merge([patches[1]], method, density=1.0, gamma=0.0)
    a, b = _deltas(merged), _deltas(patches[1])
    assert set(a) == set(b)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert rep.energy_kept_min > 0.9999


def test_linear_merge_of_different_ranks_is_exact(patches):
    merged, rep = merge(patches[:2], "linear", weights=[1, 3], rank=12)
    for name, d in _deltas(merged).items():
        want = (patches[0].modules[name].delta() + 3 * patches[1].modules[name].delta()) / 4
        assert torch.allclose(d, want, atol=1e-5)
    assert rep.energy_kept_min > 0.9999
    ta, rep = merge(patches[:2], "task_arithmetic", lam=0.5, rank=12)
    assert rep.normalize is False
    for name, d in _deltas(ta).items():
        assert torch.allclose(d, 0.5 * (patches[0].modules[name].delta() + patches[1].modules[name].delta()), atol=1e-5)


def test_low_rank_merge_reports_energy(patches):
    _, rep = merge(patches, "linear", rank=2)
    assert 0 < rep.energy_kept_min < 1
    assert len(rep.energy_kept) == 14


@pytest.mark.parametrize("method", METHODS)
def test_peft_loads_every_merge_and_port_agrees(patches, world, tmp_path, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged, rep = merge(patches, method, density=0.6, rank=8, seed=3)
    merged.save(tmp_path / "m")
    p = Patch.load(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "portllm.json").read_text())
    assert saved["extra"]["merge"] == json.loads(json.dumps(rep.to_dict()))
    assert p.extra["merge"]["method"] == method and saved["lineage"][0]["event"] == "merged"
    assert p.task == "t0+t1+t2"
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["old"]), tmp_path / "m").eval()
    port(tmp_path / "m", world["old"], tmp_path / "ported")
    ported = AutoModelForCausalLM.from_pretrained(tmp_path / "ported").eval()
    ids = torch.randint(4, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(peft(ids).logits, ported(ids).logits, atol=1e-5)


def test_merge_bad_input(patches, world, tmp_path):
    with pytest.raises(PortLLMError, match=r"density must be in \(0, 1\]"):
        merge(patches, "ties", density=0.0)
    with pytest.raises(PortLLMError, match=r"density must be in \(0, 1\]"):
        merge(patches, "ties", density=1.5)
    with pytest.raises(PortLLMError, match="unknown merge method"):
        merge(patches, "average")
    with pytest.raises(PortLLMError, match="3 patches"):
        merge(patches, "linear", weights=[1, 2])
    port(patches[0].path, world["new"], tmp_path / "moved", as_adapter=True)
    with pytest.raises(PortLLMError, match=r"different bases: .*fp1:.*fp1:"):
        merge([patches[1], Patch.load(tmp_path / "moved")], "linear")
    wide = tiny.make_base(tmp_path / "wide", hidden=48)
    ad = tiny.make_adapter(wide, tmp_path / "adw", r=4)
    import_adapter(ad, wide, tmp_path / "pw")
    manifest = json.loads((tmp_path / "pw" / "portllm.json").read_text())
    manifest["base"] = json.loads((patches[0].path / "portllm.json").read_text())["base"]  # same base, other shapes
    (tmp_path / "pw" / "portllm.json").write_text(json.dumps(manifest))
    other = Patch.load(tmp_path / "pw")
    with pytest.raises(PortLLMError, match="has shape"):
        merge([patches[0], other], "linear")


def test_merge_report_keys_are_stable(patches):
    _, rep = merge(patches[:2], "ties", rank=4)
    assert list(rep.to_dict()) == [
        "method",
        "weights",
        "density",
        "lambda",
        "gamma",
        "rank",
        "seed",
        "normalize",
        "inputs",
        "energy_kept_mean",
        "energy_kept_min",
        "energy_kept",
        "time",
    ]
    assert rep.to_dict()["inputs"][1] == {
        "path": str(patches[1].path),
        "task": "t1",
        "sha256": patches[1].weights_sha256,
    }


def test_ties_density_one_is_unsparsified_ties(patches):
    g = torch.Generator().manual_seed(0)
    ds, ws = [torch.randn(6, 5, generator=g) for _ in range(3)], [1.0, 0.5, 2.0]
    assert torch.equal(merge_deltas(ds, "ties", ws, density=1.0), elect_and_merge(ds, ws))
    merged, rep = merge(patches, "ties", density=1.0, rank=64)  # gamma keeps its default: not a TIES parameter
    assert rep.density == 1.0 and rep.energy_kept_min > 0.9999
    for name, d in _deltas(merged).items():
        want = elect_and_merge([p.modules[name].delta() for p in patches], [1.0] * 3)
        assert torch.allclose(d, want, atol=1e-5)


BAD = {"density": [0.0, -0.5, 1.5, float("nan")], "gamma": [-0.1, 1.0, 0.9]}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_checks_only_its_own_parameters(method):
    own = {p.name for p in METHODS[method].params}
    assert own <= set(BAD), "give the new parameter some invalid values in BAD"
    get_method(method)  # the declared defaults are valid
    for name, values in BAD.items():
        for v in values:
            if name in own:
                with pytest.raises(PortLLMError, match=rf"^{method}: {name} must be"):
                    get_method(method, **{name: v})
            else:
                get_method(method, **{name: v})  # someone else's parameter: ignored


def test_parameter_rules_through_merge(patches):
    with pytest.raises(PortLLMError, match=r"breadcrumbs: gamma must be in \[0, 1\) with gamma \+ density <= 1"):
        merge(patches, "breadcrumbs", density=0.6, gamma=0.5)
    merge(patches[:1], "breadcrumbs", density=0.6, gamma=0.4, rank=4)
    merge(patches[:1], "ties", density=0.6, gamma=0.5, rank=4)  # TIES ignores gamma
    merge(patches[:1], "linear", density=0.0, gamma=2.0)  # linear ignores both
    assert [p.name for p in METHODS["breadcrumbs"].params] == [DENSITY.name, GAMMA.name]
    assert {m: c.normalize for m, c in METHODS.items()} == {
        "linear": True,
        "task_arithmetic": False,
        "ties": True,
        "dare_linear": False,
        "dare_ties": False,
        "breadcrumbs": False,
    }  # mergekit's defaults


def test_merge_refuses_modules_to_save(patches):
    full = dict(patches[0].tensors, **{"lm_head.weight": torch.zeros(96, 32)})
    with pytest.raises(PortLLMError, match=r"lm_head\.weight.*whole-tensor replacement cannot be merged"):
        merge([patches[1], Patch(patches[0].config, full, patches[0].manifest)], "ties")


def _cli(*args, register=""):
    """`portllm ARGS` in a subprocess, after running `register` (code that may register a merge method)."""
    code = f"import sys\n{register}\nfrom portllm.cli import main\nsys.argv = ['portllm', *sys.argv[1:]]\nmain()"
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


REGISTER_HALF_MEAN = '''
from portllm.merge.methods import Linear, register

@register
class HalfMean(Linear):
    """Half of the linear mean (a test method)."""
    name = "half_mean_test"
    def merge_layer(self, deltas, weights, normalize, g):
        return 0.5 * super().merge_layer(deltas, weights, normalize, g)
'''


def test_cli_method_choices_come_from_the_registry(patches, tmp_path):
    r = _cli("merge", "--help", register=REGISTER_HALF_MEAN)
    assert r.returncode == 0, r.stderr
    for name in [*METHODS, "half_mean_test"]:
        assert f"{name}:" in r.stdout
    assert "Half of the linear mean" in r.stdout
    r = _cli(
        "merge",
        patches[0].path,
        "--method",
        "half_mean_test",
        "--rank",
        "8",
        "--out",
        tmp_path / "h",
        "--json",
        register=REGISTER_HALF_MEAN,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["method"] == "half_mean_test"
    half = Patch.load(tmp_path / "h")
    for name, d in _deltas(patches[0]).items():
        assert torch.allclose(half.modules[name].delta(), 0.5 * d, atol=1e-5)
    r = _cli("merge", patches[0].path, "--method", "average", "--out", tmp_path / "a")
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert r.returncode == 3 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "average" in lines[0] and all(m in lines[0] for m in METHODS)
    assert not (tmp_path / "a").exists()


def test_similarity_and_clusters(patches):
    neg = Patch(
        patches[0].config,
        {k: (-v if ".lora_B" in k else v) for k, v in patches[0].tensors.items()},
        patches[0].manifest,
    )
    sim = similarity([patches[0], patches[1], neg])
    assert sim[0][0] == pytest.approx(1.0) and sim[0][2] == pytest.approx(-1.0)
    assert abs(sim[0][1]) < 0.5  # independent random patches are nearly orthogonal
    assert clusters(sim, 0.9) == [[0], [1], [2]]
    assert clusters([[1, 0.95, 0], [0.95, 1, 0], [0, 0, 1]], 0.9) == [[0, 1], [2]]


def test_greedy_selection_keeps_only_helpful(patches):
    target = patches[0]

    def score(p):  # closer to patch 0's update is better
        d, t = _deltas(p), _deltas(target)
        return -sum(float((d[k] - t[k]).norm()) for k in t)

    merged, traj = greedy_select(patches, score, "linear", log=lambda m: None, rank=16)
    assert traj[0]["candidate"] == str(target.path) and traj[0]["kept"]
    assert [t["kept"] for t in traj[1:]] == [False, False]
    assert merged.extra["selection"]["chosen"] == [str(target.path)]


def test_extract_exact_low_rank_is_lossless(world, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world["old"])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in n and "lm_head" not in n:
                p.add_(torch.randn(p.shape[0], 4, generator=g) @ torch.randn(4, p.shape[1], generator=g) * 0.01)
    model.save_pretrained(tmp_path / "tuned")
    rep = extract(tmp_path / "tuned", world["old"], tmp_path / "patch", rank=4)
    assert rep.layers == 14 and rep.min_norm_kept > 0.99999
    saved = json.loads((tmp_path / "patch" / "portllm.json").read_text())
    assert saved["extra"]["extract"] == json.loads(json.dumps(rep.summary()))
    assert saved["extra"]["layers"] == [r.to_dict() for r in rep.rows]
    assert list(rep.to_dict()) == [
        "rank",
        "energy",
        "layers",
        "mean_norm_kept",
        "min_norm_kept",
        "ranks",
        "skipped_1d",
        "full_tensors",
        "tuned",
        "rows",
        "out",
    ]
    assert set(rep.to_dict()["rows"][0]) == {"module", "kind", "rank", "kept", "rel_change"}
    port(tmp_path / "patch", world["old"], tmp_path / "back")
    a, b = load_file(tmp_path / "back" / "model.safetensors"), load_file(tmp_path / "tuned" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    # energy mode picks per-layer ranks; PEFT still loads it
    rep = extract(tmp_path / "tuned", world["old"], tmp_path / "patch_e", rank=None, energy=0.5)
    assert all(r.rank <= 4 for r in rep.rows)
    from peft import PeftModel

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["old"]), tmp_path / "patch_e")


def test_extract_full_rank_reports_loss_and_embeddings(world, tmp_path):
    from transformers import AutoModelForCausalLM

    tuned = AutoModelForCausalLM.from_pretrained(world["new"])
    with torch.no_grad():
        tuned.model.norm.weight.mul_(1.1)
    tuned.save_pretrained(tmp_path / "tuned")
    rep = extract(tmp_path / "tuned", world["old"], tmp_path / "p", rank=2, include_embeddings=True)
    assert 0 < rep.mean_norm_kept < 1
    assert set(rep.full_tensors) == {"embed_tokens", "lm_head"}
    assert rep.skipped_1d == ["model.norm.weight"]  # a changed norm cannot be a LoRA: reported, not hidden
    p = Patch.load(tmp_path / "p")
    assert set(p.full_weights) == {"model.embed_tokens.weight", "lm_head.weight"}
    with pytest.raises(PortLLMError, match="whole-tensor replacement cannot be merged") as e:
        merge([p, p], "linear")
    assert "\n" not in str(e.value) and "port each patch" in str(e.value)


def test_extract_bad_input(world, tmp_path):
    with pytest.raises(PortLLMError, match="nothing to extract"):
        extract(world["old"], world["old"], tmp_path / "p")
    with pytest.raises(PortLLMError, match="energy"):
        extract(world["new"], world["old"], tmp_path / "p", energy=1.5)
    wide = tiny.make_base(tmp_path / "wide", hidden=48)
    with pytest.raises(PortLLMError, match="in the tuned model but"):
        extract(wide, world["old"], tmp_path / "p")
    assert not (tmp_path / "p").exists()
