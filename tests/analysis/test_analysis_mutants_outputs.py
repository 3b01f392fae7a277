"""Tests added by a mutation audit of segpcl_fast/analysis/outputs.py and the analysis subcommands
of segpcl_fast/cli.py: the files every analysis writes, run_config's resume rule, batched CLIP-path
embeddings against one unbatched pass, dataset stacking, mean / sample std and their text, slugs,
and that each subcommand's options reach its analysis function."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from segpcl_fast.analysis import outputs
from segpcl_fast.api import make_config


def test_write_table_files_names_and_contents(tmp_path):
    paths = outputs.write_table_files(tmp_path, "thing", {"a": 1, "b": float("nan")}, "TABLE")
    assert paths == {"json": str(tmp_path / "thing.json"), "table": str(tmp_path / "thing.txt")}
    assert json.loads((tmp_path / "thing.json").read_text()) == {"a": 1, "b": None}
    assert (tmp_path / "thing.txt").read_text() == "TABLE\n"


def test_run_config_resumes_only_an_existing_folder(tmp_path):
    cfg = make_config(resume=True, method="+acgd")
    assert outputs.run_config(cfg, None, tmp_path / "new").run.resume is False
    (tmp_path / "old").mkdir()
    kept = outputs.run_config(cfg, None, tmp_path / "old")
    assert kept.run.resume is True and kept.run.method == "+acgd" and kept.run.output_dir == str(tmp_path / "old")
    assert outputs.run_config(make_config(), "segpcl", tmp_path / "old").run.resume is False
    assert outputs.run_config(cfg, "lora_finetune", tmp_path / "x").run.method == "lora_finetune"


class _Linear:
    """A stand-in model: raw = x W, emb = 3 (x W) (not normalised)."""

    def __init__(self):
        self.w = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))

    def encode_image(self, x):
        raw = x.flatten(1) @ self.w
        return raw, 3 * raw + 1


def test_encode_batches_equals_one_pass():
    model = _Linear()
    images = torch.randn(7, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    raw, emb = outputs.encode_batches(model, images, batch_size=3)
    want_raw, want_emb = model.encode_image(images)
    torch.testing.assert_close(raw, want_raw)
    torch.testing.assert_close(emb, F.normalize(want_emb, dim=-1))


def test_stack_dataset_keeps_order_and_handles_empty():
    x = torch.arange(10, dtype=torch.float32).view(10, 1)
    y = torch.arange(10) % 3
    images, labels = outputs.stack_dataset(torch.utils.data.TensorDataset(x, y), "cpu", batch_size=4)
    assert torch.equal(images, x) and torch.equal(labels, y)
    images, labels = outputs.stack_dataset(torch.utils.data.TensorDataset(x[:0], y[:0]), "cpu")
    assert images.numel() == 0 and labels.numel() == 0 and labels.dtype == torch.long


def test_mean_std_plus_minus_and_summaries():
    assert outputs.mean_std([1.0, None, 2.0, 6.0]) == (3.0, pytest.approx(7 ** 0.5))  # sample std, None skipped
    assert outputs.mean_std([4.0]) == (4.0, None) and outputs.mean_std([None]) == (None, None)  # one run: no std
    assert outputs.mean_std([None, 40.0]) == (40.0, None)  # a metric one of two seeds lacks: no "+- 0.00"
    assert outputs.plus_minus(*outputs.mean_std([None, 40.0]), 2) == "40.00"
    assert outputs.plus_minus(3.0, 2.6457, 3) == "3.00 +- 2.65"
    assert outputs.plus_minus(4.0, 0.0, 1) == "4.00" and outputs.plus_minus(None, None, 2) == "n/a"
    assert outputs.plus_minus(4.0, 0.0, 2) == "4.00 +- 0.00"  # runs that agree, not one run
    results = [SimpleNamespace(metrics={"Avg": 10.0, "Last": 1.0}), SimpleNamespace(metrics={"Avg": 20.0, "Last": 3.0})]
    row = outputs.summarize_runs(results)
    assert (row["Avg"], row["Last"], row["Forgetting"]) == (15.0, 2.0, None)


def test_slug():
    assert outputs.slug("+acgd") == "plus_acgd"
    assert outputs.slug("k_adv=5,targets=[k,v]") == "k_adv=5_targets=_k_v"
    assert outputs.slug("a/b") == "a_b" and outputs.slug("[x]") == "x" and outputs.slug("//") == "run"


# ----------------------------------------------------------------------------- the subcommands

def _capture(monkeypatch, name):
    import segpcl_fast.analysis
    seen = {}

    def fake(cfg, **kwargs):
        seen.update(kwargs, cfg=cfg)
        return {"table": "TABLE", "paths": {}}
    monkeypatch.setattr(segpcl_fast.analysis, name, fake)
    return seen


def test_fragility_options_reach_the_analysis(monkeypatch):
    from segpcl_fast.cli import main
    seen = _capture(monkeypatch, "fragility")
    assert main(["fragility", "--tasks", "2,4", "--score", "margin", "--threshold", "quantile:0.7",
                 "--max-old-images", "5", "--temperature", "20"]) == 0
    assert (seen["tasks"], seen["score"], seen["threshold"], seen["max_old_images"], seen["temperature"]) == \
        ([2, 4], "margin", "quantile:0.7", 5, 20.0)
    assert seen["method"] == "lora_finetune"
    assert main(["fragility", "--method", "segpcl"]) == 0 and seen["method"] == "segpcl" and seen["tasks"] is None


def test_retention_distill_and_anchor_view_options_reach_the_analysis(monkeypatch, tmp_path):
    from segpcl_fast.cli import main
    seen = _capture(monkeypatch, "retention")
    assert main(["retention", "--variants", "zeroshot,segpcl", "--datasets", "synthetic-sketch, pets=/p",
                 "--per-class", "3"]) == 0
    assert (seen["variants"], seen["datasets"], seen["per_class"]) == (["zeroshot", "segpcl"],
                                                                       ["synthetic-sketch", "pets=/p"], 3)
    seen = _capture(monkeypatch, "distill_sources")
    assert main(["distill-sources", "--sources", "seeds,folder", "--folder", str(tmp_path), "--seeds", "1,2"]) == 0
    assert (seen["sources"], seen["folder"], seen["seeds"], seen["method"]) == (["seeds", "folder"], str(tmp_path),
                                                                                [1, 2], "segpcl")
    seen = _capture(monkeypatch, "anchor_views")
    assert main(["anchor-views", "--task", "3", "--projection", "tsne", "--method", "+acgd"]) == 0
    assert (seen["task"], seen["projection"], seen["method"]) == (3, "tsne", "+acgd")


def test_table_files_with_plots_off_remove_an_earlier_plot(tmp_path):
    """A rerun with run.plots=false rewrote the JSON and table but left the earlier run's PNG beside them."""
    from segpcl_fast.analysis.outputs import write_table_files
    (tmp_path / "fragility.png").write_bytes(b"\x89PNG old")
    write_table_files(tmp_path, "fragility", {"rows": []}, "table", plots=True)
    assert (tmp_path / "fragility.png").exists()  # the caller draws it anew
    write_table_files(tmp_path, "fragility", {"rows": []}, "table", plots=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fragility.json", "fragility.txt"]
