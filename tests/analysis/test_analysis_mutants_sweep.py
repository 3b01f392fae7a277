"""Tests added by a mutation audit of segpcl_fast/analysis/sweep.py: value splitting with double
quotes, braces and parentheses and unbalanced text, the dict form of the axes, point names, the
list-type hint, and sweep() itself with training replaced by a stand-in (every point x seed trained
once with its seed, mean +- sample std per point, the fixed overrides, the single-run plot)."""
import importlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from segpcl_fast.analysis.sweep import expand_grid, parse_axes, point_name, split_values, sweep, validate_grid
from segpcl_fast.api import make_config
from segpcl_fast.config import ConfigError

sweep_mod = importlib.import_module("segpcl_fast.analysis.sweep")  # the package exports a function of that name


def test_split_values_nests_double_quotes_braces_and_parentheses():
    assert split_values('"a,b",c') == ['"a,b"', "c"]
    assert split_values('"a;b",c') == ['"a;b"', "c"]
    assert split_values("{a: 1, b: 2},{a: 3}") == ["{a: 1, b: 2}", "{a: 3}"]
    assert split_values("(1,2),(3)") == ["(1,2)", "(3)"]


@pytest.mark.parametrize("text", ["]k,v[", "'a,b", '"a', "{a: 1", "(1,2"])
def test_unbalanced_values_are_refused(text):
    with pytest.raises(ConfigError, match="unbalanced"):
        split_values(text)


def test_keys_that_change_only_what_a_run_shows_are_no_axis():
    """run.tensorboard=true,false trained the same run twice without a word (a review's finding); one value is fine."""
    for key in ("run.tensorboard", "run.plots", "run.checkpoint"):
        with pytest.raises(ConfigError, match=f"sweep key '{key}' has values .* changes only what a run shows"):
            parse_axes([f"{key}=true,false"])
        assert parse_axes([f"{key}=false", "dpgd.k_adv=5,10"])[key] == [False]


def test_parse_axes_dict_form_and_spaces():
    axes = parse_axes({"optim.lr": (1e-3, 1e-4), "dpgd.k_adv": 5, "lora.targets": [["k", "v"]]})
    assert axes == {"optim.lr": [1e-3, 1e-4], "dpgd.k_adv": [5], "lora.targets": [["k", "v"]]}
    assert parse_axes([" dpgd.k_adv = 5, 10"]) == {"dpgd.k_adv": [5, 10]}
    with pytest.raises(ConfigError, match="'dpgd.k_adv' has no values"):
        parse_axes({"dpgd.k_adv": []})


def test_point_name_of_the_empty_point_is_base():
    assert point_name({}) == "base"


def test_only_list_errors_get_the_list_hint(tmp_path):
    with pytest.raises(ConfigError, match="expects an integer") as err:
        validate_grid(make_config(), expand_grid(parse_axes(["dpgd.k_adv=5,ten"])), [0], tmp_path)
    assert "[k,v];[q,k,v]" not in str(err.value)


def _last(cfg):
    return 50.0 + cfg.dpgd.k_adv + 2.0 * cfg.run.seed


@pytest.fixture
def stand_in_train(monkeypatch):
    calls = []

    def train(cfg):
        calls.append(cfg)
        return SimpleNamespace(output_dir=cfg.run.output_dir,
                               metrics={"Avg": _last(cfg) + 5, "Last": _last(cfg), "Forgetting": None, "BWT": -1.0})
    monkeypatch.setattr("segpcl_fast.api.train", train)
    return calls


def test_sweep_trains_every_point_and_seed_and_averages_over_seeds(stand_in_train, tmp_path):
    out = sweep(make_config(output_dir=str(tmp_path)), axes=["dpgd.k_adv=1,3", "optim.lr=0.02"], seeds=[0, 1, 5])
    assert [(c.dpgd.k_adv, c.run.seed) for c in stand_in_train] == [(k, s) for k in (1, 3) for s in (0, 1, 5)]
    assert all(c.optim.lr == 0.02 for c in stand_in_train)
    rows = out["rows"]
    assert [r["dpgd.k_adv"] for r in rows] == [1, 3] and all(r["seeds"] == 3 for r in rows)
    lasts = [50.0 + 3 + 2.0 * s for s in (0, 1, 5)]
    assert rows[1]["Last"] == pytest.approx(np.mean(lasts))
    assert rows[1]["Last_std"] == pytest.approx(np.std(lasts, ddof=1))
    assert rows[1]["Forgetting"] is None and rows[1]["BWT"] == -1.0
    assert rows[1]["runs"] == [str(tmp_path / "k_adv=3" / f"seed{s}") for s in (0, 1, 5)]
    assert f"{np.mean(lasts):.2f} +- {np.std(lasts, ddof=1):.2f}" in out["table"]
    saved = json.loads(Path(out["paths"]["json"]).read_text())
    assert saved["fixed"] == {"optim.lr": 0.02} and saved["axes"] == {"dpgd.k_adv": [1, 3]}
    assert saved["seeds"] == [0, 1, 5]


