"""A frozen causal LM with the operations every method needs: generate, score labels, read hidden states, train.

All batches are left-padded and sorted by length, positions are computed from the attention mask, and every
forward goes through `_forward`, which moves the batch to the model's device and tells the installed edits which
user row and which positions they are looking at. So an edit written once works the same in generation, label
scoring, hidden-state capture and training, on any device.

Prompts are run the way a serving engine runs them (vLLM's automatic prefix caching is the model): the token prefix
that every prompt of a batch shares (the chat template's opening and the task's instruction) runs once and its KV
cache is reused by every row (`_prefill`), and a label set's continuations run in one forward over the cached prompt,
each label's tokens seeing the prompt and their own label only (`score_labels`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache

from tailor.backbone.device import DTypeName, resolve_device, resolve_dtype
from tailor.backbone.edits import Edit, HookSet, hooked, last_token, mean_over_tokens
from tailor.backbone.layers import Site, num_layers
from tailor.backbone.loading import DEFAULT_MODEL, resolve_model

MIN_SHARED_PREFIX = 8
"""Shared prompt tokens below which a batch is run whole: a separate prefix pass would cost more than it saves."""


def _contiguous_input(_module: nn.Module, args: tuple) -> tuple:
    """The LM head's input made contiguous. A forward that keeps the last k positions' logits hands the head a slice
    of the hidden states, and on the CPU a linear layer given a non-contiguous 3D input broadcasts its weight to the
    batch and multiplies batch by batch: for SmolLM2's 49k-word head at batch 16 that copy took 0.83 s in bfloat16
    (a third of the whole forward) and 0.09 s in float32, against 7 ms and 20 ms once the input is contiguous."""
    return (args[0].contiguous(), *args[1:])


def _common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every sequence shares."""
    first = sequences[0]
    shared = min(len(s) for s in sequences)
    for seq in sequences[1:]:
        k = 0
        while k < shared and seq[k] == first[k]:
            k += 1
        shared = k
    return shared


def _prefix_groups(encoded: Sequence[Sequence[int]], limits: Sequence[int], keys: Sequence[int],
                   near: float = 0.5) -> list[tuple[int, list[int]]]:
    """Rows grouped by a prefix worth running once: (prefix length, rows), every row in exactly one group.

    Rows are taken in token order, so a row's closest relative is the row before it. A row joins the current group
    while the group's common prefix stays at least MIN_SHARED_PREFIX tokens and at least `near` of what the group
    shared before; a row that shares far more with the row before it than the group does takes that row along into
    a group of their own. So a batch of questions after one instruction is one group, and CHAMELEON's personalized
    and neutral twins, which share all but their last sentence, pair up instead of merging over a common preamble.
    Rows with different `keys` (users whose edits differ) never share, and no row shares beyond its `limits` entry.
    A row alone has no prefix (length 0).
    """
    def common(a: int, b: int) -> int:
        limit = min(limits[a], limits[b])
        return _common_prefix([encoded[a][:limit], encoded[b][:limit]]) if keys[a] == keys[b] else 0

    order = sorted(range(len(encoded)), key=lambda i: (keys[i], list(encoded[i])))
    groups: list[tuple[int, list[int]]] = []
    for i in order:
        if groups:
            size, members = groups[-1]
            last = members[-1]
            close = common(last, i)
            if close >= MIN_SHARED_PREFIX:
                if len(members) > 1 and close * near > size:  # i and the last member share far more than the group
                    rest = members[:-1]
                    groups[-1] = (size if len(rest) > 1 else 0, rest)
                    groups.append((close, [last, i]))
                    continue
                if len(members) == 1 or min(size, close) >= near * size:
                    groups[-1] = (close if len(members) == 1 else min(size, close), members + [i])
                    continue
        groups.append((0, [i]))
    return groups


