"""The bodies of the OpenAI-compatible routes as OpenAI's API has them (the request fields tailor reads; any other
field a client sends is ignored), and `tailor`, the extension of every answer.

Where tailor differs from OpenAI: `temperature` defaults to 0 (greedy decoding, the answers tailor evaluates) instead
of 1; `n` must be 1; `user` is required (it picks whose personalized model answers) unless the model is
`<deployment>:base`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from tailor.serve.schemas import USER_ID_PATTERN


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[TextPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampled(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(description="a deployment (GET /v1/models), or `<deployment>:base`: its backbone without "
                                   "personalization")
    user: str | None = Field(None, pattern=USER_ID_PATTERN, description="the end user whose personalized model "
                                                                        "answers (an id in the tenant's store)")
    max_tokens: int | None = Field(None, ge=1, description="default: the task's answer length")
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens; this one wins")
    temperature: float = Field(0.0, ge=0, le=2, description="0 (the default, unlike OpenAI's 1): greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, description="the same seed, the same sampled text")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the text (not included)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only 1")


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1, description="the last message of role `user` (else the last "
                                                              "message) is the question: the task's question, or "
                                                              "just its content")


class CompletionRequest(Sampled):
    prompt: str | Annotated[list[str], Field(min_length=1)] = Field(
        description="the question (the task's question, or just its content); a list asks several, each answered as "
                    "one choice")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TailorInfo(BaseModel):
    """tailor's extension of an answer: whose model answered, from which state, and the label scores."""

    deployment: str
    user: str | None
    personalized: bool
    stale: bool = Field(description="true: answered from the user's previous state, because history was added "
                                    "after it was built (a personalize job brings it up to date)")
    history_items: int | None = None
    state_items: int | None = Field(None, description="the history items the answering state was built from")
    mode: str = Field(description="scoring, scoring-calibrated, generation, ...: how the answer was made")
    scores: dict[str, float] | list[dict[str, float] | None] | None = Field(
        None, description="each label's log-probability, for a label answer (completions: one per choice)")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    tailor: TailorInfo


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    tailor: TailorInfo


class ModelInfo(BaseModel):
    task: str
    method: str
    backbone: str | None
    default: bool = Field(description="the deployment of the native routes at /v1")
    base: str | None = Field(description="the model name of its backbone without personalization")
    native: str = Field(description="where its native routes are (history, personalize, predict)")
    labels: list[str]
    item_fields: list[str]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tailor"
    tailor: ModelInfo


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
