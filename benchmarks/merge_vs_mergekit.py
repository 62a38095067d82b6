"""portllm merge vs mergekit: the same linear and TIES merges of the same inputs, in one run.

Inputs: three rank-8 LoRA patches on SmolLM2-135M (trained patches via --patches, else random
ones). mergekit merges full models, so each patch is first ported onto the base (θ + ΔW_i), and
TIES gets θ as its base model. portllm runs two ways: the dense merge (portllm's merge arithmetic
on the same task vectors W_i − θ mergekit sees, written as a full model) and the patch route users
take (`portllm merge` to a LoRA patch of rank R, then `portllm port`). Printed: wall time and peak
RSS of each, and the max absolute difference of the resulting weights from mergekit's.

    python benchmarks/merge_vs_mergekit.py [--patches P1 P2 P3] [--rank 24] [--density 0.5]

mergekit is installed into its own venv (.venv-mergekit, created if missing) beside torch 2.13.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT_PINS = ["torch==2.13.0", "mergekit==0.1.5"]

DENSE = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
from portllm.merge import merge_deltas
from portllm.models import copy_side_files, resolve_base
from portllm.patch import Patch
method, base, out, density, patch0, *fulls = sys.argv[1:]
# the same inputs mergekit sees: task vectors W_i - θ of the full models
d = resolve_base(base)
sd = load_file(d / "model.safetensors")
models = [load_file(Path(f) / "model.safetensors") for f in fulls]
for name in Patch.load(patch0).modules:
    w = sd[name + ".weight"]
    deltas = [m[name + ".weight"].float() - w.float() for m in models]
    sd[name + ".weight"] = (w.float() + merge_deltas(deltas, method, [1.0] * len(deltas), float(density))).to(w.dtype)
Path(out).mkdir()
copy_side_files(d, Path(out))
save_file(sd, str(Path(out) / "model.safetensors"), metadata={"format": "pt"})
"""