class _LabelTree:
    """A label set's continuation tokens laid out for one forward: label j's tokens after its first, in turn.

    `inputs[c]` is the token fed at column c (a label's token k, which predicts its token k+1, `targets[c]`);
    `offsets[c]` is its position after the prompt; `owner[c]` the label it belongs to; `visible[c, c']` whether
    column c may attend to column c' (same label, not later). `first[j]` is label j's first token, read from the
    prompt's own last logits.
    """

    def __init__(self, label_ids: Sequence[Sequence[int]]):
        inputs, targets, offsets, owner = [], [], [], []
        for j, ids in enumerate(label_ids):
            for k in range(len(ids) - 1):
                inputs.append(ids[k])
                targets.append(ids[k + 1])
                offsets.append(k)
                owner.append(j)
        self.first = torch.tensor([ids[0] for ids in label_ids])
        self.width = len(inputs)
        self.inputs = torch.tensor([inputs], dtype=torch.long)
        self.targets = torch.tensor([targets], dtype=torch.long)
        self.offsets = torch.tensor([offsets], dtype=torch.long)
        self.owner = torch.tensor(owner, dtype=torch.long)
        same = self.owner[:, None] == self.owner[None, :]
        self.visible = same & (self.offsets[0][None, :] <= self.offsets[0][:, None])


def log_normalise(scores: np.ndarray) -> np.ndarray:
    """Label log-likelihoods as log-probabilities over the label set (each row sums to one after exp)."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


class _StopForward(Exception):
    """Raised by a capture hook once the deepest wanted layer has run: the rest of the network is not needed."""


@dataclass
class Batch:
    """A left-padded batch: token ids, mask, positions and where each row's prompt ends."""

    ids: Tensor
    mask: Tensor
    positions: Tensor
    prompt_lengths: Tensor
    labels: Tensor | None = None


