"""The routing study: one patch set on one base, scored on a mixed held-in suite and a held-out suite.

Held-in: the patches' own tasks, their examples interleaved in one stream, so only each row's text tells
a router the task. Held-out: tasks no patch was made for. Each router is compared with the oracle (each
example gets its own task's patch), the best single merge of all patches and the bare base.

Without the leak (issue 21): the held-in test rows are also scored in paraphrased wordings of each task's
prompt (wording.py, paraphrases.yaml) that no description, gate or tuning step ever sees, side by side with
the original wording; a description that contains a held-in task's template is refused; the best merge and
glider's k, α are chosen on a dev slice (the `tune` eval rows after the `limit` test rows), never on the
test rows. Results are cached per (what was scored, suite, wording, patch-set hash, limit), so a rerun
redoes only what changed. Writes OUT/report.json, OUT/report.md and OUT/routing.png.
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..errors import PortLLMError
from ..eval import open_lm, run_task
from ..merge import merge
from ..stats import wilson
from ..tasks import Task, get_task, load_examples, task_key
from .describe import DESCRIPTION_MAX, routing_record
from .embed import shared_encoder
from .patchset import PatchSet
from .phatgoose import GateConfig
from .routers import PER_TOKEN, Router, get_router, router_class, router_from
from .score import score_tasks
from .study_report import CHART, chart, markdown
from .wording import leaked, load_paraphrases, task_wording, wordings_for

DEFAULT_ROUTERS = ("glider", "arrow", "phatgoose", "mixture", "uniform")  # `route-study --routers` default
LEARNED_SE = 2.0  # a patch "learned" its task when it beats θ and the majority class by more than this many SE

Loaded = dict[str, tuple[Task, list]]  # {task: (task, its examples)}: one suite


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
    # the dev slice: the `dev` eval examples per held-in task that follow the `limit` test examples (disjoint
    # from them); the best merge (and with `tune`, glider's k, α) is chosen on it. 0 = none: then no merges
    dev: int = 100
    tune: bool = False
    tune_top_k: tuple[int, ...] = (1, 2)
    tune_alpha: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0)
    # held-in test rows also scored in paraphrased wordings (wording.py): the file (None: the shipped one)
    paraphrases: bool = True
    paraphrase_file: str | None = None
    descriptions: str | None = None  # a folder of hand-written descriptions, <patch name>.txt, used in memory


@dataclass
class Suites:
    """What is scored: the held-in test rows, the held-out rows, the dev slice, the paraphrased test rows."""

    test: Loaded
    held_out: Loaded
    dev: Loaded | None
    paraphrased: list[Loaded]  # one suite per wording index (wording j of every task that has one)


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
    and check its tasks and descriptions, score the base and the oracle, each router, glider's tuning and the
    merges (chosen on the dev slice), then the paraphrased wordings; report."""
    pset, tasks_in = _open_set(cfg, data, log)
    para = wordings_for(tasks_in, load_paraphrases(cfg.paraphrase_file)) if cfg.paraphrases else {}
    described = describe_set(pset, cfg, tasks_in, para, log)
    scorer = _Scorer(cfg, pset, Path(cache), data, log)
    suites = _suites(cfg, tasks_in, para, data)
    base_in = scorer.scored(None, suites.test)
    base_out = scorer.scored(None, suites.held_out) if suites.held_out else {}
    oracle = scorer.scored({"router": "oracle"}, suites.test)
    routers = _score_routers(cfg, pset, scorer, suites.test, suites.held_out)
    tuning = _tune(cfg, tasks_in, scorer, routers, suites) if cfg.tune else None
    merges = _best_merge(cfg, tasks_in, scorer, suites)
    paraphrased = _score_paraphrased(scorer, routers, merges, suites) if suites.paraphrased else None
    report = _report(cfg, pset, described, tasks_in, base_in, base_out, oracle, routers, merges)
    report["held_in_paraphrased"] = _paraphrased_report(paraphrased, tasks_in, para) if paraphrased else None
    report["goals_suite"] = "held_in_paraphrased" if paraphrased else "held_in"
    report["goals"] = _goals(report[report["goals_suite"]], report["held_out"])
    report["tuning"] = tuning
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "report.json", json.dumps(report, indent=2))
    write_text_atomic(out / "report.md", markdown(report))
    chart(report, out / CHART)
    return report


