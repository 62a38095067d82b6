"""Before any labelled evaluation: what will porting this patch onto NEW cost?

Three kinds of evidence a user has without labels:
- the weights: how far the base moved under each patched matrix, and how much of that movement
  falls inside the patch's own rank-r subspace, relative to the patch (needs OLD);
- unlabeled task inputs: θ+Δθ and θ'+Δθ answer the same questions; where they disagree, θ+Δθ's
  own choice probabilities are the best unlabeled belief about which answer is right, so the
  expected accuracy change is Σ_i [p_A,i(answer_B) − p_A,i(answer_A)] / n and the expected
  negative-flip rate is Σ_{i: answers differ} p_A,i(answer_A) / n (needs OLD to run θ+Δθ);
- plain text: next-token disagreement and KL between the two (needs OLD);
- a user's prompt/completion or chat JSONL (the rows `train --data` reads): the same next-token signals where
  each (last) completion starts, and the change in the reference completions' mean per-token log-likelihood
  with a paired interval over rows: a loss that needs no task, in nats/token, not points (needs OLD).
Without OLD only θ'+Δθ against θ' can be measured: whether the patch still changes answers on
NEW, not what it lost. A calibration fitted on a drift sweep maps the raw signals to points.
"""

from __future__ import annotations

import gc
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .check import check
from .errors import PortLLMError
from .eval import open_lm, run_task
from .models import EMBEDDED, fingerprint, resolve_base
from .patch import Patch
from .sft import completion_logliks, encode_rows, read_sft
from .stats import paired_bootstrap
from .tasks import get_task, is_task_file, load_examples


@dataclass(frozen=True)
class WeightSignals:
    """Means over the patched matrices (D = W_new − W_old, ΔW = the patch's update)."""

    rel_drift: float  # ||D|| / ||W_old||
    subspace_disturbance: float  # ||U_Bᵀ D V_A|| / ||ΔW||: drift inside the patch subspace, in patch units
    cos: float  # cos(D, ΔW); negative means the update undoes part of the patch
    drift_to_patch: float  # ||D|| / ||ΔW||

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> WeightSignals:
        if not rows:
            raise PortLLMError("no patched matrix was found in both bases: nothing to measure")
        mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
        inside = [r["overlap"] / r["patch_to_drift"] if r["patch_to_drift"] else 0.0 for r in rows]
        d2p = [1 / r["patch_to_drift"] if r["patch_to_drift"] else 0.0 for r in rows]
        return cls(mean("rel_drift"), sum(inside) / len(rows), mean("cos"), sum(d2p) / len(rows))


@dataclass(frozen=True)
class OutputSignals:
    """θ+Δθ (A) against θ'+Δθ (B) on the same unlabeled inputs."""

    source: str  # task name or file
    kind: str  # "choices" (a task's answer options), "next-token" (plain text) or "completions" (a JSONL's rows)
    n: int
    disagreement: float
    mean_kl: float  # KL(p_A || p_B)
    confidence: float  # mean p_A of A's own answer
    expected_change: float | None = None  # accuracy units; negative = loss
    expected_change_ci: tuple[float, float] | None = None
    expected_neg_flip_rate: float | None = None
    # completions: the reference completions' mean per-token log-likelihood (nats) under θ+Δθ (a) and θ'+Δθ (b),
    # and the mean over rows of b − a with its paired-bootstrap 95% interval (negative: the port fits them worse)
    loglik_a: float | None = None
    loglik_b: float | None = None
    loglik_change: float | None = None
    loglik_change_ci: tuple[float, float] | None = None
    rows_skipped: int = 0  # completions: rows with no prompt token left before the completion in the context


BUILTIN_CALIBRATION = Path(__file__).with_name("forecast_calibration.json")
NO_POINTS_FOR_COMPLETIONS = (
    "no loss in points: the calibration is fitted on multiple-choice sweep cells and does not apply to "
    "generation data; the log-likelihood change is measured, not calibrated"
)


