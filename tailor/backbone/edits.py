"""Read and change hidden states with forward hooks, with a different user's edit on every row of a batch.

An edit is a small object called on the output of one module (a decoder layer, its MLP, its attention, or one of
their projections). It gets the module's output, a `ForwardContext` that says, for this forward, which user-parameter row each batch row uses
(`rows`), the absolute position of every token and how long each row's prompt is, and the module's input (which a
LoRA edit of a projection needs). Edits gather their per-row
parameters with `rows` and apply them with batched tensor ops, so a batch mixing many users runs in one forward
with no Python loop over rows and no model copy per user. That is what CHAMELEON, PerFit, StyleVector and the
server's mixed-user batches are built on.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Protocol

from torch import Tensor, nn

from tailor.backbone.layers import Site, site_module


@dataclass
class ForwardContext:
    """What an edit may need to know about the forward it runs in.

    `rows[b]` indexes the parameters of the user that batch row b belongs to (None when every row shares one edit).
    `positions[b, t]` is the absolute position of token t of row b (padding tokens get 0). `prompt_lengths[b]` is the
    number of real prompt tokens in row b, so an edit can tell prompt tokens from generated or target tokens.
    `mask[b, t]` is True for real (non-padding) tokens of this forward.
    """

    rows: Tensor | None = None
    positions: Tensor | None = None
    prompt_lengths: Tensor | None = None
    mask: Tensor | None = None


class Edit(Protocol):
    """An edit of one site's output. Two optional attributes let the backbone compute a prompt prefix that many rows
    share once instead of once per row (`Backbone._prefill`):

    - `untouched(prompt_lengths) -> Tensor`: per row, how many leading prompt tokens the edit never changes. An edit
      that reads `ctx.prompt_lengths` must define it (the shared prefix then ends before what it edits).
    - `same_for_every_row = True`: the edit does not depend on `ctx.rows` (a task-wide LoRA), so a prefix it edits
      is still the same for every row.

    An edit with neither is taken to change every position of each row in its own way.
    """

    def __call__(self, hidden: Tensor, ctx: ForwardContext, inputs: Tensor) -> Tensor: ...


def _replace_output(output: object, new_hidden: Tensor) -> object:
    if isinstance(output, Tensor):
        return new_hidden
    if isinstance(output, tuple):
        return (new_hidden, *output[1:])
    raise TypeError(f"cannot edit a module output of type {type(output).__name__}")


def _hidden_of(output: object) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple) and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot read hidden states from a module output of type {type(output).__name__}")


@dataclass
class HookSet:
    """Edits and captures installed on a model for the duration of a `with` block."""

    ctx: ForwardContext = field(default_factory=ForwardContext)
    captured: dict[Site, list[Tensor]] = field(default_factory=dict)
    editing: bool = True
    """False runs the edits' sites unchanged (a prompt prefix no edit reaches, computed once for every row)."""
    capturing: bool = True
    """False captures nothing (a shared prompt prefix, whose states are not the ones asked for)."""


@contextmanager
def hooked(
    model: nn.Module,
    edits: Mapping[Site, Edit] | None = None,
    capture: Iterator[Site] | list[Site] | tuple[Site, ...] = (),
    capture_fn: Callable[[Tensor, ForwardContext], Tensor] | None = None,
) -> Iterator[HookSet]:
    """Install edits and captures; the caller fills `HookSet.ctx` before each forward.

    Captured tensors are the (edited) outputs of each site, passed through `capture_fn` when given (for instance to
    keep only the last prompt token, so long batches do not hold every position of every layer in memory).
    """
    hooks = HookSet()
    handles = []
    try:
        for site, edit in (edits or {}).items():
            def edit_hook(_m: nn.Module, args: tuple, output: object, edit: Edit = edit) -> object:
                if not hooks.editing:
                    return None
                return _replace_output(output, edit(_hidden_of(output), hooks.ctx, args[0] if args else None))
            handles.append(site_module(model, site).register_forward_hook(edit_hook))
        for site in capture:
            hooks.captured[site] = []
            def capture_hook(_m: nn.Module, _i: object, output: object, site: Site = site) -> None:
                if not hooks.capturing:
                    return
                hidden = _hidden_of(output)
                hooks.captured[site].append(capture_fn(hidden, hooks.ctx) if capture_fn else hidden)
            # Registered after the edits so a capture sees the edited state of its own site.
            handles.append(site_module(model, site).register_forward_hook(capture_hook))
        yield hooks
    finally:
        for handle in handles:
            handle.remove()


def last_token(hidden: Tensor, _ctx: ForwardContext) -> Tensor:
    """Capture function keeping each row's last token: with left padding, the last prompt token of a prefill."""
    return hidden[:, -1, :].detach().float().cpu()


def mean_over_tokens(hidden: Tensor, ctx: ForwardContext) -> Tensor:
    """Capture function averaging each row's real tokens (padding excluded)."""
    if ctx.mask is None:
        return hidden.detach().float().mean(dim=1).cpu()
    weights = ctx.mask.to(hidden.dtype)[:, :, None]
    return ((hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)).detach().float().cpu()
