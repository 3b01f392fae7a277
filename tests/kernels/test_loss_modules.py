"""ops.AnchorKLLoss and ops.SubgraphKLLoss: the loss ops as modules, held to the functional ops, the
references and the trainer's TSGR graph, on both paths (CPU reference; Triton under the interpreter
or on CUDA)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segpcl_fast import ops
from segpcl_fast.method import losses

TAU_A, TAU_T = 20.0, 0.05


def _grad(fn, x):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


@pytest.mark.parametrize("teacher_is_logprob", [False, True])
def test_anchor_kl_loss_is_the_op(teacher_is_logprob, device, triton_backend):
    g = torch.Generator().manual_seed(0)
    student = (30 * torch.randn(9, 70, generator=g)).to(device)
    teacher = (30 * torch.randn(9, 70, generator=g)).to(device)
    if teacher_is_logprob:
        teacher = F.log_softmax(teacher / TAU_A, dim=-1)
    module = ops.AnchorKLLoss(TAU_A, teacher_is_logprob=teacher_is_logprob)
    loss, grad = _grad(lambda s: module(s, teacher), student)
    assert ops.last_choice()["anchor_kl"] == "triton"
    want_loss, want_grad = _grad(lambda s: ops.anchor_kl(s, teacher, TAU_A, teacher_is_logprob), student)
    assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)
    ref_loss, ref_grad = _grad(lambda s: ops.anchor_kl_reference(s, teacher, TAU_A, teacher_is_logprob), student)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert "tau=20.0" in repr(module) and dict(module.state_dict()) == {}


def test_anchor_kl_loss_checks_a_logprob_teacher_once(graph_breaks):
    """teacher_is_logprob=True given raw logits: one ValueError at the first eager forward (the kernel would
    take exp(z_T) as unnormalised probabilities, a wrong loss without an error); log-probabilities pass,
    bf16-rounded ones and rows with zero-probability (-inf) classes too; checked once per module (one host
    sync), not inside torch.compile."""
    g = torch.Generator().manual_seed(0)
    student, raw = (30 * torch.randn(5, 12, generator=g) for _ in range(2))
    logprob = F.log_softmax(raw / TAU_A, dim=-1)
    with pytest.raises(ValueError, match=r"teacher_is_logprob=True but a teacher row's logsumexp is .*not "
                                         r"log-probabilities\. Pass teacher_is_logprob=False"):
        ops.AnchorKLLoss(TAU_A, teacher_is_logprob=True)(student, raw)
    with pytest.raises(ValueError, match="not log-probabilities"):  # off by a constant: not normalised either
        ops.AnchorKLLoss(TAU_A, teacher_is_logprob=True)(student, logprob + 0.2)
    zero_class = logprob.clone()
    zero_class[:, 0] = float("-inf")
    zero_class = zero_class.log_softmax(-1)
    module = ops.AnchorKLLoss(TAU_A, teacher_is_logprob=True)
    for teacher in (logprob, logprob.bfloat16(), zero_class):
        torch.testing.assert_close(ops.AnchorKLLoss(TAU_A, teacher_is_logprob=True)(student, teacher),
                                   ops.anchor_kl_reference(student, teacher, TAU_A, True))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        module(student, logprob)
    reads = [e.name for e in prof.events() if e.name in ("aten::item", "aten::_local_scalar_dense", "aten::nonzero")]
    assert reads == []  # one host read (a tolist of two values), no item() or boolean index besides
    module(student, raw)  # checked once: later calls pay no sync (the docstring says so)
    for nothing_to_check in (student[:0], torch.full_like(raw, float("nan"))):  # no anchors; no finite row
        unchecked = ops.AnchorKLLoss(TAU_A, teacher_is_logprob=True)
        unchecked(nothing_to_check, nothing_to_check)
        with pytest.raises(ValueError, match="not log-probabilities"):  # the check is still to come
            unchecked(student, raw)
    old = ops.AnchorKLLoss(TAU_A, teacher_is_logprob=True)
    state = old.__dict__.copy()
    del state["_teacher_checked"]  # a module pickled whole before the check existed: checked at its next call
    revived = ops.AnchorKLLoss.__new__(ops.AnchorKLLoss)
    revived.__setstate__(state)
    with pytest.raises(ValueError, match="not log-probabilities"):
        revived(student, raw)
    under_vmap = ops.AnchorKLLoss(TAU_A, teacher_is_logprob=True)  # torch.func cannot read a value back: no check
    per_anchor = torch.func.vmap(torch.func.grad(lambda s, t: under_vmap(s[None], t[None])))(student, logprob)
    torch.testing.assert_close(per_anchor, torch.func.vmap(torch.func.grad(
        lambda s, t: ops.anchor_kl_reference(s[None], t[None], TAU_A, True)))(student, logprob))
    with pytest.raises(ValueError, match="not log-probabilities"):  # ... left for the first eager call
        under_vmap(student, raw)
    compiled = torch.compile(ops.AnchorKLLoss(TAU_A, teacher_is_logprob=True), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(student, logprob), ops.anchor_kl_reference(student, logprob, TAU_A, True))
    assert graph_breaks() == 0


def _reference_and_student(classes, dim, seed, device):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(classes, dim, generator=g)
    student = ref + 0.3 * torch.randn(classes, dim, generator=g)
    return ref.to(device), student.to(device)


def test_subgraph_kl_loss_is_the_trainers_tsgr_loss(device, triton_backend):
    """from_reference builds the subgraphs TSGRGraph.build does (both call ops.knn_subgraphs), and the
    module's loss and gradient are tsgr_loss's bit for bit; the reference's within fp32 rounding."""
    ref, student = _reference_and_student(30, 16, seed=1, device=device)
    new_classes = [24, 25, 26, 27, 28, 29]
    module = ops.SubgraphKLLoss.from_reference(ref, new_classes, k=5, tau=TAU_T)
    graph = losses.TSGRGraph.build(ref, new_classes, 5, TAU_T)
    assert torch.equal(module.neighbors, graph.neighbors) and torch.equal(module.ref_logprob, graph.ref_logprob)
    assert torch.equal(module.plan, graph.plan)
    loss, grad = _grad(module, student)
    assert ops.last_choice()["knn_subgraph_kl"] == "triton"
    want_loss, want_grad = _grad(lambda e: losses.tsgr_loss(e, graph), student)
    assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)
    with ops.backend("reference"):
        ref_loss, ref_grad = _grad(module, student)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert loss > 0 and module(ref) < 1e-6  # the student equal to the reference preserves every subgraph


