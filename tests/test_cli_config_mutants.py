"""Config validation, CLI option handling, train()/evaluate() keyword mapping and atomic writes:
behaviour a mutation audit found unchecked (each test names what it pins down). Offline, no training."""
import os

import pytest

from segpcl_fast import config as C
from segpcl_fast.config import Config, ConfigError, apply_overrides, config_from_dict, load_config, save_config


# ----------------------------------------------------------------------------- validation: ranges and types

# the ranges and types refused on the command line are in test_config.py's INVALID list


def test_wrong_types_set_in_a_dict_or_yaml_are_refused_too(tmp_path):
    for bad in ({"run": {"compile": 1}}, {"optim": {"epochs": True}}, {"optim": {"lr": True}}):
        with pytest.raises(ConfigError):
            config_from_dict(bad)
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  compile: 1\n")
    with pytest.raises(ConfigError, match="run.compile' expects true/false"):
        load_config(path)


# every documented choice (README / the consuming modules), written out here: a choice dropped from
# config.py's tuples must fail, which iterating over those tuples would not notice
ACCEPTED = [
    "optim.fused=auto", "optim.fused=foreach", "optim.fused=apex",
    "optim.cls_over=current", "optim.cls_over=seen",
    "optim.schedule=cosine", "optim.schedule=constant",
    "run.precision=fp32", "run.precision=bf16",
    "run.ops=auto", "run.ops=reference", "run.ops=triton", "run.ops=cpp",
    "acgd.source=anchors", "acgd.source=new_data", "acgd.source=seeds", "acgd.source=folder",
    "prototypes.weight_rule=relu_cos", "prototypes.weight_rule=uniform",
    "data.dataset=synthetic", "data.dataset=cifar100", "data.dataset=imagenet-r", "data.dataset=imagenet-subset",
    "data.dataset=cub200", "data.dataset=ucf101",
    "run.device=auto", "run.device=cpu", "run.device=mps", "run.device=cuda", "run.device=cuda:0",
    "run.device=cuda:10", "run.device=xpu", "run.device=xpu:1",
    "data.order_seed=4294967295", "data.split_seed=4294967295", "data.order_seed=0",
    "optim.momentum=0.99", "data.test_fraction=0.5",
    "lora.init_seed=null", "lora.init_seed=7",
    "data.task_sizes=null", "data.expected_classes=100",
    "dpgd.eps=0", "dpgd.gamma=0",
]


@pytest.mark.parametrize("override", ACCEPTED)
def test_every_documented_choice_and_range_end_is_accepted(override):
    cfg = apply_overrides(Config(), [override])
    key, text = override.split("=", 1)
    sec, sub = key.split(".")
    assert getattr(getattr(cfg, sec), sub) == C.parse_value(text)


# ----------------------------------------------------------------------------- override parsing

def test_an_override_value_may_hold_an_equals_sign():
    """Only the first '=' splits key from value: a path or template may contain '='."""
    assert apply_overrides(Config(), ["data.root=/data/a=b"]).data.root == "/data/a=b"
    assert apply_overrides(Config(), ["run.output_dir=runs/lr=0.1"]).run.output_dir == "runs/lr=0.1"


@pytest.mark.parametrize("text", ["null", "Null", "NULL", "~"])
def test_every_yaml_null_spelling_unsets_an_optional_string_key(text):
    assert apply_overrides(Config(), [f"data.root={text}"]).data.root is None
    assert apply_overrides(Config(), [f"model.pretrained={text}"]).model.pretrained is None
    if text != "~":  # a plain string key still takes it as written (a folder may be called that; ~ is home)
        assert apply_overrides(Config(), [f"run.output_dir={text}"]).run.output_dir == text


def test_a_single_bad_key_is_its_own_message_and_several_are_counted():
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), ["optim.lrr=0.1"])
    assert str(e.value).startswith("unknown config key 'optim.lrr'")
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), ["optim.lrr=0.1", "dpgd.kadv=1"])
    assert str(e.value).startswith("2 invalid config keys / values")


# ----------------------------------------------------------------------------- did_you_mean

def test_a_bare_key_in_several_sections_suggests_each_of_them():
    hint = C.did_you_mean("batch_size")
    assert hint == " (did you mean dpgd.batch_size or optim.batch_size or eval.batch_size?)"


