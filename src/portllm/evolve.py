"""Simulating an updated base: continued pretraining of θ on new data, as the paper did.

The paper's evolved bases are θ continued-pretrained on instruction corpora (OpenOrca,
SlimOrca, OpenPlatypus, AlpacaGPT4). Here the corpus is a plain-text file, an instruction set,
or a mix of them from the data directory; training is full-parameter or a LoRA of chosen rank
merged back in. The result is an ordinary model directory with its lineage and drift recorded.
`read_lineage` reads that of an evolved or an interpolated (`interpolate.py`) directory alike.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .atomic import atomic_dir
from .device import resolve_device
from .errors import PortLLMError
from .models import architecture_of, copy_side_files, fingerprint, load_base, resolve_base, weight_index
from .resources import measure
from .stream import paired_tensors
from .tasks import data_dir
from .train import LoopConfig, examples_digest, fit

if TYPE_CHECKING:
    from .interpolate import InterpolateResult

LINEAGE = "portllm_lineage.json"
PRESETS = {
    "instruct": "instruct/alpaca_data_1k.json+instruct/code_alpaca_2k.json+instruct/math_data.json",
    "text": "text/wikitext-2/valid.txt+text/tinyshakespeare/input.txt",
    "mix": "instruct/alpaca_data_1k.json+instruct/math_data.json+text/wikitext-2/valid.txt",
}


@dataclass
class EvolveConfig(LoopConfig):
    lr: float = 5e-5
    mode: str = "full"  # "full" or "lora"
    rank: int = 64  # lora mode
    alpha: float = 128.0
    targets: tuple[str, ...] = ()  # lora mode; empty = the architecture's linear projections


@dataclass
class EvolveResult:
    """An evolved base's lineage: what it came from, how it was trained, how far it drifted.

    `to_dict()` is the model directory's portllm_lineage.json and `portllm evolve --json`.
    """

    parent: dict[str, str]  # name, fingerprint
    corpus: dict[str, Any]  # spec, files, windows
    config: dict[str, Any]
    steps: int
    tokens_at_most: int
    resumed_from: int
    trainable_params: int
    loss_first: float | None
    loss_last: float
    wall_s: float
    peak_rss_mb: float
    drift: dict[str, float]  # ||θ' − θ|| / ||θ|| per layer type
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvolveResult:
        return cls(**{f.name: d[f.name] for f in fields(cls)})

    @classmethod
    def read(cls, model_dir: str | Path) -> EvolveResult:
        """The lineage an evolved model directory carries (an interpolated one: `read_lineage`)."""
        d = _read_json(model_dir)
        if "interpolated" in d:
            raise PortLLMError(
                f"{model_dir} was made by `portllm evolve --interpolate`: read it with read_lineage or "
                "InterpolateResult.read"
            )
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError) as e:
            raise PortLLMError(f"{Path(model_dir) / LINEAGE}: not a valid lineage ({e})") from None


def _read_json(model_dir: str | Path) -> dict[str, Any]:
    f = Path(model_dir) / LINEAGE
    if not f.is_file():
        raise PortLLMError(f"{model_dir} has no {LINEAGE}: it was not made by `portllm evolve`")
    try:
        d = json.loads(f.read_text())
    except ValueError as e:
        raise PortLLMError(f"{f}: not a valid lineage ({e})") from None
    if not isinstance(d, dict):
        raise PortLLMError(f"{f}: not a valid lineage (not a JSON object)")
    return d


def read_lineage(model_dir: str | Path) -> EvolveResult | InterpolateResult:
    """The lineage of an evolved or an interpolated model directory; both carry parent, drift and fingerprint."""
    from .interpolate import InterpolateResult  # here, not at the top: interpolate imports this module

    if "interpolated" in _read_json(model_dir):
        return InterpolateResult.read(model_dir)
    return EvolveResult.read(model_dir)


def corpus_files(corpus: str, data: str | Path | None) -> list[Path]:
    """A preset name (instruct, text, mix), a file, or files joined with '+', relative to the data dir."""
    spec = PRESETS.get(corpus, corpus)
    d = data_dir(data)
    files = []
    for part in spec.split("+"):
        p = Path(part).expanduser()
        if not p.is_absolute() and not p.exists() and d is not None:
            p = d / part
        if not p.is_file():
            raise PortLLMError(
                f"corpus file {part} not found" + (f" (looked in {d})" if d else "; set --data-dir or PORTLLM_DATA")
            )
        files.append(p)
    return files


def corpus_texts(files: list[Path]) -> list[str]:
    """Instruction sets become Alpaca-formatted documents; plain text is kept whole (chunked later)."""
    texts = []
    for f in files:
        if f.suffix in (".json", ".jsonl"):
            try:
                rows = (
                    json.loads(f.read_text())
                    if f.suffix == ".json"
                    else [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
                )
            except ValueError as e:
                raise PortLLMError(f"{f}: not valid JSON ({e})") from None
            for n, r in enumerate(rows, 1):
                if not isinstance(r, dict) or "instruction" not in r or "output" not in r:
                    raise PortLLMError(f"{f}: record {n} needs 'instruction' and 'output'")
                inp = f"\n\n### Input:\n{r['input']}" if r.get("input") else ""
                texts.append(f"### Instruction:\n{r['instruction']}{inp}\n\n### Response:\n{r['output']}")
        else:
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
    return texts


def lm_examples(texts: list[str], tok: Any, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Full-sequence language-modelling examples: documents cut into windows of max_length tokens."""
    out = []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False) + eos
        for i in range(0, len(ids), max_length):
            chunk = ids[i : i + max_length]
            if len(chunk) >= 16:
                out.append((chunk, chunk))
    return out


