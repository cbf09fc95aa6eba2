"""files.py: a final file appears only complete; a failed write leaves the old content and no temp behind."""

import os

import pytest

from picochat.files import atomic_path, atomic_write_bytes, atomic_write_text


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "a.json"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert p.read_text() == "two" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(p.parent)) == ["a.json"]


def test_failure_mid_write_keeps_old_file(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            assert p.read_text() == "old"  # nothing visible under the final name while writing
            raise RuntimeError("writer died")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.txt"]


def test_directory_swap(tmp_path):
    out = tmp_path / "export"
    for content in ("first", "second"):
        with atomic_path(out, directory=True) as tmp:
            (tmp / "f").write_text(content)
    assert (out / "f").read_text() == "second"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(out, directory=True) as tmp:
            (tmp / "f").write_text("third")
            raise KeyboardInterrupt
    assert (out / "f").read_text() == "second"
    assert os.listdir(tmp_path) == ["export"]
