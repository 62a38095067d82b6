"""The CLI as a user meets it: real subprocesses, exit codes, one-line errors."""

import json
import os
import subprocess
import sys

import pytest

import tiny
from portllm import Patch


def run(*args, env=None):
    e = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "portllm.cli", *map(str, args)], capture_output=True, text=True, env=e, timeout=300
    )


def one_line_error(r, code=3):
    assert r.returncode == code, r.stderr
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_usage_errors_are_one_line():
    for args in (
        ["eval", "--model", "x", "--limit", "abc"],
        ["eval", "--model", "x", "--max-batch-tokens", "0"],
        ["nosuch"],
        ["port"],
    ):
        line = one_line_error(run(*args), code=3)
        assert "--help" in line


def test_inspect_check_port_flow(world, tmp_path):
    r = run("inspect", world["patch"])
    assert r.returncode == 0 and "q_proj" in r.stdout and "lineage" in r.stdout
    r = run("inspect", world["patch"], "--json")
    d = json.loads(r.stdout)
    assert d["n_modules"] == 14 and d["manifest"]["base"]["fingerprint"].startswith("fp1:")
    r = run("check", world["patch"], "--base", world["new"], "--from", world["old"], "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["verdict"] == "compatible" and len(d["drift"]) == 14
    r = run("check", world["patch"], "--base", world["new"], "--from", world["old"])
    assert r.returncode == 0 and "verdict" in r.stdout and "drift" in r.stdout
    r = run("port", world["patch"], "--base", world["new"], "--out", tmp_path / "ported", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["applied"] == 14
    assert (tmp_path / "ported" / "portllm_provenance.json").is_file()


def test_check_exit_codes(world, tmp_path):
    warn = tiny.make_base(tmp_path / "ren", tokenizer_rename=3)
    assert run("check", world["patch"], "--base", warn).returncode == 1
    wide = tiny.make_base(tmp_path / "wide", hidden=48)
    r = run("check", world["patch"], "--base", wide)
    assert r.returncode == 2 and "incompatible" in r.stdout


def test_errors_are_one_line(world, tmp_path):
    one_line_error(run("port", world["patch"], "--base", tmp_path / "nope", "--out", tmp_path / "o"))
    (tmp_path / "exists").mkdir()
    msg = one_line_error(run("port", world["patch"], "--base", world["new"], "--out", tmp_path / "exists"))
    assert "--overwrite" in msg
    msg = one_line_error(run("inspect", tmp_path / "missing"))
    assert "does not exist" in msg
    msg = one_line_error(run("port", world["adapter"], "--base", world["new"], "--out", tmp_path / "o2"))
    assert "import-adapter" in msg
    wide = tiny.make_base(tmp_path / "wide", hidden=48)
    msg = one_line_error(run("port", world["patch"], "--base", wide, "--out", tmp_path / "o3"))
    assert "refusing to port" in msg
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o2").exists()


def test_hub_id_offline_is_a_clear_error(world, tmp_path):
    msg = one_line_error(run("port", world["patch"], "--base", "someorg/some-model", "--out", tmp_path / "o"))
    assert "hub" in msg and "offline" in msg


def test_export_base_and_import_adapter(world, tmp_path):
    r = run("export-base", world["new"], tmp_path / "exp")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "exp" / "tokenizer.json").is_file() and (tmp_path / "exp" / "model.safetensors").is_file()
    fp = run("fingerprint", tmp_path / "exp").stdout.strip()
    assert fp == run("fingerprint", world["new"]).stdout.strip()
    r = run("import-adapter", world["adapter"], "--base", world["old"], "--out", tmp_path / "pp", "--task", "toy")
    assert r.returncode == 0, r.stderr
    assert Patch.load(tmp_path / "pp").task == "toy"
    assert run("import-adapter", world["adapter"], "--base", world["old"], "--out", tmp_path / "pp").returncode == 3


def test_unknown_embedded_name_mentions_options(tmp_path):
    r = run("fingerprint", "smollm9-1m")
    msg = one_line_error(r)
    assert "hub" in msg or "does not exist" in msg


def test_merge_similarity_extract_cli(world, tmp_path):
    r = run(
        "merge",
        world["patch"],
        world["patch"],
        "--method",
        "ties",
        "--density",
        "0.5",
        "--rank",
        "4",
        "--out",
        tmp_path / "m",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["method"] == "ties" and rep["rank"] == 4 and len(rep["inputs"]) == 2
    msg = one_line_error(run("merge", world["patch"], "--method", "ties", "--density", "2", "--out", tmp_path / "m2"))
    assert "density" in msg and not (tmp_path / "m2").exists()
    r = run("similarity", world["patch"], tmp_path / "m", "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)["cosine"]) == 2
    r = run(
        "extract", "--tuned", world["new"], "--base", world["old"], "--rank", "2", "--out", tmp_path / "x", "--json"
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["layers"] == 14


def _header(stdout, first_column):
    """The header row of the table whose first column is `first_column`."""
    return next(line for line in stdout.splitlines() if line.startswith("┃") and f"{first_column} ┃" in line)


def test_eval_prints_full_width_when_piped_and_no_library_warnings(world, tmp_path):
    """Piped (as in `portllm eval ... | tee log`), the table keeps every column whole even when the
    environment claims a narrow terminal; transformers' warnings never reach the user."""
    (tmp_path / "data" / "sst2").mkdir(parents=True)
    (tmp_path / "data" / "sst2" / "test.tsv").write_text("sentence\tlabel\nw4 w5 w6\t1\nw7 w8\t0\nw9\t1\n")
    args = ("eval", "--model", world["new"], "--patch", world["patch"], "--tasks", "sst2", "--data-dir")
    r = run(*args, tmp_path / "data", "--out", tmp_path / "run", env={"COLUMNS": "50"})
    assert r.returncode == 0, r.stderr
    header = _header(r.stdout, "task")
    assert "…" not in header and "tokens/s" in header and "…" not in r.stdout
    assert "95% CI" in header and "majority" in header and "± stderr" not in header
    assert "Warning" not in r.stderr and "warn" not in r.stderr.lower(), r.stderr
    r = run(*args, tmp_path / "data", "--json")
    assert r.returncode == 0 and "Warning" not in r.stderr, r.stderr
    printed = json.loads(r.stdout)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert list(printed) == list(saved) and list(printed["tasks"]["sst2"]) == list(saved["tasks"]["sst2"])
    assert printed["tasks"]["sst2"]["value"] == saved["tasks"]["sst2"]["value"]
    t = saved["tasks"]["sst2"]
    assert t["ci_low"] <= t["value"] <= t["ci_high"] and t["majority"] == 2 / 3 and "stderr" in t


def _run_dir(d, correct):
    """A hand-made eval run: results.json and samples_sst2.jsonl as `portllm eval --out` writes them."""
    d.mkdir()
    recs = [{"idx": i, "pred": int(c), "gold": 1, "correct": bool(c)} for i, c in enumerate(correct)]
    task = {"task": "sst2", "metric": "acc", "value": sum(correct) / len(correct), "stderr": 0.0, "n": len(correct)}
    (d / "results.json").write_text(json.dumps({"model": "m", "patch": None, "tasks": {"sst2": task}}))
    (d / "samples_sst2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_compare_paired_columns_verdict_and_margin(tmp_path):
    _run_dir(tmp_path / "a", [1] * 40 + [1] * 100 + [0] * 60)
    _run_dir(tmp_path / "b", [0] * 40 + [1] * 100 + [0] * 60)
    r = run("compare", tmp_path / "a", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    header = _header(r.stdout, "task")
    for col in ("Δ", "95% CI", "McNemar p", "verdict", "neg flips"):
        assert col in header
    assert "B worse" in r.stdout and "-0.2000" in r.stdout and "…" not in r.stdout
    r = run("compare", tmp_path / "a", tmp_path / "a", "--margin", "0.02", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["margin"] == 0.02 and d["tasks"]["sst2"]["verdict"] == "no difference beyond ±2 points"
    assert "fraction" in one_line_error(run("compare", tmp_path / "a", tmp_path / "b", "--margin", "2"))


def test_messages_are_printed_literally(tmp_path):
    """Square brackets in a message are text, not rich markup (`pip install 'portllm[serve]'` kept whole)."""
    for name in ("no[serve]such", "no[red]such[/red]", "no[bold]such"):
        line = one_line_error(run("inspect", tmp_path / name))
        assert f"{tmp_path / name} does not exist" in line, line


def test_absent_cuda_is_one_line_not_a_cpu_fallback():
    import torch

    if torch.cuda.is_available():
        return  # this machine has a GPU: the error case cannot arise
    for args in (
        ["eval", "--model", "x", "--tasks", "sst2"],
        ["forecast", "p", "--base", "x", "--from", "y", "--inputs", "sst2"],
        ["rescale", "p", "--base", "x", "--from", "y", "--inputs", "sst2"],
        ["train", "--base", "x", "--task", "sst2", "--out", "o"],
        ["evolve", "--base", "x", "--out", "o"],
        ["serve", "--base", "x"],
        ["describe", "p", "--generate-with", "x"],
        ["route-gates", "p", "--base", "x"],
        ["route-study", "--patches", "p"],
        ["sweep", "--plan", "nosuch"],
        ["reproduce", "--base", "x"],
    ):
        line = one_line_error(run(*args, "--device", "cuda"))
        assert "--device cuda" in line and "--device cpu" in line, (args, line)


def test_a_gpu_that_cannot_be_used_is_refused_not_ignored(monkeypatch, tmp_path):
    """Where a GPU is present but the command cannot run there (a patch set, the sweep), `--device cuda` is one
    line naming the command and the reason, never a quiet run on the CPU."""
    import torch
    from typer.testing import CliRunner

    from portllm.cli import app
    from portllm.errors import PortLLMError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for args, command in (
        (["route-gates", str(tmp_path / "p"), "--base", "x"], "route-gates"),
        (["route-study", "--patches", str(tmp_path / "p")], "route-study"),
        (["sweep", "--plan", "generation"], "sweep"),
        (["sweep", "--plan", "full"], "sweep"),  # its rescale correction; with --no-correct it runs on the GPU
    ):
        e = CliRunner().invoke(app, [*args, "--device", "cuda"]).exception
        assert isinstance(e, PortLLMError), (args, e)
        assert str(e).startswith(command) and "CPU only" in str(e) and "\n" not in str(e), str(e)


class Stop(Exception):
    """Raised by a stand-in where the real step would start working."""


def test_describe_opens_its_writer_with_the_device_and_dtype_asked_for(monkeypatch, world, tmp_path):
    import importlib
    import shutil

    from typer.testing import CliRunner

    from portllm.cli import app

    desc = importlib.import_module("portllm.routing.describe")  # the package exports a function of that name
    seen = {}

    def fake_open_lm(spec, patch=None, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(desc, "open_lm", fake_open_lm)
    patch = shutil.copytree(world["patch"], tmp_path / "patch")
    data = tiny.sentiment_data(tmp_path / "data")
    args = ["describe", str(patch), "--task", "sst2", "--generate-with", "x", "--data-dir", str(data)]
    r = CliRunner().invoke(app, [*args, "--device", "cpu", "--dtype", "bfloat16"])
    assert isinstance(r.exception, Stop), r.output
    assert seen == {"device": "cpu", "dtype": "bfloat16"}


def test_reproduce_threads_its_device_to_every_step(monkeypatch, world, tmp_path):
    """Evolving, training and scoring all run where `reproduce --device` says (a stand-in device name: no step
    opens a model here), never on TrainConfig's auto or eval's CPU default."""
    from types import SimpleNamespace

    from portllm import steps
    from portllm.reproduce import run as rr
    from portllm.reproduce.cache import ReproduceCache

    prof = rr.PROFILES["quick"]
    ctx = rr.ReproduceContext(prof, tmp_path, ReproduceCache(tmp_path / "c"), lambda m: None, device="cuda:7")
    seen = []

    def fake_evolve(base, corpus, out, cfg, **kw):
        seen.append(("evolve", cfg.device))
        raise Stop

    monkeypatch.setattr(rr, "evolve", fake_evolve)
    monkeypatch.setattr(rr, "corpus_files", lambda *a: [])
    with pytest.raises(Stop):
        rr.evolve_base(ctx, str(world["old"]), {})
    monkeypatch.setattr(steps, "train_patch_step", lambda b, t, o, cfg, *a, **k: seen.append(("train", cfg.device)))
    bases = SimpleNamespace(theta=world["old"], fp_theta="a" * 16, evolved=world["new"], fp_evolved="b" * 16)
    rr.train_patches(ctx, bases, "sst2", prof.tasks["sst2"])

    def fake_eval_step(*a, **kw):
        seen.append(("eval", kw.get("device", a[9] if len(a) > 9 else "cpu")))
        raise Stop

    monkeypatch.setattr(steps, "eval_step", fake_eval_step)
    with pytest.raises(Stop):
        rr.score_variants(ctx, bases, "sst2", prof.tasks["sst2"], world["patch"], world["patch"])
    assert seen == [("evolve", "cuda:7"), ("train", "cuda:7"), ("train", "cuda:7"), ("eval", "cuda:7")]
