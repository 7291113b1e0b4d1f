"""A tenant's users of one deployment: their history, what is known about them, deleting them, and personalize jobs.

History is checked against the deployment's task by its schema (`schemas.history_model`: labels and ratings the task
can have), and an item whose id is stored already is not stored again (`Store.add_history`).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures, whose types are local to `router`.
from collections import Counter
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam

from tailor.methods.base import Personalizer
from tailor.serve.deployment import Deployment
from tailor.serve.errors import ApiError
from tailor.serve.schemas import (JOB_ID_PATTERN, USER_ID_PATTERN, Deleted, HistoryAdded, JobInfo, UserDetail,
                                  UserList, history_model, responses)
from tailor.serve.server import Server
from tailor.store.state import StateError, UserState
from tailor.store.store import ItemConflict, TaskMismatch
from tailor.tasks.records import HistoryItem

UserId = Annotated[str, PathParam(pattern=USER_ID_PATTERN, description="1-128 of A-Z a-z 0-9 _ . -, not starting "
                                  "with . or -")]
JobId = Annotated[str, PathParam(pattern=JOB_ID_PATTERN)]


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


def router(server: Server, deployment: Deployment, prefix: str) -> APIRouter:
    routes = APIRouter(prefix=prefix, tags=[deployment.name])
    store, task, limits, slot = deployment.store, deployment.task, deployment.limits, deployment.name
    Tenant = Annotated[str, Depends(server.tenant_of)]
    HistoryIn = history_model(task)

    @routes.get("/users", response_model=UserList, responses=responses(401))
    def list_users(tenant: Tenant) -> dict:
        return {"users": [r.to_json() for r in store.users(tenant, slot)]}

    @routes.post("/users/{user_id}/history", response_model=HistoryAdded,
                 responses=responses(401, 409, 413, 422),
                 summary="Append history items (idempotent by item id); a personalized state becomes stale")
    def add_history(user_id: UserId, body: HistoryIn, tenant: Tenant) -> dict:  # type: ignore[valid-type]
        if len(body.items) > limits.max_items:
            raise ApiError(413, "too_long", f"{len(body.items)} items in one call; at most {limits.max_items}")
        items = []
        for position, raw in enumerate(body.items):
            fields = {name: getattr(raw, name) for name in task.item_fields}
            for name, value in fields.items():
                if len(value) > limits.max_item_chars:
                    raise ApiError(413, "too_long", f"items[{position}].{name} has {len(value)} characters; at "
                                   f"most {limits.max_item_chars}", param=f"items.{position}.{name}")
            items.append(HistoryItem(raw.id or "", fields, raw.date))
        try:
            done = store.add_history(tenant, user_id, task.name, items, slot)
        except (TaskMismatch, ItemConflict) as error:
            code = "task_mismatch" if isinstance(error, TaskMismatch) else "item_conflict"
            raise ApiError(409, code, str(error)) from None
        return {**done.record.to_json(), "added": done.added, "duplicates": list(done.duplicates)}

    @routes.get("/users/{user_id}", response_model=UserDetail, responses=responses(401, 404, 422))
    def get_user(user_id: UserId, tenant: Tenant) -> dict:
        record = deployment.records(tenant, [user_id]).get(user_id)
        if record is None:
            raise ApiError(404, "unknown_user", f"unknown user {user_id!r}")
        history = store.history(tenant, user_id, record.items)
        state, problem = None, None
        if record.has_state:
            try:
                state = deployment.cache.get(tenant, record)
            except StateError as error:
                problem = str(error)
        profile = profile_summary(deployment.method, history, state)
        if problem:
            profile["state_error"] = problem
        return {**record.to_json(), "history": [item.to_json() for item in history], "profile": profile}

    @routes.delete("/users/{user_id}", response_model=Deleted, responses=responses(401, 404, 422),
                   summary="Forget a user: history, states (of every deployment) and jobs")
    def delete_user(user_id: UserId, tenant: Tenant) -> Deleted:
        if not store.delete_user(tenant, user_id):
            raise ApiError(404, "unknown_user", f"unknown user {user_id!r}")
        return Deleted(user_id=user_id, deleted=True)

    def job_json(job: dict[str, Any]) -> dict[str, Any]:
        return {**{k: v for k, v in job.items() if k not in ("tenant", "slot")}, "deployment": job["slot"]}

    @routes.post("/users/{user_id}/personalize", response_model=JobInfo, status_code=202,
                 responses=responses(401, 404, 422),
                 summary="Start (or join) a personalize job; the worker process runs it while answers go on")
    def personalize(user_id: UserId, tenant: Tenant) -> dict:
        if user_id not in deployment.records(tenant, [user_id]):
            raise ApiError(404, "unknown_user", f"unknown user {user_id!r}")
        return job_json(store.create_job(tenant, user_id, slot)[0])

    @routes.get("/jobs/{job_id}", response_model=JobInfo, responses=responses(401, 404, 422))
    def get_job(job_id: JobId, tenant: Tenant) -> dict:
        job = store.job(tenant, job_id)
        if job is None:
            raise ApiError(404, "unknown_job", f"unknown job {job_id!r}")
        return job_json(job)

    return routes
