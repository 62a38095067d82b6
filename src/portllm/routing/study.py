"""The routing study: one patch set on one base, scored on a mixed held-in suite and a held-out suite.

Held-in: the patches' own tasks, their examples interleaved in one stream, so only each row's text tells
a router the task. Held-out: tasks no patch was made for. Each router is compared with the oracle (each
example gets its own task's patch), the best single merge of all patches (the registry's methods with
default parameters; the best held-in average is taken, i.e. selected on the test suite, which favours
the merge) and the bare base. Results are cached per (what was scored, suite, patch-set hash, limit),
so a rerun redoes only what changed. Writes OUT/report.json, OUT/report.md and OUT/routing.png.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..errors import PortLLMError
from ..eval import evaluate, open_lm
from ..merge import merge
from ..stats import wilson
from ..tasks import get_task, load_examples, task_key
from .describe import routing_record, task_prompts
from .embed import shared_encoder
from .patchset import PatchSet
from .phatgoose import GateConfig
from .routers import PER_TOKEN, Router, get_router, router_class, router_from
from .score import score_tasks

CHART = "routing.png"
DESCRIPTION_EXAMPLES = 8  # train prompts averaged into an auto description's embedding
DEFAULT_ROUTERS = ("glider", "arrow", "phatgoose", "mixture", "uniform")  # `route-study --routers` default


@dataclass
class StudyConfig:
    base: str
    patches: list[str]
    held_out: list[str]
    routers: list[str] = field(default_factory=lambda: list(DEFAULT_ROUTERS))
    limit: int = 200
    top_k: int | None = None  # given to every router that takes it (None: each router's default)
    alpha: float | None = None  # likewise
    merges: list[str] = field(default_factory=lambda: ["linear", "ties", "dare_ties"])
    batch_size: int = 16
    dtype: str = "float32"
    gates: GateConfig = field(default_factory=GateConfig)  # PHATGOOSE gate training (phatgoose, glider)
    # glider's k and α chosen on a dev slice: the `tune` eval examples per held-in task that follow the
    # `limit` test examples (disjoint from them); 0 = no tuning, glider runs with its defaults only
    tune: int = 0
    tune_top_k: tuple[int, ...] = (1, 2)
    tune_alpha: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0)


def _summary(run: Any) -> dict[str, Any]:
    k = sum(1 for r in run.records if r["correct"])
    lo, hi = wilson(k, run.n)
    return {"value": run.value, "k": k, "n": run.n, "ci_low": lo, "ci_high": hi, "majority": run.majority}


def _mean(rows: dict[str, dict[str, Any]], tasks: list[str]) -> float:
    return sum(rows[t]["value"] for t in tasks) / len(tasks) if tasks else 0.0


class _Cache:
    def __init__(self, root: Path, ident: dict[str, Any]):
        self.root, self.ident = Path(root), ident

    def get(self, what: dict[str, Any], suite: list[str], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        key = json.dumps({**self.ident, "what": what, "suite": [task_key(t) for t in suite]}, sort_keys=True)
        f = self.root / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
        if f.is_file():
            return json.loads(f.read_text())["tasks"]
        res = compute()
        self.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(f, json.dumps({"key": json.loads(key), "tasks": res}, indent=2))
        return res


def run_study(
    cfg: StudyConfig,
    out: str | Path,
    cache: str | Path,
    data: str | Path | None = None,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Score everything (cached), write the report, return report.json's content. The steps: open the set
    and check its tasks, score the base and the oracle, each router, glider's tuning, the merges; report."""
    pset, tasks_in = _open_set(cfg, data, log)
    described = _ensure_descriptions(pset, data, log)
    scorer = _Scorer(cfg, pset, Path(cache), data, log)
    loaded_in = {t: (get_task(t), load_examples(get_task(t), "eval", data, cfg.limit)) for t in tasks_in}
    loaded_out = {t: (get_task(t), load_examples(get_task(t), "eval", data, cfg.limit)) for t in cfg.held_out}
    base_in = scorer.scored(None, loaded_in)
    base_out = scorer.scored(None, loaded_out) if loaded_out else {}
    oracle = scorer.scored({"router": "oracle"}, loaded_in)
    routers = _score_routers(cfg, pset, scorer, loaded_in, loaded_out)
    tuning = (
        _tune(cfg, tasks_in, data, scorer.scored, routers, loaded_in, loaded_out)
        if cfg.tune and "glider" in cfg.routers
        else None
    )
    merges = {m: scorer.merged(m, tasks_in) for m in cfg.merges}
    report = _report(cfg, pset, described, tasks_in, base_in, base_out, oracle, routers, merges)
    report["tuning"] = tuning
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "report.json", json.dumps(report, indent=2))
    write_text_atomic(out / "report.md", markdown(report))
    chart(report, out / CHART)
    return report


