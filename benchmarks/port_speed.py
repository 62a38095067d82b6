"""Port speed and memory: portllm vs PEFT merge_and_unload vs a plain file copy, in one run.

Cases: the embedded SmolLM2-135M (fp32) and a synthetic ~1.5B-parameter Llama checkpoint in
bf16 written to disk. Each method runs in its own subprocess that reports its wall time (from
its first line, imports included) and peak RSS (VmHWM); portllm's also reports where its time
went (start-up, check, map, add, and the copy and fsync threads beside them).

What each side does: `cp -r` copies the bytes into the page cache and returns (no fsync: they reach the disk
later). portllm copies the shards' bytes in the kernel too (copy_file_range), updates each patched tensor in
place through a shared mapping of the output, starts each finished run's writeback at once, and fsyncs every file
before it renames the output into place (all or nothing even after a power cut); it does not hash its output (the
first `content_sha256` of it does).

NOTES (issue 18, the 2x target):
- The fsync stays. Without it the temp-dir-and-rename protocol still holds against a killed or failed process (the
  page cache keeps every byte, and the rename comes after the last one), but not against a power cut or kernel
  crash: ext4 can commit the rename before the shards' data, leaving an output in place whose shards are short or,
  where the flusher wrote a run between its kernel copy and its in-place update, full size but holding some of the
  base's values under a provenance that says "ported". `sync_wait` prints what durability costs the wall time (the
  fsyncs nothing else overlapped); each run's writeback starts as soon as it is final, so the disk works during the
  port rather than after it.
- `startup` is `import portllm` and no more: it no longer imports torch, and a merged port starts its kernel copy of
  the base's shards before it imports anything heavy. torch (~0.9 s) then loads inside `check`, beside the copy, and
  `overlap` is the copy's seconds before the merge loop began (torch's import and the check ran meanwhile). The
  wall time is about `startup` + max(copy, `check`) + the loop: on a small base the check is the critical path.
- The check imports transformers (~1.3 s) only to summarise a base's tokenizer it has not seen: the summary is
  remembered by the sha256 of the tokenizer files (`tokenizers.json` under the cache root), so a port onto a base
  checked before imports neither transformers nor PEFT. The untimed first use below takes the base's content hash
  and its tokenizer summary, as any first use of a base does.

Fair to the copy: the base is read once before anything is timed, so every method reads it from a
warm page cache; methods alternate within each round and each figure is the median of `--reps`
rounds; every output is deleted and the disk synced between runs, untimed, so one run's writeback
never lands on the next, and the machine then settles `--settle` seconds: a VM that hands freed memory
back to its host (this one has a virtio balloon) makes the next writer fault it back in, and a copy
started the instant a delete ended would write into warm pages that a later writer would
not (measured here: a 2.9 GB user-space copy took 3-4 s right after a delete, 6-8 s after 6 s).
The base is hashed and its tokenizer summarised once before the rounds (what the first use of any base costs,
printed apart): ports reuse both through the cache (the hash keyed on file stat, the summary on the tokenizer files'
sha256), as they do in use. The synthetic 1.5B base has no tokenizer: its check never loads transformers.

Targets on the 1.5B case: portllm peak RSS <= 30% of PEFT's, wall time <= PEFT's and within 2x of the
plain copy (`cp -r`), warm cache for both.

    python benchmarks/port_speed.py [--work DIR] [--json OUT.json] [--reps N] [--settle S] [--skip-large] [--skip-peft]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from portllm.models import weight_index

CHILD = r"""
import json, os, subprocess, sys, time
t0 = time.perf_counter()
from pathlib import Path
method, base, patch, out = sys.argv[1:5]
extra = {}
if method == "portllm":
    from portllm import port
    started = time.perf_counter()
    res = port(patch, base, out)
    extra = {"startup_s": started - t0, "stages": res.timings.to_dict()}
