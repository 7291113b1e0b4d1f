"""Weight-space baselines (MT-LoRA, LoRA-P, OPPU, StyleVector) beside the priors, non-personalized and RAG, on every
dev user of each task, plus what they cost: per-user training time, adapter size, mixed-adapter throughput.

Each configuration is one `tailor eval` command, run as written (so the command beside a number is the command that
made it); runs resume, and the reference rows use the folders and labels of benchmarks/baselines.py, so a reference
already run there is not run again. Output: one markdown section per task (`tailor report`'s table with CIs and
paired significance against non-personalized, the per-user cost table, the commands) and a throughput section.

    .venv/bin/python -m benchmarks.lora_family --out runs/bench --report runs/bench/lora_family.md

`--in-process` runs the same specs through `run_eval` in this process instead of the CLI (quick checks on a few
users without a process per run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.common import BASELINE, add_device_options, chosen, device_flags, machine, publish, section, slug
from benchmarks.common import run as run_command
from tailor.backbone.defaults import DEFAULT_MODEL
from tailor.backbone.layers import Site
from tailor.backbone.lora import LoRAStack, lora_sites, save_peft
from tailor.backbone.model import Backbone
from tailor.cli._options import parse_options  # `--set KEY=VALUE`, cast exactly as `tailor eval` casts it
from tailor.eval.runner import run_eval
from tailor.runs.spec import EvalSpec
from tailor.store.state import UserState
from tailor.tasks import get_task


@dataclass(frozen=True)
class Run:
    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)

    def args(self) -> str:
        parts = [f"--method {self.method}"]
        for key, value in self.options.items():
            parts.append(f"--k {value}" if key == "k" else f"--set {key}={value}")
        return " ".join(parts)


PLAN = [
    Run("user prior", "user-prior"),
    Run("non-personalized", "none"),
    Run("RAG k=1", "rag", {"k": 1}),
    Run("RAG k=4", "rag", {"k": 4}),
    Run("MT-LoRA", "mt-lora"),
    Run("LoRA-P", "lora-p"),
    Run("OPPU", "oppu"),
    Run("StyleVector", "stylevector"),
]
TRAINED = ("lora-p", "oppu")
def config_fields(method: str) -> set[str]:
    from dataclasses import fields

    from tailor.methods import method_class

    return {f.name for f in fields(method_class(method).config_class)}


def with_overrides(run: Run, overrides: dict[str, Any]) -> Run:
    """The run with the `--set` options its method has (e.g. a smaller fit for a quick check)."""
    known = config_fields(run.method)
    return Run(run.label, run.method, {**run.options, **{k: v for k, v in overrides.items() if k in known}})


def build(run: Run, task: str, backbone: Backbone | None):
    """The method a `tailor eval` of this run builds."""
    from tailor.methods import build_method

    return build_method(run.method, get_task(task), backbone, **run.options)


def execute(task: str, run: Run, args: argparse.Namespace, backbone: Callable[[], Backbone]) -> tuple[Path, str]:
    """Run one configuration as its `tailor eval` command, or (`--in-process`) through run_eval with the same spec."""
    if not args.in_process:
        return run_command(run.label, task, run.args(), args.out, args.model, args.users, device=args.device,
                           dtype=args.dtype)
    folder = args.out / args.model / task / slug(run.label)
    text = (f"tailor eval --task {task} {run.args()} --model {args.model} {device_flags(args.device, args.dtype)} "
            "--seed 0 "
            + (f"--users {args.users} " if args.users else "") + f"--out {folder} --label '{run.label}'")
    print(f"$ {text}", file=sys.stderr, flush=True)
    needs = run.method not in ("user-prior", "global-prior")
    spec = EvalSpec(task=task, method=run.method, options=dict(run.options), model=args.model if needs else None,
                    device=args.device, dtype=args.dtype, users=args.users, seed=0, label=run.label)
    run_eval(spec, folder, method=build(run, task, backbone() if needs else None))
    return folder, text


def cost_table(folders: dict[str, Path]) -> str:
    """Per-user training seconds (mean, p95), examples, trainable parameters and state bytes of the trained runs."""
    lines = ["| method | users | train s/user mean | train s/user p95 | examples/user | steps | trainable params/user "
             "| state bytes/user | PEFT adapter bytes |", "|---|---|---|---|---|---|---|---|---|"]
    for label, folder in folders.items():
        states = [UserState.load(p) for p in sorted((folder / "states").glob("*.safetensors"))]
        if not states:
            continue
        seconds = [float(s.header["train_s"]) for s in states]
        params = [sum(t.numel() for n, t in s.tensors.items() if ".lora_" in n) for s in states]
        peft_bytes = sum(p.stat().st_size for p in (folder / "peft-example").glob("*")) \
            if (folder / "peft-example").exists() else 0
        examples = statistics.mean(s.header["examples"] for s in states)
        nbytes = statistics.mean(s.nbytes for s in states)
        steps = states[0].header["steps"]
        lines.append(f"| {label} | {len(states)} | {statistics.mean(seconds):.1f} | {np.percentile(seconds, 95):.1f} "
                     f"| {examples:.1f} | {steps} | {params[0]:,} | {nbytes:,.0f} | {peft_bytes:,} |")
    return "\n".join(lines)


def export_example(task: str, run: Run, folder: Path, backbone: Backbone) -> None:
    """One user's adapter exported in PEFT's format, to report its size on disk."""
    first = next(iter(sorted((folder / "states").glob("*.safetensors"))), None)
    if first is None or (folder / "peft-example").exists():
        return
    method = build(run, task, backbone)
    if method.fits:
        from tailor.data.lamp import load_users
        from tailor.runs.fits import fit_method

        fit_method(method, load_users(get_task(task), "train"))
    method.export_peft(UserState.load(first), folder / "peft-example")


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def synchronized(backbone: Backbone, result: object) -> object:
    """`result` once the GPU has finished computing it: a timed forward is its kernels, not only their launch."""
    if backbone.device.type == "cuda":
        torch.cuda.synchronize(backbone.device)
    return result


def throughput(backbone: Backbone, task_name: str, n_users: int = 16, repeats: int = 3) -> str:
    """Label scoring of one batch of `n_users` queries: no adapter, one adapter for all rows, each row its own
    adapter (tailor's per-row LoRA edit, and PEFT's mixed-adapter batch with `adapter_names` for the prefill), and
    the same for StyleVector's per-row vectors."""
    from peft import PeftModel

    from tailor.data.lamp import load_users
    from tailor.methods.stylevector import Steer

    task = get_task(task_name)
    queries = [u.queries[0].input for u in load_users(task, "dev")[:n_users]]
    labels = task.labels or ("yes", "no")
    stack = LoRAStack.init(backbone.model, lora_sites(backbone.model, ["q_proj", "v_proj"]), 8, 8.0,
                           list(range(n_users)))
    generator = torch.Generator().manual_seed(0)
    for site in stack.sites:
        stack.B[site] = torch.randn(stack.B[site].shape, generator=generator) * 0.01
    rows = list(range(len(queries)))
    vectors = torch.randn(len(queries), backbone.hidden_size, generator=generator).to(backbone.device)
    layer = Site("layer", backbone.n_layers // 2)
    placed = stack.to(backbone.device)  # where the backbone is, as a method's adapters are (no copy per forward)
    cases = {
        "no adapter": dict(edits=None, rows=None),
        "one LoRA for all rows": dict(edits=placed.select([0]).edits(), rows=None),
        f"{len(queries)} LoRAs, one per row": dict(edits=placed.edits(), rows=rows),
        "one StyleVector for all rows": dict(edits={layer: Steer(vectors[:1], 1.0, "answer")}, rows=None),
        f"{len(queries)} StyleVectors, one per row": dict(edits={layer: Steer(vectors, 1.0, "answer")}, rows=rows),
    }
    lines = [f"Label scoring of {len(queries)} {task.name} queries ({len(labels)} labels) in one batch, median of "
             f"{repeats}:", "", "| path | seconds | queries/s |", "|---|---|---|"]
    for name, case in cases.items():
        seconds = _median_time(lambda: backbone.score_labels(queries, labels, len(queries), **case), repeats)
        lines.append(f"| tailor: {name} | {seconds:.2f} | {len(queries) / seconds:.1f} |")
    batch = backbone.batch(backbone.prompt_ids(queries))
    with tempfile.TemporaryDirectory() as tmp:
        import copy

        names = []
        model = None
        for u in range(len(queries)):
            folder = save_peft(stack, backbone.model, Path(tmp) / f"u{u}", user=u)
            if model is None:
                model = PeftModel.from_pretrained(copy.deepcopy(backbone.model), folder, adapter_name=f"u{u}")
            else:
                model.load_adapter(str(folder), adapter_name=f"u{u}")
            names.append(f"u{u}")
        assert model is not None
        model.eval()

        def prefill(adapter_names: list[str] | None) -> object:
            with torch.inference_mode():
                extra = {"adapter_names": adapter_names} if adapter_names else {}
                out = model(input_ids=batch.ids.to(backbone.device), attention_mask=batch.mask.to(backbone.device),
                            position_ids=batch.positions.to(backbone.device), logits_to_keep=1, **extra)
            return synchronized(backbone, out)

        one = _median_time(lambda: prefill(["u0"] * len(queries)), repeats)
        mixed = _median_time(lambda: prefill(names), repeats)
    lines += ["", f"Prefill forward only ({len(queries)} × {batch.ids.shape[1]} tokens), tailor vs PEFT's "
              "mixed-adapter batch inference:", "", "| path | seconds |", "|---|---|"]

    def tailor_prefill(edits, row_ids) -> object:
        with torch.inference_mode(), backbone._hooks(edits) as hooks:
            return synchronized(backbone, backbone._forward(hooks, batch.ids, batch.mask, batch.positions,
                                                            None if row_ids is None else torch.tensor(row_ids),
                                                            batch.prompt_lengths, logits_to_keep=1))

    for name, case in list(cases.items())[:3]:
        seconds = _median_time(lambda: tailor_prefill(case["edits"], case["rows"]), repeats)
        lines.append(f"| tailor: {name} | {seconds:.2f} |")
    lines.append(f"| PEFT: one adapter for all rows (adapter_names) | {one:.2f} |")
    lines.append(f"| PEFT: {len(queries)} adapters, one per row (adapter_names) | {mixed:.2f} |")
    return "\n".join(lines)


def gold_nll(backbone: Backbone, prompts: list[str], golds: list[str], edits, rows: list[int] | None) -> float:
    """Mean per-token negative log-likelihood of the users' real answers (teacher-forced), the selection criterion:
    one forward per query, smooth where accuracy on a few users is not."""
    from tailor.backbone.edits import hooked

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    losses = []
    with torch.no_grad(), hooked(backbone.model, edits) as hooks:
        for start in range(0, len(order), 8):
            index = order[start:start + 8]
            batch = backbone.sft_batch([prompts[i] for i in index], [golds[i] for i in index])
            part = None if rows is None else torch.tensor([rows[i] for i in index])
            losses.extend(backbone.sft_loss(batch, hooks, part, reduction="per_row").tolist())
    return float(np.mean(losses))


def stylevector_search(backbone: Backbone, tasks: list[str], n_users: int, layers: list[int],
                       scales: list[float]) -> str:
    """Pick StyleVector's layer, scale and positions on TRAINING users only: each user's vector from their history,
    scored by the NLL of their own held-out query answer under steering (lower is better)."""
    from tailor.data.lamp import load_users
    from tailor.data.splits import subset
    from tailor.methods.stylevector import Steer, StyleVector

    lines = ["| task | users | no steering | " + " | ".join(f"L{layer} ×{s}" for layer in layers for s in scales)
             + " | best | best, every token |", "|---" * (len(layers) * len(scales) + 5) + "|"]
    for name in tasks:
        task = get_task(name)
        users = subset(load_users(task, "train"), n_users, 0)
        method = StyleVector(task, backbone, layer=layers[0], max_items=16)
        contrast = method.contrast(users, [Site("layer", layer) for layer in layers])
        prompts = [u.queries[0].input for u in users]
        golds = [u.queries[0].gold or "" for u in users]
        rows = list(range(len(users)))
        plain = gold_nll(backbone, prompts, golds, None, None)
        results = {}
        for i, layer in enumerate(layers):
            vectors = torch.stack([h_u[:, i].mean(0) - h_m[:, i].mean(0) if len(h_u) else
                                   torch.zeros(backbone.hidden_size) for h_u, h_m, _ in contrast]).to(backbone.device)
            for scale in scales:
                edits = {Site("layer", layer): Steer(vectors, scale, "answer")}
                results[(layer, scale)] = (gold_nll(backbone, prompts, golds, edits, rows), vectors)
        best = min(results, key=lambda key: results[key][0])
        every = gold_nll(backbone, prompts, golds, {Site("layer", best[0]): Steer(results[best][1], best[1], "all")},
                         rows)
        cells = " | ".join(f"{results[(layer, s)][0]:.3f}" for layer in layers for s in scales)
        lines.append(f"| {task.name} | {len(users)} | {plain:.3f} | {cells} | L{best[0]} ×{best[1]} | {every:.3f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", nargs="+", default=["lamp2n", "lamp2m", "lamp3", "lamp4", "lamp7"])
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--users", type=int, default=None, help="default: every dev user")
    parser.add_argument("--only", nargs="*", default=None,
                        help="labels to run (default: the whole plan); the baseline row is always included")
    parser.add_argument("--throughput-task", default="lamp2n")
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--in-process", action="store_true", help="run_eval here instead of `tailor eval`")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="method options for every run whose method has them (quick checks only)")
    parser.add_argument("--report", type=Path, default=None, help="write the markdown here (default: stdout)")
    parser.add_argument("--search-stylevector", type=int, default=0, metavar="USERS",
                        help="instead of the benchmark: pick StyleVector's layer and scale on this many training users")
    add_device_options(parser)
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9, 12, 15, 18, 21, 24])
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("TAILOR_THREADS", os.cpu_count() or 1)))  # as `tailor eval` does
    overrides = parse_options(args.overrides)
    loaded: list[Backbone] = []

    def backbone() -> Backbone:
        if not loaded:
            loaded.append(Backbone.load(args.model, device=args.device, dtype=args.dtype))
        return loaded[0]

    if args.search_stylevector:
        print(stylevector_search(backbone(), args.tasks, args.search_stylevector, args.layers, args.scales))
        return
    sections = [f"Machine: {machine(args.device, args.dtype)}. Model: {args.model}. Data: ../shared/lamp dev split, "
                f"{'all' if args.users is None else args.users} users, seed 0.\n"]
    for name in args.tasks:
        task = get_task(name)
        runs, trained = [], {}
        for run in PLAN:
            if not chosen(run.label, args.only):
                continue
            run = with_overrides(run, overrides)
            folder, text = execute(name, run, args, backbone)
            runs.append((folder, text))
            if run.method in TRAINED:
                export_example(name, run, folder, backbone())
                trained[run.label] = folder
        text = section(name, runs, BASELINE, args.out / args.model / name, f"{task.name}, LoRA family")
        costs = f"Per-user training cost ({task.name}):\n\n{cost_table(trained)}\n" if trained else ""
        sections.append(f"{text}\n{costs}")
    if not args.no_throughput:
        sections.append(f"### Mixed-adapter throughput\n\n{throughput(backbone(), args.throughput_task)}\n")
    text = "\n".join(sections)
    publish(text, args.report)


if __name__ == "__main__":
    main()
