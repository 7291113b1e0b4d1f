"""Writes that a killed process never leaves half done.

Every file tailor rewrites in place (run configs and metrics, checkpoints, loss curves, user states, adapters,
download manifests, benchmark results) is written to a temporary file beside it, flushed to disk and renamed over
it: a reader sees the old file or the new one, never a torn one. The temporary name is unique per writer, so two
processes writing the same file race on the rename only.
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to; on a clean exit it replaces `path`, on an error it is
    removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    """Indented, with sorted keys, so the files diff cleanly between runs."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
