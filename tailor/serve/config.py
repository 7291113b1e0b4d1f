"""What `tailor serve` runs: its deployments (task x method x backbone, each with its options, device and precision)
and the server's settings, read from a TOML file or made from the single-deployment flags.

    store = "serve-store"          # paths are relative to this file
    default = "news"               # the deployment of the native routes (/v1/predict, /v1/users/...)

    [deployments.news]
    task = "lamp2n"
    method = "rag"
    options = { k = 4 }

    [deployments.news-lora]        # the same backbone as `news` (same model, device, dtype): loaded once
    task = "lamp2n"
    method = "lora-p"

Optional tables: `[limits]`, `[batching]`, `[worker]` (fields of the dataclasses below), and top-level `host`, `port`,
`data_dir` (training users for methods that fit), `access_log` ("-" for stderr, a file, or "" for none). A
deployment's `model` (default qwen2.5-coder-0.5b), `device` and `dtype` (default auto) are those of `tailor eval`. An unknown
key is refused with its place in the file, so a typo is not silently ignored. A deployment's name is its OpenAI
`model` and the slot its users' states are kept in (`tailor.store.store`), so renaming one starts its users afresh.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tailor.backbone.defaults import DEFAULT_MODEL
from tailor.store.paths import is_safe_user_id
from tailor.store.store import DEFAULT_SLOT


class ConfigError(ValueError):
    """A server config that cannot run; the message names the file and the key."""


@dataclass(frozen=True)
class Limits:
    """What one request may carry; larger inputs get a 413 that names the limit."""

    max_query_chars: int = 8000
    max_item_chars: int = 20000
    max_items: int = 1000
    """History items per POST."""
    max_requests: int = 64
    """(user, query) rows per predict call, prompts per completion call."""
    max_body_bytes: int = 8 << 20
    max_tokens: int = 1024
    """The largest `max_tokens` a completion may ask for."""


@dataclass(frozen=True)
class Batching:
    max_batch: int = 16
    """Rows answered in one forward (and each method's default batch size)."""
    max_wait_ms: float = 5.0
    """How long a request waits for others to share its forward."""
    max_queue: int = 256
    """Rows waiting for the model before requests get 503."""


@dataclass(frozen=True)
class WorkerConfig:
    """The personalize worker process (`tailor.serve.worker`)."""

    threads: int = 1
    """Its torch threads: on a CPU, the cores left to the process that answers are what keeps answers fast."""
    nice: int = 10
    """Its CPU priority below the server's (Unix nice), so training yields the CPU to answering."""
    group: int = 16
    """Queued jobs of one deployment taken together (one `personalize_many` for those rebuilt)."""
    poll_s: float = 0.2
    """How often it looks for queued jobs in the store."""


@dataclass(frozen=True)
class DeploymentConfig:
    name: str
    task: str
    method: str
    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerConfig:
    store: Path
    deployments: tuple[DeploymentConfig, ...]
    default: str
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path | None = None
    access_log: str = "-"
    limits: Limits = Limits()
    batching: Batching = Batching()
    worker: WorkerConfig = WorkerConfig()

    def to_raw(self) -> dict[str, Any]:
        """The config as `parse_config` reads it (paths absolute), to hand to the worker process."""
        raw = dataclasses.asdict(self)
        raw["store"] = str(self.store.resolve())
        raw["data_dir"] = str(self.data_dir.resolve()) if self.data_dir else None
        raw["deployments"] = {d.pop("name"): d for d in raw["deployments"]}
        return {k: v for k, v in raw.items() if v is not None}


def single(store: Path, task: str, method: str, model: str, device: str, dtype: str, options: dict[str, Any],
           **settings: Any) -> ServerConfig:
    """The config of the single-deployment flags (`tailor serve --store S --method M --task T`): one deployment
    named `default`, whose states are where a store of the previous tailor kept them."""
    deployment = DeploymentConfig(DEFAULT_SLOT, task, method, model, device, dtype, options)
    return ServerConfig(store=store, deployments=(deployment,), default=DEFAULT_SLOT, **settings)


def load_config(path: Path) -> ServerConfig:
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"{path}: {error}") from None
    return parse_config(raw, path.parent, str(path))


def _table(raw: Any, cls: type, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    try:
        return cls(**raw)
    except TypeError as error:
        raise ConfigError(f"{where}: {error}") from None


def parse_config(raw: dict[str, Any], base: Path | None = None, source: str = "config") -> ServerConfig:
    """The config of a TOML document (or `to_raw`'s dict); relative paths are taken from `base`."""
    def path(value: str) -> Path:
        return Path(value) if base is None or Path(value).is_absolute() else base / value

    raw = dict(raw)
    if "store" not in raw:
        raise ConfigError(f"{source}: `store` is missing (the store folder)")
    tables = raw.pop("deployments", None)
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"{source}: no [deployments.NAME] table; a server needs at least one")
    deployments = []
    for name, table in tables.items():
        where = f"{source}: [deployments.{name}]"
        if not is_safe_user_id(name):
            raise ConfigError(f"{where}: a deployment name is 1-128 letters, digits, '_', '.' or '-'")
        missing = [key for key in ("task", "method") if not isinstance(table, dict) or key not in table]
        if missing:
            raise ConfigError(f"{where}: `{missing[0]}` is missing")
        deployment = _table({**table, "name": name}, DeploymentConfig, where)
        if not isinstance(deployment.options, dict):
            raise ConfigError(f"{where}: `options` is a table of method options, e.g. options = {{ k = 4 }}")
        model = path(deployment.model)
        deployments.append(dataclasses.replace(deployment, model=str(model)) if model.exists() else deployment)
    default = raw.pop("default", deployments[0].name)
    if default not in tables:
        raise ConfigError(f"{source}: default = {default!r} names no deployment; there are {', '.join(tables)}")
    sections = {"limits": Limits, "batching": Batching, "worker": WorkerConfig}
    settings = {key: _table(raw.pop(key), cls, f"{source}: [{key}]") for key, cls in sections.items() if key in raw}
    settings["store"] = path(raw.pop("store"))
    if "data_dir" in raw:
        settings["data_dir"] = path(raw.pop("data_dir"))
    if raw.get("access_log") not in (None, "", "-"):
        raw["access_log"] = str(path(raw["access_log"]))
    config = _table({**raw, **settings, "deployments": tuple(deployments), "default": default}, ServerConfig, source)
    batching = config.batching
    if batching.max_batch < 1 or batching.max_queue < batching.max_batch:
        raise ConfigError(f"{source}: [batching] needs 1 <= max_batch <= max_queue")
    return config
