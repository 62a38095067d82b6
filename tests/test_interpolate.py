"""θ(t) = θ + t·(θ' − θ): exact at the ends, linear in between, refused across architectures."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import tiny
from portllm import PortLLMError, fingerprint
from portllm.interpolate import interpolate


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("interp")
    old = tiny.make_base(root / "theta")
    return old, tiny.evolve(old, root / "theta2")


def _weights(d):
    return load_file(d / "model.safetensors")


def test_ends_and_midpoint(pair, tmp_path):
    old, new = pair
    a, b = _weights(old), _weights(new)
    r0 = interpolate(old, new, 0.0, tmp_path / "t0")
    r1 = interpolate(old, new, 1.0, tmp_path / "t1")
    rh = interpolate(old, new, 0.5, tmp_path / "th")
    w0, w1, wh = _weights(r0.out), _weights(r1.out), _weights(rh.out)
    assert all(torch.equal(w0[k], a[k]) for k in a)  # the zero-drift control is θ bit for bit
    assert all(torch.allclose(w1[k], b[k], atol=1e-6) for k in a)
    assert all(torch.allclose(wh[k], (a[k] + b[k]) / 2, atol=1e-6) for k in a)
    assert max(r0.drift.values()) == 0.0
    q = "q_proj"
    assert rh.drift[q] == pytest.approx(r1.drift[q] / 2, rel=1e-3)  # drift is linear in t
    assert (r1.out / "config.json").is_file() and (r1.out / "tokenizer.json").is_file()


def test_other_architecture_is_refused(pair, tmp_path):
    old, _ = pair
    other = tiny.make_base(tmp_path / "wide", hidden=48)
    with pytest.raises(PortLLMError, match="another shape"):
        interpolate(old, other, 0.5, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_lineage_reads_back(pair, tmp_path):
    from portllm.evolve import EvolveResult, read_lineage
    from portllm.interpolate import InterpolateResult

    old, new = pair
    r = interpolate(old, new, 0.25, tmp_path / "q")
    assert InterpolateResult.read(tmp_path / "q") == r == read_lineage(tmp_path / "q")
    d = json.loads((tmp_path / "q" / "portllm_lineage.json").read_text())
    assert set(d) == {"parent", "interpolated", "drift", "fingerprint", "wall_s"}
    assert d["interpolated"] == {"toward": str(new), "toward_fingerprint": fingerprint(new), "t": 0.25}
    assert d["parent"] == {"name": str(old), "fingerprint": fingerprint(old)} and d["fingerprint"] == fingerprint(r.out)
    assert r.to_dict() == {"out": str(r.out), "t": 0.25, **d}
    with pytest.raises(PortLLMError, match="--interpolate"):
        EvolveResult.read(tmp_path / "q")
    with pytest.raises(PortLLMError, match="has no portllm_lineage.json"):
        InterpolateResult.read(old)


def _cli(*args):
    e = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "portllm.cli", "evolve", *map(str, args)],
        capture_output=True,
        text=True,
        env=e,
        timeout=300,
    )


def test_evolve_interpolate_cli(pair, tmp_path):
    old, new = pair
    r = _cli("--base", old, "--interpolate", "0.5", "--toward", new, "--out", tmp_path / "h", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["t"] == 0.5 and d["out"] == str(tmp_path / "h") and d["fingerprint"] == fingerprint(tmp_path / "h")
    assert d["drift"]["q_proj"] > 0 and d["interpolated"]["toward_fingerprint"] == fingerprint(new)
    a, b, h = _weights(old), _weights(new), _weights(tmp_path / "h")
    assert all(torch.allclose(h[k], (a[k] + b[k]) / 2, atol=1e-6) for k in a)
    r = _cli("--base", old, "--interpolate", "2", "--toward", new, "--out", tmp_path / "x2")
    assert r.returncode == 0, r.stderr
    assert "relative drift" in r.stdout and "q_proj" in r.stdout and "interpolated" in r.stdout
    for args, msg in (
        (["--interpolate", "0.5"], "--interpolate T and --toward EVOLVED go together"),
        (["--toward", new], "--interpolate T and --toward EVOLVED go together"),
        (["--interpolate", "9", "--toward", new], "outside [-1, 4]"),
        (["--interpolate", "0.5", "--toward", new, "--out", tmp_path / "h"], "already exists"),
    ):
        r = _cli("--base", old, "--out", tmp_path / "bad", *args)
        lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
        assert r.returncode == 3 and len(lines) == 1 and msg in lines[0], r.stderr
    assert not (tmp_path / "bad").exists()
