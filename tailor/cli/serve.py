"""`tailor serve`: start the HTTP server for the deployments of a config file (`--config serve.toml`, see
`tailor.serve.config`) or for one method and task over a store folder (`--store S --method M --task T`), or create a
tenant in a store."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer


from tailor.backbone.defaults import DEFAULT_MODEL
from tailor.cli._options import (DataDir, Device, Dtype, Model, SetOptions, check_device, check_options, console,
                                 parse_options, threads)

if TYPE_CHECKING:  # the server's modules import torch; `tailor --help` should not
    from tailor.serve.config import ServerConfig


def serve_command(
    config: Annotated[Optional[Path], typer.Option(
        help="a TOML file of deployments and settings (see the README); replaces the flags of one deployment")] = None,
    store: Annotated[Optional[Path], typer.Option(
        help="store folder (created if missing): index, states, jobs")] = None,
    method: Annotated[Optional[str], typer.Option(help="rag, chameleon, perfit, none, ...")] = None,
    task: Annotated[str, typer.Option(help="the task this server answers: lamp1 ... lamp7")] = "lamp2n",
    create_tenant: Annotated[Optional[str], typer.Option(
        help="create a tenant with this name, print its API key once (stdout) and exit")] = None,
    host: Annotated[Optional[str], typer.Option(help="default 127.0.0.1 (or the config's)")] = None,
    port: Annotated[Optional[int], typer.Option(help="default 8000 (or the config's)")] = None,
    model: Model = DEFAULT_MODEL,
    device: Device = "auto",
    dtype: Dtype = "auto",
    set_: SetOptions = [],
    max_batch: Annotated[int, typer.Option(help="rows answered in one forward")] = 16,
    max_wait_ms: Annotated[float, typer.Option(help="how long a request waits for others to share its forward")] = 5.0,
    max_queue: Annotated[int, typer.Option(help="rows waiting before requests get 503")] = 256,
    max_query_chars: Annotated[int, typer.Option(help="longer queries get 413")] = 8000,
    worker_threads: Annotated[int, typer.Option(help="torch threads of the personalize worker process")] = 1,
    access_log: Annotated[str, typer.Option(help="'-' stderr, a file to append to, or '' for none")] = "-",
    data_dir: DataDir = None,
) -> None:
    """Serve personalized models over HTTP, OpenAI-compatible (see /docs), or create a tenant with --create-tenant."""
    from tailor.serve.config import Batching, ConfigError, Limits, WorkerConfig, load_config, single
    from tailor.store.store import Store, StoreError

    if create_tenant is not None:
        if store is None:
            raise typer.BadParameter("--create-tenant needs --store", param_hint="--store")
        try:
            tenant, key = Store(store).create_tenant(create_tenant)
        except StoreError as error:
            raise typer.BadParameter(str(error), param_hint="--create-tenant") from None
        typer.echo(f"tenant {create_tenant!r} created (id {tenant}); its API key follows, shown only this once",
                   err=True)
        print(key)
        return
    if config is not None:
        if store is not None or method is not None or set_:
            raise typer.BadParameter("--config names the store and the deployments; give it without --store, "
                                     "--method or --set", param_hint="--config")
        try:
            settings = load_config(config)
        except ConfigError as error:
            raise typer.BadParameter(str(error), param_hint="--config") from None
    elif store is None or method is None:
        raise typer.BadParameter("give --config FILE, or --store and --method for one deployment (or --store with "
                                 "--create-tenant NAME)", param_hint="--method")
    else:
        settings = single(store, task, method, model, device, dtype, parse_options(set_), data_dir=data_dir,
                          access_log=access_log, limits=Limits(max_query_chars=max_query_chars),
                          batching=Batching(max_batch, max_wait_ms, max_queue),
                          worker=WorkerConfig(threads=worker_threads))
    serve(settings, host, port)


def serve(settings: ServerConfig, host: str | None, port: int | None) -> None:
    """Check every deployment (one line per problem, before anything loads), load them and run the server."""
    from tailor.tasks.lamp import get_task

    for deployment in settings.deployments:
        check_options(deployment.method, {"batch_size": settings.batching.max_batch, **deployment.options})
        check_device(deployment.device, deployment.dtype)
        get_task(deployment.task)
    settings = dataclasses.replace(settings, host=host or settings.host, port=port or settings.port)

    import uvicorn

    from tailor.serve.app import create_app
    from tailor.serve.build import build_methods
    from tailor.serve.observe import access_logger
    from tailor.serve.server import Server
    from tailor.store.store import Store

    threads()
    user_store = Store(settings.store)
    removed = user_store.sweep()
    if removed:
        console.print(f"removed {len(removed)} leftover files of killed writers")
    server = Server(settings, build_methods(settings, console.print), user_store)
    app = create_app(server, access_logger(settings.access_log))
    names = ", ".join(d.name for d in settings.deployments)
    console.print(f"serving {names} on http://{settings.host}:{settings.port} (default {settings.default}; OpenAPI "
                  "at /docs)")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
