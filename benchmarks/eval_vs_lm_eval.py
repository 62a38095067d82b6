"""portllm eval vs lm-evaluation-harness on the same examples of the same local files, in one run.

lm-eval (PyPI `lm-eval`) runs `--model hf` on the exported SmolLM2 directory with its own stock
task configs (included, only the dataset source swapped for our local files, since the hub is
unreachable). portllm runs on the same examples. Both run end to end as separate commands with
the same batch size and dtype. Printed: accuracy of each, per-example agreement, the largest
log-likelihood difference, wall time and tokens/s, and the throughput ratio. Tokens/s counts the
workload, the same for both: every request's context + continuation tokens, however a tool
batches or shares them (portllm runs a shared context once; its own model-input count is shown too).
Targets: accuracy within 1 point per task; portllm >= 1.5x lm-eval's throughput.

    python benchmarks/eval_vs_lm_eval.py [--limit 200] [--tasks sst2,boolq,winogrande] [--batch-size 16] [--repeat 3]

lm-eval is installed into its own venv (default .venv-bench, created if missing) so its
dependencies never touch portllm's.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LM_EVAL_PINS = ["torch==2.13.0", "transformers==5.24.0", "accelerate==1.15.0", "lm-eval==0.4.13"]

# our task -> (stock lm-eval config, loader, data file, extra overrides)
STOCK = {
    "sst2": ("glue/sst2/default.yaml", "csv", "sst2/test.tsv", {"delimiter": "\t", "quoting": 3}, {}),
    "boolq": (
        "super_glue/boolq/default.yaml",
        "json",
        "boolq/val.jsonl",
        {},
        # our file stores the label as the string "true"/"false"; the stock config expects 0/1
        {"doc_to_target": "{{ 1 if label in ['true', True, 1] else 0 }}"},
    ),
    "winogrande": ("winogrande/default.yaml", "json", "winogrande/dev.jsonl", {}, {}),
    "rte": (
        "super_glue/rte/default.yaml",
        "json",
        "rte/val.jsonl",
        {},
        {"doc_to_target": "{{ 0 if label in ['entailment', 0] else 1 }}"},
    ),
    "mrpc": (None, None, None, None, None),
}


def ensure_lm_eval(python: Path | None) -> Path:
    if python is not None:
        return python
    venv = ROOT / ".venv-bench"
    py = venv / "bin" / "python"
    if (
        subprocess.run([str(py), "-c", "import lm_eval, accelerate"], capture_output=True).returncode != 0
        if py.exists()
        else True
    ):
        print("installing lm-eval into .venv-bench (once)...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *LM_EVAL_PINS], check=True)
    return py


def write_configs(py: Path, tasks: list[str], data: Path, include_dir: Path) -> dict[str, str]:
    stock_root = subprocess.run(
        [str(py), "-c", "import lm_eval, os; print(os.path.dirname(lm_eval.__file__))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    names = {}
    for t in tasks:
        stock, loader, rel, kwargs, overrides = STOCK[t]
        if stock is None:
            raise SystemExit(f"no lm-eval comparison config for {t}")
        name = f"{t}_local"
        lines = [
            f"include: {stock_root}/tasks/{stock}",
            f"task: {name}",
            "tag: null",
            f"dataset_path: {loader}",
            "dataset_name: null",
            "dataset_kwargs:",
            "  data_files:",
            f"    validation: {data / rel}",
        ]
        for k, v in kwargs.items():
            lines.append(f"  {k}: {json.dumps(v)}")
        lines += ["training_split: null", "validation_split: validation"]
        lines += [f"{k}: {json.dumps(v)}" for k, v in overrides.items()]
        (include_dir / f"{name}.yaml").write_text("\n".join(lines) + "\n")
        names[t] = name
    return names


def request_tokens(model_dir: Path, tasks: list[str], limit: int, data: Path) -> int:
    """Context + continuation tokens of every request: the work to do, before any sharing."""
    from transformers import AutoTokenizer

    from portllm.eval import encode_pair
    from portllm.tasks import get_task, load_examples

    tok = AutoTokenizer.from_pretrained(model_dir)
    n = 0
    for t in tasks:
        for e in load_examples(get_task(t), "eval", data, limit):
            n += sum(len(sum(encode_pair(tok, c, x), [])) for c, x in zip(e.contexts, e.continuations))
    return n


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"command failed: {' '.join(cmd[:4])}...\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--tasks", default="sst2,boolq,winogrande")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lm-eval-batch-size", type=int, default=None, help="lm-eval's batch size, if not --batch-size")
    ap.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("PORTLLM_DATA", ROOT.parent / "shared" / "data"))
    )
    ap.add_argument("--lm-eval-python", type=Path, default=None, help="python of an environment with lm-eval installed")
    ap.add_argument(
        "--repeat", type=int, default=1, help="run both tools this many times, alternating; medians reported"
    )
    ap.add_argument("--no-bf16", action="store_true", help="skip the extra portllm bf16 run")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from portllm import resolve_base
    from portllm.eval import EvalResult

    console = Console(width=130)
    tasks = args.tasks.split(",")
    model_dir = resolve_base("smollm2-135m")
    py = ensure_lm_eval(args.lm_eval_python)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    work = Path(tempfile.mkdtemp(prefix="portllm-lmeval-"))
    (work / "include").mkdir()
    names = write_configs(py, tasks, args.data_dir.resolve(), work / "include")

    lm_cmd = [
        str(py),
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model_dir},dtype=float32",
        "--tasks",
        ",".join(names.values()),
        "--include_path",
        str(work / "include"),
        "--limit",
        str(args.limit),
        "--batch_size",
        str(args.lm_eval_batch_size or args.batch_size),
        "--device",
        "cpu",
        "--log_samples",
        "--output_path",
        str(work / "lm"),
    ]

    def ours(dtype: str) -> float:
        return timed(
            [
                sys.executable,
                "-m",
                "portllm.cli",
                "eval",
                "--model",
                str(model_dir),
                "--tasks",
                args.tasks,
                "--limit",
                str(args.limit),
                "--batch-size",
                str(args.batch_size),
                "--dtype",
                dtype,
                "--data-dir",
                str(args.data_dir),
                "--out",
                str(work / f"ours-{dtype}"),
                "--json",
            ],
            env,
        )

    # alternate the two tools so that a slow spell of the machine hits both; report medians
    lm_walls, fp32_walls = [], []
    for r in range(args.repeat):
        console.print(f"[dim]run {r + 1}/{args.repeat}: lm-eval on {len(tasks)} tasks x {args.limit} examples...[/dim]")
        lm_walls.append(timed(lm_cmd, env))
        console.print(f"[dim]run {r + 1}/{args.repeat}: portllm (float32)...[/dim]")
        fp32_walls.append(ours("float32"))
    lm_wall = statistics.median(lm_walls)
    walls = {"float32": statistics.median(fp32_walls)}
    runs = {"float32": work / "ours-float32", "bfloat16": None}
    if not args.no_bf16:
        console.print("[dim]portllm (bfloat16)...[/dim]")
        walls["bfloat16"] = ours("bfloat16")
        runs["bfloat16"] = work / "ours-bfloat16"

    report = {
        "repeat": args.repeat,
        "runs_wall_s": {"lm_eval": lm_walls, "portllm_float32": fp32_walls},
        "limit": args.limit,
        "batch_size": args.batch_size,
        "lm_eval_batch_size": args.lm_eval_batch_size or args.batch_size,
        "tasks": {},
        "wall_s": {"lm_eval": lm_wall, **{f"portllm_{k}": v for k, v in walls.items()}},
    }
    lm_bs = args.lm_eval_batch_size or args.batch_size
    t = Table(
        title=f"SmolLM2-135M, first {args.limit} eval examples, batch {args.batch_size}"
        + (f" (lm-eval {lm_bs})" if lm_bs != args.batch_size else "")
        + ", fp32 unless noted"
    )
    cols = ["task", "lm-eval acc", "portllm acc", "Δ points", "per-example agreement", "max |Δ loglik|"]
    for c in cols + (["portllm bf16 acc", "bf16 agreement"] if runs["bfloat16"] else []):
        t.add_column(c, justify="right")
    total_tokens = 0
    workload = request_tokens(model_dir, tasks, args.limit, args.data_dir)
    for task in tasks:
        lm_file = sorted(glob.glob(str(work / "lm" / "*" / f"samples_{names[task]}_*.jsonl")))[-1]
        lm_rows = {int(r["doc_id"]): r for r in map(json.loads, Path(lm_file).read_text().splitlines())}
        ours = {
            r["idx"]: r for r in map(json.loads, (runs["float32"] / f"samples_{task}.jsonl").read_text().splitlines())
        }
        res = EvalResult.read(runs["float32"]).tasks[task]
        total_tokens += res.tokens
        agree, max_diff = 0, 0.0
        for i, r in ours.items():
            lls = [float(x[0]) for x in lm_rows[i]["filtered_resps"]]
            agree += int(max(range(len(lls)), key=lambda k: lls[k]) == r["pred"])
            max_diff = max(max_diff, max(abs(a - b) for a, b in zip(lls, r["scores"])))
        lm_acc = sum(float(r["acc"]) for r in lm_rows.values()) / len(lm_rows)
        row = {
            "lm_eval_acc": lm_acc,
            "portllm_acc": res.value,
            "n": res.n,
            "agreement": agree / len(ours),
            "max_abs_loglik_diff": max_diff,
        }
        if runs["bfloat16"]:
            b = {
                r["idx"]: r
                for r in map(json.loads, (runs["bfloat16"] / f"samples_{task}.jsonl").read_text().splitlines())
            }
            row["portllm_bf16_acc"] = sum(r["correct"] for r in b.values()) / len(b)
            row["bf16_agreement"] = sum(b[i]["pred"] == ours[i]["pred"] for i in ours) / len(ours)
        report["tasks"][task] = row
        cells = [
            task,
            f"{lm_acc:.4f}",
            f"{res.value:.4f}",
            f"{100 * (res.value - lm_acc):+.2f}",
            f"{row['agreement']:.2%}",
            f"{max_diff:.1e}",
        ]
        if runs["bfloat16"]:
            cells += [f"{row['portllm_bf16_acc']:.4f}", f"{row['bf16_agreement']:.2%}"]
        t.add_row(*cells)
    console.print(t)
    report["workload_tokens"] = workload
    report["portllm_model_input_tokens"] = total_tokens
    report["tokens_per_s"] = {k.replace("_s", ""): workload / v for k, v in report["wall_s"].items()}
    speed = lm_wall / walls["float32"]
    report["speedup_fp32"] = speed
    for k, v in report["wall_s"].items():
        each = report["runs_wall_s"].get(k)
        console.print(
            f"{k:>18}: {v:7.1f} s end to end, {workload / v:7.0f} tokens/s"
            + (f"  (median of {', '.join(f'{x:.1f}' for x in each)})" if each and len(each) > 1 else "")
        )
    console.print(
        f"[dim]workload: {workload:,} request tokens; portllm ran {total_tokens:,} of them through the model "
        f"(shared contexts once)[/dim]"
    )
    console.print(
        f"portllm fp32 throughput = {speed:.2f}x lm-eval's"
        + (f"; bf16 = {lm_wall / walls['bfloat16']:.2f}x" if "bfloat16" in walls else "")
    )
    ok = all(abs(r["portllm_acc"] - r["lm_eval_acc"]) <= 0.01 for r in report["tasks"].values())
    console.print(
        f"targets (accuracy within 1 point on each task; >= 1.5x throughput): accuracy "
        f"{'[green]met[/green]' if ok else '[red]NOT met[/red]'}, throughput "
        f"{'[green]met[/green]' if speed >= 1.5 else '[red]NOT met[/red]'}"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
