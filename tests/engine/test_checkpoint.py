"""Checkpoints: atomic save survives a crash mid-write, config fingerprint ignores run-only keys
and names the differing keys, the 'last' pointer finds the newest finished task."""
import os

import pytest
import torch

from segpcl_fast.config import Config
from segpcl_fast.engine import checkpoint as ckpt


def _cfg(**changes):
    d = Config().to_dict()
    for dotted, v in changes.items():
        sec, key = dotted.split(".")
        d[sec][key] = v
    return d


def _state(cfg, task, value):
    return {"task": task, "fingerprint": ckpt.config_fingerprint(cfg), "config": cfg,
            "lora": {"w": torch.full((3, 4), float(value))}, "rng": torch.get_rng_state()}


def test_fingerprint_ignores_run_only_keys_only():
    base = ckpt.config_fingerprint(_cfg())
    same = _cfg(**{"run.resume": True, "run.output_dir": "elsewhere", "run.device": "cpu",
                   "eval.batch_size": 7, "run.ops": "reference", "run.plots": False})
    assert ckpt.config_fingerprint(same) == base
    assert ckpt.config_fingerprint(_cfg(**{"optim.lr": 0.5})) != base
    assert ckpt.config_fingerprint(_cfg(**{"run.seed": 1})) != base
    # custom ignore list: seed ignored -> equal, run.resume no longer ignored -> differs
    assert (ckpt.config_fingerprint(_cfg(**{"run.seed": 1}), ["run.seed"])
            == ckpt.config_fingerprint(_cfg(), ["run.seed"]))
    assert (ckpt.config_fingerprint(_cfg(**{"run.resume": True}), ["run.seed"])
            != ckpt.config_fingerprint(_cfg(), ["run.seed"]))
    # a Config object and its dict give the same fingerprint
    assert ckpt.config_fingerprint(Config()) == base


def test_save_load_round_trip(tmp_path):
    cfg = _cfg()
    path = ckpt.save_checkpoint(tmp_path / "a" / "c.pt", _state(cfg, 0, 1.5))
    state = ckpt.load_checkpoint(path, ckpt.config_fingerprint(cfg), cfg)
    assert torch.equal(state["lora"]["w"], torch.full((3, 4), 1.5))
    assert state["config"] == cfg and state["task"] == 0
    assert os.listdir(path.parent) == ["c.pt"]


def test_different_config_is_one_clear_error(tmp_path):
    old = _cfg()
    path = ckpt.save_checkpoint(tmp_path / "c.pt", _state(old, 0, 1.0))
    new = _cfg(**{"optim.lr": 0.5, "dpgd.k_adv": 3, "run.output_dir": "other"})
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_checkpoint(path, ckpt.config_fingerprint(new), new)
    msg = str(e.value)
    assert "optim.lr" in msg and "dpgd.k_adv" in msg and "0.5" in msg
    assert "run.output_dir was" not in msg  # run-only keys are not reported as differences
    assert "--resume" in msg
    assert "same config" in msg and "run.output_dir" in msg  # says how to fix
    # fingerprint only (no config to diff): still a clear error
    with pytest.raises(ckpt.CheckpointError, match="different config"):
        ckpt.load_checkpoint(path, ckpt.config_fingerprint(new))
    # run-only change loads fine
    ok = _cfg(**{"run.resume": True, "run.output_dir": "other"})
    ckpt.load_checkpoint(path, ckpt.config_fingerprint(ok), ok)


