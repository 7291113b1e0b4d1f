"""Mixed-adapter LoRA inference: tailor's per-row LoRA edit against peft's mixed adapter batches, one forward each.

On the packaged model, 16 LoRA adapters of rank 8 (alpha 16) on q_proj and v_proj of every layer, B drawn at random
so that every adapter changes the logits, and a left-padded batch of 16 real LaMP-2N dev questions (each user's
first query, rendered and tokenised as tailor does: `Backbone.prompt_ids`), row i using adapter i. For the backbone
in float32 and in bfloat16 it times, under torch.inference_mode, the median of `--repeats` calls after one warm-up
(the untimed call that checks the logits), the three cases timed in turns:

1. base: the plain forward of the batch, no adapter (`Backbone._forward` with no hooks), the reference;
2. tailor: the same forward with every adapter's `LoRAEdit` hooked in (`hooked(model, stack.edits())`) and the
   forward context's `rows` set to row i -> adapter i (`LoRAStack`: A (users, r, in), B (users, out, r) per site);
3. peft: the 16 adapters written with `save_peft` and loaded into one `PeftModel` (from_pretrained, then
   load_adapter) over a copy of the same base model, called with `adapter_names` (peft's mixed adapter batches).

Every forward keeps only the last position's logits (`logits_to_keep=1`) and no KV cache. Before timing, the last
logits of (2) and (3) are compared (max |diff|; the run stops when they disagree beyond `--tol-float32` /
`--tol-bfloat16`), and (2) is compared with (1) to show that the adapters matter. tailor keeps its adapters in
float32 on either backbone and adds their product in the backbone's dtype; peft autocasts its adapters to float32
on a bfloat16 base (`autocast_adapter_dtype=True`, its default) and does the same; each dtype's line prints the dtype
peft's lora_A weights were loaded in.

    .venv/bin/python -m benchmarks.mixed_lora --model smollm2-135m --repeats 5

Quick check: `.venv/bin/python -m benchmarks.mixed_lora --repeats 1 --prompts 4`. Numbers want an otherwise idle
machine.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tailor.backbone.device import DTYPES, describe_device, resolve_device
from tailor.backbone.edits import hooked
from tailor.backbone.lora import LoRAStack, lora_sites, save_peft
from tailor.backbone.model import Backbone
from tailor.data.lamp import load_users


def cpu_model() -> str:
    path = Path("/proc/cpuinfo")
    text = path.read_text() if path.exists() else ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                platform.processor() or platform.machine())


def timed(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of `repeats` calls of each case, taken in turns (base, tailor, peft, base, ...) so that a
    machine that slows down or speeds up mid-run affects every case alike. Each case has had its untimed warm-up call
    (the logits check) before."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            started = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def peft_model(base: torch.nn.Module, stack: LoRAStack, folder: Path) -> tuple[torch.nn.Module, list[str]]:
    """All users of `stack` as named adapters a0, a1, ... of one PeftModel over `base` (which peft changes in place)."""
    from peft import PeftModel

    names = [f"a{i}" for i in range(stack.users)]
    for i, name in enumerate(names):
        save_peft(stack, base, folder / name, user=i)
    model = PeftModel.from_pretrained(base, str(folder / names[0]), adapter_name=names[0], is_trainable=False)
    for name in names[1:]:
        model.load_adapter(str(folder / name), adapter_name=name, is_trainable=False)
    return model.eval(), names


def measure(args: argparse.Namespace, dtype_text: str, questions: list[str],
            rows_list: list[int]) -> tuple[dict[str, float], float]:
    """Check tailor's mixed forward against peft's on a backbone in `dtype_text`, then time base, tailor and peft:
    (median seconds per case, max |tailor - peft| last-position logit)."""
    backbone = Backbone.load(args.model, device=args.device, dtype=dtype_text)
    encoded = backbone.prompt_ids(questions)
    batch = backbone.batch(encoded)
    lengths = [len(e) for e in encoded]
    sites = lora_sites(backbone.model, args.targets)
    stack = LoRAStack.init(backbone.model, sites, args.rank, args.alpha, list(range(args.adapters)))
    generator = torch.Generator().manual_seed(0)
    for site in stack.sites:
        stack.B[site] = torch.randn(stack.B[site].shape, generator=generator) * args.b_std
    stack = stack.to(backbone.device)  # float32, where the backbone is (as a method's adapters are)
    edits = stack.edits()
    rows = torch.tensor(rows_list, dtype=torch.long)
    ids, mask, positions = (t.to(backbone.device) for t in (batch.ids, batch.mask, batch.positions))
    with tempfile.TemporaryDirectory() as tmp:
        wrapped, names = peft_model(copy.deepcopy(backbone.model), stack, Path(tmp))
    adapter_names = [names[r] for r in rows_list]
    peft_dtype = {str(p.dtype).removeprefix("torch.") for n, p in wrapped.named_parameters() if "lora_A" in n}

    def base() -> torch.Tensor:
        return backbone._forward(None, batch.ids, batch.mask, batch.positions, None, batch.prompt_lengths,
                                 logits_to_keep=1).logits[:, -1]

    def tailor() -> torch.Tensor:
        with hooked(backbone.model, edits) as hooks:
            return backbone._forward(hooks, batch.ids, batch.mask, batch.positions, rows, batch.prompt_lengths,
                                     logits_to_keep=1).logits[:, -1]

    keep = {"logits_to_keep": 1}

    def peft_forward() -> torch.Tensor:
        out = wrapped(input_ids=ids, attention_mask=mask, position_ids=positions, adapter_names=adapter_names,
                      use_cache=False, **keep)
        return out.logits[:, -1]

    with torch.inference_mode():
        try:
            peft_logits = peft_forward()
        except TypeError:  # a wrapped model without logits_to_keep: computes every position's logits
            keep.clear()
            peft_logits = peft_forward()
        base_logits, tailor_logits = base(), tailor()
        diff = (tailor_logits.float() - peft_logits.float()).abs().max().item()
        effect = (tailor_logits.float() - base_logits.float()).abs().max().item()
        same_top = (tailor_logits.argmax(-1) == peft_logits.argmax(-1)).float().mean().item()
        tolerance = args.tol_float32 if dtype_text == "float32" else args.tol_bfloat16
        print(f"\n{dtype_text}: {len(questions)} prompts, {min(lengths)}-{max(lengths)} tokens "
              f"({sum(lengths)} real, {ids.numel()} padded), {args.adapters} adapters r={args.rank} "
              f"alpha={args.alpha:g} on {'+'.join(args.targets)} x {backbone.n_layers} layers; adapters: tailor "
              f"{str(next(iter(stack.A.values())).dtype).removeprefix('torch.')}, peft "
              f"{'/'.join(sorted(peft_dtype))}; peft logits_to_keep={'1' if keep else 'unsupported (all)'}")
        print(f"  last-position logits: max |tailor - peft| = {diff:.3g} (tolerance {tolerance:g}); "
              f"same argmax on {same_top:.0%} of rows; max |tailor - base| = {effect:.3g} (the adapters' effect)")
        if not diff <= tolerance:
            sys.exit(f"tailor and peft disagree in {dtype_text}: max |diff| {diff:.3g} > {tolerance:g}; not timing")
        if effect <= 10 * diff:
            sys.exit(f"the adapters barely change the logits in {dtype_text} ({effect:.3g}); raise --b-std")
        # The check above was each case's warm-up call.
        times = timed({"base": base, "tailor": tailor, "peft": peft_forward}, args.repeats)
    print("  " + ", ".join(f"{k} {v:.3f} s" for k, v in times.items()), flush=True)
    return times, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else the CPU), cpu, cuda, cuda:N")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES),
                        help="backbone precisions to measure, in turn")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (median), after one warm-up")
    parser.add_argument("--prompts", type=int, default=16, help="batch size: LaMP-2N dev users' first questions")
    parser.add_argument("--adapters", type=int, default=16, help="LoRA adapters; row i uses adapter i mod this")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--b-std", type=float, default=0.02, help="standard deviation of the random B entries")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--tol-float32", type=float, default=1e-3,
                        help="largest |tailor - peft| last-position logit difference accepted in float32")
    parser.add_argument("--tol-bfloat16", type=float, default=0.5,
                        help="the same in bfloat16 (both add a float32 product rounded to bfloat16 at every site, "
                             "in a different order, so a one-ulp difference can grow through the layers)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft
    import transformers

    where = resolve_device(args.device)
    print(f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
          f"device {where} ({describe_device(where)}); Python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, peft {peft.__version__}")

    questions = [user.queries[0].input for user in load_users("lamp2n", "dev")[:args.prompts]]
    if len(questions) < args.prompts:
        sys.exit(f"only {len(questions)} LaMP-2N dev users; asked for {args.prompts} prompts")
    rows_list = [i % args.adapters for i in range(len(questions))]
    results = [(dtype_text, *measure(args, dtype_text, questions, rows_list)) for dtype_text in args.dtypes]

    print(f"\nMedian of {args.repeats} after one warm-up; one forward of {len(questions)} left-padded LaMP-2N dev "
          f"prompts, each row its own LoRA (r={args.rank}, {'+'.join(args.targets)}, every layer), last-position "
          "logits only. Overhead: the mixed forward's time over the base forward's.\n")
    print("| backbone dtype | base forward s | tailor mixed s | peft mixed s | tailor/peft | tailor LoRA overhead "
          "| peft LoRA overhead | max abs logit diff tailor vs peft |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype_text, t, diff in results:
        print(f"| {dtype_text} | {t['base']:.3f} | {t['tailor']:.3f} | {t['peft']:.3f} | {t['tailor'] / t['peft']:.2f} "
              f"| {t['tailor'] / t['base'] - 1:+.0%} | {t['peft'] / t['base'] - 1:+.0%} | {diff:.2g} |")


if __name__ == "__main__":
    main()
