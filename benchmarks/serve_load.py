"""Load test of `tailor serve` on loopback: many users, concurrent clients, personalized methods beside the
non-personalized model on the same backbone and the same server code path; optionally through the OpenAI-compatible
API while personalize jobs run.

    .venv/bin/python -m benchmarks.serve_load --model smollm2-135m --task lamp2n --users 100 --requests 1000 \
        --concurrency 16 --method none --method chameleon:history_in_prompt=false --method perfit --out runs/serve-load

    .venv/bin/python -m benchmarks.serve_load --api chat --train-users 8 --model smollm2-135m --task lamp2n \
        --users 100 --requests 1000 --concurrency 16 --method lora-p --out runs/serve-train

For each method: start a server on 127.0.0.1 with a fresh store, add the users' history over HTTP, personalize them
all (background jobs, timed but not part of the load), send a few warm-up requests, then `--requests` calls of one
(user, query) pair each from `--concurrency` clients (`--api predict`: /v1/predict; `--api chat`: /v1/chat/completions
with the user as `user` and the query as the user message), users in a seeded random order so that concurrent calls
mix users. With `--train-users N`, the same calls are then sent again while personalize jobs run: N of the users get
one new history item each (a copy of their last one under a new id) and a personalize job, again as each job ends,
so their states are stale, and answered stale, while the worker process trains (`--jobs-in-flight` jobs queued or
running at a time). Reported per phase ("idle", "training"): errors (any non-200 or transport error), p50/p99
latency, throughput, the server's mean batch size, throughput relative to `none`; for the training phase also the
jobs finished during it, the share of polls that found a job running, and its p99 over the idle p99. Results go to
OUT/serve_load.json (rewritten after each method, so the same command resumes after a kill and measures only the
methods it lacks) and OUT/serve_load.md. Only loopback is used, and every loop is bounded by a count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import httpx

from benchmarks.common import add_device_options, machine
from tailor.atomic import write_text
from tailor.data.lamp import load_users
from tailor.store.store import Store
from tailor.tasks import get_task
from tailor.tasks.records import User


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_spec(spec: str) -> tuple[str, list[str]]:
    """"perfit:layers=0,1,k=1" -> ("perfit", ["--set", "layers=0,1", "--set", "k=1"]): a comma starts a new option
    only when a `key=` follows it, so values may hold commas."""
    name, _, options = spec.partition(":")
    sets = [part for option in re.split(r",(?=\w+=)", options) if option for part in ("--set", option)]
    return name, sets


def pool(task: str, count: int, data_dir: str | None) -> list[User]:
    """The first `count` users with history and a query: dev users first, then training users."""
    users = [u for split in ("dev", "train") for u in load_users(task, split, data_dir) if u.profile and u.queries]
    if len(users) < count:
        raise SystemExit(f"only {len(users)} users with history in {task} dev+train, asked for {count}")
    return users[:count]


class ServerProcess:
    def __init__(self, command: list[str], log: Path, env: dict[str, str]):
        self.log = log
        with log.open("w") as sink:
            self.process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"server exited with {self.process.returncode}; see {self.log}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.5)
        self.stop()
        raise SystemExit(f"server not ready after {timeout:.0f} s; see {self.log}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def setup_users(api: httpx.Client, users: list[User], personalize_timeout: float,
                history_items: int | None = None) -> float:
    """Add every user's history (its last `history_items` items, as the data file lists them, when given),
    personalize all of them, and return the personalize wall time."""
    for user in users:
        items = [item.to_json() for item in user.profile[-history_items if history_items else 0:]]
        for start in range(0, len(items), 1000):
            api.post(f"/v1/users/{user.id}/history", json={"items": items[start:start + 1000]}).raise_for_status()
    started = time.perf_counter()
    jobs = [api.post(f"/v1/users/{u.id}/personalize").json() for u in users]
    deadline = time.monotonic() + personalize_timeout
    pending = {job["job_id"] for job in jobs}
    while pending and time.monotonic() < deadline:
        time.sleep(1.0)
        for job_id in sorted(pending):
            job = api.get(f"/v1/jobs/{job_id}").json()
            if job["status"] == "done":
                pending.discard(job_id)
            elif job["status"] not in ("queued", "running"):
                raise SystemExit(f"personalize job {job_id} of user {job['user_id']}: {job['status']} "
                                 f"{job.get('error')}")
    if pending:
        raise SystemExit(f"{len(pending)} personalize jobs unfinished after {personalize_timeout:.0f} s")
    return time.perf_counter() - started


Call = Callable[[str, str], tuple[str, dict]]
"""(user, query) -> (path, JSON body) of one call."""


def predict_call(user_id: str, query: str) -> tuple[str, dict]:
    return "/v1/predict", {"requests": [{"user_id": user_id, "query": query}]}


def chat_call(user_id: str, query: str) -> tuple[str, dict]:
    """The same question through the OpenAI-compatible API of the single-flag server (its deployment: `default`)."""
    return "/v1/chat/completions", {"model": "default", "user": user_id,
                                    "messages": [{"role": "user", "content": query}]}


CALLS: dict[str, Call] = {"predict": predict_call, "chat": chat_call}


async def load(url: str, key: str, plan: list[tuple[str, str]], concurrency: int, timeout: float,
               call: Call) -> tuple[list[float], dict[str, int], float]:
    """Send every (user, query) of `plan` as one call from `concurrency` clients: latencies, errors, wall."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    cursor = iter(range(len(plan)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=timeout) as api:
        async def client() -> None:
            for index in cursor:
                path, body = call(*plan[index])
                started = time.perf_counter()
                try:
                    response = await api.post(path, json=body)
                    outcome = "ok" if response.status_code == 200 else str(response.status_code)
                except httpx.TransportError as error:
                    outcome = type(error).__name__
                if outcome == "ok":
                    latencies.append(time.perf_counter() - started)
                else:
                    errors[outcome] = errors.get(outcome, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return latencies, errors, wall


async def keep_training(url: str, key: str, users: list[User], in_flight: int, started: asyncio.Event,
                        stop: asyncio.Event, poll_s: float = 0.5) -> dict[str, float]:
    """Keep `in_flight` personalize jobs queued or running until `stop`: each follows one new history item of a user
    (a copy of their last item under a new id). `started` is set once the worker runs one. Returns the jobs posted
    and finished, and the share of polls that found a job running."""
    jobs: dict[str, str] = {}
    posted, done, failed, polls, busy = 0, 0, 0, 0, 0
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as api:
        while not stop.is_set():
            running = 0
            for job_id in list(jobs):
                status = (await api.get(f"/v1/jobs/{job_id}")).json()["status"]
                running += status == "running"
                if status not in ("queued", "running"):
                    del jobs[job_id]
                    done += status == "done"
                    failed += status != "done"
            if running:
                started.set()
            polls += 1
            busy += running > 0
            free = [u for u in users if u.id not in jobs.values()]
            for user in free[:max(in_flight - len(jobs), 0)]:
                item = {**user.profile[-1].to_json(), "id": f"bench-{posted}"}
                (await api.post(f"/v1/users/{user.id}/history", json={"items": [item]})).raise_for_status()
                job = (await api.post(f"/v1/users/{user.id}/personalize")).json()
                jobs[job["job_id"]] = user.id
                posted += 1
            try:
                await asyncio.wait_for(stop.wait(), poll_s)
            except asyncio.TimeoutError:
                pass
    return {"jobs_posted": posted, "jobs_done": done, "jobs_failed": failed, "worker_busy": busy / max(polls, 1)}


async def load_while_training(url: str, key: str, plan: list[tuple[str, str]], args: argparse.Namespace,
                              trainees: list[User]) -> tuple[list[float], dict[str, int], float, dict[str, float]]:
    """`load` once the worker runs a personalize job, with jobs kept running until it ends."""
    started, stop = asyncio.Event(), asyncio.Event()
    training = asyncio.create_task(keep_training(url, key, trainees, args.jobs_in_flight, started, stop))
    try:
        await asyncio.wait_for(started.wait(), args.start_timeout)
        latencies, errors, wall = await load(url, key, plan, args.concurrency, args.timeout, CALLS[args.api])
    finally:
        stop.set()
    return latencies, errors, wall, await training


def phase(name: str, latencies: list[float], errors: dict[str, int], wall: float, batching: tuple[dict, dict]) -> dict:
    before, after = batching
    batches = after["batches"] - before["batches"]
    return {"phase": name, "errors": sum(errors.values()), "error_kinds": errors,
            "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99),
            "mean_ms": 1000 * statistics.fmean(latencies or [0.0]), "throughput_rps": len(latencies) / wall,
            "wall_s": wall, "mean_batch": (after["rows"] - before["rows"]) / batches if batches else 0.0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))] if ordered else float("nan")


