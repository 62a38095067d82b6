"""What the reproduction runs: the five model variants, and each task's recipe in two profiles."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..device import BF16_IF_NATIVE

VARIANTS = ("base", "evolved", "base+patch", "evolved+patch", "evolved+retuned")
LABELS = {
    "base": "θ (zero-shot)",
    "evolved": "θ' (zero-shot)",
    "base+patch": "θ + Δθ",
    "evolved+patch": "θ' + Δθ (ported)",
    "evolved+retuned": "θ' + Δθ' (re-tuned)",
}


@dataclass
class TaskPlan:
    steps: int
    eval_limit: int | None
    max_length: int = 256
    lr: float = 1e-3


@dataclass
class Profile:
    name: str
    tasks: dict[str, TaskPlan]
    corpus: str = "mix"
    evolve_steps: int = 40
    evolve_mode: str = "full"
    evolve_lr: float = 1e-4
    evolve_max_length: int = 128
    batch_size: int = 8
    dtype: str = BF16_IF_NATIVE  # training: bf16 where native (AMX: faster than fp32), else fp32; LoRA stays fp32
    eval_dtype: str = "float32"
    gen_tokens: int = 128
    seed: int = 0
    notes: list[str] = field(default_factory=list)


PLANS = {  # one recipe per task, shared by both profiles so a --full run reuses a --quick run's cache
    "sst2": TaskPlan(60, None, 128),
    "boolq": TaskPlan(60, 300, 320),
    "mrpc": TaskPlan(60, None, 192),
    "rte": TaskPlan(60, None, 256),
    "wnli": TaskPlan(40, None, 192),
    "winogrande": TaskPlan(80, 400, 96),
    "gsm8k": TaskPlan(40, 80, 256),  # sized so --full fits 90 min on 2 cores
}
NOTES = {
    "sst2": "SST-2: all 872 GLUE dev sentences",
    "boolq": "BoolQ: first 300 questions of our 2,000-question eval part",
    "mrpc": "MRPC: all 408 dev pairs",
    "rte": "RTE: all 177 questions of our eval part",
    "wnli": "WNLI: all 71 dev pairs",
    "winogrande": "WinoGrande: first 400 of the 1,267 dev sentences",
    "gsm8k": "GSM8K: first 80 test questions, greedy, at most 128 new tokens, flexible-extract exact match",
}
PROFILES: dict[str, Profile] = {
    name: Profile(name, {t: PLANS[t] for t in tasks}, notes=[NOTES[t] for t in tasks])
    for name, tasks in (("quick", ("sst2", "winogrande")), ("full", tuple(PLANS)))
}
