"""fileio.atomic_path: the one way the library writes files (results, plots, configs, checkpoints,
the checkpoint pointer, profiles)."""
import os
import pickle
from pathlib import Path

import pytest
import torch

from segpcl_fast.fileio import (UnsafeFileError, atomic_path, atomic_write_bytes, atomic_write_text, load_torch_file,
                                remove_stale_temps)


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


def test_unwritable_dir_reason_tries_a_file_where_access_passes(tmp_path, monkeypatch):
    """access() passes root, and /proc or /sys refuse a file it allows: a temp file is made and removed to
    know, and nothing is left behind; an append-only folder (made, not removed) is named as such."""
    from segpcl_fast.fileio import unwritable_dir_reason
    assert unwritable_dir_reason(tmp_path / "new" / "run") is None and os.listdir(tmp_path) == []
    assert unwritable_dir_reason(tmp_path) is None and os.listdir(tmp_path) == []
    real_open, real_unlink = os.open, Path.unlink

    def refuse(path, *args, **kwargs):
        if Path(path).parent == tmp_path:
            raise PermissionError(1, "Operation not permitted", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", refuse)
    assert unwritable_dir_reason(tmp_path / "a" / "b") == (f"{tmp_path} refuses new files (Operation not "
                                                           f"permitted), so {tmp_path / 'a' / 'b'} cannot be made")
    assert unwritable_dir_reason(tmp_path) == f"{tmp_path} refuses new files (Operation not permitted)"
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(os, "open", real_open)

    def keep(self, *args, **kwargs):
        if self.parent == tmp_path:
            raise PermissionError(1, "Operation not permitted", str(self))
        return real_unlink(self, *args, **kwargs)
    monkeypatch.setattr(Path, "unlink", keep)
    reason = unwritable_dir_reason(tmp_path)
    left = os.listdir(tmp_path)
    assert reason == (f"{tmp_path} lets files be made but not removed or renamed (Operation not permitted; "
                      f"{left[0]} is left there)") and len(left) == 1


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_dir_in_proc_is_refused_before_the_run_starts(tmp_path):
    """`-o /proc/foo` ran the model and data set-up and then failed with the OS's bare message; `-o /proc`
    failed listing /proc for runs below it (a pid folder gone while listed)."""
    from segpcl_fast.api import train
    from segpcl_fast.config import ConfigError, runs_below
    assert runs_below("/proc") == []
    for out in ("/proc", "/proc/segpcl-out/run"):
        with pytest.raises(ConfigError, match=r"run\.output_dir: /proc (refuses new files|is not writable).*-o"):
            train(run__output_dir=out)


def test_remove_stale_temps_takes_only_atomic_paths_leftovers(tmp_path):
    with pytest.raises(KeyboardInterrupt):  # what a killed process leaves: simulate it by keeping the temp
        with atomic_path(tmp_path / "task_01.pt") as tmp:
            kept = tmp.with_name(tmp.name)
            os.link(tmp, tmp_path / "keep_for_test")
            raise KeyboardInterrupt
    os.replace(tmp_path / "keep_for_test", kept)  # the temp name atomic_path made, as a SIGKILL leaves it
    others = ["task_01.pt.tmp", ".task_01.pt.tmp", "notes.tmp", ".hidden", ".a.toolong123.tmp"]
    for name in others:
        (tmp_path / name).write_text("x")
    (tmp_path / ".sub.abcdefgh.tmp").mkdir()  # a folder with a matching name is not ours
    (tmp_path / ".notes.md.abcd1234.tmp").write_text("another tool's temp, in a shared folder")
    assert remove_stale_temps(tmp_path, lambda name: name == "task_01.pt") == [kept]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others + [".sub.abcdefgh.tmp", ".notes.md.abcd1234.tmp"])
    assert remove_stale_temps(tmp_path / "missing", lambda name: True) == []


def test_a_temp_that_cannot_be_made_is_reported_under_the_targets_name(tmp_path):
    with pytest.raises(FileNotFoundError) as e:  # /proc takes no new files, even from root
        atomic_write_text("/proc/segpcl_out.json", "{}")
    assert e.value.filename == "/proc/segpcl_out.json"
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    try:
        if not os.access(tmp_path / "ro", os.W_OK):  # root may write anywhere: no permission error to see
            with pytest.raises(PermissionError) as e:
                atomic_write_text(tmp_path / "ro" / "out.json", "{}")
            assert e.value.filename == str(tmp_path / "ro" / "out.json")
    finally:
        os.chmod(tmp_path / "ro", 0o700)


class _Code:
    def __reduce__(self):
        return (print, ("ran",))


def test_load_torch_file_reads_tensors_and_plain_values_only(tmp_path, capsys):
    state = {"w": torch.arange(3), "names": ["a", "b"], "n": 2, "cfg": {"lr": 1e-3, "x": None}, "t": (1, "a")}
    torch.save(state, tmp_path / "ok.pt")
    got = load_torch_file(tmp_path / "ok.pt")
    assert torch.equal(got["w"], state["w"]) and {k: v for k, v in got.items() if k != "w"} == \
        {k: v for k, v in state.items() if k != "w"}
    torch.save({"x": _Code()}, tmp_path / "code.pt")
    with pytest.raises(UnsafeFileError, match=r"code.pt holds Python objects besides tensors and plain values \(.*GLOBAL .*print[^;]*\); "):
        load_torch_file(tmp_path / "code.pt")
    assert "ran" not in capsys.readouterr().out
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")  # no torch file: not "unsafe", and one line
    with pytest.raises(pickle.UnpicklingError, match=r"^not a torch file \(Unsupported operand \d+\)$"):
        load_torch_file(tmp_path / "junk.pt")  # without torch's advice to retry with weights_only=False


