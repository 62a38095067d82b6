"""Repair a ported patch where the base moved far: win back Δθ's gain on θ' without labels (`core.repair`)."""

from .core import DEFAULT_MARGIN, METHODS, RepairResult, repair
from .distill import Agreement, DistillConfig
from .inputs import RepairInputs, read_inputs

__all__ = [
    "DEFAULT_MARGIN",
    "METHODS",
    "Agreement",
    "DistillConfig",
    "RepairInputs",
    "RepairResult",
    "read_inputs",
    "repair",
]
