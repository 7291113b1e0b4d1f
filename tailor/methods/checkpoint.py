"""Resumable fits: one helper saves a long fit's progress every few steps and restores it after a kill.

A trained fit (MT-LoRA's adapter, P2P's hypernetwork, PerFit's stage 1) keeps `checkpoint.pt` in the `workdir` the
runner hands it (the fit's folder in the fit cache). The file holds tensors, numbers, strings, lists and dicts only
and is read with `torch.load(weights_only=True)`, so loading a checkpoint can never run code. It is written to a
temporary file and renamed, so a kill while saving leaves the previous checkpoint. The fit's seconds are carried
across processes, so a resumed fit reports what the whole fit cost, not what its last process spent.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from tailor.atomic import atomic_path

CHECKPOINT = "checkpoint.pt"


class Checkpoint:
    """The progress of one fit in `workdir` (None: a fit run outside the fit cache, which saves nothing)."""

    def __init__(self, workdir: Path | None, every: int = 1):
        if every < 1:
            raise ValueError(f"a checkpoint every {every} steps: give 1 or more")
        self.path = workdir / CHECKPOINT if workdir is not None else None
        self.every = every
        self.step = 0
        """Steps finished before this process started (set by `restore`)."""
        self._spent = 0.0
        self._started = time.perf_counter()

    def restore(self) -> dict[str, Any] | None:
        """The fit state saved by an earlier process, or None when there is nothing to resume."""
        if self.path is None or not self.path.exists():
            return None
        saved = torch.load(self.path, weights_only=True)
        self.step, self._spent = int(saved["step"]), float(saved["seconds"])
        return saved["state"]

    @property
    def seconds(self) -> float:
        """The fit's seconds so far, over every process that worked on it."""
        return self._spent + time.perf_counter() - self._started

    def save(self, step: int, total: int, state: Callable[[], dict[str, Any]]) -> bool:
        """After `step` of `total` steps, save `state()` if a checkpoint is due (every `every` steps, and the last)."""
        if self.path is None or (step % self.every and step != total):
            return False
        with atomic_path(self.path) as tmp:
            torch.save({"step": step, "seconds": self.seconds, "state": state()}, tmp)
        return True

    @staticmethod
    def discard(workdir: Path) -> None:
        """Forget a fit's progress once what it learned is saved."""
        (workdir / CHECKPOINT).unlink(missing_ok=True)
