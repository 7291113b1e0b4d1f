"""User data: LaMP's files (`tailor.data.lamp`) and users files of one's own (JSONL, `tailor.data.jsonl`) read into
`User` records, the downloader and the user splits.

The records themselves (`User`, `HistoryItem`, `Query`) belong to the task layer below (`tailor.tasks.records`) and
are re-exported here. The reader, downloader and splits load on first use, so `import tailor.data` does not pull in
scikit-learn or urllib just to get `User`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from tailor.tasks.records import HistoryItem, Query, User

if TYPE_CHECKING:
    from tailor.data.download import OFFICIAL_BASE, DownloadError, default_cache_dir, download_task, lamp_cache_dir
    from tailor.data.jsonl import check_users_file, load_jsonl_users
    from tailor.data.lamp import DataError, available_tasks, load_users, resolve_data_dir
    from tailor.data.splits import ood_split, random_split, subset

_LAZY = {
    "DataError": "tailor.data.lamp",
    "available_tasks": "tailor.data.lamp",
    "load_users": "tailor.data.lamp",
    "resolve_data_dir": "tailor.data.lamp",
    "check_users_file": "tailor.data.jsonl",
    "load_jsonl_users": "tailor.data.jsonl",
    "OFFICIAL_BASE": "tailor.data.download",
    "DownloadError": "tailor.data.download",
    "default_cache_dir": "tailor.data.download",
    "download_task": "tailor.data.download",
    "lamp_cache_dir": "tailor.data.download",
    "ood_split": "tailor.data.splits",
    "random_split": "tailor.data.splits",
    "subset": "tailor.data.splits",
}

__all__ = ["HistoryItem", "Query", "User", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
