"""Config handling: value validation, numeric strings from YAML, load_config errors, file modes."""
import os
import stat
from pathlib import Path

import pytest

from segpcl_fast import config as C
from segpcl_fast.config import (Config, ConfigError, apply_overrides, config_from_dict, load_config, save_config,
                                validate)
from segpcl_fast.fileio import atomic_write_text, chmod_like_open

# (override, the key the error must name): values the old code accepted silently or failed on late
INVALID = [
    ("run.method=bogus", "run.method"),
    ("run.method=SeGP-CL", "run.method"),
    ("run.precision=fp8", "run.precision"),
    ("optim.schedule=linear", "optim.schedule"),
    ("optim.cls_over=foo", "optim.cls_over"),
    ("optim.fused=foo", "optim.fused"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=.nan", "optim.lr"),
    ("optim.lr=.inf", "optim.lr"),
    ("optim.lr=0", "optim.lr"),
    ("optim.batch_size=0", "optim.batch_size"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("data.num_workers=-1", "data.num_workers"),
    ("dpgd.k_adv=-1", "dpgd.k_adv"),
    ("dpgd.k_seed=0", "dpgd.k_seed"),
    ("acgd.source=foo", "acgd.source"),
    ("acgd.tau=0", "acgd.tau"),
    ("acgd.weight=-5", "acgd.weight"),
    ("prototypes.weight_rule=foo", "prototypes.weight_rule"),
    ("prototypes.beta=.nan", "prototypes.beta"),
    ("lora.rank=0", "lora.rank"),
    ("lora.targets=[foo]", "lora.targets"),
    ("lora.targets=[]", "lora.targets"),
    ("lora.towers=[vis]", "lora.towers"),
    ("tsgr.k=0", "tsgr.k"),
    ("tsgr.tau=0", "tsgr.tau"),
    ("tsgr.reference=student", "tsgr.reference"),
    ("run.ops=foo", "run.ops"),
    ("run.device=gpu", "run.device"),
    ("data.max_train_per_class=-1", "data.max_train_per_class"),
    ("data.synthetic_shift=5", "data.synthetic_shift"),
    ("data.test_fraction=1", "data.test_fraction"),
    ("data.class_order=random", "data.class_order"),
    ("data.dataset=mnist", "data.dataset"),
    ("data.num_tasks=0", "data.num_tasks"),
    ("data.task_sizes=[10,0]", "data.task_sizes"),
    ("data.templates=[a,b]", "data.templates"),
    ("data.templates=[clip_default,cub]", "data.templates"),
    ("optim.momentum=1.5", "optim.momentum"),
    ("optim.epochs=-1", "optim.epochs"),
    # ranges (config.RULES) and types (the annotations) a mutation audit found unchecked
    ("optim.momentum=1", "optim.momentum"),             # [0, 1): momentum 1 never decays
    ("data.order_seed=4294967296", "data.order_seed"),  # numpy RandomState seeds end at 2**32 - 1
    ("data.split_seed=4294967296", "data.split_seed"),
    ("data.order_seed=-1", "data.order_seed"),
    ("dpgd.eps=-0.1", "dpgd.eps"),
    ("dpgd.gamma=-0.001", "dpgd.gamma"),
    ("dpgd.lambda_p=-1", "dpgd.lambda_p"),
    ("dpgd.batch_size=0", "dpgd.batch_size"),
    ("tsgr.weight=-1", "tsgr.weight"),
    ("optim.weight_decay=-1", "optim.weight_decay"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("optim.grad_clip=-1", "optim.grad_clip"),
    ("lora.alpha=0", "lora.alpha"),
    ("lora.init_seed=-1", "lora.init_seed"),
    ("run.seed=-1", "run.seed"),
    ("run.num_threads=-1", "run.num_threads"),
    ("run.max_steps_per_task=-1", "run.max_steps_per_task"),
    ("data.test_fraction=0", "data.test_fraction"),
    ("data.expected_classes=-1", "data.expected_classes"),
    ("data.synthetic_seed=-1", "data.synthetic_seed"),
    ("data.max_test_per_class=-1", "data.max_test_per_class"),
    ("acgd.anchor_batch=-1", "acgd.anchor_batch"),
    ("model.name=' '", "model.name"),
    ("run.output_dir=' '", "run.output_dir"),
    ("data.class_order=[-1,0]", "data.class_order"),    # indices are >= 0
    ("data.class_order=[true,false]", "data.class_order"),  # booleans are not class indices
    ("data.class_order=[]", "data.class_order"),
    ("run.device=cuda:", "run.device"),
    ("run.device=cuda:x", "run.device"),
    # a boolean is not a number and a number is not a boolean (bool is an int subclass in Python)
    ("run.compile=1", "run.compile"),
    ("run.plots=0", "run.plots"),
    ("optim.epochs=true", "optim.epochs"),
    ("lora.rank=true", "lora.rank"),
    ("optim.lr=true", "optim.lr"),
    ("acgd.weight=false", "acgd.weight"),
]


@pytest.mark.parametrize("override,key", INVALID)
def test_invalid_value_is_rejected_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), [override])
    assert key in str(e.value)
    assert "got" in str(e.value)


@pytest.mark.parametrize("value,alias", [("half", "fp16"), ("float16", "fp16"), ("torch.bfloat16", "bf16"),
                                         ("FP32", "fp32"), ("fp8", None)])
def test_a_precision_spelled_as_torch_spells_it_names_the_key_to_write(value, alias):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), [f"run.text_precision={value}"])
    hint = f"(for '{value}' write '{alias}')"
    assert ("run.text_precision must be one of ['fp32', 'bf16', 'fp16']" in str(e.value)
            and (hint in str(e.value)) == (alias is not None)), str(e.value)


