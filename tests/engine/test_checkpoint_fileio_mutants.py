"""Checks added by a mutation audit of the file writing and checkpoint code (segpcl_fast/fileio.py,
segpcl_fast/engine/checkpoint.py, segpcl_fast/report/environment.py): each test here fails on a small
semantic change (a mutant) of that code which tests/test_fileio.py, tests/engine/test_checkpoint.py,
tests/engine/test_engine_mutants.py and tests/test_environment.py let through, and passes on the code
as it is. Failures mid-write are simulated with monkeypatch; fingerprints are recomputed by hand.

Covered:
- fileio: the temp file is made exclusively (another's temp file of the same name is neither reused
  nor removed, also when every name is taken) and private (0600) while written; the temp file and,
  with durable=True, its folder really reach os.fsync, without leaking file descriptors; every temp
  character is one remove_stale_temps recognises; a symbolic link with a temp name is not removed;
  chmod_tree_like_made gives folders and files their mkdir / open modes; each of torch's zip-writer
  failure texts becomes an OSError naming the target; a zip record flagged as a folder or as
  encrypted is damage;
- checkpoint: the fingerprint's exact recipe (sha256 of the sorted JSON of the dotted keys without the
  run-only ones, 16 hex digits), RUN_ONLY_KEYS and RESULT_CHANGING_KEYS naming real config keys, a
  checkpoint holding no dict / an export / a task file without a task number, a damaged checkpoint's
  advice naming the pointer only when it names that file, the stale-temp sweep of a run folder, the test-image geometry check
  (legacy default for old checkpoints), check_same_data passing the legacy split digest on, restore_lora's
  refusals, check_run_config's scope (only <run>/checkpoints/, only a readable config.yaml);
- environment: which variables the report lists, the bf16 column and its text, error cells listed
  below the table, reasons grouped with every op they cover.
"""
import os
import stat
import zipfile

import pytest
import torch

from segpcl_fast import fileio
from segpcl_fast.fileio import atomic_path, atomic_write_text


def _fixed_names(monkeypatch, *chars):
    """secrets.choice in fileio returns `chars[0]` eight times, then `chars[1]` eight times, ... (the last
    one for ever after): atomic_path's candidate temp names, known in advance."""
    seq = [c for c in chars for _ in range(8)]
    state = {"i": 0}

    def choice(alphabet):
        c = seq[min(state["i"], len(seq) - 1)]
        state["i"] += 1
        assert c in alphabet
        return c
    monkeypatch.setattr(fileio.secrets, "choice", choice)


# ----------------------------------------------------------------------------- fileio: temp files

def test_another_writers_temp_file_of_the_same_name_is_neither_reused_nor_removed(tmp_path, monkeypatch):
    """The temp file is created exclusively (O_EXCL): a name already taken (another process writing the
    same target) is skipped for the next candidate, and that file stays as it was."""
    _fixed_names(monkeypatch, "a", "b")
    theirs = tmp_path / ".out.json.aaaaaaaa.tmp"
    theirs.write_text("another process's half-written file")
    atomic_write_text(tmp_path / "out.json", "mine\n")
    assert (tmp_path / "out.json").read_text() == "mine\n"
    assert theirs.read_text() == "another process's half-written file"
    assert sorted(os.listdir(tmp_path)) == [".out.json.aaaaaaaa.tmp", "out.json"]


def test_when_every_temp_name_is_taken_the_error_names_the_target_and_removes_nothing(tmp_path, monkeypatch):
    _fixed_names(monkeypatch, "a")
    theirs = tmp_path / ".out.json.aaaaaaaa.tmp"
    theirs.write_text("theirs")
    with pytest.raises(FileExistsError) as e:
        atomic_write_text(tmp_path / "out.json", "mine\n")
    assert e.value.filename == str(tmp_path / "out.json")
    assert theirs.read_text() == "theirs" and os.listdir(tmp_path) == [theirs.name]


def test_the_temp_file_is_private_while_written_and_gets_opens_mode_after(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "w.pt") as tmp:
            assert stat.S_IMODE(tmp.stat().st_mode) == 0o600  # as mkstemp makes it: others cannot read a half file
            tmp.write_bytes(b"x")
        assert stat.S_IMODE((tmp_path / "w.pt").stat().st_mode) == 0o644
    finally:
        os.umask(old)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux's /proc/self/fd")
