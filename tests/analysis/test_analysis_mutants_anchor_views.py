"""Tests added by a mutation audit of segpcl_fast/analysis/anchor_views.py: the PCA of a 1-D cloud,
t-SNE's perplexity below the number of points, argument checks before any training, and one real
run whose seeds and anchors are chosen by the test, so every reported number (cosines to the
target / nearest prototype, counts, the per-group coordinates) can be recomputed by hand."""
import importlib
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segpcl_fast.analysis.outputs import encode_batches, stack_dataset
from segpcl_fast.api import make_config
from segpcl_fast.config import ConfigError

av = importlib.import_module("segpcl_fast.analysis.anchor_views")  # the package exports a function of that name


def test_pca_of_one_dimensional_points_pads_a_zero_column():
    x = torch.tensor([[1.0], [2.0], [4.0], [9.0]], dtype=torch.float64)
    got = av.project_2d(x, "pca")
    assert got.shape == (4, 2)
    assert np.allclose(np.abs(got[:, 0]), np.abs(x[:, 0].numpy() - 4.0)) and np.all(got[:, 1] == 0)


def test_pca_is_exact_and_deterministic_on_a_flat_spectrum():
    """torch.pca_lowrank (randomized) captured 92-98 % of the top-2 variance of points with a flat spectrum, and
    drew from the global random stream: PC1/PC2 must be the exact top two, the same on every call."""
    x = torch.randn(400, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    state = torch.random.get_rng_state()
    got = av.project_2d(x, "pca")
    assert torch.equal(torch.random.get_rng_state(), state) and np.array_equal(got, av.project_2d(x, "pca"))
    top2 = torch.linalg.svdvals(x - x.mean(0)) ** 2
    assert np.allclose((got ** 2).sum(0), top2[:2].numpy(), rtol=1e-9)


def test_tsne_perplexity_stays_below_the_number_of_points(monkeypatch):
    """scikit-learn requires perplexity < n_samples; a stand-in TSNE records what it was given."""
    calls = []

    class FakeTSNE:
        def __init__(self, **kwargs):
            calls.append(kwargs)

        def fit_transform(self, x):
            assert calls[-1]["perplexity"] < len(x)
            return x[:, :2]
    manifold = types.ModuleType("sklearn.manifold")
    manifold.TSNE = FakeTSNE
    monkeypatch.setitem(sys.modules, "sklearn", types.ModuleType("sklearn"))
    monkeypatch.setitem(sys.modules, "sklearn.manifold", manifold)
    for n in (4, 7, 200):
        assert av.project_2d(torch.randn(n, 5), "tsne", seed=3).shape == (n, 2)
    assert all(c["n_components"] == 2 and c["random_state"] == 3 for c in calls)
    assert 2 <= calls[0]["perplexity"] and calls[-1]["perplexity"] <= 30


def _fake_trainer_factory(num_tasks=2):
    def make(cfg):
        def no_training(t):
            raise AssertionError("trained before the arguments were checked")
        return SimpleNamespace(scenario=SimpleNamespace(num_tasks=num_tasks), train_task=no_training, cfg=cfg)
    return make


@pytest.mark.parametrize("kwargs, match", [
    ({"projection": "umap"}, "unknown projection"),
    ({"method": "pca"}, r"run.method must be one of .*, got 'pca'"),  # method=: the training method, as in the CLI
    ({"task": 1}, r"task must be in 2\.\.2"),
    ({"task": 3}, r"task must be in 2\.\.2"),
])
def test_bad_arguments_fail_before_training(kwargs, match, monkeypatch, tmp_path):
    built = []
    monkeypatch.setattr(av, "make_trainer", lambda cfg: built.append(cfg) or _fake_trainer_factory()(cfg))
    with pytest.raises(ConfigError, match=match):
        av.anchor_views(make_config(output_dir=str(tmp_path), num_tasks=2), **kwargs)
    assert built == []  # before a trainer is even built (a task out of range loaded the model and data first)


def test_tsne_without_scikit_learn_fails_before_training(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)  # import fails like a missing package
    monkeypatch.setattr(av, "make_trainer", lambda cfg: pytest.fail("built a trainer"))
    with pytest.raises(ConfigError, match="scikit-learn"):
        av.anchor_views(make_config(output_dir=str(tmp_path)), projection="tsne")


SEEDS, ANCHORS, TARGETS = [3, 5, 8, 13], [20, 21, 34, 55], [0, 7, 3, 41]


def _run(small_config, monkeypatch, out, max_new_images):
    """anchor_views with build_task_anchors replaced: 'anchors' are other new-task images, so the
    test knows every point; returns (result, saved json, the trainer, the new-task images)."""
    seen = {}

    def chosen_anchors(trainer, t, images):
        seen.update(trainer=trainer, t=t, images=images.clone())
        return images[ANCHORS], torch.tensor(SEEDS), torch.tensor(TARGETS)
    monkeypatch.setattr(av, "build_task_anchors", chosen_anchors)
    real_save = av.save_png
    monkeypatch.setattr(av, "save_png", lambda fig, path: seen.update(fig=fig) or real_save(fig, path))
    result = av.anchor_views(small_config(out), max_new_images=max_new_images)
    return result, json.loads(Path(result["paths"]["json"]).read_text()), seen


def test_reported_cosines_and_coordinates_are_the_chosen_points(small_config, monkeypatch):
    _, saved, seen = _run(small_config, monkeypatch, "av", max_new_images=0)
    trainer, images = seen["trainer"], seen["images"]
    assert seen["t"] == 1 and saved["task"] == 2 and saved["targets"] == TARGETS
    model = trainer.model.eval()
    protos = trainer.learner.prototypes.tensor[:50].float()
    raw_seed, _ = encode_batches(model, images[SEEDS])
    raw_anchor, _ = encode_batches(model, images[ANCHORS])
    raw_new, _ = encode_batches(model, images)
    rows = {r["group"]: r for r in saved["rows"]}
    assert [rows[g]["n"] for g in ("old prototypes", "seeds", "DPGD anchors", "new-task images")] == [50, 4, 4, 100]
    want_seed = F.cosine_similarity(raw_seed, protos[TARGETS], dim=-1).mean()
    want_anchor = F.cosine_similarity(raw_anchor, protos[TARGETS], dim=-1).mean()
    want_new = (F.normalize(raw_new, dim=-1) @ F.normalize(protos, dim=-1).T).max(dim=1).values.mean()
    assert rows["seeds"]["cos_to_target_prototype"] == pytest.approx(float(want_seed), abs=1e-5)
    assert rows["DPGD anchors"]["cos_to_target_prototype"] == pytest.approx(float(want_anchor), abs=1e-5)
    assert rows["new-task images"]["cos_to_target_prototype"] == pytest.approx(float(want_new), abs=1e-5)
    _, labels = stack_dataset(trainer.scenario.train_dataset(1), "cpu")
    assert saved["new_labels"] == labels.tolist()
    # a point's 2-D coordinates depend only on its features: seeds / anchors sit on their images
    coords = {k: np.array(v) for k, v in saved["coords"].items()}
    assert coords["old prototypes"].shape == (50, 2)
    scale = np.abs(coords["new-task images"]).max()
    assert np.allclose(coords["seeds"], coords["new-task images"][SEEDS], atol=1e-4 * scale)
    assert np.allclose(coords["DPGD anchors"], coords["new-task images"][ANCHORS], atol=1e-4 * scale)
    # the PNG draws each group at its coordinates, one line from each seed to its anchor
    ax = seen["fig"].axes[0]
    drawn = {c.get_label(): np.asarray(c.get_offsets()) for c in ax.collections}
    for group, xy in coords.items():
        assert np.allclose(drawn[group], xy), group
    assert len(ax.lines) == len(SEEDS)


def test_the_table_it_prints_and_writes_names_the_method_trained(small_config, monkeypatch):
    """anchor_views.txt's title names the method (the run's, as the PNG's title) and the task it trained up to."""
    result, _, _ = _run(small_config, monkeypatch, "avt", max_new_images=10)
    title = "anchor views before task 2 (segpcl after task 1; teacher raw features r_T, pca in the PNG)"
    assert result["table"].splitlines()[0] == title
    assert Path(result["paths"]["table"]).read_text().splitlines()[0] == title


def test_max_new_images_subsamples_images_and_labels_together(small_config, monkeypatch):
    _, saved, _ = _run(small_config, monkeypatch, "av10", max_new_images=10)
    rows = {r["group"]: r for r in saved["rows"]}
    assert rows["new-task images"]["n"] == 10 and len(saved["coords"]["new-task images"]) == 10
    assert len(saved["new_labels"]) == 10 and len(set(saved["new_labels"])) > 1
    assert rows["seeds"]["n"] == 4  # the seeds are chosen among all the task's images, not the sample


def test_one_task_is_refused_before_the_model_and_data_load(monkeypatch, tmp_path):
    """It said "task must be in 2..1", after loading the model and data."""
    monkeypatch.setattr(av, "make_trainer", lambda cfg: pytest.fail("built a trainer"))
    with pytest.raises(ConfigError, match=r"anchor views needs at least 2 tasks \(data.num_tasks >= 2, got 1\): "
                                          "task 1 has no old classes"):
        av.anchor_views(make_config(output_dir=str(tmp_path), num_tasks=1))


# ----------------------------------------------------------------------------- mutation audit (analysis, 2026-12-07)

def test_pca_axes_are_signed_so_their_largest_loading_is_positive():
    """Points spread along e1 (+-3) and e2 (+-1): PC1 = +e1 and PC2 = +e2 (each axis signed so that its largest
    loading is positive, whatever sign the SVD returns), so the coordinates are the points' own first two
    coordinates; the same for the points given along e3 and e2, whose PC1 is +e3."""
    x = torch.tensor([[3.0, 0.0, 0.0], [-3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]], dtype=torch.float64)
    assert np.allclose(av.project_2d(x, "pca"), [[3.0, 0.0], [-3.0, 0.0], [0.0, 1.0], [0.0, -1.0]], atol=1e-12)
    x = torch.tensor([[0.0, 0.0, -3.0], [0.0, 0.0, 3.0], [0.0, -1.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    assert np.allclose(av.project_2d(x, "pca"), [[-3.0, 0.0], [3.0, 0.0], [0.0, -1.0], [0.0, 1.0]], atol=1e-12)


@pytest.mark.parametrize("resume", [True, False])
def test_a_resumed_anchor_views_keeps_its_tables_until_it_writes_them_again(resume, tables_kept_only_on_resume):
    """A --resume keeps the earlier anchor_views.{json,txt,png} until it writes them again (its run's checkpoints
    may still refuse its config, as here); a new anchor-views removes them before it trains."""
    tables_kept_only_on_resume(av, "anchor_views", av.anchor_views, resume)


@pytest.mark.parametrize("n_classes", [20, 21])
def test_views_colour_seeds_anchors_and_prototypes_by_target_class(n_classes, monkeypatch, tmp_path):
    """Up to 20 old classes each takes its own tab20 colour; past 20 they spread over the whole turbo map (class 0
    at 0, the last class at 1). A seed, its anchor and its target's prototype share the colour."""
    from matplotlib import colormaps
    figs = []
    monkeypatch.setattr(av, "save_png", lambda fig, path: figs.append(fig) or str(path))
    targets = np.array([0, n_classes - 1, 5])
    xy = {"old prototypes": np.arange(2 * n_classes, dtype=float).reshape(n_classes, 2),
          "seeds": np.zeros((3, 2)), "DPGD anchors": np.ones((3, 2)), "new-task images": np.full((4, 2), 2.0)}
    av.plot_views(xy, targets, tmp_path / "v.png", 2, "pca", "segpcl")
    drawn = {c.get_label(): c for c in figs[0].axes[0].collections}
    if n_classes <= 20:
        want = colormaps["tab20"](targets)
        want_protos = colormaps["tab20"](np.arange(n_classes))
    else:
        want = colormaps["turbo"](targets / (n_classes - 1))
        want_protos = colormaps["turbo"](np.arange(n_classes) / (n_classes - 1))
    assert np.allclose(drawn["seeds"].get_facecolors(), want)
    assert np.allclose(drawn["DPGD anchors"].get_facecolors(), want)
    assert np.allclose(drawn["old prototypes"].get_facecolors(), want_protos)
    assert np.allclose(drawn["old prototypes"].get_facecolors()[targets], want)