def test_task_sizes_and_num_tasks_must_agree():
    """A preset's task_sizes (ucf101: 11 + 9 x 10) with another num_tasks was a late, puzzling error
    about the class count; now it is a config error naming both keys and the fix."""
    from segpcl_fast.api import make_config
    # 101 classes into 2 tasks: null would fail later (no equal split), so the fix offered is sizes that work
    with pytest.raises(ConfigError, match=r"data.task_sizes has 10 entries .* data.num_tasks is 2: give one size per "
                                          r"task, e.g. data.task_sizes=\[51,50\] \(101 classes do not split into 2 "
                                          r"equal tasks\)"):
        make_config("ucf101", ["data.num_tasks=2"])
    assert make_config("ucf101", ["data.num_tasks=2", "data.task_sizes=[51,50]"]).data.task_sizes == [51, 50]
    # a subset (data.expected_classes, as README says for a few classes): the fix splits those classes, not 101
    with pytest.raises(ConfigError, match=r"data.task_sizes=null to split the 4 classes into 2 equal tasks"):
        make_config("ucf101", ["data.num_tasks=2", "data.expected_classes=4"])
    with pytest.raises(ConfigError, match=r"e.g. data.task_sizes=\[3,2\] \(5 classes do not split"):
        make_config("ucf101", ["data.num_tasks=2", "data.expected_classes=5"])
    with pytest.raises(ConfigError, match=r"data.task_sizes=null to split the 100 classes into 5 equal tasks"):
        make_config(None, ["data.num_tasks=5", "data.task_sizes=[60,40]"])
    assert make_config("ucf101", ["data.num_tasks=2", "data.task_sizes=null"]).data.task_sizes is None
    assert make_config(None, ["data.num_tasks=2", "data.task_sizes=[60,40]"]).data.task_sizes == [60, 40]
    with pytest.raises(ConfigError, match="data.task_sizes has 2 entries"):
        make_config(None, ["data.task_sizes=[60,40]"])
    # a stored run's config from before the check (sizes with the default num_tasks) still loads
    assert config_from_dict({"data": {"task_sizes": [60, 40]}}).data.task_sizes == [60, 40]


