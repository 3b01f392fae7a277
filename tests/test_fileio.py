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
