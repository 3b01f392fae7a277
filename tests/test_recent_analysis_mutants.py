"""Tests added by a mutation audit of the analysis code changed in sessions 61-62 (git diff 5a6a47a~1 f17d9c6 --
segpcl_fast): api.entries / seed_entries / ablate's reuse of an equal variant's runs on --resume /
start_table_files' refusal, sweep.continue_earlier_runs, retention's datasets, distill-sources' and the other
analyses' refusals, config.seed_runs, cli._note_analysis_dir, trainer.as_trained, compiling's backend check,
clip's local-dir: check, vit_tail.qualifies.

Tally: 79 single-point mutants; 56 killed by the suite as it was; 10 equivalent (sweep: found != own, which
recorded(own) != wanted implies; setdefault vs the last of two folders of the same config; a None fingerprint, never
looked up; start_table_files without its config.yaml guard (no layout the package writes has runs below a run);
entries(): bytes, and [] for None (every caller treats both alike); seed_entries' int() of an int; seed_runs' '-'
(a negative seed is refused, so no seed-1/ exists); cli: except ValueError (ConfigError is one), the interrupt line
without 'not args.resume' (--resume into a missing folder is refused before anything loads)); 13 killed by the tests
added: 11 here, sweep's as_trained fingerprint in tests/analysis/test_analysis_sweep_grid.py, anchor_views' table
title in tests/analysis/test_analysis_mutants_anchor_views.py; none left.
"""
import importlib
from pathlib import Path
from types import SimpleNamespace

import pytest

import segpcl_fast
from segpcl_fast.analysis import retention, sweep
from segpcl_fast.api import make_config
from segpcl_fast.config import ConfigError, save_config
from segpcl_fast.engine.trainer import as_trained

@pytest.fixture
def trained(monkeypatch):
    """api.train replaced: each run writes the config.yaml the Trainer writes (and nothing else); returns the list
    of (the folder it trained in, run.resume) in order."""
    started = []

    def train(cfg):
        run = Path(cfg.run.output_dir)
        started.append((run, cfg.run.resume))
        run.mkdir(parents=True, exist_ok=True)
        save_config(as_trained(cfg), run / "config.yaml")
        acc = [50.0, 40.0 + cfg.prototypes.beta]
        return SimpleNamespace(output_dir=str(run), acc_per_task=acc, metrics={"Avg": sum(acc) / 2, "Last": acc[-1]})
    monkeypatch.setattr(segpcl_fast.api, "train", train)
    return started


def _where(started, out):
    return [(run.relative_to(out).as_posix(), resume) for run, resume in started]


# ----------------------------------------------------------------------------- ablate --resume: equal variants

def test_a_resumed_ablation_continues_an_equal_plus_variants_runs_for_its_missing_seeds_too(tmp_path, trained):
    """ablate --variants +visual_branch --seeds 0, then --resume --variants segpcl,+visual_branch --seeds 0,1: segpcl
    (first of the equal pair) continues plus_visual_branch/seed0 and trains seed1 beside it, not all anew in
    segpcl/ (a '+' variant's folder is plus_<name>; one started seed is enough)."""
    out, kw = tmp_path / "abl", dict(run__output_dir=str(tmp_path / "abl"), data__num_tasks=2, run__plots=False)
    segpcl_fast.ablate(variants=["+visual_branch"], seeds=[0], **kw)
    trained.clear()
    got = segpcl_fast.ablate(variants=["segpcl", "+visual_branch"], seeds=[0, 1], run__resume=True, **kw)
    assert _where(trained, out) == [("plus_visual_branch/seed0", True), ("plus_visual_branch/seed1", False)]
    assert [r["method"] for r in got["rows"]] == ["segpcl (= +visual_branch)", "+visual_branch"]
    assert not (out / "segpcl").exists()


def test_a_resumed_ablation_whose_equal_variants_both_started_continues_the_first(tmp_path, trained):
    """Both of an equal pair have runs (each ablated alone into the folder): --resume continues the first listed,
    as a new ablation trains the first."""
    out, kw = tmp_path / "abl", dict(run__output_dir=str(tmp_path / "abl"), data__num_tasks=2, run__plots=False)
    segpcl_fast.ablate(variants=["+visual_branch"], seeds=[0], **kw)
    segpcl_fast.ablate(variants=["segpcl"], seeds=[0], **kw)
    trained.clear()
    got = segpcl_fast.ablate(variants=["+visual_branch", "segpcl"], seeds=[0], run__resume=True, **kw)
    assert _where(trained, out) == [("plus_visual_branch/seed0", True)]
    assert [r["method"] for r in got["rows"]] == ["+visual_branch", "segpcl (= +visual_branch)"]


def test_a_new_ablation_trains_the_first_equal_variant_afresh_beside_an_earlier_ones_runs(tmp_path, trained):
    """Without --resume nothing continues: after --variants segpcl, a new --variants +visual_branch,segpcl into the
    same folder trains +visual_branch in its own folder (taking segpcl/'s finished runs was refused as a new run
    into a folder holding a run)."""
    out, kw = tmp_path / "abl", dict(run__output_dir=str(tmp_path / "abl"), data__num_tasks=2, run__plots=False)
    segpcl_fast.ablate(variants=["segpcl"], seeds=[0], **kw)
    trained.clear()
    segpcl_fast.ablate(variants=["+visual_branch", "segpcl"], seeds=[0], **kw)
    assert _where(trained, out) == [("plus_visual_branch/seed0", False)]


# ----------------------------------------------------------------------------- seeds= forms

