"""Distillation: a LoRA on θ', started from Δθ, trained until θ'+Δθ' answers as θ+Δθ did.

The student starts as the plain port (θ' with Δθ's own factors), so zero steps change nothing and a
base that did not move leaves nothing to learn. The loss is the KL from θ+Δθ's distribution to the
student's: over the answer options of multiple-choice inputs, or over the next token along prompts and
θ+Δθ's continuations (its top-k, renormalised). `flip_weight` adds MUSCLE's emphasis: an option input
where θ+Δθ is confident (p ≥ 0.5) and the student currently picks another option weighs 1 + flip_weight.
A step whose loss is below `tol` updates nothing, so where the base did not move the patch comes back as it was.

A held-out part of the inputs (fixed split) is never trained on; the agreement with θ+Δθ there, before and
after, is what a user can read without labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import PortLLMError
from ..head import logits_at
from ..train import example_order, lr_at
from .teacher import ChoiceTargets, TextTargets

HELDOUT_SEED = 0  # the held-out split does not move with the training seed


@dataclass(frozen=True)
class DistillConfig:
    """The recipe; `key()`-like identity is its fields (recorded in the patch's lineage)."""

    steps: int = 40
    lr: float = 1e-3
    batch_size: int = 8
    max_length: int = 256
    seed: int = 0
    warmup: float = 0.06
    flip_weight: float = 1.0
    heldout: float = 0.2  # share of the inputs kept out of training to measure agreement on
    gen_tokens: int = 48  # length of θ+Δθ's continuation of each text prompt (and of each `self` sample)
    top_k: int = 32  # θ+Δθ's next-token distribution is matched on its top k tokens
    micro_batch: int = 16  # sequences per forward pass (gradients accumulate over a step's micro-batches)
    tol: float = 1e-5  # a step whose loss (mean KL) is below this updates nothing: there is nothing to repair


@dataclass
class Agreement:
    """θ+Δθ against the student on the held-out inputs: option agreement (choices) and mean KL."""

    n: int
    agreement: float | None  # share of held-out option inputs where the two pick the same option
    kl: float  # mean KL(θ+Δθ ‖ student) per input (choices) or per token (text)


@dataclass
class DistillRun:
    losses: list[float] = field(default_factory=list)
    before: Agreement | None = None
    after: Agreement | None = None
    trained_on: int = 0
    student_tokens: int = 0  # tokens through forward + backward (the compute a re-tune is compared on)


def split(n: int, share: float) -> tuple[list[int], list[int]]:
    """Train and held-out indices: a fixed shuffle; at least one held out once there are 5 inputs."""
    g = torch.Generator().manual_seed(HELDOUT_SEED)
    perm = torch.randperm(n, generator=g).tolist()
    k = min(n - 1, max(1 if n >= 5 else 0, round(share * n))) if share > 0 else 0
    return perm[k:], perm[:k]


def _padded(seqs: list[list[int]], pad: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, : len(s)] = torch.tensor(s)
        mask[j, : len(s)] = 1
    return ids.to(device), mask.to(device)


def option_logprobs(
    model: Any, pad: int, items: list[tuple[list[tuple[list[int], list[int]]], list[float]]]
) -> list[torch.Tensor]:
    """Per input: log-softmax over its options of the student's (normalised) option log-likelihoods; every
    option of every input in one forward pass."""
    pairs = [pair for options, _ in items for pair in options]
    seqs = [c + x for c, x in pairs]
    ids, mask = _padded(seqs, pad, next(model.parameters()).device)
    spans = [(len(c) - 1, len(c) + len(x) - 1) for c, x in pairs]  # the positions that predict x
    pos = sorted({p for a, b in spans for p in range(a, b)})
    col = {p: j for j, p in enumerate(pos)}
    logits = logits_at(model, ids, mask, torch.tensor(pos))
    out, row = [], 0
    for options, norms in items:
        scores = []
        for (_, x), norm in zip(options, norms):
            a, b = spans[row]
            rows = logits[row, col[a] : col[a] + b - a].float()
            lp = torch.log_softmax(rows, -1).gather(-1, torch.tensor(x, device=rows.device)[:, None]).sum()
            scores.append(lp / norm)
            row += 1
        out.append(torch.log_softmax(torch.stack(scores), -1))
    return out


def _choice_loss(
    model: Any, pad: int, t: ChoiceTargets, idx: list[int], flip_weight: float
) -> tuple[torch.Tensor, int]:
    """Weighted mean KL over the options of the inputs `idx`, and the tokens it ran."""
    losses, weights, tokens = [], [], 0
    for i, logq in zip(idx, option_logprobs(model, pad, [(t.pairs[i], t.norms[i]) for i in idx])):
        p = t.probs[i].to(logq.device)
        kl = (p * (torch.log(p.clamp_min(1e-12)) - logq)).sum()
        w = 1.0
        if flip_weight and float(p.max()) >= 0.5 and int(logq.argmax()) != int(p.argmax()):
            w += flip_weight
        losses.append(w * kl)
        weights.append(w)
        tokens += sum(len(c) + len(x) for c, x in t.pairs[i])
    return torch.stack(losses).sum() / sum(weights), tokens


def _text_loss(model: Any, pad: int, t: TextTargets, idx: list[int]) -> tuple[torch.Tensor, int]:
    """Mean KL per token from θ+Δθ's top-k next-token distribution to the student's."""
    seqs = [t.ids[i] for i in idx]
    ids, mask = _padded(seqs, pad, next(model.parameters()).device)
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
    total, count = logp.new_zeros(()), 0
    for j, i in enumerate(idx):
        n = len(t.ids[i]) - 1
        top, lp_t = t.top_ids[i].to(logp.device), t.top_logp[i].to(logp.device)
        lq = logp[j, :n].gather(-1, top)
        total = total + (lp_t.exp() * (lp_t - lq)).sum()
        count += n
    return total / max(1, count), sum(len(s) for s in seqs)


def loss_on(
    model: Any, pad: int, t: ChoiceTargets | TextTargets, idx: list[int], flip_weight: float
) -> tuple[torch.Tensor, int]:
    if isinstance(t, ChoiceTargets):
        return _choice_loss(model, pad, t, idx, flip_weight)
    return _text_loss(model, pad, t, idx)


@torch.no_grad()
def agreement(model: Any, pad: int, t: ChoiceTargets | TextTargets, idx: list[int], micro: int) -> Agreement:
    """How closely the student follows θ+Δθ on the inputs `idx` (never trained on when they are held out)."""
    if not idx:
        return Agreement(0, None, float("nan"))
    if isinstance(t, ChoiceTargets):
        same, kl = 0, 0.0
        per = max(1, micro // max(len(t.pairs[i]) for i in idx))
        for b in range(0, len(idx), per):
            part = idx[b : b + per]
            for i, logq in zip(part, option_logprobs(model, pad, [(t.pairs[i], t.norms[i]) for i in part])):
                p = t.probs[i].to(logq.device)
                same += int(logq.argmax()) == int(p.argmax())
                kl += float((p * (torch.log(p.clamp_min(1e-12)) - logq)).sum())
        return Agreement(len(idx), same / len(idx), kl / len(idx))
    kl = 0.0
    for b in range(0, len(idx), micro):
        loss, _ = _text_loss(model, pad, t, idx[b : b + micro])
        kl += float(loss) * len(idx[b : b + micro])
    return Agreement(len(idx), None, kl / len(idx))


def distill(
    model: Any,
    pad: int,
    targets: ChoiceTargets | TextTargets,
    cfg: DistillConfig,
    progress: Any = None,
) -> DistillRun:
    """Train the student's LoRA (the only trainable parameters of `model`) towards θ+Δθ's targets."""
    n = len(targets.pairs) if isinstance(targets, ChoiceTargets) else len(targets.ids)
    train_idx, held = split(n, cfg.heldout)
    if len(train_idx) < 1:
        raise PortLLMError("no inputs left to train on after the held-out part; pass more inputs (--n)")
    run = DistillRun(trained_on=len(train_idx))
    model.eval()  # no dropout either way; eval() only for the measurements
    run.before = agreement(model, pad, targets, held, cfg.micro_batch)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    batch = min(cfg.batch_size, len(train_idx))
    order = example_order(len(train_idx), cfg.steps, batch, cfg.seed)
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        idx = [train_idx[k] for k in order[step * batch : (step + 1) * batch]]
        total = 0.0
        opts = max(len(targets.pairs[i]) for i in idx) if isinstance(targets, ChoiceTargets) else 1
        per = max(1, cfg.micro_batch // opts)
        for b in range(0, len(idx), per):
            part = idx[b : b + per]
            loss, tokens = loss_on(model, pad, targets, part, cfg.flip_weight)
            if not torch.isfinite(loss):
                raise PortLLMError(f"the distillation loss became {float(loss)} at step {step}; lower --lr")
            (loss * len(part) / len(idx)).backward()
            total += loss.item() * len(part) / len(idx)
            run.student_tokens += tokens
        if total >= cfg.tol:  # Adam would turn the rounding noise of an already-matched batch into lr-sized steps
            opt.step()
        opt.zero_grad(set_to_none=True)
        run.losses.append(total)
        if progress:
            progress(step + 1, total)
    run.after = agreement(model, pad, targets, held, cfg.micro_batch)
    return run