@dataclass(frozen=True)
class Sampling:
    """How one row of `Backbone.generate` picks its tokens and where its text ends.

    Temperature 0 (the default) decodes greedily; above 0, each token is drawn from the softmax of the logits divided
    by the temperature, kept to the smallest set of most likely tokens whose probability reaches `top_p`. A `seed`
    gives the row a random generator of its own, so the same request draws the same text whatever shares its batch.
    `stop`: strings that end the text where the first of them begins (it is not included)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature} and {self.top_p}")

    def generator(self, device: torch.device) -> torch.Generator | None:
        return torch.Generator(device=device).manual_seed(self.seed) if self.seed is not None else None


GREEDY = Sampling()


def _per_row(sampling: Sampling | Sequence[Sampling] | None, n: int) -> list[Sampling]:
    if sampling is None or isinstance(sampling, Sampling):
        return [sampling or GREEDY] * n
    if len(sampling) != n:
        raise ValueError(f"{len(sampling)} sampling settings for {n} prompts")
    return list(sampling)


def _next_tokens(logits: Tensor, choosers: Sequence[Sampling], generators: Sequence[torch.Generator | None]) -> Tensor:
    """Each row's next token: the most likely one, or a draw as the row's `Sampling` says."""
    picked = logits.argmax(-1)
    for row, chooser in enumerate(choosers):
        if chooser.temperature == 0:
            continue
        probs = torch.softmax(logits[row].float() / chooser.temperature, dim=-1)
        if chooser.top_p < 1:
            ranked, order = probs.sort(descending=True)
            keep = ranked.cumsum(0) - ranked < chooser.top_p  # the most likely tokens until top_p is reached
            probs = torch.zeros_like(probs).scatter(0, order[keep], ranked[keep])
        picked[row] = torch.multinomial(probs, 1, generator=generators[row])[0]
    return picked


def _stop_at(text: str, stop: Sequence[str]) -> int | None:
    """Where the first stop string found in `text` begins, or None."""
    found = [at for at in (text.find(s) for s in stop if s) if at >= 0]
    return min(found) if found else None


class Backbone:
    """A frozen decoder-only model plus its tokenizer.

    `chat=True` wraps every prompt in the model's chat template as one user turn, which is how instruction-tuned
    models expect to be asked; a base model (no template) gets the raw prompt.
    """

    def __init__(self, model: nn.Module, tokenizer, name: str, chat: bool | None = None, max_length: int = 2048):
        self.model = model.eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.tokenizer = tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.name = name
        self.chat = bool(tokenizer.chat_template) if chat is None else chat
        self.max_length = max_length
        self.n_layers = num_layers(model)
        config = getattr(model.config, "text_config", None) or model.config
        self.hidden_size = int(config.hidden_size)
        self.eos_ids = self._eos_ids()
        self._render = lru_cache(maxsize=65536)(self._render_uncached)
        head = model.get_output_embeddings()
        if head is not None:
            head.register_forward_pre_hook(_contiguous_input)

    @classmethod
    def load(cls, name_or_path: str = DEFAULT_MODEL, device: str = "auto", dtype: DTypeName | str = "auto",
             chat: bool | None = None, max_length: int = 2048) -> "Backbone":
        """A packaged model or a local Hugging Face folder on `device` in `dtype` (`auto`: see
        `tailor.backbone.device`). A device or dtype this machine cannot use fails before the model loads."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        where = resolve_device(device)
        precision = resolve_dtype(dtype, where)
        name, folder = resolve_model(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=precision).to(where)
        return cls(model, tokenizer, name, chat=chat, max_length=max_length)

    # --- identity ------------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def model_id(self) -> str:
        """What a saved user state records as its backbone: name, depth and width (a state is useless elsewhere)."""
        return f"{self.name}/{self.n_layers}x{self.hidden_size}"

    def _eos_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        generation_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
        return sorted(i for i in ids if i is not None)

    # --- text -> tokens ------------------------------------------------------------------------------------------
    def _render_uncached(self, prompt: str) -> str:
        if not self.chat:
            return prompt
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def render(self, prompt: str) -> str:
        """The exact text the model reads for a prompt (chat template applied when the model has one)."""
        return self._render(prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"]

    def prompt_ids(self, prompts: Sequence[str], room: int = 0) -> list[list[int]]:
        """Token ids of rendered prompts, cut from the left when longer than max_length minus `room`."""
        limit = self.max_length - room
        out = []
        for prompt in prompts:
            ids = self.encode(self.render(prompt))
            out.append(ids[-limit:] if len(ids) > limit else ids)
        return out

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def truncate_tokens(self, text: str, max_tokens: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            return text
        return self.tokenizer.decode(ids[:max(max_tokens, 0)], skip_special_tokens=True)

    def batch(self, sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int] | None = None,
              labels: Sequence[Sequence[int]] | None = None) -> Batch:
        """Left-pad token sequences into one batch; `labels` (same lengths, -100 = ignore) are padded alike."""
        width = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        label_tensor = torch.full((len(sequences), width), -100, dtype=torch.long) if labels is not None else None
        for row, seq in enumerate(sequences):
            if seq:
                ids[row, width - len(seq):] = torch.tensor(seq)
                mask[row, width - len(seq):] = 1
            if label_tensor is not None and labels is not None and labels[row]:
                label_tensor[row, width - len(labels[row]):] = torch.tensor(labels[row])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        lengths = torch.tensor(prompt_lengths if prompt_lengths is not None else [len(s) for s in sequences])
        return Batch(ids, mask, positions, lengths, label_tensor)

    # --- forward -------------------------------------------------------------------------------------------------
    def _forward(self, hooks: HookSet | None, ids: Tensor, mask: Tensor, positions: Tensor, rows: Tensor | None,
                 prompt_lengths: Tensor, cache=None, step_mask: Tensor | None = None, logits_to_keep: int = 0,
                 use_cache: bool = False):
        device = self.device
        ids, mask, positions, prompt_lengths = (t.to(device) for t in (ids, mask, positions, prompt_lengths))
        rows = rows.to(device) if rows is not None else None
        if hooks is not None:
            hooks.ctx.rows = rows
            hooks.ctx.positions = positions
            hooks.ctx.prompt_lengths = prompt_lengths
            hooks.ctx.mask = (step_mask.to(device) if step_mask is not None else mask).bool()
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                          use_cache=use_cache or cache is not None, logits_to_keep=logits_to_keep)

    def _prefix_plan(self, edits: Mapping[Site, Edit] | None, lengths: Tensor) -> tuple[list[int], str]:
        """Per row, how many leading tokens may run in a prefix shared with other rows, and how the prefixes run:
        "clean" (no edit reaches them: run without edits), "shared" (edits reach them alike in every row: run with
        them) or "per_row" (edits differ by row: only rows of the same user share a prefix)."""
        limit = lengths - 1  # every row keeps at least its last token, whose logits are read
        reaching = []
        for edit in (edits or {}).values():
            untouched = getattr(edit, "untouched", None)
            if untouched is not None:
                limit = torch.minimum(limit, untouched(lengths).cpu())
            else:
                reaching.append(edit)
        how = "clean" if not reaching else \
            "shared" if all(getattr(edit, "same_for_every_row", False) for edit in reaching) else "per_row"
        return limit.tolist(), how

    def _prefill(self, hooks: HookSet | None, edits: Mapping[Site, Edit] | None, encoded: Sequence[Sequence[int]],
                 rows: Tensor | None, stops: bool = False) -> tuple[object, object, Tensor, Tensor]:
        """Run prompts into a KV cache: (output with the last position's logits, cache, 2D mask over the cache, real
        prompt lengths).

        Rows that share a long prefix (`_prefix_groups`: all the questions of a task after the same instruction, the
        personalized and neutral twins of a CHAMELEON pair) have it run once per group, left-padded beside the other
        groups' prefixes, and its cache copied to each row; the rest of each prompt then runs after it. A batch in
        which sharing would save little runs whole.

        `stops`: a capture hook ends each forward once its deepest layer has run (`capture`); the prefix's cache then
        holds those layers only, which is all the rest of the prompt needs, and nothing of the prefix is captured.
        """
        n = len(encoded)
        lengths = torch.tensor([len(e) for e in encoded])
        limits, how = self._prefix_plan(edits, lengths)
        keys = rows.tolist() if how == "per_row" and rows is not None else [0] * n
        groups = _prefix_groups(encoded, limits, keys)
        saved = sum((len(members) - 1) * size for size, members in groups)
        if saved < 0.25 * int(lengths.sum()):
            batch = self.batch(encoded)
            out = self._forward(hooks, batch.ids, batch.mask, batch.positions, rows, batch.prompt_lengths,
                                logits_to_keep=1, use_cache=not stops)
            return out, getattr(out, "cache", None), batch.mask.to(self.device), lengths
        prefixes = self.batch([list(encoded[members[0]][:size]) for size, members in groups])
        owner = torch.empty(n, dtype=torch.long)
        shared = torch.empty(n, dtype=torch.long)
        for g, (size, members) in enumerate(groups):
            owner[members] = g
            shared[members] = size
        per_row = how == "per_row" and rows is not None
        group_rows = torch.tensor([keys[members[0]] for _, members in groups]) if per_row else None
        cache = DynamicCache(config=self.model.config)
        if hooks is not None:
            hooks.editing, hooks.capturing = how != "clean", False
        try:
            self._forward(hooks, prefixes.ids, prefixes.mask, prefixes.positions, group_rows,
                          prefixes.prompt_lengths, cache=cache, logits_to_keep=1)
        except _StopForward:
            if not stops:
                raise
        finally:
            if hooks is not None:
                hooks.editing, hooks.capturing = True, True
        cache.batch_select_indices(owner.to(self.device))
        rest = self.batch([e[int(k):] for e, k in zip(encoded, shared)])
        mask = torch.cat([prefixes.mask[owner], rest.mask], dim=1)
        out = self._forward(hooks, rest.ids, mask, rest.positions + shared[:, None], rows, lengths, cache=cache,
                            step_mask=rest.mask, logits_to_keep=1)
        return out, out.cache, mask.to(self.device), lengths

    def _hooks(self, edits: Mapping[Site, Edit] | None):
        return hooked(self.model, edits) if edits else nullcontext(None)

    @staticmethod
    def _order(encoded: Sequence[Sequence[int]], batch_size: int) -> Iterator[list[int]]:
        """Indices in batches: prompts that share most of their tokens together (so that their prefix runs once),
        then by length, longest first (similar lengths pad little, and memory peaks show up at once)."""
        families = _prefix_groups(encoded, [len(e) - 1 for e in encoded], [0] * len(encoded), near=0.9)
        families.sort(key=lambda family: -max(len(encoded[i]) for i in family[1]))
        order = [i for _, members in families for i in sorted(members, key=lambda i: -len(encoded[i]))]
        for start in range(0, len(order), batch_size):
            yield order[start:start + batch_size]

    @staticmethod
    def _rows(rows: Sequence[int] | Tensor | None, index: list[int]) -> Tensor | None:
        if rows is None:
            return None
        return torch.as_tensor(rows, dtype=torch.long)[index]

    # --- generation ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 8,
                 edits: Mapping[Site, Edit] | None = None, rows: Sequence[int] | Tensor | None = None,
                 on_batch: Callable[[int], None] | None = None, stop_at_eos: bool = True,
                 sampling: Sampling | Sequence[Sampling] | None = None) -> list[str]:
        """Greedy decoding, batched with left padding; each row may carry its own edit through `rows`.

        `stop_at_eos=False` decodes max_new_tokens for every row whatever it says (the text is still cut at the
        first EOS): a throughput measurement then does the same work with and without an edit, which it would not
        if the edit changed how long the answers are.

        `sampling` (one for every prompt, or one per prompt) samples instead of decoding greedily and ends a text at
        its stop strings (see `Sampling`); left out, every row is greedy, as before."""
        encoded = self.prompt_ids(prompts, room=max_new_tokens)
        per_row = _per_row(sampling, len(prompts))
        outputs: list[str] = [""] * len(prompts)
        device = self.device
        eos = torch.tensor(self.eos_ids, device=device)
        pad = torch.tensor(self.tokenizer.pad_token_id, device=device)
        with self._hooks(edits) as hooks:
            for index in self._order(encoded, batch_size):
                row_ids = self._rows(rows, index)
                choosers = [per_row[i] for i in index]
                generators = [c.generator(device) for c in choosers]
                stops = [bool(c.stop) for c in choosers]
                out, cache, mask, lengths = self._prefill(hooks, edits, [encoded[i] for i in index], row_ids)
                next_pos = lengths.to(device)
                n = len(index)
                finished = torch.zeros(n, dtype=torch.bool, device=device)
                tokens: list[Tensor] = []
                for _ in range(max_new_tokens):
                    nxt = torch.where(finished, pad, _next_tokens(out.logits[:, -1], choosers, generators))
                    tokens.append(nxt)
                    finished |= torch.isin(nxt, eos)
                    if any(stops):
                        so_far = torch.stack(tokens, dim=1).tolist()
                        for row, chooser in enumerate(choosers):
                            if stops[row] and _stop_at(self.tokenizer.decode(so_far[row]), chooser.stop) is not None:
                                finished[row], stops[row] = True, False
                    if (stop_at_eos and bool(finished.all())) or len(tokens) == max_new_tokens:
                        break
                    mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype, device=device)], dim=1)
                    out = self._forward(hooks, nxt[:, None], mask, next_pos[:, None], row_ids, lengths, cache=cache,
                                        step_mask=torch.ones(n, 1))
                    next_pos = next_pos + 1
                generated = torch.stack(tokens, dim=1).cpu()
                for row, i in enumerate(index):
                    seq = generated[row].tolist()
                    cut = next((k for k, t in enumerate(seq) if t in self.eos_ids), len(seq))
                    text = self.tokenizer.decode(seq[:cut], skip_special_tokens=True)
                    end = _stop_at(text, choosers[row].stop)
                    outputs[i] = (text if end is None else text[:end]).strip()
                if on_batch:
                    on_batch(len(index))
        return outputs

    # --- label scoring -------------------------------------------------------------------------------------------
    def label_ids(self, labels: Sequence[str]) -> list[list[int]]:
        ids = [self.tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels]
        if any(not i for i in ids):
            raise ValueError(f"a label tokenizes to nothing: {labels}")
        return ids

    def calibrate(self, scores: np.ndarray, content_free: Sequence[str], labels: Sequence[str], batch_size: int = 8,
                  edits: Mapping[Site, Edit] | None = None, rows: Sequence[int] | None = None) -> np.ndarray:
        """Contextual calibration (Zhao et al. 2021) of `scores`, row i scored after a prompt whose content-free
        version is content_free[i]: log p(label | x) - log p(label | content-free x), each over the label set.

        Content-free prompts repeat across rows (always for a prompt without history), so each distinct
        (prompt, edit row) pair is scored once.
        """
        keys = [(p, rows[i] if rows is not None else -1) for i, p in enumerate(content_free)]
        unique = list(dict.fromkeys(keys))
        position = {key: i for i, key in enumerate(unique)}
        reference = self.score_labels([p for p, _ in unique], labels, batch_size, edits,
                                      [r for _, r in unique] if rows is not None else None)
        return log_normalise(scores) - log_normalise(reference[[position[k] for k in keys]])

    @torch.inference_mode()
    def score_labels(self, prompts: Sequence[str], labels: Sequence[str], batch_size: int = 8,
                     edits: Mapping[Site, Edit] | None = None, rows: Sequence[int] | Tensor | None = None,
                     on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """Log-likelihood of each label as the answer to each prompt, shape (len(prompts), len(labels)).

        The prompt runs once (its shared prefix once per batch, `_prefill`); every label's first token is read from
        the prompt's last logits, and the later tokens of all labels run together in one forward over the cached
        prompt, each label's tokens attending to the prompt and to the earlier tokens of the same label only. A
        15-label task costs one prompt forward plus one short one, and the cache is never copied per label.
        """
        label_ids = self.label_ids(labels)
        encoded = self.prompt_ids(prompts, room=max(len(i) for i in label_ids))
        scores = np.zeros((len(prompts), len(labels)), dtype=np.float64)
        tree = _LabelTree(label_ids)
        with self._hooks(edits) as hooks:
            for index in self._order(encoded, batch_size):
                row_ids = self._rows(rows, index)
                out, cache, mask, lengths = self._prefill(hooks, edits, [encoded[i] for i in index], row_ids)
                first = F.log_softmax(out.logits[:, -1].float(), dim=-1)
                total = first[:, tree.first]  # (n, labels)
                if tree.width:
                    n, device = len(index), self.device
                    step = self._forward(hooks, tree.inputs.expand(n, -1), self._tree_mask(mask, tree),
                                         lengths[:, None] + tree.offsets, row_ids, lengths, cache=cache,
                                         step_mask=torch.ones(n, tree.width), logits_to_keep=tree.width)
                    logp = F.log_softmax(step.logits.float(), dim=-1)
                    picked = logp.gather(-1, tree.targets.to(device).expand(n, -1)[..., None]).squeeze(-1)
                    total = total.index_add(1, tree.owner.to(device), picked)
                    cache.crop(-tree.width)
                scores[index] = total.cpu().numpy()
                if on_batch:
                    on_batch(len(index))
        return scores

    def _tree_mask(self, mask: Tensor, tree: "_LabelTree") -> Tensor:
        """The 4D attention mask of the label continuations: each sees the cached prompt (its real tokens) and the
        tokens of its own label up to itself, in the form the model's attention takes (boolean, or additive)."""
        device = self.device
        allowed = torch.cat([mask.bool()[:, None, None, :].expand(-1, 1, tree.width, -1),
                             tree.visible.to(device)[None, None].expand(mask.shape[0], -1, -1, -1)], dim=-1)
        if getattr(self.model.config, "_attn_implementation", "sdpa") == "eager":
            return torch.zeros(allowed.shape, dtype=self.dtype, device=device).masked_fill(
                ~allowed, torch.finfo(self.dtype).min)
        return allowed

    # --- hidden states -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self, texts: Sequence[str], sites: Sequence[Site], reduce: Literal["last", "mean"] = "last",
                batch_size: int = 8, render: bool = True, edits: Mapping[Site, Edit] | None = None,
                rows: Sequence[int] | Tensor | None = None) -> dict[Site, Tensor]:
        """Each site's output for each text, reduced to one vector per text: (len(texts), hidden) per site.

        The forward stops after the deepest site needed, so reading early layers costs only those layers.
        `render=False` reads the texts as they are (no chat template), e.g. prompt + answer pairs.
        """
        encoded = self.prompt_ids(texts) if render else [self.encode(t)[-self.max_length:] for t in texts]
        fn = last_token if reduce == "last" else mean_over_tokens
        deepest = max(s.layer for s in sites)
        result = {s: torch.zeros(len(texts), self.hidden_size) for s in sites}
        with hooked(self.model, edits, capture=list(sites), capture_fn=fn) as hooks:
            stop = self._stop_after(deepest)
            try:
                for index in self._order(encoded, batch_size):
                    for captured in hooks.captured.values():
                        captured.clear()
                    rows_of = self._rows(rows, index)
                    try:
                        if reduce == "last":  # the last token's state: a shared prefix may run once
                            self._prefill(hooks, edits, [encoded[i] for i in index], rows_of, stops=True)
                        else:
                            batch = self.batch([encoded[i] for i in index])
                            self._forward(hooks, batch.ids, batch.mask, batch.positions, rows_of,
                                          batch.prompt_lengths, logits_to_keep=1)
                    except _StopForward:
                        pass
                    for site in sites:
                        result[site][index] = hooks.captured[site][0]
            finally:
                stop.remove()
        return result

    def _stop_after(self, layer: int):
        def raise_stop(*_args: object) -> None:
            raise _StopForward
        from tailor.backbone.layers import decoder_layers

        # Registered last, so every capture hook on this layer has already run.
        return decoder_layers(self.model)[layer].register_forward_hook(raise_stop)

    # --- training ------------------------------------------------------------------------------------------------
    def sft_batch(self, prompts: Sequence[str], targets: Sequence[str], max_target_tokens: int = 64) -> Batch:
        """Prompt + target sequences whose labels cover the target tokens (and the end-of-turn token) only."""
        prompt_ids = self.prompt_ids(prompts, room=max_target_tokens + 1)
        sequences, labels, lengths = [], [], []
        end = self.eos_ids[:1]
        for p, target in zip(prompt_ids, targets):
            t = self.tokenizer(target, add_special_tokens=False)["input_ids"][:max_target_tokens] + end
            sequences.append(p + t)
            labels.append([-100] * len(p) + t)
            lengths.append(len(p))
        return self.batch(sequences, prompt_lengths=lengths, labels=labels)

    def sft_loss(self, batch: Batch, hooks: HookSet | None = None, rows: Tensor | None = None,
                 reduction: Literal["mean", "per_row"] = "mean", label_smoothing: float = 0.0) -> Tensor:
        """Next-token cross-entropy on the labelled (target) tokens; gradients flow into whatever the edits hold.

        Rows are left-padded, so the targets sit in the last columns: only the positions from the first labelled
        column on go through the LM head (at 2,048 prompt tokens, the full logits of a batch of 8 take 3 GB).
        """
        assert batch.labels is not None
        width = batch.labels.shape[1]
        labelled = (batch.labels != -100).any(0).nonzero()
        keep = min(width - int(labelled[0]) + 1, width) if len(labelled) else 1
        out = self._forward(hooks, batch.ids, batch.mask, batch.positions, rows, batch.prompt_lengths,
                            logits_to_keep=keep)
        logits = out.logits[:, :-1].float()
        target = batch.labels[:, width - keep + 1:].to(logits.device)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                               reduction="none", label_smoothing=label_smoothing).view(target.shape)
        counts = (target != -100).sum(-1).clamp(min=1)
        per_row = loss.sum(-1) / counts
        return per_row if reduction == "per_row" else loss.sum() / counts.sum()