def test_seeds_given_as_digit_strings_are_those_seeds_and_their_duplicates_are_refused(tmp_path, trained):
    out, kw = tmp_path / "abl", dict(run__output_dir=str(tmp_path / "abl"), data__num_tasks=2, run__plots=False)
    got = segpcl_fast.ablate(variants=["segpcl"], seeds=["1", " 2 "], **kw)
    assert _where(trained, out) == [("segpcl/seed1", False), ("segpcl/seed2", False)]
    assert [r.output_dir for r in got["runs"]["segpcl"]] == [str(out / "segpcl" / "seed1"), str(out / "segpcl" / "seed2")]
    with pytest.raises(ConfigError, match="given twice"):  # both would run in seed1/
        segpcl_fast.ablate(variants=["segpcl"], seeds=[1, "1"], **dict(kw, run__output_dir=str(tmp_path / "b")))
    with pytest.raises(ConfigError, match=r"run.seed must be an integer >= 0, got -1"):  # as seeds=[-1]
        segpcl_fast.ablate(variants=["segpcl"], seeds=["-1"], **dict(kw, run__output_dir=str(tmp_path / "c")))


# ----------------------------------------------------------------------------- sweep: where a point's run trains

def _sweep(tmp_path, axes, **kw):
    return sweep(make_config(output_dir=str(tmp_path / "sw"), num_tasks=2, run__plots=False, **kw),
                             axes=axes, seeds=[0])


def test_a_new_sweep_never_continues_an_earlier_run(tmp_path, trained):
    """Only --resume continues base/'s run of a widened key's value: a new sweep trains each point afresh in its
    own folder."""
    _sweep(tmp_path, ["prototypes.beta=0.3"])
    trained.clear()
    _sweep(tmp_path, ["prototypes.beta=0.3,0.5"])
    assert _where(trained, tmp_path / "sw") == [("beta=0.3/seed0", False), ("beta=0.5/seed0", False)]


def test_a_resumed_sweeps_point_keeps_its_own_run_when_another_folder_holds_the_same_config(tmp_path, trained):
    """base/seed0 and beta=0.3/seed0 both hold beta=0.3's run (an earlier version trained it again in beta=0.3/):
    the point continues its own folder's, not the first one found."""
    _sweep(tmp_path, ["prototypes.beta=0.3"])
    _sweep(tmp_path, ["prototypes.beta=0.3,0.5"], run__overwrite=True)
    trained.clear()
    got = _sweep(tmp_path, ["prototypes.beta=0.3,0.5"], run__resume=True)
    assert _where(trained, tmp_path / "sw") == [("beta=0.3/seed0", True), ("beta=0.5/seed0", True)]
    assert got["rows"][0]["runs"] == [str(tmp_path / "sw" / "beta=0.3" / "seed0")]


def test_a_resumed_sweep_passes_over_a_config_yaml_it_cannot_read(tmp_path, trained, monkeypatch):
    """A folder of the sweep whose config.yaml this version refuses (a key it does not know) or cannot read
    (permission denied) is not a run to continue: the sweep goes on."""
    sweep_mod = importlib.import_module("segpcl_fast.analysis.sweep")
    _sweep(tmp_path, ["prototypes.beta=0.3"])
    for name in ("old", "locked"):
        (tmp_path / "sw" / name / "seed0").mkdir(parents=True)
        (tmp_path / "sw" / name / "seed0" / "config.yaml").write_text("no_such_section: {x: 1}\n")
    real = sweep_mod.load_config

    def load_config(path):
        if Path(path).parent.parent.name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)
    monkeypatch.setattr(sweep_mod, "load_config", load_config)
    trained.clear()
    _sweep(tmp_path, ["prototypes.beta=0.3,0.5"], run__resume=True)
    assert _where(trained, tmp_path / "sw") == [("base/seed0", True), ("beta=0.5/seed0", False)]


# ----------------------------------------------------------------------------- retention's datasets

def test_retention_takes_its_datasets_as_a_mapping_of_roots(tmp_path, monkeypatch):
    """datasets={"pets": <root>} (the API's form of --datasets pets=<root>): the mapping's root is used (taken as a
    list of its names it read 'pets needs a data root')."""
    ret_mod = importlib.import_module("segpcl_fast.analysis.retention")

    class Planned(Exception):
        pass
    monkeypatch.setattr(ret_mod, "start_table_files", lambda *a, **k: (_ for _ in ()).throw(Planned()))
    (tmp_path / "pets").mkdir()
    seen = []
    real = ret_mod.parse_dataset_specs
    monkeypatch.setattr(ret_mod, "parse_dataset_specs", lambda d: seen.append(real(d)) or seen[-1])
    with pytest.raises(Planned):
        retention(variants=["lora_finetune"], datasets={"pets": str(tmp_path / "pets")},
                              run__output_dir=str(tmp_path / "o"), data__num_tasks=2)
    assert seen == [{"pets": str(tmp_path / "pets")}]


# ----------------------------------------------------------------------------- the CLI's interrupt line

def test_an_analysis_interrupted_before_its_default_folder_exists_names_that_folder(monkeypatch, capsys, tmp_path):
    """Without -o an ablation writes runs/ablate (config.analysis_config), not runs/default: the interrupt line
    names the folder the analysis would have written."""
    from segpcl_fast.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(segpcl_fast.api, "ablate", interrupted)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "default").mkdir(parents=True)  # train's folder: not the ablation's
    assert main(["ablate"]) == 130
    assert capsys.readouterr().err == ("segpcl-fast: interrupted: nothing was written yet (runs/ablate does not "
                                       "exist): the same command starts it again\n")
