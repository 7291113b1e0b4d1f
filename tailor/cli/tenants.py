"""`tailor tenants`: a store's tenants and their API keys, from the command line: list them, create one, revoke a key
(the tenant's users stay; a running server refuses the key at its next request) or rotate it (a new key, printed once;
the old one stops working)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:  # the store imports torch; `tailor --help` should not
    from tailor.store.store import Store

tenants_app = typer.Typer(help="List a store's tenants, create one, revoke or rotate a tenant's API key.",
                          no_args_is_help=True)
StorePath = Annotated[Path, typer.Option("--store", help="the store folder")]
Tenant = Annotated[str, typer.Argument(help="the tenant's name or id")]


def open_store(path: Path) -> Store:
    """The store at `path`, which must exist (a mistyped path is not made into an empty store)."""
    from tailor.store.store import Store

    if not (path / "index.sqlite").is_file():
        raise typer.BadParameter(f"no store at {path}", param_hint="--store")
    return Store(path)


def when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds)) if seconds is not None else "-"


@tenants_app.command("list")
def list_command(store: StorePath) -> None:
    """Every tenant: name, id, when it was created, its key's state, how many users it has."""
    rows = [("name", "id", "created", "key", "users")]
    for tenant in open_store(store).tenants():
        key = (f"revoked {when(tenant['revoked'])}" if tenant["revoked"]
               else f"active since {when(tenant['key_created'])}")
        rows.append((tenant["name"], tenant["id"], when(tenant["created"]), key, str(tenant["users"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


@tenants_app.command("create")
def create_command(name: Annotated[str, typer.Argument(help="the new tenant's name")], store: StorePath) -> None:
    """Create a tenant and print its API key (stdout), shown only this once."""
    from tailor.store.store import Store

    tenant, key = Store(store).create_tenant(name)
    typer.echo(f"tenant {name!r} created (id {tenant}); its API key follows, shown only this once", err=True)
    print(key)


@tenants_app.command("revoke")
def revoke_command(tenant: Tenant, store: StorePath) -> None:
    """Refuse the tenant's API key from now on (401); its users, history and states stay."""
    opened = open_store(store)
    tenant_id = opened.tenant_id(tenant)
    done = opened.revoke_key(tenant_id)
    typer.echo(f"tenant {tenant!r} ({tenant_id}): key {'revoked' if done else 'was revoked already'}; "
               "`tailor tenants rotate` issues a new one", err=True)


@tenants_app.command("rotate")
def rotate_command(tenant: Tenant, store: StorePath) -> None:
    """Issue the tenant a new API key (printed on stdout, once); the old key stops working at once."""
    opened = open_store(store)
    tenant_id = opened.tenant_id(tenant)
    key = opened.rotate_key(tenant_id)
    typer.echo(f"tenant {tenant!r} ({tenant_id}): new API key follows, shown only this once; the old one is "
               "refused from now on", err=True)
    print(key)
