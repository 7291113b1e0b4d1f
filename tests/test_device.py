"""Device and precision: `auto` follows what the machine has, a missing device is one line before anything loads, and
device and dtype are recorded with every run and state."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tailor.backbone import device as device_module
from tailor.backbone.device import DeviceError, resolve_device, resolve_dtype
from tailor.eval.runner import run_eval
from tailor.runs.spec import EvalSpec
from tailor.store.state import UserState


def test_auto_is_cuda_when_present_else_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda:0")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DeviceError, match="2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("name, words", [("cuda", "no CUDA device"), ("cuda:0", "no CUDA device"),
                                         ("mps", "Metal"), ("tpu", "unknown device"), ("cuda:x", "cuda:N")])
def test_a_device_that_is_not_here_is_named(name: str, words: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=words):
        resolve_device(name)


def test_auto_precision_is_bfloat16_only_where_hardware_computes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    for features, expected in (({"avx2": True, "avx512": False, "avx512_bf16": False, "amx": False}, torch.float32),
                               ({"avx2": True, "avx512": True, "avx512_bf16": True, "amx": False}, torch.bfloat16),
                               ({"avx2": True, "avx512": True, "avx512_bf16": False, "amx": True}, torch.bfloat16)):
        monkeypatch.setattr(device_module, "cpu_features", lambda features=features: features)
        assert resolve_dtype("auto", cpu) == expected
    assert resolve_dtype("float16", cpu) == torch.float16
    assert resolve_dtype("float32", cpu) == torch.float32
    with pytest.raises(DeviceError, match="unknown dtype 'half'"):
        resolve_dtype("half", cpu)


@pytest.mark.parametrize("args, words", [(["--device", "cuda:99"], "CUDA device"),
                                         (["--dtype", "float8"], "unknown dtype")])
def test_the_cli_refuses_a_device_or_dtype_in_one_line_before_loading(tmp_path: Path, args: list[str],
                                                                      words: str) -> None:
    result = subprocess.run([sys.executable, "-m", "tailor.cli", "eval", "--task", "lamp2n", "--method", "none",
                             "--users", "1", "--out", str(tmp_path / "run"), *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and words in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_float16_runs_and_every_run_records_its_device_and_precision(tiny_model_dir: Path, lamp_dir: Path,
                                                                      tmp_path: Path) -> None:
    from tailor.backbone.model import Backbone

    spec = EvalSpec(task="lamp2n", method="rag", model=str(tiny_model_dir), device="cpu", dtype="float16",
                    data_dir=str(lamp_dir), users=2, options={"k": 1})
    backbone = Backbone.load(str(tiny_model_dir), device="cpu", dtype="float16")
    assert backbone.dtype == torch.float16 and backbone.device == torch.device("cpu")
    metrics = run_eval(spec, tmp_path, backbone)
    config = json.loads((tmp_path / "config.json").read_text())
    for record in (config, metrics):
        assert (record["device"], record["dtype"]) == ("cpu", "float16") and record["hardware"]
    state = UserState.load(next((tmp_path / "states").iterdir()))
    assert state.dtype == "float16"
    assert "| dtype | float16 |" in (tmp_path / "report.md").read_text()


def test_a_state_keeps_its_precision_and_loads_where_asked(tmp_path: Path) -> None:
    state = UserState("rag", 1, "u", "tiny/2x32", {"k": 1}, {"v": torch.ones(3, dtype=torch.bfloat16)}, "bfloat16")
    loaded = UserState.load(state.save(tmp_path / "u.safetensors"), device="cpu")
    assert loaded.dtype == "bfloat16" and loaded.tensors["v"].dtype == torch.bfloat16
    older = UserState("rag", 1, "u", "tiny/2x32", {"k": 1}, {"v": torch.ones(3)})  # made before dtype was kept
    assert UserState.load(older.save(tmp_path / "old.safetensors")).dtype is None


def test_gpus_per_worker_without_a_gpu_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import typer

    from tailor.cli._options import LOCAL, ray_options

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(typer.BadParameter, match="no CUDA device"):
        ray_options(LOCAL, workers=2, threads=1, gpus=0.5)
    assert ray_options(LOCAL, workers=2, threads=1, gpus=0.0).gpus == 0.0
    assert ray_options("10.0.0.1:6379", workers=2, threads=1, gpus=0.5).gpus == 0.5  # the cluster's GPUs, not ours
