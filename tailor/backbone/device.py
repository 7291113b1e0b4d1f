"""Where and in what precision the backbone runs, chosen from what the machine has, never assumed.

`--device auto` is the first CUDA device when one is present, else the CPU (Apple's `mps` only when asked for).
`--dtype auto` is bfloat16 where it is computed in hardware, float32 elsewhere: on a CUDA device that supports it,
and on a CPU with AVX512-BF16 or AMX. CPUs differ here: one EPYC with AVX512-BF16 ran the packaged model 2.2-2.8x
faster in bfloat16 than in float32, another with only AVX2 ran it 7-12x slower (bfloat16 emulated), and a Xeon with
AMX was fast in it (BENCHMARKS.md). A device that is not there, or a precision a device cannot run, is one line
before anything loads (`DeviceError`).
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Literal

import torch

DeviceName = str
"""auto, cpu, cuda, cuda:N or mps."""
DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DeviceError(ValueError):
    """A device that is not available here, or a precision this device cannot compute in."""


def cpu_features() -> dict[str, bool]:
    """The CPU's vector and matrix extensions that decide float32 and bfloat16 speed, as PyTorch detects them."""
    probes = {"avx2": "_is_avx2_supported", "avx512": "_is_avx512_supported",
              "avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported"}
    return {name: bool(getattr(torch.cpu, probe, lambda: False)()) for name, probe in probes.items()}


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bfloat16 matrix products in hardware (AVX512-BF16 or AMX)."""
    features = cpu_features()
    return features["avx512_bf16"] or features["amx"]


def resolve_device(name: DeviceName = "auto") -> torch.device:
    """The torch device for a `--device` value; DeviceError (one line) when it is not available here."""
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise DeviceError("--device mps: Apple's Metal backend is not available on this machine")
        return torch.device("mps")
    if text == "cuda" or text.startswith("cuda:"):
        index_text = text.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise DeviceError(f"--device {name}: expected cuda or cuda:N with N a device number")
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: no CUDA device is available here (torch {torch.__version__}, "
                              f"built {'with' if torch.version.cuda else 'without'} CUDA); use --device cpu or auto")
        count = torch.cuda.device_count()
        if int(index_text) >= count:
            raise DeviceError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return torch.device(f"cuda:{index_text}")
    raise DeviceError(f"unknown device {name!r}; expected auto, cpu, cuda, cuda:N or mps")


def resolve_dtype(name: DTypeName | str, device: torch.device) -> torch.dtype:
    """The torch dtype for a `--dtype` value on `device`; `auto` picks bfloat16 only where hardware computes it."""
    text = str(name).strip().lower()
    if text == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        if device.type == "cpu" and native_bf16_cpu():
            return torch.bfloat16
        return torch.float32
    if text not in DTYPES:
        raise DeviceError(f"unknown dtype {name!r}; expected auto, {', '.join(DTYPES)}")
    if text == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} does not support it; use float16")
    return DTYPES[text]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe_device(device: torch.device) -> str:
    """One line naming the hardware behind a device, recorded beside every number measured on it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        model = next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines()
                      if line.startswith("model name")), platform.processor() or platform.machine())
        extensions = [name for name, present in cpu_features().items() if present]
        return f"{model} ({', '.join(extensions) or 'no AVX2'}; {torch.get_num_threads()} threads)"
    return device.type


def _cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    return path.read_text() if path.exists() else ""
