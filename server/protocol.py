"""Wire types of the OpenAI-compatible API (requests, responses, stream chunks, the safety report).

Requests forbid unknown fields: a parameter we do not implement (``tools``, ``logprobs``, ...)
is a 400 that names it, never a silent no-op.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=8)
    user: str | None = None
    # vLLM extension, for benchmarks: keep generating past end-of-sequence up to max_tokens.
    ignore_eos: bool = False
    # vLLM's prefill extensions: continue the last (assistant) message instead of opening a new one.
    continue_final_message: bool = False
    add_generation_prompt: bool = True
    # Per-request safety config (object, or a preset name); validated by the safety config module.
    safety_config: dict[str, Any] | str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list):
            if len(v) > 4:
                raise ValueError("at most 4 stop sequences")
            if any(not s for s in v):
                raise ValueError("stop sequences must be non-empty")
        elif v == "":
            raise ValueError("stop sequence must be non-empty")
        return v

    @model_validator(mode="after")
    def _prefill(self):
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise ValueError(
                    "continue_final_message requires add_generation_prompt=false"
                )
            if self.messages[-1].role != "assistant":
                raise ValueError("continue_final_message requires the last message to be 'assistant'")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ----------------------------------------------------------------------------- safety report

class CategoryScores(BaseModel):
    flagged: bool
    scores: dict[str, float]
    categories: list[str] = Field(default_factory=list)


class ResponseVerdict(BaseModel):
    flagged: bool = False
    token_index: int | None = None  # first flagged output token (0-based)
    categories: list[str] = Field(default_factory=list)
    max_scores: dict[str, float] = Field(default_factory=dict)


class TracePoint(BaseModel):
    token_index: int  # the score read the text through output token token_index - 1
    scores: list[float]
    event: int


class SafetyReport(BaseModel):
    enabled: bool
    model_has_head: bool
    action: Literal["none", "refuse", "stop", "annotate"] = "none"
    prompt: CategoryScores | None = None
    # Prefilled requests (the conversation ends with an assistant message to continue): the
    # verdict on the conversation without that prefill. Flagged -> acted on at token 0.
    query: CategoryScores | None = None
    response: ResponseVerdict = Field(default_factory=ResponseVerdict)
    config: dict[str, Any] = Field(default_factory=dict)
    score_names: list[str] | None = None
    trace: list[TracePoint] | None = None
    telemetry_complete: bool = True


# ----------------------------------------------------------------------------- responses

def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    safety: SafetyReport | list[SafetyReport] | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    safety: SafetyReport | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "safeserve"
    root: str
    max_model_len: int
    safety: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
