"""Tests added by a mutation audit of segpcl_fast/report/ and engine/accel.py: the exact text of
the tables (alignment, n/a, ints vs floats, default columns) and of the run summary; what
results.json stores (types, versions, the ops of the run, matrix_own, the file names a run
report writes); the data the plots hold (tick labels, annotations, lines, bars: read off the
matplotlib figure, not the pixels); the `segpcl-fast env` pieces (CUDA device rows, env
variables, triton / extension states, the text it prints); the optional-accelerator probes.
The environment tests fake the triton probe and the CUDA device properties (no GPU needed)."""
import datetime
import importlib.metadata
import json
import platform
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from segpcl_fast.report import (format_accuracy_matrix, format_metrics_table, format_run_summary,
                                 format_table, read_results, results_row, write_results, write_run_report)
from segpcl_fast.report import environment as envmod
from segpcl_fast.report import plots
from segpcl_fast.report import results as resmod
from segpcl_fast.report.run_report import run_label
from segpcl_fast.report.tables import format_cell

NAN = float("nan")


# ----------------------------------------------------------------------------- tables

def test_format_cell_values():
    assert format_cell(None) == "n/a" and format_cell(NAN) == "n/a" and format_cell(np.float32("inf")) == "n/a"
    assert format_cell(7) == "7" and format_cell(np.int64(-3)) == "-3"  # ints stay ints
    assert format_cell(1.5) == "1.50" and format_cell(np.float32(2.25), ".1f") == "2.2"
    assert format_cell(True) == "True" and format_cell(np.bool_(False)) == "False"  # bools are not numbers
    assert format_cell("x") == "x"


def test_format_table_exact_text():
    rows = [["segpcl", 89.8, 3, 4.5, "a"],
            ["lora", -3.14159, 12, None, "long note"]]
    text = format_table(rows, ["method", "Avg", "n", "Forgetting", "note"], title="results")
    assert text.splitlines() == [
        "results",
        "method |   Avg |  n | Forgetting | note",
        "-------+-------+----+------------+----------",
        "segpcl | 89.80 |  3 |       4.50 | a",          # text left-aligned, no trailing blanks
        "lora   | -3.14 | 12 |        n/a | long note",  # numbers (and n/a among them) right-aligned
    ]
    assert format_table(rows, ["method", "Avg", "n", "Forgetting", "note"]).splitlines()[0].startswith("method")


def test_format_table_bool_column_is_text_and_short_rows_are_refused():
    text = format_table([["a", True], ["bb", False]], ["k", "flag"])
    assert text.splitlines()[2:] == ["a  | True", "bb | False"]
    with pytest.raises(ValueError, match="header has 3"):
        format_table([[1.0, 2.0]], ["a", "b", "c"])


def test_metrics_table_default_columns_and_floatfmt():
    rows = [{"method": "a", "Forgetting_own": 2.0, "Avg": 1.0},
            {"method": "b", "Avg": 3.0, "FWT": 4.0}]  # FWT only in a later row: still a column
    lines = format_metrics_table(rows).splitlines()
    assert [c.strip() for c in lines[0].split("|")] == ["method", "Avg", "FWT", "Forgetting_own"]
    assert [c.strip() for c in lines[2].split("|")] == ["a", "1.00", "n/a", "2.00"]
    one = format_metrics_table([{"method": "a", "Avg": 89.8123}], floatfmt=".1f").splitlines()
    assert one[2] == "a      | 89.8"
    assert format_metrics_table([{"method": "a", "Avg": 1.0}], title="metrics (%)").splitlines()[0] == "metrics (%)"


def test_accuracy_matrix_exact_text():
    a = [[80.0, NAN], [85.24, 90.0]]
    assert format_accuracy_matrix(a, [80.0, 87.66]).splitlines() == [
        "after  |   T1 |   T2 | acc_t",
        "-------+------+------+------",
        "task 1 | 80.0 |  n/a |  80.0",
        "task 2 | 85.2 | 90.0 |  87.7",
    ]
    assert format_accuracy_matrix(a, floatfmt=".0f").splitlines()[3] == "task 2 | 85 |  90"


# ----------------------------------------------------------------------------- results.json

def test_to_jsonable_types():
    out = resmod.to_jsonable({1: np.float32(1.5), "b": (np.int64(2), np.bool_(True)),
                              "c": np.array([[1.0, np.nan]]), "d": Path("/x/y"), "e": torch.tensor(2.5),
                              "f": torch.tensor(3), "g": float("-inf"), "h": None, "i": True})
    assert out == {"1": 1.5, "b": [2, True], "c": [[1.0, None]], "d": "/x/y", "e": 2.5, "f": 3, "g": None,
                   "h": None, "i": True}
    assert type(out["b"][0]) is int and out["b"][1] is True and out["i"] is True and type(out["f"]) is int


def test_build_results_header_versions_and_explicit_ops(tmp_path):
    from segpcl_fast.ops import dispatch
    dispatch.record_choice("audit_report_op", "reference", "cpu")
    before = datetime.datetime.now(datetime.timezone.utc)
    path = write_results(tmp_path / "r.json", config={"a": (1, 2)}, matrix=[[50.0]], acc_per_task=[50.0],
                         metrics={"Avg": 50.0}, ops={})
    text = path.read_text()
    assert text.endswith("}\n")
    raw = json.loads(text)
    assert raw["schema_version"] == 1
    created = datetime.datetime.fromisoformat(raw["created"])
    assert created.utcoffset() == datetime.timedelta(0)
    assert abs((created - before).total_seconds()) < 60
    assert raw["ops"] == {}  # ops given (even empty): dispatch is not asked
    assert raw["config"] == {"a": [1, 2]} and raw["fwt_before"] is None
    v = raw["versions"]
    assert v["open_clip"] == importlib.metadata.version("open_clip_torch")
    assert v["numpy"] == importlib.metadata.version("numpy")
    assert v["torchvision"] == importlib.metadata.version("torchvision")
    assert v["python"] == platform.python_version() and v["cuda"] == torch.version.cuda
    if not torch.cuda.is_available():
        from segpcl_fast.report.results import cpu_name
        assert v["device_name"] == cpu_name()  # the CPU model name where /proc/cpuinfo has one, not "x86_64"


