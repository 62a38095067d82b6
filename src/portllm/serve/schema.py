"""The request and response bodies of `portllm serve`, in OpenAI's shapes (pydantic).

Kept apart from the routes so that the fields a client may send are read in one place. A field this server
does not know is refused by name (400), never ignored: a client that sends it expects it to do something.
Fields it knows but does not do (`best_of` > 1, `suffix`, `logit_bias`, penalties, tools) are refused by the
routes (`unsupported`), also by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .logprobs import MAX_LOGPROBS, TokenLogprob
from .security import SEED_MAX, SEED_MIN

# ---------------------------------------------------------------- request schemas


def has_lone_surrogate(value: Any) -> bool:
    """Whether a decoded JSON value holds a string with a lone surrogate (`"\\ud800"` is valid JSON but not
    Unicode text: no tokenizer, template or UTF-8 answer can take it). Nested request models check themselves."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")  # at C speed; only surrogates fail
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(has_lone_surrogate(k) or has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(has_lone_surrogate(v) for v in value if not isinstance(v, (int, float)))
    return False


class RequestBody(BaseModel):
    # a field this server does not know is a 400 naming it (a client sending it expects it to do something)
    model_config = ConfigDict(extra="forbid")

    @field_validator("*")
    @classmethod
    def unicode_text(cls, value: Any) -> Any:
        """Every text a client sends is Unicode: a lone surrogate is a 400 naming the field, not a failed run."""
        if has_lone_surrogate(value):
            raise ValueError("text must be valid Unicode (it holds a lone surrogate such as \\ud800)")
        return value


class StreamOptions(RequestBody):
    include_usage: bool = False


class SamplingFields(RequestBody):
    model: str
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: Optional[int] = Field(None, ge=1, le=128)  # OpenAI's bound
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=SEED_MIN, le=SEED_MAX)  # int64, as vLLM: a 400, never a failed run
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    ignore_eos: bool = False  # vLLM's extension


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(None, ge=0)  # 0 only with echo: score the prompt (lm-eval's loglikelihood)
    echo: Optional[bool] = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)  # top-k alternatives per token (vLLM's bound)
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class TextPart(RequestBody):
    type: str
    text: Optional[str] = None


class ChatMessage(RequestBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    # what a client sends back when it appends an answer's message to the conversation: null, or refused
    refusal: Optional[str] = None
    annotations: Optional[list[Any]] = None
    audio: Optional[Any] = None
    function_call: Optional[Any] = None
    tool_calls: Optional[list[Any]] = None
    tool_call_id: Optional[str] = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Optional[list[Any]] = None
    functions: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None


class LoadAdapterRequest(RequestBody):
    lora_name: str
    lora_path: str


class UnloadAdapterRequest(RequestBody):
    lora_name: str


# ---------------------------------------------------------------- response schemas


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "portllm"
    root: Optional[str] = None  # where it came from (vLLM's field)
    parent: Optional[str] = None  # a patch's base
    warnings: list[str] = []  # what `check` said when the patch loaded


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


TokenName = Callable[[int], str]  # a token id as text (the tokenizer's decode of that token alone)


def _lp(x: float) -> float:
    return max(x, -9999.0)  # -inf is not JSON; OpenAI and vLLM send -9999.0


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completion logprobs; with echo the prompt's tokens come first, the very first with None."""

    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]

    @classmethod
    def of(
        cls, entries: Sequence[TokenLogprob | None], ids: Sequence[int], name: TokenName, offset: int = 0
    ) -> CompletionLogprobs:
        """`entries[i]` is token `ids[i]`'s (None: none); `top_logprobs` has the token itself and its k
        alternatives, as vLLM's; offsets count characters of the tokens' texts from `offset`."""
        out = cls(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for tok, e in zip(ids, entries):
            text = name(tok)
            out.tokens.append(text)
            out.text_offset.append(offset)
            offset += len(text)
            if e is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(_lp(e.logprob))
            top = {text: _lp(e.logprob)}
            for t, lp in e.top:
                top.setdefault(name(t), _lp(lp))
            out.top_logprobs.append(top)
        return out


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    """OpenAI's chat logprobs: each sampled token, its log-probability and its `top_logprobs` alternatives."""

    content: Optional[list[ChatTokenLogprob]] = None
    refusal: Optional[list[ChatTokenLogprob]] = None

    @classmethod
    def of(cls, entries: Sequence[TokenLogprob], name: TokenName) -> ChatLogprobs:
        def top(t: int, lp: float) -> TopLogprob:
            text = name(t)
            return TopLogprob(token=text, logprob=_lp(lp), bytes=list(text.encode("utf-8")))

        return cls(
            content=[
                ChatTokenLogprob(**top(e.token, e.logprob).model_dump(), top_logprobs=[top(t, lp) for t, lp in e.top])
                for e in entries
            ]
        )


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: Optional[str] = None


class ChatDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class AdapterLoaded(BaseModel):
    object: Literal["lora_adapter"] = "lora_adapter"
    lora_name: str
    lora_path: str
    status: Literal["loaded", "unloaded"]
    warnings: list[str] = []
    message: str
