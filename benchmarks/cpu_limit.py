"""This machine's matmul limit at the backbone's own shapes, and how close one batched forward of the model comes to it.

    .venv/bin/python -m benchmarks.cpu_limit --model smollm2-135m --threads 2 --tokens 2048 --batch 16

(a) Matmul microbenchmark. For every distinct weight shape (out, in) of the model's linear layers (q/k/v/o, gate/up/
down, the LM head), `x @ W.T` is timed with the layer's own weight cast to each dtype and x of shape (tokens, in),
tokens = 16 x 128 = 2048 by default (a batch of 16 128-token prompts; `--tokens`). A matmul of (m, k) by (k, n) counts
2*m*n*k FLOPs. Times are medians over `--repeats` calls after `--warmup` calls. Per dtype the table gives each
shape's GFLOP/s, and two FLOP-weighted figures, sum(count * FLOPs) / sum(count * seconds) with `count` the number of
such layers in one forward: over the decoder layers' projections only (the "matmul peak" part (b) divides by: a
prompt forward that keeps one position's logits spends almost nothing in the LM head), and with the LM head at the
same token count added.

(b) Achieved FLOP/s of a batched forward. `--batch` real LaMP-2N dev prompts (each dev user's queries[0].input,
the non-personalized prompt, rendered and tokenized by `Backbone.prompt_ids`), left-padded by `Backbone.batch`, one
`backbone.model(input_ids, attention_mask, position_ids, logits_to_keep=1)` under torch.inference_mode, timed as
above. Counted FLOPs, from the model config alone (cross-checked against the modules' parameter count):

- linear layers: 2 * (parameters of the decoder layers' q/k/v/o and gate/up/down projections) per token;
- attention: the score (QK^T) and value (PV) matmuls, 2 * 2 * t * (heads * head_dim) per token per layer for the
  token at position t (it sees t keys), i.e. 2 * d * L * (L + 1) per layer for a sequence of L tokens (causal:
  what a token can see, summed over the sequence);
- the LM head for the kept position only: 2 * hidden * vocab per row.

Not counted: embedding lookup, norms, RoPE, activations, softmax, the mask. Two figures are reported: "real" counts
each row's real tokens (the useful work); "padded" counts every row at the batch's padded width, which is what the
kernels actually run through. The fraction of peak divides the padded figure by the decoder-layer matmul peak of the
same dtype from (a); a fraction near 1 means the forward runs at the matmul limit, and the rest of the time goes to
what is not counted (attention kernels, norms, activations, framework overhead).

Run it on an otherwise idle machine; `--threads` sets torch.set_num_threads (default 2).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from tailor.backbone.device import DTYPES, cpu_features, describe_device, resolve_device
from tailor.backbone.model import Backbone

DECODER_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def machine_header(device: torch.device | None = None) -> str:
    """One line naming the machine every figure below was measured on."""
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine()) \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    features = ", ".join(f"{name}={'yes' if present else 'no'}" for name, present in cpu_features().items())
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    line = (f"Machine: {cpu}, {os.cpu_count()} logical CPUs ({usable} usable by this process), torch threads "
            f"{torch.get_num_threads()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"CPU features (tailor.backbone.device.cpu_features): {features}")
    if device is not None and device.type != "cpu":
        line += f"; device {device} = {describe_device(device)}"
    return line


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1, device: torch.device | None = None) -> float:
    """Median seconds of `fn` over `repeats` calls after `warmup` calls."""
    where = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    synchronize(where)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        synchronize(where)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def linear_shapes(model: nn.Module) -> OrderedDict[tuple[int, int], dict]:
    """Distinct (out, in) weight shapes of the model's linear layers: the roles that have it, how many layers per
    forward, one weight of that shape, and whether it sits in a decoder layer (vs the LM head)."""
    shapes: OrderedDict[tuple[int, int], dict] = OrderedDict()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        role = name.rsplit(".", 1)[-1]
        shape = (module.out_features, module.in_features)
        entry = shapes.setdefault(shape, {"roles": [], "count": 0, "weight": module.weight.detach(),
                                          "decoder": role in DECODER_ROLES})
        if role not in entry["roles"]:
            entry["roles"].append(role)
        entry["count"] += 1
    return shapes


def matmul_flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def bench_matmuls(model: nn.Module, dtypes: Sequence[str], tokens: int, repeats: int, warmup: int,
                  device: torch.device) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """Per shape and dtype, the median seconds of x @ W.T; and per dtype the FLOP-weighted GFLOP/s."""
    rows = []
    generator = torch.Generator().manual_seed(0)
    for (out_f, in_f), entry in linear_shapes(model).items():
        row = {"roles": "/".join(entry["roles"]), "out": out_f, "in": in_f, "count": entry["count"],
               "decoder": entry["decoder"], "flops": matmul_flops(tokens, out_f, in_f), "seconds": {}}
        for name in dtypes:
            dtype = DTYPES[name]
            weight = entry["weight"].to(device=device, dtype=dtype).contiguous()
            x = torch.randn(tokens, in_f, generator=generator).to(device=device, dtype=dtype)
            with torch.inference_mode():
                row["seconds"][name] = timed(lambda x=x, w=weight: x @ w.T, repeats, warmup, device)
            del weight, x
        rows.append(row)
    summary: dict[str, dict[str, float]] = {}
    for name in dtypes:
        def weighted(selected: list[dict], name: str = name) -> float:
            return (sum(r["count"] * r["flops"] for r in selected)
                    / sum(r["count"] * r["seconds"][name] for r in selected) / 1e9)
        decoder = [r for r in rows if r["decoder"]]
        summary[name] = {
            "decoder": weighted(decoder) if decoder else float("nan"),
            "all": weighted(rows),
            "best": max(r["flops"] / r["seconds"][name] / 1e9 for r in rows),
        }
    return rows, summary


def forward_flops(config, lengths: Sequence[int]) -> int:
    """Matmul FLOPs of one forward over rows of these token counts, keeping one position's logits (see the module
    docstring for what is counted)."""
    config = getattr(config, "text_config", None) or config
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    inter = int(config.intermediate_size)
    layers = int(config.num_hidden_layers)
    d_attn = heads * head_dim
    linear_params = hidden * d_attn + 2 * hidden * kv_heads * head_dim + d_attn * hidden + 3 * hidden * inter
    total = 0
    for length in lengths:
        total += layers * (2 * linear_params * length + 2 * d_attn * length * (length + 1))
        total += 2 * hidden * int(config.vocab_size)
    return total


def decoder_linear_params_from_modules(model: nn.Module) -> int:
    return sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in DECODER_ROLES)


def decoder_linear_params_from_config(config) -> int:
    config = getattr(config, "text_config", None) or config
    hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    per_layer = (2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
                 + 3 * hidden * int(config.intermediate_size))
    return per_layer * int(config.num_hidden_layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu", help="cpu (default), or cuda / cuda:N")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--tokens", type=int, default=16 * 128,
                        help="rows of x in the matmul microbenchmark (default 16 x 128 = 2048)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per matmul (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before each matmul's timing")
    parser.add_argument("--batch", type=int, default=16, help="prompts in the batched forward")
    parser.add_argument("--forward-repeats", type=int, default=5, help="timed forwards (median), after one warm-up")
    parser.add_argument("--max-prompt-tokens", type=int, default=0,
                        help="keep only each prompt's last N tokens in the forward (0: whole prompts; for smoke tests)")
    parser.add_argument("--skip-matmul", action="store_true", help="(b) only; the fraction of peak is then omitted")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(machine_header(device))
    print(f"\nCommand: .venv/bin/python -m benchmarks.cpu_limit --model {args.model} --device {args.device} "
          f"--dtypes {' '.join(args.dtypes)} --threads {args.threads} --tokens {args.tokens} --repeats {args.repeats} "
          f"--warmup {args.warmup} --batch {args.batch} --forward-repeats {args.forward_repeats}"
          + (f" --max-prompt-tokens {args.max_prompt_tokens}" if args.max_prompt_tokens else "")
          + (" --skip-matmul" if args.skip_matmul else ""))

    reference = Backbone.load(args.model, device="cpu", dtype="float32")
    config = reference.model.config

    summary: dict[str, dict[str, float]] = {}
    if not args.skip_matmul:
        rows, summary = bench_matmuls(reference.model, args.dtypes, args.tokens, args.repeats, args.warmup, device)
        print(f"\n## (a) Matmul x @ W.T at {args.model}'s linear shapes, x = ({args.tokens}, in), "
              f"median of {args.repeats} after {args.warmup} warm-up, {args.threads} threads, {device}\n")
        head = "| layers | W (out × in) | per forward | GFLOP per matmul |"
        rule = "|---|---|---|---|"
        for name in args.dtypes:
            head += f" {name} ms | {name} GFLOP/s |"
            rule += "---|---|"
        if len(args.dtypes) == 2:
            head += f" {args.dtypes[1]} / {args.dtypes[0]} speed |"
            rule += "---|"
        print(head)
        print(rule)
        for r in rows:
            line = f"| {r['roles']} | {r['out']} × {r['in']} | {r['count']} | {r['flops'] / 1e9:.3f} |"
            for name in args.dtypes:
                line += f" {r['seconds'][name] * 1e3:.2f} | {r['flops'] / r['seconds'][name] / 1e9:.1f} |"
            if len(args.dtypes) == 2:
                line += f" {r['seconds'][args.dtypes[0]] / r['seconds'][args.dtypes[1]]:.2f}x |"
            print(line)
        print("\n| dtype | FLOP-weighted GFLOP/s, decoder-layer projections (the matmul peak used in (b)) | "
              "FLOP-weighted GFLOP/s, with LM head | best single shape GFLOP/s |")
        print("|---|---|---|---|")
        for name in args.dtypes:
            s = summary[name]
            print(f"| {name} | {s['decoder']:.1f} | {s['all']:.1f} | {s['best']:.1f} |")

    # (b) one batched forward of the whole model on real prompts.
    from tailor.data.lamp import load_users

    users = load_users("lamp2n", "dev")
    prompts = [u.queries[0].input for u in users][:args.batch]
    if len(prompts) < args.batch:
        raise SystemExit(f"--batch {args.batch}: LaMP-2N dev has only {len(prompts)} users")
    encoded = reference.prompt_ids(prompts)
    if args.max_prompt_tokens:
        encoded = [e[-args.max_prompt_tokens:] for e in encoded]
    lengths = [len(e) for e in encoded]
    width = max(lengths)
    real_flops = forward_flops(config, lengths)
    padded_flops = forward_flops(config, [width] * len(lengths))
    from_config = decoder_linear_params_from_config(config)
    from_modules = decoder_linear_params_from_modules(reference.model)
    del reference

    results = []
    for name in args.dtypes:
        backbone = Backbone.load(args.model, device=str(device), dtype=name)
        batch = backbone.batch(encoded)
        ids, mask, positions = (t.to(device) for t in (batch.ids, batch.mask, batch.positions))

        def forward(model: torch.nn.Module = backbone.model, ids: torch.Tensor = ids, mask: torch.Tensor = mask,
                    positions: torch.Tensor = positions) -> None:
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)

        seconds = timed(forward, args.forward_repeats, 1, device)
        results.append((name, seconds))
        del backbone

    print(f"\n## (b) One batched forward: {args.batch} LaMP-2N dev prompts (non-personalized, each user's "
          f"queries[0]), left-padded, logits_to_keep=1, median of {args.forward_repeats} after 1 warm-up, "
          f"{args.threads} threads, {device}\n")
    print(f"Prompt tokens: {sum(lengths)} real, {width * len(lengths)} padded ({args.batch} × width {width}; "
          f"min {min(lengths)}, mean {sum(lengths) / len(lengths):.1f}, max {width})"
          + (f", each cut to its last {args.max_prompt_tokens}" if args.max_prompt_tokens else "")
          + f". Decoder-layer linear parameters: {from_config:,} from the config, {from_modules:,} in the modules.\n")
    print("| dtype | batch | real tokens | padded tokens | counted GFLOP, real | counted GFLOP, padded | median s | "
          "achieved GFLOP/s, real | achieved GFLOP/s, padded | decoder matmul peak GFLOP/s (a) | "
          "fraction of peak (padded / peak) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, seconds in results:
        peak = summary.get(name, {}).get("decoder")
        fraction = f"{padded_flops / seconds / 1e9 / peak:.2f}" if peak else "n/a"
        peak_text = f"{peak:.1f}" if peak else "n/a"
        print(f"| {name} | {args.batch} | {sum(lengths)} | {width * len(lengths)} | {real_flops / 1e9:.1f} | "
              f"{padded_flops / 1e9:.1f} | {seconds:.3f} | {real_flops / seconds / 1e9:.1f} | "
              f"{padded_flops / seconds / 1e9:.1f} | {peak_text} | {fraction} |")


if __name__ == "__main__":
    main()
