"""What a drift sweep runs: tasks and their recipes, seeds, evolution strengths, re-tunes.

One real update direction θ → θ' comes from continued pretraining (the paper's kind of update);
the drift levels are points θ + t·(θ' − θ) on that line (t = 0 is the zero-drift control), and
further real evolved bases (other corpora, other strengths) are added as cells of their own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..device import BF16_IF_NATIVE
from ..errors import PortLLMError


@dataclass(frozen=True)
class TaskRecipe:
    """How one task's patch is trained and scored, and (optionally) a smaller grid for a costly task.

    The grid fields narrow the plan's for this task only (None = the plan's): a task whose evals cost
    minutes each still gets ≥ 3 seeds at every level it is scored on.
    """

    steps: int = 60
    lr: float = 1e-3
    max_length: int = 128
    eval_limit: int | None = 500
    levels: tuple[float, ...] | None = None  # a subset of the plan's levels
    real: tuple[str, ...] | None = None  # corpora of the plan's real evolved bases to score
    retune_levels: tuple[float, ...] | None = None
    warm: bool = True  # the warm-start measurement (plan.warm_steps)
    correct: bool = True  # the rescale correction (plan.correct_levels / correct_real)
    repair: bool = True  # the label-free repair (plan.repair_levels / repair_real)
    repair_inputs: tuple[str, ...] | None = None  # a subset of plan.repair_inputs for this task
    signal_rows: int | None = None  # the forecast's signal inputs for this task (None = the plan's)


@dataclass(frozen=True)
class Evolution:
    """A real continued-pretraining run from θ."""

    corpus: str = "instruct"
    steps: int = 40
    lr: float = 1e-3
    max_length: int = 128

    @property
    def label(self) -> str:
        return f"continued:{self.corpus}@lr{self.lr:g}x{self.steps}"


@dataclass(frozen=True)
class SweepPlan:
    name: str
    tasks: dict[str, TaskRecipe]
    seeds: tuple[int, ...] = (0, 1, 2)
    direction: Evolution = Evolution()  # the update whose line the levels walk
    levels: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)  # t along the direction
    real: tuple[Evolution, ...] = ()  # more real evolved bases, scored as cells of their own
    retune_levels: tuple[float, ...] = (1.0, 2.0)  # t values (seed 0) where θ' is re-tuned cold
    warm_steps: tuple[int, ...] = ()  # warm-start (--init Δθ) vs cold re-tune step counts at the largest t
    correct_levels: tuple[float, ...] = ()  # t values (seed 0) where the rescale correction is tried
    correct_real: bool = False  # ... and on every real evolved base
    correct_inputs: int = 150  # unlabeled train-split inputs that choose λ
    repair_levels: tuple[float, ...] = ()  # t values (seed 0) where `portllm repair` is measured
    repair_real: bool = False  # ... and on every real evolved base
    repair_inputs: tuple[str, ...] = ("task", "text", "self")  # the task's train inputs, plain text, θ+Δθ's own
    repair_steps: int = 40
    repair_n: int = 256  # task inputs; text and self use repair_text_n
    repair_text_n: int = 128
    repair_gen_tokens: int = 32
    batch_size: int = 8
    dtype: str = BF16_IF_NATIVE  # training: bf16 where native, else fp32 (the sweep resolves it); LoRA stays fp32
    eval_dtype: str = "float32"
    kl_texts: int = 64  # held-out wikitext lines for the KL of θ' against θ
    kind: str = "mc"  # "mc": multiple-choice tasks (sweep/run.py); "generation": generation task files (generation.py)
    # the forecast's output signals come from inputs a user has and that are never scored (MC; generation reads
    # the train split's reference completions): "eval-unscored", the eval split's rows after the scored ones
    # (inputs the patch never saw, as `forecast --inputs TASK` reads by default), or "train", the rows the patch
    # was trained on (memorised where the train set is small); each minus any prompt that is also a scored item.
    # "eval" = the scored items themselves (the protocol before issue 21)
    signal_split: str = "eval-unscored"
    signal_rows: int = 200
    signal_outputs: int = 32  # generation: ... of which this many prompts get greedy answers
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def only_repair_inputs(plan: SweepPlan, kinds: tuple[str, ...]) -> SweepPlan:
    """The plan with its repairs (and each task's) narrowed to `kinds`; the cache keys of what stays are unchanged."""
    unknown = [k for k in kinds if k not in plan.repair_inputs]
    if unknown:
        raise PortLLMError(
            f"--repair-inputs {unknown[0]!r}: plan {plan.name} repairs from {', '.join(plan.repair_inputs)}"
        )
    tasks = {
        name: r
        if r.repair_inputs is None
        else replace(r, repair_inputs=tuple(k for k in r.repair_inputs if k in kinds))
        for name, r in plan.tasks.items()
    }
    return replace(plan, tasks=tasks, repair_inputs=tuple(k for k in plan.repair_inputs if k in kinds))


# The full plan's task recipes. Other plans narrow them with `replace` (levels, re-tunes, repair inputs), so the
# fields that make a patch's, base's or eval's cache key stay the same entries across plans.
_SST2_HELDOUT = TaskRecipe(60, 1e-3, 128, 1000)
# ARC-Easy's patch learned +19.6 points (docs/routing); BoolQ's only reached the majority class.
# Its evals cost ~4 min per 500 here: five bases (0 to 4.52% and the real text update), 3 seeds.
_ARC_EASY = TaskRecipe(
    120, 1e-3, 128, 500, levels=(0.0, 0.5, 1.0, 2.0), real=("text",), retune_levels=(2.0,), warm=False, correct=False
)
# CommonsenseQA's patch learned 25.4 -> 49.6 (majority 21.2; zoo, 500 examples); evals ~1 min
_COMMONSENSE_QA = TaskRecipe(
    120, 1e-3, 96, None, levels=(0.0, 0.5, 1.0, 2.0), real=("text",), retune_levels=(2.0,), warm=False
)

# The gemma plan's recipes (the second family, issue 21); the gemma-repair plan narrows them.
_GEMMA_SST2 = TaskRecipe(60, 1e-3, 128, 500, warm=False, correct=False, repair=False)
# no re-tune for CommonsenseQA in the gemma plan (time: 200 steps cost ~5 min there; SST-2's is the re-tune at 5.2%)
_GEMMA_CSQA = TaskRecipe(200, 1e-3, 96, 500, warm=False, correct=False, repair=False, retune_levels=())
# Gemma moves ~6x further than SmolLM2 under the same update (40 full steps at lr 1e-3: 12.95% projection drift, KL
# 3.1 on text at t = 1), so its levels are t = 0.05 to 0.4 of that line (0.65% to 5.2%) and its real update a 5x
# smaller lr (t = 0.5, 1 and lr 1e-3's real base were built and left out: 6.5%+)
_GEMMA_LEVELS = (0.0, 0.05, 0.1, 0.2, 0.4)
_GEMMA_REAL = (Evolution("text", 40, 2e-4, 128),)

PLANS: dict[str, SweepPlan] = {
    # about 4.3 h on a 2-core CPU in all (sst2_heldout ~2.9 h, arc_easy 45 min, commonsense_qa 43 min, one
    # torch thread, docs/sweep/full/NOTES.md, made with signals on the scored items: signal_split="eval"); resumes
    # from its cache
    "full": SweepPlan(
        "full",
        {"sst2_heldout": _SST2_HELDOUT, "arc_easy": _ARC_EASY, "commonsense_qa": _COMMONSENSE_QA},
        real=(Evolution("text", 40, 1e-3, 128), Evolution("instruct", 40, 4e-4, 128)),
        warm_steps=(10, 30),
        correct_levels=(1.0, 2.0),
        correct_real=True,
    ),
    # the repair study: the full plan's recipes (so its patches, bases and evals are the same cache entries),
    # seed 0, the levels where a plain port frays (1.13%, 2.26%, 4.52% and the real text update), and
    # `portllm repair` from three kinds of unlabeled inputs at each (docs/sweep/repair); ARC-Easy added 2026-12-04
    "repair": SweepPlan(
        "repair",
        {
            "sst2_heldout": replace(
                _SST2_HELDOUT,
                levels=(0.5, 1.0, 2.0),
                real=("text",),
                retune_levels=(1.0, 2.0),
                warm=False,
                correct=False,
            ),
            "commonsense_qa": replace(
                _COMMONSENSE_QA, levels=(1.0, 2.0), correct=False, repair_inputs=("task", "self")
            ),
            "arc_easy": replace(_ARC_EASY, levels=(0.5, 1.0, 2.0), repair_inputs=("task", "self")),
        },
        seeds=(0,),
        levels=(0.5, 1.0, 2.0),
        real=(Evolution("text", 40, 1e-3, 128),),
        retune_levels=(1.0, 2.0),
        repair_levels=(0.5, 1.0, 2.0),
        repair_real=True,
        # this study's forecast figures are not a headline (docs/sweep's are): its signals stay on the scored items,
        # as when it was first made (2026-12-03; report.md says so), so its cells are the same cache entries
        signal_split="eval",
    ),
    # generation data (issue 19): two user task files (not shipped tasks) scored by the reference completions'
    # log-likelihood and greedy answers (32 new tokens) on 96 eval rows, 3 seeds, four interpolated levels (0.57%
    # to 4.5%) and the real text update; the forecast's signals from 48 train rows, 24 of them answered greedily.
    # Run from the repository root (the task files are paths).
    "generation": SweepPlan(
        "generation",
        {
            f"docs/your_task/{name}.yaml": TaskRecipe(
                60, 1e-3, 160, 96, warm=False, correct=False, repair=False, retune_levels=()
            )
            for name in ("code_alpaca", "math_cot")
        },
        levels=(0.25, 0.5, 1.0, 2.0),
        real=(Evolution("text", 40, 1e-3, 128),),
        retune_levels=(),
        kind="generation",
        signal_rows=48,
        signal_outputs=24,
    ),
    # the forecast validated as a user meets it (issue 21), SmolLM2's half: signals from train-split inputs never
    # scored, three tasks, 3 seeds, t = 0/0.5/1/2 along the direction and the real text update, re-tune at t = 2.
    # ARC-Easy's evals cost ~0.5 s a row here: 250 scored rows, 100 signal inputs, one level fewer.
    # Joined with the gemma plan's report for leave one family out (docs/sweep/NOTES.md).
    "smollm2": SweepPlan(
        "smollm2",
        {
            "sst2_heldout": TaskRecipe(60, 1e-3, 128, 500, warm=False, correct=False, repair=False),
            "commonsense_qa": TaskRecipe(120, 1e-3, 96, 500, warm=False, correct=False, repair=False),
            "arc_easy": TaskRecipe(
                120, 1e-3, 128, 250, levels=(0.0, 1.0, 2.0), warm=False, correct=False, repair=False, signal_rows=100
            ),
        },
        levels=(0.0, 0.5, 1.0, 2.0),
        real=(Evolution("text", 40, 1e-3, 128),),
        retune_levels=(2.0,),
    ),
    # the second model family (issue 21): Gemma-3-270M (tied embeddings, GQA, a 262k vocabulary), two tasks whose
    # patches learn on it (SST-2 held-out; CommonsenseQA, whose loss only drops after ~60 steps on Gemma, hence
    # 200), 3 seeds, four interpolated levels and a real continued-pretraining base, a re-tune at the largest t.
    # Signals from the eval split's unscored rows, as every MC plan. Run with --base gemma3-270m (docs/sweep/NOTES.md).
    "gemma": SweepPlan(
        "gemma",
        {"sst2_heldout": _GEMMA_SST2, "commonsense_qa": _GEMMA_CSQA},
        levels=_GEMMA_LEVELS,
        real=_GEMMA_REAL,
        retune_levels=(0.4,),
    ),
    # the repair study on the second family (issue 22): the gemma plan's recipes, seed 0, its three largest levels
    # (1.30%, 2.59%, 5.18%) and its real text update (2.61%), `portllm repair` from the same kinds of inputs as the
    # repair plan, a cold re-tune at t = 0.4 for both tasks (the cost to compare with). Gemma trained at ~15-20 s a
    # step on a 2-core AVX2 CPU (5.8-8.1 s since the head runs only at answer positions:
    # docs/benchmarks/train_step.txt), so SST-2 ran on a lent GPU (--device cuda, benchmarks/gpu_sweep.sh;
    # docs/sweep/gemma_repair) and CommonsenseQA on the CPU (gemma_repair/csqa_cpu, ~3.5 h on AVX2; task + self
    # inputs in gemma_repair/csqa_xeon, 1.8 h on a 2-core AMX Xeon). --base gemma3-270m.
    "gemma-repair": SweepPlan(
        "gemma-repair",
        {
            "sst2_heldout": replace(_GEMMA_SST2, repair=True),
            "commonsense_qa": replace(_GEMMA_CSQA, repair=True, retune_levels=(0.4,), repair_inputs=("task", "self")),
        },
        seeds=(0,),
        levels=(0.1, 0.2, 0.4),
        real=_GEMMA_REAL,
        retune_levels=(0.4,),
        repair_levels=(0.1, 0.2, 0.4),
        repair_real=True,
    ),
    # one task, one seed, three levels: a smoke run of the real pipeline (about 15 min)
    "pilot": SweepPlan(
        "pilot",
        {"sst2_heldout": TaskRecipe(60, 1e-3, 128, 300)},
        seeds=(0,),
        levels=(0.0, 1.0, 2.0),
        retune_levels=(2.0,),
    ),
}
