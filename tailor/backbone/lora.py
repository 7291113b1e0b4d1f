"""LoRA as a per-row edit: a stack of users' low-rank adapters applied in one forward, each row with its own.

LoRA (Hu et al. 2021, eq. 3) adds `scaling · B A x` to a frozen projection `W x`, with A: (r, in), B: (out, r) and
scaling = α / r. Here the adapters of many users are stacked, A: (users, r, in) and B: (users, out, r), and the edit
of a projection site gathers row b's adapter with the forward context's `rows`:

    output[b] + scaling · (x[b] @ A[rows[b]]ᵀ) @ B[rows[b]]ᵀ

so a batch mixing users costs one forward with two small batched matmuls per site, no model copy and no loop over
rows. The edit is differentiable: with A and B requiring gradients and the backbone frozen, the same edit trains
one adapter (multi-task LoRA), many users' adapters at once (one per row group) or, when a hypernetwork writes A
and B (Profile-to-PEFT), the hypernetwork.

Weights follow PEFT's conventions (lora_A weight (r, in), lora_B weight (out, r), A kaiming-uniform, B zero) and
export to PEFT's own adapter format (adapter_config.json + adapter_model.safetensors, keys like
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`), so `peft.PeftModel.from_pretrained` and
multi-LoRA servers (vLLM, LoRAX) read what tailor trains.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tailor.atomic import atomic_path
from tailor.backbone.edits import Edit, ForwardContext
from tailor.backbone.layers import Site, decoder_layers, site_module

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROJECTION_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_sites(model: nn.Module, targets: Sequence[str], layers: Sequence[int] | None = None) -> list[Site]:
    """The projection sites named by `targets` (e.g. ("q_proj", "v_proj")) in `layers` (default: every layer)."""
    unknown = [t for t in targets if t not in PROJECTION_KINDS]
    if unknown or not targets:
        raise ValueError(f"LoRA targets must be among {', '.join(PROJECTION_KINDS)}; got {list(targets)}")
    chosen = range(len(decoder_layers(model))) if layers is None else layers
    return [Site(kind, layer) for layer in chosen for kind in targets]  # type: ignore[arg-type]


def projection(model: nn.Module, site: Site) -> nn.Linear:
    module = site_module(model, site)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"site {site} is a {type(module).__name__}, not a linear projection LoRA can adapt")
    return module


def user_seed(seed: int, user_id: str) -> int:
    """A seed that depends on the user only, so a user's adapter does not depend on who is trained beside it."""
    return (seed * 1_000_003 + int(hashlib.sha256(user_id.encode()).hexdigest()[:12], 16)) % (2 ** 63)


class LoRAEdit:
    """One projection's LoRA for a batch: row b uses adapter `rows[b]`, or adapter 0 for every row when `shared`."""

    def __init__(self, A: Tensor, B: Tensor, scaling: float, shared: bool = False, dropout: float = 0.0):
        self.A = A
        self.B = B
        self.scaling = scaling
        self.shared = shared
        self.dropout = dropout

    @property
    def same_for_every_row(self) -> bool:
        """A shared adapter edits every row alike, so a prompt prefix the rows share is still shared under it."""
        return self.shared

    def __call__(self, hidden: Tensor, ctx: ForwardContext, inputs: Tensor) -> Tensor:
        """The adapter's product in the adapter's own precision (float32 under a bfloat16 backbone, as peft computes
        it), added to the projection's output in the backbone's."""
        A, B = self.A.to(inputs.device), self.B.to(inputs.device)
        x = inputs.to(A.dtype)
        x = F.dropout(x, self.dropout, training=True) if self.dropout > 0 else x
        if self.shared or ctx.rows is None:
            if not self.shared and A.shape[0] != 1:
                raise ValueError(f"a stack of {A.shape[0]} adapters needs per-row `rows` in the forward")
            delta = (x @ A[0].T) @ B[0].T
        else:
            delta = torch.matmul(torch.matmul(x, A[ctx.rows].transpose(1, 2)), B[ctx.rows].transpose(1, 2))
        return hidden + (self.scaling * delta).to(hidden.dtype)


class Chain:
    """Several edits of one site applied in turn (e.g. OPPU's shared base LoRA, then the user's own)."""

    def __init__(self, edits: Sequence[Edit]):
        self.edits = list(edits)

    def __call__(self, hidden: Tensor, ctx: ForwardContext, inputs: Tensor) -> Tensor:
        for edit in self.edits:
            hidden = edit(hidden, ctx, inputs)
        return hidden


def combine(*edit_maps: Mapping[Site, Edit] | None) -> dict[Site, Edit]:
    """Merge edit maps; a site edited by several maps gets a `Chain` of their edits, in the order given."""
    per_site: dict[Site, list[Edit]] = {}
    for edits in edit_maps:
        for site, edit in (edits or {}).items():
            per_site.setdefault(site, []).append(edit)
    return {site: found[0] if len(found) == 1 else Chain(found) for site, found in per_site.items()}