def test_subgraph_kl_loss_by_hand():
    """Two roots over four 2-d unit vectors, k = 2: the neighbours by cosine and q_0 computed by hand,
    and the loss of a student whose row 3 moved."""
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.6, -0.8], [0.6, 0.8]])
    module = ops.SubgraphKLLoss.from_reference(ref, [0, 1], k=2, tau=0.5)
    # root 0: row 3 at cos 0.6, row 1 at 0, row 2 at -0.6; root 1: row 3 at 0.8, row 0 at 0, row 2 at -0.8
    assert module.neighbors.tolist() == [[3, 1], [3, 0]]
    cos = torch.tensor([[0.6, 0.0], [0.8, 0.0]])
    torch.testing.assert_close(module.ref_logprob, F.log_softmax(cos / 0.5, dim=-1))
    student = ref[[0, 1, 2, 3]].clone()
    student[3] = torch.tensor([0.8, 0.6])  # row 3 now at cos 0.8 to root 0, 0.6 to root 1
    q0 = F.softmax(cos / 0.5, -1)
    q_s = F.softmax(torch.tensor([[0.8, 0.0], [0.6, 0.0]]) / 0.5, -1)
    want = (q0 * (q0.log() - q_s.log())).sum(-1).mean()
    with ops.backend("reference"):
        torch.testing.assert_close(module(student), want)


