"""Sweep specs -> values -> grid, and every error before anything runs."""
from pathlib import Path

import pytest

from segpcl_fast.analysis.sweep import expand_grid, parse_axes, point_name, split_values, sweep, validate_grid
from segpcl_fast.api import make_config
from segpcl_fast.config import ConfigError


def test_split_values_commas_semicolons_and_brackets():
    assert split_values("5,10,20") == ["5", "10", "20"]
    assert split_values("[k,v],[q,k,v]") == ["[k,v]", "[q,k,v]"]
    assert split_values("[k,v];[q,k,v]") == ["[k,v]", "[q,k,v]"]
    assert split_values("a photo, of {};the {}") == ["a photo, of {}", "the {}"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    with pytest.raises(ConfigError, match="unbalanced"):
        split_values("[k,v")
    with pytest.raises(ConfigError, match="empty value"):
        split_values("5,,10")


def test_parse_axes_types_and_grid_order():
    axes = parse_axes(["dpgd.k_adv=5,10,20", "optim.lr=1e-3,3e-4", "lora.targets=[k,v];[q,k,v]"])
    assert axes["dpgd.k_adv"] == [5, 10, 20]
    assert axes["optim.lr"] == [1e-3, 3e-4] and all(isinstance(v, float) for v in axes["optim.lr"])
    assert axes["lora.targets"] == [["k", "v"], ["q", "k", "v"]]
    grid = expand_grid(axes)
    assert len(grid) == 3 * 2 * 2
    assert grid[0] == {"dpgd.k_adv": 5, "optim.lr": 1e-3, "lora.targets": ["k", "v"]}
    assert grid[1] == {"dpgd.k_adv": 5, "optim.lr": 1e-3, "lora.targets": ["q", "k", "v"]}
    assert grid[-1] == {"dpgd.k_adv": 20, "optim.lr": 3e-4, "lora.targets": ["q", "k", "v"]}
    assert len({tuple(map(str, p.values())) for p in grid}) == len(grid)
    assert expand_grid({}) == [{}]


@pytest.mark.parametrize("specs, match", [
    (["dpgd.kadv=5,10"], "unknown config key 'dpgd.kadv'"),
    (["dpgd.k_adv"], "must look like section.key=v1,v2"),
    (["dpgd.k_adv=5", "dpgd.k_adv=10"], "given twice"),
    (["run.output_dir=a,b"], "run.output_dir cannot be swept"),
])
def test_parse_axes_errors(specs, match):
    with pytest.raises(ConfigError, match=match):
        parse_axes(specs)


def test_wrong_value_type_names_the_point(tmp_path):
    cfg = make_config()
    points = expand_grid(parse_axes(["dpgd.k_adv=5,ten"]))
    with pytest.raises(ConfigError, match="k_adv=ten.*expects an integer"):
        validate_grid(cfg, points, [0], tmp_path)
    points = expand_grid(parse_axes(["lora.targets=k,v"]))
    with pytest.raises(ConfigError, match=r"expects a list.*\[k,v\];\[q,k,v\]"):
        validate_grid(cfg, points, [0], tmp_path)
    points = expand_grid(parse_axes(["run.method=segpcl,nonsense"]))
    with pytest.raises(ConfigError, match=r"(?s)method=nonsense: .*run.method must be one of \[.*'segpcl'.*\], got 'nonsense'"):
        validate_grid(cfg, points, [0], tmp_path)


def test_validate_grid_gives_one_config_per_point_and_seed(tmp_path):
    cfg = make_config()
    points = expand_grid(parse_axes(["dpgd.k_adv=5,10", "optim.lr=1e-3"]))
    configs = validate_grid(cfg, points, [0, 3], tmp_path)
    assert [[c.dpgd.k_adv for c in per] for per in configs] == [[5, 5], [10, 10]]
    assert [c.run.seed for c in configs[1]] == [0, 3]
    assert len({c.run.output_dir for per in configs for c in per}) == 4


def test_bad_grid_point_fails_before_any_training(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("segpcl_fast.api.train", lambda cfg: calls.append(cfg))
    with pytest.raises(ConfigError, match="k_adv=oops"):
        sweep(make_config(output_dir=str(tmp_path)), axes=["dpgd.k_adv=5,oops"], seeds=[0])
    assert calls == []
    with pytest.raises(ConfigError, match="run.seed cannot be a sweep key"):
        sweep(make_config(output_dir=str(tmp_path)), axes=["run.seed=0,1"])
    assert point_name({"dpgd.k_adv": 5, "lora.targets": ["k", "v"]}) == "k_adv=5,targets=[k,v]"


def test_an_interrupted_sweep_resumes_the_points_it_started_and_starts_the_others(tmp_path):
    """run.resume goes to a point only where its run folder exists (a sweep stopped in its second point:
    the third has no folder, and resuming it would be refused as a missing run)."""
    cfg = make_config(output_dir=str(tmp_path), run__resume=True)
    points = expand_grid(parse_axes(["dpgd.k_adv=5,10,20"]))
    for started in ("k_adv=5", "k_adv=10"):
        (tmp_path / started / "seed0").mkdir(parents=True)
    configs = validate_grid(cfg, points, [0, 1], tmp_path)
    assert [[c.run.resume for c in per] for per in configs] == [[True, False], [True, False], [False, False]]
    with pytest.raises(ConfigError, match="sweep point 'lr=0.001' is given twice"):
        validate_grid(cfg, expand_grid(parse_axes(["optim.lr=1e-3,0.001"])), [0], tmp_path)
    # distinct values whose folder names would collide get a hash of their full name
    configs = validate_grid(make_config(output_dir=str(tmp_path)),
                            expand_grid(parse_axes(["data.templates=['a {}!'];['a {}?']"])), [0], tmp_path)
    dirs = [per[0].run.output_dir for per in configs]
    assert len(set(dirs)) == 2 and all(d.startswith(str(tmp_path / "templates=_a-")) for d in dirs)
    assert [per[0].data.templates for per in configs] == [["a {}!"], ["a {}?"]]


def test_points_that_train_the_same_configuration_are_refused(tmp_path):
    """run.method decides acgd.enabled / tsgr.enabled / prototypes.transfer (and beta 0 for CLIP-path-only
    variants): sweeping one of them would train one configuration twice under two labels."""
    with pytest.raises(ConfigError, match="sweep points enabled=True and enabled=False train the same configuration: "
                                          "run.method=segpcl decides the swept value"):
        validate_grid(make_config(), expand_grid(parse_axes(["tsgr.enabled=true,false"])), [0], tmp_path)
    with pytest.raises(ConfigError, match="beta=0.3 and beta=0.5 train the same configuration"):
        validate_grid(make_config(method="lora_finetune"), expand_grid(parse_axes(["prototypes.beta=0.3,0.5"])),
                      [0], tmp_path)
    assert len(validate_grid(make_config(), expand_grid(parse_axes(["prototypes.beta=0.3,0.5"])), [0], tmp_path)) == 2


def test_values_equal_as_the_key_reads_them_are_one_point_not_a_method_decision(tmp_path):
    """--set dpgd.k_adv=5,5.0 (an int key: 5.0 is 5) was refused as 'run.method=segpcl decides the swept value',
    which it does not: the two values are one; the error now says so."""
    with pytest.raises(ConfigError, match=r"sweep points k_adv=5 and k_adv=5.0 are the same configuration: their values "
                                          r"are equal as the key reads them \(dpgd.k_adv=5\); give each value once"):
        validate_grid(make_config(), expand_grid(parse_axes(["dpgd.k_adv=5,5.0"])), [0], tmp_path)
    with pytest.raises(ConfigError, match="run.method=segpcl decides the swept value"):  # the method's own keys: as before
        validate_grid(make_config(), expand_grid(parse_axes(["tsgr.enabled=true,false"])), [0], tmp_path)


def test_a_fixed_key_the_method_sets_otherwise_is_refused_before_any_training(tmp_path, monkeypatch):
    """--set tsgr.enabled=false (one value: fixed) under run.method=segpcl, which turns TSGR on: the table's title and
    sweep.json said "fixed: tsgr.enabled=False" while every run trained with TSGR."""
    monkeypatch.setattr("segpcl_fast.api.train", lambda cfg: pytest.fail("trained a point"))
    for kwargs in ({"axes": ["optim.lr=0.05,0.01", "tsgr.enabled=false"]},
                   {"axes": ["optim.lr=0.05,0.01"], "fixed": ["tsgr.enabled=false"]}):
        with pytest.raises(ConfigError, match=r"the fixed tsgr.enabled=False is not what the runs would train with: "
                                              r"run.method=segpcl sets tsgr.enabled=True .* a key the method leaves "
                                              r"alone \(tsgr.weight=0 turns TSGR off\)"):
            sweep(make_config(output_dir=str(tmp_path)), seeds=[0], **kwargs)
    # a fixed key the method leaves alone, and one it sets to the same value, are fine
    configs = validate_grid(make_config(), expand_grid(parse_axes(["optim.lr=0.05,0.01"])), [0], tmp_path,
                            fixed={"tsgr.weight": 0.5, "tsgr.enabled": True})
    assert len(configs) == 2


def test_each_points_task_split_is_checked_before_any_training(tmp_path, monkeypatch):
    """A sweep over data.num_tasks trained the point 2 in full, then met 3, which does not divide the offline
    world's 100 classes; a preset's class count (data.expected_classes) is known before its data is read too."""
    monkeypatch.setattr("segpcl_fast.api.train", lambda cfg: pytest.fail("trained a point"))
    with pytest.raises(ConfigError, match=r"sweep point num_tasks=3: data.num_tasks=3 does not divide the 100 classes"):
        sweep(make_config(output_dir=str(tmp_path)), axes=["data.num_tasks=2,3"], seeds=[0])
    with pytest.raises(ConfigError, match=r"sweep point num_tasks=4: data.task_sizes has 3 entries"):
        validate_grid(make_config(task_sizes=[50, 25, 25], num_tasks=3), expand_grid(parse_axes(["data.num_tasks=3,4"])),
                      [0], tmp_path)
    with pytest.raises(ConfigError, match=r"num_tasks=7: data.num_tasks=7 does not divide the 200 classes"):
        validate_grid(make_config("cub200", data__root=str(tmp_path)), expand_grid(parse_axes(["data.num_tasks=10,7"])),
                      [0], tmp_path)
    with pytest.raises(ConfigError, match=r"root=/x: data.root is /x but data.dataset is 'synthetic'"):
        validate_grid(make_config(), expand_grid(parse_axes(["data.root=/x"])), [0], tmp_path)


def test_a_resumed_sweep_continues_a_points_run_from_the_folder_it_had_as_a_fixed_key(small_config, monkeypatch):
    """--set prototypes.beta=0.3 (one value: a fixed key, its runs in base/), then --resume --set
    prototypes.beta=0.3,0.5: beta=0.3 trained again in beta=0.3/ beside base/'s finished run of the same config.
    It continues base/'s run (its config.yaml, as the trainer saved it, has the point's fingerprint); a run of
    another config is never taken (beta=0.4 trains)."""
    import segpcl_fast.api
    first = sweep(small_config("sw", run__plots=False), axes=["prototypes.beta=0.3"], seeds=[0])
    out = Path(first["rows"][0]["runs"][0]).parent.parent
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["base"]
    real_train, started = segpcl_fast.api.train, []

    def train(cfg):
        started.append((Path(cfg.run.output_dir).relative_to(out).as_posix(), cfg.run.resume))
        return real_train(cfg)
    monkeypatch.setattr(segpcl_fast.api, "train", train)
    again = sweep(small_config("sw", run__plots=False, run__resume=True), axes=["prototypes.beta=0.3,0.5,0.4"],
                  seeds=[0])
    assert started == [("base/seed0", True), ("beta=0.5/seed0", False), ("beta=0.4/seed0", False)]
    assert [r["prototypes.beta"] for r in again["rows"]] == [0.3, 0.5, 0.4]
    assert again["rows"][0]["runs"] == first["rows"][0]["runs"]
    assert again["rows"][0]["Last"] == first["rows"][0]["Last"]
    assert not (out / "beta=0.3").exists()
    started.clear()  # narrowed back to one value: base/ holds beta=0.3's run, beta=0.5's is in beta=0.5/
    narrowed = sweep(small_config("sw", run__plots=False, run__resume=True), axes=["prototypes.beta=0.5"], seeds=[0])
    assert started == [("beta=0.5/seed0", True)]
    assert narrowed["rows"][0]["Last"] == again["rows"][1]["Last"]


def test_a_resumed_sweep_finds_the_earlier_run_of_a_method_that_resolves_its_switches(small_config, monkeypatch):
    """A point's run is found by the config its Trainer records (run.method's switches resolved: lora_finetune turns
    TSGR, DPGD, ACGD off), not by the point's config as given, which no config.yaml holds."""
    import segpcl_fast.api
    kw = dict(run__plots=False, run__method="lora_finetune")
    first = sweep(small_config("swl", **kw), axes=["optim.lr=0.01"], seeds=[0])
    real_train, started = segpcl_fast.api.train, []
    monkeypatch.setattr(segpcl_fast.api, "train", lambda cfg: started.append(Path(cfg.run.output_dir).parent.name)
                        or real_train(cfg))
    again = sweep(small_config("swl", run__resume=True, **kw), axes=["optim.lr=0.01,0.02"], seeds=[0])
    assert started == ["base", "lr=0.02"]
    assert again["rows"][0]["runs"] == first["rows"][0]["runs"]
