"""One deployment: a method and task over the user store, with everything its routes share at run time.

The method answers personalized rows; `base` (normally the non-personalized prompt on the same backbone) answers rows
that ask for the model without the user's personalization. Predictions go through the micro-batcher and personalize
jobs through the worker; both take `model_lock`, because the backbone's hooks are installed per forward.
"""

# No `from __future__ import annotations`: FastAPI reads `tenant_of`'s signature, whose types are local to it.
import threading
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tailor.methods import build_method
from tailor.methods.base import LMPersonalizer, Personalizer
from tailor.serve.batcher import MicroBatcher
from tailor.serve.errors import ApiError
from tailor.serve.worker import Personalizing, StateCache
from tailor.store.state import UserState
from tailor.store.store import Store, UnknownUser, UserRecord
from tailor.tasks.records import User


@dataclass(frozen=True)
class Limits:
    """What one request may carry; larger inputs get a 413 that names the limit."""

    max_query_chars: int = 8000
    max_item_chars: int = 20000
    max_items: int = 1000
    """History items per POST."""
    max_requests: int = 64
    """(user, query) rows per predict call."""
    max_body_bytes: int = 8 << 20


def base_method(method: Personalizer) -> Personalizer | None:
    """The non-personalized prompt on the same backbone, answering as `method` answers (mode, calibration, batch);
    None for methods that do not answer through a backbone."""
    if not isinstance(method, LMPersonalizer):
        return None
    if method.name == "none":
        return method
    config = method.config
    return build_method("none", method.task, method.backbone, mode=config.mode, calibrate=config.calibrate,
                        batch_size=config.batch_size, max_new_tokens=config.max_new_tokens)


class Deployment:
    """The method, its store and the parts that run beside the routes (batcher, personalize worker, state cache)."""

    def __init__(self, method: Personalizer, store: Store, base: Personalizer | None, limits: Limits,
                 max_batch: int, max_wait_ms: float, max_queue: int):
        self.method, self.store, self.limits = method, store, limits
        self.task = method.task
        self.model_lock = threading.Lock()
        self.methods = {"personalized": method, **({"base": base} if base is not None else {})}
        self.base_state: UserState | None = base.personalize(User("-", self.task.name, ())) if base else None
        self.batcher = MicroBatcher(lambda key, requests: self.methods[key].predict(requests), self.model_lock,
                                    max_batch, max_wait_ms, max_queue)
        self.worker = Personalizing(store, method, self.model_lock)
        self.cache = StateCache(store, method)
        self.batching = {"max_batch": max_batch, "max_wait_ms": max_wait_ms, "max_queue": max_queue}
        bearer = HTTPBearer(auto_error=False, description="the tenant's API key")

        def tenant_of(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
            if credentials is None:
                raise ApiError(401, "unauthorized", "missing API key: send the header Authorization: Bearer <key>",
                               {"WWW-Authenticate": "Bearer"})
            tenant = store.authenticate(credentials.credentials)
            if tenant is None:
                raise ApiError(401, "unauthorized", "invalid API key", {"WWW-Authenticate": "Bearer"})
            return tenant

        self.tenant_of = tenant_of
        """The route dependency that turns the bearer key into the tenant; the tenant never comes from the body."""

    def start(self) -> None:
        self.batcher.start()
        self.worker.start()

    def stop(self) -> None:
        self.batcher.stop()
        self.worker.stop()

    def record_of(self, tenant: str, user_id: str) -> UserRecord:
        try:
            return self.store.record(tenant, user_id)
        except UnknownUser:
            raise ApiError(404, "unknown_user", f"unknown user {user_id!r}") from None
