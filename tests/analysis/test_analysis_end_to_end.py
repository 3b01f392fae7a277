"""Each analysis end to end on the tiny setup (2-layer random CLIP, 2 tasks, 2 images per class)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segpcl_fast.analysis import anchor_views, distill_sources, fragility, retention, sweep
from segpcl_fast.config import ConfigError


def _check_files(paths, names=("json", "table", "png")):
    for key in names:
        assert key in paths, key
        with open(paths[key], "rb") as f:
            head = f.read(8)
        assert head, paths[key]
    assert open(paths["png"], "rb").read(4) == b"\x89PNG"
    return json.load(open(paths["json"]))


def test_fragility_end_to_end(small_config):
    out = fragility(small_config("frag", lr=0.05))
    saved = _check_files(out["paths"])
    row = saved["tasks"][0]
    assert row["task"] == 2 and row["old_classes"] == 50 and row["new_classes"] == 50
    n_old_images = 50 * 2
    assert row["boundary"]["n"] + row["core"]["n"] == n_old_images
    jsd = np.array(row["values"]["jsd"])
    assert jsd.shape == (n_old_images,) and (jsd >= 0).all() and (jsd <= np.log(2) + 1e-6).all()
    assert jsd.max() > 0  # lr 0.05 on LoRA B moves the model
    scores = np.array(row["values"]["score"])
    assert ((scores > row["threshold"]) == np.array(row["values"]["is_boundary"])).all()
    assert row["threshold"] == pytest.approx(np.median(scores))
    assert row["anchors"]["n"] == row["random_new"]["n"] == 50 * 2  # k_seed = 2 per old class
    assert saved["method"] == "lora_finetune" and "boundary > core" in out["table"]


def test_fragility_zero_training_gives_zero_jsd(small_config):
    out = fragility(small_config("frag0", max_steps_per_task=0, epochs=0), method="lora_finetune")
    r = out["rows"][0]
    for group in ("boundary", "core", "anchors", "random_new"):
        assert r[group]["mean"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError, match="out of range"):
        fragility(small_config("frag1"), tasks=[1])


def test_retention_end_to_end(small_config):
    out = retention(small_config("ret", lr=0.05), variants=["zeroshot", "lora_finetune"],
                    datasets=["synthetic-sketch"], per_class=1)
    saved = _check_files(out["paths"])
    rows = {r["method"]: r for r in saved["rows"]}
    assert rows["zeroshot"]["after"] == pytest.approx(rows["zeroshot"]["before"])  # no training, no change
    assert rows["zeroshot"]["change"] == pytest.approx(0.0)
    assert 0.0 <= rows["lora_finetune"]["after"] <= 100.0
    assert saved["datasets"]["synthetic-sketch"]["images"] == 100
    from segpcl_fast.config import load_config  # each row names the run it measured: its config is exact
    assert {m: load_config(Path(r["run"]) / "config.yaml").run.method for m, r in rows.items()} == \
        {"zeroshot": "zeroshot", "lora_finetune": "lora_finetune"}
    with pytest.raises(ConfigError, match="unknown method variant"):
        retention(small_config("ret2"), variants=["nope"])


def test_sweep_end_to_end(small_config):
    out = sweep(small_config("sw", num_tasks=1, eval__fwt=False), axes=["dpgd.k_adv=1,2", "optim.lr=0.02"],
                seeds=[0])
    saved = _check_files(out["paths"])
    assert [r["dpgd.k_adv"] for r in saved["rows"]] == [1, 2]
    assert all(r["Last"] is not None for r in saved["rows"])
    header = out["table"].splitlines()[1]  # a one-value key is a fixed override: in the title, not a column
    assert "k_adv" in header and "optim.lr" not in header and "fixed: optim.lr=0.02" in out["table"].splitlines()[0]
    assert saved["fixed"] == {"optim.lr": 0.02} and saved["config"]["optim"]["lr"] == 0.02
    with pytest.raises(ConfigError, match="fixed override.*expects an integer"):
        sweep(small_config("sw2"), axes=["dpgd.k_adv=1,2", "dpgd.k_seed=two"])


def test_distill_sources_end_to_end_with_a_folder(small_config, tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(ref / f"{i}.jpg")
    out = distill_sources(small_config("ds"), sources=["seeds", "folder"], folder=str(ref))
    saved = _check_files(out["paths"])
    assert [r["source"] for r in saved["rows"]] == ["seeds", "folder"]
    from segpcl_fast.config import load_config
    assert load_config(tmp_path / "ds/folder/seed0/config.yaml").acgd.source == "folder"
    assert load_config(tmp_path / "ds/seeds/seed0/config.yaml").acgd.source == "seeds"
    with pytest.raises(ConfigError, match="unknown ACGD source"):
        distill_sources(small_config("ds2"), sources=["pixels"])


def test_distill_sources_offline_reference_folder(small_config, tmp_path):
    out = distill_sources(small_config("dsoff", num_tasks=2), sources=["folder"])
    assert len(list((tmp_path / "dsoff/reference_images").glob("*.png"))) == 500
    assert out["rows"][0]["Last"] is not None


def test_anchor_views_end_to_end(small_config):
    out = anchor_views(small_config("av"))
    saved = _check_files(out["paths"])
    coords = saved["coords"]
    assert len(coords["old prototypes"]) == 50 and len(coords["seeds"]) == len(coords["DPGD anchors"]) == 100
    assert all(len(p) == 2 for p in coords["new-task images"])
    assert len(saved["targets"]) == 100


def test_pca_projection_matches_svd():
    from segpcl_fast.analysis import project_2d
    x = torch.randn(40, 6, dtype=torch.float64) * torch.tensor([5.0, 3.0, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64)
    got = project_2d(x, "pca")
    centred = (x - x.mean(0)).numpy()
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    ref = centred @ vt[:2].T
    # components are defined up to sign
    assert np.allclose(np.abs(got), np.abs(ref), atol=1e-6)
    with pytest.raises(ConfigError, match="unknown projection"):
        project_2d(x, "umap")


def test_learner_folder_source_distils_on_the_folder_images(small_config, tmp_path):
    """acgd.source=folder: the anchor cache holds the folder's images (eval transform), targets -1."""
    from segpcl_fast.analysis.distill_sources import _trainer_for_source
    ref = tmp_path / "ref"
    (ref / "a").mkdir(parents=True)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for i, c in enumerate(colours):
        Image.fromarray(np.full((32, 32, 3), c, dtype=np.uint8)).save(ref / ("a" if i else "") / f"{i}.png")
    trainer = _trainer_for_source(small_config("lf"), "segpcl", "folder", str(ref), tmp_path / "lf")
    seen = {}
    original = trainer.learner.begin_task

    def capture(*args, **kwargs):
        info = original(*args, **kwargs)
        seen["cache"] = trainer.learner.anchor_cache
        return info
    trainer.learner.begin_task = capture
    trainer.train_task(0)
    trainer.train_task(1)
    cache = seen["cache"]
    assert len(cache) == 3 and cache.targets.tolist() == [-1, -1, -1]
    expected = torch.stack([trainer.test_tf(Image.open(p).convert("RGB"))
                            for p in sorted(ref.rglob("*.png"))])
    assert torch.allclose(cache.pixels.cpu(), expected)
    assert cache.teacher_logits.shape == (3, 50)


def test_fragility_temperature_softens_the_distributions(small_config):
    sharp = fragility(small_config("t1", lr=0.05))["rows"][0]
    soft = fragility(small_config("t20", lr=0.05), temperature=20.0)["rows"][0]
    # same training (deterministic), softer distributions move less in JSD
    assert soft["threshold"] == pytest.approx(sharp["threshold"])
    assert soft["core"]["mean"] < sharp["core"]["mean"]
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        fragility(small_config("t0"), temperature=0.0)