def test_a_sweep_without_a_swept_key_is_one_run_with_a_plot(stand_in_train, tmp_path):
    out = sweep(make_config(output_dir=str(tmp_path)), axes=["optim.lr=0.02"], seeds=[0])
    assert len(stand_in_train) == 1 and len(out["rows"]) == 1
    assert Path(out["paths"]["png"]).read_bytes()[:4] == b"\x89PNG"


def test_no_seeds_is_refused_before_training(stand_in_train, tmp_path):
    with pytest.raises(ConfigError, match="at least one seed"):
        sweep(make_config(output_dir=str(tmp_path)), axes=["dpgd.k_adv=1,2"], seeds=[])
    assert stand_in_train == []


def test_the_plot_puts_the_first_swept_key_on_the_x_axis(stand_in_train, tmp_path, monkeypatch):
    figs = []
    monkeypatch.setattr(sweep_mod, "save_png", lambda fig, path: figs.append(fig) or str(path))
    sweep(make_config(output_dir=str(tmp_path)), axes=["dpgd.k_adv=1,3", "dpgd.k_seed=2,4,6"], seeds=[0])
    ax = figs[0].axes[0]
    assert ax.get_xlabel() == "dpgd.k_adv" and [t.get_text() for t in ax.get_xticklabels()] == ["1", "3"]
    lines = {c.get_label(): c.lines[0].get_ydata() for c in ax.containers}  # errorbar: (data line, caps, bars)
    assert sorted(lines) == sorted(f"{m} (k_seed={k})" for m in ("Last", "Avg") for k in (2, 4, 6))
    assert list(lines["Last (k_seed=4)"]) == [51.0, 53.0]  # Last = 50 + k_adv (seed 0)
    assert ax.get_title().endswith(": one seed")
    assert all(c.has_yerr is False for c in ax.containers)  # one seed: no zero-length error bars
    figs.clear()
    sweep(make_config(output_dir=str(tmp_path / "two")), axes=["dpgd.k_adv=1,3"], seeds=[0, 1])
    ax = figs[0].axes[0]
    assert ax.get_title().endswith("mean +- sample std over 2 seeds") and all(c.has_yerr for c in ax.containers)


def test_the_clis_fixed_keys_are_recorded_and_named_and_plots_off_removes_a_stale_plot(stand_in_train, tmp_path,
                                                                                       capsys):
    """--fixed values (which may hold commas) reached the runs but sweep.json said "fixed": {} and the
    table named none; a rerun with run.plots=false left the earlier sweep.png beside the new numbers."""
    from segpcl_fast.cli import main
    assert main(["sweep", "--set", "dpgd.k_adv=1,3", "--fixed", "data.task_sizes=[50,50]", "--fixed",
                 "data.num_tasks=2", "--set", "run.progress=false", "--fixed", "run.plots=true", "-o", str(tmp_path)]) == 0
    # keys that change only what a run shows or keeps are not named beside what the numbers depend on
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["fixed"] == {"data.task_sizes": [50, 50], "data.num_tasks": 2}
    assert all(c.data.task_sizes == [50, 50] for c in stand_in_train)
    table = (tmp_path / "sweep.txt").read_text()
    assert "accuracies in %; fixed: data.task_sizes=[50,50], data.num_tasks=2)" in table
    assert (tmp_path / "sweep.png").is_file()
    for p in tmp_path.glob("k_adv=*"):  # the stand-in trains nothing: a rerun may use the folder again
        p.rmdir() if p.is_dir() and not any(p.iterdir()) else None
    sweep(make_config(output_dir=str(tmp_path), run__plots=False, run__overwrite=True), axes=["dpgd.k_adv=1,3"])
    assert not (tmp_path / "sweep.png").exists()