def test_checkpoint_from_before_a_key_existed_resumes_only_at_that_keys_default(tmp_path):
    old = _cfg()
    del old["data"]["synthetic_shift"]  # a checkpoint written before data.synthetic_shift existed
    path = ckpt.save_checkpoint(tmp_path / "c.pt", _state(old, 0, 1.0))
    defaults = Config().to_dict()
    now = _cfg()
    assert ckpt.config_fingerprint(now) != ckpt.config_fingerprint(old)
    ckpt.load_checkpoint(path, ckpt.config_fingerprint(now), now, defaults=defaults)  # default: same run
    with pytest.raises(ckpt.CheckpointError, match="different config"):  # no defaults given: strict
        ckpt.load_checkpoint(path, ckpt.config_fingerprint(now), now)
    changed = _cfg(**{"data.synthetic_shift": 0.1})
    with pytest.raises(ckpt.CheckpointError, match=r"data.synthetic_shift was None, now 0.1"):
        ckpt.load_checkpoint(path, ckpt.config_fingerprint(changed), changed, defaults=defaults)
    also_lr = _cfg(**{"optim.lr": 0.5})  # a real change next to the new key still fails
    with pytest.raises(ckpt.CheckpointError, match="optim.lr"):
        ckpt.load_checkpoint(path, ckpt.config_fingerprint(also_lr), also_lr, defaults=defaults)
    # a key the current config no longer has is a difference, not an upgrade
    extra = _cfg()
    extra["data"]["retired_key"] = 1
    path2 = ckpt.save_checkpoint(tmp_path / "d.pt", _state(extra, 0, 1.0))
    with pytest.raises(ckpt.CheckpointError, match="retired_key"):
        ckpt.load_checkpoint(path2, ckpt.config_fingerprint(now), now, defaults=defaults)