def test_subgraph_kl_loss_extra_rows_empty_graphs_and_moves(device, triton_backend):
    ref, student = _reference_and_student(12, 8, seed=2, device=device)
    module = ops.SubgraphKLLoss.from_reference(ref[:10], [8, 9], k=3, tau=TAU_T)
    wider = torch.cat([student[:10], torch.randn(2, 8, device=device)])  # rows 10, 11: in no subgraph
    _, grad = _grad(module, wider)
    assert grad[10:].abs().sum() == 0 and grad[:10].abs().sum() > 0
    one_class = ops.SubgraphKLLoss.from_reference(ref[:1], [0], k=3, tau=TAU_T)  # no neighbour to keep
    loss, grad = _grad(one_class, student[:1])
    assert loss == 0 and loss.dtype == torch.float32 and grad.abs().sum() == 0 and "roots=0, k=0" in repr(one_class)
    assert _grad(one_class, student[:1].double())[0].dtype == torch.float64
    # the graph moves with the module; casts leave the indices int64 and q_0 fp32 (the fixed target)
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.double(), lambda m: m.type(torch.float64)):
        moved = cast(ops.SubgraphKLLoss.from_reference(ref[:10], [8, 9], k=3, tau=TAU_T))
        assert moved.roots.dtype == moved.neighbors.dtype == moved.plan.dtype == torch.long
        assert torch.equal(moved.ref_logprob, module.ref_logprob)
    assert module.to("meta").plan.device.type == "meta" and module.ref_logprob.device.type == "meta"


def test_subgraph_kl_loss_outside_autocast(device, triton_backend):
    """Under the usual AMP recipe (the loss computed inside autocast) the cosines stay fp32: a bf16 matmul
    there gave a bf16, negative loss at student = reference."""
    ref, _ = _reference_and_student(30, 16, seed=4, device=device)
    module = ops.SubgraphKLLoss.from_reference(ref, [27, 28, 29], k=6, tau=TAU_T)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = module(ref)
    assert loss.dtype == torch.float32 and abs(float(loss)) < 1e-6