def test_the_temp_file_and_the_durable_writes_folder_reach_os_fsync_and_no_descriptor_leaks(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    before = len(os.listdir("/proc/self/fd"))
    atomic_write_text(tmp_path / "a.txt", "x", durable=True)
    atomic_write_text(tmp_path / "b.txt", "y")
    assert len(synced) == 3
    assert os.path.basename(synced[0]).startswith(".a.txt.") and synced[1] == str(tmp_path)
    assert os.path.basename(synced[2]).startswith(".b.txt.")  # not durable: the file only
    for _ in range(20):
        atomic_write_text(tmp_path / "a.txt", "x", durable=True)
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("char", sorted(set(fileio._TEMP_CHARS)))
def test_every_temp_name_atomic_path_can_make_is_one_remove_stale_temps_removes(tmp_path, monkeypatch, char):
    """The temp names' alphabet and remove_stale_temps' pattern agree (a name with '_' was kept for ever)."""
    _fixed_names(monkeypatch, char)
    with pytest.raises(KeyboardInterrupt):  # a SIGKILL leaves the temp file: keep a hard link to it
        with atomic_path(tmp_path / "task_00.pt") as tmp:
            os.link(tmp, tmp_path / "kept")
            raise KeyboardInterrupt
    os.replace(tmp_path / "kept", tmp)
    assert tmp.name == f".task_00.pt.{char * 8}.tmp"
    assert fileio.remove_stale_temps(tmp_path, lambda name: name == "task_00.pt") == [tmp]
    assert os.listdir(tmp_path) == []


def test_a_symbolic_link_with_a_temp_name_is_not_removed(tmp_path):
    (tmp_path / "elsewhere.pt").write_text("x")
    link = tmp_path / ".task_00.pt.abcdefgh.tmp"
    link.symlink_to(tmp_path / "elsewhere.pt")
    assert fileio.remove_stale_temps(tmp_path, lambda name: True) == []
    assert link.is_symlink()


@pytest.mark.parametrize("umask", [0o002, 0o027])
def test_chmod_tree_like_made_gives_every_folder_and_file_its_made_mode(tmp_path, umask):
    import tempfile
    root = tempfile.mkdtemp(dir=tmp_path)  # 0o700
    os.mkdir(os.path.join(root, "sub"), 0o700)
    fd, name = tempfile.mkstemp(dir=os.path.join(root, "sub"))  # 0o600
    os.close(fd)
    old = os.umask(umask)
    try:
        fileio.chmod_tree_like_made(root)
    finally:
        os.umask(old)
    for folder in (root, os.path.join(root, "sub")):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(os.stat(name).st_mode) == 0o666 & ~umask


def test_chmod_tree_like_made_leaves_a_linked_files_target_alone(tmp_path):
    """A symlink inside the folder may point outside it: os.chmod would follow it and change the target."""
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    os.chmod(outside, 0o600)
    root = tmp_path / "made"
    root.mkdir()
    (root / "link.txt").symlink_to(outside)
    (root / "own.txt").write_text("y")
    os.chmod(root / "own.txt", 0o600)
    old = os.umask(0o022)
    try:
        fileio.chmod_tree_like_made(root)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(outside).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(root / "own.txt").st_mode) == 0o644


@pytest.mark.parametrize("text", ["[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0",
                                  "PytorchStreamWriter failed writing file data/0: file write failed",
                                  "unexpected pos 128 vs 96"])
def test_each_of_torchs_zip_writer_failures_is_an_os_error_naming_the_target(tmp_path, monkeypatch, text):
    def failing_save(obj, f, *a, **k):
        raise RuntimeError(text)
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="torch.save could not write it") as e:
        fileio.save_torch_file({"w": torch.zeros(2)}, tmp_path / "task_00.pt")
    assert e.value.filename == str(tmp_path / "task_00.pt") and os.listdir(tmp_path) == []