@dataclass(frozen=True)
class Calibration:
    """The map from raw signals to points, fitted on a sweep (`portllm.sweep.calibrate.fit`):
    loss = a · raw_loss + b · subspace_disturbance + c; neg-flip rate = flip_a · raw_flips + flip_b ·
    disagreement + flip_c (all in points). Sweeps fit c = flip_c = 0: no signal, no forecast (the t = 0 control)."""

    a: float = 1.0
    b: float = 0.0
    c: float = 0.0
    flip_a: float = 1.0
    flip_b: float = 0.0
    flip_c: float = 0.0
    residual_sd_points: float | None = None
    source: str = "raw (uncalibrated): θ+Δθ's own probabilities as the belief about the right answer"

    def loss(self, raw_points: float, disturbance: float) -> float:
        return self.a * raw_points + self.b * disturbance + self.c

    def flips(self, raw_flip_points: float, disagreement_points: float) -> float:
        return max(0.0, self.flip_a * raw_flip_points + self.flip_b * disagreement_points + self.flip_c)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def load(cls, path: str | Path | None) -> Calibration:
        """None or "raw": the uncalibrated estimate; "builtin": the one fitted on this project's committed sweep
        (docs/sweep, shipped as forecast_calibration.json); else a sweep's calibration.json."""
        if path is None or str(path) == "raw":
            return cls()
        if str(path) == "builtin":
            path = BUILTIN_CALIBRATION
        try:
            d = json.loads(Path(path).read_text())
            return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d}) if isinstance(d, dict) else cls()
        except (OSError, ValueError, TypeError) as e:
            raise PortLLMError(f"calibration {path}: unreadable ({e.__class__.__name__}); omit --calibration") from None


@dataclass
class Forecast:
    patch: str
    base: str
    old: str | None
    weights: WeightSignals | None
    outputs: OutputSignals | None
    loss_points: float | None  # predicted acc(θ+Δθ) − acc(θ'+Δθ), in points
    loss_interval: tuple[float, float] | None
    neg_flip_rate_points: float | None
    calibration: Calibration = field(default_factory=Calibration)
    notes: list[str] = field(default_factory=list)

    def sentence(self) -> str:
        """The plain-language verdict `check` prints."""
        o = self.outputs
        if self.loss_points is None and o is not None and o.loglik_change is not None:
            lo, hi = o.loglik_change_ci or (o.loglik_change, o.loglik_change)
            return (
                f"the reference completions' log-likelihood changes by {o.loglik_change:+.4f} nats/token (95% "
                f"interval {lo:+.4f} to {hi:+.4f}); {o.disagreement:.1%} of next tokens change; "
                + (self.notes[-1] if self.notes else NO_POINTS_FOR_COMPLETIONS)
            )
        if self.loss_points is None:
            return "no forecast of the loss: " + (self.notes[-1] if self.notes else "give --from OLD")
        lo, hi = self.loss_interval or (self.loss_points, self.loss_points)
        what = "lose" if self.loss_points >= 0 else "gain"
        s = f"expected to {what} ~{abs(self.loss_points):.1f} points (95% interval {lo:+.1f} to {hi:+.1f} lost)"
        if self.neg_flip_rate_points is not None:
            s += f"; ~{self.neg_flip_rate_points:.1f}% of answers flip to wrong"
        return s

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdict"] = self.sentence()
        return d


def weight_signals(patch: Any, base: str | Path, old: str | Path, report: Any = None) -> WeightSignals:
    """From `check`'s drift rows (pass its report when `check` already ran, so nothing is read twice)."""
    rep = report if report is not None and report.drift else check(patch, base, old)
    rep.require("shapes", f"patch does not fit {base}")
    return WeightSignals.from_rows(rep.drift)


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [v / s for v in e]


def _choice_probs(record: dict[str, Any], metric: str, conts: tuple[str, ...]) -> list[float]:
    scores = record["scores"]
    if metric == "acc_norm":
        scores = [v / max(1, len(c[1:] if c.startswith(" ") else c)) for v, c in zip(scores, conts)]
    return _softmax(scores)


def choice_signals(records_a: list[dict], records_b: list[dict], examples: list[Any], task: Any) -> OutputSignals:
    """Disagreement, KL and the unlabeled expected change from two runs' per-choice scores."""
    n = len(records_a)
    if n == 0 or n != len(records_b):
        raise PortLLMError("forecast needs the same, non-empty inputs for both models")
    change, negs, kls, conf, dis = [], [], [], [], 0
    for ra, rb, e in zip(records_a, records_b, examples):
        pa = _choice_probs(ra, task.metric, e.continuations)
        pb = _choice_probs(rb, task.metric, e.continuations)
        a, b = ra["pred"], rb["pred"]
        kls.append(sum(x * (math.log(max(x, 1e-30)) - math.log(max(y, 1e-30))) for x, y in zip(pa, pb)))
        conf.append(pa[a])
        change.append(pa[b] - pa[a])
        negs.append(pa[a] if a != b else 0.0)
        dis += a != b
    _, lo, hi = paired_bootstrap([0.0] * n, change, iters=2000)
    return OutputSignals(
        task.name,
        "choices",
        n,
        dis / n,
        sum(kls) / n,
        sum(conf) / n,
        sum(change) / n,
        (lo, hi),
        sum(negs) / n,
    )