def test_cpu_name_reads_the_model_name_and_falls_back_to_platform(monkeypatch, tmp_path):
    import builtins

    from segpcl_fast.report import results
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6338\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path,
                                                                            *a, **k))
    assert results.cpu_name() == "Intel(R) Xeon(R) Gold 6338"
    cpuinfo.write_text("processor\t: 0\n")  # no model name (some ARM kernels)
    monkeypatch.setattr(results.platform, "processor", lambda: "")
    assert results.cpu_name() == platform.machine()


def test_read_results_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="segpcl-fast train"):
        read_results(tmp_path / "nope" / "results.json")


# ----------------------------------------------------------------------------- run report

def _result(**kw):
    r = {"accuracy_matrix": [[80.0, None], [70.0, 90.0]], "acc_per_task": [80.0, 82.5],
         "metrics": {"Avg": 81.25, "Last": 82.5, "Forgetting": 10.0, "BWT": -10.0, "FWT": None},
         "config": {"run": {"method": "segpcl"}}, "fwt_before": [None, 30.0]}
    r.update(kw)
    return r


def test_run_label_and_results_row():
    assert run_label({}) == run_label({"run": {}}) == "run" and run_label({"run": {"method": "x"}}) == "x"
    r = {"config": {"run": {"method": "segpcl"}, "data": {"dataset": "cifar100"}},
         "metrics": {"Avg": 1.0, "Last": 2.0, "Forgetting_own": 0.5}}
    assert results_row(r) == {"method": "segpcl", "dataset": "cifar100", "Avg": 1.0, "Last": 2.0,
                              "Forgetting": None, "BWT": None, "FWT": None, "Forgetting_own": 0.5}
    assert results_row(r, label="mine")["method"] == "mine"
    assert results_row({"config": {}, "metrics": {}}) == {"method": "run", "Avg": None, "Last": None,
                                                           "Forgetting": None, "BWT": None, "FWT": None}


def _spy_figures(monkeypatch, render=False):
    """Replace plots.save_figure: keep each figure; write the PNG only when `render`."""
    figs = []
    original = plots.save_figure

    def spy(fig, path):
        figs.append(fig)
        return original(fig, path) if render else Path(path)
    monkeypatch.setattr(plots, "save_figure", spy)
    return figs


def test_write_run_report_files_plots_and_stored_fields(tmp_path, monkeypatch):
    from segpcl_fast.ops import dispatch
    dispatch.record_choice("audit_report_op", "reference", "cpu")  # not this result's: must not be stored
    figs = _spy_figures(monkeypatch, render=True)
    (tmp_path / "config.yaml").write_text("run: {}\n")
    own = [[80.0, None], [75.0, 90.0]]
    paths = write_run_report(_result(accuracy_matrix_own=own), tmp_path, class_names=[])
    assert paths == {"output_dir": str(tmp_path), "accuracy_matrix_png": str(tmp_path / "accuracy_matrix.png"),
                     "acc_per_task_png": str(tmp_path / "acc_per_task.png"),
                     "config": str(tmp_path / "config.yaml"), "results": str(tmp_path / "results.json")}
    assert all(Path(p).exists() for p in paths.values())
    heat, curve = figs
    assert heat.axes[0].get_title() == "segpcl: accuracy a[t][j]"
    (line,) = curve.axes[0].get_lines()
    assert line.get_label() == "segpcl" and list(line.get_ydata()) == [80.0, 82.5]
    back = read_results(paths["results"])
    assert back["ops"] == {} and back["fwt_before"] == [None, 30.0]
    assert back["matrix_own"] == own and back["class_names"] == []  # the keys the trainer's --resume reads
    assert "loss_per_epoch" not in back  # a result without training steps: no key, no loss plot


def test_write_run_report_lists_the_tensorboard_folder(tmp_path, monkeypatch):
    """run.tensorboard=true writes <out>/tensorboard/: results.json "paths" (and the printed "files:") named every
    file of the run but those curves."""
    from segpcl_fast.engine.tensorboard_log import TENSORBOARD_DIR
    _spy_figures(monkeypatch)
    assert "tensorboard" not in write_run_report(_result(), tmp_path)  # none written: none listed
    (tmp_path / TENSORBOARD_DIR / "steps").mkdir(parents=True)
    paths = write_run_report(_result(), tmp_path)
    assert paths["tensorboard"] == str(tmp_path / TENSORBOARD_DIR)
    assert read_results(paths["results"])["paths"]["tensorboard"] == str(tmp_path / TENSORBOARD_DIR)


def test_write_run_report_stores_and_plots_the_loss_curves(tmp_path, monkeypatch):
    figs = _spy_figures(monkeypatch)
    curves = [[{"epoch": 1, "steps": 3, "cls": 2.0}], [{"epoch": 1, "steps": 3, "cls": 1.0, "acgd": 0.5}]]
    paths = write_run_report(_result(loss_per_epoch=curves), tmp_path)
    assert paths["loss_curves_png"] == str(tmp_path / "loss_curves.png")
    assert read_results(paths["results"])["loss_per_epoch"] == curves
    assert figs[-1].axes[0].get_title() == "segpcl: training loss, mean per epoch"
    paths = write_run_report(_result(loss_per_epoch=[[], []]), tmp_path / "zs")  # zeroshot: nothing trained
    assert "loss_curves_png" not in paths and len(figs) == 5


