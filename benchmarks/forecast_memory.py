"""Peak memory of `forecast` and `rescale`: one model at a time against both models at once, on the 1.47B model.

`forecast` compares θ+Δθ (the patch on OLD) with θ'+Δθ (the patch on NEW) and `rescale` compares θ+Δθ with
θ'+λΔθ for several λ. Both score one model, free it, then open the next, so their peak should be about one
model's, not two. This measures that, against the peer that keeps both models open (what `forecast` did
before) and against one model alone (open + score θ+Δθ, nothing else), each in its own process
(`portllm.isolate.run`: a spawned child, its peak RSS its own).

The model is `benchmarks/port_speed.py`'s synthetic 1.47B Llama in bfloat16 (~2.9 GB of weights), given
SmolLM2's tokenizer cut to the checkpoint's 32000 ids (the synthetic model has none; the first 32000 BPE
merges are a complete tokenizer on their own). NEW is OLD plus small deterministic noise on every projection,
written tensor by tensor; the patch is a random rank-8 LoRA on every projection (port_speed's `random_patch`).
Inputs: 16 short lines of plain text for `forecast`; 16 unlabeled sst2 train inputs for `rescale`. All three
models are built once and cached under --work; `--clean` deletes them at the end.

    python benchmarks/forecast_memory.py [--work DIR] [--json OUT.json] [--txt OUT.txt] [--n 16] [--skip-rescale]
                                         [--scales 0.5,1,2] [--clean]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # port_speed beside it; the children import this file

from port_speed import machine, random_patch, synthetic_llama  # noqa: E402
from portllm import isolate  # noqa: E402
from portllm.eval import open_lm, run_task  # noqa: E402
from portllm.forecast import choice_signals, forecast, text_lines, text_signals, weight_signals  # noqa: E402
from portllm.models import resolve_base, weight_files  # noqa: E402
from portllm.patch import Patch  # noqa: E402
from portllm.rescale import SCALES, choose_scale, scaled_patch  # noqa: E402
from portllm.stream import ShardWriter, read_header, read_tensor  # noqa: E402
from portllm.tasks import get_task, load_examples  # noqa: E402

DTYPE = "bfloat16"
VOCAB = 32000  # port_speed's synthetic_llama default
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NOISE = 0.002  # NEW = OLD + N(0, NOISE²) on every projection: 10% of the synthetic weights' 0.02 spread
RESCALE_TASK = "sst2"
LINES = [
    "The weather today is",
    "She opened the door and",
    "In the morning we usually",
    "The capital of France is",
    "My favourite book is about",
    "After dinner they went to",
    "The price of the house was",
    "He told me that the train",
    "Water boils at a temperature of",
    "The meeting was moved to",
    "Our new neighbours have a",
    "The best way to learn is",
    "At the end of the street there is",
    "I could not find my keys because",
    "The children played in the",
    "Every year the festival brings",
]


# --- building the models (once, cached under --work) ---------------------------------------------------------


def small_tokenizer(d: Path, vocab: int = VOCAB) -> None:
    """SmolLM2's byte-level BPE cut to its first `vocab` ids: every kept merge makes a kept token from kept ones,
    so it tokenizes any text with ids < vocab, as the synthetic checkpoint's embedding needs."""
    src = resolve_base("smollm2-135m")
    tok = json.loads((src / "tokenizer.json").read_text())
    model = tok["model"]
    model["vocab"] = {t: i for t, i in model["vocab"].items() if i < vocab}
    keep = model["vocab"]
    model["merges"] = [m for m in model["merges"] if m[0] in keep and m[1] in keep and m[0] + m[1] in keep]
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < vocab]
    (d / "tokenizer.json").write_text(json.dumps(tok))
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy2(src / name, d / name)


