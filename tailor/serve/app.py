"""The HTTP server: several deployments (task x method x backbone) over one multi-tenant user store, answering through
an OpenAI-compatible API and tailor's native one, while a worker process personalizes users.

`create_app(server)` wires a `Server` (`tailor.serve.server`: the deployments, batchers, worker and metrics) to the
routers: `meta` (page, health, metrics, info), `openai` (/v1/models, /v1/chat/completions, /v1/completions over every
deployment), and each deployment's native `users` and `predict` routes, at /v1/deployments/<name>/ and, for the
default deployment, at /v1/. Every /v1 route needs `Authorization: Bearer <tenant key>` and only ever sees that
tenant's users: the tenant comes from the key, never from the request. /docs is Swagger UI served from the
`fastapi-offline` package, so it works without internet. The other parts: `config` (what a server runs), `build`
(loading it), `deployment` (one deployment at run time), `batcher` (mixed-user micro-batching), `worker` (the
personalize process), `states` (the state cache), `auth`, `observe` (access log, metrics), `errors` (one error shape,
the body limit), `schemas` and `openai_schemas` (the JSON bodies).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline

from tailor.serve.errors import BodyLimit, install_error_handlers
from tailor.serve.observe import Observe
from tailor.serve.routes import meta, openai, predict, users
from tailor.serve.server import Server


def create_app(server: Server, access_log: logging.Logger | None = None) -> FastAPI:
    """The app over `server`, which it starts and stops with itself; `access_log` gets one line per request."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        server.start()
        yield
        server.stop()

    names = ", ".join(f"{d.name} ({d.task.name}, {d.method.name})" for d in server.deployments.values())
    app = FastAPIOffline(title="tailor", version="2", lifespan=lifespan, static_url="/docs-assets",
                         description=f"Personalized answers from {names}. Send the tenant key as `Authorization: "
                                     "Bearer <key>`. The OpenAI-compatible routes take the deployment as `model` and "
                                     "the end user as `user`; the native routes at /v1 are those of "
                                     f"{server.default.name}.")
    routers = [meta.router(server), openai.router(server)]
    prefixed = [(d.prefix, d) for d in server.deployments.values()]
    if server.default.prefix == "/v1":  # the default deployment is also at /v1/deployments/<name>
        prefixed.append((f"/v1/deployments/{server.default.name}", server.default))
    for prefix, deployment in prefixed:
        routers += [part.router(server, deployment, prefix) for part in (users, predict)]
    install_error_handlers(app, [route for r in routers for route in r.routes if isinstance(route, APIRoute)])
    for router in routers:
        app.include_router(router)
    app.add_middleware(BodyLimit, limit=server.config.limits.max_body_bytes)
    app.add_middleware(Observe, metrics=server.metrics, log=access_log)
    return app