def test_task_sizes_beside_the_default_num_tasks_name_the_num_tasks_that_takes_them():
    """--set data.task_sizes=[2,2] on a 4-class subset, num_tasks left at its default 10: the fix offered was
    data.task_sizes=[1,1,1,1,0,0,0,0,0,0] (empty tasks: refused next); now data.num_tasks=2 first, and no sizes of 0.
    On the offline world the classes split are its 100, not the sizes' sum."""
    from segpcl_fast.api import make_config
    with pytest.raises(ConfigError) as e:
        make_config("imagenet-r", ["data.task_sizes=[2,2]", "data.expected_classes=4"])
    assert "set data.num_tasks=2 for these sizes" in str(e.value) and ",0" not in str(e.value), str(e.value)
    assert make_config("imagenet-r", ["data.task_sizes=[2,2]", "data.expected_classes=4",
                                      "data.num_tasks=2"]).data.task_sizes == [2, 2]
    with pytest.raises(ConfigError) as e:
        make_config(None, ["data.task_sizes=[2,2]"])
    assert "split the 100 classes into 10 equal tasks" in str(e.value) and "num_tasks=2" not in str(e.value)
    from segpcl_fast.config import OFFLINE_WORLD_CLASSES
    from segpcl_fast.data.synthetic import NUM_CLASSES
    assert OFFLINE_WORLD_CLASSES == NUM_CLASSES
    with pytest.raises(ConfigError) as e:  # a num_tasks set on purpose keeps its own fix: the sizes'
        make_config("ucf101", ["data.num_tasks=200"])
    assert "101 classes cannot make 200 tasks" in str(e.value) and "num_tasks=10" not in str(e.value), str(e.value)


def test_a_data_root_for_the_offline_world_is_a_forgotten_dataset_choice():
    from segpcl_fast.api import make_config
    with pytest.raises(ConfigError, match=r"data.root is /data/c100 but data.dataset is 'synthetic', the offline "
                                          r"world, which reads no files: .*--config cifar100.*or drop data.root"):
        make_config(None, ["data.root=/data/c100"])
    assert make_config("cifar100", ["data.root=/data/c100"]).data.root == "/data/c100"
    assert make_config(None, ["data.root=null"]).data.root is None


def test_the_offline_world_counts_its_own_100_classes():
    """expected_classes beside the offline world: not 100 is refused before anything loads (data.build's count
    check said to point data.root at a full copy, which the offline world does not read); 100 is its count.
    A task-size hint counts the world's 100 classes, as data.build.check_task_split does, whatever
    expected_classes says."""
    from segpcl_fast.api import make_config
    from segpcl_fast.data.build import check_task_split
    with pytest.raises(ConfigError, match=r"data.expected_classes is 50 but data.dataset is 'synthetic', the "
                                          r"offline world of 100 classes: drop data.expected_classes"):
        make_config(None, ["data.expected_classes=50"])
    assert make_config(None, ["data.expected_classes=100"]).data.expected_classes == 100
    with pytest.raises(ConfigError, match="split the 100 classes into 10 equal tasks"):
        make_config(None, ["data.task_sizes=[2,2]", "data.expected_classes=50"])
    check_task_split(make_config(None, ["data.num_tasks=4"]).data)  # 100 = 4 x 25
    with pytest.raises(ValueError):
        check_task_split(make_config(None, ["data.num_tasks=3"]).data)  # 100 does not split into 3