def test_a_key_in_the_wrong_section_suggests_the_right_one():
    assert C.did_you_mean("dpgd.lr") == " (did you mean optim.lr?)"
    with pytest.raises(ConfigError, match=r"unknown config key 'tsgr.k_adv' \(did you mean dpgd.k_adv\?\)"):
        apply_overrides(Config(), ["tsgr.k_adv=3"])


# ----------------------------------------------------------------------------- YAML files and presets

def test_an_empty_or_comment_only_yaml_is_the_default_config(tmp_path):
    for text in ("", "# nothing set yet\n"):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        assert load_config(path) == Config()


def test_a_preset_may_be_named_with_its_yaml_suffix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no cifar100.yaml here: the preset is meant
    assert load_config("cifar100.yaml") == load_config("cifar100")
    assert load_config("cifar100").data.dataset == "cifar100"


def test_load_config_applies_its_overrides_after_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.05\n  epochs: 3\n")
    cfg = load_config(path, ["optim.epochs=4", "dpgd.k_adv=2"])
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.dpgd.k_adv) == (0.05, 4, 2)
    with pytest.raises(ConfigError, match="optim.epochs"):
        load_config(path, ["optim.epochs=-1"])


# ----------------------------------------------------------------------------- train() / make_config keywords

def test_an_ambiguous_bare_keyword_is_an_error_listing_the_candidates():
    """README: a bare name only when it is unique; batch_size is in dpgd, optim and eval."""
    from segpcl_fast.api import make_config
    with pytest.raises(ConfigError, match=r"'batch_size' is ambiguous: .*dpgd.batch_size.*optim.batch_size.*"
                                          r"eval.batch_size.*optim__batch_size|'batch_size' is ambiguous"):
        make_config(batch_size=3)
    with pytest.raises(ConfigError) as e:
        make_config(batch_size=3)
    for key in ("dpgd.batch_size", "optim.batch_size", "eval.batch_size"):
        assert key in str(e.value)
    cfg = make_config(optim__batch_size=3, lr=0.05, k_adv=2, seed=4)
    assert (cfg.optim.batch_size, cfg.optim.lr, cfg.dpgd.k_adv, cfg.run.seed) == (3, 0.05, 2, 4)
    assert cfg.dpgd.batch_size == 64 and cfg.eval.batch_size == 256
    with pytest.raises(ConfigError, match="unknown keyword argument 'k_advv' .did you mean k_adv"):
        make_config(k_advv=3)


def test_every_bad_keyword_is_in_one_error():
    """README: all bad keys in one error, from keywords as from --set (unknown names, bad values, a key
    set twice)."""
    from segpcl_fast.api import make_config
    with pytest.raises(ConfigError) as e:
        make_config(foo=1, bar=2, optim__lr=0, dpgd__k_adv=-3)
    for part in ("'foo'", "'bar'", "optim.lr must be", "dpgd.k_adv must be"):
        assert part in str(e.value)
    with pytest.raises(ConfigError, match="'optim__lr' sets optim.lr, which another argument sets too"):
        make_config(lr=1e-3, optim__lr=2e-3)
    with pytest.raises(ConfigError) as e:
        make_config(None, ["optim.lrr=1", "dpgd.k_adv=-1", "lr=3"])
    for part in ("'lr' must be dotted", "optim.lrr", "dpgd.k_adv must be"):
        assert part in str(e.value)


# ----------------------------------------------------------------------------- evaluate(): what may change

# README: evaluate's --set may change how it runs and where the data / weights lie, nothing else
EVALUATE_KEYS = [("run.device", "cpu"), ("run.ops", "reference"), ("run.compile", "false"),
                 ("run.num_threads", "1"), ("run.progress", "false"), ("eval.batch_size", "7"),
                 ("data.num_workers", "0"), ("data.root", "/elsewhere"), ("data.frames_dir", "frames"),
                 ("model.cache_dir", "/weights")]


@pytest.fixture
def run_without_checkpoints(tmp_path):
    save_config(Config(), tmp_path / "config.yaml")
    return tmp_path


