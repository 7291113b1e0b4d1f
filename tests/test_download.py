"""Downloading against a local HTTP server that supports Range requests and can misbehave on purpose."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from tailor.data import DataError, DownloadError, load_users
from tailor.data.download import download_task, lamp_cache_dir


class _LaMPServer(ThreadingHTTPServer):
    """Serves `files` (URL path -> bytes) and records (path, Range header) of every request."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.honour_range = True
        self.range_from_zero = False  # answer any Range request with 206 and the whole file
        self.drop_after: dict[str, int] = {}  # path -> bytes to send before hanging up, once

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/LaMP"


class _Handler(BaseHTTPRequestHandler):
    server: _LaMPServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        range_header = self.headers.get("Range")
        self.server.requests.append((self.path, range_header))
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if match and self.server.honour_range:
            start = 0 if self.server.range_from_zero else int(match.group(1))
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        cut = self.server.drop_after.pop(self.path, None)
        self.wfile.write(payload if cut is None else payload[:cut])
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        """Keep test output quiet."""


@pytest.fixture
def server() -> Iterator[_LaMPServer]:
    srv = _LaMPServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _questions(prefix: str, n: int) -> bytes:
    users = [{"id": f"{prefix}{i}", "input": f"What is the score? review: text {i} " + "x" * 200,
              "profile": [{"id": f"{prefix}{i}{j}", "text": f"review {j}", "score": str(1 + j % 5)} for j in range(3)]}
             for i in range(n)]
    return json.dumps(users, indent=1).encode()


def _outputs(task: str, prefix: str, n: int) -> bytes:
    return json.dumps({"task": task, "golds": [{"id": f"{prefix}{i}", "output": "5"} for i in range(n)]}).encode()


def _serve_lamp3(server: _LaMPServer, remote: str = "LaMP_3", splits: tuple[str, ...] = ("train", "dev")) -> None:
    for split in splits:
        server.files[f"/LaMP/{remote}/{split}/{split}_questions.json"] = _questions(f"3{split[0]}", 6)
        if split != "test":
            server.files[f"/LaMP/{remote}/{split}/{split}_outputs.json"] = _outputs("LaMP_3", f"3{split[0]}", 6)


def _download(server: _LaMPServer, cache: Path, task: str = "LaMP-3", progress: bool = False, **kwargs: object) -> Path:
    return download_task(task, cache_dir=cache, base_url=server.base_url, progress=progress, **kwargs)


def test_files_arrive_and_load(server: _LaMPServer, tmp_path: Path) -> None:
    _serve_lamp3(server)
    data_dir = _download(server, tmp_path)
    assert data_dir == tmp_path / "lamp" / "user"
    for split in ("train", "dev"):
        users = load_users("LaMP-3", split, data_dir)
        assert [u.id for u in users] == [f"3{split[0]}{i}" for i in range(6)]
        assert all(u.queries[0].gold == "5" for u in users)
    assert not list(tmp_path.rglob("*.part")) and not list(tmp_path.rglob("*.tmp"))


def test_manifest_records_sha256_and_skips_intact_files(server: _LaMPServer, tmp_path: Path) -> None:
    _serve_lamp3(server)
    _download(server, tmp_path)
    manifest = json.loads((lamp_cache_dir("user", tmp_path) / "manifest.json").read_text())["files"]
    assert sorted(manifest) == ["LaMP_3/dev_outputs.json", "LaMP_3/dev_questions.json",
                                "LaMP_3/train_outputs.json", "LaMP_3/train_questions.json"]
    entry = manifest["LaMP_3/train_questions.json"]
    body = server.files["/LaMP/LaMP_3/train/train_questions.json"]
    assert entry["sha256"] == hashlib.sha256(body).hexdigest() and entry["bytes"] == len(body)
    assert entry["url"] == f"{server.base_url}/LaMP_3/train/train_questions.json" and entry["time"]

    server.requests.clear()
    _download(server, tmp_path)
    assert server.requests == []

    (tmp_path / "lamp" / "user" / "LaMP_3" / "dev_outputs.json").write_text("{}")
    _download(server, tmp_path)
    assert server.requests == [("/LaMP/LaMP_3/dev/dev_outputs.json", None)]


def test_interrupted_download_resumes_with_range(server: _LaMPServer, tmp_path: Path) -> None:
    _serve_lamp3(server, splits=("dev",))
    path = "/LaMP/LaMP_3/dev/dev_questions.json"
    server.drop_after[path] = 500
    _download(server, tmp_path, splits=("dev",))
    final = tmp_path / "lamp" / "user" / "LaMP_3" / "dev_questions.json"
    assert final.read_bytes() == server.files[path]
    assert [r for r in server.requests if r[0] == path] == [(path, None), (path, "bytes=500-")]


