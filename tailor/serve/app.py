"""The HTTP server: one method over the user store, with mixed-user batching and tenant isolation.

`create_app(method, store)` serves one task with one method (and the non-personalized prompt on the same backbone,
so a client can compare the two answers). Every /v1 route needs `Authorization: Bearer <tenant key>` and only ever
sees that tenant's users: the tenant comes from the key, never from the request. The parts: `deployment` (what the
routes share), `routes/` (one router per concern), `worker` (personalize jobs and the state cache), `batcher`
(mixed-user micro-batching), `errors` (one error shape, the body limit), `schemas` (the JSON bodies).
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute

from tailor.methods.base import Personalizer
from tailor.serve.deployment import Deployment, Limits, base_method
from tailor.serve.errors import BodyLimit, install_error_handlers
from tailor.serve.routes import meta, predict, users
from tailor.store.store import Store

__all__ = ["Limits", "base_method", "create_app"]


def create_app(method: Personalizer, store: Store, base: Personalizer | None = None, limits: Limits = Limits(),
               max_batch: int = 16, max_wait_ms: float = 5.0, max_queue: int = 256) -> FastAPI:
    """The server for one method and task over `store`. `base` answers `personalized: false` rows (normally
    `base_method(method)`, the non-personalized prompt on the same backbone); without it such rows are refused."""
    deployment = Deployment(method, store, base, limits, max_batch, max_wait_ms, max_queue)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        deployment.start()
        yield
        deployment.stop()

    app = FastAPI(title="tailor", version="1", lifespan=lifespan,
                  description=f"Personalized answers for {method.task.name} with {method.name}. Send the tenant key "
                              "as `Authorization: Bearer <key>`.")
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    routers = [part.router(deployment) for part in (meta, users, predict)]
    install_error_handlers(app, [route for r in routers for route in r.routes if isinstance(route, APIRoute)])
    for router in routers:
        app.include_router(router)
    return app
