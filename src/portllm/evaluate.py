"""Scoring causal LMs on the task suite, and comparing two models' answers.

Log-likelihood multiple choice is batched and length-sorted, left-padded with explicit
position ids, and asks the model only for the logits it needs (`logits_to_keep`). Generation
is batched greedy decoding with a KV cache and stop strings. A model is a base spec, a base
with a patch attached at runtime (PEFT), or a ported model directory.

Every score carries its Wilson 95% interval and the slice's majority-class baseline; two runs are
compared paired, example by example (stats.py): flips, B − A with a paired-bootstrap interval, McNemar.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .atomic import write_text_atomic
from .errors import PortLLMError
from .progress import Bar
from .stats import Paired, majority, paired, wilson
from .tasks import Example, Task, load_examples

Progress = Callable[[int], None]


@dataclass
class LM:
    """A model ready to score: what it is (spec, patch) and the objects that run it."""

    model: Any
    tokenizer: Any
    spec: str
    patch: str | None = None
    patch_fingerprint: str | None = None
    dtype: str = "float32"
    max_length: int = 2048


def open_lm(
    spec: str | Path,
    patch: str | Path | None = None,
    dtype: str = "float32",
    threads: int | None = None,
    require_signature: bool = False,
    trusted: list | None = None,
) -> LM:
    """Load a base (or ported model) and optionally attach a patch at runtime with PEFT.

    With `require_signature` (or `trusted` public keys), the patch is verified before any tensor is read.
    A patch is checked against the base first (`check`: headers and configs), as `port` does: PEFT
    would attach one made for another base silently or fail with a traceback. A plain PEFT adapter
    (no manifest) gets the same structural check.
    """
    from .models import BaseRef, load_base
    from .sign import require_trusted

    if threads:
        torch.set_num_threads(threads)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise PortLLMError(f"dtype {dtype!r} not supported; use float32 or bfloat16")
    fp = None
    if patch is not None:
        from .check import check
        from .patch import Patch

        require_trusted(patch, require_signature, trusted)
        loaded = Patch.load(patch, require_manifest=False)
        base = BaseRef.of(spec)  # resolved once: the check and the load share it
        check(loaded, base).require("attach", f"patch {patch} does not fit {spec}")
        fp = loaded.weights_sha256
    model, tok = load_base(base if patch is not None else spec, dtype=dtype)
    if tok is None:
        raise PortLLMError(f"{spec} has no tokenizer; evaluation needs one")
    if patch is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(patch)).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    cfg = getattr(model, "config", None)
    max_len = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
    return LM(model, tok, str(spec), str(patch) if patch else None, fp, dtype, min(max_len, 4096))


# ---------------------------------------------------------------- log-likelihood


def bos_prefix(tok: Any) -> list[int]:
    """[BOS] when the tokenizer itself starts every text with it (Gemma's add_bos_token), else [].

    lm-evaluation-harness 0.4.x encodes with the tokenizer's own special-token settings, so a Gemma
    context starts with <bos> (Gemma scores far worse without it) and a SmolLM2 context with nothing.
    Asking the tokenizer, rather than a list of model families, keeps the two engines in step."""
    bos = getattr(tok, "bos_token_id", None)
    if bos is None:
        return []
    with_specials = tok.encode("a", add_special_tokens=True)
    return [bos] if with_specials[:1] == [bos] and tok.encode("a", add_special_tokens=False)[:1] != [bos] else []


def encode_text(tok: Any, text: str, bos: list[int] | None = None) -> list[int]:
    """Tokens of one text as lm-eval encodes it: the tokenizer's BOS first, unless the text already
    starts with the BOS string (a chat template that writes it), so it is never doubled."""
    bos = bos_prefix(tok) if bos is None else bos
    ids = tok.encode(text, add_special_tokens=False)
    return bos + ids if bos and not text.startswith(str(tok.bos_token)) else ids


def encode_pair(tok: Any, context: str, continuation: str, bos: list[int] | None = None) -> tuple[list[int], list[int]]:
    """Tokens of context and continuation as lm-evaluation-harness splits them: trailing spaces of
    the context move to the continuation, and the continuation is whatever the whole adds. The
    context starts with BOS where the tokenizer adds one (`bos_prefix`; pass it to skip the probe)."""
    bos = bos_prefix(tok) if bos is None else bos
    n = len(context) - len(context.rstrip())
    if n:
        continuation = context[-n:] + continuation
        context = context[:-n]
    whole = encode_text(tok, context + continuation, bos)
    ctx = encode_text(tok, context, bos)
    return ctx, whole[len(ctx) :]


def prefix_token(tok: Any) -> int:
    """What an empty context is conditioned on: BOS, else EOS (lm-eval's `prefix_token_id`)."""
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


@dataclass
class _Tree:
    """The requests of one question packed into one row: a shared prefix, then one branch per
    distinct continuation path. Branches see the prefix and themselves, never each other."""

    tokens: list[int]  # prefix, then each branch without its last token
    positions: list[int]  # position ids: every branch restarts after the prefix
    branch: list[int]  # -1 for the prefix, else the branch index
    targets: dict[int, list[tuple[int, int]]]  # request -> (row offset of the predicting logit, token)
    key: Any = None  # the share key of its requests (reported to a routed model, see loglikelihoods)


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(x) for x in seqs)
    first = seqs[0]
    for k in range(n):
        if any(x[k] != first[k] for x in seqs[1:]):
            return k
    return n


def _pack(reqs: list[tuple[int, list[int], int]]) -> _Tree:
    """reqs: (request index, full token sequence, length of its scored continuation)."""
    seqs = [seq for _, seq, _ in reqs]
    p = min(_common_prefix(seqs), *(len(seq) - m for _, seq, m in reqs))  # never share scored tokens
    tokens, branch = list(seqs[0][:p]), [-1] * p
    positions = list(range(p))
    targets: dict[int, list[tuple[int, int]]] = {}
    starts: dict[tuple[int, ...], int] = {}
    for i, seq, m in reqs:
        rest = tuple(seq[p:])
        if rest not in starts:  # identical paths share one branch
            starts[rest] = len(tokens)
            b = len(starts) - 1
            tokens += rest[:-1]
            positions += range(p, p + len(rest) - 1)
            branch += [b] * (len(rest) - 1)
        s = starts[rest]
        # token rest[t] is predicted by the prefix's last logit (t = 0) or by rest[t - 1]'s
        targets[i] = [((p - 1) if t == 0 else s + t - 1, rest[t]) for t in range(len(rest) - m, len(rest))]
    if len(starts) == 1:  # a single path is a plain causal row
        branch = [-1] * len(tokens)
    return _Tree(tokens, positions, branch, targets)


def _rows(reqs: list[tuple[int, list[int], int]], tree_limit: int) -> list[_Tree]:
    """One tree for the group, or one row per request when the group shares nothing or its tree
    would be longer than `tree_limit` tokens."""
    tree = _pack(reqs)
    shares = tree.branch[:1] == [-1]
    is_tree = any(b >= 0 for b in tree.branch)
    if shares and (not is_tree or len(tree.tokens) <= tree_limit):
        return [tree]
    return [_pack([r]) for r in reqs]


CPU_BATCH_TOKENS = 640


def _token_budget(max_tokens: int | None, device: torch.device) -> int:
    """Padded tokens per forward pass. On CPU, throughput peaks when a batch's activations stay
    in cache: long BoolQ rows run ~1.7x faster a few at a time than sixteen at a time, while short
    SST-2 rows still gain from sixteen (benchmarks/eval_batching.py)."""
    if max_tokens:
        return max_tokens
    return CPU_BATCH_TOKENS if device.type == "cpu" else 1 << 16


def _batches(trees: list[_Tree], rows: int, budget: int) -> Iterable[list[_Tree]]:
    """Consecutive trees (longest first) while rows and padded width fit the budget."""
    b = 0
    while b < len(trees):
        width = len(trees[b].tokens)
        n = max(1, min(rows, budget // max(1, width)))
        yield trees[b : b + n]
        b += n


@torch.inference_mode()
def loglikelihoods(
    lm: LM,
    pairs: list[tuple[str, str]],
    batch_size: int = 16,
    progress: Progress | None = None,
    share: list[Any] | None = None,
    max_tokens: int | None = None,
) -> tuple[list[float], int]:
    """Sum of log p(continuation | context) for each pair, and the number of tokens run through the model.

    Requests with the same `share` key (default: the same context) are packed into one row, so a
    shared context is computed once: BoolQ's or ARC's choices cost one pass over the passage, and
    WinoGrande's two sentences share the words before the blank. A batch holds at most
    `batch_size` rows and `max_tokens` padded tokens (see `_token_budget`).
    """
    keys = share if share is not None else [c for c, _ in pairs]
    if len(keys) != len(pairs):
        raise PortLLMError(f"share has {len(keys)} keys for {len(pairs)} requests")
    bos, prefix = bos_prefix(lm.tokenizer), prefix_token(lm.tokenizer)
    by_key: dict[Any, list[tuple[int, list[int], int]]] = {}
    for i, (c, x) in enumerate(pairs):
        ctx, cont = encode_pair(lm.tokenizer, c, x, bos)
        if not ctx and cont:  # an empty context: lm-eval's prefix token, or the continuation's own first token
            ctx, cont = ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
        if not cont:
            raise PortLLMError(f"empty continuation for request {i}: {x!r}")
        seq = (ctx + cont)[-(lm.max_length + 1) :]
        by_key.setdefault(keys[i], []).append((i, seq, min(len(cont), len(seq) - 1)))
    cfg = getattr(lm.model, "config", None)
    # a tree needs a custom 4D mask: eager/SDPA attention only, and no sliding window it could outgrow
    limit = (
        0
        if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager")
        else getattr(cfg, "sliding_window", None) or 1 << 62
    )
    trees = [t for reqs in by_key.values() for t in _rows(reqs, limit)]
    for t in trees:
        t.key = keys[next(iter(t.targets))]
    trees.sort(key=lambda t: -len(t.tokens))
    out = [0.0] * len(pairs)
    n_tokens = 0
    param = lm.model.get_input_embeddings().weight  # the base's dtype (PEFT keeps adapters in fp32)
    pad = lm.tokenizer.pad_token_id
    for batch in _batches(trees, batch_size, _token_budget(max_tokens, param.device)):
        width = len(batch[0].tokens)
        keep = max(len(t.tokens) - min(o for tg in t.targets.values() for o, _ in tg) for t in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        pos = torch.zeros((len(batch), width), dtype=torch.long)
        br = torch.full((len(batch), width), -2, dtype=torch.long)
        for j, t in enumerate(batch):
            ids[j, width - len(t.tokens) :] = torch.tensor(t.tokens)
            pos[j, width - len(t.tokens) :] = torch.tensor(t.positions)
            br[j, width - len(t.tokens) :] = torch.tensor(t.branch)
        if (br >= 0).any():
            # tree attention: causal, within the prefix or the query's own branch; padding sees itself only
            q, k = br[:, :, None], br[:, None, :]
            allowed = torch.ones(width, width, dtype=torch.bool).tril() & (((k == -1) & (q != -2)) | (k == q))
            mask = torch.zeros(allowed.shape, dtype=param.dtype).masked_fill_(~allowed, torch.finfo(param.dtype).min)[
                :, None
            ]
        else:
            mask = (br != -2).long()
        route = getattr(lm.model, "route_rows", None)  # a routing.PatchSet: each row routes from its own request
        if route is not None:
            route([t.key for t in batch])
        logits = lm.model(
            input_ids=ids.to(param.device),
            attention_mask=mask.to(param.device),
            position_ids=pos.to(param.device),
            logits_to_keep=keep,
            use_cache=False,
        ).logits
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        done = 0
        for j, t in enumerate(batch):
            shift = keep - len(t.tokens)  # row offset o is logit index o + shift
            for i, tg in t.targets.items():
                rows = torch.tensor([o + shift for o, _ in tg])
                out[i] = float(logp[j, rows, torch.tensor([tok for _, tok in tg])].sum())
                done += 1
            n_tokens += len(t.tokens)
        if progress:
            progress(done)
    return out, n_tokens


# ---------------------------------------------------------------- generation


@torch.inference_mode()
def generate(
    lm: LM,
    prompts: list[str],
    stop: Iterable[str] = (),
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> tuple[list[str], int]:
    """Greedy continuations of each prompt, cut at the first stop string."""
    tok = lm.tokenizer
    stop = [s for s in stop if s]
    bos = bos_prefix(tok)  # as lm-eval: the tokenizer's BOS first, then left truncation
    enc = [encode_text(tok, p, bos)[-(lm.max_length - max_new_tokens) :] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(enc[i]))
    out = [""] * len(prompts)
    tokens = 0
    device = next(lm.model.parameters()).device
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        width = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(idx):
            ids[j, width - len(enc[i]) :] = torch.tensor(enc[i])
            mask[j, width - len(enc[i]) :] = 1
        gen = lm.model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            stop_strings=stop or None,
            tokenizer=tok,
            pad_token_id=tok.pad_token_id,
        )
        new = gen[:, width:]
        for j, i in enumerate(idx):
            row = new[j].tolist()
            n = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
            text = tok.decode(row[:n], skip_special_tokens=True)
            out[i] = cut_at_stop(text, stop)
            tokens += len(enc[i]) + n
        if progress:
            progress(len(idx))
    return out, tokens


def cut_at_stop(text: str, stop: Iterable[str]) -> str:
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return text if cut < 0 else text[:cut]


# ---------------------------------------------------------------- answers and metrics

_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalize_number(s: str) -> str:
    s = s.strip().replace(",", "").replace("$", "")
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s


def extract_strict(text: str) -> str | None:
    """GSM8K strict match: the number after '#### '."""
    m = _STRICT.search(text)
    return normalize_number(m.group(1)) if m else None


def extract_flexible(text: str) -> str | None:
    """GSM8K flexible extract: the last number-like span in the text."""
    found = [a or b for a, b in _FLEX.findall(text)]
    found = [f for f in found if re.search(r"\d", f)]
    return normalize_number(found[-1]) if found else None


def bootstrap_stderr(values: list[float], iters: int = 1000, seed: int = 0) -> float:
    if len(values) < 2:
        return 0.0
    g = torch.Generator().manual_seed(seed)
    v = torch.tensor(values, dtype=torch.float64)
    idx = torch.randint(0, len(v), (iters, len(v)), generator=g)
    return float(v[idx].mean(dim=1).std())


def _choice_len(cont: str) -> int:
    return max(1, len(cont[1:] if cont.startswith(" ") else cont))


@dataclass(frozen=True)
class Accuracy:
    """What a slice's per-example records say beyond the mean: its Wilson 95% interval (sensible at 0
    and n, where a bootstrap stderr reads "± 0.0") and the majority-class baseline, the accuracy of
    always answering the most frequent gold (None for generation, where there is no class to repeat)."""

    k: int
    n: int
    ci_low: float
    ci_high: float
    majority: float | None


def accuracy(records: list[dict[str, Any]], generative: bool = False) -> Accuracy:
    """Wilson interval and majority baseline of one task's records (samples_<task>.jsonl rows)."""
    k = sum(1 for r in records if r["correct"])
    lo, hi = wilson(k, len(records))
    maj = None if generative or not records else majority([r["gold"] for r in records])[1]
    return Accuracy(k, len(records), lo, hi, maj)


@dataclass
class TaskResult:
    """One task's score for one model: a row of results.json."""

    task: str
    metric: str
    value: float
    stderr: float
    n: int
    model: str
    patch: str | None
    patch_fingerprint: str | None
    dtype: str
    time_s: float
    tokens: int
    tokens_per_s: float | None
    extra: dict[str, float] = field(default_factory=dict)  # acc and acc_norm, or GSM8K's strict/flexible match
    ci_low: float | None = None  # Wilson 95% interval of value (None in results.json files older than it)
    ci_high: float | None = None
    majority: float | None = None  # majority-class baseline of the slice; None for generation tasks

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "metric": self.metric,
            "value": self.value,
            "stderr": self.stderr,
            "n": self.n,
            "model": self.model,
            "patch": self.patch,
            "patch_fingerprint": self.patch_fingerprint,
            "dtype": self.dtype,
            "time_s": self.time_s,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens_per_s,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "majority": self.majority,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskResult:
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: d.get(k) for k in known}, extra={k: v for k, v in d.items() if k not in known})


@dataclass
class EvalResult:
    """A model's scores on a set of tasks: what results.json holds."""

    model: str
    patch: str | None
    patch_fingerprint: str | None
    dtype: str
    limit: int | None
    batch_size: int
    max_batch_tokens: int
    tasks: dict[str, TaskResult] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "tasks"}
        return d | {"tasks": {name: t.to_dict() for name, t in self.tasks.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResult:
        known = {f.name for f in fields(cls)} - {"tasks"}
        tasks = {name: TaskResult.from_dict(t) for name, t in d.get("tasks", {}).items()}
        return cls(**{k: d.get(k) for k in known}, tasks=tasks)

    @classmethod
    def read(cls, run_dir: str | Path) -> EvalResult:
        """The results.json of an eval run directory."""
        return cls.from_dict(read_run(run_dir, samples=False)[0])


@dataclass
class TaskRun:
    """One task scored: the per-example records (samples_<task>.jsonl) and the totals."""

    task: str
    metric: str
    value: float
    stderr: float
    n: int
    records: list[dict[str, Any]]
    time_s: float
    tokens: int
    extra: dict[str, float] = field(default_factory=dict)
    ci_low: float | None = None
    ci_high: float | None = None
    majority: float | None = None

    def result(self, lm: LM) -> TaskResult:
        return TaskResult(
            self.task,
            self.metric,
            self.value,
            self.stderr,
            self.n,
            lm.spec,
            lm.patch,
            lm.patch_fingerprint,
            lm.dtype,
            round(self.time_s, 2),
            self.tokens,
            round(self.tokens / self.time_s, 1) if self.time_s else None,
            dict(self.extra),
            self.ci_low,
            self.ci_high,
            self.majority,
        )


def mc_records(task: Task, examples: list[Example], lls: list[float]) -> list[dict[str, Any]]:
    """Per-example records from the answer options' log-likelihoods (in example, then option order)."""
    records: list[dict[str, Any]] = []
    k = 0
    for e in examples:
        s = lls[k : k + len(e.continuations)]
        k += len(e.continuations)
        acc_pred = max(range(len(s)), key=lambda i: s[i])
        normed = [v / _choice_len(c) for v, c in zip(s, e.continuations)]
        norm_pred = max(range(len(s)), key=lambda i: normed[i])
        pred = norm_pred if task.metric == "acc_norm" else acc_pred
        records.append(
            {
                "idx": e.idx,
                "pred": pred,
                "gold": e.gold,
                "correct": pred == e.gold,
                "scores": s,
                "acc_pred": acc_pred,
                "acc_norm_pred": norm_pred,
            }
        )
    return records


def run_task(
    lm: LM,
    task: Task,
    examples: list[Example],
    batch_size: int = 16,
    progress: Progress | None = None,
    max_tokens: int | None = None,
) -> TaskRun:
    """Score one task; records follow the eval split's file order."""
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []
    extra: dict[str, float] = {}
    if task.kind == "mc":
        pairs = [(c, x) for e in examples for c, x in zip(e.contexts, e.continuations)]
        share = [e.idx for e in examples for _ in e.continuations]
        lls, tokens = loglikelihoods(lm, pairs, batch_size, progress, share, max_tokens)
        records = mc_records(task, examples, lls)
        extra["acc"] = sum(r["acc_pred"] == r["gold"] for r in records) / max(1, len(records))
        extra["acc_norm"] = sum(r["acc_norm_pred"] == r["gold"] for r in records) / max(1, len(records))
    else:
        texts, tokens = generate(
            lm, [e.prompt for e in examples], task.stop, task.max_new_tokens, max(1, batch_size // 2), progress
        )
        strict_ok = []
        for e, text in zip(examples, texts):
            flex, strict = extract_flexible(text), extract_strict(text)
            strict_ok.append(float(strict == e.gold))
            records.append(
                {
                    "idx": e.idx,
                    "pred": flex,
                    "gold": e.gold,
                    "correct": flex == e.gold,
                    "strict": strict,
                    "output": text,
                }
            )
        extra["exact_match_strict"] = sum(strict_ok) / max(1, len(strict_ok))
        extra["exact_match_flexible"] = sum(r["correct"] for r in records) / max(1, len(records))
    correct = [float(r["correct"]) for r in records]
    value = sum(correct) / max(1, len(correct))
    acc = accuracy(records, generative=task.kind != "mc")
    return TaskRun(
        task.name,
        task.metric,
        value,
        bootstrap_stderr(correct),
        len(records),
        records,
        time.perf_counter() - t0,
        tokens,
        extra,
        acc.ci_low,
        acc.ci_high,
        acc.majority,
    )


def evaluate(
    lm: LM,
    tasks: list[Task],
    limit: int | None = None,
    data: str | Path | None = None,
    out: str | Path | None = None,
    batch_size: int = 16,
    show_progress: bool = False,
    max_tokens: int | None = None,
) -> EvalResult:
    """Run tasks; with `out`, write OUT/samples_<task>.jsonl and OUT/results.json (the result's to_dict())."""
    loaded = {t.name: load_examples(t, "eval", data, limit) for t in tasks}  # fail fast on bad data
    result = EvalResult(
        lm.spec,
        lm.patch,
        lm.patch_fingerprint,
        lm.dtype,
        limit,
        batch_size,
        _token_budget(max_tokens, lm.model.get_input_embeddings().weight.device),
    )
    total = sum(len(e) * (len(e[0].continuations) or 1) for e in loaded.values() if e)
    with Bar(show_progress, total, "eval") as bar:
        for t in tasks:
            bar.describe(t.name)
            run = run_task(lm, t, loaded[t.name], batch_size, bar.advance, max_tokens)
            result.tasks[t.name] = run.result(lm)
            if out is not None:
                Path(out).mkdir(parents=True, exist_ok=True)
                write_text_atomic(
                    Path(out) / f"samples_{t.name}.jsonl", "".join(json.dumps(r) + "\n" for r in run.records)
                )
    if out is not None:
        write_text_atomic(Path(out) / "results.json", json.dumps(result.to_dict(), indent=2))
    return result


# ---------------------------------------------------------------- comparing two runs


def read_run(d: str | Path, samples: bool = True) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """An eval run directory as written by `evaluate`: results.json, and each task's records."""
    d = Path(d)
    f = d / "results.json"
    if not f.is_file():
        raise PortLLMError(f"{d} is not an eval run (no results.json); make one with `portllm eval --out {d}`")
    try:
        res = json.loads(f.read_text())
    except ValueError as e:
        raise PortLLMError(f"{f}: not valid JSON ({e})") from None
    records = {}
    for t in res.get("tasks", {}) if samples else ():
        sf = d / f"samples_{t}.jsonl"
        if not sf.is_file():
            raise PortLLMError(f"{d}: samples_{t}.jsonl is missing")
        rows = []
        for n, line in enumerate(sf.read_text().splitlines(), 1):
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise PortLLMError(f"{sf}:{n}: malformed JSON line") from None
        records[t] = rows
    return res, records


def aligned_correct(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Per-example correctness (0/1) of two runs' records of one task on the examples they share, in idx order."""
    ra, rb = {r["idx"]: r for r in a}, {r["idx"]: r for r in b}
    common = sorted(set(ra) & set(rb))
    return [float(bool(ra[i]["correct"])) for i in common], [float(bool(rb[i]["correct"])) for i in common]


def paired_records(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> Paired:
    """Two runs' records of one task compared paired, on the examples they share (by idx): B − A with
    its paired-bootstrap 95% interval and the exact McNemar p-value. Scoring the same examples twice
    makes the difference far tighter than two separate intervals suggest, and honest where they overlap."""
    return paired(*aligned_correct(a, b))


DEFAULT_MARGIN = 0.01  # "no difference" means the whole interval lies within ±1 point


@dataclass
class TaskFlips:
    """How two runs' answers to the same examples differ. Negative flips: right in A, wrong in B (what an
    update broke); positive flips: the reverse. `diff` (acc_b − acc_a), its paired 95% interval and the
    McNemar p-value say whether the difference is more than noise; `verdict` reads them against `margin`."""

    n: int
    acc_a: float = 0.0
    acc_b: float = 0.0
    agreement: float = 0.0
    negative_flips: int = 0
    positive_flips: int = 0
    negative_flip_rate: float = 0.0
    positive_flip_rate: float = 0.0
    negative_flip_idx: list[Any] = field(default_factory=list)  # the first 50
    diff: float = 0.0
    ci_low: float = 0.0
    ci_high: float = 0.0
    mcnemar_p: float = 1.0
    margin: float = DEFAULT_MARGIN
    verdict: str = ""  # "" in reports older than the paired statistics

    def to_dict(self) -> dict[str, Any]:
        if not self.n:
            return {"n": 0}
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskFlips:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def flips(a: list[dict[str, Any]], b: list[dict[str, Any]], margin: float = DEFAULT_MARGIN) -> TaskFlips:
    """Compare two runs' records of one task on the examples they share."""
    ra, rb = {r["idx"]: r for r in a}, {r["idx"]: r for r in b}
    common = sorted(set(ra) & set(rb))
    n = len(common)
    if not n:
        return TaskFlips(0)
    neg = [i for i in common if ra[i]["correct"] and not rb[i]["correct"]]
    pos = [i for i in common if not ra[i]["correct"] and rb[i]["correct"]]
    agree = sum(1 for i in common if ra[i]["pred"] == rb[i]["pred"])
    p = paired_records(a, b)
    return TaskFlips(
        n=n,
        acc_a=sum(ra[i]["correct"] for i in common) / n,
        acc_b=sum(rb[i]["correct"] for i in common) / n,
        agreement=agree / n,
        negative_flips=len(neg),
        positive_flips=len(pos),
        negative_flip_rate=len(neg) / n,
        positive_flip_rate=len(pos) / n,
        negative_flip_idx=neg[:50],
        diff=p.diff,
        ci_low=p.ci_low,
        ci_high=p.ci_high,
        mcnemar_p=p.mcnemar_p,
        margin=margin,
        verdict=p.verdict(margin),
    )


@dataclass
class RunRef:
    """Which run a comparison side is: its directory and what it scored."""

    dir: str
    model: str | None
    patch: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"dir": self.dir, "model": self.model, "patch": self.patch}


@dataclass
class CompareResult:
    a: RunRef
    b: RunRef
    tasks: dict[str, TaskFlips]
    margin: float = DEFAULT_MARGIN

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a.to_dict(),
            "b": self.b.to_dict(),
            "tasks": {t: f.to_dict() for t, f in self.tasks.items()},
            "margin": self.margin,
        }


def compare(run_a: str | Path, run_b: str | Path, margin: float = DEFAULT_MARGIN) -> CompareResult:
    """Flips and paired statistics between two eval runs, per task they share; "no difference" only
    where the whole 95% interval of B − A lies within ±margin."""
    if not 0 < margin < 1:
        raise PortLLMError(f"margin {margin} must be a fraction between 0 and 1 (0.01 = 1 point)")
    ra, sa = read_run(run_a)
    rb, sb = read_run(run_b)
    shared = [t for t in sa if t in sb]
    if not shared:
        raise PortLLMError(f"{run_a} and {run_b} share no task")
    return CompareResult(
        RunRef(str(run_a), ra.get("model"), ra.get("patch")),
        RunRef(str(run_b), rb.get("model"), rb.get("patch")),
        {t: flips(sa[t], sb[t], margin) for t in shared},
        margin,
    )
