"""Stage 1: seed selection, DPGD, anchor cache (method.md)."""
import copy
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from segpcl_fast.config import DPGDConfig
from segpcl_fast.method import anchors
from segpcl_fast.model.clip import load_model


@pytest.fixture(scope="module")
def teacher(tiny_model_name):
    torch.manual_seed(0)
    return load_model(tiny_model_name, pretrained=None)


def _setup(model, n=6, n_old=3, seed=0):
    """Normalised seed images from [0, 1] pixels (some saturated, so the box binds), old text, prototypes."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, 32, 32, generator=g)
    pixels[:, :, :4] = 1.0
    pixels[:, :, -4:] = 0.0
    mean = torch.tensor(model.image_stats.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.image_stats.std).view(1, 3, 1, 1)
    seeds = (pixels - mean) / std
    old_text = F.normalize(torch.randn(n_old, 32, generator=g), dim=-1)
    prototypes = torch.randn(n_old, 48, generator=g)
    targets = torch.arange(n) % n_old
    return pixels, seeds, targets, old_text, prototypes, mean, std


def _dpgd_value(model, x, targets, old_text, prototypes, lambda_p=1.0):
    with torch.no_grad():
        raw, emb = model.encode_image(x)
        return float(anchors.dpgd_loss(raw, emb, targets, old_text, prototypes, model.logit_scale(), lambda_p))


# ----------------------------------------------------------------------------- seeds

def test_select_seeds_picks_top_scoring_images_per_class():
    old_text = torch.eye(3)[:2]  # u_0 = e0, u_1 = e1
    # Q(x, 0) = x[0], Q(x, 1) = x[1]
    emb = F.normalize(torch.tensor([[0.9, 0.1, 0.1],   # 0: strong for class 0
                                    [0.1, 0.9, 0.1],   # 1: strong for class 1
                                    [0.7, 0.7, 0.1],   # 2: good for both
                                    [0.1, 0.1, 0.9],   # 3: neither
                                    [0.5, 0.2, 0.6]]), dim=-1)  # 4
    idx, tgt = anchors.select_seeds(emb, old_text, k_seed=2)
    scores = emb @ old_text.T
    assert tgt.tolist() == [0, 0, 1, 1]
    assert idx[:2].tolist() == scores[:, 0].argsort(descending=True)[:2].tolist() == [0, 2]
    assert idx[2:].tolist() == scores[:, 1].argsort(descending=True)[:2].tolist() == [1, 2]  # 2 serves both


def test_select_seeds_k_shrinks_to_number_of_images():
    emb = F.normalize(torch.randn(3, 8), dim=-1)
    text = F.normalize(torch.randn(4, 8), dim=-1)
    idx, tgt = anchors.select_seeds(emb, text, k_seed=5)
    assert idx.shape == tgt.shape == (12,)
    for c in range(4):
        assert sorted(idx[tgt == c].tolist()) == [0, 1, 2]


def test_select_seeds_rejects_width_mismatch():
    with pytest.raises(ValueError, match="width"):
        anchors.select_seeds(torch.randn(3, 8), torch.randn(2, 4), 5)


# ----------------------------------------------------------------------------- DPGD

def test_normalised_bounds_map_pixel_box_and_radius():
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 2.0)
    eps_n, gamma_n, lo, hi = anchors.normalised_bounds(mean, std, eps=0.1, gamma=0.01)
    torch.testing.assert_close(eps_n, torch.tensor([0.2, 0.4, 0.05]))
    torch.testing.assert_close(gamma_n, torch.tensor([0.02, 0.04, 0.005]))
    torch.testing.assert_close(lo, torch.tensor([-1.0, -1.0, 0.0]))
    torch.testing.assert_close(hi, torch.tensor([1.0, 3.0, 0.5]))


def test_dpgd_loss_equals_formula_summed_over_anchors():
    g = torch.Generator().manual_seed(1)
    raw, emb = torch.randn(4, 6, generator=g), torch.randn(4, 5, generator=g)
    text = F.normalize(torch.randn(3, 5, generator=g), dim=-1)
    protos = torch.randn(3, 6, generator=g)
    y = torch.tensor([0, 2, 1, 2])
    s, lam = 10.0, 0.7
    expected = 0.0
    for a in range(4):
        logits = s * F.normalize(emb[a], dim=0) @ text.T
        ce = -torch.log_softmax(logits, 0)[y[a]]
        cos = raw[a] @ protos[y[a]] / (raw[a].norm() * protos[y[a]].norm())
        expected += float(ce + lam * (1 - cos))
    got = anchors.dpgd_loss(raw, emb, y, text, protos, s, lam)
    assert math.isclose(float(got), expected, rel_tol=1e-5)
    ce_only = anchors.dpgd_loss(raw, emb, y, text, None, s, lam)
    assert float(ce_only) < float(got)


def test_pgd_respects_eps_ball_and_pixel_box(teacher):
    pixels, seeds, targets, text, protos, mean, std = _setup(teacher)
    cfg = DPGDConfig(k_adv=6, gamma=2 / 255, eps=4 / 255)  # 6 * 2/255 > 4/255: the ball binds
    adv = anchors.run_dpgd(teacher, seeds, targets, text, protos, teacher.logit_scale(), cfg,
                           teacher.image_stats.mean, teacher.image_stats.std)
    adv_pixels = adv * std + mean
    delta = adv_pixels - pixels
    assert float(delta.abs().max()) <= cfg.eps + 1e-5
    assert float(delta.abs().max()) >= cfg.eps - 1e-5  # some pixels reach the rim
    assert float(adv_pixels.min()) >= -1e-5 and float(adv_pixels.max()) <= 1 + 1e-5
    # the saturated rows cannot go past the box
    assert float(adv_pixels[:, :, :4].max()) <= 1 + 1e-5 and float(adv_pixels[:, :, -4:].min()) >= -1e-5


def test_pgd_lowers_dpgd_loss(teacher):
    _, seeds, targets, text, protos, _, _ = _setup(teacher)
    cfg = DPGDConfig(k_adv=10)
    before = _dpgd_value(teacher, seeds, targets, text, protos)
    adv = anchors.run_dpgd(teacher, seeds, targets, text, protos, teacher.logit_scale(), cfg,
                           teacher.image_stats.mean, teacher.image_stats.std)
    after = _dpgd_value(teacher, adv, targets, text, protos)
    assert after < before


def test_pgd_matches_torchattacks_targeted_pgd(teacher):
    """lambda_p = 0: DPGD is targeted PGD on CE (descent), as torchattacks.PGD in targeted mode."""
    if importlib.util.find_spec("torchattacks") is None:  # installed but broken: an error, not a skip
        pytest.skip("torchattacks is not installed (pip install -e '.[test]')")
    import torchattacks
    pixels, seeds, targets, text, _, mean, std = _setup(teacher)
    cfg = DPGDConfig(k_adv=5, gamma=1 / 255, eps=3 / 255, lambda_p=0.0)
    ours = anchors.run_dpgd(teacher, seeds, targets, text, None, teacher.logit_scale(), cfg,
                            teacher.image_stats.mean, teacher.image_stats.std) * std + mean

    class PixelModel(torch.nn.Module):
        def forward(self, x):
            _, emb = teacher.encode_image((x - mean) / std)
            return teacher.logit_scale() * F.normalize(emb, dim=-1) @ text.T

    attack = torchattacks.PGD(PixelModel(), eps=cfg.eps, alpha=cfg.gamma, steps=cfg.k_adv, random_start=False)
    attack.set_mode_targeted_by_label(quiet=True)
    ref = attack(pixels, targets)
    mismatch = ((ours - ref).abs() > 1e-5).float().mean()
    assert float(mismatch) < 1e-3  # only sign flips of near-zero gradients may differ


def test_pgd_result_does_not_depend_on_batch_size(teacher):
    _, seeds, targets, text, protos, _, _ = _setup(teacher)
    args = (teacher, seeds, targets, text, protos, teacher.logit_scale())
    stats = (teacher.image_stats.mean, teacher.image_stats.std)
    a = anchors.run_dpgd(*args, DPGDConfig(k_adv=3, batch_size=64), *stats)
    b = anchors.run_dpgd(*args, DPGDConfig(k_adv=3, batch_size=2), *stats)
    assert float(((a - b).abs() > 1e-5).float().mean()) < 1e-3


def _random_start_only(teacher, seed: int):
    """(pixels, anchors, cfg) of DPGD with random start and no PGD step, in pixel space."""
    pixels, seeds, targets, text, protos, mean, std = _setup(teacher)
    cfg = DPGDConfig(k_adv=0, random_start=True)
    adv = anchors.run_dpgd(teacher, seeds, targets, text, protos, 1.0, cfg, teacher.image_stats.mean,
                           teacher.image_stats.std, generator=torch.Generator().manual_seed(seed)) * std + mean
    return pixels, adv, cfg


def test_random_start_stays_in_ball_and_box(teacher):
    pixels, adv, cfg = _random_start_only(teacher, seed=3)
    assert float((adv - pixels).abs().max()) <= cfg.eps + 1e-5
    assert float((adv - pixels).abs().mean()) > cfg.eps / 4  # actually moved
    assert float(adv.min()) >= -1e-5 and float(adv.max()) <= 1 + 1e-5


def test_teacher_gets_no_param_grads_and_state_is_restored(teacher):
    model = copy.deepcopy(teacher)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    _, seeds, targets, text, protos, _, _ = _setup(model)
    anchors.run_dpgd(model, seeds, targets, text, protos, model.logit_scale(), DPGDConfig(k_adv=2),
                     model.image_stats.mean, model.image_stats.std)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert model.training


# ----------------------------------------------------------------------------- cache

def test_cache_holds_teacher_outputs_and_teacher_is_not_run_afterwards(teacher):
    _, seeds, targets, text, protos, _, _ = _setup(teacher)
    calls = []
    hook = teacher.visual.transformer.resblocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        cfg = DPGDConfig(k_adv=2, batch_size=4)  # 2 batches
        cache = anchors.build_anchor_cache(teacher, seeds, targets, text, protos, teacher.logit_scale(), cfg,
                                           teacher.image_stats.mean, teacher.image_stats.std)
        assert len(calls) == 2 * 2 + 2  # K_adv forwards per PGD batch, then one caching pass per batch
        n_build = len(calls)
        g = torch.Generator().manual_seed(0)
        for _ in range(3):  # what a training step needs from the cache
            batch = anchors.sample_anchor_batch(cache, 4, g)
            student_logits = batch.teacher_logits + torch.randn_like(batch.teacher_logits)
            from segpcl_fast.method.losses import acgd_loss
            acgd_loss(student_logits, batch.teacher_logits, 20.0)
        assert len(calls) == n_build
    finally:
        hook.remove()
    with torch.no_grad():
        raw, emb = teacher.encode_image(cache.pixels)
    torch.testing.assert_close(cache.teacher_raw, raw)
    torch.testing.assert_close(cache.teacher_logits, teacher.logit_scale() * F.normalize(emb, dim=-1) @ text.T)
    assert torch.equal(cache.targets, targets)
    assert not torch.equal(cache.pixels, seeds)


def test_seed_source_skips_pgd(teacher):
    _, seeds, targets, text, protos, _, _ = _setup(teacher)
    cache = anchors.build_anchor_cache(teacher, seeds, targets, text, protos, 100.0, DPGDConfig(),
                                       teacher.image_stats.mean, teacher.image_stats.std, source="seeds")
    assert torch.equal(cache.pixels, seeds) and cache.source == "seeds"
    for source in ("new_data", "folder"):  # raw images, kept as they are and labelled with their source
        cache = anchors.build_anchor_cache(teacher, seeds, torch.full_like(targets, -1), text, protos, 100.0,
                                           DPGDConfig(), teacher.image_stats.mean, teacher.image_stats.std,
                                           source=source)
        assert torch.equal(cache.pixels, seeds) and cache.source == source
    with pytest.raises(ValueError, match="source"):
        anchors.build_anchor_cache(teacher, seeds, targets, text, protos, 100.0, DPGDConfig(),
                                   teacher.image_stats.mean, teacher.image_stats.std, source="zeroshot")


def test_cache_state_dict_round_trip_and_sampling():
    cache = anchors.AnchorCache(torch.randn(5, 3, 4, 4), torch.arange(5), torch.randn(5, 2), torch.randn(5, 7))
    back = anchors.AnchorCache.from_state_dict(cache.state_dict()).to("cpu")
    for name in ("pixels", "targets", "teacher_logits", "teacher_raw"):
        assert torch.equal(getattr(back, name), getattr(cache, name))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a, b = anchors.sample_anchor_batch(cache, 3, g1), anchors.sample_anchor_batch(cache, 3, g2)
    assert torch.equal(a.targets, b.targets) and len(set(a.targets.tolist())) == 3  # no repeats
    torch.testing.assert_close(a.teacher_raw, cache.teacher_raw[a.targets])  # rows stay aligned
    everything = anchors.sample_anchor_batch(cache, 50, g1)
    assert sorted(everything.targets.tolist()) == list(range(5))
    with pytest.raises(ValueError, match="one row per anchor"):
        anchors.AnchorCache(torch.randn(5, 3, 4, 4), torch.arange(4), torch.randn(5, 2), torch.randn(5, 7))


def test_a_steps_anchor_inputs_are_the_sampled_batchs_two_fields():
    """The training step gathers pixels and teacher logits alone: the same anchors, in the same order, as
    sample_anchor_batch draws from the same generator state, and the generator advanced alike."""
    cache = anchors.AnchorCache(torch.randn(9, 3, 4, 4), torch.arange(9), torch.randn(9, 2), torch.randn(9, 7))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for n in (4, 9, 20):
        batch = anchors.sample_anchor_batch(cache, n, g1)
        pixels, logits = anchors.sample_anchor_inputs(cache, n, g2, "cpu")
        assert torch.equal(pixels, batch.pixels) and torch.equal(logits, batch.teacher_logits)
    assert torch.equal(g1.get_state(), g2.get_state())
    with pytest.raises(ValueError, match="n must be >= 1"):
        anchors.sample_anchor_inputs(cache, 0, g1)


def test_lambda_p_weights_the_visual_term(teacher):
    """lambda_p = 0 with prototypes is the CE-only attack; other lambda_p values change the anchors."""
    _, seeds, targets, text, protos, _, _ = _setup(teacher)
    stats = (teacher.image_stats.mean, teacher.image_stats.std)

    def attack(prototypes, lambda_p):
        cfg = DPGDConfig(k_adv=3, lambda_p=lambda_p)
        return anchors.run_dpgd(teacher, seeds, targets, text, prototypes, teacher.logit_scale(), cfg, *stats)

    ce_only = attack(None, 1.0)
    torch.testing.assert_close(attack(protos, 0.0), ce_only, atol=1e-6, rtol=0)
    with_visual = attack(protos, 1.0)
    assert float((with_visual - ce_only).abs().max()) > 1e-3  # the visual term moves the anchors
    assert float((attack(protos, 50.0) - with_visual).abs().max()) > 1e-3  # and its weight matters


def test_random_start_is_uniform_in_the_whole_ball(teacher):
    """Random start draws delta in [-eps, eps] (both signs), not [0, eps]."""
    pixels, adv, cfg = _random_start_only(teacher, seed=4)
    free = pixels[:, :, 4:-4]  # rows away from the saturated bands
    delta = (adv[:, :, 4:-4] - free)[(free > cfg.eps) & (free < 1 - cfg.eps)]  # the box cannot bind here
    assert delta.numel() > 1000
    assert float(delta.min()) < -cfg.eps / 2 and float(delta.max()) > cfg.eps / 2
    assert abs(float(delta.mean())) < cfg.eps / 10  # E[delta] = 0 for uniform in [-eps, eps]
    assert 0.4 < float((delta < 0).float().mean()) < 0.6


def test_host_to_device_stages_cpu_tensors_in_pinned_memory_for_cuda(monkeypatch):
    """A blocking CPU -> CUDA copy synchronises the stream (a stall per training step when the anchor
    indices come from the CPU generator): the copy must be pinned + non_blocking. No GPU here, so the
    two Tensor methods are spied on; a CPU target keeps the plain copy."""
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    real_to = torch.Tensor.to

    def spy_to(self, *args, **kwargs):
        calls.append(("to", str(args[0]), kwargs.get("non_blocking", False)))
        return real_to(self, "cpu")
    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    index = torch.arange(3)
    assert torch.equal(anchors.host_to_device(index, "cuda:0"), index)
    assert calls == ["pin", ("to", "cuda:0", True)]
    calls.clear()
    anchors.host_to_device(index, "cpu")
    assert calls == [("to", "cpu", False)]
    calls.clear()  # the sampled batch's index goes through it
    cache = anchors.AnchorCache(torch.randn(5, 3, 4, 4), torch.arange(5), torch.randn(5, 2), torch.randn(5, 7))
    monkeypatch.setattr(anchors.AnchorCache, "device", property(lambda self: torch.device("cuda", 0)))
    anchors.sample_anchor_batch(cache, 3, torch.Generator().manual_seed(0))
    assert calls[:2] == ["pin", ("to", "cuda:0", True)]


def test_anchor_inputs_from_a_cpu_cache_are_gathered_straight_into_pinned_memory(monkeypatch):
    """acgd.source=new_data / folder keep the anchor pixels on the CPU: a GPU step's anchor batch is gathered
    into a pinned buffer (one host copy) and copied from there non_blocking, with the rows sample_anchor_batch
    draws from the same generator state. No GPU here: the pinned allocation and Tensor.to are spied on."""
    staged, moves = [], []
    monkeypatch.setattr(anchors, "_pinned_empty", lambda shape, dtype: staged.append(torch.empty(shape, dtype=dtype))
                        or staged[-1])
    real_to = torch.Tensor.to

    def spy_to(self, *args, **kwargs):
        moves.append((self.data_ptr(), str(args[0]), kwargs.get("non_blocking", False)))
        return real_to(self, "cpu")
    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)  # the index's own staging
    cache = anchors.AnchorCache(torch.randn(7, 3, 4, 4), torch.arange(7) % 3, torch.randn(7, 3), torch.randn(7, 5))
    pixels, logits = anchors.sample_anchor_inputs(cache, 4, torch.Generator().manual_seed(1), "cuda:0")
    expected = anchors.sample_anchor_batch(cache, 4, torch.Generator().manual_seed(1))
    assert torch.equal(pixels, expected.pixels) and torch.equal(logits, expected.teacher_logits)
    assert [tuple(t.shape) for t in staged] == [(4, 3, 4, 4), (4, 3)]
    assert (staged[0].data_ptr(), "cuda:0", True) in moves and (staged[1].data_ptr(), "cuda:0", True) in moves
    assert pixels.data_ptr() == staged[0].data_ptr()  # the buffer itself went, not a copy of it


# ----------------------------------------------------------------------------- DPGD under fp16 autocast

def _confident_setup(model, logit_scale):
    """Seeds whose target is the teacher's own top class at a high logit scale: CE's gradient is tiny (it
    shrinks with 1 - p_c), the case PGD drives every anchor towards."""
    _, seeds, _, text, protos, _, _ = _setup(model)
    with torch.no_grad():
        _, emb = model.encode_image(seeds)
        targets = (F.normalize(emb, dim=-1) @ text.T).argmax(dim=1)
    return seeds, targets, text, protos, logit_scale


def _pixel_gradient(model, seeds, targets, text, protos, scale, ours, lambda_p=1.0):
    with anchors.frozen_eval(model), torch.enable_grad():
        x = seeds.clone().requires_grad_(True)
        if ours:
            return anchors._fp16_pixel_gradient(model, x, targets, text, protos, scale, lambda_p)
        raw, emb = model.encode_image(x)
        return torch.autograd.grad(anchors.dpgd_loss(raw, emb, targets, text, protos, scale, lambda_p), x)[0]


def test_fp16_pixel_gradient_is_the_exact_gradient_over_its_anchors_norm_at_r(teacher):
    """In fp32 (no autocast) the fp16 path's gradient is the plain one times DPGD_FP16_GRAD_NORM over, per
    anchor, the norm of the loss's gradient at r(x): a positive factor, so sign() and PGD's step are unchanged."""
    model = copy.deepcopy(teacher)
    model.set_precision(image="fp32")
    seeds, targets, text, protos, scale = _confident_setup(model, 100.0)
    plain = _pixel_gradient(model, seeds, targets, text, protos, scale, ours=False)
    with torch.enable_grad():
        r = model.raw_features(seeds).detach().requires_grad_(True)
        (g_r,) = torch.autograd.grad(anchors.dpgd_loss(r, model.project(r), targets, text, protos, scale, 1.0), r)
    ours = _pixel_gradient(model, seeds, targets, text, protos, scale, ours=True)
    torch.testing.assert_close(ours, plain * (anchors.DPGD_FP16_GRAD_NORM / g_r.norm(dim=1).view(-1, 1, 1, 1)),
                               rtol=1e-4, atol=1e-5)


def test_fp16_dpgd_keeps_the_gradient_signs_that_plain_fp16_flushes_to_zero(teacher):
    """CE alone (lambda_p = 0) at s = 300 on confident anchors: the fp32 pixel gradient is small enough that
    a plain backward through the fp16 tower flushes much of it to zero (sign 0: those pixels stop moving).
    The fp16 path (its r(x) gradient scaled to unit norm per anchor) keeps fp32's signs."""
    model = copy.deepcopy(teacher)
    model.set_precision(image="fp32")
    args = _confident_setup(model, 300.0)
    g32 = _pixel_gradient(model, *args, ours=False, lambda_p=0.0)
    assert float((g32 == 0).float().mean()) == 0.0
    model.set_precision(image="fp16")
    plain16 = _pixel_gradient(model, *args, ours=False, lambda_p=0.0)
    ours16 = _pixel_gradient(model, *args, ours=True, lambda_p=0.0)
    assert float((plain16 == 0).float().mean()) > 0.3  # the underflow this path exists for (0.67 here)
    assert float((ours16.sign() == g32.sign()).float().mean()) > 0.99  # 0.9998 here


