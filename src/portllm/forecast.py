"""Before any labelled evaluation: what will porting this patch onto NEW cost?

Three kinds of evidence a user has without labels:
- the weights: how far the base moved under each patched matrix, and how much of that movement
  falls inside the patch's own rank-r subspace, relative to the patch (needs OLD);
- unlabeled task inputs: θ+Δθ and θ'+Δθ answer the same questions; where they disagree, θ+Δθ's
  own choice probabilities are the best unlabeled belief about which answer is right, so the
  expected accuracy change is Σ_i [p_A,i(answer_B) − p_A,i(answer_A)] / n and the expected
  negative-flip rate is Σ_{i: answers differ} p_A,i(answer_A) / n (needs OLD to run θ+Δθ);
- plain text: next-token disagreement and KL between the two (needs OLD);
- a user's generation data (a prompt/completion or chat JSONL as `train --data` reads, or a generation task
  file): the same next-token signals where each (last) completion starts, the change in the reference
  completions' mean per-token log-likelihood with a paired interval over rows (nats/token, not points), and the
  share of greedy answers that change (needs OLD). The generation sweep (docs/sweep/generation) calibrates both
  and measures how well they carry from the rows a user has to the rows they will score.
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
from .eval import generate_ids, open_lm, run_task
from .eval.loglik import encode_requests
from .head import logits_at
from .models import EMBEDDED, family_of, fingerprint, resolve_base
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
    # completions: the share of the first rows' prompts whose greedy answer (gen_tokens new tokens) differs
    # between the two models, with its bootstrap 95% interval, over `generated` prompts
    outputs_changed: float | None = None
    outputs_changed_ci: tuple[float, float] | None = None
    generated: int = 0


BUILTIN_CALIBRATION = Path(__file__).with_name("forecast_calibration.json")
BUILTIN_GEN_CALIBRATION = Path(__file__).with_name("forecast_calibration_generation.json")
MC_FIELDS = ("a", "b", "c", "flip_a", "flip_b", "flip_c", "residual_sd_points", "source")  # a family's fit
NO_POINTS_FOR_COMPLETIONS = (
    "no loss in points for generation data (points need answer options): the change in the reference "
    "log-likelihood and the share of greedy answers that change are forecast instead"
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
    family: str | None = None  # the base family (models.family_of) its cells came from; None: not recorded
    # generation data (docs/sweep/generation): the scored rows' log-likelihood change ≈ gen_loglik_a · the change
    # measured on the user's rows; the share of greedy answers that change ≈ gen_changed_a · the share measured
    # on the user's prompts; the sds are out-of-sample residual sds (nats/token, points)
    gen_loglik_a: float = 1.0
    gen_loglik_sd: float | None = None
    gen_changed_a: float = 1.0
    gen_changed_sd_points: float | None = None
    gen_source: str = "raw (uncalibrated): the changes measured on these rows"
    gen_family: str | None = None
    cells: int | None = None  # sweep cells (off the t = 0 control) it was fitted on; None: not recorded
    # one fit per base family (models.family_of) on that family's cells alone, when the sweep had several or
    # recorded its one (calibration.json's "families"); `for_family` chooses among them
    families: dict[str, Calibration] = field(default_factory=dict)

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
        paths = [BUILTIN_CALIBRATION, BUILTIN_GEN_CALIBRATION] if str(path) == "builtin" else [Path(path)]
        d: dict[str, Any] = {}
        for f in paths:
            try:
                part = json.loads(Path(f).read_text())
            except (OSError, ValueError) as e:
                what = e.__class__.__name__
                raise PortLLMError(f"calibration {f}: unreadable ({what}); omit --calibration") from None
            if not isinstance(part, dict):
                raise PortLLMError(f"calibration {f}: expected a JSON object; omit --calibration")
            d |= part
        try:
            cal = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "families"})
        except TypeError as e:
            raise PortLLMError(f"calibration {path}: unreadable ({e}); omit --calibration") from None
        return replace(cal, families=cal.family_fits(d.get("families") or {}, path))

    def family_fits(self, families: Any, path: Any) -> dict[str, Calibration]:
        """calibration.json's "families" ({model family: its MC fit and cell count}) as Calibrations that keep
        this one's generation fields."""
        if not isinstance(families, dict) or not all(isinstance(v, dict) for v in families.values()):
            raise PortLLMError(f"calibration {path}: 'families' must map a model family to its fit; omit --calibration")
        out = {}
        for name, v in families.items():
            if missing := [k for k in MC_FIELDS if k not in v]:
                raise PortLLMError(f"calibration {path}: family {name} lacks {', '.join(missing)}; omit --calibration")
            mc = {k: v[k] for k in (*MC_FIELDS, "cells") if k in v}
            out[name] = replace(self, **mc, family=name, families={})
        return out

    def for_family(self, family: str) -> tuple[Calibration, str]:
        """The calibration for a patch made on a base of `family` (models.family_of), and the note that says
        which: the family's own fit where it has one; else this (pooled) one, saying plainly that the family was
        never in the calibration, so its interval is not validated for it."""
        if family in self.families:
            own = self.families[family]
            n = "?" if own.cells is None else own.cells
            return own, f"calibration: fitted on {family} bases ({n} cells): {own.source}"
        fitted = sorted(self.families) or ([self.family] if self.family else [])
        if fitted == [family]:
            return self, f"calibration: {self.source}"
        if not fitted:
            return self, f"calibration: {self.source} (the base family it was fitted on is not recorded)"
        return self, (
            f"calibration: {self.source}; warning: this patch's base family, {family}, was never in the "
            f"calibration (fitted on {' and '.join(fitted)} bases only): its forecast and interval are not "
            "validated for this family"
        )


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
    generation: GenerationForecast | None = None  # generation data: what the port does to the completions

    def sentence(self) -> str:
        """The plain-language verdict `check` prints."""
        if self.generation is not None:
            return self.generation.sentence()
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


