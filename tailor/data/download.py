"""Fetch the official LaMP JSON files into a local cache that `load_users` reads.

Official files are large (hundreds of MB for some tasks) and the server is a university web server, so a download
must survive a dropped connection (it resumes from a `.part` file with an HTTP Range request) and must never leave
a wrong file where a right one is expected: a body that is not LaMP JSON (an HTML error page served with status 200)
is rejected before anything is moved into place, and a finished file is moved there atomically. The sha256 of each
finished file goes into a manifest, so a later run skips what is already there and intact.

Layout: `<cache>/lamp/<variant>/<TASKDIR>/<split>_{questions,outputs}.json`, with the LaMP-2 tasks as `LaMP_2M` and
`LaMP_2N` (the server calls both `LaMP_2`).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from tailor.atomic import write_json
from tailor.data.lamp import SPLITS, VARIANTS, DataError, resolve_task
from tailor.tasks.lamp import Task

OFFICIAL_BASE = "https://ciir.cs.umass.edu/downloads/LaMP"
CACHE_ENV = "TAILOR_CACHE"
MANIFEST = "manifest.json"

# Where each task's files live below the base URL; "/{split}/{split}_{questions|outputs}.json" follows.
# LaMP-6 is not public and has no tailor task.
REMOTE_DIRS: dict[tuple[str, str], str] = {
    ("LaMP-1", "user"): "LaMP_1",
    ("LaMP-2N", "user"): "LaMP_2",
    ("LaMP-2M", "user"): "LaMP_2/new",
    ("LaMP-3", "user"): "LaMP_3",
    ("LaMP-4", "user"): "LaMP_4",
    ("LaMP-5", "user"): "LaMP_5",
    ("LaMP-7", "user"): "LaMP_7",
    ("LaMP-1", "time"): "time/LaMP_1",
    ("LaMP-2N", "time"): "time/LaMP_2",
    ("LaMP-2M", "time"): "time/LaMP_2/new",
    ("LaMP-3", "time"): "time/LaMP_3",
    ("LaMP-4", "time"): "time/LaMP_4",
    ("LaMP-5", "time"): "time/LaMP_5",
    ("LaMP-7", "time"): "time/LaMP_7",
}

_CHUNK = 1 << 16
_TIMEOUT_S = 60.0
_SNIPPET = 60


class DownloadError(RuntimeError):
    """A file could not be fetched or was not what the server should have sent."""


class _Interrupted(Exception):
    """The transfer stopped part-way; what arrived is in the .part file and the next attempt resumes from it."""


class _RangeRefused(_Interrupted):
    """The server will not resume from the .part file (HTTP 416), so the next attempt starts over."""


# --- cache layout -----------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """$TAILOR_CACHE, else ~/.cache/tailor."""
    from_env = os.environ.get(CACHE_ENV, "").strip()
    return Path(from_env).expanduser() if from_env else Path.home() / ".cache" / "tailor"


def lamp_cache_dir(variant: str = "user", cache_dir: str | Path | None = None) -> Path:
    """The folder holding one variant's downloaded files and its manifest: `<cache>/lamp/<variant>`."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "lamp" / variant


def _data_dir(files_dir: Path, variant: str) -> Path:
    """The folder to pass to `load_users`: it looks for the time-based split below `<data_dir>/time/`."""
    return files_dir.parent if variant == "time" else files_dir


# --- manifest ------------------------------------------------------------------------------------------------------

def _load_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """The recorded files; an unreadable manifest counts as empty, so files are fetched again rather than trusted."""
    try:
        files = json.loads(path.read_text(encoding="utf-8")).get("files", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return files if isinstance(files, dict) else {}


def _record(manifest: Path, key: str, url: str, file: Path) -> None:
    files = _load_manifest(manifest)
    digest, size = _sha256(file)
    files[key] = {"url": url, "sha256": digest, "bytes": size,
                  "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json(manifest, {"files": files})


def _sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _intact(file: Path, entry: dict[str, Any] | None) -> bool:
    return entry is not None and file.is_file() and _sha256(file)[0] == entry.get("sha256")


# --- progress --------------------------------------------------------------------------------------------------

class _Progress:
    """A rich progress bar per file, or nothing at all when progress is off (tests, logs, pipes)."""

    def __init__(self, enabled: bool) -> None:
        self._bars = None
        if enabled:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

            self._bars = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn())

    def __enter__(self) -> _Progress:
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bars is not None:
            self._bars.stop()

    def file(self, name: str, total: int | None, done: int) -> Callable[[int], None]:
        """Start a bar for one transfer; returns the callback that advances it by a number of bytes."""
        if self._bars is None:
            return lambda _: None
        bar = self._bars.add_task(name, total=total, completed=done)
        return lambda n: self._bars.advance(bar, n)

    def note(self, message: str) -> None:
        if self._bars is not None:
            self._bars.console.print(message)


# --- one file ----------------------------------------------------------------------------------------------------

def _open(url: str, start: int) -> http.client.HTTPResponse:
    """Request a URL from byte `start` on, turning network failures into messages a user can act on."""
    headers = {"User-Agent": "tailor"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and start:
            raise _RangeRefused("the server cannot resume from the partial file") from None
        hint = " (no such file on the server: check the task, variant and split)" if err.code == 404 else ""
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}{hint}") from None
    except urllib.error.URLError as err:
        host = urllib.parse.urlsplit(url).netloc
        raise DownloadError(f"cannot reach {host} ({err.reason}). This machine may have no internet access: copy "
                            f"the LaMP files into a folder and pass --data-dir (or set TAILOR_DATA) instead.") from None
    except (TimeoutError, ConnectionError) as err:
        raise _Interrupted(f"connecting failed: {err}") from None


def _resumes(response: http.client.HTTPResponse, start: int) -> bool:
    """Whether the server answered the Range request with exactly the bytes after the ones we have."""
    content_range = response.headers.get("Content-Range", "")
    return response.status == 206 and content_range.startswith(f"bytes {start}-")


def _transfer(url: str, part: Path, progress: _Progress) -> None:
    """Append the rest of `url` to `part`, or rewrite it when the server ignores the Range request (status 200)."""
    have = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, have)
    except _RangeRefused:
        part.unlink()
        raise
    with response:
        if have and not _resumes(response, have):
            if response.status == 206:
                part.unlink()
                raise _RangeRefused("the server sent a different byte range than asked for")
            have = 0
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None and length.isdigit() else None
        advance = progress.file(part.name.removesuffix(".part"), None if expected is None else have + expected, have)
        received = 0
        with open(part, "ab" if have else "wb") as out:
            try:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    advance(len(chunk))
            except (http.client.IncompleteRead, ConnectionError, TimeoutError) as err:
                raise _Interrupted(f"connection lost after {have + received} bytes: {err}") from None
            finally:
                out.flush()
                os.fsync(out.fileno())
    if expected is not None and received < expected:
        raise _Interrupted(f"connection closed after {have + received} of {have + expected} bytes")