def test_one_error_lists_every_invalid_key_with_value_and_range():
    bad = {"optim": {"lr": -1, "schedule": "linear"}, "run": {"precision": "fp8"}, "tsgr": {"k": 0}}
    with pytest.raises(ConfigError) as e:
        config_from_dict(bad)
    msg = str(e.value)
    assert "optim.lr must be a finite number > 0, got -1.0" in msg
    assert "optim.schedule must be one of ['cosine', 'constant'], got 'linear'" in msg
    assert "run.precision must be one of ['fp32', 'bf16', 'fp16'], got 'fp8'" in msg
    assert "tsgr.k must be an integer >= 1, got 0" in msg
    assert msg.startswith("4 invalid")


@pytest.mark.parametrize("override", [
    "optim.epochs=0",               # zeroshot variant
    "data.max_train_per_class=0",   # no cap
    "data.max_test_per_class=0",
    "acgd.weight=0",                # ACGD off
    "prototypes.beta=0",            # onlyclip
    "dpgd.k_adv=0",                 # seeds without PGD
    "data.synthetic_shift=0", "data.synthetic_shift=1",
    "data.expected_classes=null", "data.expected_classes=0",
    "data.class_order=natural", "data.class_order=[2,0,1]", "data.class_order=[cat,dog]",
    "run.device=cuda:1", "run.device=cpu",
    "lora.targets=[q,k,v,out,c_fc,c_proj]", "lora.towers=[visual]",
    "optim.grad_clip=0", "optim.momentum=0",
])
def test_meaningful_boundary_values_are_accepted(override):
    apply_overrides(Config(), [override])


def test_defaults_presets_and_variants_validate():
    from segpcl_fast.method.variants import resolve_variant, variant_names
    assert validate(Config()) == Config()
    for name in C.preset_names():
        assert isinstance(load_config(name), Config)
    for name in variant_names():  # every variant's overrides are valid values
        resolve_variant(apply_overrides(Config(), {"run.method": name}))


def test_validate_catches_values_set_directly_on_the_dataclasses():
    cfg = Config()
    cfg.optim.lr = "fast"
    cfg.tsgr.tau = float("inf")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert "optim.lr" in str(e.value) and "tsgr.tau" in str(e.value)


def test_accepted_choices_match_the_consuming_code():
    from segpcl_fast.data.build import DATASETS
    from segpcl_fast.method.prototypes import WEIGHT_RULES
    from segpcl_fast.model.lora import VALID_TARGETS, VALID_TOWERS
    from segpcl_fast.ops.dispatch import BACKENDS
    assert set(C.OPS_BACKENDS) == set(BACKENDS)
    assert set(C.LORA_TARGETS) == set(VALID_TARGETS)
    assert set(C.LORA_TOWERS) == set(VALID_TOWERS)
    assert set(C.WEIGHT_RULES) == set(WEIGHT_RULES)
    assert set(C.DATASETS) == set(DATASETS)
    from segpcl_fast.engine.presets import PRESETS
    assert set(C.HARDWARE_PRESETS) == set(PRESETS)
    from segpcl_fast.method.variants import variant_names
    assert list(C.METHODS) == variant_names()


def test_an_unknown_config_lists_configs_and_hardware_presets_apart():
    with pytest.raises(ConfigError, match=r"one of the presets \[.*'cifar100'.*\]; hardware presets for --hw: "
                                          r"\['1gpu', '2x4090'\]") as e:
        load_config("cifar1000")
    assert "'1gpu'" not in str(e.value).split("hardware presets")[0]


def test_every_schedule_and_fused_choice_does_what_it_names():
    import torch
    from segpcl_fast.engine.trainer import lr_at, make_optimizer
    cosine = apply_overrides(Config(), ["optim.schedule=cosine"])
    constant = apply_overrides(Config(), ["optim.schedule=constant"])
    assert lr_at(50, 100, cosine) == pytest.approx(0.5e-3)
    assert lr_at(50, 100, constant) == pytest.approx(1e-3)
    for fused in C.FUSED_SGD:
        opt = make_optimizer([torch.nn.Parameter(torch.zeros(2))], apply_overrides(Config(), [f"optim.fused={fused}"]))
        assert isinstance(opt, torch.optim.SGD)


