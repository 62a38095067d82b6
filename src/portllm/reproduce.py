"""The PortLLM experiment as one command: patch once, let the base evolve, port, compare.

For each task: θ zero-shot, θ' zero-shot, θ + Δθ, θ' + Δθ (ported, no training) and θ' + Δθ'
(LoRA re-tuned on θ' with the same recipe); plus the negative flips of θ' + Δθ against θ + Δθ,
and the cost of porting against re-tuning. Every step is cached by content under the cache
directory, so a rerun (or a resumed, interrupted run) only does what changed.

Training and porting run as child processes so each one's peak memory and wall time are its
own, not the parent's.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .errors import PortLLMError

VARIANTS = ("base", "evolved", "base+patch", "evolved+patch", "evolved+retuned")
LABELS = {
    "base": "θ (zero-shot)",
    "evolved": "θ' (zero-shot)",
    "base+patch": "θ + Δθ",
    "evolved+patch": "θ' + Δθ (ported)",
    "evolved+retuned": "θ' + Δθ' (re-tuned)",
}
ENGINE_VERSION = "1"  # bump when scoring changes, to invalidate cached evals


@dataclass
class TaskPlan:
    steps: int
    eval_limit: int | None
    max_length: int = 256
    lr: float = 1e-3


@dataclass
class Profile:
    name: str
    tasks: dict[str, TaskPlan]
    corpus: str = "mix"
    evolve_steps: int = 40
    evolve_mode: str = "full"
    evolve_lr: float = 1e-4
    evolve_max_length: int = 128
    batch_size: int = 8
    dtype: str = "bfloat16"  # training; bf16 is faster on CPU and LoRA weights stay fp32
    eval_dtype: str = "float32"
    gen_tokens: int = 128
    seed: int = 0
    notes: list[str] = field(default_factory=list)


_PLANS = {  # one recipe per task, shared by both profiles so a --full run reuses a --quick run's cache
    "sst2": TaskPlan(60, None, 128),
    "boolq": TaskPlan(60, 300, 320),
    "mrpc": TaskPlan(60, None, 192),
    "rte": TaskPlan(60, None, 256),
    "wnli": TaskPlan(40, None, 192),
    "winogrande": TaskPlan(80, 400, 96),
    "gsm8k": TaskPlan(40, 80, 256),  # sized so --full fits 90 min on 2 cores
}
_NOTES = {
    "sst2": "SST-2: all 872 GLUE dev sentences",
    "boolq": "BoolQ: first 300 questions of our 2,000-question eval part",
    "mrpc": "MRPC: all 408 dev pairs",
    "rte": "RTE: all 177 questions of our eval part",
    "wnli": "WNLI: all 71 dev pairs",
    "winogrande": "WinoGrande: first 400 of the 1,267 dev sentences",
    "gsm8k": "GSM8K: first 80 test questions, greedy, at most 128 new tokens, flexible-extract exact match",
}
PROFILES: dict[str, Profile] = {
    name: Profile(name, {t: _PLANS[t] for t in tasks}, notes=[_NOTES[t] for t in tasks])
    for name, tasks in (("quick", ("sst2", "winogrande")), ("full", tuple(_PLANS)))
}


Log = Callable[[str], None]


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _files_key(files: list[Path]) -> list[tuple[str, int]]:
    return [(f.name, f.stat().st_size) for f in files]


def _child(args: list[str], log: Log) -> dict[str, Any]:
    """Run a portllm command in its own process and return its JSON answer."""
    cmd = [sys.executable, "-m", "portllm.cli", *args, "--json"]
    r = subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore")
    )
    if r.returncode != 0:
        raise PortLLMError(f"step failed: portllm {' '.join(args[:3])} ... (exit {r.returncode})")
    return json.loads(r.stdout)


def reproduce(
    base: str = "smollm2-135m",
    profile: str | Profile = "quick",
    tasks: list[str] | None = None,
    out: str | Path = "runs/reproduce",
    data: str | Path | None = None,
    cache: str | Path | None = None,
    log: Log = print,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Run the grid and write OUT/report.json, OUT/report.md and OUT/*.png."""
    from .evolve import EvolveConfig, corpus_files, evolve
    from .models import cache_root, fingerprint, resolve_base
    from .tasks import data_dir, get_task

    prof = PROFILES[profile] if isinstance(profile, str) else profile
    if tasks:
        unknown = [t for t in tasks if get_task(t).name not in _PLANS]
        if unknown:
            raise PortLLMError(f"no recipe for task {unknown[0]}")
        names = [get_task(t).name for t in tasks]
        prof = replace(prof, tasks={n: _PLANS[n] for n in names}, notes=[_NOTES[n] for n in names])
    data = data_dir(data)
    if data is None:
        raise PortLLMError("reproduce needs the benchmark data: set --data-dir or PORTLLM_DATA")
    cache = Path(cache) if cache else cache_root() / "reproduce"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    theta = resolve_base(base)
    fp_theta = fingerprint(theta)
    log(f"θ  = {base} ({fp_theta})")

    # θ': continued pretraining, cached by parent, corpus and recipe
    ecfg = EvolveConfig(
        mode=prof.evolve_mode,
        steps=prof.evolve_steps,
        lr=prof.evolve_lr,
        batch_size=prof.batch_size,
        max_length=prof.evolve_max_length,
        seed=prof.seed,
        dtype="float32" if prof.evolve_mode == "full" else prof.dtype,
    )  # bf16 AdamW would lose small updates
    evolved = cache / "evolved" / _key(fp_theta, prof.corpus, _files_key(corpus_files(prof.corpus, data)), ecfg.key())
    t0 = time.perf_counter()
    if not (evolved / "portllm_lineage.json").is_file():
        log(f"evolving θ -> θ' ({prof.evolve_mode}, {prof.evolve_steps} steps on '{prof.corpus}')...")
        evolve(theta, prof.corpus, evolved, ecfg, data=data, overwrite=True, progress=show_progress)
    lineage = json.loads((evolved / "portllm_lineage.json").read_text())
    timings["evolve"] = time.perf_counter() - t0
    fp_evolved = lineage["fingerprint"]
    log(f"θ' = {evolved} ({fp_evolved}); drift {_fmt_drift(lineage['drift'])}")

    report: dict[str, Any] = {
        "profile": prof.name,
        "base": {"name": base, "fingerprint": fp_theta},
        "evolved": {
            "path": str(evolved),
            "fingerprint": fp_evolved,
            "corpus": prof.corpus,
            "steps": lineage["steps"],
            "mode": prof.evolve_mode,
            "drift": lineage["drift"],
            "wall_s": lineage["wall_s"],
        },
        "settings": {
            "train": {
                "rank": 8,
                "alpha": 16,
                "targets": "q,k,v,o,gate,up,down",
                "batch_size": prof.batch_size,
                "dtype": prof.dtype,
                "seed": prof.seed,
            },
            "eval_dtype": prof.eval_dtype,
            "notes": prof.notes,
        },
        "tasks": {},
        "efficiency": {},
        "flips": {},
        "per_task_cost": {},
    }
    for name, plan in prof.tasks.items():
        task = get_task(name)
        log(f"\n[{name}] {plan.steps} steps x {prof.batch_size}, eval on {plan.eval_limit or 'all'} examples")
        targs = [
            "--steps",
            str(plan.steps),
            "--batch-size",
            str(prof.batch_size),
            "--lr",
            str(plan.lr),
            "--max-length",
            str(plan.max_length),
            "--seed",
            str(prof.seed),
            "--dtype",
            prof.dtype,
            "--eval-limit",
            "0",
            "--data-dir",
            str(data),
        ]
        tkey = _key(name, targs, ENGINE_VERSION)
        patch = cache / "patches" / f"{name}-{_key(fp_theta, tkey)}"
        retuned = cache / "patches" / f"{name}-{_key(fp_evolved, tkey)}"
        for where, base_dir, dest in (("θ", theta, patch), ("θ'", evolved, retuned)):
            if not (dest / "portllm.json").is_file():
                log(f"  training Δ on {where}...")
                _child(
                    ["train", "--base", str(base_dir), "--task", name, "--out", str(dest), "--overwrite", *targs], log
                )
        train_rec = json.loads((retuned / "portllm.json").read_text())["extra"]["training"]

        # the port itself, measured in its own process; the ported directory is evaluated, then dropped
        port_rec_file = cache / "ports" / f"{_key(_patch_sha(patch), fp_evolved)}.json"
        ported = cache / "ported" / port_rec_file.stem
        evals: dict[str, dict[str, Any]] = {}
        specs = {
            "base": (theta, None),
            "evolved": (evolved, None),
            "base+patch": (theta, patch),
            "evolved+patch": (ported, None),
            "evolved+retuned": (evolved, retuned),
        }
        fps = {"base": fp_theta, "evolved": fp_evolved}
        for v in VARIANTS:
            model_fp = fps.get(v, fp_evolved if v != "base+patch" else fp_theta)
            pkey = _patch_sha(
                patch if v in ("base+patch", "evolved+patch") else retuned if v == "evolved+retuned" else None
            )
            ekey = _key(
                model_fp, pkey, v == "evolved+patch", name, plan.eval_limit, prof.eval_dtype, ENGINE_VERSION, str(data)
            )
            edir = cache / "evals" / f"{name}-{v.replace('+', '_')}-{ekey}"
            if not (edir / "results.json").is_file():
                if v == "evolved+patch" and not (ported / "config.json").is_file():
                    log("  porting Δθ onto θ' (no training)...")
                    rec = _child(["port", str(patch), "--base", str(evolved), "--out", str(ported), "--overwrite"], log)
                    port_rec_file.parent.mkdir(parents=True, exist_ok=True)
                    write_text_atomic(port_rec_file, json.dumps(rec))
                log(f"  eval {LABELS[v]}...")
                _eval_into(specs[v][0], specs[v][1], task, plan.eval_limit, prof, data, edir, show_progress)
            evals[v] = json.loads((edir / "results.json").read_text())["tasks"][name] | {"dir": str(edir)}
        if ported.exists():
            shutil.rmtree(ported, ignore_errors=True)
        port_rec = json.loads(port_rec_file.read_text()) if port_rec_file.is_file() else {}
        report["tasks"][name] = {v: evals[v]["value"] for v in VARIANTS} | {
            "metric": evals["base"]["metric"],
            "n": evals["base"]["n"],
            "stderr": {v: evals[v]["stderr"] for v in VARIANTS},
            "ported_minus_retuned": evals["evolved+patch"]["value"] - evals["evolved+retuned"]["value"],
            "ported_minus_evolved": evals["evolved+patch"]["value"] - evals["evolved"]["value"],
        }
        from .evaluate import compare

        report["flips"][name] = compare(evals["base+patch"]["dir"], evals["evolved+patch"]["dir"])["tasks"][name]
        report["per_task_cost"][name] = {
            "port": {
                "wall_s": port_rec.get("wall_s"),
                "peak_rss_mb": port_rec.get("peak_rss_mb"),
                "trainable_params": 0,
            },
            "retune": {
                "wall_s": train_rec["wall_s"],
                "peak_rss_mb": train_rec["peak_rss_mb"],
                "peak_gpu_mb": train_rec.get("peak_gpu_mb"),
                "trainable_params": train_rec["trainable_params"],
                "steps": train_rec["steps"],
                "examples_seen": train_rec["examples_seen"],
            },
        }
        r = report["tasks"][name]
        log(f"  {name}: " + "  ".join(f"{LABELS[v]} {r[v]:.3f}" for v in VARIANTS))
        gc.collect()

    costs = report["per_task_cost"].values()
    port_ok = [c["port"] for c in costs if c["port"]["wall_s"] is not None]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    port = {
        "wall_s": mean([c["wall_s"] for c in port_ok]),
        "peak_rss_mb": max((c["peak_rss_mb"] for c in port_ok), default=None),
        "trainable_params": 0,
    }
    retune = {
        "wall_s": mean([c["retune"]["wall_s"] for c in costs]),
        "peak_rss_mb": max(c["retune"]["peak_rss_mb"] for c in costs),
        "trainable_params": max(c["retune"]["trainable_params"] for c in costs),
    }
    report["efficiency"] = {
        "port": port,
        "retune": retune,
        "ratios": {
            "memory_retune_over_port": retune["peak_rss_mb"] / port["peak_rss_mb"] if port["peak_rss_mb"] else None,
            "time_retune_over_port": retune["wall_s"] / port["wall_s"] if port["wall_s"] else None,
        },
        "note": "wall time and peak RSS of each step's own process (CPU); port = merged port of Δθ onto θ' "
        "(mean time, max memory over tasks); retune = LoRA fine-tuning of θ' with the same recipe",
    }
    rows = list(report["tasks"].values())
    report["average"] = {v: mean([r[v] for r in rows]) for v in VARIANTS} | {
        "ported_minus_retuned": mean([r["ported_minus_retuned"] for r in rows])
    }
    report["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    timings["total"] = time.perf_counter() - t_start
    report["timings_s"] = timings
    write_text_atomic(out / "report.json", json.dumps(report, indent=2))
    write_text_atomic(out / "report.md", markdown(report))
    charts(report, out)
    return report


def _patch_sha(p: Path | None) -> str | None:
    if p is None:
        return None
    return json.loads((p / "portllm.json").read_text())["files"]["adapter_model.safetensors"]


def _eval_into(
    model: Path,
    patch: Path | None,
    task: Any,
    limit: int | None,
    prof: Profile,
    data: Path,
    out: Path,
    show_progress: bool,
) -> None:
    from .evaluate import evaluate, open_lm

    lm = open_lm(model, patch, dtype=prof.eval_dtype)
    t = replace(task, max_new_tokens=prof.gen_tokens) if task.kind == "gen" else task
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    evaluate(lm, [t], limit=limit, data=data, out=tmp, show_progress=show_progress)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    del lm
    gc.collect()


def _fmt_drift(d: dict[str, float]) -> str:
    keys = [k for k in ("q_proj", "up_proj", "embed_tokens") if k in d]
    return ", ".join(f"{k} {d[k]:.3%}" for k in keys)


def markdown(r: dict[str, Any]) -> str:
    """The report as a person reads it: Table 2 (accuracy), Table 6 (cost), flips, settings."""
    lines = [
        f"# PortLLM reproduction ({r['profile']} profile)",
        "",
        f"Base θ: `{r['base']['name']}` ({r['base']['fingerprint']}). Evolved θ': continued pretraining "
        f"({r['evolved']['mode']}, {r['evolved']['steps']} steps on `{r['evolved']['corpus']}`), "
        f"{r['evolved']['fingerprint']}. Drift ||θ'−θ||/||θ||: {_fmt_drift(r['evolved']['drift'])}.",
        "",
        "## Accuracy (Table 2 of the paper)",
        "",
        "| task | n | metric | " + " | ".join(LABELS[v] for v in VARIANTS) + " | ported − re-tuned |",
        "|---|---|---|" + "---|" * len(VARIANTS) + "---|",
    ]
    for name, t in r["tasks"].items():
        lines.append(
            f"| {name} | {t['n']} | {t['metric']} | "
            + " | ".join(f"{100 * t[v]:.1f} ± {100 * t['stderr'][v]:.1f}" for v in VARIANTS)
            + f" | {100 * t['ported_minus_retuned']:+.1f} |"
        )
    a = r["average"]
    lines.append(
        "| **average** | | | "
        + " | ".join(f"**{100 * a[v]:.1f}**" for v in VARIANTS)
        + f" | **{100 * a['ported_minus_retuned']:+.1f}** |"
    )
    e = r["efficiency"]
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    lines += [
        "",
        "## Cost of porting vs re-tuning (Table 6 of the paper)",
        "",
        "| | trainable parameters | peak memory (RSS, MB) | wall time (s) |",
        "|---|---|---|---|",
        f"| port θ' + Δθ (no training) | 0 | {fmt(e['port']['peak_rss_mb'], '.0f')} | "
        f"{fmt(e['port']['wall_s'], '.1f')} |",
        f"| re-tune Δθ' on θ' (LoRA) | {e['retune']['trainable_params']:,} | "
        f"{fmt(e['retune']['peak_rss_mb'], '.0f')} | {fmt(e['retune']['wall_s'], '.1f')} |",
        f"| ratio re-tune / port | | {fmt(e['ratios']['memory_retune_over_port'], '.1f')}x | "
        f"{fmt(e['ratios']['time_retune_over_port'], '.1f')}x |",
        "",
        e["note"] + ".",
        "",
        "## What the update broke: θ' + Δθ against θ + Δθ",
        "",
        "| task | n | agreement | negative flips (right before, wrong after) | positive flips | negative flip rate |",
        "|---|---|---|---|---|---|",
    ]
    for name, f in r["flips"].items():
        lines.append(
            f"| {name} | {f['n']} | {100 * f['agreement']:.1f}% | {f['negative_flips']} | {f['positive_flips']} "
            f"| {100 * f['negative_flip_rate']:.1f}% |"
        )
    lines += [
        "",
        "## Settings",
        "",
        f"- LoRA: {json.dumps(r['settings']['train'])}",
        f"- eval dtype: {r['settings']['eval_dtype']}",
    ]
    lines += [f"- {n}" for n in r["settings"]["notes"]]
    lines += [
        f"- machine: {r['machine']['platform']}, {r['machine']['cpus']} CPUs",
        f"- total time: {r['timings_s']['total'] / 60:.1f} min",
        "",
        "![accuracy](accuracy.png)",
        "",
        "![cost](efficiency.png)",
        "",
    ]
    return "\n".join(lines)


def charts(r: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["tasks"])
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names) + 2), 4))
    w = 0.8 / len(VARIANTS)
    for k, v in enumerate(VARIANTS):
        xs = [i + (k - 2) * w for i in range(len(names))]
        ax.bar(
            xs,
            [100 * r["tasks"][n][v] for n in names],
            w,
            label=LABELS[v],
            yerr=[100 * r["tasks"][n]["stderr"][v] for n in names],
            capsize=2,
        )
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("PortLLM: does the patch survive the base update?")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)

    e = r["efficiency"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, label in ((axes[0], "peak_rss_mb", "peak memory (MB)"), (axes[1], "wall_s", "wall time (s)")):
        vals = [e["port"][key] or 0, e["retune"][key] or 0]
        ax.bar(["port (θ'+Δθ)", "re-tune (Δθ')"], vals, color=["tab:green", "tab:red"])
        ax.set_title(label)
        ax.set_ylim(0, 1.15 * max(vals + [1e-9]))
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(out / "efficiency.png", dpi=120)
    plt.close(fig)
