"""The PortLLM experiment as one command: patch once, let the base evolve, port, compare.

For each task: θ zero-shot, θ' zero-shot, θ + Δθ, θ' + Δθ (ported, no training) and θ' + Δθ'
(LoRA re-tuned on θ' with the same recipe); plus the negative flips of θ' + Δθ against θ + Δθ,
and the cost of porting against re-tuning. Every score carries its Wilson interval and the majority
baseline; differences between variants are paired (bootstrap interval, McNemar); the headline
average is over the tasks whose patch learned.

profiles  what runs: variants, per-task recipes, the quick and full profiles
run       the grid, cached by content; train and port each in their own process
result    ReproduceReport, whose to_dict() is report.json
report    report.md and the charts
"""

from .profiles import LABELS, PROFILES, VARIANTS, Profile, TaskPlan
from .report import charts, markdown
from .result import ReproduceReport
from .run import ENGINE_VERSION, reproduce

__all__ = [
    "ENGINE_VERSION",
    "LABELS",
    "PROFILES",
    "VARIANTS",
    "Profile",
    "ReproduceReport",
    "TaskPlan",
    "charts",
    "markdown",
    "reproduce",
]