def test_missing_or_corrupt_checkpoint(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="cannot be read"):
        ckpt.load_checkpoint(bad)
    ckpt.save_checkpoint(tmp_path / "nofp.pt", {"x": 1})
    with pytest.raises(ckpt.CheckpointError, match="no config fingerprint"):
        ckpt.load_checkpoint(tmp_path / "nofp.pt", "abc")


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg = _cfg()
    fp = ckpt.config_fingerprint(cfg)
    first = ckpt.save_task_checkpoint(tmp_path, 0, _state(cfg, 0, 1.0))
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # write the whole thing (to the temp path) ...
        os.truncate(f, os.path.getsize(f) // 2)  # ... then lose half of it and die
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_task_checkpoint(tmp_path, 1, _state(cfg, 1, 2.0))
    with pytest.raises(KeyboardInterrupt):  # overwriting an existing file crashes too
        ckpt.save_checkpoint(first, _state(cfg, 0, 9.0))
    monkeypatch.setattr(torch, "save", real_save)

    folder = tmp_path / "checkpoints"
    assert sorted(os.listdir(folder)) == ["last", "task_00.pt"]  # no temp or half file left
    last = ckpt.find_last_checkpoint(tmp_path)
    assert last == first
    state = ckpt.load_checkpoint(last, fp, cfg)
    assert state["task"] == 0 and torch.equal(state["lora"]["w"], torch.full((3, 4), 1.0))


def test_find_last_checkpoint(tmp_path):
    assert ckpt.find_last_checkpoint(tmp_path) is None
    cfg = _cfg()
    for t in range(3):
        ckpt.save_task_checkpoint(tmp_path, t, _state(cfg, t, t))
    folder = tmp_path / "checkpoints"
    assert ckpt.find_last_checkpoint(tmp_path) == folder / "task_02.pt"
    assert (folder / "last").read_text().strip() == "task_02.pt"
    # pointer lost (crash between the two writes, or copied by hand): highest task file wins
    (folder / "last").unlink()
    (folder / "task_10.pt").write_bytes((folder / "task_02.pt").read_bytes())
    assert ckpt.find_last_checkpoint(tmp_path) == folder / "task_10.pt"
    # a pointer naming a missing file is a clear error
    (folder / "last").write_text("task_07.pt\n")
    with pytest.raises(ckpt.CheckpointError, match="task_07.pt"):
        ckpt.find_last_checkpoint(tmp_path)
    with pytest.raises(ValueError):
        ckpt.save_task_checkpoint(tmp_path, -1, {})


@pytest.mark.parametrize("pointer_bytes", [b"\xff\xfe\x00task", b"", b"\n"])
def test_a_damaged_or_empty_pointer_is_one_error_that_says_to_delete_it(tmp_path, pointer_bytes):
    """A pointer that is not text (a disk error, a binary file copied over it) was a UnicodeDecodeError
    traceback; empty, it said it names ''. Either way one CheckpointError naming the file and the fix, and
    once deleted the run resumes from the highest task file."""
    for task in (0, 1):
        ckpt.save_task_checkpoint(tmp_path, task, {"task": task})
    pointer = tmp_path / ckpt.CHECKPOINT_DIR / ckpt.LAST_POINTER
    pointer.write_bytes(pointer_bytes)
    with pytest.raises(ckpt.CheckpointError, match=f"{pointer} names no checkpoint file; delete {pointer}"):
        ckpt.find_last_checkpoint(tmp_path)
    pointer.unlink()
    assert ckpt.find_last_checkpoint(tmp_path).name == "task_01.pt"


def test_a_damaged_checkpoint_says_to_delete_the_pointer_naming_it_too(tmp_path):
    """Deleting only the damaged file left checkpoints/last naming it: a second error before the resume."""
    for task in (0, 1):
        ckpt.save_task_checkpoint(tmp_path, task, {"task": task})
    last = ckpt.find_last_checkpoint(tmp_path)
    last.write_bytes(last.read_bytes()[:40])
    pointer = tmp_path / ckpt.CHECKPOINT_DIR / ckpt.LAST_POINTER
    with pytest.raises(ckpt.CheckpointError, match=f"delete it and {pointer} \\(it names this file\\)"):
        ckpt.load_checkpoint(last)
    last.unlink()
    pointer.unlink()  # what the message says: then the run resumes from the task before
    assert ckpt.load_checkpoint(ckpt.find_last_checkpoint(tmp_path))["task"] == 0


def test_a_checkpoint_damaged_on_disk_is_one_error_with_the_fix(tmp_path, zero_block):
    """A flipped block inside a tensor record: torch.load returns other numbers; the resume is refused
    with the same advice as a truncated checkpoint (delete it and `last` to resume from the one before)."""
    cfg = _cfg()
    ckpt.save_task_checkpoint(tmp_path, 0, _state(cfg, 0, 1.0))
    path = ckpt.save_task_checkpoint(tmp_path, 1, {**_state(cfg, 1, 2.0), "big": torch.arange(50000.0)})
    zero_block(path)
    with pytest.raises(ckpt.CheckpointError, match=r"task_01.pt cannot be read \(DamagedFileError: its bytes changed "
                                                   r".*; delete it and .*last \(it names this file\) to resume from "
                                                   r"the one before"):
        ckpt.load_checkpoint(path, ckpt.config_fingerprint(cfg), cfg)


def test_a_checkpoint_of_a_newer_version_with_keys_this_one_lacks_names_the_writer(tmp_path):
    """Its advice was "resume with the same config --config <run>/config.yaml", which this version
    refuses (unknown key): name the version that wrote it instead."""
    newer = _cfg()
    newer["optim"]["new_knob"] = 3
    state = {**_state(newer, 0, 1.0), "segpcl_fast_version": "9.9.9"}
    path = ckpt.save_task_checkpoint(tmp_path, 0, state)
    current = _cfg()
    with pytest.raises(ckpt.CheckpointError, match=r"written by segpcl_fast 9.9.9 with config keys this segpcl_fast "
                                                   r"\(.*\) does not know: optim.new_knob; resume it with the version "
                                                   r"that wrote it \(pip install segpcl_fast==9.9.9\)"):
        ckpt.load_checkpoint(path, ckpt.config_fingerprint(current), current, defaults=Config().to_dict())
    newer["optim"]["lr"] = 0.5  # a known key that differs too: still the writer's version is the fix
    with pytest.raises(ckpt.CheckpointError, match="does not know: optim.new_knob"):
        ckpt.load_checkpoint(ckpt.save_task_checkpoint(tmp_path, 1, {**_state(newer, 1, 1.0),
                                                                     "segpcl_fast_version": "9.9.9"}),
                             ckpt.config_fingerprint(current), current, defaults=Config().to_dict())
