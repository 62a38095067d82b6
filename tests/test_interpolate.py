"""θ(t) = θ + t·(θ' − θ): exact at the ends, linear in between, refused across architectures."""

import pytest
import torch
from safetensors.torch import load_file

import tiny
from portllm import PortLLMError
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