def _open_set(cfg: StudyConfig, data: str | Path | None, log: Callable[[str], Any]) -> tuple[PatchSet, list[str]]:
    """The patch set and its held-in tasks; one line for a set the study cannot use (a patch with no task, two
    patches for one task, a held-out task that has a patch, an unknown task, merges without a dev slice)."""
    if not cfg.patches:
        raise PortLLMError("the study needs patches (--patches P1,P2,...)")
    if (cfg.merges or cfg.tune) and not cfg.dev:
        raise PortLLMError(
            "the best merge and glider's tuning are chosen on a dev slice, never on the test rows: give --dev N "
            "(the N eval rows per task after --limit), or --merges '' and no --tune"
        )
    if cfg.tune and "glider" not in cfg.routers:
        raise PortLLMError("--tune chooses glider's k and α: add glider to --routers, or drop --tune")
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


def _suites(cfg: StudyConfig, tasks_in: list[str], para: dict[str, list[Task]], data) -> Suites:
    """Test rows 0..limit-1 (original and paraphrased wordings), dev rows limit..limit+dev-1, held-out rows."""
    test = {t: (get_task(t), load_examples(get_task(t), "eval", data, cfg.limit)) for t in tasks_in}
    held_out = {t: (get_task(t), load_examples(get_task(t), "eval", data, cfg.limit)) for t in cfg.held_out}
    dev = None
    if cfg.dev and (cfg.merges or cfg.tune):
        dev = {}
        for t in tasks_in:
            ex = load_examples(get_task(t), "eval", data, cfg.limit + cfg.dev)[cfg.limit :]
            if not ex:
                raise PortLLMError(
                    f"{t} has no eval examples after the first {cfg.limit}: the dev slice (glider's tuning, the best "
                    "merge) needs rows beyond the test slice (lower --limit, or --dev 0 --merges '')"
                )
            dev[t] = (get_task(t), ex)
    paraphrased = []
    for j in range(max((len(v) for v in para.values()), default=0)):
        paraphrased.append(
            {t: (ws[j], load_examples(ws[j], "eval", data, cfg.limit)) for t, ws in para.items() if j < len(ws)}
        )
    return Suites(test, held_out, dev, paraphrased)


class _Scorer:
    """Scores of the set under a router (or the base) and of each merge of all patches, through the cache:
    keyed by what was scored, the suite, its wording, the set's hash, limit, dtype, data and gate recipe."""

    def __init__(self, cfg: StudyConfig, pset: PatchSet, root: Path, data: str | Path | None, log: Callable):
        self.cfg, self.pset, self.root, self.data, self.log = cfg, pset, root, data, log
        ident = {"set": pset.set_hash(), "limit": cfg.limit, "dtype": cfg.dtype, "data": str(data)}
        self.cache = _Cache(root, ident | {"gates": cfg.gates.key()})
        self.desc_key = {e.name: (e.description, (e.embedding or [0])[:4]) for e in pset.experts}

    @staticmethod
    def _what(what: dict[str, Any], loaded: Loaded, part: str) -> dict[str, Any]:
        if part != "test":
            what["part"] = part
        if part.startswith("paraphrase"):  # the wording is part of what was scored
            what["templates"] = {t: task.make.prompt.text for t, (task, _) in loaded.items()}
        return what

    def scored(self, router_spec: dict[str, Any] | None, loaded: Loaded, part: str = "test") -> dict:
        """{task: summary} for the router `router_spec` ({"router": name, knob: value}; None: the base)."""
        what = {"router": router_spec, "descriptions": self.desc_key} if router_spec else {"router": None}
        label = router_spec["router"] if router_spec else "base"

        def compute() -> dict[str, Any]:
            n = {len(ex) for _, ex in loaded.values()}
            self.log(f"scoring {label} on {', '.join(loaded)} ({'/'.join(map(str, sorted(n)))} each, {part})")
            r = router_from(router_spec) if router_spec else None
            runs = score_tasks(self.pset, r, loaded, self.cfg.batch_size)
            return {t: _summary(run) for t, run in runs.items()}

        return self.cache.get(self._what(what, loaded, part), list(loaded), compute)

    def merged(self, method: str, loaded: Loaded, part: str = "test") -> dict[str, Any]:
        """{task: summary} for all patches merged with `method` (default parameters), attached to the base."""

        def compute() -> dict[str, Any]:
            self.log(f"merging all patches with {method} and scoring it ({part})")
            merged, _ = merge(self.pset.patches, method)
            d = self.root / "merges" / f"{method}-{self.pset.set_hash()}"
            if not (d / "portllm.json").is_file():
                merged.save(d, overwrite=True)
            lm = open_lm(self.cfg.base, d, dtype=self.cfg.dtype)
            return {t: _summary(run_task(lm, task, ex, self.cfg.batch_size)) for t, (task, ex) in loaded.items()}

        return self.cache.get(self._what({"merge": method}, loaded, part), list(loaded), compute)


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
        routers[name]["spec"] = spec
        routers[name]["held_in"] = scorer.scored(spec, loaded_in)
        routers[name]["held_out"] = scorer.scored(spec, loaded_out) if loaded_out else {}
    return routers