def _open_set(cfg: StudyConfig, data: str | Path | None, log: Callable[[str], Any]) -> tuple[PatchSet, list[str]]:
    """The patch set and its held-in tasks; one line for a set the study cannot use (a patch with no task, two
    patches for one task, a held-out task that has a patch, an unknown task)."""
    if not cfg.patches:
        raise PortLLMError("the study needs patches (--patches P1,P2,...)")
    pset = PatchSet(cfg.base, cfg.patches, dtype=cfg.dtype)
    pset.data, pset.log, pset.gate_config = data, log, cfg.gates
    tasks_in = [e.task for e in pset.experts]
    if None in tasks_in:
        raise PortLLMError(f"patch {pset.experts[tasks_in.index(None)].path} records no task; the study needs it")
    if len(set(tasks_in)) != len(tasks_in):
        raise PortLLMError("two patches are for the same task; the held-in suite needs one patch per task")
    overlap = set(tasks_in) & set(cfg.held_out)
    if overlap:
        raise PortLLMError(f"held-out task {sorted(overlap)[0]} has a patch in the set; held-out means no patch")
    for t in cfg.held_out:
        get_task(t)
    return pset, [t for t in tasks_in if t is not None]


class _Scorer:
    """Scores of the set under a router (or the base) and of each merge of all patches, through the cache:
    keyed by what was scored, the suite, the set's hash, limit, dtype, data and gate recipe."""

    def __init__(self, cfg: StudyConfig, pset: PatchSet, root: Path, data: str | Path | None, log: Callable):
        self.cfg, self.pset, self.root, self.data, self.log = cfg, pset, root, data, log
        ident = {"set": pset.set_hash(), "limit": cfg.limit, "dtype": cfg.dtype, "data": str(data)}
        self.cache = _Cache(root, ident | {"gates": cfg.gates.key()})
        self.desc_key = {e.name: (e.description, (e.embedding or [0])[:4]) for e in pset.experts}

    def scored(self, router_spec: dict[str, Any] | None, loaded: dict[str, Any], part: str = "test") -> dict:
        """{task: summary} for the router `router_spec` ({"router": name, knob: value}; None: the base)."""
        what = {"router": router_spec, "descriptions": self.desc_key} if router_spec else {"router": None}
        if part != "test":
            what["part"] = part
        label = router_spec["router"] if router_spec else "base"

        def compute() -> dict[str, Any]:
            n = {len(ex) for _, ex in loaded.values()}
            self.log(f"scoring {label} on {', '.join(loaded)} ({'/'.join(map(str, sorted(n)))} each, {part})")
            r = router_from(router_spec) if router_spec else None
            runs = score_tasks(self.pset, r, loaded, self.cfg.batch_size)
            return {t: _summary(run) for t, run in runs.items()}

        return self.cache.get(what, list(loaded), compute)

    def merged(self, method: str, tasks_in: list[str]) -> dict[str, Any]:
        """{task: summary} for all patches merged with `method` (default parameters), attached to the base."""

        def compute() -> dict[str, Any]:
            self.log(f"merging all patches with {method} and scoring it")
            merged, _ = merge(self.pset.patches, method)
            d = self.root / "merges" / f"{method}-{self.pset.set_hash()}"
            if not (d / "portllm.json").is_file():
                merged.save(d, overwrite=True)
            lm = open_lm(self.cfg.base, d, dtype=self.cfg.dtype)
            res = evaluate(lm, [get_task(t) for t in tasks_in], self.cfg.limit, self.data)
            return {t: _merge_summary(r) for t, r in res.tasks.items()}

        return self.cache.get({"merge": method}, tasks_in, compute)


def _merge_summary(r: Any) -> dict[str, Any]:
    """A TaskResult as the study's summary (`_summary` of a TaskRun), k recovered from the accuracy."""
    k = round(r.value * r.n)
    return {"value": r.value, "k": k, "n": r.n, "ci_low": r.ci_low, "ci_high": r.ci_high, "majority": r.majority}