def test_partial_file_is_kept_and_resumed_by_the_next_call(server: _LaMPServer, tmp_path: Path) -> None:
    _serve_lamp3(server, splits=("dev",))
    path = "/LaMP/LaMP_3/dev/dev_questions.json"
    server.drop_after[path] = 300
    with pytest.raises(DownloadError, match="run the download again to resume"):
        _download(server, tmp_path, splits=("dev",), retries=1)
    part = tmp_path / "lamp" / "user" / "LaMP_3" / "dev_questions.json.part"
    assert part.read_bytes() == server.files[path][:300]
    assert not part.with_suffix("").exists()

    _download(server, tmp_path, splits=("dev",))
    assert part.with_suffix("").read_bytes() == server.files[path] and not part.exists()
    assert [r for r in server.requests if r[0] == path] == [(path, None), (path, "bytes=300-")]


def test_server_ignoring_range_restarts(server: _LaMPServer, tmp_path: Path) -> None:
    _serve_lamp3(server, splits=("test",))
    path = "/LaMP/LaMP_3/test/test_questions.json"
    part = tmp_path / "lamp" / "user" / "LaMP_3" / "test_questions.json.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"stale bytes from an older file")
    server.honour_range = False
    data_dir = _download(server, tmp_path, splits=("test",))
    assert part.with_suffix("").read_bytes() == server.files[path]
    assert server.requests == [(path, "bytes=30-")]
    assert all(u.queries[0].gold is None for u in load_users("LaMP-3", "test", data_dir))


def test_wrong_range_in_answer_starts_over(server: _LaMPServer, tmp_path: Path) -> None:
    _serve_lamp3(server, splits=("test",))
    path = "/LaMP/LaMP_3/test/test_questions.json"
    part = tmp_path / "lamp" / "user" / "LaMP_3" / "test_questions.json.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(server.files[path][:100])
    server.range_from_zero = True
    _download(server, tmp_path, splits=("test",))
    assert part.with_suffix("").read_bytes() == server.files[path]
    assert server.requests == [(path, "bytes=100-"), (path, None)]


def test_unresumable_part_starts_over(server: _LaMPServer, tmp_path: Path) -> None:
    _serve_lamp3(server, splits=("test",))
    body = server.files["/LaMP/LaMP_3/test/test_questions.json"]
    part = tmp_path / "lamp" / "user" / "LaMP_3" / "test_questions.json.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(body + b"junk")
    _download(server, tmp_path, splits=("test",))
    assert part.with_suffix("").read_bytes() == body


def test_html_error_page_is_rejected(server: _LaMPServer, tmp_path: Path) -> None:
    _serve_lamp3(server, splits=("dev",))
    server.files["/LaMP/LaMP_3/dev/dev_questions.json"] = b"<!DOCTYPE html><html><body>Maintenance</body></html>"
    with pytest.raises(DownloadError, match="not JSON .*DOCTYPE"):
        _download(server, tmp_path, splits=("dev",))
    task_dir = tmp_path / "lamp" / "user" / "LaMP_3"
    assert not (task_dir / "dev_questions.json").exists() and not (task_dir / "dev_questions.json.part").exists()


def test_json_of_the_wrong_shape_is_rejected(server: _LaMPServer, tmp_path: Path) -> None:
    _serve_lamp3(server, splits=("dev",))
    server.files["/LaMP/LaMP_3/dev/dev_outputs.json"] = b'{"error": "not found"}'
    with pytest.raises(DownloadError, match="not an object"):
        _download(server, tmp_path, splits=("dev",))
    assert not (tmp_path / "lamp" / "user" / "LaMP_3" / "dev_outputs.json").exists()


def test_unknown_task_or_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown task"):
        download_task("LaMP-6", cache_dir=tmp_path, progress=False)
    with pytest.raises(DataError, match="unknown split"):
        download_task("LaMP-3", splits=("val",), cache_dir=tmp_path, progress=False)


def test_http_error_is_reported(server: _LaMPServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404 .*no such file"):
        _download(server, tmp_path, splits=("dev",))


def test_unreachable_host_mentions_internet(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DownloadError, match="cannot reach 127.0.0.1.*no internet"):
        download_task("LaMP-3", cache_dir=tmp_path, base_url=f"http://127.0.0.1:{port}/LaMP", progress=False)


def test_lamp2_movies_time_variant(server: _LaMPServer, tmp_path: Path) -> None:
    question = {"id": 1, "input": "Which tag? description: film",
                "profile": [{"id": 10, "description": "a film", "tag": "comedy", "date": "2001-01-01"}]}
    server.files["/LaMP/time/LaMP_2/new/dev/dev_questions.json"] = json.dumps([question]).encode()
    server.files["/LaMP/time/LaMP_2/new/dev/dev_outputs.json"] = json.dumps(
        {"task": "LaMP_2", "golds": [{"id": 1, "output": "classic"}]}).encode()
    data_dir = _download(server, tmp_path, task="lamp2m", splits=("dev",), variant="time", progress=True)
    assert (tmp_path / "lamp" / "time" / "LaMP_2M" / "dev_questions.json").is_file()
    [user] = load_users("LaMP-2M", "dev", data_dir, variant="time")
    assert user.id == "1" and user.queries[0].gold == "classic" and user.profile[0].date == "2001-01-01"


def test_cache_dir_from_env(server: _LaMPServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    _serve_lamp3(server, splits=("dev",))
    data_dir = download_task("LaMP-3", splits=("dev",), base_url=server.base_url, progress=False)
    assert data_dir == tmp_path / "cache" / "lamp" / "user"
