"""Architecture facts as data: which layers LoRA targets, which tensors are embeddings, which files ride along.

Everything portllm must know about a model family lives in `architectures.json`, keyed by
config.json's `model_type`, so supporting a new family is a table entry rather than string
tests scattered through the code. A family missing from the table is read off the model
itself: transformers builds it from its config on the meta device (no memory, no weights)
and its linear layers become the LoRA targets.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

from .errors import PortLLMError

TABLE = Path(__file__).with_name("architectures.json")


@dataclass(frozen=True)
class Architecture:
    """One model family: LoRA targets, embedding/head module names, tying, fan-in-fan-out, side files."""

    model_type: str
    lora_targets: tuple[str, ...]  # short module names, as PEFT's target_modules take them
    embedding_names: tuple[str, ...]  # input (and position) embedding modules, as named in checkpoints
    head_names: tuple[str, ...]  # output projection onto the vocabulary
    may_tie: bool  # whether the head may share the input embedding's weight
    tie_key: str | None  # the config key that says it does
    tie_default: bool  # its value when config.json omits it
    fan_in_fan_out: bool  # weights stored (in, out), as GPT-2's Conv1D
    side_files: tuple[str, ...]  # non-weight files a model directory carries
    source: str = "table"  # "table", or "model" when read off the model's own modules

    @property
    def vocab_names(self) -> tuple[str, ...]:
        """Modules whose shape follows the vocabulary: embeddings and head."""
        return self.embedding_names + self.head_names

    def is_vocab_tensor(self, name: str) -> bool:
        """Whether a module or tensor name (e.g. `lm_head.weight`) belongs to an embedding or the head."""
        return any(name == n or name.startswith(n + ".") for n in self.vocab_names)

    def ties(self, config: dict[str, Any]) -> bool:
        """Whether a model with this config.json shares its embedding and head."""
        return self.may_tie and bool(config.get(self.tie_key, self.tie_default) if self.tie_key else self.tie_default)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@cache
def _table() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    data = json.loads(TABLE.read_text())
    return data["defaults"], data["architectures"]


def known_types() -> tuple[str, ...]:
    """The model types the table describes."""
    return tuple(_table()[1])


def _build(model_type: str, entry: dict[str, Any], source: str) -> Architecture:
    defaults, _ = _table()
    e = {**defaults, **entry}
    return Architecture(
        model_type=model_type,
        lora_targets=tuple(e["lora_targets"]),
        embedding_names=tuple(e["embedding_names"]),
        head_names=tuple(e["head_names"]),
        may_tie=bool(e["may_tie"]),
        tie_key=e["tie_key"],
        tie_default=bool(e["tie_default"]),
        fan_in_fan_out=bool(e["fan_in_fan_out"]),
        side_files=tuple(e["side_files"]),
        source=source,
    )


def side_files(model_type: str | None) -> tuple[str, ...]:
    """Files to copy beside the weights; cheap (never builds a model), so copying never waits on transformers."""
    defaults, table = _table()
    return tuple(table.get(model_type or "", {}).get("side_files", defaults["side_files"]))


_FROM_MODEL: dict[str, Architecture] = {}


def arch_for(model_type: str | None, config: Any = None) -> Architecture:
    """The architecture of `model_type`: the table's entry, else read off the model built from `config`.

    `config` (a config.json dict or a transformers config) is needed only for types the table
    lacks; the result is cached per model type.
    """
    _, table = _table()
    if model_type in table:
        return _build(model_type, table[model_type], "table")
    key = model_type or "?"
    if key not in _FROM_MODEL:
        _FROM_MODEL[key] = _from_model(key, config)
    return _FROM_MODEL[key]


def _from_model(model_type: str, config: Any) -> Architecture:
    """Build the model on the meta device and list its linear layers (all but the head)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    cfg = _transformers_config(model_type, config)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:
        msg = str(e).splitlines()[0][:160] if str(e) else e.__class__.__name__
        raise PortLLMError(f"architecture {model_type!r}: transformers cannot build it ({msg})") from None
    head = model.get_output_embeddings()
    targets: dict[str, None] = {}
    fifo = False
    embeddings, heads = [], []
    for name, mod in model.named_modules():
        if mod is head and head is not None:
            heads.append(name)
        elif isinstance(mod, torch.nn.Embedding):
            embeddings.append(name)
        elif isinstance(mod, (torch.nn.Linear, Conv1D)):
            targets.setdefault(name.rsplit(".", 1)[-1])
            fifo = fifo or isinstance(mod, Conv1D)
    tied = getattr(cfg.get_text_config(), "tie_word_embeddings", None)
    entry = {
        "lora_targets": list(targets),
        "embedding_names": embeddings,
        "head_names": heads,
        "tie_default": bool(tied) if tied is not None else True,
        "fan_in_fan_out": fifo,
    }
    return _build(model_type, entry, "model")


def _transformers_config(model_type: str, config: Any) -> Any:
    """A transformers config from a config.json dict (by model_type, else by its architecture class)."""
    import transformers
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if not isinstance(config, dict):
        raise PortLLMError(f"architecture {model_type!r} is not in portllm's table; give its config to read it")
    rest = {k: v for k, v in config.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(config.get("model_type", model_type), **rest)
    except (ValueError, KeyError):
        pass
    except Exception as e:  # a known type whose fields transformers' config validation refuses
        raise PortLLMError(f"architecture {model_type!r}: config.json is invalid ({_one_line(e)})") from None
    for cls_name in config.get("architectures") or []:
        cls = getattr(transformers, cls_name, None)
        if cls is not None and getattr(cls, "config_class", None) is not None:
            try:
                return cls.config_class(**rest)
            except Exception as e:
                raise PortLLMError(f"architecture {model_type!r}: config.json is invalid ({_one_line(e)})") from None
    raise PortLLMError(f"architecture {model_type!r}: neither portllm's table nor transformers knows it")


def _one_line(e: BaseException) -> str:
    """A library's reason as one short printable line."""
    text = " ".join(str(e).split())[:160] or e.__class__.__name__
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
