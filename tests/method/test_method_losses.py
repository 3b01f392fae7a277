"""Stage 2: L_cls, ACGD, TSGR graph and loss, total loss (method.md)."""
import math

import pytest
import torch
import torch.nn.functional as F

from segpcl_fast.config import Config
from segpcl_fast.method import losses


def _unit2d(degrees):
    rad = torch.tensor(degrees, dtype=torch.float32) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=-1)


def test_cls_loss_is_cross_entropy_of_scaled_cosines():
    g = torch.Generator().manual_seed(0)
    img, text = torch.randn(4, 6, generator=g), torch.randn(3, 6, generator=g)
    y = torch.tensor([2, 0, 1, 2])
    expected = 0.0
    for i in range(4):
        cos = torch.stack([F.cosine_similarity(img[i], text[c], dim=0) for c in range(3)])
        expected += float(-torch.log_softmax(50.0 * cos, 0)[y[i]]) / 4
    assert math.isclose(float(losses.cls_loss(img, text, y, 50.0)), expected, rel_tol=1e-5)


def test_acgd_zero_when_student_equals_teacher_positive_otherwise():
    z_t = torch.randn(6, 5) * 10
    assert abs(float(losses.acgd_loss(z_t.clone(), z_t, 20.0))) < 1e-6
    z_s = z_t + torch.randn(6, 5) * 5
    got = float(losses.acgd_loss(z_s, z_t, 20.0))
    p_t, log_p_s = F.softmax(z_t / 20, -1), F.log_softmax(z_s / 20, -1)
    expected = 400.0 * float((p_t * (p_t.log() - log_p_s)).sum(-1).mean())
    assert got > 0 and math.isclose(got, expected, rel_tol=1e-4)
    with pytest.raises(ValueError, match="old classes"):
        losses.acgd_loss(z_s[:, :4], z_t, 20.0)


def test_tsgr_graph_neighbours_on_constructed_embeddings():
    # classes on the unit circle at 0, 10, 30, 90, 180 degrees; new classes: rows 3 and 4
    ref = _unit2d([0, 10, 30, 90, 180])
    graph = losses.TSGRGraph.build(ref, [3, 4], k=2, tau=0.05)
    assert graph.roots.tolist() == [3, 4]
    # 90: nearest are 30 (60 deg), 10 (80 deg); 180: nearest are 90 (90 deg), 30 (150 deg)
    assert graph.neighbors[0].tolist() == [2, 1]
    assert graph.neighbors[1].tolist() == [3, 2]
    cos = torch.tensor([[math.cos(math.radians(60)), math.cos(math.radians(80))],
                        [math.cos(math.radians(90)), math.cos(math.radians(150))]])
    torch.testing.assert_close(graph.ref_logprob, F.log_softmax(cos / 0.05, dim=-1), atol=1e-5, rtol=1e-5)


def test_tsgr_root_excluded_even_with_duplicate_embedding():
    ref = _unit2d([0, 0, 45, 90])  # class 1 duplicates class 0
    graph = losses.TSGRGraph.build(ref, [0], k=2, tau=0.1)
    assert graph.neighbors.tolist() == [[1, 2]]


def test_tsgr_k_shrinks_and_single_class_graph_is_empty():
    ref = _unit2d([0, 40, 80])
    graph = losses.TSGRGraph.build(ref, [1, 2], k=10, tau=0.05)
    assert graph.neighbors.shape == (2, 2)
    assert sorted(graph.neighbors[0].tolist()) == [0, 2]
    one = losses.TSGRGraph.build(_unit2d([30]), [0], k=10, tau=0.05)
    assert one.empty and len(one) == 0
    student = torch.randn(1, 2, requires_grad=True)
    loss = losses.tsgr_loss(student, one)
    assert float(loss) == 0.0
    with pytest.raises(ValueError, match="0..1"):
        losses.TSGRGraph.build(ref[:2], [2], k=3, tau=0.05)
    with pytest.raises(TypeError, match="integer row indices"):  # refused, not truncated to row 1
        losses.TSGRGraph.build(ref, [1.5], k=3, tau=0.05)
    from_range = losses.TSGRGraph.build(ref, range(1, 3), k=10, tau=0.05)
    assert torch.equal(from_range.neighbors, graph.neighbors) and from_range.roots.dtype == torch.int64


