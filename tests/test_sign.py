"""Signed patches: ML-DSA-65 key pairs, sign and verify, tampering, trust, and signature-gated ports."""

import base64
import hashlib
import json
import shutil
import stat
import sys
from unittest import mock

import pytest

from portllm import Patch, PortLLMError, port
from portllm.sign import (
    CONTEXT,
    SIGNATURE,
    SignatureError,
    canonical_manifest,
    check_signature,
    keygen,
    load_public_key,
    sign_patch,
    verify_patch,
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return {"alice": keygen(d / "alice"), "bob": keygen(d / "bob")}


@pytest.fixture
def signed(world, keys, tmp_path):
    p = tmp_path / "signed"
    shutil.copytree(world["patch"], p)
    sign_patch(p, keys["alice"].private)
    return p


def cli(capsys, monkeypatch, *args):
    """`portllm ARGS` in this process: exit code, stdout, stderr."""
    from portllm.cli import main

    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with mock.patch.object(sys, "argv", ["portllm", *map(str, args)]), pytest.raises(SystemExit) as e:
        main()
    o = capsys.readouterr()
    return e.value.code, o.out, o.err


def one_line(text):
    lines = [x for x in text.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def test_keygen_modes_atomic_and_no_clobber(tmp_path):
    kp = keygen(tmp_path / "k")
    assert (kp.private, kp.public) == (tmp_path / "k.key", tmp_path / "k.pub")
    assert stat.S_IMODE(kp.private.stat().st_mode) == 0o600
    assert stat.S_IMODE(kp.public.stat().st_mode) & 0o400  # the public key is an ordinary file
    assert b"PRIVATE KEY" in kp.private.read_bytes() and b"PUBLIC KEY" in kp.public.read_bytes()
    raw = load_public_key(kp.public).public_bytes_raw()
    assert len(raw) == 1952 and kp.fingerprint == hashlib.sha256(raw).hexdigest()
    before = (kp.private.read_bytes(), kp.public.read_bytes())
    with pytest.raises(PortLLMError, match="already exists.*--overwrite"):
        keygen(tmp_path / "k")
    assert (kp.private.read_bytes(), kp.public.read_bytes()) == before
    again = keygen(tmp_path / "k", overwrite=True)
    assert again.fingerprint != kp.fingerprint and stat.S_IMODE(again.private.stat().st_mode) == 0o600
    (tmp_path / "half.pub").write_text("someone else's")  # either file present: nothing is written
    with pytest.raises(PortLLMError, match=r"half\.pub already exists"):
        keygen(tmp_path / "half")
    assert not (tmp_path / "half.key").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half.pub", "k.key", "k.pub"]  # no temp files left


def test_sign_verify_round_trip(world, keys, signed):
    alice = keys["alice"]
    assert (signed / "portllm.json").read_bytes() == (world["patch"] / "portllm.json").read_bytes()  # untouched
    Patch.load(signed)  # the checksums still hold
    sig = json.loads((signed / SIGNATURE).read_text())
    assert sig["algorithm"] == "ML-DSA-65" and sig["key_fingerprint"] == alice.fingerprint
    payload = canonical_manifest(json.loads((signed / "portllm.json").read_text()))
    assert b" " not in payload.split(b'"created"')[0] and payload.startswith(b'{"base":')  # sorted, no whitespace
    assert sig["manifest_sha256"] == hashlib.sha256(payload).hexdigest()
    # anyone can check it with the public key and any FIPS 204 implementation: here cryptography's directly
    load_public_key(alice.public).verify(base64.b64decode(sig["signature"]), payload, CONTEXT.encode())

    v = check_signature(signed, [keys["bob"].public, alice.public])
    assert v.valid and v.code == "valid" and v.exit_code == 0 and v.key == str(alice.public)
    assert set(v.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert verify_patch(signed, [alice.public]).valid


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_json(path, **changes):
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes), indent=2))


def _flip_signature(path):
    sig = json.loads(path.read_text())
    raw = bytearray(base64.b64decode(sig["signature"]))
    raw[100] ^= 0x01
    _edit_json(path, signature=base64.b64encode(bytes(raw)).decode())


