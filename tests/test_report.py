"""report/: results.json round trip (strict JSON, NaN -> null), aligned tables holding the
numbers, valid PNG plots written atomically."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segpcl_fast import metrics as M
from segpcl_fast.config import Config
from segpcl_fast.report import (format_accuracy_matrix, format_metrics_table, format_run_summary,
                                 read_results, write_results, write_run_report)
from segpcl_fast.report import plots
from segpcl_fast.report.results import to_jsonable

NAN = float("nan")
MATRIX = np.array([[80, NAN, NAN], [85, 90, NAN], [60, 92, 95]], dtype=float)
ACC = [80.0, 87.5, 85.5]
BEFORE = [NAN, 30.0, 50.0]


def test_results_json_round_trip(tmp_path):
    metrics = M.summarize(MATRIX, ACC, BEFORE)
    cfg = Config().to_dict()
    path = write_results(tmp_path / "run" / "results.json", config=cfg, matrix=MATRIX,
                         acc_per_task=np.array(ACC), metrics=metrics, fwt_before=BEFORE,
                         timings={"train_s": np.float32(1.5), "steps": np.int64(7)},
                         paths={"output_dir": tmp_path}, ops={"lora_b_linear": "reference"})
    text = path.read_text()
    assert "NaN" not in text  # strict JSON
    raw = json.loads(text)
    assert raw["matrix"][0][1] is None and raw["fwt_before"][0] is None
    assert raw["config"] == json.loads(json.dumps(cfg))
    assert raw["metrics"] == pytest.approx({**metrics, "FWT": 40.0})
    assert raw["timings"] == {"train_s": 1.5, "steps": 7}
    assert raw["paths"]["output_dir"] == str(tmp_path)
    assert raw["ops"] == {"lora_b_linear": "reference"}
    import torch
    assert raw["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert raw["versions"]["segpcl_fast"]
    back = read_results(path)
    np.testing.assert_array_equal(back["matrix"], MATRIX)
    assert back["acc_per_task"] == ACC
    assert not [p for p in os.listdir(path.parent) if p.endswith(".tmp")]


def test_results_ops_default_asks_dispatch(tmp_path):
    from segpcl_fast.ops import dispatch
    dispatch.record_choice("unit_test_op", "reference", "cpu")
    path = write_results(tmp_path / "r.json", config={}, matrix=[[50.0]], acc_per_task=[50.0],
                         metrics=M.summarize([[50.0]], [50.0]))
    raw = json.loads(path.read_text())
    assert raw["ops"]["unit_test_op"] == "reference"
    assert raw["metrics"]["BWT"] is None


def test_unstorable_value_is_clear_error():
    with pytest.raises(TypeError, match="results.json"):
        to_jsonable({"x": object()})


def test_metrics_table_aligned_and_holds_numbers():
    rows = [{"method": "segpcl", **M.summarize(MATRIX, ACC, BEFORE)},
            {"method": "lora_finetune", "Avg": 70.123, "Last": 60.0, "Forgetting": None, "BWT": -12.5}]
    table = format_metrics_table(rows)
    lines = table.splitlines()
    assert lines[0].split(" | ")[0].strip() == "method"
    assert [c.strip() for c in lines[0].split("|")] == ["method", "Avg", "Last", "Forgetting", "BWT", "FWT"]
    assert "84.33" in lines[2] and "85.50" in lines[2] and "11.50" in lines[2] and "-9.00" in lines[2]
    assert "40.00" in lines[2]
    assert "70.12" in lines[3] and "n/a" in lines[3]  # None and missing FWT -> n/a
    # numbers right-aligned: the column separators line up across rows
    bars = [[i for i, ch in enumerate(ln) if ch == "|"] for ln in (lines[0], lines[2], lines[3])]
    assert bars[0] == bars[1] == bars[2]


def test_metrics_table_columns_and_errors():
    t = format_metrics_table([{"name": "a", "Last": 1.0, "x": 3}], columns=["name", "x"])
    assert "Last" not in t and "3" in t.splitlines()[2]
    with pytest.raises(ValueError):
        format_metrics_table([])


def test_accuracy_matrix_table():
    t = format_accuracy_matrix(MATRIX, ACC)
    lines = t.splitlines()
    assert "T3" in lines[0] and "acc_t" in lines[0]
    assert "92.0" in lines[4] and "85.5" in lines[4] and lines[2].count("n/a") == 2


def _check_png(path):
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        assert im.size[0] > 50 and im.size[1] > 50
        return np.asarray(im.convert("L"))


def test_plots_are_valid_pngs(tmp_path):
    heat = _check_png(plots.plot_accuracy_matrix(MATRIX, tmp_path / "a" / "matrix.png"))
    assert heat.std() > 0  # not a blank image
    _check_png(plots.plot_acc_curves({"segpcl": ACC, "lora": [70.0, 60.0]}, tmp_path / "acc.png"))
    _check_png(plots.plot_bars({"LoRA-B": 77.0, "+ACGD": 81.7, "missing": None}, tmp_path / "bars.png",
                               ylabel="Last (%)"))
    _check_png(plots.plot_lines([1, 5, 10], {"Last": [80, 83, None], "Avg": [85, 86, 87]},
                                tmp_path / "sweep.png", xlabel="K_adv"))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_plot_overwrite_and_bad_input(tmp_path):
    p = tmp_path / "m.png"
    plots.plot_accuracy_matrix([[10.0]], p)
    small = p.stat().st_size
    plots.plot_accuracy_matrix(np.tril(np.full((6, 6), 50.0)) + np.triu(np.full((6, 6), NAN), 1), p)
    assert p.stat().st_size != small
    _check_png(p)
    with pytest.raises(ValueError, match="T x T"):
        plots.plot_accuracy_matrix([1.0, 2.0], tmp_path / "x.png")
    with pytest.raises(ValueError, match="series"):
        plots.plot_lines([1, 2], {"a": [1.0]}, tmp_path / "y.png")


class _Result:
    """Stands in for engine.trainer.Result: anything with to_dict()."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def to_dict(self):
        return dict(self.__dict__)


