"""GPU check: eval, forecast, a short train and serve on SmolLM2 on CUDA, against the same on the CPU.

The CPU in fp32 is the reference. On the device, each check runs in fp32 (goal: >= 99% per-example agreement
with the CPU) and in bf16 (agreement reported, no goal: bf16 rounds differently by design):
- eval: sst2 answers (the option each example picks) and greedy gsm8k generations (identical text), the
  patch attached at runtime;
- forecast: the patch ported onto an evolved base, the predicted loss in points and the answer disagreement
  (agreement: the figures within 0.5 points);
- train: a few steps from the same seed (agreement: the share of steps whose loss is within 1%);
- serve: greedy completions through the OpenAI-compatible app (in-process, the engine on the device).
The patch is the CPU train's; the evolved base is SmolLM2 continued for a few LoRA steps on wikitext-2 and
merged (the library's `evolve`, on the CPU, cached under --work). Speed: CPU wall over device wall per check,
model loading excluded, after a warm-up on the device.

Nothing depends on this script and CI never runs it. Without CUDA it stops at once (exit code 2);
`--device cpu` is a dry run of every path against the CPU itself (agreement must be 100% in fp32).

    python benchmarks/gpu_check.py [--device cuda|cuda:N|cpu] [--work DIR] [--json OUT.json] [--limit 100]
"""

from __future__ import annotations

import argparse
import sys

import torch

NO_CUDA = "no CUDA device: run this where a GPU is available"
BASE = "smollm2-135m"
SERVE_PROMPTS = (
    "The capital of France is",
    "Question: What is 12 plus 7?\nAnswer:",
    "Once upon a time, in a small village,",
    "The best way to learn a new language is",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="the device checked against the CPU (cpu: a dry run)")
    ap.add_argument("--work", default=None, help="cache for the evolved base (default: a temp dir, deleted)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--limit", type=int, default=100, help="sst2 examples for eval (default 100)")
    ap.add_argument("--gen-limit", type=int, default=8, help="gsm8k prompts for the generation slice (default 8)")
    ap.add_argument("--gen-tokens", type=int, default=32, help="new tokens per generation (default 32)")
    ap.add_argument("--forecast-n", type=int, default=50, help="sst2 inputs per forecast (default 50)")
    ap.add_argument("--train-steps", type=int, default=8, help="steps per train (default 8)")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="device precisions (default float32,bfloat16)")
    args = ap.parse_args()
    if args.device.strip().lower() != "cpu" and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(run(args))


def run(args: argparse.Namespace) -> int:
    import json
    import shutil
    import tempfile
    import time
    from pathlib import Path

    from portllm.device import resolve_device

    started = time.perf_counter()
    device = resolve_device(args.device)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="portllm-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    dtypes = tuple(d.strip() for d in args.dtypes.split(","))
    try:
        evolved = evolved_base(work)
        say("train on cpu, float32 (the reference and the patch every other check uses)")
        ref_train = train_run("cpu", work / "patch-cpu", args.train_steps)
        patch = work / "patch-cpu"
        ref = {
            "eval": eval_run("cpu", "float32", patch, args),
            "forecast": forecast_run("cpu", "float32", patch, evolved, args),
            "serve": serve_run("cpu", "float32", patch),
            "train": ref_train,
        }
        rows, results = [], {"reference": {"device": "cpu", "dtype": "float32", **ref}}
        for dtype in dtypes:
            say(f"{device}, {dtype}")
            got = {
                "eval": eval_run(device, dtype, patch, args),
                "forecast": forecast_run(device, dtype, patch, evolved, args),
                "serve": serve_run(device, dtype, patch),
            }
            if dtype == "float32":  # training in bf16 is another recipe, not a check of the same one
                got["train"] = train_run(device, work / "patch-device", args.train_steps)
            results[f"{device} {dtype}"] = {"device": device, "dtype": dtype, **got}
            rows += compare(ref, got, dtype)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    ok = report(rows, device)
    elapsed = time.perf_counter() - started
    print(f"gpu check took {elapsed / 60:.1f} min on {describe(device)}")
    if args.json:
        meta = {"device": describe(device), "command": " ".join(["benchmarks/gpu_check.py", *sys.argv[1:]])}
        meta |= {"took_s": elapsed, "fp32_goals_met": ok, "dry_run": device == "cpu"}
        Path(args.json).write_text(json.dumps({"_run": meta, "rows": rows, "results": results}, indent=2))
    return 0 if ok else 1