@dataclass(frozen=True)
class GenerationForecast:
    """For generation data: the predicted change in the reference completions' mean per-token log-likelihood on
    the rows a user will score (nats/token; negative: the port fits them worse) and the predicted share of
    greedy answers that change, each with a 95% interval (the sampling interval of the rows measured, widened by
    the calibration's out-of-sample residual sd)."""

    loglik_change: float
    loglik_interval: tuple[float, float]
    outputs_changed_points: float | None
    outputs_changed_interval: tuple[float, float] | None

    @classmethod
    def of(cls, o: OutputSignals, cal: Calibration) -> GenerationForecast:
        a, sd = cal.gen_loglik_a, cal.gen_loglik_sd or 0.0
        lo, hi = o.loglik_change_ci or (o.loglik_change, o.loglik_change)
        ll = a * o.loglik_change
        ll_iv = (min(a * lo, a * hi) - 1.96 * sd, max(a * lo, a * hi) + 1.96 * sd)
        if o.outputs_changed is None:
            return cls(ll, ll_iv, None, None)
        b, sd_c = cal.gen_changed_a, cal.gen_changed_sd_points or 0.0
        clo, chi = o.outputs_changed_ci or (o.outputs_changed, o.outputs_changed)
        clip = lambda v: min(100.0, max(0.0, v))  # noqa: E731
        ch = clip(100 * b * o.outputs_changed)
        return cls(ll, ll_iv, ch, (clip(100 * b * clo - 1.96 * sd_c), clip(100 * b * chi + 1.96 * sd_c)))

    def sentence(self) -> str:
        lo, hi = self.loglik_interval
        s = (
            f"the reference completions' log-likelihood is expected to change by {self.loglik_change:+.3f} "
            f"nats/token (95% interval {lo:+.3f} to {hi:+.3f})"
        )
        if self.outputs_changed_points is not None:
            clo, chi = self.outputs_changed_interval
            s += f"; ~{self.outputs_changed_points:.0f}% of greedy answers change ({clo:.0f}-{chi:.0f}%)"
        return s


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


def _examples(inputs: str, n: int, data: str | Path | None, split: str = "eval") -> tuple[Any, list[Any]]:
    task = get_task(inputs)
    return task, load_examples(task, split, data, n)


def _next_token_probs(lm: Any, prompts: list[list[int]]) -> list[Any]:
    """The model's next-token distribution after each prompt (token ids, the context cut from the left)."""
    device = lm.model.get_input_embeddings().weight.device
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p[-lm.max_length :]], dtype=torch.long, device=device)
            last = torch.tensor([ids.shape[1] - 1])
            out.append(torch.softmax(logits_at(lm.model, ids, torch.ones_like(ids), last)[0, -1].float(), -1).cpu())
    return out


def is_completions_file(path: Path) -> bool:
    """A prompt/completion or chat JSONL (what `train --data` reads), not a text file or a task file."""
    return path.suffix.lower() in (".jsonl", ".json") and path.is_file()


@dataclass
class CompletionOutputs:
    """One model on a data file's first rows: per kept row (its index), the next-token distribution where its
    last completion starts, its reference completion's mean per-token log-likelihood, and the greedy answers to
    the first kept rows' prompts."""

    total: int  # rows read
    rows: list[int]
    probs: list[Any]
    logliks: list[float]
    outputs: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Generation:
    """How many prompts get a greedy answer in a forecast, how long, and where the answers stop."""

    n: int = 32
    max_new_tokens: int = 48
    stop: tuple[str, ...] = ()