# ----------------------------------------------------------------------------- numeric strings

def test_yaml_exponent_literals_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  batch_size: 1e2\n  weight_decay: 5E-4\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.batch_size == 100 and isinstance(cfg.optim.batch_size, int)
    assert cfg.optim.weight_decay == 5e-4


def test_numeric_strings_coerce_only_when_they_parse():
    cfg = config_from_dict({"optim": {"lr": "3e-4", "epochs": "7"}, "data": {"expected_classes": "100"}})
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.data.expected_classes) == (3e-4, 7, 100)
    for bad in ({"optim": {"lr": "fast"}}, {"optim": {"batch_size": "1.5e0"}}, {"optim": {"epochs": "nan"}}):
        with pytest.raises(ConfigError):
            config_from_dict(bad)


def test_command_line_integers_are_decimal_and_base_60_is_text():
    """PyYAML's YAML 1.1 read `--set run.seed=010` as octal 8 (while `--seed 010` gave 10) and
    `run.seed=1:30` as base 60, 90: command-line numbers are read as YAML 1.2 / argparse read them."""
    from segpcl_fast.config import parse_value
    assert apply_overrides(Config(), ["run.seed=010"]).run.seed == 10
    assert apply_overrides(Config(), ["data.order_seed=0042"]).data.order_seed == 42
    assert apply_overrides(Config(), ["run.seed=08"]).run.seed == 8  # YAML 1.1: the text '08'
    assert [parse_value(t) for t in ("1_000", "0x10", "0", "00", "1:30")] == [1000, 16, 0, 0, "1:30"]
    with pytest.raises(ConfigError, match=r"run.seed.*expects an integer, got '1:30'"):
        apply_overrides(Config(), ["run.seed=1:30"])
    assert apply_overrides(Config(), ["run.output_dir=010"]).run.output_dir == "010"  # a string key: as written


# ----------------------------------------------------------------------------- load_config errors

@pytest.mark.parametrize("text, names", [
    ("optim:\n  lr: 0.1\n  schedule: [cosine\nrun:\n  seed: 1\n", "line"),  # YAML syntax error: its line
    ("run:\n  precision: fp8\n", "run.precision"),  # an invalid value: its key
])
def test_a_bad_file_is_one_error_naming_the_file(tmp_path, text, names):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and names in str(e.value)


def test_base_cycle_is_an_error_naming_the_cycle(tmp_path):
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "self.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "a.yaml")
    assert "a.yaml -> " in str(e.value) and "b.yaml" in str(e.value)


def test_base_is_relative_to_the_yaml_folder_and_presets_still_work(tmp_path, monkeypatch):
    sub = tmp_path / "exp"
    sub.mkdir()
    (sub / "common.yaml").write_text("optim:\n  lr: 0.05\n  epochs: 3\n")
    (sub / "child.yaml").write_text("base: common.yaml\noptim:\n  epochs: 4\n")
    (sub / "on_preset.yaml").write_text("base: cifar100\nrun:\n  seed: 3\n")
    monkeypatch.chdir(tmp_path)  # the base must not be looked up relative to the cwd
    cfg = load_config("exp/child.yaml")
    assert (cfg.optim.lr, cfg.optim.epochs) == (0.05, 4)
    cfg = load_config(sub / "on_preset.yaml")
    assert cfg.data.dataset == "cifar100" and cfg.run.seed == 3


def test_directory_and_missing_paths_give_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="directory"):
        load_config(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "y" / "nonexist.yaml")
    msg = str(e.value)
    assert "does not exist" in msg and "cifar100" in msg
    assert str(C.PRESET_DIR / "y") not in msg and "nonexist.yaml.yaml" not in msg


