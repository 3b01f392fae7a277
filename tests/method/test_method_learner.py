"""The Learner wires the three stages together (method.md): which tensors reach which stage.

Two tiny tasks of 3 classes each on the random-weight 'test-tiny' CLIP (32 px): task 0 has no
anchors, task 1 (t = 2 in method.md) has 3 old classes, DPGD anchors and a TSGR graph. Each check
recomputes the quantity by hand from the model and compares.
"""
import math

import pytest

import torch
import torch.nn.functional as F

from segpcl_fast.config import Config
from segpcl_fast.method import anchors as stage1
from segpcl_fast.method import losses as stage2
from segpcl_fast.method import prototypes as stage3
from segpcl_fast.method.learner import Learner
from segpcl_fast.model.clip import AUTOCAST_DTYPES, CLIPModel, load_model
from segpcl_fast.model.lora import inject_lora, lora_parameters

N_OLD = N_NEW = 3
N_TOTAL = N_OLD + N_NEW
TSGR_K = 3  # < N_TOTAL - 1, so k itself (not the shrunken k) sets the neighbourhood size


def _perturb_lora(model, scale=0.05, seed=1):
    """Stand-in for training: nonzero B on both towers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(scale * torch.randn(p.shape, generator=g))


def _first_task_done(tiny_model_name, perturb=True, tsgr_reference="pretrained"):
    """A learner that finished task 0 (B nonzero when perturb: the student no longer equals the
    pretrained reference), plus task 1's images and ordered labels."""
    model = load_model(tiny_model_name, pretrained=None)
    with torch.no_grad():  # s = 100 as in OpenAI's weights (random init gives 1 / 0.07)
        model.clip.logit_scale.fill_(math.log(100.0))
    inject_lora(model, rank=4, alpha=4, targets=("k", "v", "c_fc", "c_proj"), towers=("visual", "text"))
    prompts = [[f"a good photo of a class {i}."] for i in range(N_TOTAL)]
    cfg = Config()
    cfg.dpgd.k_adv, cfg.dpgd.k_seed, cfg.tsgr.k, cfg.tsgr.reference = 2, 2, TSGR_K, tsgr_reference
    learner = Learner(cfg, model, prompts, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    img1, y1 = torch.randn(6, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    learner.begin_task(0, N_NEW, [(img1, y1)])
    if perturb:
        _perturb_lora(model)
    learner.end_task(0, N_NEW, [(img1, y1)])
    img2, y2 = torch.randn(6, 3, 32, 32, generator=g), y1 + N_OLD
    return learner, img2, y2


def _second_task_started(tiny_model_name, perturb=True, tsgr_reference="pretrained"):
    learner, img, y = _first_task_done(tiny_model_name, perturb, tsgr_reference)
    learner.begin_task(1, N_NEW, [(img, y)])
    return learner, img, y


def _kl_distill(z_s, z_t, tau):
    """tau^2 * mean_a KL(softmax(z_t / tau) || softmax(z_s / tau)), written out (fp64: at tau = 20 the KL
    is a small difference of O(1) log-probabilities)."""
    z_s, z_t = z_s.double(), z_t.double()
    p_t = F.softmax(z_t / tau, dim=-1)
    return float(tau ** 2 * (p_t * (F.log_softmax(z_t / tau, -1) - F.log_softmax(z_s / tau, -1))).sum(-1).mean())


# ----------------------------------------------------------------------------- stage 1

def test_tsgr_graph_rooted_at_new_classes_with_k_neighbours_in_reference_space(tiny_model_name):
    learner, _, _ = _second_task_started(tiny_model_name)
    graph = learner.graph
    assert graph.roots.tolist() == list(range(N_OLD, N_TOTAL))  # only task 1's classes are roots
    assert N_TOTAL > TSGR_K + 1
    assert graph.neighbors.shape == (N_NEW, min(TSGR_K, N_TOTAL - 1)) == (N_NEW, TSGR_K)
    # neighbours and q_0 from the fixed pretrained text, not from the (trained) student text
    ref = F.normalize(learner.ref_text[:N_TOTAL].float(), dim=-1)
    for r, root in enumerate(range(N_OLD, N_TOTAL)):
        cos = ref[root] @ ref.T
        cos[root] = -math.inf
        want = cos.topk(TSGR_K).indices
        assert graph.neighbors[r].tolist() == want.tolist()
        torch.testing.assert_close(graph.ref_logprob[r], F.log_softmax(cos[want] / learner.cfg.tsgr.tau, -1),
                                   atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        student = stage2.TSGRGraph.build(learner.text_embeddings(N_TOTAL), list(range(N_OLD, N_TOTAL)),
                                         k=TSGR_K, tau=learner.cfg.tsgr.tau)
    # the student text really moved: a graph built from it would have another q_0
    assert float((student.ref_logprob - graph.ref_logprob).abs().max()) > 1e-3


def test_tsgr_reference_teacher_keeps_the_text_space_of_the_tasks_start(tiny_model_name):
    """tsgr.reference=teacher: the subgraphs and q_0 come from the model's own text at the task's start (the end of
    task t-1), so L_GR is 0 before the first step and grows once the student moves; the default (pretrained)
    starts task 2 with L_GR > 0 once task 1 trained."""
    learner, img, y = _second_task_started(tiny_model_name, tsgr_reference="teacher")
    with torch.no_grad():
        start = learner.text_embeddings(N_TOTAL)
    want = stage2.TSGRGraph.build(start, list(range(N_OLD, N_TOTAL)), k=TSGR_K, tau=learner.cfg.tsgr.tau)
    assert torch.equal(learner.graph.neighbors, want.neighbors)
    torch.testing.assert_close(learner.graph.ref_logprob, want.ref_logprob, atol=0, rtol=0)
    pretrained = stage2.TSGRGraph.build(learner.ref_text[:N_TOTAL], list(range(N_OLD, N_TOTAL)), k=TSGR_K,
                                        tau=learner.cfg.tsgr.tau)
    assert float((pretrained.ref_logprob - learner.graph.ref_logprob).abs().max()) > 1e-3  # not the pretrained one
    with torch.no_grad():
        _, parts = learner.loss(img, y)
    assert float(parts["gr"]) < 1e-6
    _perturb_lora(learner.model, seed=5)
    with torch.no_grad():
        _, parts = learner.loss(img, y)
    assert float(parts["gr"]) > 1e-4
    default, img, y = _second_task_started(tiny_model_name)
    with torch.no_grad():
        _, parts = default.loss(img, y)
    assert float(parts["gr"]) > 1e-4


def test_dpgd_gets_old_prototypes_and_seeds_are_cosine_top_k(tiny_model_name, monkeypatch):
    learner, img, y = _first_task_done(tiny_model_name)
    # image embeddings with very different norms (a positive per-image factor): cosine and dot
    # product rank the images differently, and the seeds must follow the cosine (v̄_T · u_T,c)
    img = img + torch.linspace(-2.0, 2.0, img.shape[0]).view(-1, 1, 1, 1)
    original = CLIPModel.encode_image

    def spread_norms(self, images):
        raw, emb = original(self, images)
        return raw, emb * torch.exp(3.0 * images.mean(dim=(1, 2, 3))).unsqueeze(1)

    calls = []
    build = stage1.build_anchor_cache

    def spy(teacher, seeds_pixels, targets, old_text, prototypes, *args, **kwargs):
        calls.append((seeds_pixels.clone(), targets.clone(), None if prototypes is None else prototypes.clone()))
        return build(teacher, seeds_pixels, targets, old_text, prototypes, *args, **kwargs)

    monkeypatch.setattr(CLIPModel, "encode_image", spread_norms)
    monkeypatch.setattr(stage1, "build_anchor_cache", spy)
    old_protos = learner.prototypes.tensor[:N_OLD].clone()
    learner.begin_task(1, N_NEW, [(img, y)])
    assert calls
    with torch.no_grad():
        _, emb = learner.model.encode_image(img)
        text = learner.model.class_embeddings(learner.class_prompts[:N_OLD])
    k = learner.cfg.dpgd.k_seed
    cos_top = (F.normalize(emb, dim=-1) @ F.normalize(text, dim=-1).T).topk(k, dim=0).indices.T.reshape(-1)
    dot_top = (emb @ text.T).topk(k, dim=0).indices.T.reshape(-1)
    assert cos_top.tolist() != dot_top.tolist()  # the norms do change the ranking
    for pixels, targets, prototypes in calls:
        assert torch.equal(pixels, img[cos_top])
        assert targets.tolist() == [c for c in range(N_OLD) for _ in range(k)]
        # DPGD's visual term sees p_c of every old class
        assert prototypes is not None and prototypes.shape == old_protos.shape
        assert torch.equal(prototypes, old_protos)


# ----------------------------------------------------------------------------- stage 2

def test_acgd_is_zero_at_task_start_and_positive_once_the_student_moves(tiny_model_name):
    learner, img, y = _second_task_started(tiny_model_name)
    assert learner.anchor_cache is not None and len(learner.anchor_cache) == N_OLD * learner.cfg.dpgd.k_seed
    with torch.no_grad():
        _, parts = learner.loss(img, y)
    assert float(parts["acgd"]) < 1e-4  # student == teacher before any step
    _perturb_lora(learner.model, seed=5)
    with torch.no_grad():
        _, parts = learner.loss(img, y)
    assert float(parts["acgd"]) > 1e-3


def test_acgd_equals_hand_distillation_on_cached_anchors(tiny_model_name):
    learner, img, y = _second_task_started(tiny_model_name)
    _perturb_lora(learner.model, scale=0.2, seed=5)
    state = learner.anchor_generator.get_state()
    with torch.no_grad():
        _, parts = learner.loss(img, y)
        # the same anchors the step drew
        g = torch.Generator()
        g.set_state(state)
        batch = stage1.sample_anchor_batch(learner.anchor_cache, img.shape[0], g)
        _, emb = learner.model.encode_image(batch.pixels)
        text = F.normalize(learner.model.class_embeddings(learner.class_prompts[:N_OLD]), dim=-1)
        z_s = learner.model.logit_scale() * F.normalize(emb, dim=-1) @ text.T
    tau = learner.cfg.acgd.tau
    want = _kl_distill(z_s, batch.teacher_logits, tau)
    assert want > 1e-3 and abs(_kl_distill(z_s, batch.teacher_logits, 1.0) - want) > 0.01 * want
    assert math.isclose(float(parts["acgd"]), want, rel_tol=2e-4)


def test_cls_loss_is_over_current_classes_by_default(tiny_model_name):
    learner, img, y = _second_task_started(tiny_model_name)
    assert learner.cfg.optim.cls_over == "current"
    with torch.no_grad():
        _, parts = learner.loss(img, y)
        _, emb = learner.model.encode_image(img)
        text = F.normalize(learner.model.class_embeddings(learner.class_prompts[:N_TOTAL]), dim=-1)
        logits = learner.model.logit_scale() * F.normalize(emb, dim=-1) @ text.T
    want = F.cross_entropy(logits[:, N_OLD:], y - N_OLD)
    over_seen = F.cross_entropy(logits, y)
    assert abs(float(want) - float(over_seen)) > 1e-3  # the two options differ here
    assert math.isclose(float(parts["cls"]), float(want), rel_tol=1e-4)


def test_cls_loss_over_seen_classes_when_asked(tiny_model_name):
    learner, img, y = _second_task_started(tiny_model_name)
    learner.cfg.optim.cls_over = "seen"
    with torch.no_grad():
        _, parts = learner.loss(img, y)
        _, emb = learner.model.encode_image(img)
        text = F.normalize(learner.model.class_embeddings(learner.class_prompts[:N_TOTAL]), dim=-1)
        logits = learner.model.logit_scale() * F.normalize(emb, dim=-1) @ text.T
    assert math.isclose(float(parts["cls"]), float(F.cross_entropy(logits, y)), rel_tol=1e-4)


def _lora_b(model, tower):
    return [p for n, p in model.named_parameters() if "lora_B" in n and (n.startswith("clip.visual.") == (tower == "visual"))]


def test_acgd_and_tsgr_train_what_their_formulas_train(tiny_model_name):
    """The gradients of the learner's L_ACGD reach both towers' B as the hand formula's do (a detach
    on either side of z_S would stop one), and L_GR's reach the text tower's B as TSGR's on the
    student text embeddings do."""
    learner, img, y = _second_task_started(tiny_model_name)
    _perturb_lora(learner.model, scale=0.2, seed=5)
    model, tau = learner.model, learner.cfg.acgd.tau
    visual, text_b = _lora_b(model, "visual"), _lora_b(model, "text")
    assert visual and text_b
    state = learner.anchor_generator.get_state()
    _, parts = learner.loss(img, y)
    got = torch.autograd.grad(parts["acgd"], visual + text_b, allow_unused=True)
    g = torch.Generator()
    g.set_state(state)
    batch = stage1.sample_anchor_batch(learner.anchor_cache, img.shape[0], g)
    _, emb = model.encode_image(batch.pixels)
    text = F.normalize(model.class_embeddings(learner.class_prompts[:N_OLD]), dim=-1)
    z_s = model.logit_scale() * F.normalize(emb, dim=-1) @ text.T
    p_t = F.softmax(batch.teacher_logits / tau, dim=-1)
    hand = tau ** 2 * (p_t * (F.log_softmax(batch.teacher_logits / tau, -1) - F.log_softmax(z_s / tau, -1))).sum(-1).mean()
    want = torch.autograd.grad(hand, visual + text_b)
    for tower, n in (("visual", len(visual)), ("text", len(text_b))):
        pairs = list(zip(got, want))[:n] if tower == "visual" else list(zip(got, want))[len(visual):]
        assert all(a is not None for a, _ in pairs), f"L_ACGD gives the {tower} tower no gradient"
        a, b = torch.cat([x.flatten() for x, _ in pairs]), torch.cat([x.flatten() for _, x in pairs])
        assert float(b.norm()) > 0 and float((a - b).norm()) < 1e-3 * float(b.norm()), tower
    _, parts = learner.loss(img, y)
    got = torch.autograd.grad(parts["gr"], text_b, allow_unused=True)
    want = torch.autograd.grad(stage2.tsgr_loss(learner.text_embeddings(N_TOTAL), learner.graph), text_b)
    assert all(a is not None for a in got), "L_GR gives the text tower no gradient"
    a, b = torch.cat([x.flatten() for x in got]), torch.cat([x.flatten() for x in want])
    assert float(b.norm()) > 0 and float((a - b).norm()) < 1e-4 * float(b.norm())


def test_each_step_draws_as_many_anchors_as_images_or_acgd_anchor_batch(tiny_model_name, monkeypatch):
    learner, img, y = _first_task_done(tiny_model_name)
    learner.cfg.dpgd.k_seed = 3  # 9 anchors for a batch of 6 images
    learner.begin_task(1, N_NEW, [(img, y)])
    assert len(learner.anchor_cache) == 9 and img.shape[0] == 6
    drawn = []
    sample = stage1.sample_anchor_inputs
    monkeypatch.setattr(stage1, "sample_anchor_inputs",
                        lambda cache, n, g=None, device=None: drawn.append(n) or sample(cache, n, g, device))
    with torch.no_grad():
        learner.loss(img, y)
        learner.cfg.acgd.anchor_batch = 4
        learner.loss(img, y)
    assert drawn == [6, 4]


# ----------------------------------------------------------------------------- stage 3

def test_end_task_moves_old_prototypes_by_the_anchor_drift(tiny_model_name):
    learner, img, y = _second_task_started(tiny_model_name)
    cache = learner.transfer_cache
    assert cache is not None
    learner.model.eval()
    with torch.no_grad():
        student_raw = learner.model.raw_features(cache.pixels).float()
    c = torch.linspace(-0.3, 0.3, student_raw.shape[1])
    # pretend the teacher saw r_S - c: every anchor drifted by exactly +c
    learner.transfer_cache = stage1.AnchorCache(cache.pixels, cache.targets, cache.teacher_logits,
                                                student_raw - c, source=cache.source)
    old = learner.prototypes.tensor[:N_OLD].clone()
    weights = stage3.transfer_weights(student_raw - c, old)
    assert bool((weights.sum(0) > 0).all())  # every old class has some anchor weight
    learner.end_task(1, N_NEW, [(img, y)])
    torch.testing.assert_close(learner.prototypes.tensor[:N_OLD], old + c, atol=1e-4, rtol=1e-4)
    assert len(learner.prototypes) == N_TOTAL


def test_end_task_weighs_the_drift_by_prototypes_weight_rule(tiny_model_name):
    """Anchors drifted by different amounts: relu_cos weights them by cos(r_T, p_c), uniform by 1
    (every old class moves by the mean drift): the rule in the config must be the one applied."""
    learner, img, y = _second_task_started(tiny_model_name)
    cache = learner.transfer_cache
    learner.model.eval()
    with torch.no_grad():
        student_raw = learner.model.raw_features(cache.pixels).float()
    c = torch.linspace(-0.3, 0.3, student_raw.shape[1])
    drift = c * torch.arange(1, len(student_raw) + 1, dtype=torch.float32).unsqueeze(1)  # anchor a drifts (a+1) c
    learner.transfer_cache = stage1.AnchorCache(cache.pixels, cache.targets, cache.teacher_logits,
                                                student_raw - drift, source=cache.source)
    learner.cfg.prototypes.weight_rule = "uniform"
    old = learner.prototypes.tensor[:N_OLD].clone()
    relu_cos = stage3.transfer_prototypes(old, student_raw - drift, student_raw, "relu_cos")
    learner.end_task(1, N_NEW, [(img, y)])
    want = old + drift.mean(0)
    torch.testing.assert_close(learner.prototypes.tensor[:N_OLD], want, atol=1e-4, rtol=1e-4)
    assert float((relu_cos - want).abs().max()) > 1e-2  # the other rule would not give it


# ----------------------------------------------------------------------------- inference

def test_dual_path_logits_use_the_model_logit_scale(tiny_model_name):
    learner, img, _ = _first_task_done(tiny_model_name)
    s = learner.model.logit_scale()
    assert abs(float(s) - 1.0) > 0.5 and learner.cfg.prototypes.beta > 0
    got = learner.logits(img)
    with torch.no_grad():
        raw, emb = learner.model.encode_image(img)
    beta, text, protos = learner.cfg.prototypes.beta, learner.text_cache, learner.prototypes.tensor[:N_OLD]
    want = torch.empty(img.shape[0], N_OLD)
    for i in range(img.shape[0]):
        for c in range(N_OLD):
            want[i, c] = (s * F.cosine_similarity(emb[i], text[c], dim=0)
                          + beta * s * F.cosine_similarity(raw[i], protos[c], dim=0))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_dpgd_random_start_follows_the_task_seed_not_the_global_rng(tiny_model_name):
    """dpgd.random_start draws from a generator seeded with begin_task's seed: the same seed gives
    the same anchors whatever the global RNG did before, another seed gives other anchors."""
    learner, img, y = _first_task_done(tiny_model_name)
    learner.cfg.dpgd.random_start = True
    learner.cfg.dpgd.k_adv = 0  # the anchors are the random start itself
    caches = []
    for global_seed, task_seed in [(1, 5), (2, 5), (1, 6)]:
        torch.manual_seed(global_seed)
        learner.begin_task(1, N_NEW, [(img, y)], seed=task_seed)
        caches.append(learner.anchor_cache.pixels.clone())
    assert torch.equal(caches[0], caches[1])
    assert not torch.allclose(caches[0], caches[2])


def test_stack_batches_is_torch_cat_and_frees_the_batches_as_it_copies():
    from segpcl_fast.method.learner import stack_batches
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, 3, 4, 4, generator=g) for n in (5, 1, 7, 2)]
    expected = torch.cat(batches)
    given = list(batches)
    got = stack_batches(given)
    assert torch.equal(got, expected) and got.dtype == expected.dtype
    assert given == []  # emptied: its batches can be freed while the result fills
    # while copying, each batch already copied is gone (only the list held it): never two copies
    import weakref
    fresh = [torch.randn(n, 3, 4, 4, generator=g) for n in (5, 1, 7, 2)]
    refs = [weakref.ref(b) for b in fresh]
    alive = []

    class Watched(list):
        def pop(self, *args):
            alive.append(sum(r() is not None for r in refs))
            return super().pop(*args)
    watched = Watched(fresh)
    del fresh
    stack_batches(watched)
    assert alive == [4, 3, 2, 1]
    assert torch.equal(stack_batches([torch.arange(3)]), torch.arange(3))
    try:
        stack_batches([])
    except ValueError as e:
        assert "no batches" in str(e)
    else:
        raise AssertionError("an empty task must be an error")


def test_a_checkpoints_reference_text_is_checked_with_the_tolerance_of_its_text_precision(tiny_model_name):
    """Learner.load_state_dict refuses a checkpoint whose B = 0 text embeddings are another model's. bf16
    text rounds differently under another attention / GEMM kernel (another device: here the CPU's math
    SDPA instead of its flash kernel moves them by about 4e-4), which must not be refused; other prompts
    must be, at either precision."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = load_model(tiny_model_name, pretrained=None)
    inject_lora(model, rank=4, alpha=4, targets=("k", "v"), towers=("visual", "text"))
    prompts = [[f"a good photo of a class {i}."] for i in range(N_TOTAL)]
    for precision in ("bf16", "fp16", "fp32"):
        cfg = Config()
        cfg.run.text_precision = precision
        model.text_autocast = AUTOCAST_DTYPES[precision]
        state = Learner(cfg, model, prompts, torch.device("cpu")).state_dict()
        with sdpa_kernel([SDPBackend.MATH]):  # another kernel: bf16 / fp16 embeddings move by rounding only
            other_kernel = Learner(cfg, model, prompts, torch.device("cpu"))
        moved = (other_kernel.ref_text - state["ref_text"]).abs().max().item()
        assert (moved > 1e-4) == (precision != "fp32"), moved  # rounding moves bf16 / fp16 text only
        other_kernel.load_state_dict(state)
        other_prompts = Learner(cfg, model, [[f"a photo of a thing {i}."] for i in range(N_TOTAL)],
                                torch.device("cpu"))
        with pytest.raises(RuntimeError, match="reference text embeddings differ"):
            other_prompts.load_state_dict(state)


def _round_to_tf32(t):
    """fp32 -> the nearest TF32 value (10-bit mantissa, ties to even), as fp32; other tensors as they are."""
    if not (isinstance(t, torch.Tensor) and t.dtype == torch.float32):
        return t
    bits = t.contiguous().view(torch.int32)
    rounded = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return rounded.view(torch.float32).reshape(t.shape)


def _tf32_gemms():
    """A dispatch mode that runs every fp32 GEMM (mm, bmm, addmm's and baddbmm's products) on operands
    rounded to TF32, accumulating in fp32: what cuBLAS does with TF32 on, emulated on the CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode
    aten = torch.ops.aten

    class TF32GEMMs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (aten.mm.default, aten.bmm.default):
                args = tuple(map(_round_to_tf32, args))
            elif func in (aten.addmm.default, aten.baddbmm.default):
                args = (args[0], _round_to_tf32(args[1]), _round_to_tf32(args[2]), *args[3:])
            return func(*args, **(kwargs or {}))
    return TF32GEMMs()


def test_round_to_tf32_keeps_ten_mantissa_bits():
    x = torch.tensor([1 + 2 ** -10, 1 + 2 ** -11, 1 + 3 * 2 ** -11, -(1 + 2 ** -12), 3.0])
    assert _round_to_tf32(x).tolist() == [1 + 2 ** -10, 1.0, 1 + 2 ** -9, -1.0, 3.0]  # ties to even


def test_fp32_reference_text_made_with_tf32_gemms_is_accepted(tiny_model_name):
    """A run whose fp32 text tower ran its GEMMs on TF32 (run.tf32, the GPU presets; or a process that
    turned TF32 on, as open_clip's training does) stores reference embeddings a few 1e-4 away from the
    same model's without TF32 (the CPU, another setting): resuming or evaluating it there is the same
    model and must not be refused (the fp32 tolerance was 1e-4); other prompts still are."""
    model = load_model(tiny_model_name, pretrained=None)
    inject_lora(model, rank=4, alpha=4, targets=("k", "v"), towers=("visual", "text"))
    prompts = [[f"a good photo of a class {i}.", f"a photo of the number {i}."] for i in range(N_TOTAL)]
    cfg = Config()
    with _tf32_gemms():
        state = Learner(cfg, model, prompts, torch.device("cpu")).state_dict()
    exact = Learner(cfg, model, prompts, torch.device("cpu"))
    moved = (exact.ref_text - state["ref_text"]).abs().max().item()
    assert 1e-4 < moved < 2.5e-3 / 4, moved  # past the old tolerance, well inside the new one
    exact.load_state_dict(state)
    other = Learner(cfg, model, [[f"a photo of a thing {i}."] for i in range(N_TOTAL)], torch.device("cpu"))
    with pytest.raises(RuntimeError, match="reference text embeddings differ"):
        other.load_state_dict(state)


def test_a_checkpoints_reference_image_embeddings_are_checked_with_the_tolerance_of_its_precision(tiny_model_name):
    """The probe images' B = 0 embeddings (Learner.ref_image) identify the image tower: another attention
    kernel (bf16 rounding: about 2e-3 here) or TF32 GEMMs (fp32: about 2e-4) are the same tower and must
    load; another image tower (the same text tower) must not, at either precision; a checkpoint from
    before ref_image was stored loads without the check."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from segpcl_fast.method.learner import probe_images
    model = load_model(tiny_model_name, pretrained=None)
    inject_lora(model, rank=4, alpha=4, targets=("k", "v"), towers=("visual", "text"))
    prompts = [[f"a good photo of a class {i}."] for i in range(N_TOTAL)]
    probes = probe_images(model.image_stats)
    assert probes.shape == (4, 3, model.image_stats.size, model.image_stats.size)
    assert torch.equal(probes, probe_images(model.image_stats)) and probes.std() > 0.1
    for precision in ("bf16", "fp16", "fp32"):
        cfg = Config()
        cfg.run.precision = precision
        model.image_autocast = AUTOCAST_DTYPES[precision]
        state = Learner(cfg, model, prompts, torch.device("cpu")).state_dict()
        assert torch.allclose(state["ref_image"].norm(dim=-1), torch.ones(4))
        with sdpa_kernel([SDPBackend.MATH]):
            other_kernel = Learner(cfg, model, prompts, torch.device("cpu"))
        with _tf32_gemms():
            tf32 = Learner(cfg, model, prompts, torch.device("cpu"))
        moved = [(x.ref_image - state["ref_image"]).abs().max().item() for x in (other_kernel, tf32)]
        assert max(moved) > 1e-4 and max(moved) < (2e-2 if precision != "fp32" else 2.5e-3) / 4, moved
        other_kernel.load_state_dict(state)
        tf32.load_state_dict(state)
        saved = [p.detach().clone() for p in model.clip.visual.parameters()]
        with torch.no_grad():
            for p in model.clip.visual.parameters():
                p.add_(0.05 * torch.randn_like(p))
            other_tower = Learner(cfg, model, prompts, torch.device("cpu"))
            for p, keep in zip(model.clip.visual.parameters(), saved):
                p.copy_(keep)
        with pytest.raises(RuntimeError, match="reference image embeddings differ") as err:
            other_tower.load_state_dict(state)
        assert err.value.tower == "image"
        other_tower.load_state_dict({k: v for k, v in state.items() if k != "ref_image"})  # an older checkpoint
    model.image_autocast = None


def test_stage1_teacher_is_the_model_frozen_not_a_copy_with_the_same_anchors(tiny_model_name, monkeypatch):
    """Stage 1 runs the model itself as the teacher (frozen, eval mode, both restored after), not a deep
    copy (a second model's memory and its own compiled graphs); the anchor caches equal those a deep-copied
    teacher builds, bit for bit."""
    import copy

    learner, img, y = _first_task_done(tiny_model_name)
    twin = copy.deepcopy(learner)
    copies = []
    real_deepcopy = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda obj, *a: copies.append(type(obj).__name__) or real_deepcopy(obj, *a))
    learner.model.train()
    learner.begin_task(1, N_NEW, [(img, y)])
    assert "CLIPModel" not in copies
    assert learner.model.training and all(p.requires_grad for p in lora_parameters(learner.model))
    monkeypatch.setattr(copy, "deepcopy", real_deepcopy)

    @__import__("contextlib").contextmanager
    def copied_teacher(model):  # the old stage 1: a frozen deep copy
        teacher = real_deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        yield teacher
    monkeypatch.setattr(stage1, "frozen_eval", copied_teacher)
    twin.begin_task(1, N_NEW, [(img, y)])
    for field in ("pixels", "targets", "teacher_logits", "teacher_raw"):
        assert torch.equal(getattr(learner.anchor_cache, field), getattr(twin.anchor_cache, field)), field
