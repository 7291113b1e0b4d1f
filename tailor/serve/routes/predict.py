"""Answers of the native API: (user, query) rows, which may belong to different users and still share one forward.

Each row is answered on its own: a row whose user is unknown, not personalized yet or has an unusable state carries
its error, and the others are answered all the same. Only a call none of whose rows can be answered fails, with its
first row's error. A user with history added since their state was built is answered from that state, marked stale.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures, whose types are local to `router`.
import logging
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from tailor.serve.batcher import QueueFull
from tailor.serve.deployment import Answer, Deployment, Row, Work
from tailor.serve.errors import ApiError
from tailor.serve.schemas import PredictBody, PredictionOut, PredictResponse, PredictRow, responses
from tailor.serve.server import Server
from tailor.tasks.records import Query

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Planned:
    work: Work
    row: Row
    stale: bool


def router(server: Server, deployment: Deployment, prefix: str) -> APIRouter:
    routes = APIRouter(prefix=prefix, tags=[deployment.name])
    limits = deployment.limits
    Tenant = Annotated[str, Depends(server.tenant_of)]

    def plan(tenant: str, requests: list[PredictRow]) -> list[Planned | ApiError]:
        """Each request's row for the batcher, or the error that it cannot have one."""
        records = deployment.records(tenant, [r.user_id for r in requests])
        out: list[Planned | ApiError] = []
        for position, request in enumerate(requests):
            where = f"requests[{position}]"
            record = records.get(request.user_id)
            query = Query(f"{request.user_id}/{position}", deployment.check_query(request.query, f"{where}.query"))
            try:
                if record is None:
                    raise ApiError(404, "unknown_user", f"{where}: unknown user {request.user_id!r}",
                                   param=f"{where}.user_id")
                if not request.personalized:
                    if deployment.base_state is None:
                        raise ApiError(409, "no_base", f"{deployment.method.name} has no non-personalized "
                                       "counterpart here", param=f"{where}.personalized")
                    out.append(Planned(Work(deployment.name, False), Row(deployment.base_state, query), False))
                    continue
                state = deployment.state_of(tenant, request.user_id, record, f"{where}.user_id")
                out.append(Planned(Work(deployment.name, True), Row(state, query), record.stale))
            except ApiError as error:
                out.append(error)
        return out

    def prediction_out(request: PredictRow, planned: Planned | ApiError,
                       answer: Answer | BaseException | None) -> PredictionOut:
        if isinstance(answer, BaseException):
            log.error("a predict row of user %r failed", request.user_id, exc_info=answer)
            planned = ApiError(500, "internal", "this row failed; the server log has the details")
        if isinstance(planned, ApiError):
            return PredictionOut(user_id=request.user_id, personalized=request.personalized,
                                 error=planned.to_json()["error"])
        assert isinstance(answer, Answer)
        if planned.stale:
            server.metrics.stale_answers.labels(deployment.name).inc()
        return PredictionOut(user_id=request.user_id, personalized=request.personalized, text=answer.text,
                             mode=answer.mode, scores=answer.scores, stale=planned.stale)

    @routes.post("/predict", response_model=PredictResponse, responses=responses(401, 404, 409, 413, 422, 503),
                 summary="Answer (user, query) pairs; pairs of different users share one forward")
    async def predict(body: PredictBody, tenant: Tenant) -> PredictResponse:
        if len(body.requests) > limits.max_requests:
            raise ApiError(413, "too_long", f"{len(body.requests)} requests in one call; at most "
                           f"{limits.max_requests}", param="requests")
        planned = await run_in_threadpool(plan, tenant, body.requests)
        rows = [p for p in planned if isinstance(p, Planned)]
        if not rows:
            raise planned[0]  # type: ignore[misc]
        try:
            answers = await deployment.batcher.answer([(p.work, p.row) for p in rows])
        except QueueFull as error:
            raise ApiError(503, "queue_full", str(error), {"Retry-After": "1"}) from None
        if all(isinstance(a, BaseException) for a in answers) and len(rows) == len(planned):
            raise answers[0]
        answered = dict(zip(map(id, rows), answers))
        return PredictResponse(predictions=[prediction_out(r, p, answered.get(id(p)))
                                            for r, p in zip(body.requests, planned)])

    return routes
