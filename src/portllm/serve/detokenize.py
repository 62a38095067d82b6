"""Incremental detokenization: each new token's text in amortized constant time, identical to decoding the whole.

Decoding every token at every step is quadratic in the output's length; decoding each token alone is wrong,
because a token's text depends on its neighbours: a UTF-8 character split across byte-level tokens, a
byte-fallback run (`<0xE2><0x82><0xAC>` is one character, and a run that never completes decodes as one
U+FFFD per byte), a SentencePiece leading space, a WordPiece `##`. So, as vLLM's detokenizer and tokenizers'
`DecodeStream` do, each step decodes a short window of tokens twice (from `prefix` up to `read`, the text
already given out, and to the end) and gives out the difference. The window moves on only at a boundary where
decoding is prefix-stable: the text does not end in U+FFFD (a character still incomplete) and the last token is
not a byte-fallback token (its run may still change). `flush` gives out what is held back when the output ends.

Tokenizers that clean up tokenization spaces (" ." -> ".", transformers' `clean_up_tokenization`) are decoded
raw and cleaned here, a piece at a time: a piece is cut only where no cleanup pattern can span the cut.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import PortLLMError

BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte-fallback tokens
# the last characters of every proper prefix of a clean_up_tokenization pattern (" .", " n't", " 've", " ' ", ...):
# text that ends in none of them can be cleaned apart from what follows
CLEANUP_TAILS = frozenset(" 'nvr")


@dataclass(frozen=True)
class DecodeSpec:
    """How one tokenizer decodes: found once per tokenizer (`decode_spec`), shared by every request."""

    tokenizer: Any
    byte_ids: frozenset[int]  # byte-fallback tokens: a boundary never follows one
    skipped_ids: frozenset[int]  # special (and other added) tokens: decoding drops them, so a byte run goes on
    cleanup: bool  # whether `tokenizer.decode` cleans up tokenization spaces

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def decode_spec(tokenizer: Any) -> DecodeSpec:
    """The tokenizer's byte-fallback tokens and whether its `decode` cleans up spaces (asked of `decode` itself:
    transformers skips the cleanup for some tokenizers whatever their setting says)."""
    vocab = tokenizer.get_vocab()
    byte_ids = frozenset(i for t, i in vocab.items() if BYTE_TOKEN.fullmatch(t))
    skipped = frozenset([*tokenizer.all_special_ids, *tokenizer.get_added_vocab().values()])
    calls: list[str] = []
    clean = tokenizer.clean_up_tokenization
    tokenizer.clean_up_tokenization = lambda text: calls.append(text) or clean(text)  # instance attribute: a probe
    try:
        tokenizer.decode([next(iter(vocab.values()))])
    finally:
        del tokenizer.clean_up_tokenization
    cleanup = bool(calls)
    if cleanup and getattr(type(tokenizer).clean_up_tokenization, "__qualname__", "") != (
        "PreTrainedTokenizerBase.clean_up_tokenization"
    ):
        raise PortLLMError(
            f"{type(tokenizer).__name__} has its own clean_up_tokenization, which incremental decoding cannot "
            "reproduce; set clean_up_tokenization_spaces to false in the base's tokenizer_config.json"
        )
    return DecodeSpec(tokenizer, byte_ids, skipped, cleanup)


class Detokenizer:
    """One output's text, a token at a time: `add(token)` gives the new text (maybe ""), `flush()` the rest.

    The pieces joined equal `tokenizer.decode(all_tokens, skip_special_tokens=True)`.
    """

    def __init__(self, spec: DecodeSpec) -> None:
        self.spec = spec
        self.ids: list[int] = []
        self.prefix = 0  # the window starts here
        self.read = 0  # tokens whose text was given out
        self.prefix_text = ""  # decode(ids[prefix:read])
        self.raw = ""  # decoded but not yet cleaned (tokenizers that clean up spaces)
        self.in_run = False  # the last token that decoding keeps is a byte-fallback token

    def add(self, token: int) -> str:
        self.ids.append(token)
        if token not in self.spec.skipped_ids:
            self.in_run = token in self.spec.byte_ids
        if self.in_run:
            return ""
        text = self.spec.decode(self.ids[self.prefix :])
        if len(text) <= len(self.prefix_text) or text.endswith("\ufffd"):
            return ""
        new = self._after_prefix(text)
        self.prefix, self.read = self.read, len(self.ids)
        self.prefix_text = self.spec.decode(self.ids[self.prefix : self.read])
        return self._clean(new, final=False)

    def flush(self) -> str:
        """What is held back (an incomplete character decodes as U+FFFD, as in the whole text)."""
        text = self.spec.decode(self.ids[self.prefix :])
        new = self._after_prefix(text) if len(text) > len(self.prefix_text) else ""
        self.prefix = self.read = len(self.ids)
        self.prefix_text = ""
        return self._clean(new, final=True)

    def _after_prefix(self, text: str) -> str:
        if not text.startswith(self.prefix_text):  # the boundary rules above are wrong for this tokenizer
            raise PortLLMError(
                f"incremental decoding diverged for {type(self.spec.tokenizer).__name__}: tokens "
                f"{self.ids[self.prefix : self.read]} decode to {self.prefix_text!r} alone but {text[:80]!r} "
                "followed by more; please report it"
            )
        return text[len(self.prefix_text) :]

    def _clean(self, piece: str, final: bool) -> str:
        if not self.spec.cleanup:
            return piece
        raw = self.raw + piece
        cut = len(raw)
        if not final:
            while cut > 0 and raw[cut - 1] in CLEANUP_TAILS:
                cut -= 1
        self.raw = raw[cut:]
        return self.spec.tokenizer.clean_up_tokenization(raw[:cut])