def say(m: str) -> None:
    print(f"... {m}", file=sys.stderr, flush=True)


def describe(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))} (torch {torch.__version__})"
    import os
    import platform

    return f"CPU only, {os.cpu_count()} cores, {platform.processor() or platform.machine()} (torch {torch.__version__})"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


# ---------------------------------------------------------------- building what the checks need


def evolved_base(work):
    """SmolLM2 continued for a few LoRA steps on wikitext-2 and merged: a small, real base update (cached)."""
    from portllm.evolve import EvolveConfig, evolve

    out = work / "evolved"
    if not (out / "config.json").is_file():
        say("evolving SmolLM2 a few steps on the CPU (once; cached under --work)")
        cfg = EvolveConfig(
            steps=4,
            batch_size=2,
            max_length=128,
            lr=1e-3,
            mode="lora",
            rank=16,
            alpha=32.0,
            device="cpu",
            checkpoint_every=10**6,
        )
        evolve(BASE, "text/wikitext-2/valid.txt", out, cfg, overwrite=True)
    return out


# ---------------------------------------------------------------- one device, one precision


def eval_run(device: str, dtype: str, patch, args) -> dict:
    """sst2 answers and greedy gsm8k generations of SmolLM2 with the patch attached."""
    import time

    from portllm.eval import generate, open_lm, run_task
    from portllm.tasks import get_task, load_examples

    say(f"eval on {device}, {dtype}")
    lm = open_lm(BASE, patch, dtype=dtype, device=device)
    sst2, gsm8k = get_task("sst2"), get_task("gsm8k")
    mc = load_examples(sst2, "eval", None, args.limit)
    prompts = [e.prompt for e in load_examples(gsm8k, "eval", None, args.gen_limit)]
    run_task(lm, sst2, mc[:4])  # warm-up: kernels and allocator, untimed
    t0 = time.perf_counter()
    records = run_task(lm, sst2, mc).records
    sync(device)
    t1 = time.perf_counter()
    texts, _ = generate(lm, prompts, gsm8k.stop, args.gen_tokens, batch_size=8)
    sync(device)
    t2 = time.perf_counter()
    return {
        "mc_pred": [r["pred"] for r in records],
        "mc_scores": [r["scores"] for r in records],
        "mc_acc": sum(r["correct"] for r in records) / len(records),
        "gen": texts,
        "mc_wall_s": t1 - t0,
        "gen_wall_s": t2 - t1,
    }


def forecast_run(device: str, dtype: str, patch, evolved, args) -> dict:
    """The forecast of porting the patch onto the evolved base, both models run on the device."""
    import time

    from portllm.forecast import forecast

    say(f"forecast on {device}, {dtype}")
    t0 = time.perf_counter()
    f = forecast(patch, base=evolved, old=BASE, inputs="sst2", n=args.forecast_n, dtype=dtype, device=device)
    o = f.outputs
    return {
        "loss_points": f.loss_points,
        "disagreement": o.disagreement,
        "mean_kl": o.mean_kl,
        "expected_change": o.expected_change,
        "wall_s": time.perf_counter() - t0,
    }


def train_run(device: str, out, steps: int) -> dict:
    """A few fp32 steps of sst2 from seed 0; the losses step by step."""
    from portllm.train import TrainConfig, train

    say(f"train on {device}, float32")
    cfg = TrainConfig(steps=steps, batch_size=4, max_length=128, device=device, dtype="float32", checkpoint_every=10**6)
    r = train(BASE, "sst2", out, cfg, overwrite=True)
    return {"losses": r.losses, "wall_s": r.wall_s}


def serve_run(device: str, dtype: str, patch) -> dict:
    """Greedy completions from the OpenAI-compatible app, in-process, the engine on the device."""
    import time

    from fastapi.testclient import TestClient

    from portllm.serve import Engine, EngineConfig, create_app

    say(f"serve on {device}, {dtype}")
    engine = Engine(BASE, {"p": str(patch)}, EngineConfig(device=device, dtype=dtype), name=BASE)
    body = {"model": "p", "max_tokens": 16, "temperature": 0}
    texts = []
    with TestClient(create_app(engine)) as http:
        http.post("/v1/completions", json=body | {"prompt": "Hello"})  # warm-up
        t0 = time.perf_counter()
        for prompt in SERVE_PROMPTS:
            r = http.post("/v1/completions", json=body | {"prompt": prompt})
            if r.status_code != 200:
                raise SystemExit(f"serve on {device}: HTTP {r.status_code}: {r.text[:300]}")
            texts.append(r.json()["choices"][0]["text"])
        wall = time.perf_counter() - t0
    return {"texts": texts, "wall_s": wall}