def test_fp16_dpgd_runs_the_tower_under_fp16_and_lowers_the_loss(teacher):
    model = copy.deepcopy(teacher)
    model.set_precision(image="fp16")
    _, seeds, targets, text, protos, _, _ = _setup(model)
    seen = set()
    hook = model.visual.transformer.resblocks[0].register_forward_pre_hook(
        lambda module, args: seen.add(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")))
    adv = anchors.run_dpgd(model, seeds, targets, text, protos, model.logit_scale(), DPGDConfig(k_adv=10),
                           model.image_stats.mean, model.image_stats.std)
    hook.remove()
    assert seen == {torch.float16} and adv.dtype == torch.float32
    model.set_precision(image="fp32")
    assert _dpgd_value(model, adv, targets, text, protos) < _dpgd_value(model, seeds, targets, text, protos)


def test_fp16_dpgd_refuses_an_overflowed_gradient(teacher):
    model = copy.deepcopy(teacher)
    model.set_precision(image="fp16")
    with torch.no_grad():
        model.visual.conv1.weight.mul_(1e6)  # patch embeddings past fp16's 65504
    _, seeds, targets, text, protos, _, _ = _setup(model)
    with pytest.raises(FloatingPointError, match="not finite under fp16 autocast.*run.precision=bf16"):
        anchors.run_dpgd(model, seeds, targets, text, protos, model.logit_scale(), DPGDConfig(k_adv=1),
                         model.image_stats.mean, model.image_stats.std)