def build_old(work: Path) -> Path:
    """port_speed's 1.47B bf16 Llama plus a tokenizer; its index is written last, so its presence means done."""
    d = work / "llama-1.5b"
    if not (d / "model.safetensors.index.json").is_file():
        shutil.rmtree(d, ignore_errors=True)
        synthetic_llama(d)
    if not (d / "tokenizer.json").is_file():
        small_tokenizer(d)
    return d


def build_new(old: Path, work: Path, noise: float = NOISE) -> Path:
    """OLD plus seeded Gaussian noise on every projection, read and written one tensor at a time (never two
    models in memory), into a temporary directory renamed into place when complete."""
    d = work / "llama-1.5b-evolved"
    if (d / "model.safetensors.index.json").is_file():
        return d
    tmp = work / "llama-1.5b-evolved.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    g = torch.Generator().manual_seed(2)
    for f in weight_files(old):
        h = read_header(f)
        order = sorted(h.tensors.values(), key=lambda t: t.start)
        w = ShardWriter(tmp / f.name, [(t.name, t.dtype, t.shape) for t in order], h.metadata)
        for t in order:
            if t.name.split(".")[-2] in PROJECTIONS:
                x = read_tensor(t, f).float()
                w.write(t.name, (x + torch.randn(t.shape, generator=g) * noise).to(torch.bfloat16))
                del x
            else:
                w.copy(t.name, t, f)
        w.close()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (old / name).is_file():
            shutil.copy2(old / name, tmp / name)
    shutil.copy2(old / "model.safetensors.index.json", tmp / "model.safetensors.index.json")  # last: complete
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    return d


def build(work: Path) -> tuple[Path, Path, Path, Path]:
    old = build_old(work)
    new = build_new(old, work)
    patch = work / "patch-r8"
    if not (patch / "adapter_model.safetensors").is_file():
        random_patch(old, patch)
    inputs = work / "inputs.txt"
    inputs.write_text("\n".join(LINES) + "\n")
    return old, new, patch, inputs


# --- the cases: each runs in its own spawned process (isolate.run) -------------------------------------------


def next_token_probs(lm, texts: list[str]) -> list:
    """As forecast's own scoring of a text file: the next-token distribution after each line."""
    out = []
    with torch.inference_mode():
        for t in texts:
            ids = torch.tensor([lm.tokenizer(t).input_ids[-lm.max_length :]], dtype=torch.long)
            out.append(torch.softmax(lm.model(ids).logits[0, -1].float(), -1))
    return out


def case_one_model_text(old: str, patch: str, inputs: str, n: int) -> dict:
    """One model alone: open θ+Δθ and score it on the lines (forecast's first half), nothing else."""
    lm = open_lm(old, patch, dtype=DTYPE, device="cpu")
    return {"n": len(next_token_probs(lm, text_lines(Path(inputs), n)))}


def case_forecast_one(old: str, new: str, patch: str, inputs: str, n: int) -> dict:
    """The library's `forecast`: θ+Δθ scored and freed, then θ'+Δθ."""
    f = forecast(patch, base=new, old=old, inputs=inputs, n=n, dtype=DTYPE, device="cpu")
    o = f.outputs
    return {"n": o.n, "disagreement": o.disagreement, "mean_kl": o.mean_kl, "rel_drift": f.weights.rel_drift}


def case_forecast_both(old: str, new: str, patch: str, inputs: str, n: int) -> dict:
    """The peer, as `forecast` did before: both models opened, both alive while each is scored."""
    w = weight_signals(Patch.load(patch), new, old)
    lm_a = open_lm(old, patch, dtype=DTYPE, device="cpu")
    lm_b = open_lm(new, patch, dtype=DTYPE, device="cpu")
    texts = text_lines(Path(inputs), n)
    o = text_signals(next_token_probs(lm_a, texts), next_token_probs(lm_b, texts), Path(inputs))
    return {"n": o.n, "disagreement": o.disagreement, "mean_kl": o.mean_kl, "rel_drift": w.rel_drift}


