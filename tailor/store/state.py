"""A user's personalized state: tensors plus a small JSON header, saved as one safetensors file.

Every method's `personalize` returns a `UserState`; what it holds differs (a BM25-ready history, a profile summary,
steering directions, a low-rank intervention, LoRA weights), the container does not. The header records the method,
its version and the backbone, so a state is never silently used with a method or model it was not made for, and a
checksum over header and tensors, so a corrupt file is an error instead of a wrong answer. Files are written to a
temporary name and renamed, so a killed process never leaves half a state.

Tensors are saved from the CPU and loaded onto the device a method asks for. A state also records the precision of
the backbone it was made with (`dtype`); used with the same backbone in another precision it is cast, not refused:
methods apply a state's tensors in the hidden states' precision (LoRA in float32), and tests/test_contract.py checks
that answers from float32 and bfloat16 agree within the tolerance it states.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from tailor.atomic import atomic_path

FORMAT_VERSION = 1


class StateError(ValueError):
    """A saved state is corrupt, truncated, or made for another method version or backbone."""


@dataclass
class UserState:
    method: str
    version: int
    user_id: str
    model_id: str | None
    header: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)
    dtype: str | None = None
    """The backbone's precision when the state was made (None: made without a backbone, or before it was kept)."""
    runtime: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """Objects derived from the state (a BM25 index, stacked tensors) kept for reuse; never saved."""

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data alone: what a state holds on an accelerator. Not what storing it costs: the header
        can be most of the saved file (RAG, PAG and the priors keep the user's history there as text, and hold no
        tensors at all), so runs record the saved file's size as state bytes (`tailor.runs.chunks.state_bytes`)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def _meta(self) -> dict[str, Any]:
        meta = {"format": FORMAT_VERSION, "method": self.method, "version": self.version, "user_id": self.user_id,
                "model_id": self.model_id, "header": self.header}
        return meta if self.dtype is None else {**meta, "dtype": self.dtype}

    def checksum(self) -> str:
        digest = hashlib.sha256(json.dumps(self._meta(), sort_keys=True).encode())
        for name in sorted(self.tensors):
            tensor = self.tensors[name].detach().contiguous().cpu()
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        return digest.hexdigest()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        metadata = {"tailor": json.dumps(self._meta(), sort_keys=True), "sha256": self.checksum()}
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path

    def to(self, device: torch.device | str) -> "UserState":
        """The state with its tensors on `device` (what a method creates on an accelerator is saved from the CPU)."""
        return UserState(self.method, self.version, self.user_id, self.model_id, self.header,
                         {k: v.to(device) for k, v in self.tensors.items()}, self.dtype)

    @classmethod
    def load(cls, path: str | Path, method: str | None = None, version: int | None = None,
             model_id: str | None = None, device: torch.device | str = "cpu") -> "UserState":
        """Read a state onto `device`, refusing it (with the reason) if it is corrupt or made for another method or
        backbone."""
        path = Path(path)
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as error:
            raise StateError(f"{path}: cannot read the state file ({error}); it is corrupt or truncated") from error
        if "tailor" not in metadata:
            raise StateError(f"{path}: not a tailor state (no tailor header)")
        meta = json.loads(metadata["tailor"])
        state = cls(meta["method"], meta["version"], meta["user_id"], meta["model_id"], meta["header"], tensors,
                    meta.get("dtype"))
        if state.checksum() != metadata.get("sha256"):
            raise StateError(f"{path}: checksum mismatch for user {state.user_id!r}; the file is corrupt")
        if method is not None and state.method != method:
            raise StateError(f"{path}: state of method {state.method!r}, expected {method!r}")
        if version is not None and state.version != version:
            raise StateError(f"{path}: state made by {state.method} version {state.version}, this tailor needs "
                             f"version {version}; personalize the user again")
        if model_id is not None and state.model_id not in (None, model_id):
            raise StateError(f"{path}: state made for backbone {state.model_id!r}, not {model_id!r}")
        return state.to(device) if str(device) != "cpu" else state
