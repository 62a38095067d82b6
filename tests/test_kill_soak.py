"""Kill soak: `port`, `merge` and `export-base` killed with SIGKILL at random moments, then rerun.

Every rerun must complete, its output must be whole and valid, and no hidden temporary may remain
beside it. The commands run in forked children of this (already warm) process, so a round costs
the command's own work rather than a Python and torch start-up, and the soak fits in well under a minute.
"""

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

import tiny
from portllm import Patch, fingerprint, import_adapter
from portllm.models import content_sha256, weight_index

ROUNDS = 21  # seven of each command


def _fork_cli(args: list) -> int:
    pid = os.fork()
    if pid == 0:  # the child: run the CLI as `portllm ARGS` would, quietly, and leave without cleanup handlers
        code = 99
        try:
            torch.set_num_threads(1)  # an OpenMP pool does not survive fork
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            sys.stdout = sys.stderr = open(os.devnull, "w")
            sys.argv = ["portllm", *map(str, args)]
            from portllm.cli import main

            try:
                main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
        finally:
            os._exit(code)
    return pid


def _wait(pid: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} hung")
        time.sleep(0.002)


def _leftovers(parent: Path) -> list[str]:
    return sorted(n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n)


def test_kill_soak(tmp_path):
    base = tiny.make_base(tmp_path / "base", vocab_size=2000, hidden=128, layers=4, max_shard_size="300KB")
    assert len(list(base.glob("*.safetensors"))) > 5
    p1 = import_adapter(tiny.make_adapter(base, tmp_path / "a1", seed=1), base, tmp_path / "p1").path
    p2 = import_adapter(tiny.make_adapter(base, tmp_path / "a2", seed=2), base, tmp_path / "p2").path
    outs = tmp_path / "outs"
    outs.mkdir()
    commands = {
        "ported": ["port", p1, "--base", base, "--out", outs / "ported", "--overwrite"],
        "merged": ["merge", p1, p2, "--method", "linear", "--rank", "8", "--out", outs / "merged", "--overwrite"],
        "exported": ["export-base", base, outs / "exported", "--overwrite"],
    }
    # warm this process (imports), then one clean run of each: the reference and its duration
    from portllm.cli import main  # noqa: F401

    reference, took, writing = {}, {}, {}
    for name, args in commands.items():
        t = time.monotonic()
        pid, seen, gone = _fork_cli(args), None, None
        while not (done := os.waitpid(pid, os.WNOHANG))[0]:
            there = any(n.startswith(f".{name}.tmp-") for n in os.listdir(outs))
            seen = seen or (time.monotonic() if there else None)
            gone = gone or (time.monotonic() if seen and not there else None)
            time.sleep(0.0002)
        assert os.waitstatus_to_exitcode(done[1]) == 0, name
        # the order the soak aims its kills by: the output is written into a hidden temporary, which then
        # becomes the output before the command exits
        assert seen is not None, f"{name} never wrote through a temporary beside its output"
        assert (outs / name).is_dir() and not any(n.startswith(f".{name}.tmp-") for n in os.listdir(outs)), name
        took[name] = time.monotonic() - t
        writing[name] = (gone or time.monotonic()) - (seen or t)  # how long its temporary existed
        reference[name] = _state(name, outs / name)

    base_fp = fingerprint(base)
    assert reference["exported"]["fingerprint"] == base_fp
    rng = random.Random(0)
    cut_mid_write = cut_in_swap = interrupted = 0
    for i in range(ROUNDS):
        name = list(commands)[i % 3]
        pid = _fork_cli(commands[name])
        if i % 2:  # at a random moment
            time.sleep(rng.uniform(0, took[name] * 1.2))
        else:  # while it writes: once its temporary appears, within the time the temporary lived before
            deadline = time.monotonic() + 30
            while not any(n.startswith(f".{name}.tmp-") for n in os.listdir(outs)) and time.monotonic() < deadline:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    pid = 0
                    break
                time.sleep(0.0002)
            time.sleep(rng.uniform(0, writing[name]))
        if pid and not os.waitpid(pid, os.WNOHANG)[0]:  # still running: this kill cuts real work short
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            interrupted += 1
        cut_mid_write += any(n.startswith(f".{name}.tmp-") for n in _leftovers(outs))
        cut_in_swap += any(n.startswith(f".{name}.old-") for n in _leftovers(outs))
        assert _wait(_fork_cli(commands[name])) == 0, f"round {i}: rerun of {name} failed"
        assert _state(name, outs / name) == reference[name], f"round {i}: {name} differs after a kill and rerun"
        assert _leftovers(outs) == [], f"round {i}"
    print(
        f"of {ROUNDS} rounds, {interrupted} killed a running command: {cut_mid_write} while it wrote, "
        f"{cut_in_swap} while it replaced the output"
    )
    # a kill that lands after the command finished tests nothing; about three in four cut one short (15-16 of
    # 21 here), and a third is the floor that still makes the soak a soak
    assert interrupted >= ROUNDS // 3, f"only {interrupted} of {ROUNDS} kills interrupted a running command"
    assert cut_mid_write >= 4, f"only {cut_mid_write} kills landed while writing"


def _state(name: str, out: Path) -> dict:
    """What must be identical after any kill and rerun (read through the loaders, which refuse damage)."""
    if name == "merged":
        p = Patch.load(out)  # checks every file's sha256 against the manifest
        return {"tensors": {k: v.sum().item() for k, v in sorted(p.tensors.items())}, "n": len(p.modules)}
    weight_index(out)  # every shard's header parses and its tensors lie inside the file
    state = {"fingerprint": fingerprint(out), "sha": content_sha256(out), "files": sorted(os.listdir(out))}
    if name == "ported":
        prov = json.loads((out / "portllm_provenance.json").read_text())
        assert prov["result_fingerprint"] == state["fingerprint"]  # the full hash: taken on first use, in state
    return state


def test_train_killed_then_rerun_completes_and_matches_a_clean_run(tmp_path):
    """`train` killed at random moments (3 rounds) resumes or restarts to the same patch, leaving nothing behind."""
    data = tiny.sentiment_data(tmp_path / "data")
    base = tiny.make_base(tmp_path / "base", bpe=True, vocab_size=320, hidden=32, layers=2, initializer_range=0.3)
    args = [
        "train",
        "--base",
        base,
        "--task",
        "sst2",
        "--steps",
        "12",
        "--batch-size",
        "8",
        "--lr",
        "2e-2",
        "--max-length",
        "64",
        "--eval-limit",
        "0",
        "--data-dir",
        data,
        "--overwrite",
    ]
    from portllm.cli import main  # noqa: F401  (warm the forked children)

    t = time.monotonic()
    assert _wait(_fork_cli([*args, "--out", tmp_path / "clean"]), timeout=120) == 0
    took = time.monotonic() - t
    clean = Patch.load(tmp_path / "clean").tensors
    rng = random.Random(1)
    for i in range(3):
        out = tmp_path / f"run{i}"
        pid = _fork_cli([*args, "--out", out])
        time.sleep(rng.uniform(0.3, 0.9) * took)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert _wait(_fork_cli([*args, "--out", out]), timeout=120) == 0, f"round {i}: rerun failed"
        got = Patch.load(out).tensors  # checksums verified
        assert got.keys() == clean.keys()
        assert all(torch.allclose(got[k], clean[k], atol=1e-5) for k in clean), f"round {i}: another patch"
        assert [n for n in os.listdir(tmp_path) if ".tmp-" in n or ".old-" in n or n.startswith(f".run{i}.ckpt")] == []
