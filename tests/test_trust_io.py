"""Trust in what is read and written: eval checks a patch before attaching it, outputs survive kill -9,
identity is a full content hash, quantized bases are refused, tied embeddings port as PEFT runs them."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from portllm import PortLLMError, check, fingerprint, import_adapter, port

ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "portllm.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        **kw,
    )


def one_line(r, code):
    assert r.returncode == code, r.stderr
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ---------------------------------------------------------------- eval --patch checks first (item 5)


def test_open_lm_checks_the_patch_before_loading(world, tmp_path, monkeypatch):
    from portllm import models
    from portllm.eval import open_lm

    wide = tiny.make_base(tmp_path / "wide", hidden=48)
    loaded = []
    monkeypatch.setattr(models, "load_base", lambda *a, **k: loaded.append(a) or (_ for _ in ()).throw(AssertionError))
    for patch in (world["patch"], world["adapter"]):  # a portllm patch, and a plain PEFT adapter (no manifest)
        with pytest.raises(PortLLMError, match="does not fit") as e:
            open_lm(wide, patch)
        assert "\n" not in str(e.value) and "targets:" in str(e.value)
    assert loaded == []
    monkeypatch.undo()
    lm = open_lm(world["new"], world["adapter"])  # a fitting plain adapter still attaches
    assert lm.patch == str(world["adapter"])


def test_eval_cli_refuses_a_patch_for_another_base(world, tmp_path):
    wide = tiny.make_base(tmp_path / "wide", hidden=48)
    data = tiny.sentiment_data(tmp_path / "data")
    r = cli("eval", "--model", wide, "--patch", world["patch"], "--tasks", "sst2", "--limit", "2", "--data-dir", data)
    line = one_line(r, 3)
    assert line.startswith("error:") and "does not fit" in line


# ---------------------------------------------------------------- kill-safe outputs (item 6)

KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from portllm.atomic import atomic_dir, owned_temp
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "weights").write_bytes(b"x" * 1000)
    owned_temp(Path(sys.argv[2])).write_text("hal")  # write_text_atomic cut off before its rename
    os.kill(os.getpid(), signal.SIGKILL)
"""

LIVE_WRITER = """
import sys, time
from portllm.atomic import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    print(tmp, flush=True)
    time.sleep(60)
"""


def test_sigkill_leftovers_are_removed_by_the_next_write(tmp_path):
    from portllm.atomic import atomic_dir, write_text_atomic

    out, note = tmp_path / "model", tmp_path / "note.json"
    r = subprocess.run([sys.executable, "-c", KILLED_WRITER, out, note], env=ENV, timeout=120)
    assert r.returncode == -signal.SIGKILL
    left = leftovers(tmp_path)
    assert [n.split(".tmp-")[0] for n in left] == [".model", ".note.json"], left
    assert not out.exists() and not note.exists()
    write_text_atomic(note, "{}")  # a small file's write removes its own name's stale temp files
    assert [n.split(".tmp-")[0] for n in leftovers(tmp_path)] == [".model"]
    with atomic_dir(out) as tmp:  # the next write of the output removes the dead writer's directory
        (tmp / "weights").write_text("ok")
    assert (out / "weights").read_text() == "ok" and note.read_text() == "{}"
    assert leftovers(tmp_path) == []


def test_live_writers_and_pid_reuse(tmp_path):
    from portllm.atomic import atomic_dir, owned_temp, sweep_stale

    child = subprocess.Popen([sys.executable, "-c", LIVE_WRITER, tmp_path / "other"], stdout=subprocess.PIPE, env=ENV)
    try:
        live = Path(child.stdout.readline().decode().strip())
        assert live.is_dir()
        # our own pid, but another start time: a process that has died and whose pid was reused
        reused = owned_temp(tmp_path / "model")
        start = reused.name.split("-")[3]
        reused = reused.with_name(reused.name.replace(f"-{start}-", f"-{int(start) + 1}-"))
        reused.mkdir()
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "w").write_text("1")
        assert live.is_dir(), "a live writer's temp directory was removed"
        assert not reused.exists()
    finally:
        child.kill()
        child.wait()
    sweep_stale(tmp_path)
    assert leftovers(tmp_path) == []


def test_cut_off_overwrite_restores_the_previous_output(tmp_path):
    from portllm.atomic import atomic_dir, owned_temp

    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "v").write_text("1")
    # killed between `out -> .old` and `.tmp -> out`: out is missing, the previous one waits under .old
    old = owned_temp(out, "old")
    old = old.with_name(old.name.replace(f"-{os.getpid()}-", "-999999999-"))
    new = owned_temp(out)
    new = new.with_name(new.name.replace(f"-{os.getpid()}-", "-999999999-"))
    os.rename(out, old)
    new.mkdir()
    with atomic_dir(tmp_path / "elsewhere") as tmp:  # any write in the parent directory repairs it
        (tmp / "x").write_text("x")
    assert (out / "v").read_text() == "1" and leftovers(tmp_path) == []