@dataclass
class LoRAStack:
    """LoRA adapters of `users` users on the same projection sites: A[site] (users, r, in), B[site] (users, out, r)."""

    A: dict[Site, Tensor]
    B: dict[Site, Tensor]
    alpha: float

    def __post_init__(self) -> None:
        if set(self.A) != set(self.B) or not self.A:
            raise ValueError("a LoRA stack needs A and B for the same, non-empty set of sites")

    @property
    def sites(self) -> list[Site]:
        return sorted(self.A)

    @property
    def r(self) -> int:
        return int(next(iter(self.A.values())).shape[1])

    @property
    def users(self) -> int:
        return int(next(iter(self.A.values())).shape[0])

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def parameters_per_user(self) -> int:
        return sum(self.A[s][0].numel() + self.B[s][0].numel() for s in self.sites)

    @classmethod
    def init(cls, model: nn.Module, sites: Sequence[Site], r: int, alpha: float, seeds: Sequence[int]) -> "LoRAStack":
        """Fresh adapters as PEFT makes them: A kaiming-uniform (a=√5, i.e. U(±1/√in)), B zero; one seed per user."""
        A: dict[Site, list[Tensor]] = {s: [] for s in sites}
        B: dict[Site, list[Tensor]] = {s: [] for s in sites}
        shapes = {s: (projection(model, s).in_features, projection(model, s).out_features) for s in sites}
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            for site in sorted(sites):
                fan_in, fan_out = shapes[site]
                bound = 1.0 / math.sqrt(fan_in)
                A[site].append((torch.rand(r, fan_in, generator=generator) * 2 - 1) * bound)
                B[site].append(torch.zeros(fan_out, r))
        return cls({s: torch.stack(v) for s, v in A.items()}, {s: torch.stack(v) for s, v in B.items()}, alpha)

    def parameters(self) -> list[Tensor]:
        return [t for s in self.sites for t in (self.A[s], self.B[s])]

    def to(self, device: torch.device | str) -> "LoRAStack":
        """The same adapters on `device` (their dtype is kept: float32 adapters stay float32 on any backbone)."""
        return LoRAStack({s: t.to(device) for s, t in self.A.items()}, {s: t.to(device) for s, t in self.B.items()},
                         self.alpha)

    def trainable(self) -> "LoRAStack":
        """A copy whose tensors are leaves that require gradients."""
        return LoRAStack({s: t.detach().clone().requires_grad_(True) for s, t in self.A.items()},
                         {s: t.detach().clone().requires_grad_(True) for s, t in self.B.items()}, self.alpha)

    def detach(self) -> "LoRAStack":
        return LoRAStack({s: t.detach().clone() for s, t in self.A.items()},
                         {s: t.detach().clone() for s, t in self.B.items()}, self.alpha)

    def select(self, users: Sequence[int]) -> "LoRAStack":
        index = torch.as_tensor(list(users), dtype=torch.long)
        return LoRAStack({s: t[index] for s, t in self.A.items()}, {s: t[index] for s, t in self.B.items()},
                         self.alpha)

    @classmethod
    def concat(cls, stacks: Sequence["LoRAStack"]) -> "LoRAStack":
        """Stack the users of several stacks (same sites, rank and alpha) into one, in order."""
        first = stacks[0]
        if any(s.sites != first.sites or s.r != first.r or s.alpha != first.alpha for s in stacks):
            raise ValueError("only LoRA stacks with the same sites, rank and alpha can be stacked")
        return cls({s: torch.cat([k.A[s] for k in stacks]) for s in first.sites},
                   {s: torch.cat([k.B[s] for k in stacks]) for s in first.sites}, first.alpha)

    def edits(self, shared: bool = False, dropout: float = 0.0) -> dict[Site, LoRAEdit]:
        return {s: LoRAEdit(self.A[s], self.B[s], self.scaling, shared, dropout) for s in self.sites}

    # --- one user's adapter as named tensors (a UserState's payload) --------------------------------------------
    def to_tensors(self, user: int = 0) -> dict[str, Tensor]:
        out = {}
        for site in self.sites:
            out[f"{site}.lora_A"] = self.A[site][user].detach().contiguous()
            out[f"{site}.lora_B"] = self.B[site][user].detach().contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], alpha: float) -> "LoRAStack":
        """One user's adapter from `to_tensors` output (other tensors in the mapping are ignored)."""
        A = {Site.parse(k[:-len(".lora_A")]): v[None] for k, v in tensors.items() if k.endswith(".lora_A")}
        B = {Site.parse(k[:-len(".lora_B")]): v[None] for k, v in tensors.items() if k.endswith(".lora_B")}
        return cls(A, B, alpha)