def study_router(name: str, cfg: StudyConfig) -> Router:
    """Router `name` with the study's --top-k / --alpha given to each router that takes that knob (by design:
    one flag for the whole study; a router without the knob runs with its own parameters)."""
    takes = {k.name for k in router_class(name, PER_TOKEN).knobs}
    given = {"top_k": cfg.top_k, "alpha": cfg.alpha}
    return get_router(name, **{k: v for k, v in given.items() if k in takes})


def _score_routers(cfg: StudyConfig, pset: PatchSet, scorer: _Scorer, loaded_in, loaded_out) -> dict[str, Any]:
    """Each configured router on the held-in and held-out suites, with the parameters it ran with."""
    routers: dict[str, Any] = {}
    for name in cfg.routers:
        r = study_router(name, cfg)
        spec = _spec(r)
        if name == "mixture":  # its clusters (derived from the patches) go in the report
            r.prepare(pset)
            routers[name] = {"params": r.params()}
        else:
            routers[name] = {"params": spec}
        routers[name]["held_in"] = scorer.scored(spec, loaded_in)
        routers[name]["held_out"] = scorer.scored(spec, loaded_out) if loaded_out else {}
    return routers


def _tune(cfg: StudyConfig, tasks_in: list[str], data, scored, routers, loaded_in, loaded_out) -> dict[str, Any]:
    """Choose glider's k and α by held-in accuracy on a dev slice disjoint from the test slice, then score
    the choice on the test suites as router "glider (tuned)". Ties go to the smaller k, then smaller α."""
    dev = {}
    for t in tasks_in:
        task = get_task(t)
        ex = load_examples(task, "eval", data, cfg.limit + cfg.tune)[cfg.limit :]
        if not ex:
            raise PortLLMError(
                f"{t} has no eval examples after the first {cfg.limit}: tuning needs a dev slice beyond the "
                "test slice (lower --limit or --tune 0)"
            )
        dev[t] = (task, ex)
    grid = []
    for k in cfg.tune_top_k:
        for a in cfg.tune_alpha:
            res = scored(_spec(get_router("glider", top_k=k, alpha=a)), dev, "dev")
            grid.append({"top_k": k, "alpha": a, "dev": _mean(res, tasks_in), "per_task": res})
    best = max(grid, key=lambda g: g["dev"])  # max keeps the first of equals: the grid's order breaks ties
    spec = _spec(get_router("glider", top_k=best["top_k"], alpha=best["alpha"]))
    routers["glider (tuned)"] = {
        "params": spec,
        "held_in": scored(spec, loaded_in),
        "held_out": scored(spec, loaded_out) if loaded_out else {},
    }
    return {
        "router": "glider",
        "dev_rows": [cfg.limit, cfg.limit + cfg.tune],
        "dev_n": {t: len(ex) for t, (_, ex) in dev.items()},
        "grid": [{k: v for k, v in g.items() if k != "per_task"} for g in grid],
        "chosen": {"top_k": best["top_k"], "alpha": best["alpha"], "dev": best["dev"]},
    }


def _spec(router: Any) -> dict[str, Any]:
    """A router's parameters as a cache key and a way to rebuild it (mixture's clusters are derived, not set)."""
    return {k: v for k, v in router.params().items() if k != "clusters"}


def _ensure_descriptions(pset: PatchSet, data: str | Path | None, log: Callable[[str], Any]) -> dict[str, str]:
    """Patches without a stored description get their task definition's, in memory (their files are left alone)."""
    sources = {}
    enc = None
    for e in pset.experts:
        if e.embedding is not None:
            sources[e.name] = "manifest"
            continue
        enc = enc or shared_encoder()
        task = get_task(e.task)
        rec = routing_record(
            task.description or task.name, "task definition", task_prompts(e.task, DESCRIPTION_EXAMPLES, data), enc
        )
        e.description, e.embedding = rec["description"], rec["embedding"]["vector"]
        sources[e.name] = f"task definition + {DESCRIPTION_EXAMPLES} train prompts (in memory)"
        log(f"{e.name}: no stored description; using {e.description!r} + {DESCRIPTION_EXAMPLES} train prompts")
    return sources