TAMPER = {
    "adapter_model.safetensors": lambda p: _flip_byte(p, p.stat().st_size - 3),
    "adapter_config.json": lambda p: _edit_json(p, lora_alpha=64),
    "portllm.json": lambda p: _edit_json(p, task="something else"),
    SIGNATURE: _flip_signature,
}


def test_tampering_with_any_file_fails_with_its_own_reason(keys, signed, tmp_path):
    reasons = {}
    for name, tamper in TAMPER.items():
        d = tmp_path / name.replace(".", "_")
        shutil.copytree(signed, d)
        tamper(d / name)
        v = check_signature(d, [keys["alice"].public])
        assert not v.valid and v.exit_code == 2, name
        reasons[name] = (v.code, v.reason)
    assert reasons["adapter_model.safetensors"][0] == reasons["adapter_config.json"][0] == "file-modified"
    assert "adapter_model.safetensors was modified" in reasons["adapter_model.safetensors"][1]
    assert "adapter_config.json was modified" in reasons["adapter_config.json"][1]
    assert reasons["portllm.json"][0] == "manifest-modified"
    assert reasons[SIGNATURE][0] == "bad-signature"
    assert len({r for _, r in reasons.values()}) == 4
    assert all("\n" not in r for _, r in reasons.values())
    # re-pointing the manifest at the altered weights does not help: the manifest is what is signed
    d = tmp_path / "relisted"
    shutil.copytree(signed, d)
    TAMPER["adapter_model.safetensors"](d / "adapter_model.safetensors")
    files = json.loads((d / "portllm.json").read_text())["files"]
    from portllm.patch import sha256_file

    _edit_json(
        d / "portllm.json",
        files=dict(files, **{"adapter_model.safetensors": sha256_file(d / "adapter_model.safetensors")}),
    )
    assert check_signature(d, [keys["alice"].public]).code == "manifest-modified"


def test_untrusted_unsigned_and_bad_inputs(world, keys, signed):
    v = check_signature(signed, [keys["bob"].public])
    assert v.code == "untrusted-key" and keys["alice"].fingerprint[:16] in v.reason
    assert check_signature(world["patch"], [keys["alice"].public]).code == "unsigned"
    with pytest.raises(SignatureError, match="refusing patch .*unsigned") as e:
        verify_patch(world["patch"], [keys["alice"].public])
    assert "\n" not in str(e.value)
    with pytest.raises(PortLLMError, match="no trusted public key"):
        check_signature(signed, [])
    with pytest.raises(PortLLMError, match="is a private key"):
        check_signature(signed, [keys["alice"].private])
    with pytest.raises(PortLLMError, match="is a public key"):
        sign_patch(signed, keys["alice"].public)
    (signed / SIGNATURE).write_text("{not json")
    assert check_signature(signed, [keys["alice"].public]).code == "malformed-signature"


