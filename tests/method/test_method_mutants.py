"""Checks added by a mutation audit of the method's core (segpcl_fast/method: anchors, losses,
prototypes, learner): each test here fails on a small semantic change (a mutant) of that code which
the rest of tests/method let through, and passes on the code as it is. Quantities are recomputed from
method.md's formulas with torch's own ops on small inputs, or checked as a property.

Covered:
- stage 1: frozen_eval's mode handling (eval inside, each module's own mode restored after), DPGD
  under a caller's no_grad, the fp16 check refusing a single non-finite pixel gradient, the cached
  teacher logits as scaled cosines whatever the text rows' norm;
- stage 3: transfer weights as clamped cosines for prototypes of any norm, dual-path logits' CLIP term
  normalising the text rows;
- learner: begin_task reseeding the anchor draws, the text cache holding the student's (not the
  pretrained) text embeddings, new prototypes = class means of r_S(x), onlyCLIP / clip_logits as
  s · cos, end_task embedding under frozen_eval, ACGD alone or the drift transfer alone still
  building its anchors.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segpcl_fast.config import DPGDConfig
from segpcl_fast.method import anchors as stage1

# ----------------------------------------------------------------------------- stage 1

def test_frozen_eval_puts_every_module_in_eval_mode_and_restores_each_ones_mode():
    """Inside the block: eval mode everywhere (dropout / norm layers off, as the teacher is defined),
    no parameter requiring grad; after it, the mode the model had, eval as well as train."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    model.train()
    with stage1.frozen_eval(model):
        assert not any(m.training for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    model.eval()
    with stage1.frozen_eval(model):
        pass
    assert not any(m.training for m in model.modules())  # an eval-mode model is not switched to train


class _Linear3(nn.Module):
    """A stand-in teacher: r(x) = mean-pooled pixels (3 wide), v = r @ W."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.tensor([[1.0, -0.5, 0.2], [-0.3, 0.8, 0.4]]))

    def raw_features(self, x):
        return x.mean(dim=(2, 3))

    def project(self, r):
        return self.proj(r)

    def encode_image(self, x):
        r = self.raw_features(x)
        return r, self.project(r)


def test_run_dpgd_steps_the_same_under_an_outer_no_grad():
    """The attack differentiates the teacher w.r.t. its input itself: a caller's torch.no_grad() (as
    around any other teacher pass) neither breaks it nor changes the anchors."""
    teacher = _Linear3()
    g = torch.Generator().manual_seed(0)
    seeds = torch.rand(4, 3, 2, 2, generator=g)
    targets = torch.tensor([0, 1, 0, 1])
    text = F.normalize(torch.randn(2, 2, generator=g), dim=-1)
    protos = torch.randn(2, 3, generator=g)
    cfg = DPGDConfig(k_adv=3, eps=0.1, gamma=0.02)
    args = (teacher, seeds, targets, text, protos, 10.0, cfg, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    want = stage1.run_dpgd(*args)
    assert not torch.equal(want, seeds)
    with torch.no_grad():
        got = stage1.run_dpgd(*args)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fp16_dpgd_refuses_a_gradient_with_a_single_non_finite_entry(monkeypatch):
    """One NaN / inf pixel gradient is enough to stop (sign() would step on it), not only all of them."""
    teacher = _Linear3()
    teacher.image_autocast = torch.float16

    def grad_with_one_nan(teacher, x, *a):
        grad = torch.ones_like(x)
        grad[0, 0, 0, 0] = float("nan")
        return grad

    monkeypatch.setattr(stage1, "_fp16_pixel_gradient", grad_with_one_nan)
    seeds = torch.rand(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(FloatingPointError, match="not finite"):
        stage1.run_dpgd(teacher, seeds, torch.tensor([0, 1]), F.normalize(torch.randn(2, 2), dim=-1), None, 10.0,
                        DPGDConfig(k_adv=1), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def test_teacher_outputs_are_scaled_cosines_whatever_the_text_rows_norm():
    """Cached z_T = s · v̄_T(x_a) · U_T^T with U_T's rows unit: teacher_outputs normalises them itself."""
    teacher = _Linear3()
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(5, 3, 2, 2, generator=g)
    text = 3.0 * torch.randn(4, 2, generator=g)  # not unit
    logits, raw = stage1.teacher_outputs(teacher, pixels, text, torch.tensor(7.0), batch_size=2)
    r = pixels.mean(dim=(2, 3))
    torch.testing.assert_close(raw, r)
    want = 7.0 * F.cosine_similarity(teacher.project(r).detach().unsqueeze(1), text.unsqueeze(0), dim=-1)
    torch.testing.assert_close(logits, want)


# ----------------------------------------------------------------------------- stage 3

