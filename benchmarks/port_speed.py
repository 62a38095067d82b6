"""Port speed and memory: portllm vs PEFT merge_and_unload vs a plain file copy, in one run.

Cases: the embedded SmolLM2-135M (fp32) and a synthetic ~1.5B-parameter Llama checkpoint in
bf16 written to disk. Each method runs in its own subprocess that reports its wall time and
peak RSS (VmHWM). Targets on the 1.5B case: portllm peak RSS <= 30% of PEFT's, wall time
<= PEFT's and within 2x of the plain copy.

    python benchmarks/port_speed.py [--work DIR] [--json OUT.json] [--skip-large]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CHILD = r"""
import json, os, shutil, sys, time
from pathlib import Path
method, base, patch, out = sys.argv[1:5]
t0 = time.perf_counter()
if method == "portllm":
    from portllm import port
    port(patch, base, out)
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
    os.makedirs(out)
    for f in Path(base).iterdir():
        shutil.copy(f, Path(out) / f.name)
wall = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"wall_s": wall, "peak_rss_mb": int(hwm) / 1024}))
"""


def run_child(method: str, base: Path, patch: Path, out: Path) -> dict:
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", CHILD, method, str(base), str(patch), str(out)], capture_output=True, text=True
    )
    if r.returncode != 0:
        raise SystemExit(f"{method} failed:\n{r.stderr[-2000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = time.perf_counter() - t0
    res["out_bytes"] = sum(f.stat().st_size for f in out.iterdir())
    shutil.rmtree(out)
    return res


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
    from portllm.models import base_info, weight_index
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


def bench_case(label: str, base: Path, work: Path) -> dict:
    patch = random_patch(base, work / f"{label}-patch")
    res = {m: run_child(m, base, patch, work / f"{label}-{m}") for m in ("copy", "peft", "portllm")}
    n_params = sum(
        math.prod(info.shape) for _, info in __import__("portllm.models", fromlist=["x"]).weight_index(base).values()
    )
    res["params"] = n_params
    res["ratios"] = {
        "rss_portllm_over_peft": res["portllm"]["peak_rss_mb"] / res["peft"]["peak_rss_mb"],
        "wall_portllm_over_peft": res["portllm"]["wall_s"] / res["peft"]["wall_s"],
        "wall_portllm_over_copy": res["portllm"]["wall_s"] / res["copy"]["wall_s"],
    }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (needs ~12 GB free for the 1.5B case)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--skip-large", action="store_true", help="only the SmolLM2 case")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    from portllm import resolve_base

    work = args.work or Path(tempfile.mkdtemp(prefix="portllm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    console = Console(width=120)
    results = {}
    try:
        results["smollm2-135m (fp32)"] = bench_case("smol", resolve_base("smollm2-135m"), work)
        if not args.skip_large:
            console.print("[dim]writing the synthetic 1.5B bf16 checkpoint...[/dim]")
            big = synthetic_llama(work / "llama-1.5b")
            results["synthetic llama 1.5B (bf16)"] = bench_case("big", big, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    t = Table(title="port: portllm vs PEFT merge_and_unload+save_pretrained vs plain copy")
    for c in ("case", "params", "method", "wall s", "peak RSS MB", "written GB"):
        t.add_column(c, justify="right")
    for case, r in results.items():
        for m in ("copy", "peft", "portllm"):
            t.add_row(
                case,
                f"{r['params'] / 1e9:.2f}B",
                m,
                f"{r[m]['wall_s']:.1f}",
                f"{r[m]['peak_rss_mb']:.0f}",
                f"{r[m]['out_bytes'] / 1e9:.2f}",
            )
    console.print(t)
    for case, r in results.items():
        q = r["ratios"]
        console.print(
            f"{case}: portllm/PEFT peak RSS {q['rss_portllm_over_peft']:.2f}x, "
            f"portllm/PEFT wall {q['wall_portllm_over_peft']:.2f}x, portllm/copy wall "
            f"{q['wall_portllm_over_copy']:.2f}x"
        )
    big = results.get("synthetic llama 1.5B (bf16)")
    if big:
        q = big["ratios"]
        ok = (
            q["rss_portllm_over_peft"] <= 0.30
            and q["wall_portllm_over_peft"] <= 1.0
            and q["wall_portllm_over_copy"] <= 2.0
        )
        console.print(
            f"targets on 1.5B (RSS <= 0.30x PEFT, wall <= PEFT, wall <= 2x copy): "
            f"{'[green]met[/green]' if ok else '[red]NOT met[/red]'}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
