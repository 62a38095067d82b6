"""What `forecast` and `check` tell a user whose port is predicted to lose more than the margin."""

from __future__ import annotations

from pathlib import Path

from .core import DEFAULT_MARGIN

# measured in docs/sweep/repair (SmolLM2-135M, 2-core CPU; SST-2, CommonsenseQA, ARC-Easy) and
# docs/sweep/gemma_repair (Gemma-3-270M, SST-2 on an H200, CommonsenseQA on two CPUs): what distill cost
# and won back there
MEASURED = (
    "in docs/sweep/repair it cost {cost} and won back {won} of the plain port's loss at 2.3-4.5% drift, from "
    "the task's own unlabeled inputs"
)
COST = "85-257 s on a 135M model (1.3-1.8x a cold re-tune's wall time)"
WON = (
    "41-87% (13% at 4.5% on CommonsenseQA; on Gemma-3-270M at 5.2% 74% (SST-2) and 47-55% (CommonsenseQA, two "
    "CPUs), 0-29% at 2.6% on CommonsenseQA, nothing where its port lost < 5 points)"
)


def advice(
    loss_points: float | None, patch: str | Path, base: str, old: str | None, inputs: str | None,
    margin: float = DEFAULT_MARGIN,
) -> str | None:  # fmt: skip
    """One sentence with the command to run, or None when the predicted loss is under the margin (or unknown)."""
    if loss_points is None or old is None or loss_points < margin:
        return None
    return (
        f"the predicted loss ({loss_points:.1f} points) is over the {margin:g}-point margin: repair without labels "
        f"with `portllm repair {patch} --base {base} --from {old} --inputs {inputs or 'self'} --out REPAIRED` "
        f"(distill, 40 steps on 256 unlabeled inputs; {MEASURED.format(cost=COST, won=WON)}), then check it with "
        "`portllm eval`; where it falls short, re-tune (`portllm train --init`)"
    )