def _check_shape(part: Path, kind: str, url: str) -> None:
    """Reject a body that is not a LaMP file of the expected kind (an HTML error page, say) and delete it.

    Only the outline is checked here; `load_users` validates every field, and a file with a bad item is better
    kept, with that error naming the item, than thrown away.
    """
    def reject(why: str) -> DownloadError:
        head = part.read_bytes()[:_SNIPPET].decode("utf-8", "replace")
        part.unlink()
        return DownloadError(f"{url}: {why}, so it was discarded (the response starts {head!r})")

    try:
        with open(part, "rb") as handle:
            doc = json.load(handle)
    except (ValueError, UnicodeDecodeError):
        raise reject("the response is not JSON (an error page?)") from None
    if kind == "questions":
        ok = isinstance(doc, list) and all(isinstance(q, dict) and {"id", "input", "profile"} <= q.keys() for q in doc)
        expected = "a list of questions with id, input and profile"
    else:
        golds = doc.get("golds") if isinstance(doc, dict) else None
        ok = isinstance(golds, list) and all(isinstance(g, dict) and {"id", "output"} <= g.keys() for g in golds)
        expected = 'an object {"task", "golds": [{"id", "output"}]}'
    if not ok:
        raise reject(f"the response is JSON but not {expected}")


def _fetch(url: str, final: Path, kind: str, progress: _Progress, retries: int) -> None:
    """Download `url` to `final` through `final.part`, resuming after interruptions, then move it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    reason: _Interrupted | None = None
    for _ in range(retries):
        try:
            _transfer(url, part, progress)
            reason = None
            break
        except _Interrupted as err:
            reason = err
    if reason is not None:
        kept = f"The partial file {part} is kept; run" if part.exists() else "Run"
        raise DownloadError(f"{url}: the transfer was interrupted {retries} time(s), last: {reason}. {kept} the "
                            f"download again to resume it.")
    _check_shape(part, kind, url)
    os.replace(part, final)


def _files(splits: Iterable[str]) -> list[tuple[str, str]]:
    """(split, kind) pairs to fetch; the test split's outputs are not public."""
    return [(split, kind) for split in splits for kind in ("questions", "outputs")
            if not (split == "test" and kind == "outputs")]


def download_task(task: str | Task, splits: Iterable[str] = ("train", "dev"), variant: str = "user",
                  cache_dir: str | Path | None = None, base_url: str = OFFICIAL_BASE, progress: bool = True,
                  retries: int = 3) -> Path:
    """Fetch one task's official files and return the folder to pass to `load_users(..., data_dir=...)`.

    Files already present whose sha256 matches the manifest are skipped. A transfer that drops is resumed from its
    `.part` file up to `retries` times in this call, and the `.part` is kept for the next call if that is not enough.
    """
    resolved = resolve_task(task)
    splits = tuple(splits)
    for split in splits:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if variant not in VARIANTS:
        raise DataError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    if retries < 1:
        raise ValueError(f"retries must be at least 1, got {retries}")
    remote = REMOTE_DIRS.get((resolved.name, variant))
    if remote is None:
        raise DownloadError(f"no official {variant}-based files are known for {resolved.name}")
    files_dir = lamp_cache_dir(variant, cache_dir)
    manifest = files_dir / MANIFEST
    task_dir = resolved.name.replace("-", "_")
    with _Progress(progress) as bars:
        for split, kind in _files(splits):
            key = f"{task_dir}/{split}_{kind}.json"
            url = f"{base_url.rstrip('/')}/{remote}/{split}/{split}_{kind}.json"
            final = files_dir / key
            if _intact(final, _load_manifest(manifest).get(key)):
                bars.note(f"{key} is already downloaded and intact")
                continue
            _fetch(url, final, kind, bars, retries)
            _record(manifest, key, url, final)
    return _data_dir(files_dir, variant)
