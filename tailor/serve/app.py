"""The HTTP server: one personalization method over the user store, with mixed-user batching and tenant isolation.

`create_app(method, store)` serves one task with one method (and the non-personalized prompt on the same backbone,
so a client can compare the two answers). Every /v1 route needs `Authorization: Bearer <tenant key>` and only ever
sees that tenant's users: the tenant comes from the key, never from the request. Errors are JSON
`{"error": {"code", "message"}}` with a status that says whose problem it is: 401 no or bad key, 404 unknown user or
job, 409 a user whose state is missing, stale or unusable, 413 too long or too many, 422 malformed, 503 queue full.

Predictions go through `MicroBatcher`; personalize jobs run in `Personalizing`, a background thread that records each
job's progress in the store, so a killed server leaves jobs marked "interrupted" (on the next start) and the user's
previous state untouched, and the job can simply be posted again.
"""

import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path as PathParam, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tailor.data.schema import HistoryItem, Query, User
from tailor.methods.base import LMPersonalizer, Personalizer, Prediction
from tailor.serve.batcher import MicroBatcher, QueueFull, Row
from tailor.store.incremental import rebuild_reason, update_state
from tailor.store.state import StateError, UserState
from tailor.store.store import USER_ID, Store, TaskMismatch, UnknownUser, UserRecord

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
USER_ID_PATTERN = f"^{USER_ID.pattern}$"
JOB_ID_PATTERN = "^[0-9a-f]{16}$"


@dataclass(frozen=True)
class Limits:
    """What one request may carry; larger inputs get a 413 that names the limit."""

    max_query_chars: int = 8000
    max_item_chars: int = 20000
    max_items: int = 1000
    """History items per POST."""
    max_requests: int = 64
    """(user, query) rows per predict call."""
    max_body_bytes: int = 8 << 20


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status, headers=headers)


# --- request and response bodies -------------------------------------------------------------------------------------

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


def _responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody} for status in statuses}


# --- the parts behind the routes ---------------------------------------------------------------------------------

class StateCache:
    """Loaded and checked states by (tenant, user, checksum), least recently used dropped first.

    A state is immutable once saved (a new one has a new checksum), so a hit can never be out of date; keeping the
    object also keeps what methods derive from it at first use (a BM25 index, stacked tensors) in `state.runtime`.
    """

    def __init__(self, store: Store, method: Personalizer, capacity: int = 4096):
        self.store, self.method, self.capacity = store, method, capacity
        self._states: OrderedDict[tuple[str, str, str], UserState] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, tenant: str, record: UserRecord) -> UserState:
        key = (tenant, record.user_id, str(record.checksum))
        with self._lock:
            if key in self._states:
                self._states.move_to_end(key)
                return self._states[key]
        m = self.method
        state = self.store.load_state(tenant, record.user_id, m.name, m.version, m.model_id, record)
        if isinstance(m, LMPersonalizer):
            try:  # a state this method cannot apply fails here, alone, instead of inside a shared batch
                m.edits([state])
            except (ValueError, KeyError, RuntimeError) as error:
                raise StateError(f"user {record.user_id!r}: {error}") from error
        with self._lock:
            self._states[key] = state
            while len(self._states) > self.capacity:
                self._states.popitem(last=False)
        return state


