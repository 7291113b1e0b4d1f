"""The backbone on tiny random models: padding-invariant batching, cached label scoring, per-row edits, hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tailor.backbone.edits import ForwardContext
from tailor.backbone.layers import Site, decoder_layers, site_module
from tailor.backbone.model import Backbone
from tests.conftest import tiny_backbone

PROMPTS = [
    "which tag does this movie relate to",
    "the review is great and the product is good, what is the score of the following review",
    "paraphrase this tweet",
]
LABELS = ["comedy", "action", "dark comedy", "1", "politics"]


class AddVector:
    """A per-row edit for these tests: add `scale * vectors[rows[b]]` to every token of row b."""

    def __init__(self, vectors: torch.Tensor, scale: float = 1.0):
        self.vectors = vectors
        self.scale = scale

    def __call__(self, hidden: torch.Tensor, ctx: ForwardContext, inputs: torch.Tensor | None = None) -> torch.Tensor:
        vec = self.vectors if ctx.rows is None else self.vectors[ctx.rows]
        if vec.dim() == 1:
            vec = vec.expand(hidden.shape[0], -1)
        return hidden + self.scale * vec[:, None, :].to(hidden.dtype)


def full_forward_logprob(bb: Backbone, prompt: str, label: str) -> float:
    ids = bb.encode(bb.render(prompt))
    label_ids = bb.tokenizer(label, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = bb.model(torch.tensor([ids + label_ids])).logits[0].float()
    logp = F.log_softmax(logits, dim=-1)
    return sum(logp[len(ids) - 1 + k, t].item() for k, t in enumerate(label_ids))


def test_batched_generation_equals_one_by_one(backbone: Backbone) -> None:
    together = backbone.generate(PROMPTS, max_new_tokens=6, batch_size=3)
    alone = [backbone.generate([p], max_new_tokens=6)[0] for p in PROMPTS]
    assert together == alone
    assert any(together)


def test_decoding_past_eos_does_the_full_work_and_keeps_the_text(backbone: Backbone,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with torch.no_grad():  # each prompt's greedy first token, made an end of sequence
        first = {int(backbone.model(torch.tensor([backbone.encode(backbone.render(p))])).logits[0, -1].argmax())
                 for p in PROMPTS}
    monkeypatch.setattr(backbone, "eos_ids", sorted(first))
    calls = []
    handle = backbone.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        stopped = backbone.generate(PROMPTS, 5, batch_size=3)
        n_stopped = len(calls)
        calls.clear()
        full = backbone.generate(PROMPTS, 5, batch_size=3, stop_at_eos=False)
    finally:
        handle.remove()
    assert n_stopped == 1 and len(calls) == 5  # the prefill alone, against the prefill and four decode steps
    assert full == stopped == ["", "", ""]


def test_label_scores_equal_full_forward(backbone: Backbone) -> None:
    scores = backbone.score_labels(PROMPTS, LABELS, batch_size=2)
    assert scores.shape == (len(PROMPTS), len(LABELS))
    assert any(len(i) > 1 for i in backbone.label_ids(LABELS))  # the cached multi-token path is exercised
    for i, prompt in enumerate(PROMPTS):
        for j, label in enumerate(LABELS):
            assert scores[i, j] == pytest.approx(full_forward_logprob(backbone, prompt, label), abs=1e-4)


QUESTION = ("Which category does this article relate to among the following categories? Just answer with the category "
            "name without further explanation. categories: [women, politics, sports, travel] article: ")


class LastTokenShift(AddVector):
    """A per-row edit of the last prompt token and what follows only, which says so (`untouched`)."""

    def untouched(self, prompt_lengths: torch.Tensor) -> torch.Tensor:
        return prompt_lengths - 1

    def __call__(self, hidden: torch.Tensor, ctx: ForwardContext, inputs: torch.Tensor | None = None) -> torch.Tensor:
        assert ctx.positions is not None and ctx.prompt_lengths is not None
        late = (ctx.positions >= ctx.prompt_lengths[:, None].to(ctx.positions.device) - 1)[:, :, None]
        return torch.where(late, super().__call__(hidden, ctx, inputs), hidden)


def edit_kinds(bb: Backbone) -> dict[str, tuple[dict, list[int] | None]]:
    """One edit of each kind the prefix plan tells apart, with the rows a batch of four uses (per-row edits: two
    users with two prompts each, who each share their prefix between their own prompts only)."""
    from tailor.backbone.lora import LoRAStack, lora_sites

    torch.manual_seed(3)
    stack = LoRAStack.init(bb.model, lora_sites(bb.model, ["q_proj", "v_proj"]), 4, 8.0, [1, 2, 3])
    stack = LoRAStack(stack.A, {s: torch.randn_like(b) * 0.3 for s, b in stack.B.items()}, 8.0)
    return {"none": ({}, None),
            "clean": ({Site("mlp", 1): LastTokenShift(torch.randn(3, bb.hidden_size) * 3)}, [2, 0, 1, 0]),
            "shared": (stack.select([0]).edits(shared=True), None),
            "per_row": (stack.edits(), [1, 0, 1, 0])}


@pytest.mark.parametrize("kind", ["none", "clean", "shared", "per_row"])
def test_a_shared_prefix_runs_once_and_scores_as_each_prompt_alone(backbone: Backbone, kind: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import tailor.backbone.model as model_module

    prompts = [QUESTION + text for text in ("the game was won", "a vote in the senate today", "new beaches",
                                            "women and the story of a great film")]
    edits, rows = edit_kinds(backbone)[kind]
    lengths = torch.tensor([len(e) for e in backbone.prompt_ids(prompts)])
    assert backbone._prefix_plan(edits, lengths)[1] == ("clean" if kind == "none" else kind)
    tokens: list[int] = []
    handle = backbone.model.get_input_embeddings().register_forward_hook(lambda _m, a, _o: tokens.append(a[0].numel()))
    try:
        shared = backbone.score_labels(prompts, LABELS, batch_size=4, edits=edits, rows=rows)
        generated = backbone.generate(prompts, 4, batch_size=4, edits=edits, rows=rows)
    finally:
        handle.remove()
    prefix = model_module._common_prefix(backbone.prompt_ids(prompts))
    # the prefix ran once (per user when the edits differ by user: here two users of two rows each)
    assert prefix > 20 and tokens[0] <= (2 if kind == "per_row" else 1) * prefix
    monkeypatch.setattr(model_module, "MIN_SHARED_PREFIX", 10 ** 6)  # today's path: every prompt run whole
    whole = backbone.score_labels(prompts, LABELS, batch_size=4, edits=edits, rows=rows)
    assert shared == pytest.approx(whole, abs=1e-4)
    for i, prompt in enumerate(prompts):
        alone = {site: type(e)(*_select(e, rows[i])) for site, e in edits.items()} if rows else edits
        assert shared[i] == pytest.approx(backbone.score_labels([prompt], LABELS, edits=alone)[0], abs=1e-4)
        assert generated[i] == backbone.generate([prompt], 4, edits=alone)[0]
    sites = [Site("mlp", 0), Site("layer", 1)]
    captured = backbone.capture(prompts, sites, batch_size=4, edits=edits, rows=rows)
    for i, prompt in enumerate(prompts):
        alone = {site: type(e)(*_select(e, rows[i])) for site, e in edits.items()} if rows else edits
        single = backbone.capture([prompt], sites, edits=alone)
        assert all(torch.allclose(captured[s][i], single[s][0], atol=1e-4) for s in sites)
    if kind == "none":
        for i, prompt in enumerate(prompts):
            for j, label in enumerate(LABELS):
                assert shared[i, j] == pytest.approx(full_forward_logprob(backbone, prompt, label), abs=1e-4)


def _select(edit: object, row: int) -> tuple:
    """The constructor arguments of a one-user copy of a per-row edit (row `row` of its stack)."""
    if isinstance(edit, AddVector):
        return (edit.vectors[row:row + 1], edit.scale)
    return (edit.A[row:row + 1], edit.B[row:row + 1], edit.scaling)


def test_mixed_user_edits_equal_each_user_alone(backbone: Backbone) -> None:
    torch.manual_seed(1)
    vectors = torch.randn(3, backbone.hidden_size) * 3
    edits = {Site("mlp", 0): AddVector(vectors)}
    rows = [2, 0, 1]
    mixed_gen = backbone.generate(PROMPTS, 6, batch_size=3, edits=edits, rows=rows)
    mixed_scores = backbone.score_labels(PROMPTS, LABELS, batch_size=3, edits=edits, rows=rows)
    for i, prompt in enumerate(PROMPTS):
        alone = {Site("mlp", 0): AddVector(vectors[rows[i]])}
        assert backbone.generate([prompt], 6, edits=alone)[0] == mixed_gen[i]
        assert mixed_scores[i] == pytest.approx(backbone.score_labels([prompt], LABELS, edits=alone)[0], abs=1e-4)
    plain = backbone.score_labels(PROMPTS, LABELS)
    assert abs(plain - mixed_scores).max() > 1e-3  # the edit really changes the answer distribution


def test_capture_reads_last_prompt_token_and_stops_early(backbone: Backbone) -> None:
    sites = [Site("mlp", 0), Site("layer", 0)]
    captured = backbone.capture(PROMPTS, sites, batch_size=2)
    ids = backbone.encode(backbone.render(PROMPTS[1]))
    with torch.no_grad():
        out = backbone.model(torch.tensor([ids]), output_hidden_states=True)
    # hidden_states[1] is the output of decoder layer 0
    assert torch.allclose(captured[Site("layer", 0)][1], out.hidden_states[1][0, -1].float(), atol=1e-5)
    assert captured[Site("mlp", 0)].shape == (len(PROMPTS), backbone.hidden_size)
    mean = backbone.capture(PROMPTS[1:2], [Site("layer", 0)], reduce="mean")[Site("layer", 0)][0]
    assert torch.allclose(mean, out.hidden_states[1][0].float().mean(0), atol=1e-5)


def test_training_through_an_edit_lowers_the_loss(backbone: Backbone) -> None:
    from tailor.backbone.edits import hooked

    vector = torch.zeros(1, backbone.hidden_size, requires_grad=True)
    edit = AddVector(vector)
    batch = backbone.sft_batch(["say the word"] * 2, ["comedy", "comedy"])
    optimizer = torch.optim.Adam([vector], lr=0.5)
    losses = []
    with hooked(backbone.model, {Site("layer", 1): edit}) as hooks:
        for _ in range(30):
            loss = backbone.sft_loss(batch, hooks, rows=torch.zeros(2, dtype=torch.long))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3  # one shift vector cannot fit every target token; it must still help
    assert all(not p.requires_grad for p in backbone.model.parameters())  # the backbone stays frozen


def test_sft_batch_labels_cover_only_the_target(backbone: Backbone) -> None:
    batch = backbone.sft_batch(["a prompt", "a much longer prompt with more words"], ["comedy", "5"])
    assert batch.labels is not None
    for row in range(2):
        labelled = batch.labels[row][batch.labels[row] != -100].tolist()
        target = backbone.tokenizer(["comedy", "5"][row], add_special_tokens=False)["input_ids"]
        assert labelled == target + backbone.eos_ids[:1]


def test_sft_loss_equals_the_loss_over_full_logits(backbone: Backbone) -> None:
    batch = backbone.sft_batch(["a prompt", "a much longer prompt with more words in it"], ["comedy film", "5"])
    assert batch.labels is not None
    with torch.no_grad():
        logits = backbone.model(input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.positions).logits
        target = batch.labels[:, 1:]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                               reduction="none").view(target.shape)
        expected = loss.sum(-1) / (target != -100).sum(-1)
        assert torch.allclose(backbone.sft_loss(batch, reduction="per_row"), expected, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3"])
def test_layer_resolver_and_edits_on_every_family(family: str) -> None:
    bb = tiny_backbone(family)
    assert len(decoder_layers(bb.model)) == bb.n_layers == 2
    for kind in ("layer", "mlp", "attn"):
        assert site_module(bb.model, Site(kind, 1)) is not None  # type: ignore[arg-type]
    if family == "phi3":
        with pytest.raises(ValueError, match="fused"):
            site_module(bb.model, Site("q_proj", 1))
    else:
        assert isinstance(site_module(bb.model, Site("v_proj", 1)), torch.nn.Linear)
    vectors = torch.randn(2, bb.hidden_size)
    edits = {Site("mlp", 1): AddVector(vectors), Site("attn", 0): AddVector(vectors, scale=0.5)}
    mixed = bb.score_labels(PROMPTS[:2], LABELS[:2], edits=edits, rows=[1, 0])
    alone = bb.score_labels(PROMPTS[:1], LABELS[:2], edits={Site("mlp", 1): AddVector(vectors[1]),
                                                           Site("attn", 0): AddVector(vectors[1], scale=0.5)})
    assert mixed[0] == pytest.approx(alone[0], abs=1e-4)
    captured = bb.capture(PROMPTS, [Site("mlp", 1)])
    assert captured[Site("mlp", 1)].shape == (3, bb.hidden_size)


def test_site_errors_are_clear(backbone: Backbone) -> None:
    with pytest.raises(ValueError, match="layers 0..1"):
        site_module(backbone.model, Site("mlp", 5))
    with pytest.raises(ValueError, match="bad site"):
        Site.parse("mlp")
    assert Site.parse("mlp.3") == Site("mlp", 3)
    assert Site.parse("v_proj.1") == Site("v_proj", 1)
    assert isinstance(site_module(backbone.model, Site("v_proj", 1)), torch.nn.Linear)


def test_forward_context_carries_rows_and_positions(backbone: Backbone) -> None:
    seen: list[ForwardContext] = []

    def spy(hidden: torch.Tensor, ctx: ForwardContext, _inputs: torch.Tensor) -> torch.Tensor:
        seen.append(ForwardContext(ctx.rows.clone(), ctx.positions.clone(), ctx.prompt_lengths.clone()))
        return hidden

    backbone.generate(PROMPTS[:2], 3, batch_size=2, edits={Site("layer", 0): spy}, rows=[4, 7])
    prefill, step = seen[0], seen[1]
    assert sorted(prefill.rows.tolist()) == [4, 7]
    lengths = prefill.prompt_lengths
    assert prefill.positions.max(dim=1).values.tolist() == (lengths - 1).tolist()
    assert step.positions[:, 0].tolist() == lengths.tolist()  # the first generated token follows the prompt


def test_prefix_groups_pair_twins_and_keep_a_shared_instruction_whole() -> None:
    from tailor.backbone.model import _prefix_groups

    head = [1] * 30
    alone, twin_a, twin_b, other = head + [5] * 10, head + [7] * 500 + [1], head + [7] * 500 + [2], head + [9] * 40
    rows = [twin_a, alone, twin_b, other]
    groups = _prefix_groups(rows, [len(r) - 1 for r in rows], [0] * 4)
    assert sorted((size, sorted(members)) for size, members in groups) == [(0, [1]), (0, [3]), (530, [0, 2])]
    questions = [[3] * 90 + [i] * 50 for i in range(5)]  # one instruction, then different articles
    assert _prefix_groups(questions, [139] * 5, [0] * 5) == [(90, [0, 1, 2, 3, 4])]
    by_user = _prefix_groups(questions, [139] * 5, [0, 1, 0, 1, 0])  # per-user edits: users never share
    assert sorted((size, members) for size, members in by_user) == [(90, [0, 2, 4]), (90, [1, 3])]
    capped = _prefix_groups(questions, [139, 40, 139, 139, 139], [0] * 5)  # row 1's edits begin at token 40
    assert capped == [(40, [0, 1]), (90, [2, 3, 4])]  # no prefix reaches past a row's limit; the rest share 90


def test_generated_answers_reach_the_cache_before_a_long_generation_ends(backbone: Backbone, tmp_path) -> None:
    """A run killed while it writes many answers (P2P's summaries, CHAMELEON's insights) keeps the batches it
    finished: the rerun generates only the rest."""
    from tailor.backbone.cache import SAVE_EVERY, cached_generate
    from tailor.backbone.textcache import TextCache

    cache = TextCache(tmp_path / "text.sqlite")
    prompts = [f"prompt number {i}" for i in range(2 * SAVE_EVERY + 1)]
    asked: list[int] = []
    generate = backbone.generate
    killed = [True]

    def counted(batch: list[str], *args, **kwargs) -> list[str]:
        asked.append(len(batch))
        if killed[0] and len(asked) > 1:
            raise KeyboardInterrupt
        return generate(batch, *args, **kwargs)

    backbone.generate = counted  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            cached_generate(backbone, prompts, 2, batch_size=1, cache=cache)
        killed[0] = False
        asked.clear()
        told: list[int] = []
        answers = cached_generate(backbone, prompts, 2, batch_size=1, cache=cache, progress=told.append)
    finally:
        del backbone.generate
    assert sum(asked) == len(prompts) - SAVE_EVERY  # the first step's answers were read back, not generated again
    assert told == [SAVE_EVERY, SAVE_EVERY, 1]  # progress: the cached answers at once, then each step's
    assert answers == [generate([p], 2, 1)[0] for p in prompts]
