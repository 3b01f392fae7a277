"""Findings of a fresh-eyes user review of the analysis tools (ablate, sweep, retention, distill-sources,
fragility, anchor-views): each test fails before its fix."""
import importlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from segpcl_fast.api import make_config
from segpcl_fast.config import ConfigError

ds_mod = importlib.import_module("segpcl_fast.analysis.distill_sources")


@pytest.fixture
def no_distill_runs(monkeypatch):
    """distill_sources with its runs replaced by stand-ins: what each would train is recorded."""
    calls = []

    def fake_trainer_for_source(cfg, method, source, folder, out):
        calls.append(source)
        result = SimpleNamespace(output_dir=str(out), metrics={"Avg": 50.0, "Last": 40.0})
        return SimpleNamespace(run=lambda: result)
    monkeypatch.setattr(ds_mod, "_trainer_for_source", fake_trainer_for_source)
    return calls


@pytest.mark.parametrize("source", ["seeds", "new_data", "folder"])
def test_distill_sources_refuses_an_acgd_source_it_would_replace(no_distill_runs, tmp_path, source):
    """--set acgd.source=seeds --sources anchors trained on anchors without a word (each run's source is the
    analysis' to set, from --sources): refused with the fix, before anything runs."""
    cfg = make_config(output_dir=str(tmp_path / "o"), acgd__source=source)
    with pytest.raises(ConfigError, match=f"acgd.source={source} would be replaced.*--sources {source}"):
        ds_mod.distill_sources(cfg, sources=["anchors"])
    assert no_distill_runs == [] and not (tmp_path / "o").exists()


def test_distill_sources_refuses_a_source_folder_no_source_uses(no_distill_runs, tmp_path):
    """acgd.source_folder with 'folder' left out of the sources is refused as --folder is (it was recorded in
    every run's config.yaml, unused)."""
    (tmp_path / "ref").mkdir()
    cfg = make_config(output_dir=str(tmp_path / "o"), acgd__source_folder=str(tmp_path / "ref"))
    with pytest.raises(ConfigError, match="acgd.source_folder .* is only used by the source 'folder'"):
        ds_mod.distill_sources(cfg, sources=["anchors", "seeds"])
    assert no_distill_runs == []
    out = ds_mod.distill_sources(make_config(output_dir=str(tmp_path / "o2"), acgd__source="anchors"),
                                 sources=["anchors"])  # the default source, given: nothing replaced
    assert no_distill_runs == ["anchors"] and Path(out["paths"]["json"]).is_file()


def test_ablation_plot_labels_a_reused_variant_as_its_table_row(tmp_path, monkeypatch):
    """segpcl (= +visual_branch) is drawn exactly over +visual_branch's line: the legend said 'segpcl' beside a
    line that does not show, where the table says whose runs it reuses."""
    import segpcl_fast
    from segpcl_fast.report import plots

    def train(cfg):
        acc = [50.0 + cfg.run.seed, 40.0]
        return SimpleNamespace(output_dir=cfg.run.output_dir, acc_per_task=acc,
                               metrics={"Avg": sum(acc) / 2, "Last": acc[-1]})
    drawn = {}
    monkeypatch.setattr(segpcl_fast.api, "train", train)
    monkeypatch.setattr(plots, "plot_acc_curves", lambda curves, path, **kw: drawn.update(curves=curves, **kw) or path)
    out = segpcl_fast.ablate(variants=["+visual_branch", "segpcl"], seeds=[0, 1],
                             run__output_dir=str(tmp_path / "abl"), data__num_tasks=2)
    labels = [r["method"] for r in out["rows"]]
    assert labels == ["+visual_branch", "segpcl (= +visual_branch)"]
    assert list(drawn["curves"]) == labels and list(drawn["errors"]) == labels
    assert list(drawn["curves"][labels[1]]) == [50.5, 40.0]