def _central_records(data: bytes):
    """Offsets of the zip's central-directory records (signature PK\\1\\2)."""
    at, found = 0, []
    while (at := data.find(b"PK\x01\x02", at)) >= 0:
        found.append(at)
        at += 4
    return found


@pytest.mark.parametrize("field, offset, bit", [("external_attr", 38, 0x10), ("flag_bits", 8, 0x1)])
def test_a_record_flagged_as_a_folder_or_encrypted_is_damage(tmp_path, field, offset, bit):
    """One flipped bit in a central-directory record: torch's reader takes a 'folder' record for an empty
    tensor (uninitialised memory); the check refuses it before torch.load."""
    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(100.0)}, path)
    data = bytearray(path.read_bytes())
    names = [info.filename for info in zipfile.ZipFile(path).infolist()]
    rec = next(r for r, name in zip(_central_records(bytes(data)), names) if name.endswith("data/0"))
    data[rec + offset] |= bit
    path.write_bytes(bytes(data))
    info = next(i for i in zipfile.ZipFile(path).infolist() if i.filename.endswith("data/0"))
    assert getattr(info, field) & bit
    with pytest.raises(fileio.DamagedFileError, match="flagged as a folder or encrypted"):
        fileio.load_torch_file(path)


# ----------------------------------------------------------------------------- checkpoint: fingerprint and keys

def test_the_fingerprint_is_sha256_of_the_sorted_dotted_json_without_run_only_keys_16_hex_digits():
    """Hand-computed: a checkpoint stores this string, so any other recipe strands every run saved so far."""
    import hashlib
    import json

    from segpcl_fast.engine import checkpoint as ckpt
    config = {"run": {"seed": 3, "resume": True, "output_dir": "x"}, "optim": {"lr": 0.001, "betas": [0.9, 0.99]}}
    canon = '{"optim.betas": [0.9, 0.99], "optim.lr": 0.001, "run.seed": 3}'
    assert json.dumps(ckpt._relevant(config, ckpt.RUN_ONLY_KEYS), sort_keys=True) == canon
    assert ckpt.config_fingerprint(config) == hashlib.sha256(canon.encode()).hexdigest()[:16]
    assert len(ckpt.config_fingerprint(config)) == 16


def test_run_only_and_result_changing_keys_are_real_config_keys():
    """A misspelt run-only key ignores nothing (a resume with it changed is refused); every result-changing
    key is run-only (a resume may change it, with a warning), data.num_workers first (the trainer's warning
    reads it so)."""
    from segpcl_fast.config import Config
    from segpcl_fast.engine import checkpoint as ckpt
    keys = set(ckpt.flatten_config(Config()))
    assert set(ckpt.RUN_ONLY_KEYS) <= keys and len(set(ckpt.RUN_ONLY_KEYS)) == len(ckpt.RUN_ONLY_KEYS)
    assert set(ckpt.RESULT_CHANGING_KEYS) <= set(ckpt.RUN_ONLY_KEYS)
    assert set(ckpt.RUN_ONLY_EXAMPLES) <= set(ckpt.RUN_ONLY_KEYS)
    assert ckpt.RESULT_CHANGING_KEYS[0] == "data.num_workers"


# ----------------------------------------------------------------------------- checkpoint: load

def test_a_checkpoint_that_is_no_state_dict_or_an_export_is_refused(tmp_path):
    from segpcl_fast.engine import checkpoint as ckpt
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ckpt.CheckpointError, match="list.pt holds a list, not a state dict"):
        ckpt.load_checkpoint(tmp_path / "list.pt")
    torch.save({"format": "segpcl_fast.classifier/1", "lora": {}}, tmp_path / "clf.pt")
    with pytest.raises(ckpt.CheckpointError, match="is an exported classifier .*resume needs the run's own"):
        ckpt.load_checkpoint(tmp_path / "clf.pt")


def test_a_task_file_without_a_task_number_loads(tmp_path):
    """check_task_file compares only an integer "task": a file named task_NN.pt without one is not refused."""
    from segpcl_fast.engine import checkpoint as ckpt
    ckpt.save_checkpoint(tmp_path / "task_01.pt", {"lora": {"w": torch.ones(1)}})
    assert set(ckpt.load_checkpoint(tmp_path / "task_01.pt")) == {"lora"}
    ckpt.check_task_file(tmp_path / "task_01.pt", {"task": "1"})