def test_tsgr_loss_zero_at_reference_and_equals_formula_otherwise():
    g = torch.Generator().manual_seed(0)
    ref = F.normalize(torch.randn(8, 5, generator=g), dim=-1)
    graph = losses.TSGRGraph.build(ref, [5, 6, 7], k=3, tau=0.05)
    assert abs(float(losses.tsgr_loss(ref, graph))) < 1e-6
    student = ref + 0.3 * torch.randn(8, 5, generator=g)
    got = float(losses.tsgr_loss(student, graph))
    s = F.normalize(student, dim=-1)
    expected = 0.0
    for r, root in enumerate(graph.roots.tolist()):
        nbrs = graph.neighbors[r]
        q0 = F.softmax(ref[root] @ ref[nbrs].T / 0.05, -1)
        log_qs = F.log_softmax(s[root] @ s[nbrs].T / 0.05, -1)
        expected += float((q0 * (q0.log() - log_qs)).sum()) / 3
    assert got > 0 and math.isclose(got, expected, rel_tol=1e-4)
    with pytest.raises(ValueError, match="8 seen classes"):
        losses.tsgr_loss(student[:6], graph)


def test_total_loss_weights_and_skips_none():
    cfg = Config()
    a, b, c = torch.tensor(1.0), torch.tensor(0.5), torch.tensor(2.0)
    assert float(losses.total_loss(a, b, c, cfg)) == pytest.approx(1.0 + 5.0 * 0.5 + 1.0 * 2.0)
    assert float(losses.total_loss(a, None, c, cfg)) == pytest.approx(3.0)
    cfg.tsgr.weight = 0.25
    assert float(losses.total_loss(a, None, c, cfg)) == pytest.approx(1.5)


def test_non_finite_loss_names_the_term():
    cfg = Config()
    with pytest.raises(FloatingPointError, match=r"L_ACGD is nan at step 7"):
        losses.total_loss(torch.tensor(1.0), torch.tensor(float("nan")), torch.tensor(0.1), cfg, step=7)
    with pytest.raises(FloatingPointError, match=r"L_GR is inf"):
        losses.total_loss(torch.tensor(1.0), None, torch.tensor(float("inf")), cfg)
    total = losses.total_loss(torch.tensor(1.0), torch.tensor(float("nan")), None, cfg, check=False)
    assert math.isnan(float(total))


def test_tsgr_is_zero_before_training_under_bf16_autocast(tiny_model_name):
    """Student text = reference text while B = 0, also when the step runs under bf16 autocast."""
    from segpcl_fast.config import Config
    from segpcl_fast.method.learner import Learner
    from segpcl_fast.model.clip import load_model
    from segpcl_fast.model.lora import inject_lora
    model = load_model(tiny_model_name, pretrained=None)
    inject_lora(model, rank=4, alpha=4, targets=("k", "v", "c_fc", "c_proj"), towers=("visual", "text"))
    prompts = [[f"a good photo of a class {i}."] for i in range(12)]
    learner = Learner(Config(), model, prompts, torch.device("cpu"))
    learner.n_old, learner.n_new = 6, 6
    learner.graph = losses.TSGRGraph.build(learner.ref_text, list(range(6, 12)), k=5, tau=0.05)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([6, 7, 8, 9])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert learner.text_embeddings(12).dtype == torch.float32
        _, parts = learner.loss(images, labels)
    assert float(parts["gr"].detach()) < 1e-6


def test_tsgr_graph_depends_on_directions_only():
    """N(c) and q_0 use cosines: rescaling the reference rows by positive factors changes nothing."""
    g = torch.Generator().manual_seed(0)
    ref = F.normalize(torch.randn(8, 5, generator=g), dim=-1)
    scales = torch.tensor([0.2, 3.0, 0.5, 5.0, 1.0, 0.1, 2.0, 7.0]).unsqueeze(1)
    plain = losses.TSGRGraph.build(ref, [5, 6, 7], k=3, tau=0.05)
    scaled = losses.TSGRGraph.build(ref * scales, [5, 6, 7], k=3, tau=0.05)
    dot = (ref * scales)[[5, 6, 7]] @ (ref * scales).T
    dot[torch.arange(3), torch.tensor([5, 6, 7])] = -math.inf
    assert not torch.equal(dot.topk(3, dim=-1).indices, plain.neighbors)  # dot products would rank otherwise
    assert torch.equal(scaled.neighbors, plain.neighbors)
    torch.testing.assert_close(scaled.ref_logprob, plain.ref_logprob, atol=1e-5, rtol=1e-5)


