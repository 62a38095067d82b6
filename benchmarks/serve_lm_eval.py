"""lm-evaluation-harness scores a patch served by `portllm serve`; the scores agree with `portllm eval`'s, example by
example.

`portllm serve` runs SmolLM2-135M (embedded) with one SST-2 patch behind an API key. lm-eval 0.4.13's
`local-completions` model scores SST-2 against it: for every choice it sends the context + continuation as token
ids with `echo`, `logprobs: 1` and `max_tokens: 1`, and sums the echoed prompt log-probabilities after the
context. `portllm eval` scores the same patch on the same rows in process. Printed and written: both accuracies,
per-example agreement of the predictions, the largest log-likelihood difference, and the exact lm-eval command.

    python benchmarks/serve_lm_eval.py [--limit 100] [--patch DIR] [--out docs/benchmarks/serve_lm_eval]

lm-eval lives in its own venv (.venv-lmeval, created with the pins below if missing: CPU torch first, so pip never
pulls a CUDA build), its tokenizer is read from the base's directory (`tokenizer_backend=huggingface`), and nothing
touches the hub. Without --patch, a short SST-2 patch is trained first (`portllm train`, 30 steps).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import secrets
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-lmeval"
TORCH_PIN = "torch==2.13.0"  # installed first: the CPU wheel, so lm-eval's torch requirement is already met
LM_EVAL_PINS = ["transformers==5.24.0", "lm-eval[api]==0.4.13"]
TASK = "sst2_served"


def ensure_lm_eval() -> Path:
    py = VENV / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import lm_eval, aiohttp, tenacity"]).returncode == 0:
        return py
    print("installing lm-eval into .venv-lmeval (once)...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", TORCH_PIN], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *LM_EVAL_PINS], check=True)
    return py


def portllm(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "portllm.cli", *args], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"portllm {' '.join(args[:2])} failed:\n{r.stderr[-3000:]}")
    return r


def task_yaml(py: Path, data: Path, include: Path) -> None:
    """lm-eval's stock GLUE SST-2 config, reading our local rows (the hub is unreachable)."""
    stock = subprocess.run(
        [str(py), "-c", "import lm_eval, os; print(os.path.dirname(lm_eval.__file__))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    lines = [
        f"include: {stock}/tasks/glue/sst2/default.yaml",
        f"task: {TASK}",
        "tag: null",
        "dataset_path: csv",
        "dataset_name: null",
        "dataset_kwargs:",
        "  data_files:",
        f"    validation: {data / 'sst2' / 'test.tsv'}",
        '  delimiter: "\\t"',
        "  quoting: 3",
        "training_split: null",
        "validation_split: validation",
    ]
    (include / f"{TASK}.yaml").write_text("\n".join(lines) + "\n")


def start_server(patch: Path, key: str, log: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """`portllm serve` on a free port with the patch as model `sst2`; its base URL once it says it serves."""
    cmd = [sys.executable, "-m", "portllm.cli", "serve", "--base", "smollm2-135m", "--patch", f"sst2={patch}"]
    cmd += ["--port", "0", "--api-key", key]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env)
    deadline = time.time() + 600
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "serving" in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its stdout drained
            return proc, line.split(" on ", 1)[1].split()[0].removesuffix("/v1")
    proc.kill()
    raise SystemExit(f"the server did not start:\n{log.read_text()[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--patch", type=Path, default=None, help="an SST-2 patch (default: train one, 30 steps)")
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("PORTLLM_DATA", ROOT.parent / "shared/data")))
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.txt")
    args = ap.parse_args()

    from portllm import resolve_base

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PORTLLM_DATA"] = str(args.data_dir.resolve())
    work = Path(tempfile.mkdtemp(prefix="portllm-serve-lmeval-"))
    py = ensure_lm_eval()
    patch = args.patch
    if patch is None:
        patch = ROOT / "runs" / "serve-lm-eval" / "sst2"
        if not (patch / "manifest.json").exists():
            print("training a short SST-2 patch (30 steps)...", flush=True)
            portllm("train", "--base", "smollm2-135m", "--task", "sst2", "--out", str(patch), "--steps", "30",
                    "--lr", "1e-3", "--max-length", "128", "--dtype", "bfloat16", env=env)  # fmt: skip
    patch = patch.resolve()
    base_dir = resolve_base("smollm2-135m")
    (work / "include").mkdir()
    task_yaml(py, args.data_dir.resolve(), work / "include")

    key = secrets.token_urlsafe(16)
    proc, url = start_server(patch, key, work / "serve.log", env)
    model_args = (
        f"model=sst2,base_url={url}/v1/completions,num_concurrent=1,max_retries=1,"
        f"tokenizer_backend=huggingface,tokenizer={base_dir}"
    )
    lm_cmd = [str(py), "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args]
    lm_cmd += ["--tasks", TASK, "--include_path", str(work / "include"), "--limit", str(args.limit)]
    lm_cmd += ["--log_samples", "--output_path", str(work / "lm")]
    try:
        print(f"lm-eval local-completions against {url} ({args.limit} examples)...", flush=True)
        t0 = time.perf_counter()
        r = subprocess.run(lm_cmd, env=dict(env, OPENAI_API_KEY=key), capture_output=True, text=True)
        lm_wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(
                f"lm-eval failed:\n{r.stderr[-4000:]}\n--- server log ---\n{(work / 'serve.log').read_text()[-2000:]}"
            )
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    print("portllm eval of the same patch on the same rows...", flush=True)
    t0 = time.perf_counter()
    portllm("eval", "--model", "smollm2-135m", "--patch", str(patch), "--tasks", "sst2", "--limit", str(args.limit),
            "--data-dir", str(args.data_dir), "--out", str(work / "ours"), env=env)  # fmt: skip
    ours_wall = time.perf_counter() - t0

    lm_file = sorted(glob.glob(str(work / "lm" / "*" / f"samples_{TASK}_*.jsonl")))[-1]
    lm_rows = {int(x["doc_id"]): x for x in map(json.loads, Path(lm_file).read_text().splitlines())}
    ours = {x["idx"]: x for x in map(json.loads, (work / "ours" / "samples_sst2.jsonl").read_text().splitlines())}
    if set(lm_rows) != set(ours):
        raise SystemExit(f"the two runs scored different rows: {sorted(set(lm_rows) ^ set(ours))[:10]}")
    agree, max_diff = 0, 0.0
    for i, o in ours.items():
        lls = [float(x[0]) for x in lm_rows[i]["filtered_resps"]]
        agree += int(max(range(len(lls)), key=lambda k: lls[k]) == o["pred"])
        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(lls, o["scores"])))
    n = len(ours)
    lm_acc = sum(float(x["acc"]) for x in lm_rows.values()) / n
    our_acc = sum(bool(x["correct"]) for x in ours.values()) / n
    shown = [shlex.quote(a) for a in lm_cmd]
    shown[0] = ".venv-lmeval/bin/python"
    report = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs (shared), Python {platform.python_version()}",
        "patch": str(patch.relative_to(ROOT)) if patch.is_relative_to(ROOT) else str(patch),
        "examples": n,
        "lm_eval": {"version": "0.4.13", "model": "local-completions", "accuracy": lm_acc, "wall_s": lm_wall},
        "portllm_eval": {"accuracy": our_acc, "wall_s": ours_wall},
        "per_example_agreement": agree / n,
        "max_abs_loglik_diff": max_diff,
        "lm_eval_command": "OPENAI_API_KEY=<the key> HF_HUB_OFFLINE=1 " + " ".join(shown),
        "serve_command": f"portllm serve --base smollm2-135m --patch sst2={patch} --port PORT --api-key <the key>",
    }
    text = "\n".join(
        [
            f"lm-eval local-completions against portllm serve vs portllm eval: SmolLM2-135M + SST-2 patch, first {n} "
            "SST-2 eval rows, float32",
            f"  lm-eval accuracy       {lm_acc:.4f}   ({lm_wall:.1f} s, one request at a time)",
            f"  portllm eval accuracy  {our_acc:.4f}   ({ours_wall:.1f} s, in process)",
            f"  per-example agreement  {agree}/{n} = {agree / n:.2%}",
            f"  max |Δ loglik|         {max_diff:.1e}",
            f"  when: {report['when']}; machine: {report['machine']}",
            f"  server: {report['serve_command']}",
            f"  lm-eval: {report['lm_eval_command']}",
        ]
    )
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".txt").write_text(text + "\n")
    if agree != n:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