def test_a_sweep_that_stops_midway_leaves_no_earlier_table_as_its_own(tmp_path, monkeypatch, caplog):
    """An earlier sweep's sweep.{json,txt,png} are removed when a new one starts training: one that stops at its
    second point left them beside its new runs, as if they were its numbers. A finished sweep writes them again."""
    import logging
    for suffix in (".json", ".txt", ".png"):
        (tmp_path / f"sweep{suffix}").write_text("the earlier sweep's")
    (tmp_path / "notes.txt").write_text("not the sweep's")
    calls = []

    def train(cfg):
        calls.append(cfg)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return SimpleNamespace(output_dir=cfg.run.output_dir, metrics={"Avg": 1.0, "Last": 1.0})
    monkeypatch.setattr("segpcl_fast.api.train", train)
    with caplog.at_level(logging.INFO, logger="segpcl_fast.report"), pytest.raises(KeyboardInterrupt):
        sweep(make_config(output_dir=str(tmp_path)), axes=["dpgd.k_adv=1,3"], seeds=[0])
    assert not any((tmp_path / f"sweep{s}").exists() for s in (".json", ".txt", ".png"))
    assert (tmp_path / "notes.txt").read_text() == "not the sweep's"
    assert "removed the earlier sweep.json, sweep.txt, sweep.png" in caplog.text
    with pytest.raises(ConfigError, match="k_adv=oops"):  # a sweep refused before it trains removes nothing
        (tmp_path / "sweep.txt").write_text("kept")
        sweep(make_config(output_dir=str(tmp_path)), axes=["dpgd.k_adv=1,oops"], seeds=[0])
    assert (tmp_path / "sweep.txt").read_text() == "kept"
    # a --resume keeps the tables until it writes them again: its runs' checkpoints may still refuse its config
    # (a key left out), and the tables of a finished sweep went with nothing retrained
    calls.clear()

    def refused(cfg):
        raise ConfigError("checkpoint ... was made with a different config: data.num_tasks was 2, now 10")
    monkeypatch.setattr("segpcl_fast.api.train", refused)
    with pytest.raises(ConfigError, match="different config"):
        sweep(make_config(output_dir=str(tmp_path), run__resume=True), axes=["dpgd.k_adv=1,3"], seeds=[0])
    assert (tmp_path / "sweep.txt").read_text() == "kept"


# ----------------------------------------------------------------------------- mutation audit (analysis, 2026-12-07)

@pytest.mark.parametrize("key", ["run.progress", "run.plots", "run.tensorboard", "run.checkpoint", "run.overwrite",
                                 "run.resume"])
def test_every_key_that_changes_only_what_a_run_shows_or_keeps_is_no_axis(key):
    """Each of the six run keys that change neither what a run trains nor how fast (the progress bar, plots,
    TensorBoard, checkpoints, overwrite, resume) is refused with two values: its points would be one run."""
    with pytest.raises(ConfigError, match=f"sweep key '{key}' has values \\[True, False\\], but it changes only"):
        parse_axes([f"{key}=true,false", "dpgd.k_adv=5,10"])
    assert parse_axes([f"{key}=true"])[key] == [True]


def test_points_that_train_the_same_configuration_name_the_switchs_own_weight(tmp_path):
    """Sweeping a switch the method decides (acgd.enabled under segpcl) is refused with the hint that names what
    turns it off without changing the method (acgd.weight=0), not only "a key the method leaves alone"."""
    with pytest.raises(ConfigError, match=r"sweep run.method itself, or a key the method leaves alone "
                                          r"\(acgd.weight=0 turns ACGD off\)$"):
        validate_grid(make_config(), expand_grid(parse_axes(["acgd.enabled=true,false"])), [0], tmp_path)


def test_a_resumed_sweep_still_refuses_points_that_train_the_same_configuration(tmp_path):
    """run.resume differs between points under --resume (true only where a point's folder exists): it is left out
    of what a point trains, so a started point and an unstarted one that train the same thing are still refused."""
    (tmp_path / "enabled=True" / "seed0").mkdir(parents=True)
    cfg = make_config(output_dir=str(tmp_path), run__resume=True)
    with pytest.raises(ConfigError, match="sweep points enabled=True and enabled=False train the same configuration"):
        validate_grid(cfg, expand_grid(parse_axes(["tsgr.enabled=true,false"])), [0], tmp_path)


def test_a_key_given_both_fixed_and_as_one_value_is_recorded_as_trained(stand_in_train, tmp_path):
    """A key given with --fixed and again as a one-value --set: sweep.json's "fixed" and the table's title name the
    value the runs trained with (the --set one), not the other."""
    out = sweep(make_config(output_dir=str(tmp_path)), axes=["dpgd.k_adv=1,3", "optim.lr=0.05"],
                fixed=["optim.lr=0.02"], seeds=[0])
    trained = {c.optim.lr for c in stand_in_train}
    assert trained == {0.05}
    assert json.loads(Path(out["paths"]["json"]).read_text())["fixed"] == {"optim.lr": 0.05}
    assert "fixed: optim.lr=0.05)" in out["table"]


def test_keys_the_sweep_sets_itself_are_refused_before_training(stand_in_train, tmp_path):
    """run.seed comes from seeds=: a run__seed keyword would be overridden by every point, and a seed given twice
    would train one run folder twice; both are refused before anything trains."""
    with pytest.raises(ConfigError, match=r"sweep\(\) does not take run.seed \(it runs every seeds entry"):
        sweep(output_dir=str(tmp_path), axes=["dpgd.k_adv=1,3"], seeds=[0], run__seed=1)
    with pytest.raises(ConfigError, match="seed 1 is given twice"):
        sweep(make_config(output_dir=str(tmp_path)), axes=["dpgd.k_adv=1,3"], seeds=[1, 0, 1])
    assert stand_in_train == []