def drift_sums(old_dir: Path, new_dir: Path) -> dict[str, tuple[float, float]]:
    """(||θ' − θ||², ||θ||²) summed per layer type (q_proj, up_proj, embed_tokens, norms...), streamed."""
    sums: dict[str, tuple[float, float]] = {}
    for name, wa, wb in paired_tensors(weight_index(old_dir), weight_index(new_dir)):
        kind = name.rsplit(".", 2)[-2] if name.endswith(".weight") else name
        num, den = sums.get(kind, (0.0, 0.0))
        sums[kind] = (num + float((wb - wa).pow(2).sum()), den + float(wa.pow(2).sum()))
    return dict(sorted(sums.items()))


def drift_by_type(old_dir: Path, new_dir: Path) -> dict[str, float]:
    """||θ' − θ|| / ||θ|| per layer type."""
    return {k: (n / d) ** 0.5 if d else 0.0 for k, (n, d) in drift_sums(old_dir, new_dir).items()}


def evolve(
    base: str | Path,
    corpus: str,
    out: str | Path,
    cfg: EvolveConfig | None = None,
    data: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> EvolveResult:
    """Continue pretraining `base` on `corpus` and write the evolved model with its lineage."""
    cfg = cfg or EvolveConfig()
    if cfg.mode not in ("full", "lora"):
        raise PortLLMError(f"evolve mode {cfg.mode!r} unknown; use full or lora")
    out = Path(out)
    if out.exists() and not overwrite:
        raise PortLLMError(f"output {out} already exists; choose another path or pass --overwrite")
    files = corpus_files(corpus, data)
    base_dir = resolve_base(base)
    parent_fp = fingerprint(base_dir)
    if not cfg.targets:
        cfg = replace(cfg, targets=architecture_of(base_dir).lora_targets)
    ckpt = out.parent / f".{out.name}.ckpt"
    with measure() as usage:
        model, tok = load_base(base_dir, dtype=cfg.dtype)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        examples = lm_examples(corpus_texts(files), tok, cfg.max_length)
        if len(examples) < cfg.batch_size:
            raise PortLLMError(f"too few examples: the corpus gives {len(examples)} windows, fewer than one batch")
        device = resolve_device(cfg.device)
        model.to(device)
        torch.manual_seed(cfg.seed)
        if cfg.mode == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(
                    r=cfg.rank,
                    lora_alpha=cfg.alpha,
                    target_modules=list(cfg.targets),
                    lora_dropout=0.0,
                    task_type="CAUSAL_LM",
                ),
            )
        identity = {"recipe": cfg.key(), "base": parent_fp, "corpus": examples_digest(examples)}
        losses, start, n_trainable = fit(
            model, examples, cfg, tok.pad_token_id, ckpt, "evolve", progress, identity=identity
        )
        if cfg.mode == "lora":
            model = model.merge_and_unload()
    tokens = cfg.steps * cfg.batch_size * cfg.max_length
    with atomic_dir(out, overwrite=overwrite) as tmp:
        copy_side_files(base_dir, tmp)
        model.save_pretrained(tmp)
        drift = drift_by_type(base_dir, tmp)
        lineage = EvolveResult(
            parent={"name": str(base), "fingerprint": parent_fp},
            corpus={"spec": corpus, "files": [str(f) for f in files], "windows": len(examples)},
            config={**asdict(cfg), "targets": list(cfg.targets)},
            steps=cfg.steps,
            tokens_at_most=tokens,
            resumed_from=start,
            trainable_params=n_trainable,
            loss_first=losses[0] if losses else None,
            loss_last=sum(losses[-10:]) / max(1, len(losses[-10:])),
            wall_s=round(usage.wall_s, 2),
            peak_rss_mb=round(usage.peak_rss_mb, 1),
            drift=drift,
            fingerprint=fingerprint(tmp),
        )
        (tmp / LINEAGE).write_text(json.dumps(lineage.to_dict(), indent=2))
    shutil.rmtree(ckpt, ignore_errors=True)
    return lineage