def case_one_model_task(old: str, patch: str, n: int) -> dict:
    """One model alone on what rescale scores: open θ+Δθ and score the task's answer options."""
    task = get_task(RESCALE_TASK)
    lm = open_lm(old, patch, dtype=DTYPE, device="cpu")
    return {"n": len(run_task(lm, task, load_examples(task, "train", None, n)).records)}


def case_rescale_one(old: str, new: str, patch: str, n: int, scales: tuple[float, ...]) -> dict:
    """The library's `rescale` (choose_scale): θ+Δθ scored and freed, then each θ'+λΔθ in turn."""
    c = choose_scale(patch, old, new, RESCALE_TASK, n=n, scales=scales, dtype=DTYPE, device="cpu")
    return {"n": c.n, "scale": c.scale, "agreement": c.agreement}


def case_rescale_both(old: str, new: str, patch: str, n: int, scales: tuple[float, ...]) -> dict:
    """The peer: θ+Δθ kept open while each θ'+λΔθ is opened and scored beside it."""
    task = get_task(RESCALE_TASK)
    examples = load_examples(task, "train", None, n)
    ref_lm = open_lm(old, patch, dtype=DTYPE, device="cpu")
    ref = run_task(ref_lm, task, examples).records
    agreement = {}
    with tempfile.TemporaryDirectory(prefix=".rescale-") as tmp:
        for s in scales:
            p = patch if s == 1.0 else scaled_patch(patch, s, Path(tmp) / f"x{s:g}")
            lm = open_lm(new, p, dtype=DTYPE, device="cpu")
            sig = choice_signals(ref, run_task(lm, task, examples).records, examples, task)
            agreement[f"{s:g}"] = 1.0 - sig.disagreement
            del lm
            gc.collect()
    return {"n": len(examples), "agreement": agreement}


def measured(fn, *args) -> dict:
    """`fn(*args)` in a fresh spawned process: its result with that process's wall time and peak RSS."""
    import forecast_memory as me  # the module by name, so the spawned child can import the case

    result, usage = isolate.run(getattr(me, fn.__name__), *args)
    return {"peak_rss_mb": usage.peak_rss_mb, "wall_s": usage.wall_s, "rss_reset": usage.rss_reset, **result}


# --- the run ---------------------------------------------------------------------------------------------------


def run_cases(old: Path, new: Path, patch: Path, inputs: Path, n: int, scales, rescale: bool, say) -> dict:
    o, w, p, i = str(old), str(new), str(patch), str(inputs)
    res: dict = {"forecast": {}, "rescale": {}}
    f = res["forecast"]
    say("forecast: one model alone (open + score θ+Δθ)")
    f["one model alone"] = measured(case_one_model_text, o, p, i, n)
    say("forecast: one at a time (portllm.forecast.forecast)")
    f["one at a time"] = measured(case_forecast_one, o, w, p, i, n)
    say("forecast: both at once (the peer)")
    f["both at once"] = measured(case_forecast_both, o, w, p, i, n)
    if rescale:
        r = res["rescale"]
        say("rescale: one model alone (open + score θ+Δθ on the task)")
        r["one model alone"] = measured(case_one_model_task, o, p, n)
        say(f"rescale: one at a time (portllm.rescale.choose_scale, λ in {scales})")
        r["one at a time"] = measured(case_rescale_one, o, w, p, n, scales)
        say("rescale: both at once (the peer)")
        r["both at once"] = measured(case_rescale_both, o, w, p, n, scales)
    for what in res.values():
        if what:
            what["ratio_one_over_both"] = what["one at a time"]["peak_rss_mb"] / what["both at once"]["peak_rss_mb"]
            what["ratio_one_over_alone"] = what["one at a time"]["peak_rss_mb"] / what["one model alone"]["peak_rss_mb"]
    return res