def _report(cfg, pset, described, tasks_in, base_in, base_out, oracle, routers, merges) -> dict[str, Any]:
    merge_avg = {m: _mean(v, tasks_in) for m, v in merges.items()}
    best = max(merge_avg, key=merge_avg.get) if merge_avg else None
    held_in_r = {n: _mean(r["held_in"], tasks_in) for n, r in routers.items()}
    held_out_r = {n: _mean(r["held_out"], cfg.held_out) if cfg.held_out else None for n, r in routers.items()}
    o, b = _mean(oracle, tasks_in), _mean(base_in, tasks_in)
    bm = merge_avg.get(best) if best else None
    bo = _mean(base_out, cfg.held_out) if cfg.held_out else None
    goals = {}
    for n in routers:
        goals[n] = {
            "share_of_oracle": held_in_r[n] / o if o else None,
            "meets_95pct_oracle": bool(o and held_in_r[n] >= 0.95 * o),
            "minus_best_merge": held_in_r[n] - bm if bm is not None else None,
            "above_best_merge": bool(bm is not None and held_in_r[n] > bm),
            "held_out_minus_base": held_out_r[n] - bo if bo is not None and held_out_r[n] is not None else None,
            "held_out_at_least_base": bool(bo is not None and held_out_r[n] >= bo),
        }
    per_in = {
        t: {
            "metric": get_task(t).metric,
            "majority": base_in[t]["majority"],
            "base": base_in[t],
            "oracle": oracle[t],
            "best_merge": merges[best][t] if best else None,
            "merges": {m: merges[m][t] for m in merges},
            "routers": {n: routers[n]["held_in"][t] for n in routers},
        }
        for t in tasks_in
    }
    per_out = {
        t: {
            "metric": get_task(t).metric,
            "majority": base_out[t]["majority"],
            "base": base_out[t],
            "routers": {n: routers[n]["held_out"][t] for n in routers},
        }
        for t in cfg.held_out
    }
    return {
        "command": "portllm route-study " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        if sys.argv[1:2] == ["route-study"]
        else None,
        "config": asdict(cfg),
        "base": pset.ref.name,
        "base_fingerprint": pset.ref.fingerprint,
        "patch_set": pset.set_hash(),
        "patches": [
            {"name": e.name, "path": e.path, "task": e.task, "description": e.description, "source": described[e.name]}
            for e in pset.experts
        ],
        "limit": cfg.limit,
        "chart": CHART,
        "routers_params": {n: r["params"] for n, r in routers.items()},
        "held_in": {
            "tasks": tasks_in,
            "oracle": o,
            "best_merge": bm,
            "best_merge_method": best,
            "merges": merge_avg,
            "base": b,
            "routers": held_in_r,
            "per_task": per_in,
        },
        "held_out": {"tasks": cfg.held_out, "base": bo, "routers": held_out_r, "per_task": per_out},
        "goals": goals,
        "notes": [
            "averages are unweighted means over tasks of each task's accuracy (its metric: acc or acc_norm)",
            "best_merge: the merge method with the best held-in average, selected on the test suite (favours it)",
            "held-in examples are interleaved in one stream; each row is routed from its own prompt text only",
            "oracle: each example gets its own task's patch (needs the task label)",
        ],
    }


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _ci(r: dict[str, Any] | None) -> str:
    return "-" if not r else f"{100 * r['value']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"


