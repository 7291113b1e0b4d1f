"""The JSON bodies of the native API, as pydantic models (they are the OpenAPI schema at /docs).

A history item is checked against its task here, so the schema says what is accepted: a classification item's
output is one of the task's labels (LaMP-1's items are the user's papers, whose output is a title), a rating one a
number within the task's range.
"""

from __future__ import annotations

from functools import cache, partial
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from tailor.store.paths import USER_ID
from tailor.tasks.lamp import Task, score_value

USER_ID_PATTERN = f"^{USER_ID.pattern}$"
JOB_ID_PATTERN = "^[0-9a-f]{16}$"


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="OpenAI's error type: invalid_request_error, authentication_error, ...")
    param: str | None = Field(None, description="the request field at fault, where there is one")
    code: str = Field(description="tailor's reason: unknown_user, not_personalized, too_long, ...")


class ErrorBody(BaseModel):
    error: ErrorDetail


class StateInfo(BaseModel):
    method: str
    version: int
    model_id: str | None
    checksum: str
    items: int
    bytes: int


class UserInfo(BaseModel):
    user_id: str
    task: str
    items: int
    state: StateInfo | None
    stale: bool
    updated: float


class UserList(BaseModel):
    users: list[UserInfo]


class HistoryAdded(UserInfo):
    added: int = Field(description="items stored by this call")
    duplicates: list[str] = Field(description="ids of items stored already (or given twice), not stored again")


class UserDetail(UserInfo):
    history: list[dict[str, str]]
    profile: dict[str, Any]


class JobInfo(BaseModel):
    job_id: str
    user_id: str
    deployment: str
    status: str = Field(description="queued, running, done, failed or interrupted")
    created: float
    updated: float
    mode: str | None = Field(None, description="incremental or rebuilt")
    reason: str | None = None
    seconds: float | None = None
    error: str | None = None


class PredictRow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str = Field(pattern=USER_ID_PATTERN)
    query: str = Field(description="the task's question as in LaMP inputs, or just its content (the article, "
                                   "review, tweet), which is put into the task's question template")
    personalized: bool = Field(True, description="false: the same backbone without this user's personalization")


class PredictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: list[PredictRow] = Field(min_length=1)


class PredictionOut(BaseModel):
    user_id: str
    personalized: bool
    text: str | None = Field(None, description="the answer; null when the row failed (see error)")
    mode: str | None = None
    scores: dict[str, float] | None = None
    stale: bool = Field(False, description="answered from the user's previous state: history was added since, and "
                                           "the state is being (or should be) personalized again")
    error: ErrorDetail | None = Field(None, description="why this row has no answer (the others are answered)")


class PredictResponse(BaseModel):
    predictions: list[PredictionOut]


class Deleted(BaseModel):
    user_id: str
    deleted: bool


class Info(BaseModel):
    tenant: str
    deployment: str
    deployments: list[str]
    method: str
    method_version: int
    task: str
    model: str | None
    item_fields: list[str]
    output_field: str
    labels: list[str]
    query_template: str
    limits: dict[str, int]
    batching: dict[str, int | float]


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error statuses a route documents, each with the error body."""
    return {status: {"model": ErrorBody} for status in statuses}


def _rating(task: Task, value: str) -> str:
    score, low, high = score_value(value), min(map(float, task.labels)), max(map(float, task.labels))
    if score is None or not low <= score <= high:
        raise ValueError(f"{value!r} is not a {task.name} rating, a number from {low:g} to {high:g}")
    return value


def _output_type(task: Task) -> Any:
    """What a history item's output may be in this task."""
    if task.family == "classification" and task.labels and task.name != "LaMP-1":
        return Literal[task.labels]  # type: ignore[valid-type]
    if task.family == "regression" and task.labels:
        return Annotated[str, AfterValidator(partial(_rating, task))]
    return str


@cache
def history_model(task: Task) -> type[BaseModel]:
    """The body of a history POST for this task: its item fields, an optional id and date per item (one model per
    task, named after it, so that deployments of several tasks each have theirs in the OpenAPI schema)."""
    prefix = task.name.replace("-", "")
    item = create_model(
        f"{prefix}HistoryItem", __config__=ConfigDict(extra="forbid"),
        **{name: (_output_type(task) if name == task.output_field else str, Field(description=f"the item's {name}"))
           for name in task.item_fields},
        id=(str | None, Field(None, pattern=USER_ID_PATTERN, description="default: <user>-<position>; an item "
                                                                         "whose id is stored already is not stored "
                                                                         "again")),
        date=(str | None, None))
    return create_model(f"{prefix}HistoryIn", __config__=ConfigDict(extra="forbid"),
                        items=(list[item], Field(min_length=1)))  # type: ignore[valid-type]
