"""Users per second on 1 and 2 Ray workers (one method per family), the scaling efficiency, and the per-user costs
that docs/scaling.md's cost model takes as inputs. Output: a markdown section for docs/benchmarks/, and the raw numbers.

Each measurement evaluates the same users in a fresh run folder with fresh text and hidden-state caches (so a later
measurement does not reuse what an earlier one generated), while the converted model and the fitted methods are
shared: a fit is done once, before any timing, by a warm-up worker. Worker start-up (process, imports, model load)
is timed apart from the run, which is what a long job amortises. OUT/ray_scaling.json is rewritten after every
measurement; running the same command again keeps those of the same setting and measures only the rest.

    .venv/bin/python -m benchmarks.ray_scaling --task lamp2m --users 100 --out runs/ray-scaling
    .venv/bin/python -m benchmarks.ray_scaling --plan "rag k=4" --plan chameleon --plan perfit --workers 1 2

`--device` and `--dtype` go to every worker's backbone through the spec. Ray hides the GPUs from a worker it gave
none, so on a GPU the workers need `--gpus-per-worker` (a fraction packs several on one GPU); the report names the
device, precision and hardware that the runs themselves recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from benchmarks.common import add_device_options, fresh_cache, machine, slug
from tailor.atomic import write_text
from tailor.backbone.loading import cache_root
from tailor.cli._options import parse_options as parse_set  # `--set KEY=VALUE`, cast exactly as `tailor eval` casts it
from tailor.distributed.ray_runner import RayOptions, WorkerPool, ray_eval, ray_session
from tailor.methods import method_class
from tailor.runs.spec import EvalSpec

DEFAULT_PLAN = ["none", "rag k=4", "chameleon", "perfit"]
"""Prompting (retrieval in the prompt), representation editing (steering directions), trained interventions; the
non-personalized model is the reference that predict overhead is measured against."""


def parse_plan(entry: str) -> tuple[str, dict]:
    """`method [key=value ...]` into the method name and its options."""
    name, *pairs = shlex.split(entry)
    options = parse_set(pairs)
    method_class(name)  # an unknown method fails here, before any cluster starts
    return name, options


def measure(spec: EvalSpec, workers: int, out: Path, chunk_users: int, shared_root: Path, gpus: float = 0.0) -> dict:
    """One timed run on `workers` workers: start-up seconds, run seconds, users per second, the run's metrics."""
    name = f"{slug(spec.label or spec.method)}-w{workers}"
    run_dir = out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    os.environ["TAILOR_CACHE"] = str(fresh_cache(out / "caches" / name, shared_root))  # workers inherit TAILOR_*
    options = RayOptions(workers=workers, gpus=gpus)
    started = time.perf_counter()
    with WorkerPool(spec, options) as pool:
        startup_s = time.perf_counter() - started
        started = time.perf_counter()
        metrics = ray_eval(spec, run_dir, options, chunk_users, pool=pool)
        run_s = time.perf_counter() - started
    files = list((run_dir / "states").glob("*.safetensors"))
    return {"method": spec.label, "workers": workers, "users": metrics["n_users"], "startup_s": round(startup_s, 2),
            "run_s": round(run_s, 2), "users_per_s": round(metrics["n_users"] / run_s, 4), "metrics": metrics,
            "state_file_bytes": round(sum(f.stat().st_size for f in files) / max(len(files), 1)),
            "run_dir": str(run_dir)}


def warm_fit(spec: EvalSpec, shared_root: Path, out: Path, gpus: float = 0.0) -> float:
    """Fit the method once (or load its cached fit) on one worker with every core, so no timed run includes a fit."""
    os.environ["TAILOR_CACHE"] = str(fresh_cache(out / "caches" / "warm-up", shared_root))
    with WorkerPool(spec, RayOptions(workers=1, threads=os.cpu_count() or 1, gpus=gpus)) as pool:
        return pool.fit_s