def test_a_stored_config_that_is_no_mapping_gives_the_plain_refusal(tmp_path):
    """No usable stored config to diff (an older or hand-made checkpoint): the refusal without the key list,
    and no --config advice where the run folder has no config.yaml."""
    from segpcl_fast.config import Config
    from segpcl_fast.engine import checkpoint as ckpt
    cfg = Config().to_dict()
    for stored in ({}, {"config": "optim.lr=0.5"}):
        path = ckpt.save_task_checkpoint(tmp_path, 0, {"task": 0, "fingerprint": "0123456789abcdef", **stored})
        with pytest.raises(ckpt.CheckpointError, match=r"made with a different config \(fingerprint 0123456789abcdef") as e:
            ckpt.load_checkpoint(path, ckpt.config_fingerprint(cfg), cfg, defaults=Config().to_dict())
        assert "--config" not in str(e.value)


def test_a_damaged_checkpoint_the_pointer_does_not_name_leaves_the_pointer_out_of_the_advice(tmp_path):
    """Task 0's file damaged while `last` names task 1's: deleting `last` is no part of the fix (the message
    said the pointer named the damaged file); where it does name it, it still is."""
    from segpcl_fast.engine import checkpoint as ckpt
    for task in (0, 1):
        ckpt.save_task_checkpoint(tmp_path, task, {"task": task})
    pointer = tmp_path / ckpt.CHECKPOINT_DIR / ckpt.LAST_POINTER
    for task, named in ((0, False), (1, True)):
        path = ckpt.checkpoint_path(tmp_path, task)
        path.write_bytes(path.read_bytes()[:40])
        for purpose in ("resume", "evaluate"):
            with pytest.raises(ckpt.CheckpointError, match="cannot be read") as e:
                ckpt.load_checkpoint(path, purpose=purpose)
            assert (f"delete it and {pointer} (it names this file)" in str(e.value)) is named
            assert "delete it" in str(e.value)


# ----------------------------------------------------------------------------- checkpoint: a run directory's config

def _saved(cfg_dict):
    from segpcl_fast.engine import checkpoint as ckpt
    return {"task": 0, "fingerprint": ckpt.config_fingerprint(cfg_dict), "config": cfg_dict}


def test_check_run_config_reads_only_a_checkpoints_folders_readable_config(tmp_path):
    from segpcl_fast.config import Config, save_config
    from segpcl_fast.engine import checkpoint as ckpt
    save_config(Config(), tmp_path / "config.yaml")
    other = Config().to_dict()
    other["optim"]["lr"] = 0.5
    state = _saved(other)
    with pytest.raises(ckpt.CheckpointError, match="optim.lr was 0.5, now 0.001 .*come from different runs"):
        ckpt.check_run_config(tmp_path / ckpt.CHECKPOINT_DIR / "task_00.pt", state, "evaluate")
    ckpt.check_run_config(tmp_path / "exports" / "task_00.pt", state, "evaluate")  # not a run's checkpoint folder
    ckpt.check_run_config(tmp_path / ckpt.CHECKPOINT_DIR / "task_00.pt", {"task": 0}, "evaluate")  # no config stored
    (tmp_path / "config.yaml").write_text("optim:\n  lr: -1\n")  # edited since, invalid: it vouches for nothing
    ckpt.check_run_config(tmp_path / ckpt.CHECKPOINT_DIR / "task_00.pt", state, "evaluate")


def test_check_run_config_takes_a_key_added_since_at_its_default(tmp_path):
    from segpcl_fast.config import Config, save_config
    from segpcl_fast.engine import checkpoint as ckpt
    save_config(Config(), tmp_path / "config.yaml")
    old = Config().to_dict()
    del old["data"]["synthetic_shift"]  # written before the key existed
    ckpt.check_run_config(tmp_path / ckpt.CHECKPOINT_DIR / "task_00.pt", _saved(old), "evaluate")


# ----------------------------------------------------------------------------- checkpoint: data, geometry, LoRA

