"""The HTTP server against a real uvicorn on 127.0.0.1, serving the tiny model: round trip, tenant isolation, every bad
input (duplicate item ids, labels and ratings the task cannot have, a chunked oversize body), stale states answered and
marked, mixed batches answered row by row, answers while a personalize job runs in the worker process, kill -9 during
a personalize, revoked and rotated keys, the access log, metrics, offline docs, PEFT export, schemathesis; and the
micro-batcher on its own."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import torch
import typer
from typer.testing import CliRunner

from tailor.backbone.model import Backbone
from tailor.cli.main import app as tailor_app
from tailor.cli.serve import serve_command as serve
from tailor.data.lamp import load_users
from tailor.methods import build_method
from tailor.methods.perfit import PerFit
from tailor.serve.batcher import MicroBatcher, QueueFull
from tailor.serve.states import StateCache
from tailor.serve.worker import rebuild_reason, update_state
from tailor.store.state import StateError, UserState
from tailor.store.store import Store
from tailor.tasks import get_task
from tailor.tasks.records import HistoryItem, User

pytestmark = pytest.mark.usefixtures("one_thread")

NEWS = get_task("lamp2n")
SLOW_PERFIT = ["--method", "perfit", "--set", "stages=2", "--set", "layers=0,1", "--set", "positions=f1+l2",
               "--set", "rank2=2", "--set", "epochs2=20", "--set", "batch2=4", "--set", "history_tokens=48",
               "--set", "max_target_tokens=8", "--set", "k=1"]
"""PerFit stage 2 only (no fit needed) with 20 epochs: about 0.2 s per history item on the tiny model, so a user with
20 items takes seconds to personalize, long enough to kill the server in the middle, and nothing is test-only."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(store: Path, model_dir: Path, lamp_dir: Path, cache: Path, args: list[str]) -> Server:
    port = free_port()
    log = store.parent / f"server-{port}.log"
    env = {**os.environ, "TAILOR_THREADS": "1", "TAILOR_CACHE": str(cache)}
    command = [sys.executable, "-m", "tailor.cli", "serve", "--store", str(store), "--model", str(model_dir),
               "--data-dir", str(lamp_dir), "--task", "lamp2n", "--host", "127.0.0.1", "--port", str(port),
               "--device", "cpu", "--dtype", "float32", *args]  # where the in-process fixtures it is compared with run
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return Server(process, url, log)
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    pytest.fail(f"server did not come up in 120 s:\n{log.read_text()}")


