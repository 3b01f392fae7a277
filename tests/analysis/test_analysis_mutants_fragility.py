"""Tests added by a mutation audit of segpcl_fast/analysis/fragility.py: JSD along any axis, the
threshold rules' edges, the Pearson correlation and group statistics against numpy, the task list,
the pooled summary and table of hand-made rows, and measure_task against a plain recomputation of
its documented quantities (p_before / p_after over C_<=t, anchors and random images over C_<t),
with the anchors built exactly as the learner builds them."""
import importlib
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segpcl_fast.analysis.outputs import make_trainer, run_config, stack_dataset
from segpcl_fast.config import ConfigError

frag = importlib.import_module("segpcl_fast.analysis.fragility")  # the package exports a function of that name


def _dists(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(n, k, generator=g), dim=-1)


# ----------------------------------------------------------------------------- pure pieces

def test_jsd_along_the_first_axis_equals_jsd_of_the_transpose():
    p, q = _dists(6, 4, 1), _dists(6, 4, 2)
    torch.testing.assert_close(frag.jensen_shannon(p.T, q.T, dim=0), frag.jensen_shannon(p, q))


def test_jsd_of_nearly_equal_float64_distributions_is_not_negative():
    """0 <= JSD: the rounding of the float64 sums (about -1e-16 for distributions 1e-9 apart) is clamped."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(2000, 50, generator=g, dtype=torch.float64), dim=-1)
    q = torch.softmax(p.log() + 1e-9 * torch.randn(2000, 50, generator=g, dtype=torch.float64), dim=-1)
    assert bool((frag.jensen_shannon(p, q) >= 0).all())


def test_threshold_edges():
    scores = torch.tensor([0.1, 0.4, 0.9])
    assert frag.resolve_threshold(scores, 0) == 0.0  # an int is a number too
    mask, thr = frag.split_boundary_core(scores, 1)
    assert thr == 1.0 and mask.tolist() == [False, False, False]
    for bad in ("quantile:0", "quantile:1", "quantile:1.0", "quantile:-0.5"):
        with pytest.raises(ConfigError, match="q must be a number in"):
            frag.resolve_threshold(scores, bad)
    assert frag.resolve_threshold(scores, "quantile:0.25") == pytest.approx(np.quantile(scores.numpy(), 0.25))
    with pytest.raises(ValueError, match="no scores to split"):
        frag.resolve_threshold(torch.zeros(0), "median")


def test_boundary_scores_ignore_the_old_classes_text_similarity():
    text = torch.eye(4)  # rows 0, 1 old classes, rows 2, 3 new
    img = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.6, 0.8, 0.0]])  # on the last old class; between old 1 and new 2
    assert frag.boundary_scores(img, text, 2, "text_sim").tolist() == pytest.approx([0.0, 0.8])
    assert frag.boundary_scores(img, text, 2, "margin").tolist() == pytest.approx([-1.0, 0.2])


def test_correlation_is_pearson_and_none_when_a_side_is_constant():
    rng = np.random.default_rng(0)
    a = rng.normal(size=20)
    b = 0.5 * a + rng.normal(size=20)
    want = float(np.mean((a - a.mean()) * (b - b.mean())) / (a.std() * b.std()))
    assert frag._correlation(a, b) == pytest.approx(want)
    assert frag._correlation(a, np.zeros(20)) is None
    assert frag._correlation(np.zeros(20), b) is None
    assert frag._correlation(a[:1], b[:1]) is None


def test_correlation_is_none_for_any_constant_side():
    a = np.random.default_rng(0).normal(size=20)
    assert frag._correlation(a, np.full(20, 0.3)) is None
    assert frag._correlation(np.full(20, 0.3), a) is None


def test_group_stats_hand_values():
    assert frag.group_stats(torch.tensor([1.0, 2.0, 10.0])) == {"n": 3, "mean": pytest.approx(13 / 3), "median": 2.0}
    assert frag.group_stats(torch.zeros(0)) == {"n": 0, "mean": None, "median": None}
    # even count: the mean of the two middle values, as the "median" threshold takes it
    assert frag.group_stats(torch.tensor([4.0, 1.0, 2.0, 10.0]))["median"] == 3.0
    scores = torch.tensor([0.5, 0.1, 0.9, 0.3])
    assert frag.group_stats(scores)["median"] == frag.resolve_threshold(scores, "median")


def test_class_distribution_is_the_scaled_cosine_softmax(tiny_model_name):
    from segpcl_fast.model.clip import load_model
    model = load_model(tiny_model_name, pretrained=None).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(5, 3, 32, 32, generator=g)
    text = F.normalize(torch.randn(4, 32, generator=g), dim=-1)
    with torch.no_grad():
        _, emb = model.encode_image(images)
        s = float(model.logit_scale())
    want = torch.softmax(s * F.normalize(emb.float(), dim=-1) @ text.T / 2.0, dim=1)
    torch.testing.assert_close(frag.class_distribution(model, images, text, temperature=2.0), want)


def test_tasks_to_analyse():
    assert frag._tasks_to_analyse(None, 4) == [1, 2, 3]
    assert frag._tasks_to_analyse([4, 2, 2], 4) == [1, 3]
    for bad in ([1], [5], [0, 2]):
        with pytest.raises(ConfigError, match="out of range"):
            frag._tasks_to_analyse(bad, 4)
    with pytest.raises(ConfigError, match="at least 2 tasks"):
        frag._tasks_to_analyse(None, 1)


def _row(task, jsd, is_boundary, jsd_anchors, jsd_random):
    jsd, mask = torch.tensor(jsd), torch.tensor(is_boundary)
    return {"task": task, "threshold": 0.5, "score_jsd_correlation": 0.25,
            "boundary": frag.group_stats(jsd[mask]), "core": frag.group_stats(jsd[~mask]),
            "anchors": frag.group_stats(torch.tensor(jsd_anchors)),
            "random_new": frag.group_stats(torch.tensor(jsd_random)),
            "values": {"jsd": jsd.tolist(), "is_boundary": mask.tolist(), "score": [0.0] * len(jsd),
                       "jsd_anchors": list(jsd_anchors), "jsd_random_new": list(jsd_random)}}


def _rows():
    # task 2: boundary (0.4, 0.6) > core (0.1, 0.2, 0.6: mean 0.3, median 0.2); anchors 0.3 > random 0.2
    # task 3: boundary 0.25 == core 0.25 (not >); anchors 0.7 > random 0.5
    return [_row(2, [0.4, 0.1, 0.6, 0.2, 0.6], [True, False, True, False, False], [0.3, 0.3], [0.2]),
            _row(3, [0.25, 0.125, 0.375], [True, False, False], [0.7], [0.5, 0.5])]


def test_pooled_summary_of_hand_made_rows():
    pooled = frag._pooled(_rows())
    assert pooled["boundary"] == {"n": 3, "mean": pytest.approx(1.25 / 3), "median": pytest.approx(0.4)}
    assert pooled["core"] == {"n": 5, "mean": pytest.approx(0.28), "median": pytest.approx(0.2)}
    assert pooled["anchors"]["n"] == 3 and pooled["anchors"]["mean"] == pytest.approx(1.3 / 3)
    assert pooled["random_new"]["n"] == 3 and pooled["random_new"]["mean"] == pytest.approx(0.4)
    assert (pooled["tasks_boundary_gt_core"], pooled["tasks_anchors_gt_random"], pooled["tasks"]) == (1, 2, 2)


def test_table_columns_follow_the_header():
    rows = _rows()
    table = frag.format_fragility_table(rows, frag._pooled(rows), "m", "text_sim")
    header = [h.strip() for h in table.splitlines()[1].split("|")]
    cells = [c.strip() for c in table.splitlines()[3].split("|")]
    r = rows[0]
    want = {"task": "2", "boundary mean": r["boundary"]["mean"], "boundary med": r["boundary"]["median"],
            "core mean": r["core"]["mean"], "core med": r["core"]["median"], "corr(score,JSD)": 0.25,
            "anchors mean": r["anchors"]["mean"], "random mean": r["random_new"]["mean"]}
    for key, value in want.items():
        got = cells[header.index(key)]
        assert got == (value if isinstance(value, str) else f"{value:.4g}"), key
    assert "boundary > core in 1/2 tasks" in table and "anchors > random new-task images in 2/2" in table


def test_replot_writes_the_given_png_path(tmp_path):
    json_path = tmp_path / "fragility.json"
    json_path.write_text(json.dumps({"method": "m", "tasks": _rows()}))
    got = frag.replot_fragility(json_path, tmp_path / "other.png")
    assert got == str(tmp_path / "other.png") and (tmp_path / "other.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "fragility.png").exists()
    assert frag.replot_fragility(json_path) == str(tmp_path / "fragility.png")


def test_histograms_count_every_value_including_exact_zeros(tmp_path, monkeypatch):
    rows = [_row(2, [0.0, 0.1, 0.6, 0.0], [True, False, True, False], [0.0, 0.3, 0.2], [0.5])]
    figs = []
    monkeypatch.setattr(frag, "save_png", lambda fig, path: figs.append(fig) or str(path))
    frag.plot_fragility(rows, tmp_path / "f.png", "m")
    (left, right), = [figs[0].axes]
    counts = [[int(sum(p.get_height() for p in bars)) for bars in ax.containers] for ax in (left, right)]
    assert counts == [[2, 2], [3, 1]]  # boundary, core; anchors, random (zeros in the first bin)
    labels = [t.get_text() for t in right.get_legend().get_texts()]
    assert labels == ["DPGD anchors (n=3, mean=0.167)", "random new-task images (n=1, mean=0.5)"]
    frag.plot_fragility(rows, tmp_path / "f.png", "m", "text_sim", 20.0)  # T=1 and T=20 differ ~100x: say which
    assert figs[1]._suptitle.get_text() == "fragility: m, score=text_sim, temperature=20, tasks 2"


# ----------------------------------------------------------------------------- orchestration

def _must_not_train(cfg):
    raise AssertionError("a trainer was built before the arguments were checked")


@pytest.mark.parametrize("kwargs, match", [({"threshold": "mean"}, "threshold"),
                                           ({"score": "entropy"}, "unknown fragility score"),
                                           ({"tasks": [11]}, r"task\(s\) \[11\] out of range in 2\.\.10|give 1-based tasks in 2\.\.10"),  # the data is not read
                                           ({"num_tasks": 1}, "fragility needs at least 2 tasks")])
def test_bad_arguments_fail_before_training(kwargs, match, monkeypatch, tmp_path):
    from segpcl_fast.api import make_config
    monkeypatch.setattr(frag, "make_trainer", _must_not_train)
    with pytest.raises(ConfigError, match=match):
        frag.fragility(make_config(output_dir=str(tmp_path)), **kwargs)


def test_only_the_wanted_tasks_are_measured_the_others_trained(monkeypatch, tmp_path):
    from segpcl_fast.api import make_config
    log = []
    trainer = SimpleNamespace(scenario=SimpleNamespace(num_tasks=4), train_task=lambda t: log.append(("train", t)),
                              cfg=make_config(output_dir=str(tmp_path), plots=False))
    monkeypatch.setattr(frag, "make_trainer", lambda cfg: trainer)

    def fake_measure(trainer_, t, *args):
        log.append(("measure", t))
        return _rows()[0] | {"task": t + 1}
    monkeypatch.setattr(frag, "measure_task", fake_measure)
    out = frag.fragility(make_config(output_dir=str(tmp_path), plots=False), tasks=[4, 2])
    assert log == [("train", 0), ("measure", 1), ("train", 2), ("measure", 3)]
    assert [r["task"] for r in out["rows"]] == [2, 4] and out["pooled"]["tasks"] == 2


# ----------------------------------------------------------------------------- with a model

def _trainer(small_config, tmp_path, method, **kw):
    cfg = small_config(method, **kw)
    return make_trainer(run_config(cfg, method, tmp_path / method))


@pytest.mark.parametrize("random_start", [False, True])
def test_task_anchors_are_the_learners_anchors(small_config, tmp_path, random_start):
    """build_task_anchors(trainer, t) before task t == the ACGD anchor cache the learner builds at
    the start of task t (segpcl: source anchors, prototypes in the DPGD loss), with DPGD's random
    start too (both draw it from the task seed, not from whatever state the global RNG is in)."""
    trainer = _trainer(small_config, tmp_path, "segpcl", dpgd__k_seed=1, dpgd__random_start=random_start)
    trainer.train_task(0)
    trainer.model.eval()
    torch.rand(7)  # the global RNG is not where train_task(1) will reseed it
    images, _ = stack_dataset(trainer.scenario.train_dataset(1, transform=trainer.test_tf), trainer.device)
    anchors, seed_idx, targets = frag.build_task_anchors(trainer, 1, images)
    seen = {}
    original = trainer.learner.begin_task

    class CacheBuilt(Exception):
        pass

    def capture(*args, **kwargs):
        original(*args, **kwargs)
        seen["cache"] = trainer.learner.anchor_cache
        raise CacheBuilt  # the cache is all this test needs: stop before the training steps
    trainer.learner.begin_task = capture
    with pytest.raises(CacheBuilt):
        trainer.train_task(1)
    cache = seen["cache"]
    assert len(anchors) == len(seed_idx) == 50 and cache.source == "anchors"
    assert torch.equal(targets.cpu(), cache.targets.cpu())
    torch.testing.assert_close(anchors.cpu(), cache.pixels.cpu(), rtol=0, atol=1e-6)
    assert not torch.allclose(anchors, images[seed_idx])  # the PGD steps moved the seeds


def test_measure_task_against_a_plain_recomputation(small_config, tmp_path):
    trainer = _trainer(small_config, tmp_path, "lora_finetune", lr=0.05, dpgd__k_seed=1, seed=1)
    trainer.train_task(0)
    model, dev, tau = trainer.model, trainer.device, 2.0
    model.eval()
    prompts = trainer.learner.class_prompts
    old_set = trainer.scenario.test_dataset_upto(0)
    keep = sorted(torch.randperm(len(old_set), generator=torch.Generator().manual_seed(1))[:30].tolist())
    old_images, _ = stack_dataset(torch.utils.data.Subset(old_set, keep), dev)
    new_images, _ = stack_dataset(trainer.scenario.train_dataset(1, transform=trainer.test_tf), dev)
    anchors, _, _ = frag.build_task_anchors(trainer, 1, new_images)
    pick = torch.randperm(len(new_images), generator=torch.Generator().manual_seed(1001))[:len(anchors)]  # seed 1, t 1
    random_images = new_images[pick]

    def dists(images, n_classes):
        with torch.no_grad():
            text = F.normalize(model.class_embeddings(prompts[:n_classes], device=dev).float(), dim=-1)
            emb = F.normalize(model.encode_image(images)[1].float(), dim=-1)
            return torch.softmax(float(model.logit_scale()) * emb @ text.T / tau, dim=-1), emb, text
    p_old, emb_old, text = dists(old_images, 100)
    sims = emb_old @ text.T
    score = sims[:, 50:].max(dim=1).values - sims[:, :50].max(dim=1).values  # "margin"
    p_anchor, p_random = dists(anchors, 50)[0], dists(random_images, 50)[0]

    row = frag.measure_task(trainer, 1, score="margin", threshold="median", max_old_images=30, temperature=tau)
    trainer.model.eval()
    jsd = frag.jensen_shannon(p_old, dists(old_images, 100)[0])
    jsd_anchor = frag.jensen_shannon(p_anchor, dists(anchors, 50)[0])
    jsd_random = frag.jensen_shannon(p_random, dists(random_images, 50)[0])
    v = row["values"]

    def close(got, want):
        np.testing.assert_allclose(np.asarray(got), want.cpu().numpy(), rtol=1e-4, atol=1e-6)
    close(v["score"], score)
    close(v["jsd"], jsd)
    close(v["jsd_anchors"], jsd_anchor)
    close(v["jsd_random_new"], jsd_random)
    assert jsd.max() > 1e-4 and jsd_anchor.max() > 1e-4  # the training moved the distributions
    thr = float(np.median(score.numpy()))
    assert row["threshold"] == pytest.approx(thr, abs=1e-6)
    assert v["is_boundary"] == (score > row["threshold"]).tolist()
    mask = torch.tensor(v["is_boundary"])
    assert row["boundary"]["mean"] == pytest.approx(float(jsd[mask].mean()), rel=1e-4, abs=1e-7)
    assert row["core"]["mean"] == pytest.approx(float(jsd[~mask].mean()), rel=1e-4, abs=1e-7)
    want_corr = float(np.corrcoef(score.numpy(), jsd.numpy())[0, 1])
    assert row["score_jsd_correlation"] == pytest.approx(want_corr, abs=1e-3)
    assert row["train_steps"] == math.ceil(100 / 32)  # 50 classes x 2 images, batch 32, 1 epoch


# ----------------------------------------------------------------------------- mutation audit (analysis, 2026-12-07)

@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_a_temperature_that_is_not_positive_fails_before_training(temperature, monkeypatch, tmp_path):
    """softmax(logits / temperature) needs temperature > 0: 0 divides by zero and NaN gives NaN distributions;
    both are refused with the negative ones, before a trainer is built."""
    from segpcl_fast.api import make_config
    monkeypatch.setattr(frag, "make_trainer", _must_not_train)
    with pytest.raises(ConfigError, match="fragility temperature must be > 0"):
        frag.fragility(make_config(output_dir=str(tmp_path)), temperature=temperature)


def test_pooled_counts_anchors_above_random_strictly():
    """tasks_anchors_gt_random counts the tasks whose anchors' mean JSD is above the random images' one: a tie
    (0.4 = 0.4) is not a task where the anchors moved more."""
    rows = [_row(2, [0.1, 0.2], [True, False], [0.3, 0.5], [0.4]),   # anchors 0.4 == random 0.4
            _row(3, [0.1, 0.2], [True, False], [0.6], [0.5])]       # anchors 0.6 > random 0.5
    pooled = frag._pooled(rows)
    assert pooled["tasks_anchors_gt_random"] == 1 and pooled["tasks"] == 2
    assert "anchors > random new-task images in 1/2" in frag.format_fragility_table(rows, pooled, "m", "text_sim")


@pytest.mark.parametrize("resume", [True, False])
def test_a_resumed_fragility_keeps_its_tables_until_it_writes_them_again(resume, tables_kept_only_on_resume):
    """A --resume keeps the earlier fragility.{json,txt,png} until it writes them again (its run's checkpoints may
    still refuse its config, as here); a new fragility removes them before it trains."""
    tables_kept_only_on_resume(frag, "fragility", frag.fragility, resume)


def test_max_old_images_none_means_all_as_zero(monkeypatch, tmp_path):
    """max_old_images=None asks for every old-class test image, as 0 does: each measured task gets 0 (no cap)."""
    from segpcl_fast.api import make_config
    trainer = SimpleNamespace(train_task=lambda t: None, cfg=make_config(output_dir=str(tmp_path), plots=False))
    monkeypatch.setattr(frag, "make_trainer", lambda cfg: trainer)
    caps = []
    monkeypatch.setattr(frag, "measure_task", lambda trainer_, t, score, threshold, max_old_images, temperature:
                        caps.append(max_old_images) or _rows()[0] | {"task": t + 1})
    frag.fragility(make_config(output_dir=str(tmp_path), plots=False), tasks=[2], max_old_images=None)
    assert caps == [0]