class Personalizing:
    """The personalize worker: one thread that runs queued jobs, updating states incrementally where the method can
    and otherwise rebuilding every waiting user in one `personalize_many` call (which some methods batch)."""

    def __init__(self, store: Store, method: Personalizer, model_lock: threading.Lock, group: int = 16):
        self.store, self.method, self.model_lock, self.group = store, method, model_lock, group
        self._jobs: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="tailor-personalize", daemon=True)

    def start(self) -> None:
        for job in self.store.unfinished_jobs():
            self.store.set_job(job["job_id"], "interrupted",
                               error="the server stopped during this job; POST personalize again")
        self._thread.start()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)

    def submit(self, job: dict[str, Any]) -> None:
        self._jobs.put(job)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            jobs = [job]
            while len(jobs) < self.group and not self._jobs.empty():
                nxt = self._jobs.get()
                if nxt is None:
                    self._jobs.put(None)
                    break
                jobs.append(nxt)
            with self.model_lock:
                self._run(jobs)

    def _old_state(self, tenant: str, record: UserRecord) -> UserState | None:
        if not record.has_state:
            return None
        m = self.method
        try:
            return self.store.load_state(tenant, record.user_id, m.name, m.version, m.model_id, record)
        except StateError:
            return None  # an unusable old state is rebuilt from scratch

    def _run(self, jobs: list[dict[str, Any]]) -> None:
        rebuild: list[tuple[dict[str, Any], User, UserRecord, str, float]] = []
        for job in jobs:
            started = time.perf_counter()
            self.store.set_job(job["job_id"], "running")
            try:
                user, record = self.store.snapshot(job["tenant"], job["user_id"])
                old = self._old_state(job["tenant"], record)
                update = update_state(self.method, old, user, record.state_items or 0)
            except Exception as error:
                self._fail(job, error)
                continue
            if update is not None:
                self._finish(job, record.items, update.state, update.mode, update.reason, started)
            else:
                rebuild.append((job, user, record, rebuild_reason(self.method, old), started))
        if not rebuild:
            return
        try:
            states = self.method.personalize_many([user for _, user, _, _, _ in rebuild])
        except Exception as error:
            for job, *_ in rebuild:
                self._fail(job, error)
            return
        for (job, _, record, reason, started), state in zip(rebuild, states):
            self._finish(job, record.items, state, "rebuilt", reason, started)

    def _fail(self, job: dict[str, Any], error: Exception) -> None:
        log.exception("personalize job %s of user %r failed", job["job_id"], job["user_id"], exc_info=error)
        self.store.set_job(job["job_id"], "failed", error=f"{type(error).__name__}: {error}")

    def _finish(self, job: dict[str, Any], items: int, state: UserState, mode: str, reason: str,
                started: float) -> None:
        seconds = round(time.perf_counter() - started, 4)
        if self.store.save_state(job["tenant"], job["user_id"], state, items):
            self.store.set_job(job["job_id"], "done", mode=mode, reason=reason, seconds=seconds)
        else:  # deleted meanwhile (the job row went with the user) or a newer state was saved first
            self.store.set_job(job["job_id"], "done", mode=mode, seconds=seconds,
                               reason="a state built from newer history was saved meanwhile; kept that one")