def client(server: Server, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def items_of(user) -> list[dict]:
    return [item.to_json() for item in user.profile]


def wait_job(api: httpx.Client, job: dict, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while job["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.1)
        job = api.get(f"/v1/jobs/{job['job_id']}").json()
    return job


def assert_error(response: httpx.Response, status: int, code: str, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    for word in words:
        assert word in error["message"], error


@pytest.fixture(scope="module")
def rag(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, lamp_dir: Path) -> Iterator[tuple]:
    """A RAG server with three tenants (keys made before it starts: the store is shared across processes)."""
    root = tmp_path_factory.mktemp("rag")
    store = Store(root / "store")
    keys = {name: store.create_tenant(name)[1] for name in ("acme", "globex", "fuzz")}
    server = start_server(root / "store", tiny_model_dir, lamp_dir, root / "cache", ["--method", "rag",
                                                                                   "--max-query-chars", "2000"])
    yield server, keys, store
    server.stop()


def test_round_trip_history_personalize_predict(rag: tuple, lamp_dir: Path, backbone: Backbone) -> None:
    server, keys, _ = rag
    users = load_users(NEWS, "dev", lamp_dir)[:3]
    with client(server, keys["acme"]) as api:
        for user in users:
            assert api.post(f"/v1/users/{user.id}/history", json={"items": items_of(user)}).status_code == 200
        jobs = [api.post(f"/v1/users/{u.id}/personalize").json() for u in users]
        assert all(wait_job(api, job)["status"] == "done" for job in jobs)
        # one call mixing three users, personalized and not
        rows = [{"user_id": u.id, "query": u.queries[0].input} for u in users]
        rows.append({"user_id": users[0].id, "query": users[0].queries[0].input, "personalized": False})
        response = api.post("/v1/predict", json={"requests": rows})
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert [p["user_id"] for p in predictions] == [r["user_id"] for r in rows]
        assert [p["personalized"] for p in predictions] == [True, True, True, False]

        # each row was answered with its own user's state: the same answers as the method run in this process
        method = build_method("rag", NEWS, backbone, batch_size=16)
        expected = method.predict([(method.personalize(u), u.queries[0]) for u in users])
        none = build_method("none", NEWS, backbone, batch_size=16)
        expected.append(none.predict([(none.personalize(users[0]), users[0].queries[0])])[0])
        for got, want in zip(predictions, expected):
            assert got["text"] == want.text
            assert got["scores"] == pytest.approx(dict(zip(NEWS.labels, want.scores)), abs=2e-3)

        detail = api.get(f"/v1/users/{users[0].id}").json()
        assert detail["items"] == len(users[0].profile) and detail["state"]["method"] == "rag"
        assert not detail["stale"] and len(detail["history"]) == len(users[0].profile)
        assert detail["profile"]["top_outputs"]

        # appending history makes the state stale: answered from the previous state, marked, until personalized
        # again (incrementally, for RAG)
        extra = {"text": "sports extra", "title": "x", "category": "sports"}
        assert api.post(f"/v1/users/{users[0].id}/history", json={"items": [extra]}).json()["stale"]
        stale = api.post("/v1/predict", json={"requests": rows[:1]}).json()["predictions"][0]
        assert stale["stale"] and stale["text"] == predictions[0]["text"]
        job = wait_job(api, api.post(f"/v1/users/{users[0].id}/personalize").json())
        assert (job["status"], job["mode"], job["deployment"]) == ("done", "incremental", "default")
        assert not api.post("/v1/predict", json={"requests": rows[:1]}).json()["predictions"][0]["stale"]

        assert api.delete(f"/v1/users/{users[2].id}").json() == {"user_id": users[2].id, "deleted": True}
        assert_error(api.get(f"/v1/users/{users[2].id}"), 404, "unknown_user")
        assert users[2].id not in {u["user_id"] for u in api.get("/v1/users").json()["users"]}


def test_tenants_cannot_reach_each_others_users(rag: tuple) -> None:
    server, keys, _ = rag
    item = {"text": "private words of acme", "title": "t", "category": "crime"}
    with client(server, keys["acme"]) as acme, client(server, keys["globex"]) as globex:
        assert acme.post("/v1/users/victim/history", json={"items": [item]}).status_code == 200
        job = wait_job(acme, acme.post("/v1/users/victim/personalize").json())
        assert "victim" not in {u["user_id"] for u in globex.get("/v1/users").json()["users"]}
        assert_error(globex.get("/v1/users/victim"), 404, "unknown_user")
        assert_error(globex.post("/v1/users/victim/personalize"), 404, "unknown_user")
        assert_error(globex.post("/v1/predict", json={"requests": [{"user_id": "victim", "query": "q"}]}), 404,
                     "unknown_user")
        assert_error(globex.delete("/v1/users/victim"), 404, "unknown_user")
        assert_error(globex.get(f"/v1/jobs/{job['job_id']}"), 404, "unknown_job")
        # the same id under another tenant is another user
        other = {"text": "globex's own", "title": "t", "category": "sports"}
        assert globex.post("/v1/users/victim/history", json={"items": [other]}).json()["items"] == 1
        mine = acme.get("/v1/users/victim").json()
        assert mine["items"] == 1 and mine["history"][0]["text"] == item["text"] and mine["state"] is not None
        assert globex.get("/v1/users/victim").json()["history"][0]["text"] == other["text"]
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Bearer {keys['acme'][:-2]}xx"},
                    {"Authorization": f"Basic {keys['acme']}"}):
        for method, path in (("GET", "/v1/users"), ("GET", "/v1/users/victim"), ("DELETE", "/v1/users/victim"),
                             ("POST", "/v1/predict")):
            response = httpx.request(method, server.url + path, headers=headers,
                                     json={"requests": [{"user_id": "victim", "query": "q"}]})
            assert_error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer"


def test_every_bad_input_gets_a_clear_json_error(rag: tuple) -> None:
    server, keys, store = rag
    item = {"text": "a b", "title": "t", "category": "sports"}
    with client(server, keys["acme"]) as api:
        assert_error(api.post("/v1/predict", json={"requests": [{"user_id": "ghost", "query": "q"}]}), 404,
                     "unknown_user", "'ghost'")
        api.post("/v1/users/fresh/history", json={"items": [item]})
        assert_error(api.post("/v1/predict", json={"requests": [{"user_id": "fresh", "query": "q"}]}), 409,
                     "not_personalized", "fresh")
        wait_job(api, api.post("/v1/users/fresh/personalize").json())
        api.post("/v1/users/fresh/history", json={"items": [item]})
        answer = api.post("/v1/predict", json={"requests": [{"user_id": "fresh", "query": "q"}]})
        assert answer.status_code == 200 and answer.json()["predictions"][0]["stale"]
        # a mixed batch answers every row it can and says why the others have no answer
        mixed = api.post("/v1/predict", json={"requests": [{"user_id": "ghost", "query": "q"},
                                                          {"user_id": "fresh", "query": "q"},
                                                          {"user_id": "fresh", "query": "q", "personalized": False}]})
        assert mixed.status_code == 200, mixed.text
        ghost, fresh, base = mixed.json()["predictions"]
        assert ghost["text"] is None and ghost["error"]["code"] == "unknown_user"
        assert ghost["error"]["param"] == "requests[0].user_id" and ghost["error"]["type"] == "not_found_error"
        assert fresh["text"] and fresh["stale"] and base["text"] and not base["stale"] and base["error"] is None
        # a damaged state file is refused with the user's name, never answered from
        api.post("/v1/users/damaged/history", json={"items": [item]})
        wait_job(api, api.post("/v1/users/damaged/personalize").json())
        tenant = store.authenticate(keys["acme"])
        state_file = next((store.root / "tenants" / tenant / "users" / "damaged").glob("state-*"))
        state_file.write_bytes(state_file.read_bytes()[:-7])
        assert_error(api.post("/v1/predict", json={"requests": [{"user_id": "damaged", "query": "q"}]}), 409,
                     "state_unusable", "'damaged'", "truncated", "personalize")
        # malformed bodies
        assert_error(api.post("/v1/predict", content=b'{"requests": [', headers={"content-type": "application/json"}),
                     422, "malformed", "JSON")
        assert_error(api.post("/v1/predict", content=b"\xff\xfe\x00", headers={"content-type": "application/json"}),
                     422, "malformed")
        assert_error(api.post("/v1/predict", json={"requests": []}), 422, "malformed", "requests")
        assert_error(api.post("/v1/predict", json={"requests": [{"user_id": "fresh"}]}), 422, "malformed", "query")
        assert_error(api.post("/v1/predict", json={"requests": [{"user_id": "fresh", "query": "q", "x": 1}]}), 422,
                     "malformed", "x")
        assert_error(api.post("/v1/users/fresh/history", json={"items": [{"text": "no title or category"}]}), 422,
                     "malformed", "category")
        assert_error(api.post("/v1/users/fresh/history", json={"items": [{**item, "score": "5"}]}), 422,
                     "malformed", "score")
        # too long
        assert_error(api.post("/v1/predict", json={"requests": [{"user_id": "fresh", "query": "x" * 2001}]}), 413,
                     "too_long", "2001 characters", "2000")
        assert_error(api.post("/v1/predict", json={"requests": [{"user_id": "fresh", "query": "q"}] * 65}), 413,
                     "too_long", "65 requests")
        assert_error(api.post("/v1/users/fresh/history", json={"items": [{**item, "text": "w" * 20001}]}), 413,
                     "too_long", "items[0].text")
        assert_error(api.post("/v1/users/fresh/history", content=b"x" * (8 << 20 | 1),
                              headers={"content-type": "application/json"}), 413, "too_long", "bytes")
        chunks = (b"x" * (1 << 20) for _ in range(20))  # 20 MB without a length: sent chunked
        assert_error(api.post("/v1/users/fresh/history", content=chunks, headers={"content-type": "application/json"}),
                     413, "too_long", "bytes")
        chunked = api.post("/v1/users/fresh/history", content=iter([b'{"items": [', b'{"text": "c", "title": "t", ',
                                                                     b'"category": "crime"}]}']),
                           headers={"content-type": "application/json"})
        assert chunked.status_code == 200 and chunked.json()["added"] == 1  # a small chunked body goes through
        # outputs the task cannot have
        bad_label = api.post("/v1/users/fresh/history", json={"items": [item, {**item, "category": "Sports!"}]})
        assert_error(bad_label, 422, "malformed", "items.1.category", "'sports'")
        assert bad_label.json()["error"]["param"] == "items.1.category"
        # history is idempotent by item id; the same id with other content is a conflict
        with_id = {**item, "id": "article-7"}
        first = api.post("/v1/users/fresh/history", json={"items": [with_id]}).json()
        again = api.post("/v1/users/fresh/history", json={"items": [with_id, with_id]}).json()
        assert (first["added"], again["added"], again["duplicates"]) == (1, 0, ["article-7", "article-7"])
        assert again["items"] == first["items"]
        assert_error(api.post("/v1/users/fresh/history", json={"items": [{**with_id, "text": "other"}]}), 409,
                     "item_conflict", "'article-7'")
        # user ids that try to leave the store, unknown routes and jobs
        assert_error(api.get("/v1/users/.hidden"), 422, "invalid_user_id")
        assert_error(api.post("/v1/users/a%20b/history", json={"items": [item]}), 422, "invalid_user_id")
        assert_error(api.get("/v1/users/..%2F..%2Findex.sqlite"), 404, "not_found")
        assert_error(api.post("/v1/predict", json={"requests": [{"user_id": "../x", "query": "q"}]}), 422,
                     "malformed", "user_id")
        assert_error(api.get("/v1/jobs/0123456789abcdef"), 404, "unknown_job")
        assert_error(api.put("/v1/users/fresh"), 405, "method_not_allowed", "DELETE, GET")


def test_create_tenant_command_prints_a_working_key(rag: tuple) -> None:
    server, _, store = rag
    command = typer.Typer()
    command.command()(serve)
    done = CliRunner().invoke(command, ["--store", str(store.root), "--create-tenant", "newco"])
    assert done.exit_code == 0, done.output
    key = done.stdout.strip()
    assert key.startswith("tailor-") and "shown only this once" in done.stderr
    with client(server, key) as api:
        assert api.get("/v1/users").json() == {"users": []}


def test_web_page_is_served(rag: tuple) -> None:
    server, _, _ = rag
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/predict" in page.text and "Not personalized" in page.text


def test_keys_are_revoked_and_rotated_from_the_command_line(rag: tuple) -> None:
    """A running server refuses a key revoked by `tailor tenants revoke` at the next request, and a rotated key's
    predecessor; the tenant's users stay."""
    server, _, store = rag
    runner, where = CliRunner(), ["--store", str(store.root)]
    key = runner.invoke(tailor_app, ["tenants", "create", "temp", *where]).stdout.strip()
    with client(server, key) as api:
        assert api.post("/v1/users/kept/history", json={"items": [{"text": "a", "title": "t", "category": "food & "
                                                                   "drink"}]}).status_code == 200
    listed = runner.invoke(tailor_app, ["tenants", "list", *where]).stdout
    assert re.search(r"temp\s+[0-9a-f]{12}\s+\S+ \S+\s+active since .*\s1$", listed, re.M), listed
    revoked = runner.invoke(tailor_app, ["tenants", "revoke", "temp", *where])
    assert revoked.exit_code == 0 and "revoked" in revoked.stderr
    with client(server, key) as api:
        assert_error(api.get("/v1/users"), 401, "unauthorized", "revoked")
    assert re.search(r"temp .* revoked ", runner.invoke(tailor_app, ["tenants", "list", *where]).stdout)
    new_key = runner.invoke(tailor_app, ["tenants", "rotate", "temp", *where]).stdout.strip()
    assert new_key.startswith("tailor-") and new_key != key
    with client(server, new_key) as api, client(server, key) as old:
        assert [u["user_id"] for u in api.get("/v1/users").json()["users"]] == ["kept"]
        assert_error(old.get("/v1/users"), 401, "unauthorized")
    unknown = runner.invoke(tailor_app, ["tenants", "revoke", "nobody", *where])
    assert unknown.exit_code != 0


def test_access_log_metrics_and_offline_docs(rag: tuple) -> None:
    server, keys, store = rag
    tenant = store.authenticate(keys["acme"])
    with client(server, keys["acme"]) as api:
        api.get("/v1/users/nobody-here")
    lines = server.log.read_text().splitlines()
    pattern = rf"^\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{3}}Z tenant={tenant} GET /v1/users/nobody-here 404 \d+\.\dms$"
    assert any(re.match(pattern, line) for line in lines), lines[-5:]
    assert any(re.match(r".* tenant=- GET /healthz 200 ", line) for line in lines)
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'tailor_http_requests_total{method="GET",route="/v1/users/{user_id}",status="404"}' in text
    assert re.search(r'tailor_http_request_seconds_bucket\{le="0\.005",route="/healthz"\}', text)
    assert 'tailor_queue_rows{backbone="' in text and "tailor_batch_rows_count" in text
    assert re.search(r'tailor_personalize_jobs\{deployment="default",status="done"\} \d', text)
    docs = httpx.get(server.url + "/docs")
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower()
    bundle = httpx.get(server.url + "/docs-assets/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and "SwaggerUIBundle" in bundle.text[:2000]


def test_export_peft_writes_an_adapter_whose_base_is_the_local_model_folder(tmp_path: Path, tiny_model_dir: Path,
                                                                            lamp_dir: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    options = dict(r=4, alpha=8.0, lr=2e-2, train_batch=4, max_examples=6, history_tokens=48, max_target_tokens=8,
                   steps=3)
    store = Store(tmp_path / "store")
    tenant = store.create_tenant("acme")[0]
    user = load_users(NEWS, "dev", lamp_dir)[0]
    store.add_history(tenant, user.id, NEWS.name, user.profile)
    local = Backbone.load(str(tiny_model_dir), device="cpu", dtype="float32")
    method = build_method("lora-p", NEWS, local, **options)
    state = method.personalize(user)
    assert store.save_state(tenant, user.id, state, len(user.profile), slot="news-lora")
    out = tmp_path / "peft"
    done = CliRunner().invoke(tailor_app, ["export-peft", "--store", str(store.root), "--tenant", "acme", "--user",
                                           user.id, "--out", str(out), "--model", str(tiny_model_dir), "--device",
                                           "cpu", "--dtype", "float32", "--data-dir", str(lamp_dir),
                                           *[f"--set={k}={v}" for k, v in options.items()]])
    assert done.exit_code == 0, done.output
    base_path = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base_path) == tiny_model_dir.resolve()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), out)
    prompt = method.prompt(state, user.queries[0].input)
    ours = local.score_labels([prompt], NEWS.labels, edits=method.edits([state]))
    ids = torch.tensor([local.encode(local.render(prompt))])
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
    first = [local.tokenizer(label, add_special_tokens=False)["input_ids"][0] for label in NEWS.labels]
    single = [j for j, label in enumerate(NEWS.labels) if len(local.tokenizer(label, add_special_tokens=False)
                                                                ["input_ids"]) == 1]
    assert single and all(logits[first[j]].item() == pytest.approx(ours[0, j], abs=1e-3) for j in single)
    refused = CliRunner().invoke(tailor_app, ["export-peft", "--store", str(store.root), "--tenant", "acme",
                                              "--user", user.id, "--out", str(tmp_path / "x"), "--deployment", "rag"])
    assert refused.exit_code != 0 and "news-lora" in refused.output


def test_schemathesis_finds_no_server_errors(rag: tuple) -> None:
    server, keys, _ = rag
    executable = Path(sys.executable).parent / "schemathesis"
    if not executable.exists():
        pytest.fail("schemathesis is not installed in this environment: pip install schemathesis")
    done = subprocess.run([str(executable), "run", f"{server.url}/openapi.json", "-H",
                           f"Authorization: Bearer {keys['fuzz']}", "--checks", "all", "--max-examples", "10",
                           "--seed", "7", "--workers", "1"],
                          capture_output=True, text=True, timeout=180, cwd=server.log.parent)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "passed" in done.stdout


def test_kill_9_during_personalize_leaves_the_store_consistent(tmp_path: Path, tiny_model_dir: Path,
                                                                lamp_dir: Path) -> None:
    store = Store(tmp_path / "store")
    key = store.create_tenant("acme")[1]
    tenant = store.authenticate(key)
    args = [*SLOW_PERFIT, "--max-batch", "2", "--max-queue", "4"]
    server = start_server(tmp_path / "store", tiny_model_dir, lamp_dir, tmp_path / "cache", args)
    try:
        def item(i: int) -> dict:
            return {"text": f"sports game number {i} was great", "title": f"t{i}", "category": "sports"}

        with client(server, key) as api:
            api.post("/v1/users/quick/history", json={"items": [item(0), item(1)]})
            api.post("/v1/users/slow/history", json={"items": [item(i) for i in range(20)]})
            assert wait_job(api, api.post("/v1/users/quick/personalize").json())["status"] == "done"
            api.post("/v1/users/quick/history", json={"items": [item(2)]})
            job = wait_job(api, api.post("/v1/users/quick/personalize").json())
            assert (job["status"], job["mode"]) == ("done", "incremental")
            before = store.load_state(tenant, "quick")

            job = api.post("/v1/users/slow/personalize").json()
            while job["status"] == "queued":
                job = api.get(f"/v1/jobs/{job['job_id']}").json()
            assert job["status"] == "running"
            # the job runs in the worker process: answers go on meanwhile, without waiting for it
            statuses = asyncio.run(_concurrent_predicts(server.url, key, "quick", 4))
            assert statuses == [200] * 4, statuses
            assert api.get(f"/v1/jobs/{job['job_id']}").json()["status"] == "running"
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()

        assert store.check() == []
        assert not store.record(tenant, "slow").has_state
        after = store.load_state(tenant, "quick")
        assert after.checksum() == before.checksum() and not store.record(tenant, "quick").stale
        assert store.job(tenant, job["job_id"])["status"] == "running"  # as the killed server left it

        server = start_server(tmp_path / "store", tiny_model_dir, lamp_dir, tmp_path / "cache", args)
        with client(server, key) as api:
            old = api.get(f"/v1/jobs/{job['job_id']}").json()
            assert old["status"] == "interrupted" and "again" in old["error"]
            again = wait_job(api, api.post("/v1/users/slow/personalize").json())
            assert again["job_id"] != job["job_id"] and again["status"] == "done", again
            response = api.post("/v1/predict", json={"requests": [{"user_id": "slow", "query": "article: sports"},
                                                                  {"user_id": "quick", "query": "article: sports"}]})
            assert response.status_code == 200, response.text
        assert store.check() == []
    finally:
        server.stop()


async def _concurrent_predicts(url: str, key: str, user_id: str, count: int) -> list[int | None]:
    """Status of `count` simultaneous predictions (None: still waiting after 5 s)."""
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}) as api:
        async def one() -> int | None:
            try:
                response = await api.post("/v1/predict", json={"requests": [{"user_id": user_id, "query": "q"}]},
                                          timeout=5)
            except httpx.TimeoutException:
                return None
            return response.status_code

        return list(await asyncio.gather(*(one() for _ in range(count))))