def markdown(rep: dict[str, Any]) -> str:
    hi, ho = rep["held_in"], rep["held_out"]
    names = list(hi["routers"])
    lines = [
        "# Routing among patches: held-in and held-out",
        "",
        f"Base `{rep['base']}`, {len(rep['patches'])} patches, {rep['limit']} eval examples per task. "
        + (f"Made by `{rep['command']}`." if rep.get("command") else ""),
        "",
        "| | held-in avg | % of oracle | held-out avg |",
        "|---|---:|---:|---:|",
        f"| base | {_fmt(hi['base'])} | {_fmt(hi['base'] / hi['oracle'] if hi['oracle'] else None)} | "
        f"{_fmt(ho['base'])} |",
        f"| oracle | {_fmt(hi['oracle'])} | 100.0 | - |",
        f"| best merge ({hi['best_merge_method']}) | {_fmt(hi['best_merge'])} | "
        f"{_fmt(hi['best_merge'] / hi['oracle'] if hi['oracle'] and hi['best_merge'] is not None else None)} | - |",
    ]
    for n in names:
        share = hi["routers"][n] / hi["oracle"] if hi["oracle"] else None
        lines.append(f"| {n} | {_fmt(hi['routers'][n])} | {_fmt(share)} | {_fmt(ho['routers'].get(n))} |")
    lines += ["", "## Goals (GLIDER-style routing ≥ 95% of oracle and above the best merge; held-out ≥ base)", ""]
    lines += [
        "| router | share of oracle | − best merge (points) | held-out − base (points) | met |",
        "|---|---:|---:|---:|---|",
    ]
    for n, g in rep["goals"].items():
        met = g["meets_95pct_oracle"] and g["above_best_merge"] and (g["held_out_at_least_base"] or not ho["tasks"])
        lines.append(
            f"| {n} | {_fmt(g['share_of_oracle'])}% | {_fmt(g['minus_best_merge'])} | "
            f"{_fmt(g['held_out_minus_base'])} | {'yes' if met else 'no'} |"
        )
    lines += ["", "## Held-in, per task (accuracy %, Wilson 95% CI)", ""]
    cols = ["majority", "base", "oracle", "best merge", *names]
    lines += ["| task | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for t, r in hi["per_task"].items():
        cells = [_fmt(r["majority"]), _ci(r["base"]), _ci(r["oracle"]), _ci(r["best_merge"])]
        cells += [_ci(r["routers"][n]) for n in names]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    if ho["tasks"]:
        lines += ["", "## Held-out, per task", ""]
        cols = ["majority", "base", *names]
        lines += ["| task | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for t, r in ho["per_task"].items():
            cells = [_fmt(r["majority"]), _ci(r["base"])] + [_ci(r["routers"][n]) for n in names]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines += ["", "## Routers' parameters", ""]
    for n, p in rep["routers_params"].items():
        lines.append(f"- `{n}`: " + (", ".join(f"{k}={v}" for k, v in p.items() if k != "router") or "no parameters"))
    lines += ["", "Merges tried (held-in avg): " + ", ".join(f"{m} {_fmt(v)}" for m, v in hi["merges"].items()), ""]
    tu = rep.get("tuning")
    if tu:
        lo, hi_ = tu["dev_rows"]
        lines += [
            "## Tuning glider's k and α (dev slice, not the test examples)",
            "",
            f"Held-in eval rows {lo}–{hi_ - 1} of each task (disjoint from the {lo} test rows above); "
            f"chosen: top-k {tu['chosen']['top_k']}, α {tu['chosen']['alpha']:g} "
            f"(dev avg {_fmt(tu['chosen']['dev'])}), "
            'scored on the test suites as "glider (tuned)".',
            "",
            "| top-k | " + " | ".join(f"α {a:g}" for a in sorted({g["alpha"] for g in tu["grid"]})) + " |",
            "|---|" + "---:|" * len({g["alpha"] for g in tu["grid"]}),
        ]
        for k in sorted({g["top_k"] for g in tu["grid"]}):
            row = {g["alpha"]: g["dev"] for g in tu["grid"] if g["top_k"] == k}
            lines.append(f"| {k} | " + " | ".join(_fmt(row.get(a)) for a in sorted(row)) + " |")
        lines.append("")
    lines += ["## Patches", ""]
    for p in rep["patches"]:
        lines.append(f"- `{p['name']}` ({p['task']}): {p['description']!r} — {p['source']}")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in rep["notes"]] + [""]
    return "\n".join(lines)


def chart(rep: dict[str, Any], path: Path) -> None:
    """Held-in and held-out bars per router, with the oracle, best-merge and base lines."""
    import matplotlib  # deferred on purpose: only the chart needs it, and it is slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hi, ho = rep["held_in"], rep["held_out"]
    names = list(hi["routers"])
    panels = [("held-in (mixed)", hi)] + ([("held-out", ho)] if ho["tasks"] else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, suite) in zip(axes[0], panels):
        vals = [100 * suite["routers"][n] for n in names]
        ax.bar(names, vals, color="#4c72b0")
        for i, v in enumerate(vals):
            ax.text(i, v + 0.3, f"{v:.1f}", ha="center", fontsize=8)
        ax.axhline(100 * suite["base"], color="gray", ls="--", label=f"base {100 * suite['base']:.1f}")
        if suite.get("oracle") is not None:
            ax.axhline(100 * suite["oracle"], color="green", ls="-", label=f"oracle {100 * suite['oracle']:.1f}")
        if suite.get("best_merge") is not None:
            ax.axhline(
                100 * suite["best_merge"], color="orange", ls=":", label=f"best merge {100 * suite['best_merge']:.1f}"
            )
        lo = min(vals + [100 * suite["base"]]) - 5
        ax.set_ylim(max(0, lo), None)
        ax.set_title(f"{title}: {', '.join(suite['tasks'])}", fontsize=8)
        ax.set_ylabel("mean accuracy %")
        ax.legend(fontsize=7, loc="lower right")
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