def test_transfer_weights_are_clamped_cosines_for_prototypes_of_any_norm():
    """w_a,c = max(0, cos(r_T(x_a), p_c)): a cosine, not a dot product, also where ||p_c|| != 1 (the
    weighted mean of transfer_prototypes hides a per-class factor; the weights themselves do not)."""
    from segpcl_fast.method import prototypes as stage3
    g = torch.Generator().manual_seed(2)
    raw = torch.randn(6, 4, generator=g)
    protos = torch.randn(3, 4, generator=g) * torch.tensor([[0.1], [4.0], [9.0]])
    want = F.cosine_similarity(raw.unsqueeze(1), protos.unsqueeze(0), dim=-1).clamp(min=0)
    torch.testing.assert_close(stage3.transfer_weights(raw, protos), want)


def test_dual_path_clip_term_is_a_cosine_for_text_rows_of_any_norm():
    """l(x, c) = s · cos(v_S(x), u_c) + beta · s · cos(r_S(x), p_c): both terms cosines, the text rows
    normalised by dual_path_logits itself (the prototypes' already are)."""
    from segpcl_fast.method import prototypes as stage3
    g = torch.Generator().manual_seed(3)
    emb, raw = torch.randn(3, 4, generator=g), torch.randn(3, 6, generator=g)
    text = torch.randn(5, 4, generator=g) * 5.0
    protos = torch.randn(5, 6, generator=g) * 2.0
    got = stage3.dual_path_logits(emb, raw, text, protos, 10.0, 0.5)
    cos = lambda a, b: F.cosine_similarity(a.unsqueeze(1), b.unsqueeze(0), dim=-1)
    torch.testing.assert_close(got, 10.0 * cos(emb, text) + 0.5 * 10.0 * cos(raw, protos))


# ----------------------------------------------------------------------------- learner

def _bare_learner(cfg=None):
    """A Learner without a model (Learner.__init__ embeds the prompts): for the bookkeeping that does not
    run a tower."""
    from segpcl_fast.config import Config
    from segpcl_fast.method.learner import Learner
    learner = Learner.__new__(Learner)
    learner.cfg = cfg or Config()
    learner.n_seen = learner.n_old = learner.n_new = 0
    learner.anchor_generator = torch.Generator()
    learner.anchor_cache = learner.transfer_cache = learner.graph = None
    return learner


def test_begin_task_reseeds_the_anchor_draws_with_the_tasks_seed():
    """A task's anchor batches follow its seed alone, not what earlier tasks drew (a resumed run draws
    what an unbroken one does)."""
    learner = _bare_learner()
    learner.cfg.tsgr.enabled = False
    torch.randperm(50, generator=learner.anchor_generator)  # an earlier task's draws
    learner.begin_task(0, 3, [], seed=7)
    got = torch.randperm(50, generator=learner.anchor_generator)
    assert torch.equal(got, torch.randperm(50, generator=torch.Generator().manual_seed(7)))


def _tiny_learner(tiny_model_name, n_classes=6):
    from segpcl_fast.config import Config
    from segpcl_fast.method.learner import Learner
    from segpcl_fast.model.clip import load_model
    from segpcl_fast.model.lora import inject_lora
    model = load_model(tiny_model_name, pretrained=None)
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(100.0))
    inject_lora(model, rank=4, alpha=4, targets=("k", "v", "c_fc", "c_proj"), towers=("visual", "text"))
    cfg = Config()
    cfg.dpgd.k_adv, cfg.dpgd.k_seed, cfg.tsgr.k = 2, 2, 3
    prompts = [[f"a good photo of a class {i}."] for i in range(n_classes)]
    return Learner(cfg, model, prompts, torch.device("cpu"))