def run_method(spec: str, args: argparse.Namespace, users: list[User]) -> list[dict]:
    """The method's phases: "idle", then "training" with `--train-users`."""
    name, sets = parse_spec(spec)
    folder = args.out / spec.replace(":", "-").replace(",", "-").replace("=", "")
    folder.mkdir(parents=True, exist_ok=True)
    store_dir = folder / "store"
    if store_dir.exists():  # a method the test did not finish: a load test starts from an empty store
        shutil.rmtree(store_dir)
    key = Store(store_dir).create_tenant("load")[1]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "tailor.cli", "serve", "--store", str(store_dir), "--method", name, "--task",
               args.task, "--model", args.model, "--host", "127.0.0.1", "--port", str(port), "--max-batch",
               str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--device", args.device, "--dtype",
               args.dtype, "--worker-threads", str(args.worker_threads), "--access-log", "", *sets,
               *(["--data-dir", args.data_dir] if args.data_dir else [])]
    print("$ TAILOR_THREADS=%d %s" % (args.threads, shlex.join(command)), file=sys.stderr, flush=True)
    server = ServerProcess(command, folder / "server.log", {**os.environ, "TAILOR_THREADS": str(args.threads)})
    phases = []
    try:
        server.wait_ready(url, args.start_timeout)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=args.timeout) as api:
            personalize_s = setup_users(api, users, args.personalize_timeout, args.history_items)
            rng = random.Random(args.seed)
            plan = [(u.id, u.queries[0].input) for u in rng.choices(users, k=args.requests)]
            call = CALLS[args.api]
            for user_id, query in plan[:args.warmup]:
                path, body = call(user_id, query)
                api.post(path, json=body).raise_for_status()

            def batching() -> dict:
                return api.get("/v1/info").json()["batching"]

            before = batching()
            latencies, errors, wall = asyncio.run(load(url, key, plan, args.concurrency, args.timeout, call))
            phases.append(phase("idle", latencies, errors, wall, (before, batching())))
            if args.train_users:
                before = batching()
                *measured, jobs = asyncio.run(load_while_training(url, key, plan, args, users[:args.train_users]))
                training = phase("training", *measured, (before, batching()))
                phases.append({**training, **jobs, "p99_over_idle": training["p99_ms"] / phases[0]["p99_ms"]})
    finally:
        server.stop()
    return [{"method": spec, "users": len(users), "requests": len(plan), "concurrency": args.concurrency,
             "personalize_s": personalize_s, "command": shlex.join(command), **p} for p in phases]


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    base = next((r for r in results if r["method"] == "none" and r["phase"] == "idle"), None)
    api = {"predict": "/v1/predict", "chat": "/v1/chat/completions"}[args.api]
    lines = [f"{args.requests} {api} calls (one (user, query) pair each) from {args.concurrency} concurrent "
             f"clients over {args.users} {get_task(args.task).name} users, {args.model}, loopback, "
             f"max batch {args.max_batch}, max wait {args.max_wait_ms} ms, server threads {args.threads}, "
             f"worker threads {args.worker_threads}"
             + (f", each user's last {args.history_items} history items" if args.history_items else "")
             + (f"; training phase: {args.train_users} users retrained, {args.jobs_in_flight} job(s) in flight"
                if args.train_users else "")
             + f". Machine: {machine(args.device, args.dtype)}.", "",
             "| method | phase | errors | p50 ms | p99 ms | throughput req/s | x none | mean batch | personalize all s "
             "| jobs done | worker busy | p99 / idle p99 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        ratio = f"{r['throughput_rps'] / base['throughput_rps']:.2f}" if base and r["phase"] == "idle" else "-"
        training = (f"{r['jobs_done']} | {100 * r['worker_busy']:.0f}% | {r['p99_over_idle']:.2f}"
                    if r["phase"] == "training" else "- | - | -")
        lines.append(f"| {r['method']} | {r['phase']} | {r['errors']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                     f"{r['throughput_rps']:.1f} | {ratio} | {r['mean_batch']:.1f} | {r['personalize_s']:.0f} | "
                     f"{training} |")
    commands = dict.fromkeys(r["command"] for r in results)
    lines += ["", "Servers, as started:", ""] + [f"    TAILOR_THREADS={args.threads} {c}" for c in commands]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="lamp2n")
    parser.add_argument("--method", action="append", help="name or name:key=value,...; repeatable (default: none, "
                        "chameleon:history_in_prompt=false, perfit)")
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--worker-threads", type=int, default=1, help="torch threads of its personalize worker")
    parser.add_argument("--api", choices=sorted(CALLS), default="predict",
                        help="predict: /v1/predict; chat: /v1/chat/completions")
    parser.add_argument("--train-users", type=int, default=0,
                        help="after the idle load, load again while these many users are personalized again")
    parser.add_argument("--jobs-in-flight", type=int, default=1,
                        help="personalize jobs queued or running at a time in the training phase")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per HTTP call")
    parser.add_argument("--start-timeout", type=float, default=1800.0, help="server start, including a first fit")
    parser.add_argument("--personalize-timeout", type=float, default=6 * 3600.0)
    parser.add_argument("--history-items", type=int, default=None,
                        help="add only each user's last N history items (default: all); bounds the personalize "
                             "time of per-user training methods, which is not what this test measures")
    parser.add_argument("--data-dir")
    parser.add_argument("--out", type=Path, default=Path("runs/serve-load"))
    add_device_options(parser)
    args = parser.parse_args()
    specs = args.method or ["none", "chameleon:history_in_prompt=false", "perfit"]
    users = pool(args.task, args.users, args.data_dir)
    raw = args.out / "serve_load.json"
    if args.train_users > len(users) or args.jobs_in_flight > max(args.train_users, 1):
        raise SystemExit("need --jobs-in-flight <= --train-users <= --users")
    setting = {k: getattr(args, k) for k in ("model", "task", "users", "requests", "concurrency", "max_batch",
                                             "max_wait_ms", "threads", "seed", "history_items", "device", "dtype",
                                             "api", "train_users", "jobs_in_flight", "worker_threads")}
    done = json.loads(raw.read_text()) if raw.exists() else {}
    older = {"device": "auto", "dtype": "auto", "api": "predict", "train_users": 0, "jobs_in_flight": 1,
             "worker_threads": 1}  # what files written before these options measured
    if done and {**older, **done.get("setting", {})} != setting:
        raise SystemExit(f"{raw} holds a load test with other settings ({done.get('setting')}): use a new --out")
    kept: dict[str, list[dict]] = {}
    for result in done.get("results", []):
        kept.setdefault(result["method"], []).append({"phase": "idle", **result})
    for spec in specs:
        if spec not in kept:
            kept[spec] = run_method(spec, args, users)
            # after every method, so a killed test keeps what it measured and the same command resumes
            write_text(raw, json.dumps({"setting": setting, "results": [r for rs in kept.values() for r in rs]},
                                       indent=2))
        for result in kept[spec]:
            print(json.dumps(result), file=sys.stderr, flush=True)
    report = markdown([r for spec in specs for r in kept[spec]], args)
    write_text(args.out / "serve_load.md", report)
    print(report)


if __name__ == "__main__":
    main()
