"""Tests added by a mutation audit of segpcl_fast/analysis/distill_sources.py: what distill_sources
hands each run (source, folder, seed, output folder) and what it makes of the runs' metrics (rows,
table, JSON, the bar plot of Last), with the runs replaced by stand-ins; the offline reference
folder's images; and the per-source trainer (ACGD must be on, acgd.source_folder only for 'folder')."""
import importlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from segpcl_fast.api import make_config
from segpcl_fast.config import ConfigError
from segpcl_fast.data.base import DatasetFormatError

ds_mod = importlib.import_module("segpcl_fast.analysis.distill_sources")  # the package exports a function of that name

# Last per (source, seed); the other metrics follow from it
LAST = {("anchors", 0): 60.0, ("anchors", 1): 64.0, ("new_data", 0): 50.0, ("new_data", 1): 51.0,
        ("seeds", 0): 55.0, ("seeds", 1): 55.0, ("folder", 0): 40.0, ("folder", 1): 44.0}


@pytest.fixture
def stand_in_runs(monkeypatch):
    calls = []

    def fake_trainer_for_source(cfg, method, source, folder, out):
        calls.append({"seed": cfg.run.seed, "method": method, "source": source, "folder": folder, "out": Path(out)})
        last = LAST[(source, cfg.run.seed)]
        result = SimpleNamespace(output_dir=str(out), metrics={"Avg": last + 10, "Last": last, "Forgetting": 1.0,
                                                               "BWT": None})
        return SimpleNamespace(run=lambda: result)
    monkeypatch.setattr(ds_mod, "_trainer_for_source", fake_trainer_for_source)
    return calls


def _folder(path, n=2):
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(path / f"{i}.png")
    return str(path)


def test_every_source_and_seed_runs_with_its_own_seed_and_folder(stand_in_runs, tmp_path, monkeypatch):
    bars = {}
    monkeypatch.setattr("segpcl_fast.report.plots.plot_bars", lambda values, path, **kw: bars.update(values) or path)
    ref = _folder(tmp_path / "ref")
    out = ds_mod.distill_sources(make_config(output_dir=str(tmp_path / "o")), folder=ref, seeds=[0, 1])
    assert [(c["source"], c["seed"]) for c in stand_in_runs] == [(s, k) for s in ds_mod.SOURCES for k in (0, 1)]
    assert all(c["folder"] == ref and c["method"] == "segpcl" for c in stand_in_runs)
    assert [c["out"] for c in stand_in_runs] == [tmp_path / "o" / s / f"seed{k}" for s in ds_mod.SOURCES
                                                 for k in (0, 1)]
    rows = {r["source"]: r for r in out["rows"]}
    assert rows["anchors"]["seeds"] == 2 and rows["anchors"]["Last"] == 62.0
    assert rows["anchors"]["Last_std"] == pytest.approx(np.std([60.0, 64.0], ddof=1))
    assert rows["seeds"]["Last_std"] == 0.0 and rows["folder"]["Avg"] == 52.0
    assert rows["anchors"]["BWT"] is None
    assert out["runs"]["new_data"] == [str(tmp_path / "o/new_data/seed0"), str(tmp_path / "o/new_data/seed1")]
    # two seeds that agree show their std of 0 (the row is not a single run)
    assert "62.00 +- 2.83" in out["table"] and "55.00 +- 0.00" in out["table"]
    assert bars == {"anchors": 62.0, "new_data": 50.5, "seeds": 55.0, "folder": 42.0}
    saved = json.loads(Path(out["paths"]["json"]).read_text())
    assert saved["folder"] == ref and saved["seeds"] == [0, 1] and len(saved["rows"]) == 4


def test_the_configs_source_folder_is_the_default_folder(stand_in_runs, tmp_path):
    ref = _folder(tmp_path / "ref")
    ds_mod.distill_sources(make_config(output_dir=str(tmp_path / "o"), acgd__source_folder=ref),
                           sources=["folder"])
    assert [c["folder"] for c in stand_in_runs] == [ref]


def test_a_missing_folder_fails_before_any_run(stand_in_runs, tmp_path):
    with pytest.raises(DatasetFormatError, match="does not exist"):
        ds_mod.distill_sources(make_config(output_dir=str(tmp_path / "o")), sources=["anchors", "folder"],
                               folder=str(tmp_path / "nope"))
    assert stand_in_runs == []


def test_offline_folder_uses_the_synthetic_seed(stand_in_runs, tmp_path, monkeypatch):
    written = []

    def fake_write(folder, seed=0, per_class=5):
        written.append((Path(folder), seed))
        return Path(_folder(Path(folder), 1))
    monkeypatch.setattr(ds_mod, "write_synthetic_reference_folder", fake_write)
    ds_mod.distill_sources(make_config(output_dir=str(tmp_path / "o"), data__synthetic_seed=7), sources=["folder"])
    assert written == [(tmp_path / "o" / "reference_images", 7)]
    assert stand_in_runs[0]["folder"] == str(tmp_path / "o" / "reference_images")


