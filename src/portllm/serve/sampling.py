"""How a row's next token is chosen and how much of its text may be sent: per-row temperature, top_p, seed, stop.

Every row of a batch carries its own `SamplingParams` and its own torch Generator (seeded from `seed`,
else at random), so a seeded request draws the same tokens whoever shares its batch. Temperature 0
is greedy (argmax, as `evaluate.generate`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .security import SEED_MAX, SEED_MIN


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI's sampling knobs. temperature 0 is greedy (argmax, as `evaluate.generate`)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (load tests)

    def problem(self) -> tuple[str, str] | None:
        """(parameter, what is wrong) for values no sampler can use, else None."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            return "max_tokens", f"max_tokens must be a positive integer, got {self.max_tokens!r}"
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 2):
            return "temperature", f"temperature must be between 0 and 2, got {self.temperature!r}"
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            return "top_p", f"top_p must be in (0, 1], got {self.top_p!r}"
        if len(self.stop) > 4 or any(not isinstance(s, str) or not s for s in self.stop):
            return "stop", "stop takes at most 4 non-empty strings"
        if self.seed is not None and not (isinstance(self.seed, int) and SEED_MIN <= self.seed <= SEED_MAX):
            return "seed", f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}] (int64), got {self.seed!r}"
        return None


def row_generator(p: SamplingParams) -> torch.Generator | None:
    """A row's own random stream (None when greedy): its seed, else a random one."""
    if p.temperature == 0:
        return None
    return torch.Generator().manual_seed(p.seed if p.seed is not None else random.getrandbits(63))


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """Temperature, then nucleus (the smallest set of tokens whose probability reaches top_p)."""
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > p.top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def next_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], gens: Sequence[torch.Generator | None]
) -> list[int]:
    """Each row's next token from its last logits (rows × vocab): argmax for greedy rows, else sampled."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1).tolist()
    return [greedy[j] if p.temperature == 0 else sample(logits[j], p, g) for j, (p, g) in enumerate(zip(params, gens))]


def stop_at(text: str, stop: Sequence[str]) -> int:
    """Where the first stop string begins in the text, or -1."""
    return min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)


def safe_end(text: str, stop: Sequence[str]) -> int:
    """How much of the text can be sent: not a tail that may still become a stop string, nor a
    half-decoded character (U+FFFD while a multi-byte token sequence is incomplete)."""
    end = len(text)
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                end = min(end, len(text) - k)
                break
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    return end
