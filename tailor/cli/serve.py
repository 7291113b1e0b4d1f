"""`tailor serve`: start the HTTP server for one method and task over a store folder, or create a tenant in it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tailor.cli._options import (DataDir, Device, Dtype, Model, SetOptions, build, check_device, check_options, console,
                                 parse_options)


def serve_command(
    store: Annotated[Path, typer.Option(help="store folder (created if missing): index, states, jobs")],
    method: Annotated[Optional[str], typer.Option(help="rag, chameleon, perfit, none, ...")] = None,
    task: Annotated[str, typer.Option(help="the task this server answers: lamp1 ... lamp7")] = "lamp2n",
    create_tenant: Annotated[Optional[str], typer.Option(
        help="create a tenant with this name, print its API key once (stdout) and exit")] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    model: Model = "smollm2-135m",
    device: Device = "auto",
    dtype: Dtype = "auto",
    set_: SetOptions = [],
    max_batch: Annotated[int, typer.Option(help="rows answered in one forward")] = 16,
    max_wait_ms: Annotated[float, typer.Option(help="how long a request waits for others to share its forward")] = 5.0,
    max_queue: Annotated[int, typer.Option(help="rows waiting before requests get 503")] = 256,
    max_query_chars: Annotated[int, typer.Option(help="longer queries get 413")] = 8000,
    data_dir: DataDir = None,
) -> None:
    """Serve personalized predictions over HTTP (see /docs), or create a tenant with --create-tenant."""
    from tailor.store.store import Store, StoreError

    user_store = Store(store)
    if create_tenant is not None:
        try:
            tenant, key = user_store.create_tenant(create_tenant)
        except StoreError as error:
            raise typer.BadParameter(str(error), param_hint="--create-tenant") from None
        typer.echo(f"tenant {create_tenant!r} created (id {tenant}); its API key follows, shown only this once",
                   err=True)
        print(key)
        return
    if method is None:
        raise typer.BadParameter("give --method to serve, or --create-tenant NAME", param_hint="--method")

    import uvicorn

    from tailor.data.lamp import DataError, load_users
    from tailor.runs.fits import fit_method
    from tailor.serve.app import Limits, base_method, create_app

    options = {"batch_size": max_batch, **parse_options(set_)}
    check_options(method, options)
    check_device(device, dtype)
    personalizer = build(method, task, model, device, dtype, options)
    try:
        train = load_users(personalizer.task, "train", data_dir)
    except DataError as error:
        if personalizer.fits:
            raise
        console.print(f"no training users ({error}); {method} does not need them")
        train = []
    if train:
        with console.status(f"fitting {method} on {len(train)} training users (cached after the first time)"):
            fit_method(personalizer, train)
    removed = user_store.sweep()
    if removed:
        console.print(f"removed {len(removed)} leftover files of killed writers")
    app = create_app(personalizer, user_store, base_method(personalizer), Limits(max_query_chars=max_query_chars),
                     max_batch, max_wait_ms, max_queue)
    console.print(f"serving {method} for {personalizer.task.name} on http://{host}:{port} (OpenAPI at /docs)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