def ensure_mergekit() -> Path:
    venv = ROOT / ".venv-mergekit"
    py = venv / "bin" / "python"
    if not py.exists() or subprocess.run([str(py), "-c", "import mergekit"], capture_output=True).returncode != 0:
        print("installing mergekit into .venv-mergekit (once)...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *MERGEKIT_PINS], check=True)
    return venv / "bin"


def timed(cmd: list[str]) -> dict:
    """Run under /usr/bin/time -v: wall seconds and peak RSS of the whole command."""
    r = subprocess.run(
        ["/usr/bin/time", "-v", *cmd],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore"),
    )
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd[:3])}\n{r.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", r.stderr)
    h, m, s = (float(x) if x else 0.0 for x in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return {"wall_s": h * 3600 + m * 60 + s, "peak_rss_mb": rss / 1024}


def weights_diff(a: Path, b: Path) -> tuple[float, float]:
    """Max |difference| over all weights, and the share of entries differing by more than 1e-5."""
    from portllm.models import weight_index
    from portllm.stream import paired_tensors

    ia, ib = weight_index(a), weight_index(b)
    missing = [n for n in ia if n not in ib and n != "lm_head.weight"]  # lm_head is tied: one side may store it
    if missing:
        raise SystemExit(f"{missing[0]} missing from {b}")
    worst, differ, total = 0.0, 0, 0
    for _, x, y in paired_tensors(ia, ib, on_mismatch="raise"):
        worst = max(worst, float((x - y).abs().max()))
        differ += int(((x - y).abs() > 1e-5).sum())
        total += x.numel()
    return worst, differ / total


def random_patches(base: Path, work: Path, n: int = 3) -> list[Path]:
    from portllm.models import base_info, weight_index
    from portllm.patch import Patch, new_manifest

    info = base_info(base)
    out = []
    for k in range(n):
        g = torch.Generator().manual_seed(100 + k)
        tensors = {}
        for name, (_, t) in weight_index(base).items():
            mod = name[: -len(".weight")]
            if mod.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                o, i = t.shape
                tensors[f"{mod}.lora_A.weight"] = torch.randn(8, i, generator=g) / math.sqrt(i)
                tensors[f"{mod}.lora_B.weight"] = torch.randn(o, 8, generator=g) * 0.02
        config = {
            "peft_type": "LORA",
            "r": 8,
            "lora_alpha": 16,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": str(base),
        }
        p = work / f"patch{k}"
        Patch(config, tensors, new_manifest(info, config, tensors, "created", f"random{k}")).save(p)
        out.append(p)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--patches", nargs="*", type=Path, default=None, help="patches made on smollm2-135m (default: 3 random)"
    )
    ap.add_argument("--rank", type=int, default=24, help="rank of portllm's merged patch")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    from portllm import resolve_base

    console = Console(width=130)
    mk = ensure_mergekit()
    base = resolve_base("smollm2-135m")
    work = Path(tempfile.mkdtemp(prefix="portllm-mergekit-"))
    try:
        patches = args.patches or random_patches(base, work)
        full = []
        for k, p in enumerate(patches):  # mergekit needs whole models: θ + ΔW_i
            full.append(work / f"full{k}")
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "portllm.cli",
                    "port",
                    str(p),
                    "--base",
                    str(base),
                    "--out",
                    str(full[-1]),
                    "--json",
                ],
                check=True,
                capture_output=True,
            )
        results = {}
        for method in ("linear", "ties"):
            cfg = {
                "merge_method": method,
                "dtype": "float32",
                "models": [
                    {
                        "model": str(f),
                        "parameters": {"weight": 1.0, **({"density": args.density} if method == "ties" else {})},
                    }
                    for f in full
                ],
            }
            if method == "ties":
                cfg["base_model"] = str(base)
            (work / f"{method}.yml").write_text(json.dumps(cfg))
            res = {
                "mergekit": timed([str(mk / "mergekit-yaml"), str(work / f"{method}.yml"), str(work / f"mk-{method}")])
            }
            res["portllm dense"] = timed(
                [
                    sys.executable,
                    "-c",
                    DENSE,
                    method,
                    str(base),
                    str(work / f"pl-{method}"),
                    str(args.density),
                    str(patches[0]),
                    *map(str, full),
                ]
            )
            res["portllm merge (patch)"] = timed(
                [
                    sys.executable,
                    "-m",
                    "portllm.cli",
                    "merge",
                    *map(str, patches),
                    "--method",
                    method,
                    "--density",
                    str(args.density),
                    "--rank",
                    str(args.rank),
                    "--out",
                    str(work / f"patch-{method}"),
                    "--json",
                ]
            )
            res["portllm port (merged patch)"] = timed(
                [
                    sys.executable,
                    "-m",
                    "portllm.cli",
                    "port",
                    str(work / f"patch-{method}"),
                    "--base",
                    str(base),
                    "--out",
                    str(work / f"pp-{method}"),
                    "--json",
                ]
            )
            res["diff_dense"] = weights_diff(work / f"pl-{method}", work / f"mk-{method}")
            res["diff_patch"] = weights_diff(work / f"pp-{method}", work / f"mk-{method}")
            res["energy_kept_mean"] = json.loads((work / f"patch-{method}" / "portllm.json").read_text())["extra"][
                "merge"
            ]["energy_kept_mean"]
            results[method] = res
    finally:
        shutil.rmtree(work, ignore_errors=True)
    t = Table(
        title=f"3 rank-8 patches on SmolLM2-135M, fp32; TIES density {args.density}; portllm merged-patch rank "
        f"{args.rank}"
    )
    for c in ("method", "tool", "wall s", "peak RSS MB", "max |Δw| vs mergekit"):
        t.add_column(c, justify="right")
    for method, res in results.items():
        for tool in ("mergekit", "portllm dense", "portllm merge (patch)", "portllm port (merged patch)"):
            diff = {
                "portllm dense": f"{res['diff_dense'][0]:.2e} ({res['diff_dense'][1]:.4%} of entries > 1e-5)",
                "portllm port (merged patch)": f"{res['diff_patch'][0]:.2e} ({res['diff_patch'][1]:.2%} > 1e-5; "
                f"energy kept {res['energy_kept_mean']:.2%})",
            }.get(tool, "")
            t.add_row(method, tool, f"{res[tool]['wall_s']:.1f}", f"{res[tool]['peak_rss_mb']:.0f}", diff)
    console.print(t)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
