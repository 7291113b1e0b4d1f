"""Time-constrained DPO, CHAMELEON's compute-matched baseline (Zhang et al. 2025, section 4.5 and appendix A.5).

For each user, DPO (Rafailov et al. 2023, via trl's DPOTrainer) trains a LoRA adapter on exactly the synthetic
preference pairs CHAMELEON made for that user (chosen = the personalized answer, rejected = the neutral one), and
stops when its training has used the wall time CHAMELEON needed to personalize that user (CHAMELEON's whole time,
data generation included, while generating the same pairs is not charged to DPO: the comparison is generous to DPO).
The question is the paper's: with the same data and the same time, does a trained method catch up with
representation editing?

Hyper-parameters follow appendix A.5 (1 epoch, learning rate 5e-5, max grad norm 0.3, warm-up 0.1, cosine schedule,
AdamW, LoRA r=256, alpha=128, dropout 0.05) except nf4 quantisation, bfloat16 on a CPU without bfloat16
arithmetic, and the batch size: 2 instead of 16, so that the time cap can stop training between small steps instead
of overshooting it by one large one. The adapter is stored in the user's state and served through tailor's per-row
LoRA edit.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from tailor.backbone.device import native_bf16_cpu
from tailor.backbone.edits import Edit
from tailor.backbone.layers import Site
from tailor.backbone.lora import LoRAStack, load_peft
from tailor.methods.base import Progress
from tailor.methods.chameleon import Chameleon, ChameleonConfig
from tailor.store.paths import state_path
from tailor.store.state import UserState
from tailor.tasks.records import User


@dataclass
class DPOConfig(ChameleonConfig):
    budget_s: float | None = None
    """Per-user wall-time cap in seconds; used when `budget_run` gives no time for the user."""
    budget_run: str | None = None
    """A CHAMELEON run folder: each user's cap is the personalize time recorded in that user's saved state."""
    r: int = 256
    alpha: int = 128
    dropout: float = 0.05
    lr: float = 5e-5
    beta: float = 0.1
    train_batch: int = 2
    max_grad_norm: float = 0.3
    warmup_ratio: float = 0.1
    """Share of the epoch's steps spent warming up, rounded down: transformers rounds a ratio up, so a user with one
    step's worth of pairs (on LaMP-2M, 6 of 12 users with pairs) would train at learning rate 0, adapter left at 0."""
    max_length: int = 768
    bf16: bool | None = None
    """Train under bfloat16 autocast (the paper's precision); None: where the backbone's device computes bfloat16 in
    hardware (a CUDA device that supports it, a CPU with AMX or AVX512-BF16), where a step is faster than in float32
    (docs/benchmarks/chameleon-scopes.md), not where it is emulated."""