def test_a_torch_file_whose_bytes_changed_is_refused_not_loaded(tmp_path, zero_block):
    """torch.load reads a tensor record with changed bytes as if nothing were wrong; the CRC-32 torch.save
    stores per record catches it (a damaged checkpoint resumed into NaN losses, or other weights)."""
    from segpcl_fast.fileio import DamagedFileError
    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(20000.0)}, path)
    assert torch.equal(load_torch_file(path)["w"], torch.arange(20000.0))
    zero_block(path)
    assert not torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(20000.0))  # what torch gives
    with pytest.raises(DamagedFileError, match=r"its bytes changed after it was written \(BadZipFile: Bad CRC-32 for file "
                                               r"'data/0'\): a damaged copy or disk"):
        load_torch_file(path)


def test_a_torch_file_saved_without_crcs_still_loads(tmp_path):
    """torch.utils.serialization.config.save.compute_crc32=False stores 0 for every CRC: nothing to check."""
    serialization = pytest.importorskip("torch.utils.serialization")
    if not hasattr(serialization.config.save, "compute_crc32"):
        pytest.skip("this torch always stores CRCs")
    path = tmp_path / "w.pt"
    with serialization.config.patch({"save.compute_crc32": False}):
        torch.save({"w": torch.arange(20000.0)}, path)
    import zipfile
    assert {info.CRC for info in zipfile.ZipFile(path).infolist()} == {0}
    assert torch.equal(load_torch_file(path)["w"], torch.arange(20000.0))


def _with_file_size_limit(limit_bytes, fn):
    """Run fn() in a forked child under RLIMIT_FSIZE (a `ulimit -f`); return what it raised, as text."""
    import multiprocessing as mp
    import resource

    def child(queue):
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
        try:
            fn()
            queue.put("no error")
        except BaseException as e:  # noqa: BLE001
            queue.put(f"{type(e).__name__}|{getattr(e, 'errno', None)}|{getattr(e, 'filename', None)}|{e}")
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(queue,))
    proc.start()
    proc.join(60)
    return queue.get(timeout=5)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork (RLIMIT_FSIZE in a child)")
def test_a_write_past_a_file_size_limit_names_the_file_and_leaves_nothing(tmp_path):
    """`ulimit -f`: Path.write_text raised OSError(EFBIG) naming no file, torch.save a RuntimeError
    ("enforce fail at inline_container.cc ... unexpected pos"): both now name the target and the cause."""
    import errno

    from segpcl_fast.fileio import save_torch_file
    target = tmp_path / "results.json"
    got = _with_file_size_limit(4096, lambda: atomic_write_text(target, "x" * 100_000))
    name, code, filename, text = got.split("|", 3)
    assert (name, int(code), filename) == ("OSError", errno.EFBIG, str(target)), got
    assert "while writing it (a file-size limit: `ulimit -f` in this shell" in text
    ckpt = tmp_path / "task_00.pt"
    got = _with_file_size_limit(1 << 16, lambda: save_torch_file({"w": torch.zeros(100_000)}, ckpt))
    name, code, filename, text = got.split("|", 3)
    assert name == "OSError" and filename == str(ckpt), got
    assert "torch.save could not write it" in text or "a file-size limit" in text, got
    assert sorted(os.listdir(tmp_path)) == []  # no temp file, no half target


def test_an_interrupt_right_after_the_temp_file_is_made_leaves_no_temp_file(tmp_path, monkeypatch):
    """A KeyboardInterrupt (Ctrl-C, or the CLI's SIGTERM handler) the moment the temp file exists, before
    any code after its creation runs: mkstemp's name was recorded only after it returned, so the file
    stayed ('.config.yaml.XXXXXXXX.tmp', 1 in 37 SIGTERMs). Blocking the signals in this thread did not
    hold them when another thread of the process took the signal (seen in the full suite)."""
    import segpcl_fast.fileio as fileio
    real = fileio._create_temp

    def create_then_interrupt(candidate):
        real(candidate)
        assert os.path.exists(candidate)
        raise KeyboardInterrupt("arrives as the file is made")
    monkeypatch.setattr(fileio, "_create_temp", create_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "config.yaml") as tmp:
            tmp.write_text("never reached")
    assert os.listdir(tmp_path) == []


def test_temp_names_are_the_form_stale_temp_clean_up_removes(tmp_path):
    """A temp file left by a killed process (SIGKILL) is removed by remove_stale_temps: its name must keep
    mkstemp's form, '.<target>.<8 characters>.tmp'."""
    import signal
    import subprocess
    import sys
    code = ("import os, signal, sys; from segpcl_fast.fileio import atomic_path\n"
            f"with atomic_path({str(tmp_path / 'results.json')!r}) as tmp:\n"
            "    tmp.write_text('half'); os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith(".results.json.") and left[0].endswith(".tmp"), left
    assert [p.name for p in remove_stale_temps(tmp_path, lambda name: name == "results.json")] == left
    assert os.listdir(tmp_path) == []


def test_the_callers_own_os_errors_inside_atomic_path_pass_unchanged(tmp_path):
    """Only the OS's error writing the temp file is relabelled with the target's name: an error of the
    caller's (a network error without errno, another file) comes out as raised, its type kept."""
    import urllib.error
    for error in (urllib.error.URLError("no network"), ConnectionResetError("peer went away"),
                  FileNotFoundError(2, "No such file or directory", str(tmp_path / "source.bin"))):
        with pytest.raises(type(error)) as raised:
            with atomic_path(tmp_path / "out.json"):
                raise error
        assert raised.value is error
    assert os.listdir(tmp_path) == []
