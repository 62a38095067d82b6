"""The drift sweep: where does a ported patch break, and can the forecast tell in advance?"""

from .plan import PLANS, Evolution, SweepPlan, TaskRecipe
from .run import projection_drift, sweep

__all__ = ["PLANS", "Evolution", "SweepPlan", "TaskRecipe", "projection_drift", "sweep"]