def _perturb_lora(model, scale=0.05, seed=1):
    from segpcl_fast.model.lora import lora_parameters
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def first_task_done(tiny_model_name):
    """A learner after task 0 (3 classes) whose LoRA moved both towers away from the pretrained model."""
    learner = _tiny_learner(tiny_model_name)
    g = torch.Generator().manual_seed(0)
    img, y = torch.randn(6, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    learner.begin_task(0, 3, [(img, y)])
    _perturb_lora(learner.model)
    learner.end_task(0, 3, [(img, y)])
    return learner, img


def test_inference_uses_the_students_text_embeddings_after_the_task(first_task_done):
    """Stage 3 caches u_S (the trained text tower), not the pretrained u_0, and logits read it."""
    learner, img = first_task_done
    with torch.no_grad():
        u_s = learner.model.class_embeddings(learner.class_prompts[:3], device=torch.device("cpu"))
    assert (u_s - learner.ref_text[:3]).abs().max() > 1e-3  # the text tower did move
    torch.testing.assert_close(learner.text_cache, u_s)
    with torch.no_grad():
        raw, emb = learner.model.encode_image(img)
    s, beta = float(learner.model.logit_scale()), learner.cfg.prototypes.beta
    cos = lambda a, b: F.cosine_similarity(a.unsqueeze(1), b.unsqueeze(0), dim=-1)
    want = s * cos(emb, u_s) + beta * s * cos(raw, learner.prototypes.tensor[:3])
    torch.testing.assert_close(learner.logits(img), want, atol=1e-4, rtol=1e-4)


def test_new_prototypes_are_the_class_means_of_the_students_raw_features(first_task_done):
    """p_c = mean of r_S(x) over the task's images of class c (the stored vectors themselves: the
    dual path's cosine would hide a common scale, the drift transfer does not)."""
    learner, img = first_task_done
    with torch.no_grad():
        raw = learner.model.raw_features(img).float()
    want = torch.stack([raw[[c, c + 3]].mean(0) for c in range(3)])  # labels 0, 1, 2, 0, 1, 2
    torch.testing.assert_close(learner.prototypes.tensor, want, atol=1e-5, rtol=1e-5)


def test_clip_only_logits_and_clip_logits_are_scaled_cosines(first_task_done):
    """beta = 0 (onlyCLIP) and Learner.clip_logits (zero-shot / FWT): s · cos(v_S(x), u_c)."""
    learner, img = first_task_done
    with torch.no_grad():
        _, emb = learner.model.encode_image(img)
    s = float(learner.model.logit_scale())
    text = learner.text_cache
    want = s * F.cosine_similarity(emb.unsqueeze(1), text.unsqueeze(0), dim=-1)
    beta = learner.cfg.prototypes.beta
    learner.cfg.prototypes.beta = 0.0
    try:
        torch.testing.assert_close(learner.logits(img), want, atol=1e-4, rtol=1e-4)
    finally:
        learner.cfg.prototypes.beta = beta
    torch.testing.assert_close(learner.clip_logits(img, text), want, atol=1e-4, rtol=1e-4)


def test_end_task_embeds_with_the_model_in_eval_mode_and_frozen(tiny_model_name):
    """Stage 3 runs the model as stage 1's teacher runs (eval mode, nothing requiring grad), and gives
    the training mode and trainable B back afterwards."""
    learner = _tiny_learner(tiny_model_name)
    g = torch.Generator().manual_seed(0)
    img, y = torch.randn(3, 3, 32, 32, generator=g), torch.tensor([0, 1, 2])
    learner.begin_task(0, 3, [(img, y)])
    model = learner.model
    model.train()
    seen = []
    hook = model.visual.transformer.resblocks[0].register_forward_pre_hook(
        lambda m, a: seen.append((m.training, any(p.requires_grad for p in model.parameters()))))
    try:
        learner.end_task(0, 3, [(img, y)])
    finally:
        hook.remove()
    assert seen and all(s == (False, False) for s in seen)
    assert model.training and all(p.requires_grad for p in learner.trainable_parameters())


def test_either_stage_alone_makes_the_task_build_its_anchors(tiny_model_name):
    """Anchors serve ACGD or the drift transfer: each stage on its own still gets its cache (the
    '+ ACGD' rung of the ablation ladder has no transfer; a transfer-only run has no ACGD)."""
    learner = _tiny_learner(tiny_model_name)
    g = torch.Generator().manual_seed(0)
    img, y = torch.randn(3, 3, 32, 32, generator=g), torch.tensor([0, 1, 2])
    learner.begin_task(0, 3, [(img, y)])
    learner.end_task(0, 3, [(img, y)])
    task1 = [(torch.randn(3, 3, 32, 32, generator=g), y + 3)]
    learner.cfg.prototypes.transfer = False
    learner.begin_task(1, 3, task1)
    assert learner.anchor_cache is not None and learner.transfer_cache is None
    learner.cfg.prototypes.transfer, learner.cfg.acgd.enabled = True, False
    learner.begin_task(1, 3, task1)
    assert learner.anchor_cache is None and learner.transfer_cache is not None


def test_tsgr_at_weight_zero_builds_no_graph():
    """lambda_GR = 0 turns TSGR off as tsgr.enabled=False does: no graph, so no L_GR term computed each
    step (a weight-0 term still costs its kernels, and 0 · NaN would poison L)."""
    learner = _bare_learner()
    learner.ref_text = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(4)), dim=-1)
    learner.cfg.tsgr.weight = 0.0
    learner.begin_task(0, 3, [], seed=0)
    assert learner.graph is None
    learner.cfg.tsgr.weight = 1.0
    learner.begin_task(0, 3, [], seed=0)
    assert learner.graph is not None and len(learner.graph.roots) == 3