class BodyLimit:
    """Refuse request bodies over `limit` bytes with a 413, whether they announce their length or stream it."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        message = f"request body over {self.limit} bytes"
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _error(413, "too_long", message)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            event = await receive()
            seen += len(event.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, "too_long", message)
            return event

        await self.app(scope, counted, send)


def profile_summary(method: Personalizer, history: list[HistoryItem], state: UserState | None) -> dict[str, Any]:
    """What a person can read about a user: their most frequent outputs and the short text fields of their state
    (PAG's summary, CHAMELEON's insights, counts)."""
    task = method.task
    summary: dict[str, Any] = {"items": len(history)}
    if task.family != "generation":
        counts = Counter(item.get(task.output_field) for item in history)
        summary["top_outputs"] = [[label, n] for label, n in counts.most_common(5)]
    if state is not None:
        summary["state"] = {k: (v[:500] if isinstance(v, str) else v) for k, v in state.header.items()
                            if isinstance(v, (str, int, float)) and k != "task"}
    return summary


# --- the app -------------------------------------------------------------------------------------------------------

def create_app(method: Personalizer, store: Store, base: Personalizer | None = None, limits: Limits = Limits(),
               max_batch: int = 16, max_wait_ms: float = 5.0, max_queue: int = 256) -> FastAPI:
    """The server for one method and task over `store`. `base` answers `personalized: false` rows (normally the
    non-personalized prompt on the same backbone); without it such rows are refused."""
    task = method.task
    model_lock = threading.Lock()
    methods = {"personalized": method, **({"base": base} if base is not None else {})}
    base_state = base.personalize(User("-", task.name, ())) if base is not None else None
    batcher = MicroBatcher(lambda key, requests: methods[key].predict(requests), model_lock, max_batch, max_wait_ms,
                           max_queue)
    worker = Personalizing(store, method, model_lock)
    cache = StateCache(store, method)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        batcher.start()
        worker.start()
        yield
        batcher.stop()
        worker.stop()

    app = FastAPI(title="tailor", version="1", lifespan=lifespan,
                  description=f"Personalized answers for {task.name} with {method.name}. Send the tenant key as "
                              "`Authorization: Bearer <key>`.")
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    bearer = HTTPBearer(auto_error=False, description="the tenant's API key")

    def tenant_of(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
        if credentials is None:
            raise ApiError(401, "unauthorized", "missing API key: send the header Authorization: Bearer <key>",
                           {"WWW-Authenticate": "Bearer"})
        tenant = store.authenticate(credentials.credentials)
        if tenant is None:
            raise ApiError(401, "unauthorized", "invalid API key", {"WWW-Authenticate": "Bearer"})
        return tenant

    Tenant = Annotated[str, Depends(tenant_of)]
    UserId = Annotated[str, PathParam(pattern=USER_ID_PATTERN, description="1-128 of A-Z a-z 0-9 _ . -, not "
                                      "starting with . or -")]

    item_model = create_model(
        "HistoryItemIn", __config__=ConfigDict(extra="forbid"),
        **{name: (str, Field(description=f"the item's {name}")) for name in task.item_fields},
        id=(str | None, Field(None, pattern=USER_ID_PATTERN, description="default: <user>-<position>")),
        date=(str | None, None))
    history_model = create_model("HistoryIn", __config__=ConfigDict(extra="forbid"),
                                 items=(list[item_model], Field(min_length=1)))  # type: ignore[valid-type]

    # --- errors --------------------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return _error(error.status, error.code, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def malformed(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        code = "invalid_user_id" if any(tuple(p["loc"][:2]) == ("path", "user_id") for p in problems) else "malformed"
        detail = "; ".join(f"{'.'.join(str(x) for x in p['loc'])}: {p['msg']}" for p in problems[:5])
        return _error(422, code, f"malformed request: {detail}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 400:  # FastAPI's answer to a body it cannot even decode
            return _error(422, "malformed", f"malformed request: {error.detail} (send UTF-8 JSON)")
        if error.status_code == 405:  # Starlette's Allow names only the first route of the path, not all of them
            allowed = sorted({m for route in app.router.routes if isinstance(route, APIRoute)
                              and route.path_regex.match(request.url.path) for m in route.methods})
            return _error(405, "method_not_allowed", f"{request.method} not allowed here; use {', '.join(allowed)}",
                          {"Allow": ", ".join(allowed)})
        code = {404: "not_found"}.get(error.status_code, "http_error")
        return _error(error.status_code, code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def internal(_: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=error)
        return _error(500, "internal", "internal server error; the server log has the details")

    # --- routes --------------------------------------------------------------------------------------------------
    def record_of(tenant: str, user_id: str) -> UserRecord:
        try:
            return store.record(tenant, user_id)
        except UnknownUser:
            raise ApiError(404, "unknown_user", f"unknown user {user_id!r}") from None

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz", summary="Liveness (no key needed)")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/info", response_model=Info, responses=_responses(401))
    def info(tenant: Tenant) -> Info:
        return Info(tenant=tenant, method=method.name, method_version=method.version, task=task.name,
                    model=method.model_id, item_fields=list(task.item_fields), output_field=task.output_field,
                    labels=list(task.labels), query_template=task.question_template, limits=asdict(limits),
                    batching={"max_batch": max_batch, "max_wait_ms": max_wait_ms, "max_queue": max_queue,
                              **batcher.stats.to_json()})

    @app.get("/v1/users", response_model=UserList, responses=_responses(401))
    def list_users(tenant: Tenant) -> dict:
        return {"users": [r.to_json() for r in store.users(tenant)]}

    @app.post("/v1/users/{user_id}/history", response_model=UserInfo, responses=_responses(401, 409, 413, 422),
              summary="Append history items; a personalized state becomes stale")
    def add_history(user_id: UserId, body: history_model, tenant: Tenant) -> dict:  # type: ignore[valid-type]
        if len(body.items) > limits.max_items:
            raise ApiError(413, "too_long", f"{len(body.items)} items in one call; at most {limits.max_items}")
        items = []
        for position, raw in enumerate(body.items):
            fields = {name: getattr(raw, name) for name in task.item_fields}
            for name, value in fields.items():
                if len(value) > limits.max_item_chars:
                    raise ApiError(413, "too_long", f"items[{position}].{name} has {len(value)} characters; at "
                                   f"most {limits.max_item_chars}")
            items.append(HistoryItem(raw.id or "", fields, raw.date))
        try:
            return store.add_history(tenant, user_id, task.name, items).to_json()
        except TaskMismatch as error:
            raise ApiError(409, "task_mismatch", str(error)) from None

    @app.get("/v1/users/{user_id}", response_model=UserDetail, responses=_responses(401, 404, 422))
    def get_user(user_id: UserId, tenant: Tenant) -> dict:
        record = record_of(tenant, user_id)
        history = store.history(tenant, user_id, record.items)
        state, problem = None, None
        if record.has_state:
            try:
                state = cache.get(tenant, record)
            except StateError as error:
                problem = str(error)
        profile = profile_summary(method, history, state)
        if problem:
            profile["state_error"] = problem
        return {**record.to_json(), "history": [item.to_json() for item in history], "profile": profile}

    @app.delete("/v1/users/{user_id}", response_model=Deleted, responses=_responses(401, 404, 422),
                summary="Forget a user: history, state and jobs")
    def delete_user(user_id: UserId, tenant: Tenant) -> Deleted:
        if not store.delete_user(tenant, user_id):
            raise ApiError(404, "unknown_user", f"unknown user {user_id!r}")
        return Deleted(user_id=user_id, deleted=True)

    def job_json(job: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in job.items() if k != "tenant"}

    @app.post("/v1/users/{user_id}/personalize", response_model=JobInfo, status_code=202,
              responses=_responses(401, 404, 422), summary="Start (or join) a background personalize job")
    def personalize(user_id: UserId, tenant: Tenant) -> dict:
        record_of(tenant, user_id)
        job, new = store.create_job(tenant, user_id)
        if new:
            worker.submit(job)
        return job_json(job)

    @app.get("/v1/jobs/{job_id}", response_model=JobInfo, responses=_responses(401, 404, 422))
    def get_job(job_id: Annotated[str, PathParam(pattern=JOB_ID_PATTERN)], tenant: Tenant) -> dict:
        job = store.job(tenant, job_id)
        if job is None:
            raise ApiError(404, "unknown_job", f"unknown job {job_id!r}")
        return job_json(job)

    def rows_for(tenant: str, requests: list[PredictRow]) -> list[Row]:
        records = store.records(tenant, [r.user_id for r in requests])
        rows: list[Row] = []
        for position, request in enumerate(requests):
            record = records.get(request.user_id)
            if record is None:
                raise ApiError(404, "unknown_user", f"requests[{position}]: unknown user {request.user_id!r}")
            query = Query(f"{request.user_id}/{position}", request.query)
            if not request.personalized:
                if base_state is None:
                    raise ApiError(409, "no_base", f"{method.name} has no non-personalized counterpart here")
                rows.append(("base", base_state, query))
                continue
            if not record.has_state:
                raise ApiError(409, "not_personalized", f"user {request.user_id!r} has no personalized state; POST "
                               f"/v1/users/{request.user_id}/personalize first")
            if record.stale:
                raise ApiError(409, "stale_state", f"user {request.user_id!r} has {record.items} history items but "
                               f"the state was built from {record.state_items}; POST "
                               f"/v1/users/{request.user_id}/personalize to update it")
            try:
                rows.append(("personalized", cache.get(tenant, record), query))
            except StateError as error:
                raise ApiError(409, "state_unusable", f"{error}; POST /v1/users/{request.user_id}/personalize "
                               "to rebuild it") from None
        return rows

    def prediction_out(row: PredictRow, prediction: Prediction) -> PredictionOut:
        scores = None
        if prediction.scores is not None and len(prediction.scores) == len(task.labels):
            scores = {label: round(score, 4) for label, score in zip(task.labels, prediction.scores)}
        return PredictionOut(user_id=row.user_id, text=prediction.text, mode=prediction.mode,
                             personalized=row.personalized, scores=scores)

    @app.post("/v1/predict", response_model=PredictResponse, responses=_responses(401, 404, 409, 413, 422, 503),
              summary="Answer (user, query) pairs; pairs of different users share one forward")
    async def predict(body: PredictBody, tenant: Tenant) -> PredictResponse:
        if len(body.requests) > limits.max_requests:
            raise ApiError(413, "too_long", f"{len(body.requests)} requests in one call; at most "
                           f"{limits.max_requests}")
        for position, request in enumerate(body.requests):
            if len(request.query) > limits.max_query_chars:
                raise ApiError(413, "too_long", f"requests[{position}].query has {len(request.query)} characters; "
                               f"at most {limits.max_query_chars}")
        rows = await run_in_threadpool(rows_for, tenant, body.requests)
        try:
            predictions = await batcher.predict(rows)
        except QueueFull as error:
            raise ApiError(503, "queue_full", str(error), {"Retry-After": "1"}) from None
        return PredictResponse(predictions=[prediction_out(r, p) for r, p in zip(body.requests, predictions)])

    return app
