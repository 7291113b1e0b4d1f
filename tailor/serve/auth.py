"""The tenant of a request: from its bearer key, never from its body or path.

The key is checked against the store at every request (`Store.authenticate`), so a key revoked or rotated from the
command line (`tailor tenants revoke|rotate`) is refused by a running server at once. The tenant is kept on the
request (`request.state.tenant`) for the access log.
"""

# No `from __future__ import annotations`: FastAPI reads `tenant_of`'s signature, whose types are local to it.
from typing import Annotated, Callable

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tailor.serve.errors import ApiError
from tailor.store.store import Store


def bearer_tenant(store: Store) -> Callable[..., str]:
    """The route dependency that turns `Authorization: Bearer <key>` into the tenant id."""
    bearer = HTTPBearer(auto_error=False, description="the tenant's API key")
    challenge = {"WWW-Authenticate": "Bearer"}

    def tenant_of(request: Request,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
        if credentials is None:
            raise ApiError(401, "unauthorized", "missing API key: send the header Authorization: Bearer <key>",
                           challenge)
        tenant = store.authenticate(credentials.credentials)
        if tenant is None:
            raise ApiError(401, "unauthorized", "invalid or revoked API key", challenge)
        request.state.tenant = tenant
        return tenant

    return tenant_of