def test_the_analysis_functions_take_one_name_or_one_seed_as_one_entry(tmp_path, monkeypatch):
    """variants="segpcl", sources="anchors", datasets="synthetic-sketch", axes="optim.lr=...", fixed="k=v" were
    taken apart into characters ("unknown method variant 's'"); seeds=0 was "needs at least one seed" or a
    TypeError, tasks=2 a TypeError. One string or number is now one entry; a seed that is no whole number is
    one ConfigError."""
    import segpcl_fast
    from segpcl_fast.analysis import fragility, retention, sweep
    sweep_mod = importlib.import_module("segpcl_fast.analysis.sweep")
    ret_mod = importlib.import_module("segpcl_fast.analysis.retention")
    frag_mod = importlib.import_module("segpcl_fast.analysis.fragility")

    class Planned(Exception):
        pass

    def planned(out, name, configs, resume):  # every check passed: what would train, then stop
        raise Planned(sorted((c.run.method, c.run.seed, c.optim.lr, c.optim.momentum) for c in configs))
    for module in (segpcl_fast.api, sweep_mod, ret_mod, ds_mod, frag_mod):
        monkeypatch.setattr(module, "start_table_files", planned)
    kw = dict(run__output_dir=str(tmp_path / "o"), data__num_tasks=2)
    with pytest.raises(Planned, match=r"\[\('segpcl', 0, "):
        segpcl_fast.ablate(variants="segpcl", seeds=0, **kw)
    with pytest.raises(Planned, match=r"\('segpcl', 3, 0.001, 0.5\), \('segpcl', 3, 0.01, 0.5\)\]"):
        sweep(axes="optim.lr=1e-3,1e-2", fixed="optim.momentum=0.5", seeds=3, **kw)
    with pytest.raises(Planned, match=r"\[\('lora_finetune', 0, "):
        retention(variants="lora_finetune", datasets="synthetic-sketch", **kw)
    with pytest.raises(Planned, match=r"\[\('segpcl', 0, "):
        ds_mod.distill_sources(sources="anchors", seeds=0, **kw)
    with pytest.raises(Planned, match=r"\[\('lora_finetune', 0, "):
        fragility(tasks=2, **kw)
    for bad in ("0,1", [0.5], [True]):
        with pytest.raises(ConfigError, match=r"takes seeds as whole numbers, e.g. seeds=\[0, 1, 2\]"):
            segpcl_fast.ablate(variants=["segpcl"], seeds=bad, **kw)
    assert not (tmp_path / "o").exists()


def test_an_analysis_whose_run_folder_holds_another_analysis_runs_names_its_own_fix(tmp_path, monkeypatch):
    """retention -o <an ablation's folder>: its run <out>/lora_finetune holds ablate's seed<N>/ runs. It was refused
    only when that run started (after the model loaded and the before-figures were measured), with train's fix
    (-o <out>/lora_finetune-train, a folder for one run, not for the analysis)."""
    from segpcl_fast.analysis import retention
    ret_mod = importlib.import_module("segpcl_fast.analysis.retention")
    monkeypatch.setattr(ret_mod, "make_trainer", lambda cfg: pytest.fail("loaded a model"))
    out = tmp_path / "paper"
    (out / "lora_finetune" / "seed0").mkdir(parents=True)
    (out / "lora_finetune" / "seed0" / "config.yaml").write_text("run: {}\n")
    (out / "ablation.txt").write_text("the ablation's table\n")
    with pytest.raises(ConfigError, match=rf"retention: its run folder {out / 'lora_finetune'} holds another "
                                          rf"analysis' runs .*seed0\): give retention a folder of its own "
                                          rf"\(-o {out}-retention\)"):
        retention(variants=["lora_finetune"], run__output_dir=str(out), data__num_tasks=2)
    assert (out / "ablation.txt").is_file()


@pytest.mark.parametrize("name", ["fragility", "anchor_views"])
def test_fragility_and_anchor_views_refuse_a_run_method_keyword_that_method_replaces(tmp_path, monkeypatch, name):
    """fragility(run__method="segpcl") trained lora_finetune (method= default) without a word, as
    anchor_views(run__method=...) trained segpcl; the CLI refuses --set run.method for both."""
    import segpcl_fast.analysis as analysis
    module = importlib.import_module(f"segpcl_fast.analysis.{name}")
    monkeypatch.setattr(module, "make_trainer", lambda cfg: pytest.fail(f"trained {cfg.run.method}"))
    with pytest.raises(ConfigError, match=r"does not take run.method \(it trains method= \('.*' here\): pass method="):
        getattr(analysis, name)(run__method="+acgd", run__output_dir=str(tmp_path / "o"), data__num_tasks=2)

    class Planned(Exception):
        pass

    def planned(out, table, configs, resume):
        raise Planned([c.run.method for c in configs])
    monkeypatch.setattr(module, "start_table_files", planned)
    with pytest.raises(Planned, match=r"\['\+acgd'\]"):  # method=None keeps the config's run.method
        getattr(analysis, name)(method=None, run__method="+acgd", run__output_dir=str(tmp_path / "o"),
                                data__num_tasks=2)


def test_the_anchor_views_table_names_the_method_it_trained():
    """anchor_views.txt said only the projection ('pca in the PNG'): two views of lora_finetune and segpcl printed
    the same title. It names the method and the task it trained up to, as the PNG's title does."""
    from segpcl_fast.analysis.anchor_views import format_views_table
    rows = [{"group": "seeds", "n": 4, "cos_to_target_prototype": 0.5}]
    title = format_views_table(rows, 3, "pca", "lora_finetune").splitlines()[0]
    assert title == "anchor views before task 3 (lora_finetune after task 2; teacher raw features r_T, pca in the PNG)"


