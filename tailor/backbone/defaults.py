"""Which packaged backbone a command uses when `--model` is not given (no torch import: the CLI reads these for its
help)."""

DEFAULT_MODEL = "qwen2.5-coder-0.5b"
"""The backbone results are produced on unless `--model` says otherwise. Chosen from docs/benchmarks/backbones.md
(zero-shot, RAG k=1 and MT-LoRA on every dev user of LaMP-2N, 2M and 3): Qwen2.5-Coder-0.5B-Instruct takes
LaMP-2N zero-shot from 0.024 to 0.429 and LaMP-3 MAE from 3.64 to 0.385 over the 135M model at 1.8x its cost per
query; the 1.5B model ranks best but costs 2.8x the 0.5B model per query."""
FAST_MODEL = "smollm2-135m"
"""Where speed matters more than quality: the README demo and the end-to-end tests."""