def test_plot_loss_curves_data(tmp_path, monkeypatch):
    figs = _spy_figures(monkeypatch)
    curves = [[{"epoch": 1, "steps": 4, "cls": 3.0, "gr": 0.1}, {"epoch": 2, "steps": 4, "cls": 2.0, "gr": 0.2}],
              [],  # a task without steps takes no epochs on the axis
              [{"epoch": 1, "steps": 2, "gr": 0.3, "acgd": 0.01, "cls": 1.5, "extra": 7.0},
               {"epoch": 2, "steps": 2, "cls": 1.0, "acgd": None}]]
    plots.plot_loss_curves(curves, tmp_path / "l.png")
    axes = figs[0].axes
    # one panel per term: the method's three in order, then any other term
    assert [ax.get_ylabel() for ax in axes] == ["L_cls", "L_ACGD (tau^2 KL, before its weight)",
                                                "L_GR (TSGR, before its weight)", "extra"]
    cls_lines = axes[0].get_lines()
    assert [list(line.get_xdata()) for line in cls_lines] == [[1, 2], [3, 4]]  # x counts epochs across tasks
    assert [list(line.get_ydata()) for line in cls_lines] == [[3.0, 2.0], [1.5, 1.0]]
    assert [line.get_label() for line in cls_lines] == ["task 1", "task 3"]
    (acgd,) = axes[1].get_lines()
    assert list(acgd.get_xdata()) == [3] and list(acgd.get_ydata()) == [0.01]  # None is no point
    assert [list(line.get_ydata()) for line in axes[2].get_lines()] == [[0.1, 0.2], [0.3]]
    assert axes[-1].get_xlabel() == "epoch (all tasks)" and axes[0].get_title() == "training loss, mean per epoch"
    # one legend maps the colours to tasks: each task with a point in any panel, in task order (a review's finding)
    legend = axes[-1].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["task 1", "task 3"]
    assert [h.get_color() for h in legend.get_lines()] == ["C0", "C2"]
    plots.plot_loss_curves([[{"epoch": 1, "steps": 1, "cls": 1.0}]] * 12, tmp_path / "l12.png")  # past 10 colours
    colours = [tuple(h.get_color()) for h in figs[-1].axes[-1].get_legend().get_lines()]
    assert len(colours) == len(set(colours)) == 12  # no two tasks alike (the cycle's C{t % 10} repeated)
    with pytest.raises(ValueError, match="at least one epoch"):
        plots.plot_loss_curves([[], [{"epoch": 1, "steps": 0}]], tmp_path / "e.png")


def test_run_summary_exact_text():
    r = _result(ops={"pgd_step": "reference", "anchor_kl": "triton"},
                paths={"results": "/r/results.json", "output_dir": "/r"})
    assert format_run_summary(r) == "\n".join([
        "metrics (%)",
        "method |   Avg |  Last | Forgetting |    BWT | FWT",
        "-------+-------+-------+------------+--------+----",
        "segpcl | 81.25 | 82.50 |      10.00 | -10.00 | n/a",
        "",
        "accuracy matrix a[t][j] (%)",
        "after  |   T1 |   T2 | acc_t",
        "-------+------+------+------",
        "task 1 | 80.0 |  n/a |  80.0",
        "task 2 | 70.0 | 90.0 |  82.5",
        "",
        "fused ops: anchor_kl=triton, pgd_step=reference",
        "",
        "files:",
        "  results: /r/results.json",
        "  output_dir: /r",
    ])


@pytest.mark.parametrize("T,shown", [(20, True), (21, False)])
def test_run_summary_matrix_up_to_20_tasks(T, shown):
    a = np.tril(np.full((T, T), 50.0)) + np.triu(np.full((T, T), NAN), 1)
    r = {"accuracy_matrix": a.tolist(), "acc_per_task": [50.0] * T, "metrics": {}, "config": {}}
    assert ("accuracy matrix a[t][j]" in format_run_summary(r)) is shown


# ----------------------------------------------------------------------------- plots (figure data)

def test_accuracy_matrix_plot_data(tmp_path, monkeypatch):
    figs = _spy_figures(monkeypatch)
    a = [[80.0, NAN, NAN], [85.0, 90.0, NAN], [55.5, 92.0, 95.04]]
    plots.plot_accuracy_matrix(a, tmp_path / "m.png")
    ax = figs[0].axes[0]
    assert ax.images[0].get_clim() == (0.0, 100.0)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2", "3"]
    assert list(ax.get_xticks()) == [0, 1, 2] and list(ax.get_yticks()) == [0, 1, 2]
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == (
        "accuracy matrix a[t][j]", "evaluated on task j", "after training task t")
    cells = {(t.get_position(), t.get_text(), t.get_color()) for t in ax.texts}
    assert cells == {((0, 0), "80.0", "black"), ((0, 1), "85.0", "black"), ((1, 1), "90.0", "black"),
                     ((0, 2), "55.5", "white"), ((1, 2), "92.0", "black"), ((2, 2), "95.0", "black")}
    assert np.ma.getmaskarray(ax.images[0].get_array()).tolist() == np.isnan(np.asarray(a)).tolist()
    plots.plot_accuracy_matrix(a, tmp_path / "m.png", title="mine", annotate=False)
    assert figs[1].axes[0].get_title() == "mine" and not figs[1].axes[0].texts


@pytest.mark.parametrize("T,texts,size", [(2, 3, (4.1, 3.1)), (20, 210, (14.0, 13.0)), (21, 0, (14.55, 13.55)),
                                         (25, 0, (15.0, 14.0))])
def test_accuracy_matrix_annotates_up_to_20_tasks_and_caps_its_size(T, texts, size, tmp_path, monkeypatch):
    figs = _spy_figures(monkeypatch)
    a = np.tril(np.full((T, T), 50.0)) + np.triu(np.full((T, T), NAN), 1)
    plots.plot_accuracy_matrix(a, tmp_path / "m.png")
    assert len(figs[0].axes[0].texts) == texts
    np.testing.assert_allclose(figs[0].get_size_inches(), size)