def test_an_old_checkpoint_without_a_geometry_ran_the_legacy_one():
    from segpcl_fast.engine import checkpoint as ckpt
    legacy = {"resize_mode": "shortest", "interpolation": "bicubic", "fill_color": 0}
    ckpt.check_image_geometry("c.pt", {}, legacy)
    with pytest.raises(ckpt.CheckpointError, match=r"\(checkpoints written before the geometry was stored"):
        ckpt.check_image_geometry("c.pt", {}, {**legacy, "resize_mode": "squash"})
    stored = {**legacy, "resize_mode": "squash"}
    ckpt.check_image_geometry("c.pt", {"image_geometry": stored}, stored)
    with pytest.raises(ckpt.CheckpointError, match="resized .*'squash'.* asks for .*'shortest'") as e:
        ckpt.check_image_geometry("c.pt", {"image_geometry": stored}, legacy)
    assert "written before" not in str(e.value)


def test_check_same_data_checks_classes_split_with_its_legacy_digest_and_geometry():
    from segpcl_fast.engine import checkpoint as ckpt
    geometry = dict(ckpt.LEGACY_IMAGE_GEOMETRY)
    state = {"class_names": ["a", "b"], "split_digest": "old", "image_geometry": geometry}
    ckpt.check_same_data("c.pt", state, ["a", "b"], "new", geometry, legacy_split_digest="old")
    ckpt.check_same_data("c.pt", {}, ["a", "b"], "new", geometry)  # stored before any of the three were: nothing to check
    with pytest.raises(ckpt.CheckpointError, match="another train / test split"):
        ckpt.check_same_data("c.pt", state, ["a", "b"], "new", geometry)
    with pytest.raises(ckpt.CheckpointError, match="other classes"):
        ckpt.check_same_data("c.pt", state, ["b", "a"], "old", geometry)
    with pytest.raises(ckpt.CheckpointError, match="test images resized"):
        ckpt.check_same_data("c.pt", state, ["a", "b"], "old", {**geometry, "fill_color": 255})


def test_restore_lora_loads_every_tensor_or_refuses_naming_the_checkpoint():
    from segpcl_fast.engine import checkpoint as ckpt

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_A = torch.nn.Parameter(torch.zeros(2, 3))
            self.weight = torch.nn.Parameter(torch.zeros(3))
    model = Tiny()
    ckpt.restore_lora("c.pt", model, {"lora": {"lora_A": torch.ones(2, 3)}})
    assert torch.equal(model.lora_A.detach(), torch.ones(2, 3))
    with pytest.raises(ckpt.CheckpointError, match=r"^checkpoint c.pt: its LoRA tensors do not fit"):
        ckpt.restore_lora("c.pt", model, {"lora": {"lora_B": torch.ones(2, 3)}})


# ----------------------------------------------------------------------------- checkpoint: a run folder's temp files

def test_a_runs_stale_temps_are_removed_for_its_own_files_only(tmp_path):
    from segpcl_fast.engine import checkpoint as ckpt
    folder = tmp_path / ckpt.CHECKPOINT_DIR
    folder.mkdir()
    ours = [tmp_path / ".config.yaml.abcd1234.tmp", tmp_path / ".results.json.abcd1234.tmp",
            folder / ".task_03.pt.abcd1234.tmp", folder / ".last.abcd1234.tmp"]
    theirs = [tmp_path / ".notes.md.abcd1234.tmp", tmp_path / ".task_03.pt.abcd1234.tmp",
              folder / ".notes.md.abcd1234.tmp", folder / ".config.yaml.abcd1234.tmp"]
    for path in ours + theirs:
        path.write_text("x")
    assert sorted(ckpt.remove_stale_run_temps(tmp_path)) == sorted(ours)
    assert all(p.exists() for p in theirs) and not any(p.exists() for p in ours)



# ----------------------------------------------------------------------------- checkpoint: the run lock