def test_a_real_dataset_without_a_folder_gets_no_synthetic_folder(stand_in_runs, tmp_path):
    cfg = make_config(output_dir=str(tmp_path / "o"), data__dataset="cifar100", data__root=str(tmp_path))
    with pytest.raises(DatasetFormatError, match="source_folder is not set"):
        ds_mod.distill_sources(cfg, sources=["folder"])
    assert not (tmp_path / "o" / "reference_images").exists()


def test_reference_folder_holds_the_reference_source_images_in_order(tmp_path):
    from segpcl_fast.data.synthetic import build_reference_dataset
    folder = ds_mod.write_synthetic_reference_folder(tmp_path / "ref", seed=3, per_class=1)
    files = sorted(folder.glob("*.png"))
    ref = build_reference_dataset(3, 1, None)
    assert len(files) == len(ref) == 100 and files[0].name == "00000.png"
    for i in (0, 57, 99):
        assert np.array_equal(np.asarray(Image.open(files[i])), ref.images[i])


def test_reference_folder_of_another_world_is_written_anew(tmp_path):
    """A rerun into the same output dir with another data.synthetic_seed reused the first world's images (the
    PNGs were only ever added); one of the same world completes what an interrupted write left."""
    from segpcl_fast.data.synthetic import build_reference_dataset
    folder = ds_mod.write_synthetic_reference_folder(tmp_path / "ref", seed=0, per_class=1)
    ds_mod.write_synthetic_reference_folder(folder, seed=1, per_class=1)
    seed1 = build_reference_dataset(1, 1, None)
    files = sorted(folder.glob("*.png"))
    assert len(files) == 100 and all(np.array_equal(np.asarray(Image.open(files[i])), seed1.images[i]) for i in (0, 99))
    files[5].unlink()  # cut short: the same world's folder is completed, the others kept as they are
    kept = files[6].stat().st_mtime_ns
    ds_mod.write_synthetic_reference_folder(folder, seed=1, per_class=1)
    assert files[5].is_file() and files[6].stat().st_mtime_ns == kept
    assert np.array_equal(np.asarray(Image.open(files[5])), seed1.images[5])


def test_per_source_trainer(small_config, tmp_path):
    ref = _folder(tmp_path / "ref")
    trainer = ds_mod._trainer_for_source(small_config("a"), "segpcl", "anchors", ref, tmp_path / "a")
    assert trainer.cfg.acgd.source == "anchors" and trainer.cfg.acgd.source_folder is None
    assert trainer.learner.cfg.acgd.source == "anchors" and trainer.cfg.run.output_dir == str(tmp_path / "a")
    trainer = ds_mod._trainer_for_source(small_config("f"), "segpcl", "folder", ref, tmp_path / "f")
    assert trainer.learner.cfg.acgd.source_folder == ref
    for method, kw in (("lora_finetune", {}), ("segpcl", {"acgd__weight": 0.0})):
        with pytest.raises(ConfigError, match="does not use ACGD"):
            ds_mod._check_uses_acgd(small_config("n", **kw), method)
        with pytest.raises(ConfigError, match="does not use ACGD"):  # before the reference folder is written
            ds_mod.distill_sources(small_config("n", **kw), method=method)
        assert not (tmp_path / "n").exists()
    ds_mod._check_uses_acgd(small_config("n"), "segpcl")


def test_offline_reference_folder_is_not_retentions_held_out_set(tmp_path):
    """The reference images were the first rounds of retention's synthetic-source set: a folder-source
    run's retention was scored on its own distillation data."""
    import numpy as np
    from PIL import Image

    from segpcl_fast.data.synthetic import build_heldout_dataset
    folder = ds_mod.write_synthetic_reference_folder(tmp_path / "ref", seed=0, per_class=2)
    reference = {np.asarray(Image.open(p)).tobytes() for p in sorted(folder.glob("*.png"))}
    assert len(reference) == 200
    held_out = build_heldout_dataset(0, 20, None, domain="source")
    assert not reference & {held_out.images[i].tobytes() for i in range(len(held_out))}


def test_one_task_is_refused_before_any_run(stand_in_runs, tmp_path):
    """ACGD acts from task 2 on: with one task every source trained the same run (four identical rows)."""
    with pytest.raises(ConfigError, match=r"distill-sources needs at least 2 tasks \(data.num_tasks >= 2, got 1\): "
                                          r"ACGD distils from task 2 on"):
        ds_mod.distill_sources(make_config(output_dir=str(tmp_path), num_tasks=1), seeds=[0])
    assert stand_in_runs == []


@pytest.mark.parametrize("method", ["distill_seeds", "distill_new_data"])
def test_a_method_that_sets_its_own_source_is_refused_before_any_run(stand_in_runs, tmp_path, method):
    """distill_seeds / distill_new_data pin acgd.source: a run saved with that method and another source does not
    load back (evaluate, predict, --resume: the method sets its source again and the checkpoints disagree)."""
    with pytest.raises(ConfigError, match=f"method '{method}' sets acgd.source=.* itself, and distill-sources varies "
                                          "acgd.source: use method=segpcl"):
        ds_mod.distill_sources(make_config(output_dir=str(tmp_path)), method=method, sources=["anchors", "new_data"])
    with pytest.raises(ConfigError, match=r"distill_sources\(\) needs at least one seed"):
        ds_mod.distill_sources(make_config(output_dir=str(tmp_path)), seeds=[])
    assert stand_in_runs == []


