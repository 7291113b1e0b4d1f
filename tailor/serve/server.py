"""What every route shares: the deployments (and the default one, which the native routes at /v1 answer for), the
store, the tenant check, one micro-batcher per backbone, the personalize worker process and the metrics.

Deployments on one backbone share its batcher, whose thread runs all of that backbone's forwards (its hooks are
installed per forward, so two forwards at once would see each other's edits); rows of different deployments in one
batch are answered by one call each.
"""

from __future__ import annotations

import time
from typing import Sequence

from tailor.methods.base import Personalizer
from tailor.serve.auth import bearer_tenant
from tailor.serve.batcher import MicroBatcher
from tailor.serve.config import ServerConfig
from tailor.serve.deployment import Answer, Deployment, Row, Work
from tailor.serve.errors import ApiError
from tailor.serve.observe import Metrics
from tailor.serve.worker import PersonalizeWorker
from tailor.store.store import Store

BASE_SUFFIX = ":base"
"""`model: "<deployment>:base"` asks for the deployment's backbone without personalization (no `user` needed)."""


class Server:
    def __init__(self, config: ServerConfig, methods: dict[str, Personalizer], store: Store):
        self.config, self.store = config, store
        self.metrics = Metrics(store)
        self.started = int(time.time())
        self.batchers: dict[str, MicroBatcher] = {}
        self.deployments: dict[str, Deployment] = {}
        for spec in config.deployments:
            method = methods[spec.name]
            backbone = f"{method.model_id}@{method.device}" if method.backbone is not None else spec.name
            if backbone not in self.batchers:
                batching = config.batching
                batcher = MicroBatcher(self._run, batching.max_batch, batching.max_wait_ms, batching.max_queue)
                batcher.on_batch = self.metrics.watch_batcher(backbone, lambda b=batcher: b.queued_rows)
                self.batchers[backbone] = batcher
            prefix = "/v1" if spec.name == config.default else f"/v1/deployments/{spec.name}"
            self.deployments[spec.name] = Deployment(spec.name, method, store, config.limits,
                                                     self.batchers[backbone], prefix)
        self.default = self.deployments[config.default]
        self.worker = PersonalizeWorker(config, store)
        self.tenant_of = bearer_tenant(store)
        """The route dependency that turns the bearer key into the tenant."""

    def _run(self, work: Work, rows: Sequence[Row]) -> list[Answer]:
        return self.deployments[work.deployment].run(work, list(rows))

    def start(self) -> None:
        for batcher in self.batchers.values():
            batcher.start()
        self.worker.start()

    def stop(self) -> None:
        for batcher in self.batchers.values():
            batcher.stop()
        self.worker.stop()

    def model(self, name: str) -> tuple[Deployment, bool]:
        """The deployment an OpenAI `model` names, and whether it answers personalized."""
        deployment = self.deployments.get(name.removesuffix(BASE_SUFFIX))
        personalized = not name.endswith(BASE_SUFFIX)
        if deployment is None or (not personalized and deployment.base is None):
            known = ", ".join(f"{d.name} ({d.name}{BASE_SUFFIX})" if d.base else d.name
                              for d in self.deployments.values())
            raise ApiError(404, "model_not_found", f"no model {name!r} here; the models are {known}", param="model")
        return deployment, personalized