# --- the micro-batcher on its own --------------------------------------------------------------------------------

def test_requests_arriving_together_share_one_predict_call() -> None:
    calls: list[list[str]] = []
    batches: list[int] = []

    def run(key: str, rows: list) -> list[str]:
        calls.append([f"{key}:{user}" for user, _ in rows])
        return [f"{user}/{text}" for user, text in rows]

    batcher = MicroBatcher(run, max_batch=8, max_wait_ms=200, max_queue=64, on_batch=batches.append)
    batcher.start()
    try:
        futures = [batcher.submit([("p", (f"u{i}", f"x{i}"))]) for i in range(5)]
        futures.append(batcher.submit([("b", ("u0", "y")), ("p", ("u9", "z"))]))
        answers = [[f.result(10) for f in request] for request in futures]
    finally:
        batcher.stop()
    assert answers == [["u0/x0"], ["u1/x1"], ["u2/x2"], ["u3/x3"], ["u4/x4"], ["u0/y", "u9/z"]]
    assert calls == [["p:u0", "p:u1", "p:u2", "p:u3", "p:u4", "p:u9"], ["b:u0"]]  # one call per key
    assert batcher.stats.batches == 1 and batcher.stats.largest == 7 and batches == [7]


def test_a_full_queue_refuses_and_a_failing_row_fails_alone() -> None:
    release = threading.Event()

    def run(key: str, rows: list) -> list[str]:
        release.wait(10)
        if "boom" in rows:
            raise ValueError("bad state")
        return list(rows)

    batcher = MicroBatcher(run, max_batch=2, max_wait_ms=1, max_queue=4)
    batcher.start()
    try:
        first = batcher.submit([("p", "first")])[0]
        time.sleep(0.2)  # taken by the model thread, which now waits in run()
        queued = [batcher.submit([("p", text)])[0] for text in ["ok0", "boom", "ok2", "ok3"]]
        assert batcher.queued_rows == 4
        with pytest.raises(QueueFull, match="4 rows waiting"):
            batcher.submit([("p", "late")])
        release.set()
        assert first.result(10) == "first"
        with pytest.raises(ValueError, match="bad state"):
            queued[1].result(10)  # it shared a batch with ok0, which is answered all the same
        assert [queued[i].result(10) for i in (0, 2, 3)] == ["ok0", "ok2", "ok3"]
        assert batcher.stats.refused == 1
    finally:
        release.set()
        batcher.stop()