# ----------------------------------------------------------------------------- mutation audit (analysis, 2026-12-07)

def test_a_reference_folder_with_a_damaged_marker_is_written_anew(tmp_path):
    """A marker that is not JSON (a write cut short, an edit) says nothing about the folder's world: its PNGs are
    replaced with this world's, as for another world's folder, rather than the write failing."""
    from segpcl_fast.data.synthetic import build_reference_dataset
    folder = tmp_path / "ref"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "00000.png")  # not this world's first image
    (folder / ds_mod.REFERENCE_MARKER).write_text("{not json")
    ds_mod.write_synthetic_reference_folder(folder, seed=2, per_class=1)
    files = sorted(folder.glob("*.png"))
    assert len(files) == 100
    assert np.array_equal(np.asarray(Image.open(files[0])), build_reference_dataset(2, 1, None).images[0])
    assert json.loads((folder / ds_mod.REFERENCE_MARKER).read_text()) == {"synthetic_seed": 2, "per_class": 1}


@pytest.mark.parametrize("resume", [True, False])
def test_a_resumed_distill_sources_keeps_its_tables_until_it_writes_them_again(resume, tables_kept_only_on_resume):
    """A --resume keeps the earlier distill_sources.{json,txt,png} until it writes them again (its runs'
    checkpoints may still refuse its config, as here); a new distill-sources removes them before it trains."""
    tables_kept_only_on_resume(ds_mod, "distill_sources", lambda cfg: ds_mod.distill_sources(cfg, sources=["anchors"]),
                               resume)


def test_one_seeds_bar_plot_has_no_error_bars_and_names_the_seed(stand_in_runs, tmp_path, monkeypatch):
    """With one seed there is no spread to show: the bars of Last carry no (zero-length) error bars, and the title
    names the seed the runs used; with two seeds each bar's error bar is the sample std over them."""
    from matplotlib.container import BarContainer
    figs = []
    monkeypatch.setattr("segpcl_fast.report.plots.save_figure", lambda fig, path: figs.append(fig) or Path(path))
    ds_mod.distill_sources(make_config(output_dir=str(tmp_path / "one")), sources=["anchors", "seeds"], seeds=[1])
    ax = figs[-1].axes[0]
    bars, = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [bar.get_height() for bar in bars] == [64.0, 55.0]
    assert bars.errorbar is None
    assert ax.get_title() == "ACGD source (segpcl, synthetic, seed 1)"
    ds_mod.distill_sources(make_config(output_dir=str(tmp_path / "two")), sources=["anchors", "seeds"], seeds=[0, 1])
    ax = figs[-1].axes[0]
    bars, = [c for c in ax.containers if isinstance(c, BarContainer)]
    segments = bars.errorbar.lines[2][0].get_segments()  # (data line, caps, bar lines)
    assert [float(s[1][1] - s[0][1]) / 2 for s in segments] == pytest.approx([np.std([60.0, 64.0], ddof=1), 0.0])
    assert ax.get_title() == "ACGD source (segpcl, synthetic, mean +- sample std over 2 seeds)"


def test_a_relative_folder_is_stored_absolute_in_the_runs_config(small_config, tmp_path, monkeypatch):
    """The per-source trainer makes acgd.source_folder absolute (and expands ~), as the trainer's other paths: the
    run's config.yaml is read from anywhere (evaluate, --resume from another directory)."""
    _folder(tmp_path / "ref")
    monkeypatch.chdir(tmp_path)
    trainer = ds_mod._trainer_for_source(small_config("f"), "segpcl", "folder", "ref", tmp_path / "f")
    assert trainer.cfg.acgd.source_folder == str(tmp_path / "ref")
    monkeypatch.setenv("HOME", str(tmp_path))
    trainer = ds_mod._trainer_for_source(small_config("g"), "segpcl", "folder", "~/ref", tmp_path / "g")
    assert trainer.cfg.acgd.source_folder == str(tmp_path / "ref")


def test_a_seed_given_twice_or_an_unused_folder_is_refused_before_any_run(stand_in_runs, tmp_path):
    """A seed given twice would train one run folder twice; a --folder with the source 'folder' left out would be
    recorded in distill_sources.json while no run used it. Both are refused before anything runs."""
    with pytest.raises(ConfigError, match="seed 0 is given twice"):
        ds_mod.distill_sources(make_config(output_dir=str(tmp_path)), sources=["anchors"], seeds=[0, 1, 0])
    ref = _folder(tmp_path / "ref")
    with pytest.raises(ConfigError, match=r"a reference folder \(.*ref\) is only used by the source 'folder', which "
                                          r"anchors, seeds leaves out"):
        ds_mod.distill_sources(make_config(output_dir=str(tmp_path)), sources=["anchors", "seeds"], folder=ref)
    assert stand_in_runs == []
