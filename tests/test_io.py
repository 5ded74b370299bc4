"""distill.core.io: the shared folder swap and file writes."""

from __future__ import annotations

import pytest

from distill.core.io import replace_folder


def _folder(path, text: str):
    path.mkdir()
    (path / "f.txt").write_text(text)
    return path


def test_replace_folder_installs_replaces_and_leaves_nothing_behind(tmp_path) -> None:
    final = tmp_path / "out"
    assert replace_folder(_folder(tmp_path / "new1", "one"), final) == final
    assert (final / "f.txt").read_text() == "one"
    replace_folder(_folder(tmp_path / "new2", "two"), final)
    assert (final / "f.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no tmp or old copy left


def test_replace_folder_keeps_the_old_folder_when_the_new_one_cannot_move(tmp_path) -> None:
    final = _folder(tmp_path / "out", "old")
    with pytest.raises(OSError):
        replace_folder(tmp_path / "missing", final)
    assert (final / "f.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