def _examples(inputs: str, n: int, data: str | Path | None) -> tuple[Any, list[Any]]:

    task = get_task(inputs)
    if task.kind != "mc":
        raise PortLLMError(f"{task.name} is a generation task; forecast needs answer options (or a text file)")
    return task, load_examples(task, "eval", data, n)


def _next_token_probs(lm: Any, prompts: list[list[int]]) -> list[Any]:
    """The model's next-token distribution after each prompt (token ids, the context cut from the left)."""
    device = lm.model.get_input_embeddings().weight.device
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p[-lm.max_length :]], dtype=torch.long, device=device)
            out.append(torch.softmax(lm.model(ids).logits[0, -1].float(), -1).cpu())
    return out


def is_completions_file(path: Path) -> bool:
    """A prompt/completion or chat JSONL (what `train --data` reads), not a text file or a task file."""
    return path.suffix.lower() in (".jsonl", ".json") and path.is_file()


@dataclass
class CompletionOutputs:
    """One model on a data file's first rows: per kept row (its index), the next-token distribution where its
    last completion starts, and its reference completion's mean per-token log-likelihood."""

    total: int  # rows read
    rows: list[int]
    probs: list[Any]
    logliks: list[float]


def last_completion_start(labels: list[int]) -> int:
    """Where the last labelled span starts: a row's completion, or a chat's last assistant turn."""
    j = len(labels)
    while j > 0 and labels[j - 1] == -100:
        j -= 1
    while j > 0 and labels[j - 1] != -100:
        j -= 1
    return j


def completion_outputs(lm: Any, path: Path, n: int) -> CompletionOutputs:
    """Rows tokenized as `train --data` does (chats through the tokenizer's chat template, the prompt cut from
    the left); a row whose completion leaves no prompt token within the model's context is skipped."""
    rows = read_sft(path).rows[:n]
    kept, prompts, examples = [], [], []
    for i, row in enumerate(rows):
        enc = encode_rows(lm.tokenizer, [row], lm.max_length)
        if not enc.examples:
            continue
        ids, labels = enc.examples[0]
        start = last_completion_start(labels)
        if start < 1:
            continue
        kept.append(i)
        prompts.append(ids[:start])
        examples.append((ids, labels))
    if not kept:
        raise PortLLMError(f"{path}: no row fits {lm.max_length} tokens with a prompt before its completion")
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return CompletionOutputs(
        len(rows), kept, _next_token_probs(lm, prompts), completion_logliks(lm.model, examples, pad)
    )


def completion_signals(a: CompletionOutputs, b: CompletionOutputs, path: Path) -> OutputSignals:
    """Next-token signals where the completions start, and the paired change in their log-likelihood (B − A)."""
    if a.rows != b.rows:
        raise PortLLMError(f"{path}: the two bases tokenize its rows differently; forecast needs one tokenizer")
    change, lo, hi = paired_bootstrap(a.logliks, b.logliks, iters=2000)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return replace(
        text_signals(a.probs, b.probs, path),
        kind="completions",
        loglik_a=mean(a.logliks),
        loglik_b=mean(b.logliks),
        loglik_change=change,
        loglik_change_ci=(lo, hi),
        rows_skipped=a.total - len(a.rows),
    )


def text_lines(path: Path, n: int) -> list[str]:
    """The first n non-empty lines of a text file: the inputs `--inputs FILE` compares the models on."""
    texts = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()][:n]
    if not texts:
        raise PortLLMError(f"{path} has no non-empty lines to compare the models on")
    return texts


def text_signals(pa: list[Any], pb: list[Any], path: Path) -> OutputSignals:
    """Next-token disagreement and KL between two models' next-token distributions on the same lines."""
    kl = [float((a * (a.clamp_min(1e-30).log() - b.clamp_min(1e-30).log())).sum()) for a, b in zip(pa, pb)]
    dis = sum(int(torch.argmax(a) != torch.argmax(b)) for a, b in zip(pa, pb))
    conf = [float(a.max()) for a in pa]
    return OutputSignals(str(path), "next-token", len(pa), dis / len(pa), sum(kl) / len(kl), sum(conf) / len(conf))


