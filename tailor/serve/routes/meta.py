"""The web page, the liveness probe, the Prometheus metrics and what a tenant's client needs to know about the
default deployment."""

# No `from __future__ import annotations`: FastAPI reads the route signatures, whose types are local to `router`.
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, Response

from tailor.serve.schemas import Info, responses
from tailor.serve.server import Server

STATIC = Path(__file__).parent.parent / "static"


def router(server: Server) -> APIRouter:
    routes = APIRouter()
    deployment = server.default
    method, task = deployment.method, deployment.task
    Tenant = Annotated[str, Depends(server.tenant_of)]

    @routes.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @routes.get("/healthz", summary="Liveness (no key needed); `worker` says whether personalize jobs can run")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "worker": "running" if server.worker.alive else "restarting"}

    @routes.get("/metrics", summary="Prometheus metrics (no key needed)", response_class=Response)
    def metrics() -> Response:
        body, content_type = server.metrics.exposition()
        return Response(body, media_type=content_type)

    @routes.get("/v1/info", response_model=Info, responses=responses(401),
                summary="The default deployment: what its native routes take and answer")
    def info(tenant: Tenant) -> Info:
        return Info(tenant=tenant, deployment=deployment.name, deployments=list(server.deployments),
                    method=method.name, method_version=method.version, task=task.name, model=method.model_id,
                    item_fields=list(task.item_fields), output_field=task.output_field, labels=list(task.labels),
                    query_template=task.question_template, limits=asdict(server.config.limits),
                    batching={**asdict(server.config.batching), **deployment.batcher.stats.to_json()})

    return routes