def test_tsgr_loss_skips_the_per_step_index_check_its_graph_made_unneeded(monkeypatch):
    """The TSGR graph's indices are validated when it is built; the op's own range check (about 8
    small launches on CUDA) would run every training step: tsgr_loss turns it off, a direct call keeps it."""
    from segpcl_fast import ops
    calls = []
    real = ops.knn_subgraph_kl
    monkeypatch.setattr(ops, "knn_subgraph_kl", lambda *a, **k: calls.append(k) or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    ref = F.normalize(torch.randn(8, 6, generator=g), dim=-1)
    graph = losses.TSGRGraph.build(ref, [5, 6, 7], k=3, tau=0.05)
    losses.tsgr_loss(ref + 0.1 * torch.randn(8, 6, generator=g), graph)
    assert [c["check_indices"] for c in calls] == [False]
    bad = graph.neighbors.clone()
    bad[0, 0] = 8
    with pytest.raises(RuntimeError, match="row indices of emb"):
        real(ref, graph.roots, bad, graph.ref_logprob, 0.05)


def test_tsgr_graph_builds_its_backward_plan_once_and_the_loss_passes_it(monkeypatch):
    """The graph is fixed for a task, so the fused backward's scatter plan is built with it (not each
    step); tsgr_loss hands it over, and student rows past the graph's classes (no subgraph touches
    them) leave the loss and every gradient as they were."""
    from segpcl_fast import ops
    g = torch.Generator().manual_seed(1)
    ref = F.normalize(torch.randn(9, 6, generator=g), dim=-1)
    graph = losses.TSGRGraph.build(ref, [6, 7, 8], k=3, tau=0.05)
    assert torch.equal(graph.plan, ops.knn_backward_plan(graph.roots, graph.neighbors, 9))
    assert torch.equal(graph.to("cpu").plan, graph.plan)
    assert losses.TSGRGraph.build(ref[:1], [0], k=3, tau=0.05).plan is None  # empty graph
    calls = []
    real = ops.knn_subgraph_kl
    monkeypatch.setattr(ops, "knn_subgraph_kl", lambda *a, **k: calls.append(k) or real(*a, **k))
    student = (ref + 0.2 * torch.randn(9, 6, generator=g)).requires_grad_(True)
    loss = losses.tsgr_loss(student, graph)
    assert calls[0]["plan"] is graph.plan
    (grad,) = torch.autograd.grad(loss, student)
    longer = torch.cat([student, torch.randn(2, 6, generator=g)]).detach().requires_grad_(True)
    loss_longer = losses.tsgr_loss(longer, graph)
    (grad_longer,) = torch.autograd.grad(loss_longer, longer)
    assert torch.equal(loss_longer, loss) and torch.equal(grad_longer[:9], grad)
    assert (grad_longer[9:] == 0).all()


def test_acgd_tau_ceiling_is_where_fp32_loses_the_kl():
    """acgd.tau is refused above MAX_ACGD_TAU: there tau^2 * KL of two near-uniform softmaxes (log-probs about
    -log C, differences about 1/tau) is lost to fp32 rounding; a run at 1e6 logged negative ACGD losses. At
    the ceiling the gradient (what trains) still holds; the logged value is rounding-bound well before it."""
    from segpcl_fast.api import make_config
    from segpcl_fast.config import MAX_ACGD_TAU, ConfigError
    torch.manual_seed(0)
    teacher = torch.randn(64, 90) * 10
    student = teacher + 0.5 * torch.randn_like(teacher)

    def errors(tau):  # relative error of the fp32 loss and of its gradient, against float64
        got = student.clone().requires_grad_(True)
        exact = student.double().clone().requires_grad_(True)
        loss, loss_exact = losses.acgd_loss(got, teacher, tau), losses.acgd_loss(exact, teacher.double(), tau)
        loss.backward()
        loss_exact.backward()
        loss, loss_exact = float(loss.detach()), float(loss_exact.detach())
        return (abs(loss - loss_exact) / loss_exact,
                float((got.grad.double() - exact.grad).norm() / exact.grad.norm()))
    assert errors(20)[0] < 1e-3 and errors(100)[0] < 1e-2  # the default, and the sweeps' range
    assert errors(MAX_ACGD_TAU)[1] < 2e-3
    loss_error, grad_error = errors(100 * MAX_ACGD_TAU)
    assert loss_error > 1 and grad_error > 1e-2
    assert make_config(acgd__tau=MAX_ACGD_TAU).acgd.tau == MAX_ACGD_TAU
    with pytest.raises(ConfigError, match=r"acgd\.tau.*in \(0, 1000\] \(above 1000 the fp32 KL .* rounding\)"):
        make_config(acgd__tau=10 * MAX_ACGD_TAU)
