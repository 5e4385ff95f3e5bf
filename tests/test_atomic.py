from __future__ import annotations

import json

import pytest

from mathprm import atomic


def test_write_text_and_json(tmp_path):
    p = atomic.write_json(tmp_path / "a" / "b.json", {"x": 1})
    assert json.loads(p.read_text()) == {"x": 1}
    assert [f.name for f in p.parent.iterdir()] == ["b.json"]  # no temp file left behind


def test_directory_appears_only_when_complete(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic.directory(target) as tmp:
            (tmp / "part-0").write_text("half")
            raise RuntimeError("killed mid-write")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # the partial temp dir is gone too

    with atomic.directory(target) as tmp:
        (tmp / "part-0").write_text("done")
    assert (target / "part-0").read_text() == "done"


def test_directory_refuses_or_replaces_existing(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic.directory(target):
            pass
    with atomic.directory(target, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
        assert (target / "old").exists()  # the old one stays readable until the new one is complete
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
