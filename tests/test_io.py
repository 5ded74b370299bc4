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


def test_atomic_dir_installs_on_success_and_leaves_nothing_on_error(tmp_path) -> None:
    import os

    from distill.core.io import atomic_dir, stale_temporaries

    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "f.txt").write_text("one")
        assert not final.exists()  # nothing is visible before the block ends
    assert (final / "f.txt").read_text() == "one"
    mask = os.umask(0)
    os.umask(mask)
    assert final.stat().st_mode & 0o777 == 0o777 & ~mask  # as mkdir makes it, not 0700
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "f.txt").write_text("half")
        raise RuntimeError("killed half-way")
    assert (final / "f.txt").read_text() == "one"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not stale_temporaries(final)
    with atomic_dir(final) as tmp:  # replace (the default)
        (tmp / "f.txt").write_text("two")
    assert (final / "f.txt").read_text() == "two"


def test_atomic_dir_keeps_what_another_process_finished_first(tmp_path) -> None:
    from distill.core.io import atomic_dir

    final = tmp_path / "entry"
    with atomic_dir(final, replace=False) as tmp:
        (tmp / "f.txt").write_text("mine")
        _folder(final, "theirs")  # another process renames its entry in meanwhile
    assert (final / "f.txt").read_text() == "theirs"
    # keep: an existing entry that is complete wins even with replace; a broken one is replaced
    with atomic_dir(final, keep=lambda f: (f / "f.txt").read_text() == "theirs") as tmp:
        (tmp / "f.txt").write_text("mine")
    assert (final / "f.txt").read_text() == "theirs"
    (final / "f.txt").write_text("broken")
    with atomic_dir(final, keep=lambda f: (f / "f.txt").read_text() == "theirs") as tmp:
        (tmp / "f.txt").write_text("mine")
    assert (final / "f.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]