def test_subgraph_kl_loss_state_dict_carries_the_graph(device, triton_backend):
    """state_dict holds the graph (indices, q_0, tau, num_classes) as the module's extra state; loading it
    into a module built for another graph makes that module this graph (the Triton backward's plan built
    anew from the loaded indices, which are checked again), with the same loss and gradient."""
    ref, student = _reference_and_student(30, 16, seed=5, device=device)
    module = ops.SubgraphKLLoss.from_reference(ref, [24, 25, 26, 27, 28, 29], k=5, tau=TAU_T)
    other = ops.SubgraphKLLoss.from_reference(ref[:20], [18, 19], k=3, tau=0.1)
    other.load_state_dict(module.state_dict())
    assert other.tau == TAU_T and other.num_classes == 30 and torch.equal(other.plan, module.plan)
    want_loss, want_grad = _grad(module, student)
    loss, grad = _grad(other, student)
    assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)
    state = module.state_dict()
    state["_extra_state"] = dict(state["_extra_state"], num_classes=20)  # indices past 19: refused
    with pytest.raises(ValueError, match=r"rows 0\.\.19 of the embedding matrix"):
        other.load_state_dict(state)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_subgraph_kl_loss_compiles_once_across_tasks(backend, device):
    """A new module per task (more classes, other roots) under one dynamic torch.compile: one graph. With the
    graph as buffers, dynamo specialised on their shapes: a recompile per task, and with fullgraph=True a
    hard failure at the recompile limit (the 9th task); with num_classes an int attribute, the same (dynamo
    takes a module's ints as constants)."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda e, m: m(e), backend=counting, dynamic=True, fullgraph=True)
    try:
        with ops.backend(backend):
            for classes in range(20, 70, 5):
                ref, student = _reference_and_student(classes, 16, seed=classes, device=device)
                module = ops.SubgraphKLLoss.from_reference(ref, list(range(classes - 5, classes)), k=4, tau=TAU_T)
                torch.testing.assert_close(compiled(student, module), module(student))
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1


def test_modules_refuse_bad_arguments():
    ref = torch.randn(6, 4)
    for tau in (0.0, -1.0, float("inf"), float("nan"), torch.tensor(20.0), "20", True):
        with pytest.raises(ValueError, match="tau must be a finite number > 0"):
            ops.AnchorKLLoss(tau)
        with pytest.raises(ValueError, match="tau must be a finite number > 0"):
            ops.SubgraphKLLoss.from_reference(ref, [5], k=2, tau=tau)
    assert ops.AnchorKLLoss(np.float32(2.0)).tau == 2.0 and ops.AnchorKLLoss(20).tau == 20.0
    roots, neighbors = torch.tensor([5]), torch.tensor([[0, 1]])
    log_q0 = torch.log(torch.tensor([[0.25, 0.75]]))
    with pytest.raises(ValueError, match=r"rows 0\.\.5 of the embedding matrix"):
        ops.SubgraphKLLoss(roots, torch.tensor([[0, 6]]), log_q0, 0.1, num_classes=6)
    with pytest.raises(ValueError, match=r"roots must be \(R,\) and neighbors \(R, k\)"):
        ops.SubgraphKLLoss(roots, neighbors[0], log_q0, 0.1, num_classes=6)
    with pytest.raises(TypeError, match="row indices"):
        ops.SubgraphKLLoss(roots.float(), neighbors, log_q0, 0.1, num_classes=6)
    with pytest.raises(ValueError, match="ref_logprob must be floating"):
        ops.SubgraphKLLoss(roots, neighbors, torch.zeros(1, 3), 0.1, num_classes=6)
    with pytest.raises(ValueError, match="must be log-probabilities"):  # probabilities, not their logs
        ops.SubgraphKLLoss(roots, neighbors, log_q0.exp(), 0.1, num_classes=6)
    real = torch.log_softmax(torch.randn(4, 9, generator=torch.Generator().manual_seed(2)) * 3, -1)
    four = torch.tensor([0, 1, 2, 3])
    for dtype in (torch.bfloat16, torch.float16):  # log-probabilities rounded to half precision: taken, kept fp32
        module = ops.SubgraphKLLoss(four, torch.arange(36).remainder(10).view(4, 9), real.to(dtype), 0.1, num_classes=10)
        assert module.ref_logprob.dtype == torch.float32
        with pytest.raises(ValueError, match="must be log-probabilities"):  # off by more than their rounding
            ops.SubgraphKLLoss(four, torch.arange(36).remainder(10).view(4, 9), (real + 0.1).to(dtype), 0.1,
                               num_classes=10)
    with pytest.raises(ValueError, match=r"roots must be rows 0\.\.5 of ref_emb"):
        ops.SubgraphKLLoss.from_reference(ref, [6], k=2, tau=0.1)
    with pytest.raises(TypeError, match=r"mask\.nonzero\(\)"):
        ops.SubgraphKLLoss.from_reference(ref, torch.arange(6) >= 4, k=2, tau=0.1)
    with pytest.raises(TypeError, match="row indices"):
        ops.SubgraphKLLoss.from_reference(ref, [4.7, 5.2], k=2, tau=0.1)
    for k in (0, 2.5, True):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            ops.SubgraphKLLoss.from_reference(ref, [5], k=k, tau=0.1)
    module = ops.SubgraphKLLoss(roots, neighbors, log_q0, 0.1, num_classes=6)
    with pytest.raises(ValueError, match="at least the graph's 6 rows"):
        module(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"the graph on cpu; move the module: \.to\(emb\.device\)"):
        module(torch.randn(6, 4, device="meta"))


@pytest.mark.parametrize("as_given", [
    lambda rows: rows, lambda rows: torch.tensor(rows, dtype=torch.uint8), lambda rows: torch.tensor(rows).int(),
    lambda rows: np.array(rows, dtype=np.uint8), lambda rows: range(rows[0], rows[-1] + 1)],
    ids=["list", "uint8", "int32", "numpy-uint8", "range"])
def test_every_entry_point_reads_integer_rows_alike(as_given):
    """knn_subgraphs, TSGRGraph.build, SubgraphKLLoss and its from_reference take the same row indices: any
    integer dtype (uint8 as values, not as a mask) gives the same graph as int64 rows; masks and fractions are
    refused by all (they differed: knn_subgraphs refused uint8 that the module took)."""
    ref = F.normalize(torch.randn(8, 5, generator=torch.Generator().manual_seed(0)), dim=-1)
    rows = [5, 6, 7]
    expected = ops.knn_subgraphs(ref, torch.tensor(rows), 3, 0.1)
    for got in (ops.knn_subgraphs(ref, as_given(rows), 3, 0.1),
                (lambda g: (g.roots, g.neighbors, g.ref_logprob))(losses.TSGRGraph.build(ref, as_given(rows), 3, 0.1))):
        assert got[0].dtype == torch.int64 and all(torch.equal(a, b) for a, b in zip(got, expected))
    module = ops.SubgraphKLLoss.from_reference(ref, as_given(rows), k=3, tau=0.1)
    direct = ops.SubgraphKLLoss(as_given(rows), expected[1], expected[2], 0.1, num_classes=8)
    assert torch.equal(module.roots, expected[0]) and torch.equal(direct.roots, expected[0])
    for bad, message in ((torch.arange(8) >= 5, r"mask\.nonzero\(\)"), ([5.5, 6.0], "integer row indices")):
        for build in (lambda r: ops.knn_subgraphs(ref, r, 3, 0.1), lambda r: losses.TSGRGraph.build(ref, r, 3, 0.1),
                      lambda r: ops.SubgraphKLLoss.from_reference(ref, r, k=3, tau=0.1)):
            with pytest.raises(TypeError, match=message):
                build(bad)


def test_modules_compile_without_graph_breaks(device, triton_backend, graph_breaks):
    ref, student = _reference_and_student(20, 8, seed=3, device=device)
    subgraph = ops.SubgraphKLLoss.from_reference(ref, [15, 16, 17, 18, 19], k=4, tau=TAU_T)
    anchor = ops.AnchorKLLoss(TAU_A)
    teacher = torch.randn(6, 15, device=device)

    def both(emb, logits):
        return 5.0 * anchor(logits, teacher) + subgraph(emb)

    logits = torch.randn(6, 15, device=device)
    compiled = torch.compile(both, fullgraph=True, backend="aot_eager")
    e, z = student.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    loss = compiled(e, z)
    loss.backward()
    assert graph_breaks() == 0
    e2, z2 = student.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    want = both(e2, z2)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(e.grad, e2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-4, atol=1e-7)


def test_the_training_step_losses_on_both_paths(device, triton_backend):
    """method.losses.training_losses (the trainer's stage-2 math: L_cls + 5 L_ACGD + L_GR) forward and backward
    on the Triton path, where anchor_kl's backward scales its saved gradient in place under the incoming 5,
    equal to the reference path's loss, terms and gradients into embeddings, text and logit scale."""
    from segpcl_fast.config import Config

    cfg = Config()
    g = torch.Generator().manual_seed(7)
    n_old, n_seen, batch, anchors, dim = 12, 16, 6, 5, 16
    emb = torch.randn(batch + anchors, dim, generator=g).to(device)
    text = torch.randn(n_seen, dim, generator=g).to(device)
    ref_text = text + 0.2 * torch.randn(n_seen, dim, generator=g).to(device)
    labels = torch.randint(n_old, n_seen, (batch,), generator=g).to(device)
    teacher = (20 * torch.randn(anchors, n_old, generator=g)).to(device)
    graph = losses.TSGRGraph.build(ref_text, list(range(n_old, n_seen)), cfg.tsgr.k, cfg.tsgr.tau)

    def run():
        inputs = [t.clone().requires_grad_(True) for t in (emb, text, torch.tensor(20.0, device=device))]
        total, parts = losses.training_losses(inputs[0], inputs[1], labels, inputs[2], n_old, teacher, graph, cfg)
        total.backward()
        return total.detach(), {k: v.detach() for k, v in parts.items()}, [t.grad for t in inputs]

    total, parts, grads = run()
    assert ops.last_choice()["anchor_kl"] == "triton" and ops.last_choice()["knn_subgraph_kl"] == "triton"
    with ops.backend("reference"):
        want_total, want_parts, want_grads = run()
    torch.testing.assert_close(total, want_total, rtol=1e-5, atol=1e-6)
    for key in ("cls", "acgd", "gr"):
        torch.testing.assert_close(parts[key], want_parts[key], rtol=1e-5, atol=1e-6)
    for grad, want in zip(grads, want_grads):
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)