# ---------------------------------------------------------------- comparing with the CPU


def compare(ref: dict, got: dict, dtype: str) -> list[dict]:
    """Per check: n, agreement with the CPU fp32 reference, and the CPU wall over the device wall."""

    def row(check: str, n: int, same: float, ref_s: float, dev_s: float, note: str = "") -> dict:
        goal = None if dtype != "float32" else same >= 0.99
        return {
            "check": check,
            "dtype": dtype,
            "n": n,
            "agreement": same,
            "cpu_s": ref_s,
            "device_s": dev_s,
            "speedup": ref_s / dev_s if dev_s else None,
            "goal_met": goal,
            "note": note,
        }

    share = lambda a, b: sum(x == y for x, y in zip(a, b)) / max(1, len(a))  # noqa: E731
    e, re_ = got["eval"], ref["eval"]
    diff = max(abs(x - y) for a, b in zip(e["mc_scores"], re_["mc_scores"]) for x, y in zip(a, b))
    rows = [
        row(
            "eval sst2 (answer)",
            len(e["mc_pred"]),
            share(e["mc_pred"], re_["mc_pred"]),
            re_["mc_wall_s"],
            e["mc_wall_s"],
            f"acc {re_['mc_acc']:.2f} vs {e['mc_acc']:.2f}; max |Δ loglik| {diff:.2e}",
        ),
        row("eval gsm8k (greedy text)", len(e["gen"]), share(e["gen"], re_["gen"]), re_["gen_wall_s"], e["gen_wall_s"]),
    ]
    f, rf = got["forecast"], ref["forecast"]
    close = abs(f["loss_points"] - rf["loss_points"]) <= 0.5 and abs(f["disagreement"] - rf["disagreement"]) <= 0.005
    rows.append(
        row(
            "forecast sst2 (loss, disagreement)",
            1,
            float(close),
            rf["wall_s"],
            f["wall_s"],
            f"loss {rf['loss_points']:+.2f} vs {f['loss_points']:+.2f} pts; "
            f"disagree {rf['disagreement']:.3f} vs {f['disagreement']:.3f}",
        )
    )
    s, rs = got["serve"], ref["serve"]
    rows.append(
        row(
            "serve /v1/completions (greedy text)",
            len(s["texts"]),
            share(s["texts"], rs["texts"]),
            rs["wall_s"],
            s["wall_s"],
        )
    )
    if "train" in got:
        t, rt = got["train"], ref["train"]
        steps = [abs(a - b) <= 0.01 * abs(b) for a, b in zip(t["losses"], rt["losses"])]
        rows.append(
            row(
                "train sst2 (loss per step within 1%)",
                len(steps),
                sum(steps) / len(steps),
                rt["wall_s"],
                t["wall_s"],
                f"last loss {rt['losses'][-1]:.4f} vs {t['losses'][-1]:.4f}",
            )
        )
    return rows


def report(rows: list[dict], device: str) -> bool:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{device} against the CPU in fp32 (agreement: per example; speed: CPU wall / {device} wall)")
    for c in ("check", "dtype", "n", "agreement", "cpu s", "device s", "speed", "fp32 goal", "note"):
        t.add_column(c, justify="left" if c in ("check", "note") else "right")
    for r in rows:
        goal = "-" if r["goal_met"] is None else ("met" if r["goal_met"] else "NOT met")
        speed = f"{r['speedup']:.1f}x" if r["speedup"] else "-"
        t.add_row(
            r["check"],
            r["dtype"],
            str(r["n"]),
            f"{r['agreement']:.1%}",
            f"{r['cpu_s']:.2f}",
            f"{r['device_s']:.2f}",
            speed,
            goal,
            r["note"],
        )
    Console(width=160).print(t)
    ok = all(r["goal_met"] for r in rows if r["goal_met"] is not None)
    print(f"fp32 agreement >= 99% on every check: {'met' if ok else 'NOT met'}")
    return ok


if __name__ == "__main__":
    main()
