"""`tailor serve`: start the HTTP server for one method and task over a store folder, or create a tenant in it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

# tailor.cli registers this command, so its helpers are imported when the command runs, not when it is registered.
DataDir = Annotated[Optional[Path], typer.Option("--data-dir", help="LaMP data folder, for training users of methods "
                                                 "that fit (default: $TAILOR_DATA, then ../shared/lamp)")]
Model = Annotated[str, typer.Option(help="packaged model (smollm2-135m, qwen2.5-coder-0.5b) or a local HF folder")]


def serve(
    store: Annotated[Path, typer.Option(help="store folder (created if missing): index, states, jobs")],
    method: Annotated[Optional[str], typer.Option(help="rag, chameleon, perfit, none, ...")] = None,
    task: Annotated[str, typer.Option(help="the task this server answers: lamp1 ... lamp7")] = "lamp2n",
    create_tenant: Annotated[Optional[str], typer.Option(
        help="create a tenant with this name, print its API key once (stdout) and exit")] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    model: Model = "smollm2-135m",
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
    set_: Annotated[list[str], typer.Option("--set", help="method option KEY=VALUE (repeatable)")] = [],
    max_batch: Annotated[int, typer.Option(help="rows answered in one forward")] = 16,
    max_wait_ms: Annotated[float, typer.Option(help="how long a request waits for others to share its forward")] = 5.0,
    max_queue: Annotated[int, typer.Option(help="rows waiting before requests get 503")] = 256,
    max_query_chars: Annotated[int, typer.Option(help="longer queries get 413")] = 8000,
    data_dir: DataDir = None,
) -> None:
    """Serve personalized predictions over HTTP (see /docs), or create a tenant with --create-tenant."""
    from tailor.cli import _check_options, _load_backbone, _threads, console, parse_options
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
    from tailor.eval.runner import fit_method
    from tailor.methods import LMPersonalizer, build_method, method_class
    from tailor.serve.app import Limits, create_app
    from tailor.tasks.lamp import get_task

    options = {"batch_size": max_batch, **parse_options(set_)}
    _check_options(method, options)
    _threads()
    the_task = get_task(task)
    backbone = _load_backbone(model, dtype) if method_class(method).needs_backbone else None
    personalizer = build_method(method, the_task, backbone, **options)
    try:
        train = load_users(the_task, "train", data_dir)
    except DataError as error:
        if personalizer.fits:
            raise
        console.print(f"no training users ({error}); {method} does not need them")
        train = []
    if train:
        with console.status(f"fitting {method} on {len(train)} training users (cached after the first time)"):
            fit_method(personalizer, train)
    base = None
    if isinstance(personalizer, LMPersonalizer):
        config = personalizer.config
        base = personalizer if method == "none" else build_method(
            "none", the_task, backbone, mode=config.mode, calibrate=config.calibrate, batch_size=config.batch_size,
            max_new_tokens=config.max_new_tokens)
    removed = user_store.sweep()
    if removed:
        console.print(f"removed {len(removed)} leftover files of killed writers")
    app = create_app(personalizer, user_store, base, Limits(max_query_chars=max_query_chars), max_batch, max_wait_ms,
                     max_queue)
    console.print(f"serving {method} for {the_task.name} on http://{host}:{port} (OpenAPI at /docs)")
    uvicorn.run(app, host=host, port=port, log_level="warning")


if __name__ == "__main__":
    typer.run(serve)