@pytest.mark.parametrize("key,value", EVALUATE_KEYS)
def test_evaluate_accepts_every_documented_key_as_string_and_keyword(run_without_checkpoints, key, value):
    from segpcl_fast.api import evaluate
    if key == "data.root":  # a run of a dataset that reads files (the offline world's run refuses a root)
        save_config(C.apply_overrides(Config(), {"data.dataset": "cifar100"}), run_without_checkpoints / "config.yaml")
    # past the key check, the run has no checkpoint: that is the error, not the key
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        evaluate(run_without_checkpoints, [f"{key}={value}"])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        evaluate(run_without_checkpoints, **{key.replace(".", "__"): C.parse_value(value)})


def test_evaluate_refuses_other_keys_given_as_keywords_too(run_without_checkpoints):
    from segpcl_fast.api import evaluate
    for kwargs in ({"num_tasks": 3}, {"dpgd__k_adv": 2}, {"lr": 0.1}):
        with pytest.raises(ConfigError, match="evaluate\\(\\) cannot override"):
            evaluate(run_without_checkpoints, **kwargs)
    with pytest.raises(ConfigError, match="cannot override 'data.num_tasks': it would not be the run that was trained"):
        evaluate(run_without_checkpoints, ["data.num_tasks=3"])


def test_evaluate_refuses_a_data_root_for_an_offline_world_run(run_without_checkpoints):
    """A data.root for a run of the offline world would be ignored (it reads no files): refused, as train refuses it."""
    from segpcl_fast.api import evaluate
    with pytest.raises(ConfigError, match="data.root is /tmp, but .* trained on the offline world .* evaluate it "
                                          "without data.root"):
        evaluate(run_without_checkpoints, data__root="/tmp")


def test_evaluate_names_why_it_refuses_the_run_only_keys_it_does_not_take(run_without_checkpoints):
    """Keys that change only what train writes, or stages evaluate does not run, are refused with that reason
    (not "it would not be the run that was trained", which they do not change)."""
    from segpcl_fast.api import EVALUATE_OVERRIDABLE, EVALUATE_REFUSALS, evaluate
    from segpcl_fast.engine.checkpoint import RUN_ONLY_KEYS
    assert set(EVALUATE_REFUSALS) == set(RUN_ONLY_KEYS) - set(EVALUATE_OVERRIDABLE)  # each one its own reason
    for kwargs, reason in (({"run__tensorboard": True}, "evaluate writes nothing into the run"),
                           ({"run__output_dir": "elsewhere"}, "evaluate reads the run at its run_dir argument"),
                           ({"dpgd__batch_size": 4}, "evaluate runs no DPGD")):
        with pytest.raises(ConfigError, match=f"cannot override '{next(iter(kwargs)).replace('__', '.')}': {reason}"):
            evaluate(run_without_checkpoints, **kwargs)


# ----------------------------------------------------------------------------- CLI

def _cfg(argv):
    from segpcl_fast.cli import _config_from_args, build_parser
    return _config_from_args(build_parser().parse_args(argv))


