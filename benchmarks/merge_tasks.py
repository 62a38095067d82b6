"""Task patches vs their merges on real data: each task's score for each single patch and each merge.

Given patches trained on the same base for several tasks (e.g. from `portllm reproduce`'s cache or
`portllm train`), merges them with every method, scores every single patch and every merge on
every task (first --limit eval examples), ports the best merge onto an evolved base and scores it
there too, and writes a markdown table and JSON.

    python benchmarks/merge_tasks.py --patch sst2=P1 --patch boolq=P2 --patch winogrande=P3 \
        --base smollm2-135m --evolved DIR --limit 200 --out docs/merging
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patch", action="append", required=True, help="TASK=PATCH_DIR (repeat)")
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--evolved", default=None, help="an evolved base to port the merges onto")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--rank", type=int, default=24)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", type=Path, default=Path("docs/merging"))
    args = ap.parse_args()

    from rich.console import Console

    from portllm import port
    from portllm.eval import evaluate, open_lm
    from portllm.merge import DENSITY, METHODS, merge, methods_with, similarity
    from portllm.patch import Patch
    from portllm.tasks import get_task

    console = Console(width=140)
    pairs = [p.split("=", 1) for p in args.patch]
    tasks = [get_task(t) for t, _ in pairs]
    singles = {t: Patch.load(p) for t, p in pairs}
    work = Path(tempfile.mkdtemp(prefix="portllm-merge-"))

    def score(model: str | Path, patch: Path | None) -> dict[str, float]:
        lm = open_lm(model, patch)
        res = evaluate(lm, tasks, limit=args.limit, data=args.data_dir)
        return {t: r.value for t, r in res.tasks.items()}

    rows: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    console.print("[dim]scoring the base and each single patch...[/dim]")
    rows["base (zero-shot)"] = score(args.base, None)
    for t, p in pairs:
        rows[f"single: {t}"] = score(args.base, Path(p))
    energy = {}
    for method in METHODS:  # every registered method, at its parameters' defaults
        console.print(f"[dim]merging with {method}...[/dim]")
        merged, rep = merge(list(singles.values()), method, rank=args.rank, seed=0)
        merged.save(work / method)
        energy[method] = rep.energy_kept_mean
        rows[f"merge: {method}"] = score(args.base, work / method)
    ported = {}
    if args.evolved:
        best = max(METHODS, key=lambda m: sum(rows[f"merge: {m}"].values()))
        console.print(f"[dim]porting the {best} merge onto the evolved base...[/dim]")
        port(work / best, args.evolved, work / "ported")
        rows["evolved base (zero-shot)"] = score(args.evolved, None)
        rows[f"evolved + ported merge: {best}"] = score(work / "ported", None)
        ported = {"method": best}
    sim = similarity(list(singles.values()))
    args.out.mkdir(parents=True, exist_ok=True)
    names = [t.name for t in tasks]
    md = [
        f"# Merging task patches ({', '.join(names)}) on {args.base}",
        "",
        f"Each row scores one model on the first {args.limit} eval examples of each task (accuracy, %). Merges: "
        f"rank-{args.rank} "
        f"patches re-factored by SVD from the merged full updates; {'/'.join(methods_with('density'))} at density "
        f"{DENSITY.default}, DARE seed 0.",
        "",
        "| model | " + " | ".join(names) + " | mean |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for label, r in rows.items():
        md.append(
            f"| {label} | "
            + " | ".join(f"{100 * r[n]:.1f}" for n in names)
            + f" | {100 * sum(r.values()) / len(r):.1f} |"
        )
    md += [
        "",
        f"Energy kept by the rank-{args.rank} re-factoring (mean over layers): "
        + ", ".join(f"{m} {e:.1%}" for m, e in energy.items())
        + ".",
        "",
        "Cosine similarity of the single patches' updates: "
        + ", ".join(
            f"{names[i]}–{names[j]} {sim[i][j]:+.3f}" for i in range(len(names)) for j in range(i + 1, len(names))
        )
        + ".",
        "",
        f"Command: `python benchmarks/merge_tasks.py {' '.join('--patch ' + p for p in args.patch)} --base {args.base}"
        + (f" --evolved {args.evolved}" if args.evolved else "")
        + f" --limit {args.limit}`; {(time.perf_counter() - t0) / 60:.1f} min.",
    ]
    (args.out / "merging.md").write_text("\n".join(md) + "\n")
    (args.out / "merging.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "energy_kept": energy,
                "similarity": sim,
                "ported": ported,
                "limit": args.limit,
                "rank": args.rank,
            },
            indent=2,
        )
    )
    console.print("\n".join(md))


if __name__ == "__main__":
    main()
