"""A LoRA training step with the head on every position (transformers' `labels=` loss) against the head only
where a labelled token is predicted (portllm.head.lm_loss): time, peak RSS and the loss, on the same batch.

Each (model, task, variant) runs in its own process (peak RSS is per process): the paper's LoRA (rank 8, every
linear projection), fp32, one batch of 8 training examples, one warm-up step then `--reps` timed steps of
forward + backward (no optimizer step, so every rep sees the same weights and loss).

    python benchmarks/train_step.py [--models smollm2-135m,gemma3-270m] [--tasks sst2,commonsense_qa] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("transformers (head everywhere)", "portllm (head where labelled)")


def worker(model_name: str, task: str, variant: int, reps: int, max_length: int) -> dict:
    import resource
    from dataclasses import replace

    from portllm.head import lm_loss, predicting
    from portllm.models import BaseRef
    from portllm.tasks import get_task
    from portllm.train import TrainConfig, _paper_lora, collate, load_model_for_training, training_examples, with_lora

    base = BaseRef.of(model_name)
    cfg = _paper_lora(replace(TrainConfig(), dtype="float32", max_length=max_length), base)
    model, tok = load_model_for_training(base, cfg)
    model = with_lora(model, cfg, None)
    model.train()
    examples = training_examples(get_task(task), tok, cfg.max_length, None, 64)[: cfg.batch_size]
    ids, labels, mask = collate(examples, tok.pad_token_id, "cpu")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def step() -> float:
        if variant == 0:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        else:
            loss = lm_loss(model, ids, mask, labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss)

    step()
    times, loss = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return {
        "median_s": sorted(times)[len(times) // 2],
        "loss": loss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_step_mb": rss0,
        "batch": list(ids.shape),
        "head_positions": len(predicting(labels)) if variant else ids.shape[1],
        "vocab": int(model.get_output_embeddings().weight.shape[0]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--tasks", default="sst2,commonsense_qa")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "TASK", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        m, t, v = args.worker
        print(json.dumps(worker(m, t, int(v), args.reps, args.max_length)))
        return

    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    rows = []
    for m in args.models.split(","):
        for t in args.tasks.split(","):
            got = []
            for v, label in enumerate(VARIANTS):
                console.print(f"[dim]{m} {t}: {label}...[/dim]")
                cmd = [sys.executable, __file__, "--worker", m, t, str(v), "--reps", str(args.reps)]
                cmd += ["--max-length", str(args.max_length)]
                r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
                if r.returncode:
                    sys.exit(f"{m} {t} {label} failed: {r.stderr.strip().splitlines()[-1]}")
                got.append(json.loads(r.stdout.strip().splitlines()[-1]))
            rows.append({"model": m, "task": t, "variants": dict(zip(VARIANTS, got))})
    table = Table(title=f"One LoRA training step (forward + backward, fp32, median of {args.reps})")
    for c in ("model", "task", "batch", "variant", "head positions", "step (s)", "peak RSS (MB)", "loss"):
        table.add_column(c)
    for row in rows:
        full, kept = row["variants"].values()
        for label, r in row["variants"].items():
            table.add_row(
                row["model"], row["task"], "x".join(map(str, r["batch"])), label, str(r["head_positions"]),
                f"{r['median_s']:.2f}", f"{r['peak_rss_mb']:.0f}", f"{r['loss']:.6f}",
            )  # fmt: skip
        row["speedup"] = full["median_s"] / kept["median_s"]
        row["rss_ratio"] = kept["peak_rss_mb"] / full["peak_rss_mb"]
        row["loss_abs_diff"] = abs(full["loss"] - kept["loss"])
    console.print(table)
    for row in rows:
        console.print(
            f"{row['model']} {row['task']}: {row['speedup']:.2f}x faster a step, peak RSS {row['rss_ratio']:.2f}x, "
            f"|loss difference| {row['loss_abs_diff']:.1e}"
        )
    if args.json:
        args.json.write_text(json.dumps({"reps": args.reps, "max_length": args.max_length, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