def test_cli_config_options_reach_the_config(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("run:\n  output_dir: from_yaml\n  seed: 5\n  method: zeroshot\n")
    cfg = _cfg(["train", "--config", str(yaml_file), "-o", str(tmp_path / "o"), "--seed", "3",
                "--method", "lora_finetune"])
    assert (cfg.run.output_dir, cfg.run.seed, cfg.run.method) == (str(tmp_path / "o"), 3, "lora_finetune")
    with pytest.raises(ConfigError, match="--seed 0 and --set run.seed=9 both set run.seed: give one of them"):
        _cfg(["train", "--seed", "0", "--set", "run.seed=9"])  # one of them was dropped without a word
    cfg = _cfg(["train", "--config", str(yaml_file)])
    assert (cfg.run.output_dir, cfg.run.seed, cfg.run.method) == ("from_yaml", 5, "zeroshot")
    assert _cfg(["train", "-s", "dpgd.k_adv=3", "--set", "optim.lr=0.5"]).dpgd.k_adv == 3
    with pytest.raises(ConfigError, match="-o x and --set run.output_dir=y both set run.output_dir"):
        _cfg(["train", "--output-dir", "x", "--set", "run.output_dir=y"])


@pytest.mark.parametrize("argv,message", [
    (["ablate", "--seed", "0"], "ablate does not take --seed (it runs every --seeds entry"),
    (["sweep", "--set", "optim.lr=0.1,0.2", "--seed", "0"], "sweep does not take --seed"),
    (["distill-sources", "--seed", "0"], "distill-sources does not take --seed"),
])
def test_a_refused_seed_option_is_refused_even_when_it_is_0(argv, message, capsys, monkeypatch):
    import segpcl_fast.analysis
    import segpcl_fast.api
    from segpcl_fast.cli import main

    def must_not_run(*args, **kwargs):
        raise AssertionError("the subcommand ran instead of refusing --seed")
    for module, name in ((segpcl_fast.api, "ablate"), (segpcl_fast.analysis, "sweep"),
                         (segpcl_fast.analysis, "distill_sources")):
        monkeypatch.setattr(module, name, must_not_run)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_sweep_fixed_overrides_reach_every_run_unsplit(monkeypatch, capsys):
    import segpcl_fast.analysis
    from segpcl_fast.cli import main
    seen = {}

    def fake_sweep(cfg, axes, seeds, fixed):
        seen.update(cfg=cfg, axes=axes, seeds=seeds, fixed=fixed)
        return {"table": "TABLE", "paths": {}}
    monkeypatch.setattr(segpcl_fast.analysis, "sweep", fake_sweep)
    assert main(["sweep", "--set", "dpgd.k_adv=5,10", "--fixed", "data.templates=a photo, of a {}.",
                 "--fixed", "optim.epochs=2", "--seeds", "0,1", "-o", "runs/x"]) == 0
    assert seen["cfg"].data.templates == ["a photo, of a {}."] and seen["cfg"].optim.epochs == 2
    assert seen["axes"] == ["dpgd.k_adv=5,10"] and seen["seeds"] == [0, 1]
    assert seen["fixed"] == ["data.templates=a photo, of a {}.", "optim.epochs=2"]  # recorded by the sweep
    assert seen["cfg"].run.output_dir == "runs/x"
    assert "TABLE" in capsys.readouterr().out


def test_seed_lists_skip_empty_entries():
    from segpcl_fast.cli import seed_list
    assert seed_list("0,1,2") == [0, 1, 2]
    assert seed_list("0,1,") == [0, 1] and seed_list(" 3 ") == [3]


def test_no_subcommand_prints_help_and_exits_2(capsys):
    from segpcl_fast.cli import main
    assert main([]) == 2
    assert "usage: segpcl-fast" in capsys.readouterr().out


def test_an_os_error_is_one_line_naming_the_path(monkeypatch, capsys):
    import segpcl_fast.api
    from segpcl_fast.cli import main

    def denied(cfg):
        raise PermissionError(13, "Permission denied", "/runs/x/results.json")
    monkeypatch.setattr(segpcl_fast.api, "train", denied)
    assert main(["train", "-o", "unused"]) == 2
    assert capsys.readouterr().err == ("segpcl-fast: error: /runs/x/results.json: Permission denied (this user may not "
                                       "read or write it: fix its permissions or owner (chmod u+w on a folder it "
                                       "writes, chmod -R a+rX on a dataset folder it reads), or use a copy or folder "
                                       "it can reach)\n")

    def gone(cfg):  # other OS errors: the OS's reason alone
        raise IsADirectoryError(21, "Is a directory", "/runs/x/results.json")
    monkeypatch.setattr(segpcl_fast.api, "train", gone)
    assert main(["train", "-o", "unused"]) == 2
    assert capsys.readouterr().err == "segpcl-fast: error: /runs/x/results.json: Is a directory\n"


def test_config_and_missing_file_errors_exit_2_and_interrupts_130(monkeypatch, capsys, tmp_path):
    import segpcl_fast.api
    from segpcl_fast.cli import main
    assert main(["train", "--config", "no-such-preset"]) == 2
    assert capsys.readouterr().err.startswith("segpcl-fast: error: config file 'no-such-preset' does not exist")
    assert main(["evaluate", "/no/such/run"]) == 2
    assert "/no/such/run does not exist: evaluate() takes the output_dir" in capsys.readouterr().err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(segpcl_fast.api, "ablate", interrupted)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "unused").mkdir()  # what it has written (a folder that does not exist: tests/test_user_review.py)
    assert main(["ablate", "-o", "unused"]) == 130  # ablate resumes too: the same hint as train's
    assert capsys.readouterr().err == ("segpcl-fast: interrupted: continue after the last finished task with the "
                                       "same command and --resume\n")
    import segpcl_fast.engine.profile
    monkeypatch.setattr(segpcl_fast.engine.profile, "profile_training", interrupted)
    assert main(["profile", "-o", "unused"]) == 130  # nothing to resume
    assert capsys.readouterr().err == "segpcl-fast: interrupted\n"