elif method == "peft":
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    cfg = json.loads((Path(base) / "config.json").read_text())
    dtype = getattr(torch, cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    model = PeftModel.from_pretrained(model, patch).merge_and_unload()
    model.save_pretrained(out)
elif method == "copy":
    subprocess.run(["cp", "-r", base, out], check=True)
elif method == "hash":  # a base's first use: its content hash and tokenizer summary, which later ports find cached
    from portllm.models import base_info
    base_info(base)
wall = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"wall_s": wall, "peak_rss_mb": int(hwm) / 1024, **extra}))
"""
METHODS = ("copy", "portllm", "peft")
STAGES = ("startup", "check", "overlap", "read", "add", "write", "sync", "wait", "sync_wait", "finish")


def run_child(method: str, base: Path, patch: Path, out: Path, env: dict[str, str], settle: float = 0.0) -> dict:
    if out.exists():
        shutil.rmtree(out)
    os.sync()
    time.sleep(settle)
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", CHILD, method, str(base), str(patch), str(out)], capture_output=True, text=True, env=env
    )
    if r.returncode != 0:
        raise SystemExit(f"{method} failed:\n{r.stderr[-2000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = time.perf_counter() - t0
    if out.exists():
        res["out_bytes"] = sum(f.stat().st_size for f in out.iterdir())
        shutil.rmtree(out)  # its dirty pages go with it: nothing is left to write back into the next run
    os.sync()
    return res


def warm_read(base: Path) -> float:
    """Read every file of `base` once, so each method finds it in the page cache."""
    t0 = time.perf_counter()
    for f in sorted(base.iterdir()):
        with open(f, "rb") as fh:
            while fh.read(16 << 20):
                pass
    return time.perf_counter() - t0


def synthetic_llama(
    d: Path, layers: int = 26, hidden: int = 2048, inter: int = 5632, vocab: int = 32000, shard_bytes: int = 500 * 2**20
) -> Path:
    """A ~1.5B-parameter Llama checkpoint in bf16, written tensor by tensor (never whole in memory)."""
    from portllm.stream import ShardWriter

    d.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    specs = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [(p + f"self_attn.{n}.weight", (hidden, hidden)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        specs += [
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
        specs += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    specs += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    shards, cur, size = [], [], 0
    for name, shape in specs:
        n = math.prod(shape) * 2
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    weight_map = {}
    g = torch.Generator().manual_seed(0)
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        w = ShardWriter(d / fname, [(n, "BF16", s) for n, s in shard], {"format": "pt"})
        for name, shape in shard:
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
            w.write(name, t.to(torch.bfloat16))
            weight_map[name] = fname
        w.close()
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def random_patch(base: Path, out: Path, rank: int = 8) -> Path:
    """A rank-8 LoRA patch on every linear projection of `base`, non-zero B, saved in the patch format."""
    from portllm.models import base_info
    from portllm.patch import Patch, new_manifest

    g = torch.Generator().manual_seed(1)
    tensors = {}
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for name, (_, info) in weight_index(base).items():
        mod = name[: -len(".weight")]
        if mod.rsplit(".", 1)[-1] in targets:
            o, i = info.shape
            tensors[f"{mod}.lora_A.weight"] = torch.randn(rank, i, generator=g) / math.sqrt(i)
            tensors[f"{mod}.lora_B.weight"] = torch.randn(o, rank, generator=g) * 0.01
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(targets),
        "fan_in_fan_out": False,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
    }
    p = Patch(config, tensors, new_manifest(base_info(base), config, tensors, "created", "benchmark"))
    p.save(out, overwrite=True)
    return out


def bench_case(label: str, base: Path, work: Path, reps: int, methods: tuple[str, ...], settle: float) -> dict:
    patch = random_patch(base, work / f"{label}-patch")
    env = dict(os.environ, PORTLLM_CACHE=str(work / "cache"))
    res: dict = {"warm_read_s": warm_read(base)}
    res["base_hash_once_s"] = run_child("hash", base, patch, work / f"{label}-hash", env)["wall_s"]
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(reps):  # alternating, so drift in the machine's load falls on every method alike
        for m in methods:
            runs[m].append(run_child(m, base, patch, work / f"{label}-{m}", env, settle))
    for m in methods:
        walls = [r["wall_s"] for r in runs[m]]
        med = runs[m][walls.index(statistics.median_low(walls))]
        res[m] = dict(med, wall_s=statistics.median(walls), runs_wall_s=walls)
    res["params"] = sum(math.prod(info.shape) for _, info in weight_index(base).values())
    ratios = {"wall_portllm_over_copy": res["portllm"]["wall_s"] / res["copy"]["wall_s"]}
    # each round's own pair (they ran back to back): a copy that is slow in one round is slow for both there
    rounds = [p["wall_s"] / c["wall_s"] for p, c in zip(runs["portllm"], runs["copy"])]
    ratios["wall_portllm_over_copy_rounds"] = rounds
    ratios["wall_portllm_over_copy_paired_median"] = statistics.median(rounds)
    if "peft" in res:
        ratios["rss_portllm_over_peft"] = res["portllm"]["peak_rss_mb"] / res["peft"]["peak_rss_mb"]
        ratios["wall_portllm_over_peft"] = res["portllm"]["wall_s"] / res["peft"]["wall_s"]
    res["ratios"] = ratios
    return res


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (needs ~12 GB free for the 1.5B case)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--reps", type=int, default=3, help="rounds per case; each figure is the median (default 3)")
    ap.add_argument("--settle", type=float, default=5.0, help="idle seconds before each timed run (default 5)")
    ap.add_argument("--skip-large", action="store_true", help="only the SmolLM2 case")
    ap.add_argument("--skip-peft", action="store_true", help="only portllm and the copy")
    args = ap.parse_args()
    from rich.console import Console

    from portllm import resolve_base

    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="portllm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    console = Console(width=120)
    console.print(f"machine: {machine()}")
    console.print(f"command: python benchmarks/port_speed.py {' '.join(sys.argv[1:])}")
    methods = tuple(m for m in METHODS if not (args.skip_peft and m == "peft"))
    results = {}
    try:
        smol = resolve_base("smollm2-135m")
        results["smollm2-135m (fp32)"] = bench_case("smol", smol, work, args.reps, methods, args.settle)
        if not args.skip_large:
            console.print("[dim]writing the synthetic 1.5B bf16 checkpoint...[/dim]")
            big = synthetic_llama(work / "llama-1.5b")
            results["synthetic llama 1.5B (bf16)"] = bench_case("big", big, work, args.reps, methods, args.settle)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report(console, results, methods, args.reps)
    elapsed = time.perf_counter() - started
    console.print(f"benchmark took {elapsed / 60:.1f} min")
    if args.json:
        meta = {"machine": machine(), "command": " ".join(["benchmarks/port_speed.py", *sys.argv[1:]])}
        run = dict(meta, took_s=elapsed, reps=args.reps, settle_s=args.settle)
        args.json.write_text(json.dumps({"_run": run, **results}, indent=2))


def report(console, results: dict, methods: tuple[str, ...], reps: int) -> None:
    from rich.table import Table

    t = Table(title=f"port: portllm vs PEFT merge_and_unload+save_pretrained vs cp -r (median of {reps}, warm cache)")
    for c in ("case", "params", "method", "wall s", "runs s", "peak RSS MB", "written GB"):
        t.add_column(c, justify="right")
    for case, r in results.items():
        for m in methods:
            t.add_row(
                case,
                f"{r['params'] / 1e9:.2f}B",
                m,
                f"{r[m]['wall_s']:.1f}",
                " ".join(f"{w:.1f}" for w in r[m]["runs_wall_s"]),
                f"{r[m]['peak_rss_mb']:.0f}",
                f"{r[m].get('out_bytes', 0) / 1e9:.2f}",
            )
    console.print(t)
    b = Table(title="where portllm's time goes (its median run, seconds; copy and fsync run on their own threads)")
    for c in ("case", *STAGES, "wall"):
        b.add_column(c, justify="right")
    for case, r in results.items():
        p = r["portllm"]
        st = dict(p["stages"], startup=p["startup_s"])
        b.add_row(case, *(f"{st.get(k, float('nan')):.2f}" for k in STAGES), f"{p['wall_s']:.2f}")
    console.print(b)
    console.print(
        "startup: import portllm (torch excluded: it loads inside check, beside the copy); check: import torch, "
        "patch load and compatibility check (the tokenizer summary from the cache); overlap: the copy's seconds "
        "before the merge loop began (check ran beside them); read: mapping the copied bytes of each "
        "patched tensor; add: updating it in place; write, sync: busy time of the copy (copy_file_range) and fsync "
        "threads (overlapped; each finished run's writeback starts at once); wait: the loop blocked on them; "
        "sync_wait: then blocked on the last fsyncs (what durability costs the wall time); finish: the output's "
        "fingerprint, provenance, the fsync of the small files, the rename. cp -r: no fsync, no hash; portllm: "
        "fsync of every file before the rename (kept: see the NOTES in this script), no hash of the output (taken "
        "on its first use); the copy starts right after startup, before torch is imported"
    )
    for case, r in results.items():
        q = r["ratios"]
        rounds = q["wall_portllm_over_copy_rounds"]
        line = (
            f"{case}: portllm/copy wall {q['wall_portllm_over_copy']:.2f}x (round by round: median "
            f"{q['wall_portllm_over_copy_paired_median']:.2f}x, {min(rounds):.2f}x to {max(rounds):.2f}x)"
        )
        if "wall_portllm_over_peft" in q:
            line += (
                f", portllm/PEFT wall {q['wall_portllm_over_peft']:.2f}x, "
                f"portllm/PEFT peak RSS {q['rss_portllm_over_peft']:.2f}x"
            )
        line += (
            f"; base read once {r['warm_read_s']:.1f} s, base hashed and its tokenizer summarised once "
            f"{r['base_hash_once_s']:.1f} s (untimed)"
        )
        console.print(line)
    big = results.get("synthetic llama 1.5B (bf16)")
    if big and "wall_portllm_over_peft" in big["ratios"]:
        q = big["ratios"]
        ok = (
            q["rss_portllm_over_peft"] <= 0.30
            and q["wall_portllm_over_peft"] <= 1.0
            and q["wall_portllm_over_copy"] <= 2.0
            and q["wall_portllm_over_copy_paired_median"] <= 2.0
        )
        console.print(
            f"targets on 1.5B (RSS <= 0.30x PEFT, wall <= PEFT, wall <= 2x copy in medians and round by round): "
            f"{'[green]met[/green]' if ok else '[red]NOT met[/red]'}"
        )


if __name__ == "__main__":
    main()
