"""Label scoring and greedy generation throughput of the backbone, old path vs new, float32 vs bfloat16, batch 1 and 16.

    .venv/bin/python -m benchmarks.throughput --model smollm2-135m --prompts 32 --repeats 3 --new-tokens 32

Prompts: the first `--prompts` LaMP-2N dev users' queries[0].input, the non-personalized prompt (the question
alone), rendered by the backbone's chat template; labels: LaMP-2N's 15 categories.

- new path: `Backbone.score_labels(prompts, task.labels, batch_size=B)` (the prefix every prompt of a batch shares
  runs once and its KV cache is reused, `_prefill`; all labels' continuation tokens run in one forward with a
  block-causal mask) and `Backbone.generate(prompts, max_new_tokens=N, batch_size=B, stop_at_eos=False)`.
- old path: `reference_score_labels` and `reference_generate` below, the algorithm tailor used before (commit
  e66535e: every prompt run whole, then each label's continuation one label at a time, the cache cropped back after
  each, and the LM head fed a non-contiguous slice of the hidden states), kept here only to measure against.

First a check on `--check-prompts` prompts that both paths give the same label scores (max |diff| of the
log-likelihoods, and whether the best label agrees) and the same generations, per dtype and batch size. Then each
path is timed: median over `--repeats` calls after one warm-up call, for every dtype in `--dtypes` and batch size in
`--batches`. Scoring is reported in prompts/s (each prompt scored against all 15 labels); generation in generated
tokens/s, `--new-tokens` per prompt (stop_at_eos=False in both paths, so both decode exactly that many). Also printed,
per batch size: how much of the prompt tokens a prefix shared by each whole batch covers
(`tailor.backbone.model._common_prefix` over the token ids of each batch `_prefill` receives), and how many prompt
tokens each path's prompt forwards are actually fed (`prompt_work`). Run on an otherwise idle machine; `--threads`
sets torch.set_num_threads.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.cpu_limit import machine_header, timed
from tailor.backbone.device import DTYPES, resolve_device
from tailor.backbone.model import Backbone, _common_prefix, _contiguous_input
from tailor.data.lamp import load_users
from tailor.tasks import get_task


@contextmanager
def sliced_head_input(backbone: Backbone) -> Iterator[None]:
    """The LM head fed the slice of hidden states the forward hands it, as before tailor made that input contiguous
    (`tailor.backbone.model._contiguous_input`): the reference paths below run the model as tailor ran it then."""
    hooks = backbone.model.get_output_embeddings()._forward_pre_hooks
    removed = {k: h for k, h in hooks.items() if h is _contiguous_input}
    for key in removed:
        del hooks[key]
    try:
        yield
    finally:
        hooks.update(removed)


@torch.inference_mode()
def reference_score_labels(backbone: Backbone, prompts: Sequence[str], labels: Sequence[str],
                           batch_size: int) -> np.ndarray:
    with sliced_head_input(backbone):
        return _reference_score_labels(backbone, prompts, labels, batch_size)


@torch.inference_mode()
def reference_generate(backbone: Backbone, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
                       stop_at_eos: bool = True) -> list[str]:
    with sliced_head_input(backbone):
        return _reference_generate(backbone, prompts, max_new_tokens, batch_size, stop_at_eos)


def _reference_score_labels(backbone: Backbone, prompts: Sequence[str], labels: Sequence[str],
                            batch_size: int) -> np.ndarray:
    """The label-scoring path tailor used before prefix reuse and batched label continuations (commit e66535e's
    `Backbone.score_labels`, without edits), kept here only to measure the new path against.

    Prompts are batched by length (`_reference_order`, the old `Backbone._order`) and each batch's prompts run whole
    (left-padded, no shared prefix); every label's first token is read from the
    prompt's last logits, and each label's later tokens run in their own forward over the prompt's KV cache, which
    is cropped back after each label. Returns log-likelihoods, shape (len(prompts), len(labels)).
    """
    label_ids = backbone.label_ids(labels)
    encoded = backbone.prompt_ids(prompts, room=max(len(i) for i in label_ids))
    scores = np.zeros((len(prompts), len(labels)), dtype=np.float64)
    device = backbone.device
    for index in _reference_order([len(e) for e in encoded], batch_size):
        batch = backbone.batch([encoded[i] for i in index])
        out = backbone._forward(None, batch.ids, batch.mask, batch.positions, None, batch.prompt_lengths,
                                logits_to_keep=1, use_cache=True)
        first = F.log_softmax(out.logits[:, -1].float(), dim=-1)
        cache, n = out.cache, len(index)
        for j, lab in enumerate(label_ids):
            total = first[:, lab[0]].clone()
            if len(lab) > 1:
                rest = torch.tensor(lab[:-1]).expand(n, -1)
                mask = torch.cat([batch.mask, torch.ones(n, len(lab) - 1, dtype=batch.mask.dtype)], dim=1)
                pos = batch.prompt_lengths[:, None] + torch.arange(len(lab) - 1)
                step = backbone._forward(None, rest, mask, pos, None, batch.prompt_lengths, cache=cache,
                                         step_mask=torch.ones(n, len(lab) - 1))
                logp = F.log_softmax(step.logits.float(), dim=-1)
                targets = torch.tensor(lab[1:], device=device).expand(n, -1)[..., None]
                total += logp.gather(-1, targets).squeeze(-1).sum(-1)
                cache.crop(-(len(lab) - 1))
            scores[index, j] = total.cpu().numpy()
    return scores


def _reference_generate(backbone: Backbone, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
                        stop_at_eos: bool = True) -> list[str]:
    """The greedy-generation path tailor used before prefix reuse (commit e66535e's `Backbone.generate`, without
    edits), kept here only to measure the new path against: prompts batched by length (`_reference_order`), each
    batch's prompts run whole (left-padded), then one token per step over the KV cache."""
    encoded = backbone.prompt_ids(prompts, room=max_new_tokens)
    outputs: list[str] = [""] * len(prompts)
    device = backbone.device
    eos = torch.tensor(backbone.eos_ids, device=device)
    pad = torch.tensor(backbone.tokenizer.pad_token_id, device=device)
    for index in _reference_order([len(e) for e in encoded], batch_size):
        batch = backbone.batch([encoded[i] for i in index])
        out = backbone._forward(None, batch.ids, batch.mask, batch.positions, None, batch.prompt_lengths,
                                logits_to_keep=1, use_cache=True)
        cache, mask = out.cache, batch.mask.to(device)
        next_pos = batch.prompt_lengths.clone().to(device)
        n = len(index)
        finished = torch.zeros(n, dtype=torch.bool, device=device)
        tokens: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            nxt = torch.where(finished, pad, out.logits[:, -1].argmax(-1))
            tokens.append(nxt)
            finished |= torch.isin(nxt, eos)
            if (stop_at_eos and bool(finished.all())) or len(tokens) == max_new_tokens:
                break
            mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype, device=device)], dim=1)
            out = backbone._forward(None, nxt[:, None], mask, next_pos[:, None], None, batch.prompt_lengths,
                                    cache=cache, step_mask=torch.ones(n, 1))
            next_pos = next_pos + 1
        generated = torch.stack(tokens, dim=1).cpu()
        for row, i in enumerate(index):
            seq = generated[row].tolist()
            cut = next((k for k, t in enumerate(seq) if t in backbone.eos_ids), len(seq))
            outputs[i] = backbone.tokenizer.decode(seq[:cut], skip_special_tokens=True).strip()
    return outputs