def test_every_command_that_trains_runs_takes_resume(monkeypatch):
    """The refusal of an output dir holding a run says --resume: every subcommand that trains takes it."""
    import segpcl_fast.analysis
    import segpcl_fast.api
    from segpcl_fast.cli import main
    seen = []

    def record(cfg, *args, **kwargs):
        seen.append(cfg.run.resume)
        raise KeyboardInterrupt
    monkeypatch.setattr(segpcl_fast.api, "ablate", record)
    for name in ("fragility", "retention", "sweep", "distill_sources", "anchor_views"):
        monkeypatch.setattr(segpcl_fast.analysis, name, record)
    commands = ["ablate", "retention", "distill-sources"]
    for command in commands:
        assert main([command, "-o", "unused", "--resume"]) == 130
        assert main([command, "-o", "unused"]) == 130
    assert main(["sweep", "--set", "dpgd.k_adv=2,3", "-o", "unused", "--resume"]) == 130
    assert seen == [True, False] * len(commands) + [True]
    for command in ("fragility", "anchor-views"):  # they keep no run to resume: --resume is no option of theirs
        with pytest.raises(SystemExit):
            main([command, "-o", "unused", "--resume"])


# ----------------------------------------------------------------------------- fileio

def _record_fsync_and_replace(monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name fsynced files")
@pytest.mark.parametrize("writer", ["text", "bytes"])
def test_the_temp_file_is_fsynced_before_the_rename_and_durable_fsyncs_the_folder(tmp_path, monkeypatch, writer):
    from segpcl_fast.fileio import atomic_write_bytes, atomic_write_text
    events = _record_fsync_and_replace(monkeypatch)
    target = tmp_path / "d" / "f.bin"
    (tmp_path / "d").mkdir()
    write = (lambda p, durable: atomic_write_text(p, "x", durable=durable)) if writer == "text" else \
        (lambda p, durable: atomic_write_bytes(p, b"x", durable=durable))
    write(target, True)
    replaces = [e for e in events if e[0] == "replace"]
    assert len(replaces) == 1 and replaces[0][2] == str(target)
    tmp = replaces[0][1]
    i = events.index(replaces[0])
    assert ("fsync", tmp) in events[:i]  # the data is on disk before the new name points at it
    assert ("fsync", str(tmp_path / "d")) in events[i:]  # durable: the rename itself too
    events.clear()
    write(target, False)
    assert ("fsync", str(tmp_path / "d")) not in events
    assert target.read_bytes() == b"x" and os.listdir(tmp_path / "d") == ["f.bin"]


def test_atomic_write_text_never_writes_the_target_in_place(tmp_path, monkeypatch):
    """A failed rename leaves the old file whole (a writer that opened the target would have changed it)."""
    from segpcl_fast.fileio import atomic_write_bytes, atomic_write_text
    target = tmp_path / "results.json"
    target.write_text("old\n")

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", no_rename)
    for write in (lambda: atomic_write_text(target, "new\n"), lambda: atomic_write_bytes(target, b"new\n")):
        with pytest.raises(OSError, match="No space"):
            write()
        assert target.read_text() == "old\n"
        assert os.listdir(tmp_path) == ["results.json"]


def test_a_folder_without_search_permission_is_not_writable(tmp_path, monkeypatch):
    """Creating a file needs write and search (x) permission on the folder: access(W_OK | X_OK)."""
    from segpcl_fast.fileio import unwritable_dir_reason
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) and mode & os.X_OK
                        else real_access(p, mode))
    assert unwritable_dir_reason(locked) == f"{locked} is not writable"
    assert unwritable_dir_reason(tmp_path / "other") is None


def test_a_config_object_is_validated_and_copied():
    """README: every config value is checked when the config is built; a Config built in code too,
    and train() never edits the caller's object."""
    from segpcl_fast.api import make_config
    from segpcl_fast.config import Config, ConfigError, OptimConfig
    with pytest.raises(ConfigError, match=r"optim\.lr.*(?s:.*)optim\.schedule"):
        make_config(Config(optim=OptimConfig(lr=-1.0, schedule="linear")))
    mine = Config()
    cfg = make_config(mine, lr=0.5)
    assert cfg == make_config(lr=0.5) and cfg is not mine and mine.optim.lr != 0.5