class TimeConstrainedDPO(Chameleon[DPOConfig]):
    """Reuses CHAMELEON's preference data (and its caches), then trains DPO for CHAMELEON's time per user."""

    name = "dpo"
    version = 3  # 2: warm-up rounded down, precision chosen by the CPU; 3: CHAMELEON 2's pairs
    update_note = "a per-user adapter trained on pairs made from the whole history: rebuilt"

    @property
    def fits(self) -> bool:
        return False

    @property
    def personalize_group(self) -> int | None:
        """One user at a time: each trains for at least as long as CHAMELEON took on them (minutes on a CPU), and
        the runner saves each group's states as it finishes, so a killed run loses one user's training, not a chunk's.
        The pairs come from CHAMELEON's caches, so batching their generation across users would save nothing."""
        return 1

    def budget(self, user: User) -> float:
        if self.config.budget_run:
            path = state_path(Path(self.config.budget_run) / "states", user.id)
            if path.exists():
                return float(UserState.load(path).header["personalize_s"])
        if self.config.budget_s is None:
            raise ValueError(f"dpo: no time budget for user {user.id!r}: set budget_s or budget_run (a CHAMELEON run "
                             "folder holding this user's state)")
        return self.config.budget_s

    def personalize_many(self, users: Sequence[User], progress: Progress = None) -> list[UserState]:
        states = []
        for user, pairs in zip(users, self.preference_data(users)):
            budget = self.budget(user)
            started = time.perf_counter()
            stack, steps = self._train(pairs.examples, budget) if pairs.examples else (None, 0)
            header = {**self._pairs_header(pairs), "budget_s": round(budget, 3), "dpo_steps": steps,
                      "dpo_s": round(time.perf_counter() - started, 3), "alpha": float(self.config.alpha)}
            states.append(self.new_state(user, header, stack.to_tensors() if stack is not None else {}))
            if progress:
                progress(1)
        return states

    def _train(self, examples: list[tuple[str, str, str]], seconds: float) -> tuple[LoRAStack, int]:
        """DPO on (prompt, chosen, rejected) for at most `seconds` (at least one optimiser step is taken)."""
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import TrainerCallback
        from trl import DPOConfig as TrlConfig
        from trl import DPOTrainer


        class Deadline(TrainerCallback):
            def __init__(self) -> None:
                self.end = time.perf_counter() + seconds

            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - transformers' callback API
                if time.perf_counter() >= self.end:
                    control.should_training_stop = True
                return control

        data = Dataset.from_list([
            {"prompt": [{"role": "user", "content": self._fit_prompt(prompt, max(chosen, rejected, key=len))}],
             "chosen": [{"role": "assistant", "content": chosen}],
             "rejected": [{"role": "assistant", "content": rejected}]} for prompt, chosen, rejected in examples])
        config = self.config
        epoch_steps = math.ceil(len(examples) / config.train_batch)
        with tempfile.TemporaryDirectory() as scratch:
            args = TrlConfig(output_dir=scratch, num_train_epochs=1, learning_rate=config.lr,
                             per_device_train_batch_size=config.train_batch, max_grad_norm=config.max_grad_norm,
                             warmup_steps=int(config.warmup_ratio * epoch_steps), lr_scheduler_type="cosine",
                             beta=config.beta, max_length=config.max_length, report_to=[], save_strategy="no",
                             logging_steps=1, seed=config.seed, use_cpu=self.backbone.device.type == "cpu",
                             disable_tqdm=True, bf16=self._bf16(),
                             gradient_checkpointing=False)  # trl's default recomputes activations; not needed
            lora = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                              target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
            # trl wraps the model it is given with the adapter; a copy keeps the shared backbone untouched.
            model = copy.deepcopy(self.backbone.model)
            for param in model.parameters():
                param.requires_grad_(False)
            trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=self.backbone.tokenizer,
                                 peft_config=lora, callbacks=[Deadline()])
            trainer.train()
            trainer.model.save_pretrained(scratch + "/adapter")
            return load_peft(scratch + "/adapter", self.backbone.model), int(trainer.state.global_step)

    def _bf16(self) -> bool:
        if self.config.bf16 is not None:
            return self.config.bf16
        device = self.backbone.device
        return torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu" and native_bf16_cpu()

    def _fit_prompt(self, prompt: str, answer: str) -> str:
        """Cut a long question from the left so question, chat markup and answer fit `max_length` (trl drops
        examples whose prompt fills it, and would cut the answer off otherwise)."""
        room = self.config.max_length - self.backbone.count_tokens(answer) - 48
        ids = self.backbone.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return prompt if len(ids) <= room else self.backbone.tokenizer.decode(ids[-max(room, 1):])

    def edits(self, states: Sequence[UserState]) -> Mapping[Site, Edit] | None:
        trained = [s for s in states if s.tensors]
        if not trained:
            return None
        stacks = []
        template = LoRAStack.from_tensors(trained[0].tensors, trained[0].header["alpha"])
        zero = LoRAStack({s: t * 0 for s, t in template.A.items()}, {s: t * 0 for s, t in template.B.items()},
                         template.alpha)
        for state in states:
            stacks.append(LoRAStack.from_tensors(state.tensors, state.header["alpha"]) if state.tensors else zero)
        return LoRAStack.concat(stacks).edits()
