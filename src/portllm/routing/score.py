"""Scoring a patch set under a router: the tasks' examples interleaved in one stream, each row routed
from its own request only (its prompt text; the oracle also reads its task label).

Log-likelihoods come from `evaluate.loglikelihoods` itself (batching, packing, padding unchanged): it
reports each batch's row keys to the set, which looks up that row's request. Records, metrics and
results.json are those of `portllm eval`, plus a "routing" entry naming the router and its parameters.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import PortLLMError
from ..eval import (
    EvalResult,
    Progress,
    TaskRun,
    accuracy,
    bootstrap_stderr,
    empty_result,
    loglikelihoods,
    mc_records,
    run_task,
)
from ..progress import Bar
from ..tasks import Example, Task, load_examples
from .describe import request_text
from .patchset import PatchSet, Request
from .routers import Router


def score_tasks(
    pset: PatchSet,
    router: Router | None,
    loaded: dict[str, tuple[Task, list[Example]]],
    batch_size: int = 16,
    max_tokens: int | None = None,
    progress: Progress | None = None,
) -> dict[str, TaskRun]:
    """Every task's TaskRun, the multiple-choice tasks scored as one interleaved stream."""
    lm = pset.lm(router) if router is not None else pset.lm()
    if router is None:
        pset.use(None)
    mc = {n: v for n, v in loaded.items() if v[0].kind == "mc"}
    out: dict[str, TaskRun] = {}
    for name, (task, examples) in loaded.items():
        if task.kind != "mc":
            if router is not None and (router.needs_text or router.needs_label):
                raise PortLLMError(
                    f"{name} is a generation task; router {router.name} reads each request's text or label, which "
                    "routed generation does not pass yet; use arrow, phatgoose or uniform for it"
                )
            out[name] = run_task(lm, task, examples, batch_size, progress, max_tokens)
    if not mc:
        return out
    pairs, share, reqs = [], [], {}
    for name, (_, examples) in mc.items():
        for e in examples:
            key = (name, e.idx)
            # the task label only reaches a router that is a reference by definition (the oracle)
            reqs[key] = Request(text=request_text(e), label=name if router is not None and router.needs_label else None)
            for c, x in zip(e.contexts, e.continuations):
                pairs.append((c, x))
                share.append(key)

    t0 = time.perf_counter()
    with pset.requests(reqs):
        lls, tokens = loglikelihoods(lm, pairs, batch_size, progress, share, max_tokens)
    wall = time.perf_counter() - t0
    k = 0
    for name, (task, examples) in mc.items():
        n_pairs = sum(len(e.continuations) for e in examples)
        records = mc_records(task, examples, lls[k : k + n_pairs])
        k += n_pairs
        norm_ok = [float(r["acc_norm_pred"] == r["gold"]) for r in records]
        correct = [float(r["correct"]) for r in records]
        acc = accuracy(records)
        share_of = n_pairs / max(1, len(pairs))
        out[name] = TaskRun(
            name,
            task.metric,
            sum(correct) / max(1, len(correct)),
            bootstrap_stderr(correct),
            len(records),
            records,
            wall * share_of,
            int(tokens * share_of),
            {
                "acc": sum(r["acc_pred"] == r["gold"] for r in records) / max(1, len(records)),
                "acc_norm": sum(norm_ok) / max(1, len(norm_ok)),
            },
            acc.ci_low,
            acc.ci_high,
            acc.majority,
        )
    return {n: out[n] for n in loaded}


def evaluate_routed(
    pset: PatchSet,
    router: Router | None,
    tasks: list[Task],
    limit: int | None = None,
    data: str | Path | None = None,
    out: str | Path | None = None,
    batch_size: int = 16,
    show_progress: bool = False,
    max_tokens: int | None = None,
) -> EvalResult:
    """`evaluate` for a routed patch set: results.json and samples_<task>.jsonl as `portllm eval` writes them."""
    loaded = {t.name: (t, load_examples(t, "eval", data, limit)) for t in tasks}
    lm = pset.lm()
    result = empty_result(lm, limit, batch_size, max_tokens)
    total = sum(len(e) * (len(e[0].continuations) or 1) for _, e in loaded.values() if e)
    with Bar(show_progress, total, f"eval ({router.name if router else 'base'})") as bar:
        runs = score_tasks(pset, router, loaded, batch_size, max_tokens, bar.advance)
    for name, run in runs.items():
        result.tasks[name] = run.result(lm)
        if out is not None:
            Path(out).mkdir(parents=True, exist_ok=True)
            write_text_atomic(Path(out) / f"samples_{name}.jsonl", "".join(json.dumps(r) + "\n" for r in run.records))
    if out is not None:
        body = result.to_dict() | {"routing": router.params() if router else {"router": "none"}}
        write_text_atomic(Path(out) / "results.json", json.dumps(body, indent=2))
    return result
