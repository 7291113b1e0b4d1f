"""The web page, the liveness probe and what a tenant's client needs to know about the deployment."""

# No `from __future__ import annotations`: FastAPI reads the route signatures, whose types are local to `router`.
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

from tailor.serve.deployment import Deployment
from tailor.serve.schemas import Info, responses

STATIC = Path(__file__).parent.parent / "static"


def router(deployment: Deployment) -> APIRouter:
    routes = APIRouter()
    method, task = deployment.method, deployment.task
    Tenant = Annotated[str, Depends(deployment.tenant_of)]

    @routes.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @routes.get("/healthz", summary="Liveness (no key needed)")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @routes.get("/v1/info", response_model=Info, responses=responses(401))
    def info(tenant: Tenant) -> Info:
        return Info(tenant=tenant, method=method.name, method_version=method.version, task=task.name,
                    model=method.model_id, item_fields=list(task.item_fields), output_field=task.output_field,
                    labels=list(task.labels), query_template=task.question_template,
                    limits=asdict(deployment.limits),
                    batching={**deployment.batching, **deployment.batcher.stats.to_json()})

    return routes