def _slow_base(root: Path) -> Path:
    """A base large and sharded enough that a port spends a while writing."""
    return tiny.make_base(root, vocab_size=4000, hidden=256, layers=6, max_shard_size="2MB")


def test_sigterm_during_port_leaves_nothing(tmp_path):
    base = _slow_base(tmp_path / "base")
    adapter = tiny.make_adapter(base, tmp_path / "ad")
    import_adapter(adapter, base, tmp_path / "patch")
    out_parent = tmp_path / "outs"
    out_parent.mkdir()
    out = out_parent / "ported"
    for _ in range(6):
        p = subprocess.Popen(
            [sys.executable, "-m", "portllm.cli", "port", tmp_path / "patch", "--base", base, "--out", out],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        deadline = time.monotonic() + 120
        while not any(".tmp-" in n for n in os.listdir(out_parent)) and p.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        p.send_signal(signal.SIGTERM)
        _, stderr = p.communicate(timeout=120)
        if p.returncode == 0:  # finished before the signal landed: try again
            shutil.rmtree(out)
            continue
        assert p.returncode == 130, stderr
        assert [x for x in stderr.splitlines() if x.strip()] in ([], ["interrupted"]), stderr  # no traceback
        assert os.listdir(out_parent) == []
        return
    pytest.fail("the port always finished before SIGTERM landed")


# ---------------------------------------------------------------- full content hash (item 7)


def _edit_one_element(src: Path, dst: Path) -> Path:
    """A copy of `src` differing in one element that the sampled fingerprint does not read."""
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    w = load_file(f)
    name = max(w, key=lambda k: w[k].numel())  # the largest tensor is sampled, not hashed whole
    flat = w[name].reshape(-1)
    step = (flat.numel() * 4 - 256) // 63
    i = (step // 2) // 4  # halfway between two 256-byte samples
    flat[i] += 1.0
    save_file(w, f, metadata={"format": "pt"})
    return dst


def test_content_hash_sees_what_the_fingerprint_samples_miss(tmp_path):
    from portllm.models import base_info, content_sha256

    a = tiny.make_base(tmp_path / "a", vocab_size=1200)  # embedding 1200x32 fp32 = 150 KiB: sampled
    b = _edit_one_element(a, tmp_path / "b")
    assert fingerprint(a) == fingerprint(b)
    assert content_sha256(a) != content_sha256(b)
    assert content_sha256(a).startswith("sha256:")
    assert base_info(b).content_sha256 == content_sha256(b)
    # independent of sharding, like the fingerprint
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(a).save_pretrained(tmp_path / "resharded", max_shard_size="60KB")
    assert len(list((tmp_path / "resharded").glob("*.safetensors"))) > 1
    assert content_sha256(tmp_path / "resharded") == content_sha256(a)


def test_content_hash_is_cached_by_file_stat(tmp_path, monkeypatch):
    from portllm import models

    a = tiny.make_base(tmp_path / "a", vocab_size=1200)
    f = a / "model.safetensors"
    past = time.time_ns() - 3600 * 10**9
    os.utime(f, ns=(past, past))  # settled: not written in the last seconds
    reads = []
    real = models._hash_tensors
    monkeypatch.setattr(models, "_hash_tensors", lambda *x: reads.append(x[0]) or real(*x))
    h = models.content_sha256(a)
    assert len(reads) == 1
    assert models.content_sha256(a) == h and len(reads) == 1  # second call: a stat, no read
    assert (models.cache_root() / "hashes.json").is_file()
    os.utime(f, ns=(past + 10**9, past + 10**9))  # touched: read again
    assert models.content_sha256(a) == h and len(reads) == 2


def test_gguf_export_is_keyed_by_the_full_file_hash(tmp_path, monkeypatch):
    from portllm import models

    g = tmp_path / "m.gguf"
    g.write_bytes(os.urandom(3 << 20))
    past = time.time_ns() - 3600 * 10**9
    os.utime(g, ns=(past, past))
    key = models._gguf_key(g)
    with open(g, "r+b") as fh:  # change one byte in the middle: first and last MiB unchanged
        fh.seek(3 << 19)
        b = fh.read(1)
        fh.seek(3 << 19)
        fh.write(bytes([b[0] ^ 1]))
    os.utime(g, ns=(past + 10**9, past + 10**9))
    assert models._gguf_key(g) != key
    reads = []
    real = models.sha256_file
    monkeypatch.setattr(models, "sha256_file", lambda p: reads.append(p) or real(p))
    models._gguf_key(g)
    assert reads == []  # cached: a stat


def test_port_provenance_records_full_hashes(world, tmp_path):
    from portllm.models import content_sha256

    port(world["patch"], world["new"], tmp_path / "out")
    prov = json.loads((tmp_path / "out" / "portllm_provenance.json").read_text())
    assert prov["base"]["content_sha256"] == content_sha256(world["new"])
    assert "result_content_sha256" not in prov  # the output is hashed on its first use (tests/test_port.py)
    assert prov["result_fingerprint"] == fingerprint(tmp_path / "out")


# ---------------------------------------------------------------- quantized bases (item 9)


def _quantized(src: Path, dst: Path, dtype: str) -> Path:
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    w = load_file(f)
    for name in [k for k in w if k.endswith("q_proj.weight")]:
        x = w[name]
        scale = x.abs().amax(dim=1, keepdim=True) / 127
        if dtype == "I8":
            w[name] = torch.round(x / scale).to(torch.int8)
            w[name.replace(".weight", ".weight_scale")] = scale.squeeze(1)
        else:
            w[name] = (x / scale).to(torch.float8_e4m3fn)
            w[name + "_scale_inv"] = scale
    save_file(w, f, metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("dtype", ["I8", "F8_E4M3"])
def test_quantized_weights_refused(world, tmp_path, dtype):
    q = _quantized(world["new"], tmp_path / "q", dtype)
    rep = check(world["patch"], q)
    assert rep.verdict == "incompatible"
    assert rep.first_error().startswith("quantization:") and "dequantize" in rep.first_error()
    for force in (False, True):
        with pytest.raises(PortLLMError, match="quantiz"):
            port(world["patch"], q, tmp_path / "out", force=force)
    assert not (tmp_path / "out").exists()
    # attaching at runtime never touches the quantized values: a re-stamped adapter is fine
    assert port(world["patch"], q, tmp_path / "adapter", as_adapter=True).mode == "adapter"


def test_quantization_config_refused(world, tmp_path):
    q = shutil.copytree(world["new"], tmp_path / "q")
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (q / "config.json").write_text(json.dumps(cfg))
    rep = check(world["patch"], q)
    assert rep.verdict == "incompatible" and "fp8" in rep.first_error()
    line = one_line(cli("port", world["patch"], "--base", q, "--out", tmp_path / "o"), 3)
    assert "quantiz" in line and not (tmp_path / "o").exists()


def test_port_never_adds_to_integer_tensors(world, tmp_path, monkeypatch):
    """Even past check (a forced or future path), the merge refuses to add ΔW to a non-float tensor."""
    import importlib

    q = _quantized(world["new"], tmp_path / "q", "I8")
    rep = check(world["patch"], q)
    rep.findings = [f for f in rep.findings if f.topic != "quantization"]
    monkeypatch.setattr(importlib.import_module("portllm.check"), "check", lambda *a, **k: rep)
    with pytest.raises(PortLLMError, match="I8"):
        port(world["patch"], q, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- tied embeddings (item 2)


def _tied_base(root: Path, shard: str | None = None) -> Path:
    """A Llama whose head is its input embedding (tiny.tiny_config fixes tie_word_embeddings=False)."""
    from transformers import LlamaForCausalLM

    cfg = tiny.tiny_config()
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root, **({"max_shard_size": shard} if shard else {}))
    tiny.make_tokenizer(cfg.vocab_size).save_pretrained(root)
    assert "lm_head.weight" not in {k for f in root.glob("*.safetensors") for k in load_file(f)}
    return root


def _adapter_with_saved(base: Path, out: Path, module: str) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    pm = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, modules_to_save=[module]),
    )
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p))
    pm.save_pretrained(out)
    return out