def last_completion_start(labels: list[int]) -> int:
    """Where the last labelled span starts: a row's completion, or a chat's last assistant turn."""
    j = len(labels)
    while j > 0 and labels[j - 1] == -100:
        j -= 1
    while j > 0 and labels[j - 1] != -100:
        j -= 1
    return j


Labelled = list[tuple[list[int], list[int]]]  # (token ids, labels: -100 outside the reference completion)


def sft_rows(lm: Any, path: Path, n: int) -> tuple[int, list[int], Labelled]:
    """A JSONL's first n rows tokenized as `train --data` does (chats through the tokenizer's chat template, the
    prompt cut from the left); a row whose completion leaves no prompt token within the context is skipped."""
    rows = read_sft(path).rows[:n]
    kept, examples = [], []
    for i, row in enumerate(rows):
        enc = encode_rows(lm.tokenizer, [row], lm.max_length)
        if enc.examples and last_completion_start(enc.examples[0][1]) >= 1:
            kept.append(i)
            examples.append(enc.examples[0])
    return len(rows), kept, examples


def task_rows(lm: Any, examples: list[Any]) -> Labelled:
    """A generation task's (prompt, reference) pairs tokenized as `eval` scores them (BOS, the left cut)."""
    out = []
    for seq, k in encode_requests(lm, [(e.prompt, e.target) for e in examples]):
        out.append((seq, [-100] * (len(seq) - k) + seq[len(seq) - k :]))
    return out


def completion_outputs(
    lm: Any, total: int, kept: list[int], examples: Labelled, gen: Generation, where: str
) -> CompletionOutputs:
    """One model's next-token distributions where each completion starts, the references' log-likelihoods, and
    greedy answers to the first `gen.n` prompts."""
    if not kept:
        raise PortLLMError(f"{where}: no row fits {lm.max_length} tokens with a prompt before its completion")
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = [ids[: last_completion_start(labels)] for ids, labels in examples]
    outputs, _ = generate_ids(lm, prompts[: gen.n], gen.stop, gen.max_new_tokens) if gen.n else ([], 0)
    return CompletionOutputs(
        total, kept, _next_token_probs(lm, prompts), completion_logliks(lm.model, examples, pad), outputs
    )


def completion_signals(a: CompletionOutputs, b: CompletionOutputs, path: Path | str) -> OutputSignals:
    """Next-token signals where the completions start, the paired change in their log-likelihood (B − A), and
    the share of greedy answers that differ."""
    if a.rows != b.rows:
        raise PortLLMError(f"{path}: the two bases tokenize its rows differently; forecast needs one tokenizer")
    change, lo, hi = paired_bootstrap(a.logliks, b.logliks, iters=2000)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    changed: dict[str, Any] = {}
    if a.outputs:
        flags = [float(x != y) for x, y in zip(a.outputs, b.outputs)]
        share, clo, chi = paired_bootstrap([0.0] * len(flags), flags, iters=2000)
        changed = {"outputs_changed": share, "outputs_changed_ci": (clo, chi), "generated": len(flags)}
    return replace(
        text_signals(a.probs, b.probs, path),
        kind="completions",
        loglik_a=mean(a.logliks),
        loglik_b=mean(b.logliks),
        loglik_change=change,
        loglik_change_ci=(lo, hi),
        rows_skipped=a.total - len(a.rows),
        **changed,
    )


def text_lines(path: Path, n: int) -> list[str]:
    """The first n non-empty lines of a text file: the inputs `--inputs FILE` compares the models on."""
    texts = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()][:n]
    if not texts:
        raise PortLLMError(f"{path} has no non-empty lines to compare the models on")
    return texts


def text_signals(pa: list[Any], pb: list[Any], path: Path | str) -> OutputSignals:
    """Next-token disagreement and KL between two models' next-token distributions on the same lines."""
    kl = [float((a * (a.clamp_min(1e-30).log() - b.clamp_min(1e-30).log())).sum()) for a, b in zip(pa, pb)]
    dis = sum(int(torch.argmax(a) != torch.argmax(b)) for a, b in zip(pa, pb))
    conf = [float(a.max()) for a in pa]
    return OutputSignals(str(path), "next-token", len(pa), dis / len(pa), sum(kl) / len(kl), sum(conf) / len(conf))


@dataclass(frozen=True)
class Inputs:
    """What a forecast compares the two models on: a task (name or task file; `split` of it), a text file, or a
    prompt/completion or chat JSONL; the first `n` items, `gen` for generation data's greedy answers."""

    source: str
    n: int = 200
    data: str | Path | None = None
    split: str = "eval"
    gen: Generation = Generation()

    @property
    def path(self) -> Path:
        return Path(self.source)

    @property
    def kind(self) -> str:
        """ "completions" (a JSONL), "text" (a plain text file) or "task"."""
        if is_completions_file(self.path):
            return "completions"
        return "text" if self.path.is_file() and not is_task_file(self.path) else "task"