def test_write_run_report_and_summary(tmp_path):
    cfg = Config().to_dict()
    cfg["run"]["method"] = "lora_finetune"
    (tmp_path / "checkpoints").mkdir()
    res = _Result(accuracy_matrix=M.matrix_to_list(MATRIX), acc_per_task=ACC,
                  metrics=M.summarize(MATRIX, ACC, BEFORE), fwt_before=[None, 30.0, 50.0],
                  output_dir=str(tmp_path), paths={}, timings={"run_s": 3.2, "tasks": [{"train_s": 1.0}]},
                  ops={"anchor_kl": "triton"}, config=cfg)
    paths = write_run_report(res, tmp_path, plots=True, class_names=["cat", "dog"])
    assert set(paths) == {"output_dir", "accuracy_matrix_png", "acc_per_task_png", "checkpoints", "results"}
    for key in ("accuracy_matrix_png", "acc_per_task_png"):
        _check_png(Path(paths[key]))
    back = read_results(paths["results"])
    np.testing.assert_array_equal(back["matrix"], MATRIX)
    assert back["metrics"]["Forgetting"] == pytest.approx(11.5)
    assert back["class_names"] == ["cat", "dog"] and back["ops"] == {"anchor_kl": "triton"}
    assert back["paths"] == paths and back["config"]["run"]["method"] == "lora_finetune"
    assert back["timings"]["tasks"] == [{"train_s": 1.0}]

    res.paths = paths
    text = format_run_summary(res)
    assert "lora_finetune" in text and "84.33" in text and "11.50" in text and "-9.00" in text
    assert "anchor_kl=triton" in text and paths["results"] in text and "acc_t" in text

    no_plots = write_run_report(res.to_dict(), tmp_path / "np", plots=False)
    assert set(no_plots) == {"output_dir", "results"}
    assert sorted(os.listdir(tmp_path / "np")) == ["results.json"]