@pytest.mark.skipif(os.name != "posix", reason="needs fcntl (POSIX)")
def test_the_run_lock_holds_only_this_pid_over_a_killed_runs_longer_one(tmp_path):
    """A killed run leaves its lock file (the OS drops only the lock): the next owner's pid replaces it whole."""
    from segpcl_fast.engine import checkpoint as ckpt
    (tmp_path / ckpt.RUN_LOCK).write_text("123456789012345\n")
    fd = ckpt.lock_run_dir(tmp_path)
    try:
        assert (tmp_path / ckpt.RUN_LOCK).read_text() == f"{os.getpid()}\n"
    finally:
        ckpt.unlock_run_dir(tmp_path, fd)


@pytest.mark.skipif(os.name != "posix", reason="needs fcntl (POSIX)")
def test_a_lock_won_on_a_file_its_owner_just_removed_is_taken_again_on_the_new_file(tmp_path, monkeypatch):
    """Between this process's open and its flock, the previous owner unlocks (it unlinks the file first, then
    unlocks): the flock then succeeds on a file no longer at the path, which locks nothing; lock_run_dir opens
    the path again."""
    import fcntl

    from segpcl_fast.engine import checkpoint as ckpt
    real, calls = fcntl.flock, []

    def flock_after_the_owner_left(fd, op):
        if not calls:
            (tmp_path / ckpt.RUN_LOCK).unlink()  # the owner's unlock_run_dir, right before this flock
        calls.append(fd)
        return real(fd, op)
    monkeypatch.setattr(fcntl, "flock", flock_after_the_owner_left)
    fd = ckpt.lock_run_dir(tmp_path)
    try:
        assert len(calls) == 2 and os.fstat(fd).st_ino == os.stat(tmp_path / ckpt.RUN_LOCK).st_ino
        assert (tmp_path / ckpt.RUN_LOCK).read_text() == f"{os.getpid()}\n"
    finally:
        ckpt.unlock_run_dir(tmp_path, fd)


# ----------------------------------------------------------------------------- environment report

def test_the_report_lists_our_prefixes_and_named_variables_only(monkeypatch):
    from segpcl_fast.report import environment as envmod
    for name in list(os.environ):
        if name.startswith(envmod.ENV_PREFIXES) or name in envmod.ENV_NAMES:
            monkeypatch.delenv(name)
    monkeypatch.setenv("TRITON_CACHE_DIR", "/c")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("SEGPCL_OPS", "reference")
    monkeypatch.setenv("XTRITON_NOT_OURS", "1")
    assert envmod._environment_variables() == {"OMP_NUM_THREADS": "2", "SEGPCL_OPS": "reference",
                                               "TRITON_CACHE_DIR": "/c"}