def _tune(cfg: StudyConfig, tasks_in: list[str], scorer: _Scorer, routers, suites: Suites) -> dict[str, Any]:
    """Choose glider's k and α by held-in accuracy on the dev slice (disjoint from the test slice), then score
    the choice on the test suites as router "glider (tuned)". Ties go to the smaller k, then smaller α."""
    grid = []
    for k in cfg.tune_top_k:
        for a in cfg.tune_alpha:
            res = scorer.scored(_spec(get_router("glider", top_k=k, alpha=a)), suites.dev, "dev")
            grid.append({"top_k": k, "alpha": a, "dev": _mean(res, tasks_in), "per_task": res})
    best = max(grid, key=lambda g: g["dev"])  # max keeps the first of equals: the grid's order breaks ties
    spec = _spec(get_router("glider", top_k=best["top_k"], alpha=best["alpha"]))
    routers["glider (tuned)"] = {
        "params": spec,
        "spec": spec,
        "held_in": scorer.scored(spec, suites.test),
        "held_out": scorer.scored(spec, suites.held_out) if suites.held_out else {},
    }
    return {
        "router": "glider",
        "dev_rows": [cfg.limit, cfg.limit + cfg.dev],
        "dev_n": {t: len(ex) for t, (_, ex) in suites.dev.items()},
        "grid": [{k: v for k, v in g.items() if k != "per_task"} for g in grid],
        "chosen": {"top_k": best["top_k"], "alpha": best["alpha"], "dev": best["dev"]},
    }


def _best_merge(cfg: StudyConfig, tasks_in: list[str], scorer: _Scorer, suites: Suites) -> dict[str, Any] | None:
    """Every merge method scored on the dev slice; the best dev average (first of equals) is then scored on the
    test rows. The test rows never choose it."""
    if not cfg.merges:
        return None
    dev = {m: _mean(scorer.merged(m, suites.dev, "dev"), tasks_in) for m in cfg.merges}
    best = max(dev, key=dev.get)
    return {"method": best, "dev": dev, "test": scorer.merged(best, suites.test)}


def _score_paraphrased(scorer: _Scorer, routers, merges, suites: Suites) -> dict[str, list[dict[str, Any]]]:
    """{"base" | "oracle" | "best_merge" | router: [{task: summary} per wording]} on the paraphrased test rows."""
    out: dict[str, list[dict[str, Any]]] = {"base": [], "oracle": [], "best_merge": []}
    for j, suite in enumerate(suites.paraphrased):
        part = f"paraphrase {j + 1}"
        out["base"].append(scorer.scored(None, suite, part))
        out["oracle"].append(scorer.scored({"router": "oracle"}, suite, part))
        if merges:
            out["best_merge"].append(scorer.merged(merges["method"], suite, part))
        for name, r in routers.items():
            out.setdefault(name, []).append(scorer.scored(r["spec"], suite, part))
    return out


def _pooled(per_wording: list[dict[str, Any]], task: str) -> dict[str, Any] | None:
    """One task's summary over its wordings: the mean of the wordings' values (equal n), k and n summed."""
    rows = [w[task] for w in per_wording if task in w]
    if not rows:
        return None
    k, n = sum(r["k"] for r in rows), sum(r["n"] for r in rows)
    lo, hi = wilson(k, n)
    value = sum(r["value"] for r in rows) / len(rows)
    return {"value": value, "k": k, "n": n, "ci_low": lo, "ci_high": hi, "majority": rows[0]["majority"]}


