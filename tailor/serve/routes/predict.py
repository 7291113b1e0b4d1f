"""Answers: (user, query) rows, which may belong to different users and still share one forward."""

# No `from __future__ import annotations`: FastAPI reads the route signatures, whose types are local to `router`.
from typing import Annotated

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from tailor.methods.base import Prediction
from tailor.serve.batcher import QueueFull, Row
from tailor.serve.deployment import Deployment
from tailor.serve.errors import ApiError
from tailor.serve.schemas import PredictBody, PredictionOut, PredictResponse, PredictRow, responses
from tailor.store.state import StateError
from tailor.tasks.records import Query


def router(deployment: Deployment) -> APIRouter:
    routes = APIRouter()
    store, task, limits, method = deployment.store, deployment.task, deployment.limits, deployment.method
    Tenant = Annotated[str, Depends(deployment.tenant_of)]

    def rows_for(tenant: str, requests: list[PredictRow]) -> list[Row]:
        records = store.records(tenant, [r.user_id for r in requests])
        rows: list[Row] = []
        for position, request in enumerate(requests):
            record = records.get(request.user_id)
            if record is None:
                raise ApiError(404, "unknown_user", f"requests[{position}]: unknown user {request.user_id!r}")
            query = Query(f"{request.user_id}/{position}", request.query)
            if not request.personalized:
                if deployment.base_state is None:
                    raise ApiError(409, "no_base", f"{method.name} has no non-personalized counterpart here")
                rows.append(("base", deployment.base_state, query))
                continue
            if not record.has_state:
                raise ApiError(409, "not_personalized", f"user {request.user_id!r} has no personalized state; POST "
                               f"/v1/users/{request.user_id}/personalize first")
            if record.stale:
                raise ApiError(409, "stale_state", f"user {request.user_id!r} has {record.items} history items but "
                               f"the state was built from {record.state_items}; POST "
                               f"/v1/users/{request.user_id}/personalize to update it")
            try:
                rows.append(("personalized", deployment.cache.get(tenant, record), query))
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

    @routes.post("/v1/predict", response_model=PredictResponse, responses=responses(401, 404, 409, 413, 422, 503),
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
            predictions = await deployment.batcher.predict(rows)
        except QueueFull as error:
            raise ApiError(503, "queue_full", str(error), {"Retry-After": "1"}) from None
        return PredictResponse(predictions=[prediction_out(r, p) for r, p in zip(body.requests, predictions)])

    return routes