def test_gpu_rows_say_bf16_from_compute_capability_8(monkeypatch):
    from types import SimpleNamespace

    from segpcl_fast.report import environment as envmod
    props = [SimpleNamespace(name="V100", major=7, minor=0, total_memory=32 * 2**30, multi_processor_count=80),
             SimpleNamespace(name="A100", major=8, minor=0, total_memory=80 * 2**30 - 2**20, multi_processor_count=108)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    assert envmod._devices() == ["cpu", "cuda"]
    assert envmod._cuda_devices() == [
        {"index": 0, "name": "V100", "capability": "7.0", "memory_gib": 32.0, "multiprocessors": 80, "bf16": False},
        {"index": 1, "name": "A100", "capability": "8.0", "memory_gib": 80.0, "multiprocessors": 108, "bf16": True}]
    from segpcl_fast.model import clip
    monkeypatch.setattr(clip, "native_bf16", lambda device: False)
    assert envmod._gpu_train_dtype("cuda") == torch.float16
    monkeypatch.setattr(clip, "native_bf16", lambda device: True)
    assert envmod._gpu_train_dtype("cuda") == torch.bfloat16


def _report(**changes):
    env = {"versions": {"segpcl_fast": "0", "python": "3.12", "torch": "2.11.0"}, "platform": "linux",
           "cpu_threads": 16,
           "cuda": {"available": True, "torch_built_with": "13.0", "torch_arch_list": ["sm_70"],
                    "devices": [{"index": 0, "name": "V100", "capability": "7.0", "memory_gib": 32.0,
                                 "multiprocessors": 80, "bf16": False}]},
           "triton": {"installed": True, "version": "3.0", "interpreter": False, "import_error": None},
           "extension": {"built": True, "cuda": True, "error": None, "path": "/x/_C.so"},
           "optional": {"apex_fused_sgd": False, "xformers": False, "scikit_learn": None, "tensorboard": None},
           "ops_backend": "auto",
           "op_paths": {"cpu": {"anchor_kl": "reference", "lora_b_linear": "a-much-longer-impl"},
                        "cuda": {"anchor_kl": "error: the kernel cannot run here", "lora_b_linear": "cpp"}},
           "environment_variables": {}}
    env.update(changes)
    return env


def test_the_text_report_bf16_note_error_cells_and_column_widths():
    from segpcl_fast.report.environment import format_environment
    text = format_environment(_report())
    assert "cuda:0 V100 (sm_70, 32.0 GiB, 80 SMs; no bf16: run.precision=fp16 or fp32)" in text
    env = _report()
    del env["cuda"]["devices"][0]["bf16"]  # an older version's JSON: no note
    assert "cuda:0 V100 (sm_70, 32.0 GiB, 80 SMs)\n" in format_environment(env)
    lines = text.splitlines()
    assert "  anchor_kl on cuda: the kernel cannot run here" in lines
    at = next(i for i, line in enumerate(lines) if line.split() == ["op", "cpu", "cuda"])
    header, rows = lines[at], {line.split()[0]: line for line in lines[at + 1:at + 3]}
    assert rows["anchor_kl"].split() == ["anchor_kl", "reference", "error", "(below)"]
    assert rows["lora_b_linear"].split() == ["lora_b_linear", "a-much-longer-impl", "cpp"]
    assert rows["lora_b_linear"].index("cpp") == rows["anchor_kl"].index("error") == header.index("cuda")  # aligned


def test_the_text_report_lora_switches_reasons_and_hints():
    from segpcl_fast.report.environment import format_environment
    env = _report(lora_switches={"SEGPCL_LORA_FWD": "merged", "SEGPCL_LORA_BWD": "split", "SEGPCL_LORA_COMPILE": "cpp"},
                  op_reasons={"cpu": {"anchor_kl": "why one", "lora_b_linear": "why two", "pgd_step": "why one"}})
    text = format_environment(env)
    assert "  LoRA switches (SEGPCL_LORA_*): COMPILE=cpp\n" in text
    assert "why, on cpu:\n  anchor_kl, pgd_step: why one\n  lora_b_linear: why two" in text
    assert "hint:" not in text
    env["triton"]["import_error"] = "ImportError: built for another torch"
    assert "hint: the Triton kernels need an importable triton" in format_environment(env)
    env = _report()
    env["extension"]["cuda"] = False
    hinted = format_environment(env)
    assert "hint: the C++ LoRA op has no CUDA kernels" in hinted and "Triton kernels need" not in hinted


def test_op_reasons_name_a_missing_triton_and_a_masked_attention_is_sdpa(monkeypatch):
    from segpcl_fast.kernels import _triton_utils
    from segpcl_fast.ops import mha
    from segpcl_fast.report import environment as envmod
    monkeypatch.setattr(_triton_utils, "HAS_TRITON", False)
    paths = envmod.op_paths("cpu")
    assert envmod.op_reasons("cpu", paths)["pgd_step"] == "auto: triton is not installed"
    monkeypatch.setattr(mha, "_use_xformers", lambda q, mask: mask is None)  # xformers runs unmasked only
    paths = envmod.op_paths("cpu")
    assert (paths["attention (no mask)"], paths["attention (masked)"]) == ("xformers", "sdpa")


def test_a_triton_that_fails_to_import_in_any_way_is_reported(monkeypatch):
    from types import SimpleNamespace

    from segpcl_fast.kernels import _triton_utils
    from segpcl_fast.report import environment as envmod
    monkeypatch.setattr(_triton_utils, "HAS_TRITON", True)

    def broken(name):
        raise RuntimeError("built for another torch")
    monkeypatch.setattr(envmod, "importlib", SimpleNamespace(import_module=broken))
    assert envmod._triton()["import_error"] == "RuntimeError: built for another torch"
