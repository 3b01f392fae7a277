"""fileio.atomic_path: the one way the library writes files (results, plots, configs, checkpoints,
the checkpoint pointer, profiles)."""
import os

import pytest
import torch

from segpcl_fast.fileio import atomic_path, atomic_write_bytes, atomic_write_text


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["results.json"]


def test_writers_replace_the_whole_file_and_create_folders(tmp_path):
    path = atomic_write_text(tmp_path / "a" / "b.txt", "new\n")
    assert path.read_text() == "new\n"
    atomic_write_bytes(path, b"\x00\x01", durable=True)
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(path.parent) == ["b.txt"]


def test_torch_save_through_atomic_path(tmp_path):
    state = {"w": torch.arange(5.0)}
    with atomic_path(tmp_path / "ckpt.pt", durable=True) as tmp:
        torch.save(state, tmp)
    torch.testing.assert_close(torch.load(tmp_path / "ckpt.pt")["w"], state["w"])
    assert not tmp.exists()


def test_unwritable_dir_reason_names_the_path_that_blocks(tmp_path, monkeypatch):
    from segpcl_fast.fileio import unwritable_dir_reason
    assert unwritable_dir_reason(tmp_path / "new" / "run") is None
    assert not (tmp_path / "new").exists()  # asking creates nothing
    (tmp_path / "f").write_text("x")
    assert unwritable_dir_reason(tmp_path / "f") == f"{tmp_path / 'f'} exists and is not a folder"
    assert unwritable_dir_reason(tmp_path / "f" / "run") == f"{tmp_path / 'f'}, a parent of {tmp_path / 'f' / 'run'}, " \
                                                          f"is a file, not a folder"
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access  # root passes chmod 0o500; a read-only mount or `chattr +i` is what access() reports
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    assert unwritable_dir_reason(locked) == f"{locked} is not writable"
    assert unwritable_dir_reason(locked / "a" / "b") == f"{locked} is not writable (to make {locked / 'a' / 'b'} in it)"
