"""Backbone speed: tokens/s of a plain batched forward, label scoring and greedy generation, batch 1 vs 16,
float32 vs bfloat16, on real LaMP-2N dev prompts (the non-personalized prompt).

    .venv/bin/python -m benchmarks.backbone_speed --model smollm2-135m --repeats 3
    .venv/bin/python -m benchmarks.backbone_speed --device cuda

Numbers are medians over repeats, after one warm-up call; the machine should be otherwise idle. The script compares
the two precisions itself, so it takes `--device` but no `--dtype`; on a GPU every timed call ends with a
synchronize, so a time is the kernels' and not only their launch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import add_device_options, machine
from tailor.backbone.model import Backbone
from tailor.data.lamp import load_users
from tailor.tasks import get_task


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    add_device_options(parser, dtype=False)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = get_task("lamp2n")
    prompts = [u.queries[0].input for u in load_users(task, "dev")][:16]
    rows = []
    for dtype in ("float32", "bfloat16"):
        backbone = Backbone.load(args.model, device=args.device, dtype=dtype)
        mean_tokens = sum(len(e) for e in backbone.prompt_ids(prompts)) / len(prompts)
        for batch in (1, 16):
            chosen = prompts[:batch]
            encoded = backbone.prompt_ids(chosen)
            tokens = sum(len(e) for e in encoded)
            padded = backbone.batch(encoded)
            ids, mask, positions = (t.to(backbone.device) for t in (padded.ids, padded.mask, padded.positions))

            def forward() -> None:
                with torch.inference_mode():
                    backbone.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
                if backbone.device.type == "cuda":
                    torch.cuda.synchronize(backbone.device)

            forward_s = timed(forward, args.repeats)
            scoring_s = timed(lambda: backbone.score_labels(chosen, task.labels, batch_size=batch), args.repeats)
            outputs: list[str] = []
            generation_s = timed(lambda: outputs.__setitem__(slice(None), backbone.generate(
                chosen, args.new_tokens, batch_size=batch)), args.repeats)
            generated = sum(min(backbone.count_tokens(o) + 1, args.new_tokens) for o in outputs)
            rows.append((dtype, batch, tokens, tokens / forward_s, tokens / scoring_s, batch / scoring_s,
                         generated / generation_s))
    print(f"Machine: {machine(args.device)}. Model {args.model}, {args.threads} threads, LaMP-2N dev prompts (mean "
          f"{mean_tokens:.0f} tokens), "
          f"at most {args.new_tokens} new tokens per answer (tokens actually generated are counted), "
          f"median of {args.repeats}.\n")
    print("| dtype | batch | prompt tokens | forward tok/s | label scoring prompt tok/s | label scoring prompts/s "
          "(15 labels) | generation new tok/s |")
    print("|---|---|---|---|---|---|---|")
    for dtype, batch, tokens, fwd, score, prompts_s, gen in rows:
        print(f"| {dtype} | {batch} | {tokens} | {fwd:.0f} | {score:.0f} | {prompts_s:.2f} | {gen:.1f} |")


if __name__ == "__main__":
    main()
