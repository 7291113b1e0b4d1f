"""Atomic rewrites: a write that fails half way leaves the old file and no temporary file behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from tailor.atomic import atomic_path, write_json, write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    write_json(target, {"acc": 0.5})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"acc": 0.')  # the process dies here, half way through the new content
        raise RuntimeError("killed")
    assert target.read_text() == '{\n  "acc": 0.5\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_write_creates_missing_folders_and_replaces_the_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "report.md"
    write_text(target, "old")
    write_text(target, "new")
    assert target.read_text() == "new" and [p.name for p in target.parent.iterdir()] == ["report.md"]