def _paraphrased_report(scores: dict[str, list], tasks_in: list[str], para: dict[str, list[Task]]) -> dict[str, Any]:
    pooled = {what: {t: _pooled(ws, t) for t in tasks_in} for what, ws in scores.items()}
    names = [n for n in scores if n not in ("base", "oracle", "best_merge")]
    has_merge = bool(scores["best_merge"])
    return {
        "tasks": tasks_in,
        "wordings": {t: [w.make.prompt.text for w in ws] for t, ws in para.items()},
        "oracle": _mean(pooled["oracle"], tasks_in),
        "best_merge": _mean(pooled["best_merge"], tasks_in) if has_merge else None,
        "base": _mean(pooled["base"], tasks_in),
        "routers": {n: _mean(pooled[n], tasks_in) for n in names},
        "per_task": {
            t: {
                "majority": pooled["base"][t]["majority"],
                "base": pooled["base"][t],
                "oracle": pooled["oracle"][t],
                "best_merge": pooled["best_merge"][t] if has_merge else None,
                "routers": {n: pooled[n][t] for n in names},
                "per_wording": {what: [w[t]["value"] for w in ws if t in w] for what, ws in scores.items()},
            }
            for t in tasks_in
        },
    }


def _spec(router: Any) -> dict[str, Any]:
    """A router's parameters as a cache key and a way to rebuild it (mixture's clusters are derived, not set)."""
    return {k: v for k, v in router.params().items() if k != "clusters"}


def describe_set(pset: PatchSet, cfg: StudyConfig, tasks_in: list[str], para: dict[str, list[Task]], log) -> dict:
    """Each patch's description for the global router (set in memory; patch files are left alone) and where it
    came from: `cfg.descriptions`/<patch name>.txt, else the manifest's, else the task definition's. The
    embedding is the description's alone. Refused in one line, naming the patch and the task: a description
    that contains a held-in task's eval template or a paraphrased wording (wording.leaked), and a stored
    embedding that averaged in train prompts (`describe --examples`), which carry the eval template verbatim."""
    folder = Path(cfg.descriptions) if cfg.descriptions else None
    enc, sources = None, {}
    for p, e in zip(pset.patches, pset.experts):
        if folder is not None:
            f = folder / f"{e.name}.txt"
            text = " ".join(f.read_text(encoding="utf-8").split()) if f.is_file() else ""
            if not text or len(text) > DESCRIPTION_MAX:
                raise PortLLMError(f"{f}: --descriptions needs a <patch name>.txt per patch, 1-{DESCRIPTION_MAX} chars")
            enc = enc or shared_encoder()
            e.description, e.embedding = text, routing_record(text, "file", [], enc)["embedding"]["vector"]
            sources[e.name] = f"{f} (in memory)"
        elif e.embedding is not None:
            emb = (p.extra.get("routing") or {}).get("embedding") or {}
            if emb.get("examples"):
                raise PortLLMError(
                    f"patch {e.name} (task {e.task}): its stored embedding averages {emb['examples']} train prompts, "
                    f"which carry {e.task}'s eval template; re-describe it without --examples, or give --descriptions"
                )
            sources[e.name] = "manifest"
        else:
            task = get_task(e.task)
            enc = enc or shared_encoder()
            rec = routing_record(task.description or task.name, "task definition", [], enc)
            e.description, e.embedding = rec["description"], rec["embedding"]["vector"]
            sources[e.name] = "task definition (in memory)"
            log(f"{e.name}: no stored description; using its task definition's, {e.description!r}")
        refuse_leak(e.name, e.description or "", tasks_in, para)
    return sources


def refuse_leak(patch: str, description: str, tasks_in: list[str], para: dict[str, list[Task]]) -> None:
    """One line naming the patch and the task when `description` contains a held-in task's eval template or one
    of its paraphrased wordings (which must stay unseen)."""
    for t in tasks_in:
        hit = leaked(description, task_wording(get_task(t)))
        if hit:
            raise PortLLMError(
                f"patch {patch}'s description contains task {t}'s eval prompt template ({hit!r}); "
                "describe the task in other words"
            )
        for w in para.get(t, []):
            hit = leaked(description, task_wording(w))
            if hit:
                raise PortLLMError(
                    f"patch {patch}'s description contains a paraphrased wording of task {t} ({hit!r}), which no "
                    "description may see; describe the task in other words"
                )


