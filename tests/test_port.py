import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import tiny
from portllm import Patch, PortLLMError, check, fingerprint, port
from portllm.models import weight_index


def _weights(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _peft_merged(base, adapter, dtype=torch.float32):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter)
    return model.merge_and_unload()


def test_port_equals_peft_merge_and_unload(world, tmp_path):
    res = port(world["patch"], world["new"], tmp_path / "ported")
    assert res.applied == 14 and res.mode == "merged"
    ours = _weights(tmp_path / "ported")
    ref = _peft_merged(world["new"], world["adapter"]).state_dict()
    assert set(ours) == set(ref)
    worst = max(float((ours[k] - ref[k]).abs().max()) for k in ours)
    assert worst <= 1e-6
    # the update really changed the targeted matrices, and only those
    base = _weights(world["new"])
    changed = {k for k in ours if not torch.equal(ours[k], base[k])}
    assert changed == {f"{m}.weight" for m in Patch.load(world["patch"]).modules}


def test_ported_model_loads_and_matches_runtime_attach(world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    port(world["patch"], world["new"], tmp_path / "merged")
    port(world["patch"], world["new"], tmp_path / "adapter", as_adapter=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    attached = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(world["new"]), tmp_path / "adapter"
    ).eval()
    ids = torch.randint(4, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = merged(ids).logits, attached(ids).logits
    assert (a - b).abs().max() < 2e-4  # fp32: (W+ΔW)x and Wx+ΔWx round apart; a wrong scaling is ~1e-2
    plain = AutoModelForCausalLM.from_pretrained(world["new"]).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits, a, atol=1e-3)  # the patch does something


def test_as_adapter_restamps_manifest_and_lineage(world, tmp_path):
    port(world["patch"], world["new"], tmp_path / "re", as_adapter=True, scale=0.5)
    p = Patch.load(tmp_path / "re")
    src = Patch.load(world["patch"])
    assert p.source_fingerprint == fingerprint(world["new"]) != src.source_fingerprint
    assert [e["event"] for e in p.manifest.lineage] == ["imported", "ported"]
    assert p.manifest.lineage[-1]["from"]["fingerprint"] == src.source_fingerprint
    m, m0 = next(iter(p.modules.values())), next(iter(src.modules.values()))
    assert torch.allclose(m.delta(), 0.5 * m0.delta(), atol=1e-7)
    # a re-stamped patch now checks clean against its new base
    assert check(p, world["new"]).verdict == "compatible"


@pytest.mark.parametrize("scale", [0.0, 2.0])
def test_scale(world, tmp_path, scale):
    port(world["patch"], world["new"], tmp_path / "s", scale=scale)
    ours, base = _weights(tmp_path / "s"), _weights(world["new"])
    p = Patch.load(world["patch"])
    for m in p.modules.values():
        assert torch.allclose(ours[m.weight_name], base[m.weight_name] + scale * m.delta(), atol=1e-6)


BF16_ULP = 2.0**-7  # bf16 keeps 8 significant bits: neighbouring values are 2^-7 to 2^-8 apart, relative


def test_sharded_bf16_base_equals_peft_merge(world, tmp_path):
    """On a bf16 base the port equals PEFT's own merge_and_unload in bf16, value for value.

    PEFT (CPU) computes ΔW = B·A·scaling in fp32 (its factors are kept in fp32) and adds it to the bf16 weight:
    one rounding of the fp32 sum, as the port does. Where the two differ at all it can only be by the order of
    fp32 operations (a product and a sum), which can move a value across a bf16 rounding boundary: at most one
    bf16 step, and rarely. A port that rounded twice (ΔW to bf16 first), truncated, or added the wrong ΔW differs
    on a large share of the elements, or by far more than a step.
    """
    base = tiny.make_base(tmp_path / "sharded", seed=0, dtype=torch.bfloat16, max_shard_size="40KB")
    assert (base / "model.safetensors.index.json").is_file()
    port(world["patch"], base, tmp_path / "out", force=False)
    out = tmp_path / "out"
    assert sorted(f.name for f in out.glob("*.safetensors")) == sorted(f.name for f in base.glob("*.safetensors"))
    ours, before = _weights(out), _weights(base)
    ref = _peft_merged(base, world["adapter"], dtype=torch.bfloat16).state_dict()
    assert set(ours) == set(ref)
    modules = {m.weight_name for m in Patch.load(world["patch"]).modules.values()}
    for k, w in ours.items():
        assert w.dtype == ref[k].dtype == torch.bfloat16, k
        if k not in modules:
            assert torch.equal(w, ref[k]), k
            continue
        assert not torch.equal(w, before[k]), k  # the update is large enough to show in bf16
        a, b = w.float(), ref[k].float()
        step = BF16_ULP * torch.maximum(a.abs(), b.abs())
        assert bool(((a - b).abs() <= step).all()), k
        assert float((a != b).float().mean()) <= 0.01, k  # fp32-order ties only, not a different rounding
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # transformers loads the sharded result
    prov = json.loads((out / "portllm_provenance.json").read_text())
    assert prov["result_fingerprint"] == fingerprint(out)
    assert prov["port"]["base"]["fingerprint"] == fingerprint(base)


def _recomputed_content_sha256(d):
    """The output's content hash from its files' bytes, by the documented rule, with no portllm code or cache:
    sha256 over the tensors in name order of (name, dtype, shape, sha256 of the tensor's bytes)."""
    rows = {}
    for f in sorted(d.glob("*.safetensors")):
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        header.pop("__metadata__", None)
        for name, spec in header.items():
            a, b = spec["data_offsets"]
            digest = hashlib.sha256(raw[8 + n + a : 8 + n + b]).hexdigest()
            rows[name] = f"{name}|{spec['dtype']}|{spec['shape']}|{digest}\n"
    h = hashlib.sha256(b"portllm-sha1")
    for name in sorted(rows):
        h.update(rows[name].encode())
    return "sha256:" + h.hexdigest()


def test_output_hashed_on_first_use_to_the_files_own_sha256(world, tmp_path, monkeypatch):
    """A port does not hash its output (a second pass over every byte); the first `content_sha256` of the output
    does, and gets the written bytes' own hash by the documented rule (what the port used to record), then finds
    it in the cache. The provenance records what determines the output: the base's content sha256 and
    fingerprint, the patch's file hashes, the scale, and the output's sampled fingerprint."""
    from portllm import models
    from portllm.models import content_sha256

    base = tiny.make_base(tmp_path / "sharded", seed=0, dtype=torch.bfloat16, max_shard_size="40KB")
    monkeypatch.setenv("PORTLLM_CACHE", str(tmp_path / "cache"))
    hashed = []  # the directory of each file hashed: the check hashes the base ("sharded"), nothing else may be
    real = models._hash_tensors
    monkeypatch.setattr(models, "_hash_tensors", lambda f, infos: hashed.append(f.parent.name) or real(f, infos))
    res = port(world["patch"], base, tmp_path / "out", scale=0.5)
    assert set(hashed) == {"sharded"}
    hashed.clear()
    prov = json.loads((tmp_path / "out" / "portllm_provenance.json").read_text())
    assert "result_content_sha256" not in prov
    assert prov["base"]["content_sha256"] == _recomputed_content_sha256(base)
    assert prov["base"]["fingerprint"] == fingerprint(base) and prov["port"]["scale"] == 0.5
    files = prov["patch"]["files"]
    assert files and all(hashlib.sha256((world["patch"] / n).read_bytes()).hexdigest() == h for n, h in files.items())
    assert prov["result_fingerprint"] == res.result_fingerprint == fingerprint(tmp_path / "out")
    truth = _recomputed_content_sha256(tmp_path / "out")
    assert content_sha256(tmp_path / "out") == truth  # first use: every output shard read and hashed
    assert sorted(hashed) == ["out"] * len(list((tmp_path / "out").glob("*.safetensors")))
    hashed.clear()
    monkeypatch.setattr(models._HashCache, "SETTLED_NS", 0)  # files written a moment ago may be remembered
    content_sha256(tmp_path / "out")
    hashed.clear()
    assert content_sha256(tmp_path / "out") == truth and hashed == []  # later uses: the cache


def test_every_output_file_is_on_disk_before_the_rename(world, tmp_path, monkeypatch):
    """The output is renamed into place only after each of its files (shards, config, tokenizer, index,
    provenance) and its directory is fsynced: a power cut after the rename cannot leave an empty file."""
    base = tiny.make_base(tmp_path / "sharded", seed=0, dtype=torch.bfloat16, max_shard_size="40KB")
    synced, renamed = [], []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(a, b):
        renamed.append(len(synced))
        return real_rename(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    port(world["patch"], base, tmp_path / "out")
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(renamed) == 1 and "portllm_provenance.json" in written and "config.json" in written
    before = set(synced[: renamed[0]])
    assert set(written) <= before
    assert any(n.startswith(".out.tmp-") for n in before)  # the directory itself


def test_fingerprint_content_derived(world, tmp_path):
    a = fingerprint(world["old"])
    assert a == fingerprint(world["old"]) and a.startswith("fp1:")
    assert a != fingerprint(world["new"])
    # same weights, other sharding -> same fingerprint
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(world["old"]).save_pretrained(tmp_path / "resharded", max_shard_size="30KB")
    shutil.copy(world["old"] / "config.json", tmp_path / "resharded" / "config.json")
    assert len(list((tmp_path / "resharded").glob("*.safetensors"))) > 1
    assert fingerprint(tmp_path / "resharded") == a


def test_output_exists_refused_unless_overwrite(world, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    with pytest.raises(PortLLMError, match="already exists"):
        port(world["patch"], world["new"], tmp_path / "o")
    assert (tmp_path / "o" / "keep.txt").is_file()
    port(world["patch"], world["new"], tmp_path / "o", overwrite=True)
    assert not (tmp_path / "o" / "keep.txt").exists() and (tmp_path / "o" / "config.json").is_file()


def test_disk_full_leaves_nothing(world, tmp_path, monkeypatch):
    import errno

    from portllm import stream

    def full(*a):  # the shard's bytes are copied in the kernel: where a full disk shows
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stream, "_copy_range", full)
    with pytest.raises(PortLLMError, match="disk full"):
        port(world["patch"], world["new"], tmp_path / "full")
    assert list(tmp_path.iterdir()) == []  # no output, no temp directory


@pytest.mark.parametrize("where", ["copy", "update"])
def test_interrupted_write_leaves_nothing(world, tmp_path, monkeypatch, where):
    """Ctrl-C while the writer thread copies, or while the loop updates a tensor in place (mapped)."""
    import importlib

    from portllm import stream

    port_mod = importlib.import_module("portllm.port")  # the module: `portllm.port` names the function

    def interrupt(*a):
        raise KeyboardInterrupt

    if where == "copy":
        monkeypatch.setattr(stream, "_copy_range", interrupt)
    else:
        monkeypatch.setattr(port_mod._Update, "__call__", interrupt)
    with pytest.raises(KeyboardInterrupt):
        port(world["patch"], world["new"], tmp_path / "int")
    assert list(tmp_path.iterdir()) == []


def test_incompatible_refused_and_force_only_when_shapes_fit(world, tmp_path):
    other = tiny.make_base(tmp_path / "wide", hidden=48)
    with pytest.raises(PortLLMError, match="refusing to port.*(absent|expects)"):
        port(world["patch"], other, tmp_path / "x")
    with pytest.raises(PortLLMError, match="even with --force"):
        port(world["patch"], other, tmp_path / "x", force=True)
    assert not (tmp_path / "x").exists()
    # vocabulary grew but shapes of the patched matrices still fit: a warning, and the port goes ahead
    bigger = tiny.make_base(tmp_path / "bigvocab", vocab_size=128)
    res = port(world["patch"], bigger, tmp_path / "y")
    assert res.report.verdict == "compatible with warnings"
    assert weight_index(tmp_path / "y")


def test_streaming_port_reads_by_tensor(world, tmp_path, monkeypatch):
    """The merged port never asks safetensors to load a whole file."""
    import safetensors.torch as st

    def boom(*a, **k):
        raise AssertionError("whole-file load during port")

    patch = Patch.load(world["patch"])  # the (small) patch itself is loaded before the guard
    monkeypatch.setattr(st, "load_file", boom)
    monkeypatch.setattr(st, "safe_open", boom, raising=False)
    port(patch, world["new"], tmp_path / "z")
    assert os.path.isdir(tmp_path / "z")


def test_port_resolves_a_hub_spec_once(world, tmp_path, monkeypatch):
    """check, the merge and the provenance share one resolution: a hub id is fetched once per port."""
    from portllm import import_adapter, models

    calls = []

    def snapshot(repo_id):
        calls.append(repo_id)
        return world["new"]

    monkeypatch.setattr(models, "_hub_snapshot", snapshot)
    res = port(world["patch"], "someorg/theta-v2", tmp_path / "merged")
    assert calls == ["someorg/theta-v2"] and res.applied == 14
    prov = json.loads((tmp_path / "merged" / "portllm_provenance.json").read_text())
    assert prov["port"]["base"] == {"name": "someorg/theta-v2", "fingerprint": fingerprint(world["new"])}
    assert prov["base"]["name"] == "someorg/theta-v2" and prov["patch"]["task"] == "toy"
    calls.clear()
    port(world["patch"], "someorg/theta-v2", tmp_path / "adapter", as_adapter=True)
    assert calls == ["someorg/theta-v2"]
    assert Patch.load(tmp_path / "adapter").source_name == "someorg/theta-v2"
    calls.clear()
    p = import_adapter(world["adapter"], "someorg/theta-v2", tmp_path / "imported")
    assert calls == ["someorg/theta-v2"] and p.path == tmp_path / "imported"
    assert (
        p.source_fingerprint == fingerprint(world["new"]) and p.config["base_model_name_or_path"] == "someorg/theta-v2"
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_in_place_port_gives_the_bytes_of_read_update_write(world, tmp_path, monkeypatch, dtype):
    """Every byte of the base's tensors is copied in the kernel (copy_file_range, as cp does) and the patched
    tensors are updated in place, mapped; the shards are byte for byte those of the read-update-write path, with
    the update on the mapped bytes or on an aligned copy, and with the copy in user space where copy_file_range
    cannot span the two files. Tensors the patch leaves alone are the base's own bytes."""
    import errno
    import importlib

    port_mod = importlib.import_module("portllm.port")
    base = tiny.make_base(tmp_path / "sharded", seed=0, dtype=dtype, max_shard_size="40KB")
    copied = []
    real = os.copy_file_range

    def spy(src, dst, count, *offsets):
        copied.append(count)
        return real(src, dst, count, *offsets)

    monkeypatch.setattr(os, "copy_file_range", spy)
    port(world["patch"], base, tmp_path / "kernel")
    maps = open("/proc/self/maps").read()
    assert str(tmp_path) not in maps  # every mapped tensor was let go
    base_w, kernel_w = _weights(base), _weights(tmp_path / "kernel")
    patched = {m.weight_name for m in Patch.load(world["patch"]).modules.values()}
    assert sum(copied) == sum(w.numel() * w.element_size() for w in base_w.values())
    assert all(torch.equal(kernel_w[k], base_w[k]) for k in base_w if k not in patched)
    assert all(not torch.equal(kernel_w[k], base_w[k]) for k in patched)
    monkeypatch.undo()

    def read_update_write(self):
        for f, h in zip(self.copy.files, self.copy.headers):
            self.rewrite(f, h)

    def cross_device(src, dst, count, *offsets):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    variants = {
        "mapped": lambda: monkeypatch.setattr(port_mod._Merge, "ALIGN", 1),
        "copy": lambda: monkeypatch.setattr(port_mod._Merge, "ALIGN", 1 << 40),
        "read": lambda: monkeypatch.setattr(port_mod._Merge, "run", read_update_write),
        "user": lambda: monkeypatch.setattr(os, "copy_file_range", cross_device),
    }
    shards = sorted(p.name for p in (tmp_path / "kernel").glob("*.safetensors"))
    assert len(shards) > 1
    for name, setup in variants.items():
        setup()
        port(world["patch"], base, tmp_path / name)
        monkeypatch.undo()
        assert sorted(p.name for p in (tmp_path / name).glob("*.safetensors")) == shards, name
        for shard in shards:
            assert (tmp_path / "kernel" / shard).read_bytes() == (tmp_path / name / shard).read_bytes(), name


def test_each_run_goes_to_disk_as_soon_as_it_is_final(world, tmp_path, monkeypatch):
    """Every byte range of every shard is handed to the disk (writeback started) once its run is updated, before
    the shard's fsync, so the fsync waits only for what the disk has not yet taken; the bytes are unchanged."""
    import importlib

    from portllm import stream

    port_mod = importlib.import_module("portllm.port")
    base = tiny.make_base(tmp_path / "sharded", seed=0, dtype=torch.bfloat16, max_shard_size="40KB")
    monkeypatch.setattr(port_mod.BaseCopy, "RUN", 4096)  # several runs per shard
    events = []
    real_wb, real_fsync = stream.start_writeback, os.fsync

    def start_writeback(fd, start, n):
        events.append(("wb", os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), start, start + n))
        return real_wb(fd, start, n)

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    monkeypatch.setattr(stream, "start_writeback", start_writeback)
    monkeypatch.setattr(os, "fsync", fsync)
    port(world["patch"], base, tmp_path / "out")
    monkeypatch.undo()
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 1
    for shard in shards:
        f = tmp_path / "out" / shard
        data_start = 8 + int.from_bytes(f.read_bytes()[:8], "little")
        mine = [e for e in events if e[1] == shard]
        synced = mine.index(("fsync", shard))
        ranges = sorted((a, b) for kind, _, a, b in (e for e in mine[:synced] if e[0] == "wb"))
        assert len(ranges) > 1, shard
        end = data_start
        for a, b in ranges:  # the runs tile the data section: every byte asked for, before the fsync
            assert a == end, shard
            end = b
        assert end == f.stat().st_size, shard
    port(world["patch"], base, tmp_path / "plain")
    for shard in shards:
        assert (tmp_path / "out" / shard).read_bytes() == (tmp_path / "plain" / shard).read_bytes()


def test_timings_show_the_wait_for_the_last_fsync(world, tmp_path, monkeypatch):
    """`sync_wait` is the time the port spent waiting for fsyncs at the end (durability's visible cost): with
    every fsync made slow, at least the last shard's."""
    base = tiny.make_base(tmp_path / "sharded", seed=0, dtype=torch.bfloat16, max_shard_size="40KB")
    real_fsync = os.fsync

    def slow_fsync(fd):
        import time

        time.sleep(0.3)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    res = port(world["patch"], base, tmp_path / "out")
    assert res.timings.sync_wait >= 0.25


# ---------------------------------------------------------------- the copy starts first (issue 18)


def _spy_copy(monkeypatch, delay=0.0, fail=None):
    """Record each kernel copy of a run (on the write thread); slow each down, or make it raise `fail`."""
    import time

    from portllm import stream

    calls = []
    real = stream._copy_range

    def spy(*a):
        calls.append(a)
        time.sleep(delay)
        if fail is not None:
            raise fail
        return real(*a)

    monkeypatch.setattr(stream, "_copy_range", spy)
    return calls


def _write_threads():
    import threading

    return [t for t in threading.enumerate() if t.name.startswith("portllm-write")]


def test_the_copy_of_the_base_is_under_way_before_the_check(world, tmp_path, monkeypatch):
    """Every run of every shard is queued for its kernel copy before the patch is checked (and before torch is needed:
    tests/test_lazy_import.py); the output is the same as ever."""
    import importlib

    from portllm.stream import WriteBehind

    check_mod = importlib.import_module("portllm.check")
    queued, at_check = [], []
    real_run, real_check = WriteBehind.copy_run, check_mod.check

    def copy_run(self, writer, infos, src):
        queued.append(sum(i.nbytes for i in infos))
        return real_run(self, writer, infos, src)

    def checked(*a, **k):
        at_check.append(sum(queued))
        return real_check(*a, **k)

    monkeypatch.setattr(WriteBehind, "copy_run", copy_run)
    monkeypatch.setattr(check_mod, "check", checked)
    res = port(world["patch"], world["new"], tmp_path / "o")
    base_bytes = sum(info.nbytes for _, info in weight_index(world["new"]).values())
    assert at_check == [base_bytes]
    assert 0 < res.timings.overlap < res.timings.total
    monkeypatch.undo()
    port(world["patch"], world["new"], tmp_path / "again")
    for f in (tmp_path / "o").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "again" / f.name).read_bytes()


def test_a_refused_port_stops_its_copy_and_leaves_nothing(world, tmp_path, monkeypatch):
    """The copy began before the check refused the patch: the copy is stopped and its temporary directory removed."""
    other = tiny.make_base(tmp_path / "wide", hidden=48)
    calls = _spy_copy(monkeypatch, delay=0.2)
    with pytest.raises(PortLLMError, match="refusing to port|cannot port"):
        port(world["patch"], other, tmp_path / "outs" / "o")
    assert calls  # it had begun
    assert list((tmp_path / "outs").iterdir()) == []
    assert _write_threads() == []


def test_a_failed_copy_is_a_one_line_error_and_leaves_nothing(world, tmp_path, monkeypatch):
    _spy_copy(monkeypatch, fail=RuntimeError("the copy thread died\nsecond line"))
    with pytest.raises(PortLLMError) as e:
        port(world["patch"], world["new"], tmp_path / "outs" / "o")
    assert "RuntimeError: the copy thread died" in str(e.value) and "\n" not in str(e.value)
    assert list((tmp_path / "outs").iterdir()) == []
    assert _write_threads() == []