def model_outputs(spec: str | Path, patch: str | Path, inputs: Inputs, dtype: str, device: str) -> Any:
    """One model's outputs on the inputs (next-token distributions for a text file, per-choice records for a
    multiple-choice task, completions for generation data). The model is freed before returning, so a forecast
    holds one model at a time, never two."""
    lm = open_lm(spec, patch, dtype=dtype, device=device)
    try:
        if inputs.kind == "completions":
            total, kept, rows = sft_rows(lm, inputs.path, inputs.n)
            return completion_outputs(lm, total, kept, rows, inputs.gen, inputs.source)
        if inputs.kind == "text":
            return _next_token_probs(lm, [lm.tokenizer(t).input_ids for t in text_lines(inputs.path, inputs.n)])
        task, examples = _examples(inputs.source, inputs.n, inputs.data, inputs.split)
        if task.kind != "mc":
            gen = replace(inputs.gen, max_new_tokens=task.max_new_tokens, stop=task.stop)
            rows = task_rows(lm, examples)
            return completion_outputs(lm, len(rows), list(range(len(rows))), rows, gen, task.name)
        return run_task(lm, task, examples).records
    finally:
        del lm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def output_signals(patch: str | Path, old: str | Path, base: str | Path, inputs: Inputs, dtype: str, device: str):
    """θ+Δθ's and θ'+Δθ's outputs compared, scored one model after the other."""
    a = model_outputs(old, patch, inputs, dtype, device)
    b = model_outputs(base, patch, inputs, dtype, device)  # runtime attach equals the port (test_port)
    if isinstance(a, CompletionOutputs):
        return completion_signals(a, b, inputs.source)
    if inputs.kind == "text":
        return text_signals(a, b, inputs.path)
    task, examples = _examples(inputs.source, inputs.n, inputs.data, inputs.split)
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


def family_notes(old: str | Path, cal: Calibration, generation: bool) -> list[str]:
    """Where the calibration in use was fitted, and a warning when the patch's base is of another family."""
    source, fitted = (cal.gen_source, cal.gen_family) if generation else (cal.source, cal.family)
    notes = [f"calibration: {source}"]
    family = family_of(old)
    if fitted and family != fitted:
        notes.append(
            f"warning: the calibration was fitted on {fitted} bases only; this patch's base is {family}: "
            "its interval is not validated for this family"
        )
    return notes


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
    split: str = "eval",
    gen: Generation = Generation(),
) -> Forecast:
    """Predict the accuracy lost and the negative-flip rate of porting `patch` onto `base` (multiple choice), or
    the change in the reference log-likelihood and the share of greedy answers that change (generation data).
    `split`: which split of a task supplies the inputs; `gen`: the greedy answers generation data gets."""
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
        outputs = output_signals(patch, old, base, Inputs(inputs, n, data, split, gen), dtype, device)
    if outputs is not None and outputs.loglik_change is not None:
        if outputs.rows_skipped:
            k = outputs.rows_skipped
            notes.append(f"{k} of {k + outputs.n} rows skipped: no prompt token fits before the completion")
        notes += family_notes(old, cal, generation=True) + [NO_POINTS_FOR_COMPLETIONS]
        g = GenerationForecast.of(outputs, cal)
        return Forecast(str(patch), str(base), str(old), weights, outputs, None, None, None, cal, notes, g)
    if outputs is None or outputs.expected_change is None:
        notes.append("the loss in points needs a task's unlabeled inputs: pass --inputs TASK")
        return Forecast(str(patch), str(base), str(old), weights, outputs, None, None, None, cal, notes)
    if cal.families:  # a fit per base family: the patch's own family's, or the pooled one and why
        cal, note = cal.for_family(family_of(old))
        notes.append(note)
    else:
        notes += family_notes(old, cal, generation=False)
    raw = -100 * outputs.expected_change
    loss = cal.loss(raw, weights.subspace_disturbance)
    lo_raw, hi_raw = (-100 * outputs.expected_change_ci[1], -100 * outputs.expected_change_ci[0])
    spread = 1.96 * cal.residual_sd_points if cal.residual_sd_points else 0.0
    interval = (cal.a * lo_raw + loss - cal.a * raw - spread, cal.a * hi_raw + loss - cal.a * raw + spread)
    flips = cal.flips(100 * outputs.expected_neg_flip_rate, 100 * outputs.disagreement)
    return Forecast(str(patch), str(base), str(old), weights, outputs, loss, interval, flips, cal, notes)