def report(results: list[dict], fits: dict[str, float], spec_line: str, command: str) -> str:
    lines = ["### Ray scaling: users per second on 1 vs 2 workers\n", spec_line, "",
             "| method | workers | users | worker start-up s | run s | users/s | speed-up | scaling efficiency |",
             "|---|---|---|---|---|---|---|---|"]
    base = {r["method"]: r["users_per_s"] for r in results if r["workers"] == 1}
    for r in results:
        one = base.get(r["method"])
        speedup = f"{r['users_per_s'] / one:.2f}x" if one else "-"
        efficiency = f"{r['users_per_s'] / (one * r['workers']):.0%}" if one else "-"
        lines.append(f"| {r['method']} | {r['workers']} | {r['users']} | {r['startup_s']:.1f} | {r['run_s']:.1f} | "
                     f"{r['users_per_s']:.3f} | {speedup} | {efficiency} |")
    lines += ["", "Scaling efficiency = (users/s on N workers) / (N x users/s on 1 worker). Measured per-user costs "
              "(1-worker runs, one core; the inputs of docs/scaling.md). Predict overhead is the method's predict "
              "time per query minus the non-personalized model's; the state file includes the JSON header (for "
              "prompting methods, the history itself):", "",
              "| method | fit s (or loading the cached fit) | personalize s/user | predict s/query | "
              "predict overhead s/query | state tensor bytes/user | state file bytes/user |", "|---|---|---|---|---|---|---|"]
    singles = [r for r in results if r["workers"] == 1]
    reference = next((r["metrics"]["predict_s_per_query"] for r in singles if r["metrics"]["method"] == "none"), None)
    for r in singles:
        m = r["metrics"]
        overhead = f"{m['predict_s_per_query'] - reference:.3f}" if reference is not None else "-"
        lines.append(f"| {r['method']} | {fits[r['method']]:.1f} | {m['personalize_s_per_user']:.3f} | "
                     f"{m['predict_s_per_query']:.3f} | {overhead} | {m['state_bytes_per_user']} | "
                     f"{r['state_file_bytes']} |")
    lines += ["", "Command:", "", f"    {command}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="lamp2m")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--users", type=int, default=100, help="dev users per run (a seeded sample)")
    parser.add_argument("--plan", action="append", help="'method [key=value ...]', repeatable (default: "
                        + ", ".join(repr(p) for p in DEFAULT_PLAN) + ")")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--chunk-users", type=int, default=8, help="users per chunk (one full predict batch at 8)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/ray-scaling"))
    add_device_options(parser)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0,
                        help="GPUs per Ray worker (Ray's num_gpus); 0: the workers see no GPU and run on the CPU")
    args = parser.parse_args()
    if args.gpus_per_worker == 0 and args.device.startswith("cuda"):
        parser.error(f"--device {args.device} needs --gpus-per-worker: Ray gives a worker without one no GPU")
    command = "python -m benchmarks.ray_scaling " + shlex.join(sys.argv[1:])
    plan = [parse_plan(entry) for entry in args.plan or DEFAULT_PLAN]
    out = args.out.resolve()
    shared_root = cache_root()
    raw = out / "ray_scaling.json"
    setting = {"task": args.task, "model": args.model, "device": args.device, "dtype": args.dtype,
               "gpus_per_worker": args.gpus_per_worker, "users": args.users, "chunk_users": args.chunk_users}
    done = json.loads(raw.read_text()) if raw.exists() else {}
    if done.get("setting") != setting:  # measurements of another setting are not reused
        done = {}
    kept = {(r["method"], r["workers"]): r for r in done.get("results", [])}
    results, fits = [], dict(done.get("fit_s", {}))
    with ray_session(RayOptions(workers=max(args.workers))):
        for (name, options), entry in zip(plan, args.plan or DEFAULT_PLAN):
            spec = EvalSpec(task=args.task, method=name, options=options, model=args.model, device=args.device,
                            dtype=args.dtype, users=args.users, seed=0, label=entry, data_dir=args.data_dir)
            if entry not in fits or any((entry, w) not in kept for w in args.workers):
                fits[entry] = warm_fit(spec, shared_root, out, args.gpus_per_worker)
            for workers in args.workers:
                result = kept.get((entry, workers)) or measure(spec, workers, out, args.chunk_users, shared_root,
                                                               args.gpus_per_worker)
                print(json.dumps({k: v for k, v in result.items() if k != "metrics"}), file=sys.stderr, flush=True)
                results.append(result)
                kept[(entry, workers)] = result
                # after every measurement, so a killed benchmark keeps what it measured and a re-run resumes
                write_text(raw, json.dumps({"setting": setting, "results": list(kept.values()), "fit_s": fits},
                                           indent=1))
    ran_on = sorted({f"{m['device']} ({m['hardware']}) in {m['dtype']}" for m in (r["metrics"] for r in results)
                     if m.get("device")})  # as the workers' runs recorded it
    spec_line = (f"{args.task} dev, {args.users} users (seed 0), {args.model} on {', '.join(ran_on) or 'no backbone'}"
                 f", {args.gpus_per_worker:g} GPUs and 1 torch thread per worker, {args.chunk_users} users per chunk; "
                 f"{machine()}.")
    text = report(results, fits, spec_line, command)
    write_text(out / "ray_scaling.md", text)
    print(text)


if __name__ == "__main__":
    main()