def model_outputs(spec: str | Path, patch: str | Path, inputs: str, n: int, data, dtype: str, device: str) -> Any:
    """One model's outputs on the inputs (next-token distributions for a text file, per-choice records for a
    task). The model is freed before returning, so a forecast holds one model at a time, never two."""
    lm = open_lm(spec, patch, dtype=dtype, device=device)
    try:
        path = Path(inputs)
        if is_completions_file(path):
            return completion_outputs(lm, path, n)
        if path.is_file() and not is_task_file(path):
            return _next_token_probs(lm, [lm.tokenizer(t).input_ids for t in text_lines(path, n)])
        task, examples = _examples(inputs, n, data)
        return run_task(lm, task, examples).records
    finally:
        del lm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def output_signals(
    patch: str | Path, old: str | Path, base: str | Path, inputs: str, n: int, data, dtype: str, device: str
) -> OutputSignals:
    """θ+Δθ's and θ'+Δθ's outputs compared, scored one model after the other."""
    a = model_outputs(old, patch, inputs, n, data, dtype, device)
    b = model_outputs(base, patch, inputs, n, data, dtype, device)  # runtime attach equals the port (test_port)
    path = Path(inputs)
    if is_completions_file(path):
        return completion_signals(a, b, path)
    if path.is_file() and not is_task_file(path):
        return text_signals(a, b, path)
    task, examples = _examples(inputs, n, data)
    return choice_signals(a, b, examples, task)


def _recorded_base(p: Any) -> str | None:
    """The base named in the patch's manifest, when it is here (embedded or a local directory, never a
    download) and is the very model the patch was made on (same fingerprint)."""

    name, fp = p.source_name, p.source_fingerprint
    if not name or not fp or not (name in EMBEDDED or Path(name).is_dir()):
        return None
    try:
        return name if fingerprint(resolve_base(name)) == fp else None
    except PortLLMError:
        return None


def forecast(
    patch: str | Path,
    base: str | Path,
    old: str | Path | None = None,
    inputs: str | None = None,
    n: int = 200,
    data: str | Path | None = None,
    calibration: str | Path | None = None,
    dtype: str = "float32",
    report: Any = None,
    device: str = "cpu",
) -> Forecast:
    """Predict the accuracy lost and the negative-flip rate of porting `patch` onto `base`."""
    p = Patch.load(patch)
    cal = Calibration.load(calibration)
    notes: list[str] = []
    if old is None and (found := _recorded_base(p)) is not None:
        old = found
        notes.append(f"OLD not given: using the base the patch records, {p.source_name} (its fingerprint matches)")
    if old is None:
        old_name = p.source_name
        notes.append(
            "without --from OLD (the base the patch was made on) neither the drift under the patch nor θ+Δθ's "
            f"answers can be measured{f'; the patch says it was made on {old_name}' if old_name else ''}"
        )
        return Forecast(str(patch), str(base), None, None, None, None, None, None, cal, notes)
    weights = weight_signals(p, base, old, report)
    outputs = None
    if inputs:
        outputs = output_signals(patch, old, base, inputs, n, data, dtype, device)
    if outputs is not None and outputs.loglik_change is not None:
        if outputs.rows_skipped:
            k = outputs.rows_skipped
            notes.append(f"{k} of {k + outputs.n} rows skipped: no prompt token fits before the completion")
        notes.append(NO_POINTS_FOR_COMPLETIONS)
        return Forecast(str(patch), str(base), str(old), weights, outputs, None, None, None, cal, notes)
    if outputs is None or outputs.expected_change is None:
        notes.append("the loss in points needs a task's unlabeled inputs: pass --inputs TASK")
        return Forecast(str(patch), str(base), str(old), weights, outputs, None, None, None, cal, notes)
    raw = -100 * outputs.expected_change
    loss = cal.loss(raw, weights.subspace_disturbance)
    lo_raw, hi_raw = (-100 * outputs.expected_change_ci[1], -100 * outputs.expected_change_ci[0])
    spread = 1.96 * cal.residual_sd_points if cal.residual_sd_points else 0.0
    interval = (cal.a * lo_raw + loss - cal.a * raw - spread, cal.a * hi_raw + loss - cal.a * raw + spread)
    flips = cal.flips(100 * outputs.expected_neg_flip_rate, 100 * outputs.disagreement)
    return Forecast(str(patch), str(base), str(old), weights, outputs, loss, interval, flips, cal, notes)