def test_port_require_signature_refuses_before_reading_and_writes_nothing(world, keys, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    with mock.patch("portllm.patch.read_adapter", side_effect=AssertionError("a tensor was read")):
        with pytest.raises(SignatureError, match="unsigned"):
            port(world["patch"], world["new"], out, require_signature=True, trusted=[keys["alice"].public])
    assert not out.exists() and list(tmp_path.iterdir()) == []
    args = ["port", world["patch"], "--base", world["new"], "--out", out, "--require-signature"]
    rc, _, stderr = cli(capsys, monkeypatch, *args, "--trust", keys["alice"].public)
    assert rc == 3 and "unsigned" in one_line(stderr) and one_line(stderr).startswith("error:")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    rc, _, stderr = cli(capsys, monkeypatch, *args)
    assert rc == 3 and "--trust" in one_line(stderr) and not out.exists()


def test_signed_port_as_adapter_keeps_source_signature_and_can_be_signed_anew(world, keys, signed, tmp_path):
    alice, bob = keys["alice"], keys["bob"]
    source_sig = json.loads((signed / SIGNATURE).read_text())
    res = port(signed, world["new"], tmp_path / "re", as_adapter=True, require_signature=True, trusted=[alice.public])
    assert res.verification.valid and res.to_dict()["signature"]["key_fingerprint"] == alice.fingerprint
    re = Patch.load(tmp_path / "re")
    record = re.manifest.lineage[-1]["signature"]
    assert record["key_fingerprint"] == alice.fingerprint and record["signature"] == source_sig["signature"]
    assert record["algorithm"] == "ML-DSA-65" and record["verified"] is True
    assert check_signature(tmp_path / "re", [alice.public]).code == "unsigned"  # a new manifest, not yet signed
    sign_patch(tmp_path / "re", bob.private)
    assert check_signature(tmp_path / "re", [bob.public]).valid
    assert Patch.load(tmp_path / "re").manifest.lineage[-1]["signature"]["key_fingerprint"] == alice.fingerprint
    # a merged port keeps it in its provenance; an unverified one says so
    port(signed, world["new"], tmp_path / "merged")
    prov = json.loads((tmp_path / "merged" / "portllm_provenance.json").read_text())
    assert prov["port"]["signature"]["key_fingerprint"] == alice.fingerprint
    assert prov["port"]["signature"]["verified"] is False


def test_cli_keygen_sign_verify(world, tmp_path, capsys, monkeypatch):
    rc, stdout, _ = cli(capsys, monkeypatch, "keygen", tmp_path / "me")
    assert rc == 0 and "fingerprint" in stdout and stat.S_IMODE((tmp_path / "me.key").stat().st_mode) == 0o600
    rc, _, stderr = cli(capsys, monkeypatch, "keygen", tmp_path / "me")
    assert rc == 3 and "--overwrite" in one_line(stderr)
    cli(capsys, monkeypatch, "keygen", tmp_path / "other")
    patch = tmp_path / "patch"
    shutil.copytree(world["patch"], patch)
    rc, stdout, _ = cli(capsys, monkeypatch, "sign", patch, "--key", tmp_path / "me.key")
    assert rc == 0 and "ML-DSA-65" in stdout and (patch / SIGNATURE).is_file()
    rc, stdout, _ = cli(capsys, monkeypatch, "verify", patch, "--trust", tmp_path / "me.pub")
    assert rc == 0 and one_line(stdout).startswith("valid: signed by")
    rc, stdout, _ = cli(capsys, monkeypatch, "verify", patch, "--trust", tmp_path / "other.pub")
    assert rc == 2 and one_line(stdout).startswith("invalid: signed by key")
    rc, stdout, _ = cli(capsys, monkeypatch, "verify", world["patch"], "--trust", tmp_path / "me.pub", "--json")
    assert rc == 2 and json.loads(stdout)["code"] == "unsigned"
    trust = ["--trust", tmp_path / "other.pub", "--trust", tmp_path / "me.pub"]
    rc, _, stderr = cli(
        capsys,
        monkeypatch,
        "port",
        patch,
        "--base",
        world["new"],
        "--out",
        tmp_path / "ok",
        "--require-signature",
        *trust,
    )
    assert rc == 0 and "signature" in stderr and (tmp_path / "ok" / "config.json").is_file()


def test_merge_and_open_lm_hooks_refuse_before_reading(world, keys, signed):
    from portllm.eval import open_lm
    from portllm.merge import merge

    alice = [keys["alice"].public]
    with mock.patch("portllm.patch.read_adapter", side_effect=AssertionError("a tensor was read")):
        with pytest.raises(SignatureError, match=f"refusing patch {world['patch']}: the patch is unsigned"):
            merge([signed, world["patch"]], "linear", require_signature=True, trusted=alice)
    merged, _ = merge([signed, signed], "linear", require_signature=True, trusted=alice)
    assert set(merged.modules) == set(Patch.load(signed).modules)
    with mock.patch("portllm.models.load_base", side_effect=AssertionError("the base was read")):
        with pytest.raises(SignatureError, match="untrusted|not among"):
            open_lm(world["new"], signed, require_signature=True, trusted=[keys["bob"].public])
    assert open_lm(world["new"], signed, require_signature=True, trusted=alice).patch == str(signed)