def patch_learning(oracle: dict[str, Any], base: dict[str, Any], tasks: list[str]) -> dict[str, dict[str, Any]]:
    """Per task: did its patch learn it, i.e. beat θ (the bare base) and the majority class by > LEARNED_SE
    standard errors on the test rows? SE of the gap to θ: sqrt(p(1-p)/n + b(1-b)/n_b), unpaired binomial (the
    items are the same, so this overstates the paired SE: conservative); to the majority share m, a constant
    of the slice: sqrt(p(1-p)/n)."""
    out = {}
    for t in tasks:
        p, n, b, nb = oracle[t]["value"], oracle[t]["n"], base[t]["value"], base[t]["n"]
        m = base[t]["majority"] if base[t]["majority"] is not None else 0.0
        se_b = math.sqrt(p * (1 - p) / max(1, n) + b * (1 - b) / max(1, nb))
        se_m = math.sqrt(p * (1 - p) / max(1, n))
        z_b = (p - b) / se_b if se_b else (math.inf if p > b else 0.0)
        z_m = (p - m) / se_m if se_m else (math.inf if p > m else 0.0)
        learned = z_b > LEARNED_SE and z_m > LEARNED_SE
        out[t] = {"patch": p, "base": b, "majority": m, "z_vs_base": z_b, "z_vs_majority": z_m, "learned": learned}
    return out


def _goals(suite: dict[str, Any], held_out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each router against the goals on `suite` (the paraphrased held-in suite when scored): ≥ 95% of the
    oracle, above the best merge; held-out ≥ the base."""
    o, bm, bo = suite["oracle"], suite["best_merge"], held_out["base"]
    goals = {}
    for n, v in suite["routers"].items():
        ho = held_out["routers"].get(n)
        goals[n] = {
            "share_of_oracle": v / o if o else None,
            "meets_95pct_oracle": bool(o and v >= 0.95 * o),
            "minus_best_merge": v - bm if bm is not None else None,
            "above_best_merge": bool(bm is not None and v > bm),
            "held_out_minus_base": ho - bo if bo is not None and ho is not None else None,
            "held_out_at_least_base": bool(bo is not None and ho is not None and ho >= bo),
        }
    return goals


def _report(cfg, pset, described, tasks_in, base_in, base_out, oracle, routers, merges) -> dict[str, Any]:
    held_in_r = {n: _mean(r["held_in"], tasks_in) for n, r in routers.items()}
    held_out_r = {n: _mean(r["held_out"], cfg.held_out) if cfg.held_out else None for n, r in routers.items()}
    bm = _mean(merges["test"], tasks_in) if merges else None
    learning = patch_learning(oracle, base_in, tasks_in)
    per_in = {
        t: {
            "metric": get_task(t).metric,
            "majority": base_in[t]["majority"],
            "base": base_in[t],
            "oracle": oracle[t],
            "best_merge": merges["test"][t] if merges else None,
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
        "patches_learned": sum(v["learned"] for v in learning.values()),
        "patch_learning": learning,
        "limit": cfg.limit,
        "chart": CHART,
        "routers_params": {n: r["params"] for n, r in routers.items()},
        "held_in": {
            "tasks": tasks_in,
            "oracle": _mean(oracle, tasks_in),
            "best_merge": bm,
            "best_merge_method": merges["method"] if merges else None,
            "dev_rows": [cfg.limit, cfg.limit + cfg.dev] if cfg.dev and (cfg.merges or cfg.tune) else None,
            "merges_dev": merges["dev"] if merges else {},
            "base": _mean(base_in, tasks_in),
            "routers": held_in_r,
            "per_task": per_in,
        },
        "held_out": {
            "tasks": cfg.held_out,
            "base": _mean(base_out, cfg.held_out) if cfg.held_out else None,
            "routers": held_out_r,
            "per_task": per_out,
        },
        "notes": NOTES,
    }


NOTES = [
    "averages are unweighted means over tasks of each task's accuracy (its metric: acc or acc_norm)",
    "best_merge: the merge method with the best held-in average on the dev slice (eval rows after the test rows), "
    "then scored on the test rows",
    "held-in examples are interleaved in one stream; each row is routed from its own prompt text only",
    "oracle: each example gets its own task's patch (needs the task label)",
    "held_in_paraphrased: the same test rows in other wordings of each prompt (paraphrases.yaml), never seen by "
    "a description, a gate or the dev-slice choices; a task's figure is the mean over its wordings",
    f"patches_learned: patches above θ and the majority class by > {LEARNED_SE:g} standard errors on their own "
    "task's test rows (unpaired binomial SE; see patch_learning)",
]