def test_save_load_roundtrip(tmp_path):
    cfg = apply_overrides(Config(), ["optim.lr=3e-4", "lora.towers=[text]", "data.class_order=[1,0]"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


# ----------------------------------------------------------------------------- file modes

@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_gives_the_mode_open_would(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "out" / "a.txt", "x\n")
        assert stat.S_IMODE((tmp_path / "out" / "a.txt").stat().st_mode) == mode
        with open(tmp_path / "plain.txt", "w") as f:  # the reference: what open() creates
            f.write("x\n")
        assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == mode
        assert os.umask(umask) == umask  # chmod_like_open restored the umask
    finally:
        os.umask(old)
    assert (tmp_path / "out" / "a.txt").read_text() == "x\n"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.txt"]  # no temp file left


def test_chmod_like_open_on_a_mkstemp_file(tmp_path):
    import tempfile
    fd, tmp = tempfile.mkstemp(dir=tmp_path)
    os.close(fd)
    old = os.umask(0o027)
    try:
        assert stat.S_IMODE(Path(tmp).stat().st_mode) == 0o600
        chmod_like_open(tmp)
        assert stat.S_IMODE(Path(tmp).stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_override_with_broken_yaml_is_a_config_error():
    with pytest.raises(ConfigError, match="lora.targets=\\[k,v\\]"):
        apply_overrides(Config(), ["lora.targets=[k,v"])


def test_unknown_keys_wrong_types_and_out_of_range_values_are_listed_together():
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), ["data.bogus=1", "optim.epochs=abc", "foo.x=1", "optim.lr=-1"])
    msg = str(e.value)
    assert msg.startswith("4 invalid config keys / values")
    assert "unknown config key 'data.bogus'" in msg and "'optim.epochs' expects an integer, got 'abc'" in msg
    assert "unknown config section 'foo'" in msg
    assert "optim.lr must be a finite number > 0, got -1.0" in msg  # a range problem beside them


def test_string_keys_take_the_command_line_text_as_written():
    """YAML reads 2024, off, yes, '#x' and 'a: b' as other things; a folder may be called that."""
    for text in ("2024", "off", "yes", "null", "#x", "a: b", "1e3"):
        assert apply_overrides(Config(), [f"run.output_dir={text}"]).run.output_dir == text
    assert apply_overrides(Config(), ["data.root=off"]).data.root == "off"
    assert apply_overrides(Config(), ["data.root=null"]).data.root is None  # Optional: null still unsets
    assert apply_overrides(Config(), ["model.pretrained=~"]).model.pretrained is None
    assert apply_overrides(Config(), ["run.method='lora_finetune'"]).run.method == "lora_finetune"
    cfg = apply_overrides(Config(), ["optim.lr=1e-3", "run.compile=true", "lora.targets=[k,v]"])
    assert (cfg.optim.lr, cfg.run.compile, cfg.lora.targets) == (1e-3, True, ["k", "v"])  # others: YAML as before


def test_a_yaml_number_for_a_string_key_says_to_quote_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  output_dir: 2024\n")
    with pytest.raises(ConfigError, match="run.output_dir' expects a string, got 2024 \\(in a YAML file, quote it: "
                                          "output_dir: '2024'\\)"):
        load_config(path)


def test_one_template_string_is_a_list_of_one():
    cfg = apply_overrides(Config(), ["data.templates=a photo of a {}."])
    assert cfg.data.templates == ["a photo of a {}."]
    with pytest.raises(ConfigError, match="'lora.targets' expects a list, got 'v'$"):  # ambiguous in a sweep: still an error
        config_from_dict({"lora": {"targets": "v"}})
    with pytest.raises(ConfigError, match=r"'data.task_sizes' expects a list, got '30,30' \(in brackets: "
                                          r"data.task_sizes=\[30,30\]\)$"):
        apply_overrides(Config(), ["data.task_sizes=30,30"])


def test_output_dir_home_is_expanded_like_the_data_paths():
    cfg = apply_overrides(Config(), ["run.output_dir=~/runs/x"])
    assert cfg.run.output_dir == os.path.expanduser("~/runs/x") != "~/runs/x"


def test_a_bare_or_misspelled_key_suggests_the_key():
    with pytest.raises(ConfigError, match=r"'lr' must be dotted \(section.key\) \(did you mean optim.lr\?\)"):
        apply_overrides(Config(), ["lr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr' \(did you mean optim.lr\?\)"):
        apply_overrides(Config(), ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'dpgd.kadv' \(did you mean dpgd.k_adv\?\)"):
        apply_overrides(Config(), ["dpgd.kadv=3"])
    assert C.did_you_mean("zzzz") == ""


def test_an_empty_yaml_section_changes_nothing_and_bool_or_null_text_gets_a_fitting_hint(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\noptim:\n  lr: 0.01\n")
    cfg = load_config(path)
    assert cfg.run == Config().run and cfg.optim.lr == 0.01
    path.write_text("run:\n  device: null\n")  # null may have been written ~ or Null: the hint repeats none
    with pytest.raises(ConfigError, match="'run.device' expects a string, got None \\(YAML read the text as None: "
                                          "in a YAML file quote the text you meant, device: '...'"):
        load_config(path)


def test_pixel_radii_duplicate_targets_and_a_repeated_class_are_refused_when_the_config_is_built():
    """eps and gamma are [0,1] pixel units; a LoRA target or a class given twice in the order is a mistake
    the run would otherwise meet late (or never)."""
    with pytest.raises(ConfigError) as e:
        config_from_dict({"dpgd": {"eps": 2.0, "gamma": 5.0}, "lora": {"targets": ["k", "k"]},
                          "data": {"class_order": [0, 0, 1]}})
    for part in ("dpgd.eps must be a finite number in [0, 1]", "dpgd.gamma must be a finite number in [0, 1]",
                 "lora.targets must be a non-empty list of", "data.class_order must be one of"):
        assert part in str(e.value)
    cfg = config_from_dict({"dpgd": {"eps": 1.0, "gamma": 0.0}, "data": {"class_order": [2, 0, 1]}})
    assert (cfg.dpgd.eps, cfg.dpgd.gamma, cfg.data.class_order) == (1.0, 0.0, [2, 0, 1])


# method.md's defaults (its [choice] marks included), key by key: a changed default changes the
# method every run and preset inherits, so each is pinned here against the text it comes from.
METHOD_MD_DEFAULTS = {
    "lora.rank": 32, "lora.targets": ["k", "v", "c_fc", "c_proj"], "lora.towers": ["visual", "text"],
    "data.templates": ["a good photo of a {}."],
    "dpgd.k_seed": 5, "dpgd.k_adv": 10, "dpgd.gamma": 1.5e-3, "dpgd.eps": 8 / 255, "dpgd.random_start": False,
    "dpgd.lambda_p": 1.0,
    "acgd.enabled": True, "acgd.weight": 5.0, "acgd.tau": 20.0, "acgd.anchor_batch": 0, "acgd.source": "anchors",
    "tsgr.enabled": True, "tsgr.weight": 1.0, "tsgr.k": 10, "tsgr.tau": 0.05, "tsgr.reference": "pretrained",
    "prototypes.transfer": True, "prototypes.beta": 0.5, "prototypes.weight_rule": "relu_cos",
    "optim.lr": 1e-3, "optim.momentum": 0.9, "optim.batch_size": 128, "optim.epochs": 10,
    "optim.schedule": "cosine", "optim.cls_over": "current",
    "data.num_tasks": 10, "run.method": "segpcl",
}


def test_the_defaults_are_method_mds():
    defaults = Config().to_dict()
    got = {key: defaults[key.split(".")[0]][key.split(".")[1]] for key in METHOD_MD_DEFAULTS}
    assert got == METHOD_MD_DEFAULTS
    lora = Config().lora
    assert lora.alpha / lora.rank == 1.0  # [choice] scaling alpha / r = 1