def test_a_state_the_method_cannot_apply_is_refused_when_loaded(tmp_path: Path, backbone: Backbone) -> None:
    """A PerFit state made with another rank (e.g. a server restarted with other --set options) fails on its own at
    load time, naming the user, instead of failing the shared batch it would have joined."""
    options = dict(stages="2", layers="0,1", positions="f1+l2", epochs2=1, history_tokens=48, max_target_tokens=8)
    store = Store(tmp_path / "store")
    tenant = store.create_tenant("acme")[0]
    items = (HistoryItem("i0", {"text": "sports game", "title": "t", "category": "sports"}),)
    store.add_history(tenant, "old-rank", NEWS.name, items)
    store.save_state(tenant, "old-rank", PerFit(NEWS, backbone, rank2=3, **options).personalize(
        User("old-rank", NEWS.name, items)), 1)
    cache = StateCache(store, PerFit(NEWS, backbone, rank2=2, **options))
    with pytest.raises(StateError, match="'old-rank'.*rank=3.*personalize the user again"):
        cache.get(tenant, store.record(tenant, "old-rank"))


def test_methods_that_cannot_update_are_rebuilt_and_say_why(backbone: Backbone, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    chameleon = build_method("chameleon", NEWS, backbone)
    old = UserState("chameleon", 1, "u", backbone.model_id)
    user = User("u", NEWS.name, tuple(HistoryItem(f"i{i}", {"text": f"sports game {i}", "title": f"t{i}",
                                                           "category": "sports"}) for i in range(3)))
    assert update_state(chameleon, old, user, 2) is None
    assert "PCA" in rebuild_reason(chameleon, old)
    assert rebuild_reason(chameleon, None) == "no earlier state"
    rag = build_method("rag", NEWS, backbone)
    update = update_state(rag, rag.personalize(user), user, 2)
    assert update is not None and update.mode == "incremental" and update.reason == rag.update_note