def test_a_broken_symlink_output_dir_is_named_before_anything_runs(tmp_path):
    import os
    from segpcl_fast.fileio import unwritable_dir_reason
    os.symlink(tmp_path / "gone", tmp_path / "out")
    for target in (tmp_path / "out", tmp_path / "out" / "run1"):
        reason = unwritable_dir_reason(target)
        assert reason is not None and "broken symbolic link" in reason and "gone" in reason
    assert unwritable_dir_reason(tmp_path / "fine" / "run1") is None


def test_importing_the_package_cli_help_and_config_errors_load_no_torch():
    """`import segpcl_fast`, `segpcl-fast --help` and a config error (templates checked by name, a value
    out of range) take a fraction of a second (torch + torchvision took ~4 s); the classifier, model and
    data entry points load on first use and are the real objects."""
    import subprocess
    import sys
    probe = ("import sys, segpcl_fast, segpcl_fast.cli\n"
             "assert segpcl_fast.cli.build_parser().format_help()\n"
             "rc = segpcl_fast.cli.main(['train', '--set', 'data.templates=[photo]', '--set', 'optim.lr=-1'])\n"
             "assert rc == 2, rc\n"
             "print(sorted(m for m in ('torch', 'torchvision', 'open_clip') if m in sys.modules))\n"
             "from segpcl_fast import load_classifier, ContinualClassifier, load_model\n"
             "import segpcl_fast.classifier as c, segpcl_fast.model.clip as m\n"
             "assert (load_classifier, ContinualClassifier, load_model) == (c.load_classifier, c.ContinualClassifier, "
             "m.load_model)\n"
             "print(sorted(set(segpcl_fast.__all__) - set(dir(segpcl_fast)) - set(segpcl_fast._LAZY)))\n"
             "import segpcl_fast.data as d, segpcl_fast.data.protocol as p, segpcl_fast.data.base as b\n"
             "assert (d.split_tasks, d.DatasetFormatError) == (p.split_tasks, b.DatasetFormatError)\n"
             "assert all(getattr(d, n) is not None for n in d.__all__)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["[]", "[]"]
    import segpcl_fast
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        segpcl_fast.nope


def test_run_progress_is_printed_once_without_and_with_verbose(capsys, monkeypatch):
    """cli.show_run_progress: while a command runs, the segpcl_fast.run logger's lines go to stdout as plain
    lines at the default verbosity, once (also when nested), -v's root handler does not print them again,
    a closed pipe is not an error, and afterwards the logger is as it was."""
    import io
    import logging
    from segpcl_fast.cli import show_run_progress
    run_log = logging.getLogger("segpcl_fast.run")
    before = (list(run_log.handlers), run_log.level, run_log.propagate)
    root = logging.getLogger()
    verbose = logging.StreamHandler()  # -v's basicConfig handler, on stderr
    verbose.setFormatter(logging.Formatter("INFO %(name)s: %(message)s"))
    monkeypatch.setattr(root, "handlers", [verbose])
    old_root_level = root.level
    root.setLevel(logging.WARNING)
    try:
        with show_run_progress(), show_run_progress():
            run_log.info("task 1/2: acc on seen classes 50.00%")
            logging.getLogger("segpcl_fast.engine").info("not shown without -v")
            out, err = capsys.readouterr()
            assert out == "task 1/2: acc on seen classes 50.00%\n" and err == ""
            root.setLevel(logging.INFO)
            run_log.info("task 2/2: acc on seen classes 40.00%")
            out, err = capsys.readouterr()
            assert out == "task 2/2: acc on seen classes 40.00%\n" and "acc on seen" not in err
            closed = io.StringIO()
            closed.close()
            monkeypatch.setattr("sys.stdout", closed)  # `segpcl-fast train | head` after head exits
            run_log.info("task 3/3: acc on seen classes 30.00%")  # no "--- Logging error ---" on stderr
            monkeypatch.undo()
            assert capsys.readouterr().err == ""
    finally:
        root.setLevel(old_root_level)
    assert (list(run_log.handlers), run_log.level, run_log.propagate) == before


# ----------------------------------------------------------------------------- mutation audit since 7a90c2d

def test_an_analysis_of_a_preset_gets_the_presets_folder_with_its_own_suffix():
    """analysis_config's docstring: a preset's run.output_dir (runs/cifar100, train's folder for the preset)
    becomes runs/cifar100-<name>, so the analysis' runs never land among a train run's; any other folder
    the user gave is kept as given."""
    for preset in ("cifar100", "imagenet-r", "ucf101"):
        cfg = C.load_config(preset)
        assert cfg.run.output_dir == f"runs/{preset}"
        assert C.analysis_config(cfg, "ablate").run.output_dir == f"runs/{preset}-ablate"
    assert C.analysis_config(apply_overrides(Config(), {"run.output_dir": "runs/mine"}), "ablate").run.output_dir \
        == "runs/mine"


def test_a_new_run_into_an_analysis_folder_is_refused_naming_its_runs(tmp_path):
    """check_resume_run: a folder that is no run (no config.yaml) but holds runs below it (an analysis'
    <variant>/seed<N>/) takes no new run either, not only no --resume: its files would mix with those runs.
    A folder without runs below it is fine."""
    (tmp_path / "ab" / "segpcl" / "seed0").mkdir(parents=True)
    (tmp_path / "ab" / "segpcl" / "seed0" / "config.yaml").write_text("run: {}\n")
    with pytest.raises(ConfigError, match=r"holds an analysis' runs .*seed0.*give it its own folder"):
        C.check_resume_run(apply_overrides(Config(), {"run.output_dir": str(tmp_path / "ab")}))
    (tmp_path / "empty").mkdir()
    C.check_resume_run(apply_overrides(Config(), {"run.output_dir": str(tmp_path / "empty")}))


def test_a_task_count_is_the_task_sizes_length_where_they_are_set():
    """task_count: data.task_sizes defines the tasks where set (a stored run may hold sizes beside the default
    num_tasks), else data.num_tasks."""
    data = Config().data
    assert C.task_count(data) == data.num_tasks
    data.task_sizes = [60, 40]
    assert data.num_tasks != 2 and C.task_count(data) == 2


def test_evaluate_calls_a_typo_an_unknown_key_with_a_suggestion(run_without_checkpoints):
    """A misspelt key is named as unknown (with the nearest key), not as a key evaluate may not change."""
    from segpcl_fast.api import evaluate
    with pytest.raises(ConfigError, match=r"unknown config key 'run.devcie' \(did you mean run.device\?\)"):
        evaluate(run_without_checkpoints, ["run.devcie=cpu"])
    with pytest.raises(ConfigError, match=r"unknown config key 'eval.batchsize'"):
        evaluate(run_without_checkpoints, eval__batchsize=3)


def test_tf32_and_tensorboard_are_off_and_acgd_tau_may_be_its_ceiling():
    """Defaults the config documents: run.tf32 false (torch's switch left as the process set it) and
    run.tensorboard false; acgd.tau's range is (0, MAX_ACGD_TAU], its ceiling included."""
    assert Config().run.tf32 is False and Config().run.tensorboard is False
    assert apply_overrides(Config(), [f"acgd.tau={C.MAX_ACGD_TAU:g}"]).acgd.tau == C.MAX_ACGD_TAU
    with pytest.raises(ConfigError, match="acgd.tau"):
        apply_overrides(Config(), [f"acgd.tau={C.MAX_ACGD_TAU + 1:g}"])


def test_evaluate_accepts_run_tf32(run_without_checkpoints):
    """README / EVALUATE_OVERRIDABLE: evaluate may set run.tf32 (how it runs, not what was trained)."""
    from segpcl_fast.api import evaluate
    for call in (lambda: evaluate(run_without_checkpoints, ["run.tf32=true"]),
                 lambda: evaluate(run_without_checkpoints, run__tf32=True)):
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            call()


def test_an_analysis_keeps_its_tables_on_resume_and_clears_them_otherwise(tmp_path):
    """start_table_files: a new analysis removes the earlier <name>.{json,txt,png}; a --resume keeps them
    (it rebuilds them when it finishes)."""
    from segpcl_fast.api import start_table_files
    names = ["ablate.json", "ablate.txt", "ablate.png", "other.json"]
    for name in names:
        (tmp_path / name).write_text("x")
    start_table_files(tmp_path, "ablate", [], resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    start_table_files(tmp_path, "ablate", [], resume=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json"]
