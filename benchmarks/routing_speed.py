"""Routing cost per token: N patches routed (one shared base, stacked factors) vs one patch attached with PEFT
vs the bare base, on a forward pass over a batch (prefill) and on greedy decoding with a KV cache.

Patches: the directories given (--patches), else N random rank-8 patches on every linear projection of the
base (speed does not depend on what the factors learned). PHATGOOSE gates and descriptions are random too:
only their cost is measured. Goal: routed tokens/s within 1.3x of one attached patch. Memory: the set holds
the base once plus the stacked factors (reported), never a copy of the base per patch.

    python benchmarks/routing_speed.py [--base smollm2-135m] [--n 5] [--batch 4] [--seq 128] [--decode 16]
        [--reps 3] [--routers arrow,phatgoose,glider,mixture,uniform] [--json docs/benchmarks/routing_speed.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def random_patches(base: str, n: int, out: Path, rank: int = 8) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    from portllm import import_adapter
    from portllm.models import BaseRef, load_base

    ref = BaseRef.of(base)
    paths = []
    for i in range(n):
        model, _ = load_base(ref)
        torch.manual_seed(i)
        cfg = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=list(ref.arch.lora_targets), init_lora_weights=False
        )
        pm = get_peft_model(model, cfg)
        pm.save_pretrained(out / f"a{i}")
        paths.append(import_adapter(out / f"a{i}", ref, out / f"p{i}", task="sst2").path)
        del model, pm
    return paths


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--patches", default=None, help="comma-separated patch dirs (default: N random patches)")
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--decode", type=int, default=16, help="new tokens per row in the decode test (0: skip)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--routers", default="arrow,phatgoose,glider,mixture,uniform")
    ap.add_argument("--json", default="docs/benchmarks/routing_speed.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from portllm.eval import open_lm
    from portllm.models import load_base
    from portllm.routing import PatchSet, Request, get_router

    tmp = tempfile.TemporaryDirectory()
    paths = args.patches.split(",") if args.patches else random_patches(args.base, args.n, Path(tmp.name))
    ps = PatchSet(args.base, paths)
    tok = ps.tokenizer
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, tok.vocab_size - 1, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    texts = [f"request {j}: is this review positive or negative?" for j in range(args.batch)]
    for e in ps.experts:  # random descriptions: only the cost of the global router is measured
        e.embedding = torch.nn.functional.normalize(torch.randn(384, generator=g), dim=0).tolist()

    def fake_gates(router):  # random PHATGOOSE gates (their training is not what is timed)
        import portllm.routing.phatgoose as pg

        orig = pg.load_gates
        pg.load_gates = lambda pset, *a, **k: [
            {layer.name: torch.randn(layer.in_features, generator=g) for layer in pset.layers} for _ in pset.patches
        ]
        try:
            ps.use(router)
        finally:
            pg.load_gates = orig

    def prefill(model):
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, use_cache=False)

    def decode(model):
        with torch.inference_mode():
            model.generate(
                input_ids=ids[:, :32],
                attention_mask=mask[:, :32],
                max_new_tokens=args.decode,
                min_new_tokens=args.decode,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )

    rows: list[dict] = []

    def measure(label: str, model, ctx=None) -> None:
        import contextlib

        with ctx or contextlib.nullcontext():
            t = timed(lambda: prefill(model), args.reps)
            d = timed(lambda: decode(model), args.reps) if args.decode else None
        rows.append(
            {
                "variant": label,
                "prefill_tokens_per_s": args.batch * args.seq / t,
                "decode_tokens_per_s": args.batch * args.decode / d if d else None,
            }
        )
        print(f"  {label}: prefill {rows[-1]['prefill_tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)

    base_model, _ = load_base(args.base)
    measure("base (bare)", base_model)
    del base_model
    peft = open_lm(args.base, paths[0])
    measure("one patch (PEFT attach)", peft.model)
    del peft
    measure(f"set of {ps.n}, row selection (one patch per row)", ps.use(None).model,
            ps.rows([Request(patch=j % ps.n) for j in range(args.batch)]))  # fmt: skip
    for name in [r for r in args.routers.split(",") if r]:
        r = get_router(name)
        if r.needs_gates:
            fake_gates(r)
        else:
            ps.use(r)
        measure(f"set of {ps.n}, {name} ({', '.join(f'{k}={v}' for k, v in r.params().items() if k != 'router')})",
                ps.model, ps.rows([Request(text=t) for t in texts]))  # fmt: skip
    ref = rows[1]
    for row in rows:
        row["prefill_vs_one_patch"] = ref["prefill_tokens_per_s"] / row["prefill_tokens_per_s"]
        if row["decode_tokens_per_s"]:
            row["decode_vs_one_patch"] = ref["decode_tokens_per_s"] / row["decode_tokens_per_s"]
    base_bytes = sum(p.numel() * p.element_size() for p in ps.model.parameters())
    factor_bytes = sum(layer.A.numel() * 4 + layer.B.numel() * 4 for layer in ps.layers)
    result = {
        "base": args.base,
        "patches": len(paths),
        "batch": args.batch,
        "seq": args.seq,
        "decode_new_tokens": args.decode,
        "reps": args.reps,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "goal": "routed time per token <= 1.3x one attached patch (PEFT)",
        "memory": {"base_params_bytes": base_bytes, "stacked_factors_bytes": factor_bytes, "base_copies": 1},
        "rows": rows,
    }
    print(f"{'variant':<72} {'prefill tok/s':>13} {'x 1 patch':>9} {'decode tok/s':>12} {'x 1 patch':>9}")
    for row in rows:
        dec, ratio = row["decode_tokens_per_s"], row.get("decode_vs_one_patch")
        dec_s = f"{dec:.0f}" if dec else "-"
        ratio_s = f"{ratio:.2f}" if ratio else "-"
        print(
            f"{row['variant']:<72} {row['prefill_tokens_per_s']:>13.0f} {row['prefill_vs_one_patch']:>9.2f} "
            f"{dec_s:>12} {ratio_s:>9}"
        )
    print(f"memory: base {base_bytes / 2**20:.0f} MiB once + stacked factors {factor_bytes / 2**20:.1f} MiB")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