@pytest.mark.parametrize("shard", [None, "40KB"])
@pytest.mark.parametrize("module", ["embed_tokens", "lm_head"])
def test_tied_base_modules_to_save_ports_as_peft_runs_it(tmp_path, module, shard):
    """PEFT wraps one of the two tied modules: at runtime only that one changes. The merged port is
    written untied (both tensors, tie_word_embeddings false) so it computes the same."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from portllm.eval import open_lm
    from portllm.models import content_sha256

    base = _tied_base(tmp_path / "tied", shard)
    ad = _adapter_with_saved(base, tmp_path / "ad", module)
    import_adapter(ad, base, tmp_path / "p")
    res = port(tmp_path / "p", base, tmp_path / "out")
    assert res.replaced == 1
    ids = torch.randint(4, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    runtime = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), ad).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        want, got = runtime(ids).logits, merged(ids).logits
    assert (want - got).abs().max() < 2e-4
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    tied_again = plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    assert tied_again and merged.lm_head.weight.data_ptr() != merged.model.embed_tokens.weight.data_ptr()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    prov = json.loads((tmp_path / "out" / "portllm_provenance.json").read_text())
    assert prov["untied"] == {"embedding": "model.embed_tokens.weight", "head": "lm_head.weight"}
    assert prov["base"]["content_sha256"] == content_sha256(base)
    # eval's runtime attach of the patch agrees too
    lm = open_lm(base, tmp_path / "p")
    with torch.no_grad():
        assert (lm.model(ids).logits - want).abs().max() < 2e-4
