"""The JSON bodies of the native API, as pydantic models (they are the OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from tailor.store.paths import USER_ID
from tailor.tasks.lamp import Task

USER_ID_PATTERN = f"^{USER_ID.pattern}$"
JOB_ID_PATTERN = "^[0-9a-f]{16}$"


class ErrorDetail(BaseModel):
    code: str
    message: str


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


class UserDetail(UserInfo):
    history: list[dict[str, str]]
    profile: dict[str, Any]


class JobInfo(BaseModel):
    job_id: str
    user_id: str
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
    query: str = Field(description="the task's full question text, as in LaMP inputs")
    personalized: bool = Field(True, description="false: the same backbone without this user's personalization")


class PredictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: list[PredictRow] = Field(min_length=1)


class PredictionOut(BaseModel):
    user_id: str
    text: str
    mode: str
    personalized: bool
    scores: dict[str, float] | None = None


class PredictResponse(BaseModel):
    predictions: list[PredictionOut]


class Deleted(BaseModel):
    user_id: str
    deleted: bool


class Info(BaseModel):
    tenant: str
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


def history_model(task: Task) -> type[BaseModel]:
    """The body of a history POST for this task: its item fields, an optional id and date per item."""
    item = create_model(
        "HistoryItemIn", __config__=ConfigDict(extra="forbid"),
        **{name: (str, Field(description=f"the item's {name}")) for name in task.item_fields},
        id=(str | None, Field(None, pattern=USER_ID_PATTERN, description="default: <user>-<position>")),
        date=(str | None, None))
    return create_model("HistoryIn", __config__=ConfigDict(extra="forbid"),
                        items=(list[item], Field(min_length=1)))  # type: ignore[valid-type]