def _reference_order(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """The old path's batching (commit e66535e's `Backbone._order`): indices in batches of similar length, longest
    first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def prompt_work(backbone: Backbone, prompts: Sequence[str], labels: Sequence[str], batch_size: int) -> dict:
    """What the prompt phase of both paths runs when scoring `prompts` at `batch_size`.

    Old path: every prompt whole, batched by `_reference_order`. New path: one untimed `Backbone.score_labels` call
    with `_prefill` and `_forward` wrapped on this instance, recording the batches `_prefill` receives and the tokens
    its forwards are fed (real: the mask of the new tokens; padded: the ids tensor's size). For each such batch,
    `_common_prefix` over its token ids (at most its shortest prompt minus one token: every row keeps its last
    token; 0 for a batch of one) gives how many prompt tokens a prefix shared by the whole batch covers."""
    label_ids = backbone.label_ids(labels)
    encoded = backbone.prompt_ids(prompts, room=max(len(i) for i in label_ids))
    old_padded = sum(len(index) * max(len(encoded[i]) for i in index)
                     for index in _reference_order([len(e) for e in encoded], batch_size))
    batches: list[list[list[int]]] = []
    counts = {"real": 0, "padded": 0, "forwards": 0}
    inside = [False]
    original_prefill, original_forward = backbone._prefill, backbone._forward

    def prefill(*args, **kwargs):
        batch = kwargs["encoded"] if "encoded" in kwargs else args[2]
        batches.append([list(e) for e in batch])
        inside[0] = True
        try:
            return original_prefill(*args, **kwargs)
        finally:
            inside[0] = False

    def forward(hooks, ids, mask, *args, **kwargs):
        if inside[0]:
            step_mask = kwargs.get("step_mask")
            counts["real"] += int((step_mask if step_mask is not None else mask).sum())
            counts["padded"] += ids.numel()
            counts["forwards"] += 1
        return original_forward(hooks, ids, mask, *args, **kwargs)

    backbone._prefill, backbone._forward = prefill, forward  # type: ignore[method-assign]
    try:
        backbone.score_labels(prompts, labels, batch_size=batch_size)
    finally:
        del backbone._prefill, backbone._forward
    covered, common = 0, []
    for batch in batches:
        shared = min(_common_prefix(batch), min(len(e) for e in batch) - 1) if len(batch) > 1 else 0
        common.append(shared)
        covered += shared * len(batch)
    return {"batches": len(batches), "tokens": sum(len(e) for e in encoded), "old_padded": old_padded,
            "covered": covered, "common_min": min(common), "common_max": max(common), **counts}


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--prompts", type=int, default=32, help="LaMP-2N dev prompts timed")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls (median), after one warm-up call")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt")
    parser.add_argument("--check-prompts", type=int, default=4, help="prompts in the old-vs-new equality check")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(machine_header(device))
    command = (f".venv/bin/python -m benchmarks.throughput --model {args.model} --device {args.device} "
               f"--dtypes {' '.join(args.dtypes)} --batches {' '.join(map(str, args.batches))} "
               f"--prompts {args.prompts} --repeats {args.repeats} --new-tokens {args.new_tokens} "
               f"--check-prompts {args.check_prompts} --threads {args.threads}")
    print(f"\nCommand: {command}")

    task = get_task("lamp2n")
    users = load_users(task, "dev")
    prompts = [u.queries[0].input for u in users][:args.prompts]
    if len(prompts) < args.prompts:
        raise SystemExit(f"--prompts {args.prompts}: LaMP-2N dev has only {len(prompts)} users")
    check = prompts[:args.check_prompts]
    check_batches = sorted({1, min(max(args.batches), len(check))})

    checks, scoring, generation = [], [], []
    coverage: dict[int, dict] = {}
    for name in args.dtypes:
        backbone = Backbone.load(args.model, device=str(device), dtype=name)
        progress(f"{name}: loaded; checking old vs new on {len(check)} prompts")
        if not coverage:
            coverage = {b: prompt_work(backbone, prompts, task.labels, b) for b in args.batches}
        for b in check_batches:
            old = reference_score_labels(backbone, check, task.labels, b)
            new = backbone.score_labels(check, task.labels, batch_size=b)
            old_text = reference_generate(backbone, check, args.new_tokens, b, stop_at_eos=False)
            new_text = backbone.generate(check, max_new_tokens=args.new_tokens, batch_size=b, stop_at_eos=False)
            checks.append((name, b, len(check), float(np.abs(old - new).max()),
                           int((old.argmax(1) == new.argmax(1)).sum()),
                           sum(o == n for o, n in zip(old_text, new_text))))
        for b in args.batches:
            progress(f"{name}, batch {b}: timing label scoring")
            old_s = timed(lambda m=backbone, b=b: reference_score_labels(m, prompts, task.labels, b), args.repeats)
            new_s = timed(lambda m=backbone, b=b: m.score_labels(prompts, task.labels, batch_size=b), args.repeats)
            scoring.append((name, b, old_s, new_s))
            progress(f"{name}, batch {b}: timing generation")
            old_g = timed(lambda m=backbone, b=b: reference_generate(m, prompts, args.new_tokens, b, stop_at_eos=False),
                          args.repeats)
            new_g = timed(lambda m=backbone, b=b: m.generate(prompts, max_new_tokens=args.new_tokens, batch_size=b,
                                                                    stop_at_eos=False), args.repeats)
            generation.append((name, b, old_g, new_g))
        del backbone

    n, labels = len(prompts), len(task.labels)
    print(f"\nModel {args.model} on {device}, {args.threads} threads; {n} LaMP-2N dev prompts (non-personalized), "
          f"{labels} labels, {args.new_tokens} new tokens per prompt; median of {args.repeats} after 1 warm-up.")

    print(f"\n### Check: old path (reference_*) vs new (Backbone.score_labels / generate), {len(check)} prompts, "
          f"{args.new_tokens} new tokens\n")
    print("| dtype | batch | prompts | max abs diff of label log-likelihoods | same best label | same generation |")
    print("|---|---|---|---|---|---|")
    for name, b, count, diff, same_best, same_text in checks:
        print(f"| {name} | {b} | {count} | {diff:.2e} | {same_best}/{count} | {same_text}/{count} |")

    print(f"\n### Shared prefix: prompt tokens of label scoring, {n} prompts (see prompt_work)\n")
    print("| batch | batches | prompt tokens | `_common_prefix` per batch (min–max) | prompt tokens a batch-wide prefix "
          "covers | old path runs: real, padded | new path (`_prefill`) runs: real, padded, in forwards |")
    print("|---|---|---|---|---|---|---|")
    for b, c in coverage.items():
        print(f"| {b} | {c['batches']} | {c['tokens']} | {c['common_min']}–{c['common_max']} | "
              f"{c['covered']} ({c['covered'] / c['tokens']:.1%}) | {c['tokens']}, {c['old_padded']} | "
              f"{c['real']} ({c['real'] / c['tokens']:.1%}), {c['padded']}, {c['forwards']} |")

    print(f"\n### Label scoring, {n} prompts × {labels} labels: prompts/s\n")
    print("| dtype | batch | old prompts/s (reference_score_labels) | new prompts/s (Backbone.score_labels) | "
          "speed-up new/old |")
    print("|---|---|---|---|---|")
    for name, b, old_s, new_s in scoring:
        print(f"| {name} | {b} | {n / old_s:.2f} | {n / new_s:.2f} | {old_s / new_s:.2f}x |")

    tokens = n * args.new_tokens
    print(f"\n### Greedy generation, {n} prompts × {args.new_tokens} new tokens (stop_at_eos=False): "
          f"generated tokens/s\n")
    print("| dtype | batch | old tokens/s (reference_generate) | new tokens/s (Backbone.generate) | speed-up new/old |")
    print("|---|---|---|---|---|")
    for name, b, old_g, new_g in generation:
        print(f"| {name} | {b} | {tokens / old_g:.1f} | {tokens / new_g:.1f} | {old_g / new_g:.2f}x |")


if __name__ == "__main__":
    main()
