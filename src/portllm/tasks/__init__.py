"""The task suite: the seven tasks of the PortLLM paper plus eight more (commonsense, science, GLUE, held-out SST-2).

Each task is one file in defs/ (after lm-evaluation-harness's task YAMLs): where its train and eval
splits come from, how a row becomes a prompt (Jinja2), the answer choices (or the generation and
extraction rule) and its metric. Prompts follow lm-evaluation-harness's zero-shot conventions so our
numbers can be checked against theirs; what a template cannot say is a named hook in hooks.py.

A user's own task is the same kind of file anywhere else: named by its path (`--tasks my/task.yaml`)
or, in a folder given with `--include-path` or $PORTLLM_TASKS_PATH, by its name; its data paths are
relative to its folder (or `${PORTLLM_DATA}/...`), in JSONL, JSON, CSV, TSV or Parquet (registry.py).

Data comes from a directory laid out like the project's shared data (flag `--data-dir`, env
`PORTLLM_DATA`); without one, the Hugging Face hub is tried. Splits are fixed: where no
labelled train split with the needed fields exists (BoolQ with passages, RTE, PIQA), a
documented slice of the labelled file is held out for training and never evaluated on.
"""

from .check import TaskCheck, check_task_file, render_example
from .data import data_dir, hub_rows, load_examples, load_rows, user_files
from .hooks import HOOKS, gsm8k_reference
from .loader import DEFS, load_dir, load_task_file, load_user_file
from .readers import Reader, read_csv, read_json, read_jsonl, read_parquet, read_tsv, with_labels
from .registry import (
    PAPER_TASKS,
    TASKS,
    get_task,
    include_path,
    is_task_file,
    load_user_task,
    markdown_table,
    parse_tasks,
    task_dirs,
    task_key,
    user_tasks,
)
from .schema import DATA_VAR, METRICS, Example, Hub, Split, Task

__all__ = [
    "DATA_VAR",
    "DEFS",
    "HOOKS",
    "METRICS",
    "PAPER_TASKS",
    "TASKS",
    "Example",
    "Hub",
    "Reader",
    "Split",
    "Task",
    "TaskCheck",
    "check_task_file",
    "data_dir",
    "get_task",
    "gsm8k_reference",
    "hub_rows",
    "include_path",
    "is_task_file",
    "load_dir",
    "load_examples",
    "load_rows",
    "load_task_file",
    "load_user_file",
    "load_user_task",
    "markdown_table",
    "parse_tasks",
    "read_csv",
    "read_json",
    "read_jsonl",
    "read_parquet",
    "read_tsv",
    "render_example",
    "task_dirs",
    "task_key",
    "user_files",
    "user_tasks",
    "with_labels",
]