def test_accuracy_matrix_plot_refuses_non_square_and_empty(tmp_path):
    for bad in (np.zeros((2, 3)), np.zeros((0, 0))):
        with pytest.raises(ValueError, match="T x T"):
            plots.plot_accuracy_matrix(bad, tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def test_plot_lines_data(tmp_path, monkeypatch):
    figs = _spy_figures(monkeypatch)
    plots.plot_lines([1, 5, 10], {"Last": [80, 83, None], "Avg": [85, 86, 87]}, tmp_path / "l.png",
                     xlabel="K_adv", ylabel="acc (%)", title="sweep")
    ax = figs[0].axes[0]
    last, avg = ax.get_lines()
    assert list(last.get_xdata()) == [1, 5, 10] and list(avg.get_xdata()) == [1, 5, 10]
    np.testing.assert_array_equal(last.get_ydata(), [80.0, 83.0, NAN])
    assert last.get_marker() == "o"
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("K_adv", "acc (%)", "sweep")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Last", "Avg"]
    plots.plot_lines([1], {"a": [1.0]}, tmp_path / "l.png", markers=False)
    assert figs[1].axes[0].get_lines()[0].get_marker() in (None, "None", "")
    assert figs[1].axes[0].get_title() == ""
    with pytest.raises(ValueError, match="at least one series"):
        plots.plot_lines([1], {}, tmp_path / "e.png")


def test_plot_acc_curves_data(tmp_path, monkeypatch):
    figs = _spy_figures(monkeypatch)
    plots.plot_acc_curves({"segpcl": [90.0, 85.0, 80.0], "lora": [88.0, 70.0]}, tmp_path / "c.png")
    ax = figs[0].axes[0]
    (a, b) = ax.get_lines()
    assert list(a.get_xdata()) == [1, 2, 3] and list(b.get_xdata()) == [1, 2]  # task t is 1-based
    assert list(a.get_ydata()) == [90.0, 85.0, 80.0]
    assert list(ax.get_xticks()) == [1, 2, 3]  # the longest curve's T, whatever the order
    assert ax.get_title() == "acc per task" and ax.get_xlabel() == "task t"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["segpcl", "lora"]
    plots.plot_acc_curves({"x": [1.0]}, tmp_path / "c.png", title="mine")
    assert figs[1].axes[0].get_title() == "mine"
    with pytest.raises(ValueError, match="at least one curve"):
        plots.plot_acc_curves({}, tmp_path / "e.png")
    # a mean over seeds with its std: error bars of exactly those half-lengths, on the mean curve
    plots.plot_acc_curves({"segpcl": [90.0, 80.0]}, tmp_path / "c.png", errors={"segpcl": [1.0, 2.5]})
    ax = figs[2].axes[0]
    (bars,) = [c for c in ax.containers if c.has_yerr]
    segments = bars.lines[2][0].get_segments()
    assert [(float(s[0][1]), float(s[1][1])) for s in segments] == [(89.0, 91.0), (77.5, 82.5)]


def test_plot_bars_errors(tmp_path, monkeypatch):
    figs = _spy_figures(monkeypatch)
    plots.plot_bars({"a": 50.0, "b": 40.0}, tmp_path / "b.png", errors={"a": 2.0, "b": None})
    ax = figs[0].axes[0]
    (bars,) = [c for c in ax.containers if getattr(c, "has_yerr", False)]
    segments = bars.lines[2][0].get_segments()
    assert [(float(s[0][1]), float(s[1][1])) for s in segments] == [(48.0, 52.0), (40.0, 40.0)]


def test_plot_bars_data(tmp_path, monkeypatch):
    figs = _spy_figures(monkeypatch)
    plots.plot_bars({"LoRA-B": 77.0, "missing": None, "+ACGD": 81.66}, tmp_path / "b.png", ylabel="Last (%)",
                    title="ablation")
    ax = figs[0].axes[0]
    np.testing.assert_array_equal([p.get_height() for p in ax.patches], [77.0, NAN, 81.66])
    notes = [(t.get_text(), t.xy) for t in ax.texts]
    assert notes == [("77.00", (0.0, 77.0)), ("81.66", (2.0, 81.66))]  # at each bar's top centre; none for None
    assert [t.get_text() for t in ax.get_xticklabels()] == ["LoRA-B", "missing", "+ACGD"]
    assert [t.get_rotation() for t in ax.get_xticklabels()] == [0.0] * 3
    assert (ax.get_ylabel(), ax.get_xlabel(), ax.get_title()) == ("Last (%)", "", "ablation")
    plots.plot_bars({k: 1.0 for k in "abcd"}, tmp_path / "b.png")
    assert {t.get_rotation() for t in figs[1].axes[0].get_xticklabels()} == {0.0}
    plots.plot_bars({k: 1.0 for k in "abcde"}, tmp_path / "b.png", annotate=False)
    assert {t.get_rotation() for t in figs[2].axes[0].get_xticklabels()} == {30.0} and not figs[2].axes[0].texts
    with pytest.raises(ValueError, match="at least one value"):
        plots.plot_bars({}, tmp_path / "e.png")


# ----------------------------------------------------------------------------- segpcl-fast env

def test_environment_variables_reported(monkeypatch):
    wanted = {"SEGPCL_OPS": "reference", "TRITON_CACHE_DIR": "/c", "NCCL_DEBUG": "INFO", "TORCHINDUCTOR_X": "1",
              "CUDA_VISIBLE_DEVICES": "0,1", "CUDA_HOME": "/cuda", "TORCH_CUDA_ARCH_LIST": "9.0",
              "OMP_NUM_THREADS": "4", "TORCH_LOGS": "+dynamo"}
    for k, v in {**wanted, "CUDA_OTHER": "x", "MY_SEGPCL_X": "y"}.items():
        monkeypatch.setenv(k, v)
    got = envmod._environment_variables()
    assert {k: got[k] for k in wanted} == wanted
    assert "CUDA_OTHER" not in got and "MY_SEGPCL_X" not in got and "PATH" not in got
    assert list(got) == sorted(got)


def _fake_cuda(monkeypatch):
    props = [types.SimpleNamespace(name="NVIDIA H200", major=9, minor=0, total_memory=int(139.8 * 2**30),
                                   multi_processor_count=132, max_threads_per_multi_processor=2048),
             types.SimpleNamespace(name="NVIDIA A100", major=8, minor=6, total_memory=40 * 2**30,
                                   multi_processor_count=108, max_threads_per_multi_processor=2048),
             types.SimpleNamespace(name="Tesla V100-SXM2-16GB", major=7, minor=0, total_memory=16 * 2**30,
                                   multi_processor_count=80, max_threads_per_multi_processor=2048)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(props))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])


def test_cuda_device_rows(monkeypatch):
    _fake_cuda(monkeypatch)
    assert envmod._devices() == ["cpu", "cuda"]
    assert envmod._cuda_devices() == [
        {"index": 0, "name": "NVIDIA H200", "capability": "9.0", "memory_gib": 139.8, "multiprocessors": 132,
         "bf16": True},
        {"index": 1, "name": "NVIDIA A100", "capability": "8.6", "memory_gib": 40.0, "multiprocessors": 108,
         "bf16": True},
        {"index": 2, "name": "Tesla V100-SXM2-16GB", "capability": "7.0", "memory_gib": 16.0, "multiprocessors": 80,
         "bf16": False}]


