"""How batch shape moves portllm's scoring speed on this machine: rows per pass vs a token budget.

Runs `portllm eval` once per setting on the same examples (each in its own process, one after the
other) and prints time, model tokens/s and accuracy. The accuracies must not move; only speed may.

    python benchmarks/eval_batching.py [--tasks boolq,sst2] [--limit 80]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# label -> extra `portllm eval` flags
SETTINGS = {
    "16 rows, no token budget": ["--batch-size", "16", "--max-batch-tokens", "1000000"],
    "4 rows, no token budget": ["--batch-size", "4", "--max-batch-tokens", "1000000"],
    "1 row": ["--batch-size", "1"],
    "default (16 rows, 640 tokens)": [],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="boolq,sst2")
    ap.add_argument("--limit", type=int, default=80)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("PORTLLM_DATA", ROOT.parent / "shared" / "data"))
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from portllm.eval import EvalResult, TaskResult

    console = Console(width=120)
    results: dict[str, dict[str, TaskResult]] = {}
    for label, flags in SETTINGS.items():
        console.print(f"[dim]{label}...[/dim]")
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "portllm.cli",
                "eval",
                "--model",
                args.model,
                "--tasks",
                args.tasks,
                "--limit",
                str(args.limit),
                "--data-dir",
                str(args.data_dir),
                "--json",
                *flags,
            ],
            capture_output=True,
            text=True,
            env=dict(os.environ, HF_HUB_OFFLINE="1"),
        )
        if r.returncode != 0:
            raise SystemExit(f"portllm eval failed ({label}): {r.stderr.strip()[-2000:]}")
        results[label] = EvalResult.from_dict(json.loads(r.stdout)).tasks
    t = Table(title=f"{args.model}, first {args.limit} eval examples, fp32, model tokens/s (time s)")
    tasks = args.tasks.split(",")
    t.add_column("setting")
    for task in tasks:
        t.add_column(task, justify="right")
        t.add_column(f"{task} acc", justify="right")
    for label, res in results.items():
        t.add_row(
            label,
            *[
                c
                for task in tasks
                for c in (f"{res[task].tokens_per_s:.0f} ({res[task].time_s:.1f})", f"{res[task].value:.4f}")
            ],
        )
    console.print(t)
    same = all(len({res[task].value for res in results.values()}) == 1 for task in tasks)
    console.print(f"accuracy identical across settings: {'[green]yes[/green]' if same else '[red]NO[/red]'}")
    if args.json:
        as_dicts = {label: {t: r.to_dict() for t, r in res.items()} for label, res in results.items()}
        args.json.write_text(json.dumps(as_dicts, indent=2))


if __name__ == "__main__":
    main()