def report(console, res: dict, weights_gb: float) -> None:
    from rich.table import Table

    t = Table(title=f"peak RSS, {DTYPE}, CPU: one model at a time vs both at once (each case its own process)")
    for c in ("command", "case", "peak RSS MB", "wall s", "checks"):
        t.add_column(c, justify="right")
    for cmd, cases in res.items():
        for case in ("one model alone", "one at a time", "both at once"):
            if case not in cases:
                continue
            r = cases[case]
            if "disagreement" in r:
                chk = f"n={r['n']} disagree={r['disagreement']:.3f} KL={r['mean_kl']:.4f}"
            elif "agreement" in r:
                chk = f"n={r['n']} agree " + " ".join(f"{k}:{v:.2f}" for k, v in r["agreement"].items())
            else:
                chk = f"n={r['n']}"
            t.add_row(cmd, case, f"{r['peak_rss_mb']:.0f}", f"{r['wall_s']:.1f}", chk)
    console.print(t)
    for cmd, cases in res.items():
        if cases:
            console.print(
                f"{cmd}: one-at-a-time / both-at-once peak RSS {cases['ratio_one_over_both']:.2f}x; "
                f"one-at-a-time / one model alone {cases['ratio_one_over_alone']:.2f}x "
                f"(the model's weights: {weights_gb:.2f} GB in {DTYPE})"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="cache for the three models (~6 GB); default a temp dir")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--txt", type=Path, default=None, help="also write this report here, the run's header on top")
    ap.add_argument("--n", type=int, default=16, help="inputs per model (default 16)")
    ap.add_argument("--scales", default=",".join(f"{s:g}" for s in SCALES), help="rescale's λ grid (comma list)")
    ap.add_argument("--skip-rescale", action="store_true", help="only forecast")
    ap.add_argument("--clean", action="store_true", help="delete the cached models at the end")
    args = ap.parse_args()
    from rich.console import Console

    started = time.perf_counter()
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python benchmarks/forecast_memory.py", *sys.argv[1:]])
    scales = tuple(float(s) for s in args.scales.split(","))
    console = Console(width=120, record=True)
    progress = Console(stderr=True)
    say = lambda m: progress.print(f"[dim]{m}[/dim]")  # noqa: E731
    header = [f"command: {command}", f"machine: {machine()}", f"date: {date}"]
    print("\n".join(header), flush=True)  # not recorded: --txt writes the header itself
    work = args.work or Path(tempfile.mkdtemp(prefix="portllm-fm-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        say("building (or reusing) the 1.47B OLD, the evolved NEW and the rank-8 patch...")
        t0 = time.perf_counter()
        old, new, patch, inputs = build(work)
        build_s = time.perf_counter() - t0
        weights_gb = sum(f.stat().st_size for f in weight_files(old)) / 1e9
        res = run_cases(old, new, patch, inputs, args.n, scales, not args.skip_rescale, say)
    finally:
        if args.clean or args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.skip_rescale:
        res.pop("rescale")
    report(console, res, weights_gb)
    elapsed = time.perf_counter() - started
    console.print(f"benchmark took {elapsed / 60:.1f} min (models built or reused in {build_s:.0f} s)")
    if args.txt:  # the header on top: command, machine, date, then the wall time and what was measured
        header += [
            f"wall: {elapsed / 60:.1f} min (models built or reused in {build_s:.0f} s)",
            f"dtype: {DTYPE} on the CPU; model: port_speed's synthetic Llama, 1.47B parameters, {weights_gb:.2f} GB "
            "of weights; each case in its own spawned process (portllm.isolate): peak RSS its own, wall its call",
        ]
        args.txt.write_text("\n".join(header) + "\n" + console.export_text().rstrip() + "\n")
    if args.json:
        run = {"command": command, "machine": machine(), "date": date, "took_s": elapsed, "build_s": build_s}
        run |= {"dtype": DTYPE, "weights_gb": weights_gb, "n": args.n, "scales": list(scales)}
        args.json.write_text(json.dumps({"_run": run, **res}, indent=2))


if __name__ == "__main__":
    main()
