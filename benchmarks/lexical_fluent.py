"""Does lexical fusion's gain survive as written text? Two ways to turn its word model into a fluent answer, on dev
users under LaMP's protocol, against the word selection itself and against copying the input:

- write: the backbone writes a headline from the selected words and the article (one generation per query);
- choose: among fluent answers the leaderboard already has for each query (its records' answers of the floors, the
  non-personalized model, RAG k=4 and MT-LoRA), the one with the highest expected F1 under the word model,
  2 · Σ_w p(w) / (|answer| + L_u), a word the model does not score counting 0.01.

Everything the word model uses is learned on training users (`tailor eval --method lexical`'s fit); dev users are only
scored. Paired bootstraps over users.

    .venv/bin/python -m benchmarks.lexical_fluent --task lamp4
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import add_device_options, machine, publish
from tailor.backbone.model import Backbone
from tailor.data.lamp import load_users
from tailor.methods.lexical import LexicalFusion, words_of
from tailor.store.state import UserState
from tailor.tasks import get_task
from tailor.tasks.metrics import compute_metrics
from tailor.tasks.records import Query
from tailor.tasks.stats import paired_bootstrap

FLUENT = ("global-prior", "user-prior", "non-personalized", "RAG-k4", "MT-LoRA")
"""The leaderboard records whose answers `choose` picks from (benchmarks/records/TASK/0/NAME.json)."""
WRITE = "Write a news headline for the article below. Use these words: {words}\nArticle: {article}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="lamp4")
    parser.add_argument("--data", default="../shared/lamp")
    parser.add_argument("--records", type=Path, default=Path("benchmarks/records"))
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--report", type=Path, help="also write the table to this markdown file")
    add_device_options(parser)
    args = parser.parse_args(argv)
    task = get_task(args.task)
    method = LexicalFusion(task)
    method.fit(load_users(task, "train", args.data))
    dev = load_users(task, "dev", args.data)
    states = [method.personalize(u) for u in dev]
    queries = [u.queries[0] for u in dev]
    golds, ids = [q.gold for q in queries], [u.id for u in dev]
    selected = [p.text for p in method.predict(list(zip(states, queries)))]
    recorded = {name: {a[1]: a[2] for a in json.loads((args.records / task.name.lower().replace("-", "")
                                                       / "0" / f"{name}.json").read_text())["answers"]}
                for name in FLUENT}

    def chose(state: UserState, query: Query) -> str:
        scored = dict(method.word_probabilities(state, query))

        def expected_f1(text: str) -> float:
            words = words_of(text)
            return 2 * sum(scored.get(w, 0.01) for w in words) / (len(words) + state.header["length"]) if words else 0.0

        return max((recorded[name][query.id] for name in FLUENT), key=expected_f1)

    chosen = [chose(s, q) for s, q in zip(states, queries)]
    backbone = Backbone.load(args.model, args.device, args.dtype)
    prompts = [WRITE.format(words=w, article=task.retrieval_query(q.input)) for w, q in zip(selected, queries)]
    written = [text.strip().split("\n")[0].strip('"') for text in
               backbone.generate(prompts, max_new_tokens=task.max_new_tokens)]
    copies = [recorded["global-prior"][q.id] for q in queries]
    lines = [f"{task.name}, {len(dev)} dev users, LaMP's protocol ({args.data}); word model fitted on the training users; "
             f"writer {backbone.model_id} ({machine(args.device, args.dtype)}).", "",
             "| answer | ROUGE-1 | ROUGE-L | Δ ROUGE-1 vs copying the input (p) | Δ vs the word selection (p) |",
             "|---|---|---|---|---|"]
    for label, answers in (("copy the input (the floor)", copies), ("lexical fusion's word selection", selected),
                           ("write: the backbone writes from the selection", written),
                           ("choose: the fluent answer of highest expected F1", chosen)):
        metrics = compute_metrics(task, answers, golds)
        vs_copy = paired_bootstrap(task, answers, copies, golds, ids)["rouge1"]
        vs_selected = paired_bootstrap(task, answers, selected, golds, ids)["rouge1"]
        lines.append(f"| {label} | {metrics['rouge1']:.4f} | {metrics['rougeL']:.4f} | {vs_copy.delta:+.4f} "
                     f"(p={vs_copy.p_value:.3f}) | {vs_selected.delta:+.4f} (p={vs_selected.p_value:.3f}) |")
    publish("\n".join(lines), args.report)


if __name__ == "__main__":
    main()