def test_gpu_rows_are_probed_in_what_the_gpu_trains_in(monkeypatch):
    """bf16 from Ampere on, fp16 before (a V100 trains with run.precision=fp16: xformers and the fused LoRA are
    asked for fp16 there, not for the bf16 it will not run)."""
    capability = {0: (9, 0), 1: (7, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[torch.device(device).index])
    assert envmod._gpu_train_dtype("cuda:0") is torch.bfloat16 and envmod._gpu_train_dtype("cuda:1") is torch.float16


def test_attention_rows_probe_a_vitb_bf16_call(monkeypatch):
    from segpcl_fast.ops import mha
    seen = []

    def fake(q, mask):
        seen.append((q.dtype, q.shape[-1], mask))
        return mask is None and q.dtype == torch.bfloat16 and q.shape[-1] == 64
    monkeypatch.setattr(mha, "_use_xformers", fake)
    paths = envmod.op_paths("cpu")
    assert paths["attention (no mask)"] == "xformers" and paths["attention (masked)"] == "sdpa"
    assert seen == [(torch.bfloat16, 64, None)]


def test_triton_probe_states(monkeypatch):
    from segpcl_fast.ops._kernels import _utils
    monkeypatch.setattr(_utils, "HAS_TRITON", False)
    assert envmod._triton()["installed"] is False and envmod._triton()["import_error"] is None
    monkeypatch.setattr(_utils, "HAS_TRITON", True)

    def broken(name):
        raise RuntimeError("built for another torch")
    monkeypatch.setattr(envmod, "importlib", types.SimpleNamespace(import_module=broken))
    info = envmod._triton()
    assert info["installed"] is True and info["import_error"] == "RuntimeError: built for another torch"


def test_environment_dict_in_process(monkeypatch):
    fake_triton = {"installed": True, "version": "9.9", "interpreter": False, "import_error": None}
    monkeypatch.setattr(envmod, "_triton", lambda: fake_triton)
    real = envmod._dist_version
    monkeypatch.setattr(envmod, "_dist_version", lambda name: {"scikit-learn": "1.5.2", "tensorboard": None}.get(
        name, real(name)) if name in ("scikit-learn", "tensorboard") else real(name))
    env = envmod.environment()
    json.dumps(env, allow_nan=False)
    assert env["versions"]["peft"] == real("peft") and env["versions"]["torch"] == real("torch")
    assert env["cpu_threads"] == torch.get_num_threads()
    assert env["triton"] is fake_triton
    assert env["optional"] == {"apex_fused_sgd": False, "xformers": False, "scikit_learn": "1.5.2", "tensorboard": None}
    from segpcl_fast.ops import _ext
    assert env["extension"]["path"] == getattr(_ext._C, "__file__", None)
    if not torch.cuda.is_available():
        from segpcl_fast.model.tf32 import cuda_matmul_tf32
        assert env["cuda"] == {"available": False, "torch_built_with": torch.version.cuda, "torch_arch_list": [],
                               "devices": [], "matmul_tf32": cuda_matmul_tf32()}


def test_environment_dict_on_a_faked_gpu_machine(monkeypatch):
    _fake_cuda(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90"])
    monkeypatch.setattr(envmod, "_triton", lambda: {"installed": False, "version": None, "interpreter": False,
                                                    "import_error": None})
    monkeypatch.setattr(envmod, "op_paths", lambda device: {"pgd_step": f"on {device}"})  # no tensors on a fake GPU
    env = envmod.environment()
    assert env["cuda"]["available"] is True and env["cuda"]["torch_arch_list"] == ["sm_80", "sm_90"]
    assert [d["name"] for d in env["cuda"]["devices"]] == ["NVIDIA H200", "NVIDIA A100", "Tesla V100-SXM2-16GB"]
    assert env["op_paths"] == {"cpu": {"pgd_step": "on cpu"}, "cuda": {"pgd_step": "on cuda"}}
    assert env["versions"]["device_name"] == "NVIDIA H200"


def _env(**kw):
    env = {"versions": {"segpcl_fast": "1.2", "python": "3.11.9", "torch": "2.5.0", "torchvision": None,
                        "open_clip": "2.0", "numpy": "1.26", "peft": None},
           "platform": "Linux-x", "cpu_threads": 2,
           "cuda": {"available": False, "torch_built_with": None, "torch_arch_list": [], "devices": []},
           "triton": {"installed": True, "version": "3.1", "interpreter": False, "import_error": "ImportError: boom"},
           "extension": {"built": False, "cuda": False, "error": "no _C here", "path": None},
           "optional": {"apex_fused_sgd": False, "xformers": True, "scikit_learn": "1.5", "tensorboard": None},
           "ops_backend": "auto",
           "op_paths": {"cpu": {"pgd_step": "reference", "anchor_kl": "error: needs TRITON_INTERPRET=1",
                                "lora_b_linear (B frozen)": "merged"}},
           "environment_variables": {}}
    env.update(kw)
    return env


def test_format_environment_cpu_exact_text():
    assert envmod.format_environment(_env()).splitlines() == [
        "segpcl_fast 1.2   python 3.11.9   Linux-x",
        "torch 2.5.0   torchvision -   open_clip 2.0   numpy 1.26   peft -",
        "no CUDA device (torch built with CUDA -); cpu: 2 threads",
        "triton 3.1: import fails: ImportError: boom",
        "extension segpcl_fast._C: not built (no _C here); LoRA runs in plain PyTorch",
        "apex FusedSGD: no   xformers: yes   scikit-learn: 1.5   tensorboard: no",
        "",
        "op paths under ops backend 'auto' (run.ops / SEGPCL_OPS):",
        "  op                        cpu",
        "  pgd_step                  reference",
        "  anchor_kl                 error (below)",
        "  lora_b_linear (B frozen)  merged",
        "  anchor_kl on cpu: needs TRITON_INTERPRET=1",
        "",
        "environment: (none of ours set)",
    ]


def test_format_environment_states():
    def text(**kw):
        return envmod.format_environment(_env(**kw))
    base = _env()
    triton = dict(base["triton"], import_error=None)
    assert "triton 3.1: imports; the kernels run on CUDA tensors" in text(triton=triton)
    assert "triton 3.1: interpreter on (TRITON_INTERPRET)" in text(triton=dict(triton, interpreter=True))
    assert "triton: not installed" in text(triton=dict(triton, installed=False))
    assert "extension segpcl_fast._C: CPU kernels, with CUDA kernels (/x/_C.so)" in text(
        extension={"built": True, "cuda": True, "error": None, "path": "/x/_C.so"})
    assert "extension segpcl_fast._C: CPU kernels, no CUDA kernels (/x/_C.so)" in text(
        extension={"built": True, "cuda": False, "error": None, "path": "/x/_C.so"})
    assert "scikit-learn: no   tensorboard: no" in text(
        optional={"apex_fused_sgd": True, "xformers": False, "scikit_learn": None, "tensorboard": None})
    assert "tensorboard: 2.21.0" in text(
        optional={"apex_fused_sgd": True, "xformers": False, "scikit_learn": None, "tensorboard": "2.21.0"})
    assert "apex FusedSGD: yes   xformers: no" in text(
        optional={"apex_fused_sgd": True, "xformers": False, "scikit_learn": None, "tensorboard": None})
    assert text(environment_variables={"A_X": "1", "SEGPCL_OPS": "cpp"}).endswith("\nenvironment: A_X=1 SEGPCL_OPS=cpp")
    assert "hint" not in text()  # no GPU here: nothing to install


def _gpu_env(op_paths=None, **kw):
    cuda = {"available": True, "torch_built_with": "12.4", "torch_arch_list": ["sm_80", "sm_90"],
            "devices": [{"index": 0, "name": "NVIDIA H200", "capability": "9.0", "memory_gib": 139.8,
                         "multiprocessors": 132}]}
    if op_paths is None:  # the error only in the last column
        op_paths = {"cpu": {"pgd_step": "reference", "lora_b_linear": "cpp"},
                    "cuda": {"pgd_step": "triton", "lora_b_linear": "error: a long error message, not a column"}}
    return _env(cuda=cuda, op_paths=op_paths, **kw)


OK_TRITON = {"installed": True, "version": "3.1", "interpreter": False, "import_error": None}
CUDA_EXT = {"built": True, "cuda": True, "error": None, "path": "/x/_C.so"}


def test_format_environment_gpu_exact_text():
    lines = envmod.format_environment(_gpu_env(triton=OK_TRITON, extension=CUDA_EXT)).splitlines()
    assert lines[2:4] == ["cuda:0 NVIDIA H200 (sm_90, 139.8 GiB, 132 SMs)", "torch CUDA 12.4, kernels for sm_80 sm_90"]
    v100 = {"index": 1, "name": "Tesla V100-SXM2-16GB", "capability": "7.0", "memory_gib": 16.0, "multiprocessors": 80,
            "bf16": False}
    env = _gpu_env(triton=OK_TRITON, extension=CUDA_EXT)
    env["cuda"]["devices"].append(v100)
    assert envmod.format_environment(env).splitlines()[3] == (
        "cuda:1 Tesla V100-SXM2-16GB (sm_70, 16.0 GiB, 80 SMs; no bf16: run.precision=fp16 or fp32)")
    header, pgd, lora, error = lines[lines.index("op paths under ops backend 'auto' (run.ops / SEGPCL_OPS):") + 1:][:4]
    assert header.split() == ["op", "cpu", "cuda"] and header.startswith("  op ")
    assert pgd.split() == ["pgd_step", "reference", "triton"] and lora.split() == ["lora_b_linear", "cpp", "error", "(below)"]
    assert header.index("cpu") == pgd.index("reference") == lora.index("cpp") == 2 + len("lora_b_linear") + 2
    assert header.index("cuda") == pgd.index("triton") == lora.index("error (below)")
    assert header.index("cuda") - header.index("cpu") <= 16  # error messages go below the table, not in a column
    assert error == "  lora_b_linear on cuda: a long error message, not a column"
    assert not [ln for ln in lines if "hint" in ln]
    broken = envmod.format_environment(_gpu_env(extension=CUDA_EXT))  # triton installed, its import fails
    assert "hint: the Triton kernels need" in broken and "SEGPCL_WITH_CUDA" not in broken
    no_cuda_ext = envmod.format_environment(_gpu_env(triton=OK_TRITON, extension=dict(CUDA_EXT, cuda=False)))
    assert "hint: the C++ LoRA op has no CUDA kernels" in no_cuda_ext and "Triton kernels need" not in no_cuda_ext


def test_format_environment_error_cell_keeps_the_columns_apart():
    """SEGPCL_OPS=triton on a GPU machine: the Triton ops fail on CPU tensors, run on CUDA ones."""
    paths = {"cpu": {"pgd_step": "error: needs TRITON_INTERPRET=1", "lora_b_linear": "reference"},
             "cuda": {"pgd_step": "triton", "lora_b_linear": "cpp"}}
    lines = envmod.format_environment(_gpu_env(op_paths=paths, triton=OK_TRITON, extension=CUDA_EXT)).splitlines()
    header = next(ln for ln in lines if ln.split() == ["op", "cpu", "cuda"])
    row = next(ln for ln in lines if ln.startswith("  pgd_step "))
    assert row.split() == ["pgd_step", "error", "(below)", "triton"]
    assert row.index("triton") == header.index("cuda")


# ----------------------------------------------------------------------------- engine/accel.py

def _fake_module(monkeypatch, name, **attrs):
    mod = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


class _FusedSGD:
    def __init__(self, params, lr, momentum, weight_decay):
        self.params, self.lr, self.momentum, self.weight_decay = params, lr, momentum, weight_decay


def test_apex_probe_needs_nvidia_fused_sgd(monkeypatch):
    from segpcl_fast.engine import accel
    _fake_module(monkeypatch, "apex")
    _fake_module(monkeypatch, "apex.optimizers")  # the unrelated PyPI 'apex': no FusedSGD
    assert accel.has_apex_fused_sgd() is False
    _fake_module(monkeypatch, "apex.optimizers", FusedSGD=_FusedSGD)
    assert accel.has_apex_fused_sgd() is True

    def broken(name):
        raise SyntaxError("PyPI apex on python 3")
    monkeypatch.setattr(accel, "importlib", types.SimpleNamespace(import_module=broken))
    assert accel.has_apex_fused_sgd() is False
    assert accel.available()["apex_fused_sgd"] is False


def test_apex_fused_sgd_only_for_cuda_params(monkeypatch):
    from segpcl_fast.engine import accel
    _fake_module(monkeypatch, "apex")
    _fake_module(monkeypatch, "apex.optimizers", FusedSGD=_FusedSGD)
    cfg = types.SimpleNamespace(lr=0.05, momentum=0.8, weight_decay=1e-4)
    assert accel.apex_fused_sgd([torch.nn.Parameter(torch.ones(2))], cfg) is None  # CPU params
    assert accel.apex_fused_sgd([], cfg) is None

    class LooksCuda(torch.nn.Parameter):
        @property
        def is_cuda(self):
            return True
    params = [LooksCuda(torch.ones(2))]
    opt = accel.apex_fused_sgd(params, cfg)
    assert isinstance(opt, _FusedSGD) and opt.params is params
    assert (opt.lr, opt.momentum, opt.weight_decay) == (0.05, 0.8, 1e-4)


def test_xformers_probe(monkeypatch):
    from segpcl_fast.engine import accel
    from segpcl_fast.ops import mha
    _fake_module(monkeypatch, "xformers")
    monkeypatch.setitem(sys.modules, "xformers.ops", None)  # the package, but its ops do not import
    assert accel.has_xformers() is False
    _fake_module(monkeypatch, "xformers.ops")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert accel.has_xformers() is True and accel.available() == {"apex_fused_sgd": False, "xformers": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # there, the kernels must run
    monkeypatch.setattr(mha, "xformers_failure", lambda device, dtype, head: None)
    assert accel.has_xformers() is True
    monkeypatch.setattr(mha, "xformers_failure", lambda device, dtype, head: "no kernel image for sm_90")
    assert accel.has_xformers() is False


def test_results_name_the_runs_own_device_not_the_first_gpu(monkeypatch):
    from segpcl_fast.report.results import collect_versions
    _fake_cuda(monkeypatch)
    assert collect_versions("cuda:1")["device_name"] == "NVIDIA A100"
    assert collect_versions()["device_name"] == "NVIDIA H200"  # no device given: the first GPU
    assert "NVIDIA" not in collect_versions("cpu")["device_name"]


def test_metric_columns_count_the_runs_that_have_each_metric():
    from segpcl_fast.report.tables import metric_columns, plus_minus
    row = metric_columns([{"Last": 1.0, "Forgetting_own": None}, {"Last": 3.0}, {"Last": 2.0, "Forgetting_own": 4.0}],
                         ["Last", "Forgetting_own"])
    assert row["Last"] == 2.0 and row["Last_std"] == pytest.approx(1.0) and row["Last_n"] == 3  # sample std
    assert row["Forgetting_own"] == 4.0 and row["Forgetting_own_std"] is None and row["Forgetting_own_n"] == 1
    assert plus_minus(row["Last"], row["Last_std"], 3, row["Last_n"]) == "2.00 +- 1.00"
    assert plus_minus(row["Forgetting_own"], None, 3, row["Forgetting_own_n"]) == "4.00 (n=1)"
    assert plus_minus(None, None, 3, 0) == "n/a"


# ----------------------------------------------------------------------------- mutation audit (report, 2026-12-07)

def test_loss_curve_colours_and_legend_order_up_to_and_past_ten_tasks(tmp_path, monkeypatch):
    """Up to 10 tasks each takes matplotlib's cycle colour C0..C9 (10 tasks: all ten); past 10 the tasks spread
    over the whole turbo map, first task at 0 and last at 1; the legend lists the tasks in numeric order
    (task 2 before task 10, not as text)."""
    import matplotlib
    figs = _spy_figures(monkeypatch)
    plots.plot_loss_curves([[{"epoch": 1, "steps": 1, "cls": 1.0}]] * 10, tmp_path / "l10.png")
    legend = figs[-1].axes[-1].get_legend()
    assert [h.get_color() for h in legend.get_lines()] == [f"C{t}" for t in range(10)]
    plots.plot_loss_curves([[{"epoch": 1, "steps": 1, "cls": 1.0}]] * 12, tmp_path / "l12.png")
    legend = figs[-1].axes[-1].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == [f"task {t}" for t in range(1, 13)]
    turbo = matplotlib.colormaps["turbo"]
    assert [tuple(h.get_color()) for h in legend.get_lines()] == [tuple(turbo(t / 11)) for t in range(12)]


def test_optional_packages_ask_for_scikit_learn_and_tensorboard_by_their_distribution_names(monkeypatch):
    """`segpcl-fast env` reports scikit-learn (t-SNE anchor views) and tensorboard (run.tensorboard) under the
    versions of the distributions of those names."""
    installed = {"scikit-learn": "1.5.2", "tensorboard": "2.21.0"}
    monkeypatch.setattr(envmod, "_dist_version", lambda name: installed.get(name))
    found = envmod._optional_packages()
    assert (found["scikit_learn"], found["tensorboard"]) == ("1.5.2", "2.21.0")


@pytest.mark.parametrize("text, error", [("{\"matrix\": [[1.0]]", "JSONDecodeError"),
                                         ("{\"matrix\": [[1.0]], \"acc_per_task\": [1.0]}", "KeyError: 'metrics'"),
                                         ("{\"matrix\": [[1.0]], \"metrics\": {}}", "KeyError: 'acc_per_task'"),
                                         ("[1, 2]", "TypeError")])
def test_read_results_of_a_damaged_file_is_one_value_error(tmp_path, text, error):
    """A results.json cut short, lacking a key every reader uses (metrics, acc_per_task), or not an object at all
    is one ValueError naming the file and what is wrong, not a KeyError / TypeError from deep inside."""
    path = tmp_path / "results.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"results.json is not a whole results.json \({error}"):
        read_results(path)


def test_clear_table_files_removes_only_the_analysis_files_and_leaves_a_folder(tmp_path, caplog):
    """clear_table_files removes <name>.json / .txt / .png files, names them in one log line, and leaves anything
    else: another analysis' files, and a folder that happens to carry such a name (no IsADirectoryError)."""
    import logging
    for name in ("sweep.json", "sweep.png", "ablation.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "sweep.txt").mkdir()
    with caplog.at_level(logging.INFO, logger="segpcl_fast.report"):
        resmod.clear_table_files(tmp_path, "sweep")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ablation.txt", "sweep.txt"]
    assert (tmp_path / "sweep.txt").is_dir()
    assert "removed the earlier sweep.json, sweep.png (written again" in caplog.text


def test_loss_curve_legend_sits_below_the_x_label_in_rows_of_at_most_ten(tmp_path, monkeypatch):
    """The task legend goes under the last panel's x label (anchored at y = -0.28 - 0.1 / panels in its axes,
    centred), so it hides no curve; 12 tasks take two rows of at most 10, 3 tasks one row of 3."""
    figs = _spy_figures(monkeypatch)
    for tasks, terms, ncol in ((12, {"cls": 1.0, "acgd": 2.0}, 10), (3, {"cls": 1.0}, 3)):
        plots.plot_loss_curves([[{"epoch": 1, "steps": 1, **terms}]] * tasks, tmp_path / "l.png")
        ax = figs[-1].axes[-1]
        legend = ax.get_legend()
        x, y, _, _ = legend.get_bbox_to_anchor().transformed(ax.transAxes.inverted()).bounds
        assert (x, y) == pytest.approx((0.5, -0.28 - 0.1 / len(terms)))
        assert legend._ncols == ncol  # matplotlib keeps ncols private; no public getter


def test_loss_curves_count_a_tasks_epochs_up_to_its_last_one(tmp_path, monkeypatch):
    """x counts epochs across tasks by epoch number: a task whose epoch 2 recorded no row (no steps) still takes 3
    epochs on the axis, so the next task starts at epoch 4."""
    figs = _spy_figures(monkeypatch)
    curves = [[{"epoch": 1, "steps": 2, "cls": 3.0}, {"epoch": 3, "steps": 2, "cls": 2.0}],
              [{"epoch": 1, "steps": 2, "cls": 1.0}]]
    plots.plot_loss_curves(curves, tmp_path / "l.png")
    assert [list(line.get_xdata()) for line in figs[0].axes[0].get_lines()] == [[1, 3], [4]]


def test_accuracy_matrix_text_is_white_below_60_and_black_from_60(tmp_path, monkeypatch):
    """On viridis, a cell below 60 % is dark (white text), one of 60 % or more light (black text); the colour
    follows the value, not its one-decimal text (59.96 shows as 60.0, in white)."""
    figs = _spy_figures(monkeypatch)
    plots.plot_accuracy_matrix([[59.96, NAN], [60.0, 100.0]], tmp_path / "m.png")
    cells = {t.get_position(): (t.get_text(), t.get_color()) for t in figs[0].axes[0].texts}
    assert cells == {(0, 0): ("60.0", "white"), (0, 1): ("60.0", "black"), (1, 1): ("100.0", "black")}


def test_write_run_report_stores_the_runs_counts_and_process_record(tmp_path):
    """results.json keeps the result's "counts" and "run" (the processes and device that trained: a --resume and
    evaluate read them back), and names the run's own device in its versions."""
    run = {"world_size": 1, "device": "cpu"}
    counts = {"fp16_skipped_steps": [0, 2]}
    paths = write_run_report(_result(run=run, counts=counts), tmp_path, plots=False)
    back = read_results(paths["results"])
    assert back["run"] == run and back["counts"] == counts
    from segpcl_fast.report.results import cpu_name
    assert back["versions"]["device_name"] == cpu_name()


def test_gpu_lora_and_attention_rows_are_asked_in_the_dtype_each_gpu_trains_in(monkeypatch):
    """The CUDA rows of `segpcl-fast env` ask the LoRA and attention dispatch about tensors of the dtype the GPU
    trains in: bf16 from Ampere on (cuda:0, 9.0), fp16 before (cuda:1, a 7.0 V100 with run.precision=fp16),
    the CPU's LoRA rows in fp32. The probe tensors are made on the CPU here (no GPU needed)."""
    from segpcl_fast.ops import lora_linear, mha

    class CpuTorch:  # envmod's torch, making each probe tensor on the CPU whatever device it names
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*shape, device=None, **kwargs):
            return torch.empty(*shape, **kwargs)
    capability = {0: (9, 0), 1: (7, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[torch.device(device).index])
    monkeypatch.setattr(envmod, "torch", CpuTorch())
    seen = []
    monkeypatch.setattr(lora_linear, "lora_b_linear_impl",
                        lambda x, B, compiling: seen.append((x.dtype, B.dtype)) or "merged")
    monkeypatch.setattr(mha, "_use_xformers", lambda q, mask: seen.append(q.dtype) or False)
    for device, dtype in (("cuda:0", torch.bfloat16), ("cuda:1", torch.float16)):
        seen.clear()
        assert envmod._lora_impls(device) == {"training": "merged", "frozen_B": "merged", "compiled": "merged"}
        assert envmod._attention_impl(device) == "sdpa"
        assert seen == [(dtype, dtype)] * 3 + [dtype], device
    seen.clear()
    envmod._lora_impls("cpu")
    assert seen == [(torch.float32, torch.float32)] * 3


def test_source_revision_is_the_checkouts_own_commit_and_none_for_a_copy_inside_another_repository(tmp_path,
                                                                                                  monkeypatch):
    """A source checkout (.git beside the package) records its commit and whether tracked files differ; an
    installed copy (no .git beside it) records None, even when it lies inside another git work tree (a virtual
    environment inside a project), whose commit is not the package's."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              check=True, capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "tracked.txt").write_text("a")
    git("add", "tracked.txt")
    git("commit", "-q", "-m", "one")
    monkeypatch.setattr(resmod, "__file__", str(tmp_path / "segpcl_fast" / "report" / "results.py"))
    assert resmod.source_revision() == {"commit": git("rev-parse", "HEAD"), "dirty": False}
    (tmp_path / "tracked.txt").write_text("b")
    assert resmod.source_revision()["dirty"] is True
    copy = tmp_path / "venv" / "site-packages" / "segpcl_fast" / "report" / "results.py"
    copy.parent.mkdir(parents=True)
    monkeypatch.setattr(resmod, "__file__", str(copy))
    assert resmod.source_revision() is None