def rank_concat(parts: Sequence[LoRAStack]) -> LoRAStack:
    """Adapters summed into one of rank Σr: A = [A_1; A_2], B = [s_1 B_1, s_2 B_2], alpha = Σr (scaling 1).

    Σ s_i B_i A_i x = [s_1 B_1, s_2 B_2] [A_1; A_2] x, so OPPU's base + personal LoRA is exactly one ordinary LoRA
    that PEFT and multi-LoRA servers can load. Every part must hold the same number of users; a site a part does not
    adapt gets zeros in that part's rows (OPPU's base adapts q, k and v, its users q and v).
    """
    users = parts[0].users
    if any(p.users != users for p in parts):
        raise ValueError("rank_concat needs stacks with the same number of users")
    sites = sorted({s for p in parts for s in p.sites})
    shapes = {s: (p.A[s].shape[2], p.B[s].shape[1]) for p in parts for s in p.sites}  # (in, out)

    def a_of(p: LoRAStack, s: Site) -> Tensor:
        return p.A[s] if s in p.A else torch.zeros(users, p.r, shapes[s][0], device=p.A[p.sites[0]].device)

    def b_of(p: LoRAStack, s: Site) -> Tensor:
        return p.B[s] * p.scaling if s in p.B else torch.zeros(users, shapes[s][1], p.r,
                                                                device=p.B[p.sites[0]].device)

    A = {s: torch.cat([a_of(p, s) for p in parts], dim=1) for s in sites}
    B = {s: torch.cat([b_of(p, s) for p in parts], dim=2) for s in sites}
    return LoRAStack(A, B, float(sum(p.r for p in parts)))


# --- PEFT's adapter format --------------------------------------------------------------------------------------
def module_names(model: nn.Module, sites: Sequence[Site]) -> dict[Site, str]:
    """The dotted module path (as in `named_modules`) of each site's projection."""
    names = {id(module): name for name, module in model.named_modules()}
    return {site: names[id(projection(model, site))] for site in sites}


def _peft_targets(model: nn.Module, sites: Sequence[Site], names: Mapping[Site, str]) -> list[str]:
    """Projection names when every layer is adapted alike (what servers expect), else the full module paths."""
    kinds = sorted({s.kind for s in sites})
    every = {Site(kind, layer) for kind in kinds for layer in range(len(decoder_layers(model)))}  # type: ignore[arg-type]
    return kinds if set(sites) == every else sorted(names[s] for s in sites)


def save_peft(stack: LoRAStack, model: nn.Module, folder: str | Path, user: int = 0,
              base_model: str | None = None) -> Path:
    """Write one user's adapter of `stack` as a PEFT LoRA folder for `model` (PeftModel.from_pretrained reads it)."""
    from peft import LoraConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = module_names(model, stack.sites)
    config = LoraConfig(r=stack.r, lora_alpha=stack.alpha, target_modules=_peft_targets(model, stack.sites, names),
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model,
                        inference_mode=True)
    tensors = {}
    for site in stack.sites:
        prefix = f"base_model.model.{names[site]}"
        tensors[f"{prefix}.lora_A.weight"] = stack.A[site][user].detach().float().cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = stack.B[site][user].detach().float().cpu().contiguous()
    with atomic_path(folder / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config.save_pretrained(str(folder))
    return folder


def load_peft(folder: str | Path, model: nn.Module) -> LoRAStack:
    """Read a PEFT LoRA folder written for `model` (by tailor or by PEFT) into a one-user stack, in float32 on the
    model's device."""
    folder = Path(folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA" or config.get("use_rslora") or config.get("use_dora"):
        raise ValueError(f"{folder}: only plain LoRA adapters (no rsLoRA, no DoRA) can be read")
    weights = load_file(str(folder / ADAPTER_WEIGHTS))
    candidates = []
    for layer in range(len(decoder_layers(model))):
        for kind in PROJECTION_KINDS:
            try:
                candidates.append((Site(kind, layer), projection(model, Site(kind, layer))))  # type: ignore[arg-type]
            except ValueError:
                continue
    by_name = {name: site for site, name in module_names(model, [s for s, _ in candidates]).items()}
    A, B = {}, {}
    for key, tensor in weights.items():
        stem = key.removeprefix("base_model.model.")
        for part, store in ((".lora_A.weight", A), (".lora_B.weight", B)):
            if stem.endswith(part):
                name = stem[:-len(part)]
                if name not in by_name:
                    raise ValueError(f"{folder}: {key} names no projection of this model")
                store[by_name[name]] = tensor[None].float()
    return LoRAStack(A, B, float(config["lora_alpha"])).to(next(model.parameters()).device)