@pytest.mark.parametrize("command", [["ablate"], ["retention"], ["distill-sources"], ["sweep", "--set", "optim.lr=1,2"]])
def test_an_analysis_interrupted_before_its_folder_exists_says_to_run_it_again(monkeypatch, capsys, tmp_path, command):
    """Ctrl-C while the first model loads said 'continue ... with the same command and --resume', which is then
    refused ('run.resume is set but <dir> does not exist'): nothing was written, the same command starts again."""
    import segpcl_fast.analysis
    import segpcl_fast.api
    from segpcl_fast.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(segpcl_fast.api, "ablate", interrupted)
    for name in ("retention", "sweep", "distill_sources"):
        monkeypatch.setattr(segpcl_fast.analysis, name, interrupted)
    out = tmp_path / "analysis"
    assert main(command + ["-o", str(out)]) == 130
    assert capsys.readouterr().err == (f"segpcl-fast: interrupted: nothing was written yet ({out} does not exist): "
                                       "the same command starts it again\n")
    out.mkdir()  # it had started: its runs continue with --resume
    assert main(command + ["-o", str(out)]) == 130
    assert "the same command and --resume" in capsys.readouterr().err


def test_a_resumed_ablation_continues_an_equal_variants_runs_instead_of_training_them_again(tmp_path, monkeypatch):
    """ablate --variants segpcl, then ablate --resume --variants +visual_branch,segpcl: +visual_branch (the first
    of the two equal configs) trained all over again in plus_visual_branch/, and segpcl/'s runs went unused."""
    import segpcl_fast
    trained = []

    def train(cfg):
        trained.append(Path(cfg.run.output_dir).relative_to(tmp_path / "abl").as_posix())
        return SimpleNamespace(output_dir=cfg.run.output_dir, acc_per_task=[50.0, 40.0],
                               metrics={"Avg": 45.0, "Last": 40.0})
    monkeypatch.setattr(segpcl_fast.api, "train", train)
    kw = dict(run__output_dir=str(tmp_path / "abl"), data__num_tasks=2, run__plots=False)
    segpcl_fast.ablate(variants=["segpcl"], seeds=[0, 1], **kw)
    assert trained == ["segpcl/seed0", "segpcl/seed1"]
    for seed in (0, 1):
        (tmp_path / "abl" / "segpcl" / f"seed{seed}").mkdir(parents=True)  # what those runs wrote
    trained.clear()
    out = segpcl_fast.ablate(variants=["+visual_branch", "segpcl", "lora_finetune"], seeds=[0, 1], run__resume=True,
                             **kw)
    assert trained == ["segpcl/seed0", "segpcl/seed1", "lora_finetune/seed0", "lora_finetune/seed1"]
    assert [r["method"] for r in out["rows"]] == ["+visual_branch (= segpcl)", "segpcl", "lora_finetune"]
    assert list(out["runs"]) == ["+visual_branch", "segpcl", "lora_finetune"]
    assert out["runs"]["+visual_branch"] is out["runs"]["segpcl"]


@pytest.mark.parametrize("command", [["ablate"], ["retention"], ["distill-sources"], ["sweep", "--set", "optim.lr=1,2"],
                                     ["fragility"], ["anchor-views"]])
def test_an_analysis_into_a_folder_of_another_analysis_seed_runs_is_refused_before_it_writes(capsys, tmp_path,
                                                                                            command, monkeypatch):
    """ablate -o <a sweep's point folder> (it holds that point's seed0/, seed1/ runs) was taken: the ablation's
    <variant>/seed<N>/ runs and its table files went in among the sweep's runs. Refused, naming a folder beside the
    sweep's, before anything is written; a folder whose seed<N>/ is not a run is not refused for it."""
    from segpcl_fast.cli import main
    from segpcl_fast.engine.trainer import Trainer

    def started(*args, **kwargs):  # the refusal comes before any run (without it: fail now, not after training)
        raise AssertionError(f"{command[0]} started a run in a folder of another analysis' runs")
    monkeypatch.setattr(Trainer, "__init__", started)
    point = tmp_path / "sweep" / "k_adv=5"
    for seed in ("seed0", "seed1"):
        (point / seed).mkdir(parents=True)
        (point / seed / "config.yaml").write_text("run: {}\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(command + ["-o", str(point)]) == 2
    err = capsys.readouterr().err
    assert (f"{point} holds the runs of one variant or point of another analysis (seed0, seed1): "
            f"{command[0]} would write its runs and files among them; give it its own folder "
            f"(-o {tmp_path / 'sweep'}-{command[0]})") in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    from segpcl_fast.config import analysis_config, seed_runs
    (tmp_path / "other" / "seed0").mkdir(parents=True)  # no config.yaml: not a run
    (tmp_path / "other" / "seeds" / "config.yaml").parent.mkdir()
    (tmp_path / "other" / "seeds" / "config.yaml").write_text("run: {}\n")  # not seed<N>
    assert seed_runs(tmp_path / "other") == [] and seed_runs(point) == ["seed0", "seed1"]
    analysis_config(make_config(output_dir=str(tmp_path / "other")), "ablate")
