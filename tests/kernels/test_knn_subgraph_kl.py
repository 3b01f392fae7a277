"""knn_subgraph_kl: Triton kernels vs reference, deterministic scatter, duplicates, NaN/inf, opcheck, compile."""
import math

import pytest
import torch
import torch.nn.functional as F

from segpcl_fast import ops
from segpcl_fast.ops._kernels import load_kernel

kernel = load_kernel("knn_subgraph_kl")

TAU = 0.05


def _problem(classes, dim, roots, k, dtype, device, seed, duplicates=True):
    g = torch.Generator().manual_seed(seed)
    ref_emb = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    emb = F.normalize(ref_emb + 0.3 * torch.randn(classes, dim, generator=g), dim=-1)
    root_idx = torch.randperm(classes, generator=g)[:roots]
    neighbors = torch.randint(0, classes, (roots, k), generator=g)
    if duplicates and k > 1:
        neighbors[0, 1] = neighbors[0, 0]  # a repeated neighbour
        neighbors[-1, 0] = root_idx[-1]  # a root listed among its own neighbours
        neighbors[:, -1] = neighbors[0, 0]  # one row shared by every subgraph (long segment)
    log_q0 = ops.knn_reference_logprob(ref_emb, root_idx, neighbors, TAU)
    to = dict(device=device)
    return emb.to(dtype=dtype, **to), root_idx.to(**to), neighbors.to(**to), log_q0.to(**to)


def _loss_and_grad(fn, emb, *args):
    emb = emb.detach().clone().requires_grad_(True)
    loss = fn(emb, *args)
    loss.backward()
    return loss.detach(), emb.grad


@pytest.mark.parametrize("classes,dim,roots,k", [(5, 3, 1, 1), (23, 37, 7, 5), (40, 64, 9, 10)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(classes, dim, roots, k, dtype, device, triton_backend):
    emb, root_idx, neighbors, log_q0 = _problem(classes, dim, roots, k, dtype, device, seed=classes + k)
    loss, grad = _loss_and_grad(ops.knn_subgraph_kl, emb, root_idx, neighbors, log_q0, TAU)
    assert ops.last_choice()["knn_subgraph_kl"] == "triton"
    ref_loss, ref_grad = _loss_and_grad(kernel.knn_subgraph_kl_reference, emb, root_idx, neighbors, log_q0, TAU)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=2 ** -6, atol=1e-3)
    used = torch.zeros(classes, dtype=torch.bool, device=device)
    used[root_idx] = True
    used[neighbors.flatten()] = True
    assert (grad[~used] == 0).all()  # rows outside every subgraph get exactly zero
    if k > 1:
        assert loss > 0 and grad[used].abs().sum() > 0


def test_deterministic_and_accurate(device, triton_backend):
    """Repeated runs give bit-identical gradients, close to a float64 reference."""
    emb, root_idx, neighbors, log_q0 = _problem(30, 48, 12, 10, torch.float32, device, seed=1)
    grads = [_loss_and_grad(ops.knn_subgraph_kl, emb, root_idx, neighbors, log_q0, TAU)[1] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])
    emb64 = emb.double().requires_grad_(True)
    log_q = F.log_softmax(torch.einsum("rd,rkd->rk", emb64[root_idx], emb64[neighbors]) / TAU, -1)
    q0 = log_q0.double().exp()
    (q0 * (log_q0.double() - log_q)).sum(-1).mean().backward()
    torch.testing.assert_close(grads[0].double(), emb64.grad, rtol=1e-4, atol=1e-5)


def test_backward_writes_every_row_including_untouched_ones(device, monkeypatch):
    """The backward allocates the gradient uninitialised and each program writes its row: rows no
    subgraph touches must come out exactly 0, touched rows equal to the reference's gradient.
    torch.empty is made to return NaN-filled memory so a skipped row cannot pass as zeros."""
    emb, roots, neighbors, log_q0 = _problem(30, 16, 3, 2, torch.float32, device, seed=12, duplicates=False)
    touched = torch.zeros(30, dtype=torch.bool)
    touched[torch.cat([roots, neighbors.reshape(-1)]).cpu()] = True
    assert (~touched).sum() > 10
    kl, g, g_root = kernel.knn_kl_forward_triton(emb, roots, neighbors, log_q0, TAU)
    grad_kl = torch.full_like(kl, 1.0 / kl.numel())
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    grad = kernel.knn_kl_backward_triton(grad_kl, emb, roots, neighbors, g, g_root)
    monkeypatch.setattr(torch, "empty", real_empty)
    assert (grad[~touched.to(grad.device)] == 0).all()
    _, ref_grad = _loss_and_grad(kernel.knn_subgraph_kl_reference, emb, roots, neighbors, log_q0, TAU)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_hand_computed(device, triton_backend):
    # root e0 = (1, 0); neighbours e1 = (1, 0), e2 = (0, 1); tau = 1 -> q_S = softmax(1, 0);
    # reference q_0 = (0.5, 0.5): KL = 0.5 log(0.5 / q1) + 0.5 log(0.5 / q2).
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], device=device, requires_grad=True)
    roots, neighbors = torch.tensor([0], device=device), torch.tensor([[1, 2]], device=device)
    log_q0 = torch.log(torch.tensor([[0.5, 0.5]], device=device))
    q1 = 1 / (1 + math.exp(-1))
    loss = ops.knn_subgraph_kl(emb, roots, neighbors, log_q0, 1.0)
    loss.backward()
    assert abs(loss.item() - (0.5 * math.log(0.5 / q1) + 0.5 * math.log(0.5 / (1 - q1)))) < 1e-6
    g1, g2 = q1 - 0.5, 0.5 - q1  # d KL / d sim_j = q_S - q_0
    expected = torch.tensor([[g1 * 1 + g2 * 0, g1 * 0 + g2 * 1], [g1, 0.0], [g2, 0.0]])
    torch.testing.assert_close(emb.grad.cpu(), expected)


def test_reference_logprob_and_zero_at_reference(device, triton_backend):
    emb, root_idx, neighbors, _ = _problem(16, 24, 5, 4, torch.float32, device, seed=2, duplicates=False)
    log_q0 = ops.knn_reference_logprob(emb, root_idx, neighbors, TAU)
    torch.testing.assert_close(log_q0.exp().sum(-1), torch.ones(5, device=device))
    cos = F.cosine_similarity(emb[root_idx][:, None, :], emb[neighbors], dim=-1)
    torch.testing.assert_close(log_q0, F.log_softmax(cos / TAU, -1), rtol=1e-5, atol=1e-5)
    loss, grad = _loss_and_grad(ops.knn_subgraph_kl, emb, root_idx, neighbors, log_q0, TAU)
    assert abs(loss.item()) < 1e-5 and grad.abs().max() < 1e-3


def test_nan_and_inf(device, triton_backend):
    emb, root_idx, neighbors, log_q0 = _problem(20, 16, 4, 3, torch.float32, device, seed=3, duplicates=False)
    # q_0 = 0 for one neighbour (log q_0 = -inf): contributes 0 to the KL, still gets a gradient
    log_q0 = log_q0.clone()
    log_q0[1, 2] = float("-inf")
    log_q0[1] = log_q0[1] - torch.logsumexp(log_q0[1], 0)
    loss, grad = _loss_and_grad(ops.knn_subgraph_kl, emb, root_idx, neighbors, log_q0, TAU)
    ref_loss, ref_grad = _loss_and_grad(kernel.knn_subgraph_kl_reference, emb, root_idx, neighbors, log_q0, TAU)
    assert loss.isfinite() and grad.isfinite().all()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)
    # a NaN embedding row used by a subgraph makes the loss NaN
    emb = emb.clone()
    emb[neighbors[0, 0]] = float("nan")
    assert ops.knn_subgraph_kl(emb, root_idx, neighbors, log_q0, TAU).isnan()


def test_opcheck(device):
    emb, root_idx, neighbors, log_q0 = _problem(12, 10, 4, 3, torch.float32, device, seed=4)
    torch.library.opcheck(torch.ops.segpcl.knn_subgraph_kl_rows.default, (emb, root_idx, neighbors, log_q0, TAU))
    torch.library.opcheck(torch.ops.segpcl.knn_subgraph_kl_rows.default,
                          (emb.clone().requires_grad_(True), root_idx, neighbors, log_q0, TAU))
    kl, g, g_root = torch.ops.segpcl.knn_subgraph_kl_rows(emb, root_idx, neighbors, log_q0, TAU)
    torch.library.opcheck(torch.ops.segpcl.knn_subgraph_kl_backward.default,
                          (torch.rand_like(kl), emb, root_idx, neighbors, g, g_root))


def test_compile_fullgraph_no_breaks(device, triton_backend, graph_breaks):
    emb, root_idx, neighbors, log_q0 = _problem(18, 20, 6, 4, torch.float32, device, seed=5)

    def loss_fn(e, r, n, q):
        return ops.knn_subgraph_kl(F.normalize(e, dim=-1), r, n, q, TAU)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss, grad = _loss_and_grad(compiled, emb, root_idx, neighbors, log_q0)
    assert graph_breaks() == 0
    ref = lambda e, r, n, q: kernel.knn_subgraph_kl_reference(F.normalize(e, dim=-1), r, n, q, TAU)  # noqa: E731
    ref_loss, ref_grad = _loss_and_grad(ref, emb, root_idx, neighbors, log_q0)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)


def test_dispatch_and_errors():
    emb, root_idx, neighbors, log_q0 = _problem(10, 8, 3, 2, torch.float32, "cpu", seed=6)
    ops.knn_subgraph_kl(emb, root_idx, neighbors, log_q0, TAU)
    assert ops.last_choice()["knn_subgraph_kl"] == "reference"
    with pytest.raises(TypeError, match="int64"):
        ops.knn_subgraph_kl(emb, root_idx.int(), neighbors, log_q0, TAU)
    with pytest.raises(ValueError, match="knn_reference_logprob"):
        ops.knn_subgraph_kl(emb, root_idx, neighbors, log_q0[:, :1], TAU)
    for tau in (-1.0, 0.0, float("inf"), "0.05", torch.tensor([0.05, 0.1]), None):
        with pytest.raises(ValueError, match="tau must be a finite number > 0"):
            ops.knn_subgraph_kl(emb, root_idx, neighbors, log_q0, tau)
    with pytest.raises(TypeError, match="ref_logprob must be a floating tensor"):
        ops.knn_subgraph_kl(emb, root_idx, neighbors, log_q0.long(), TAU)


def test_backward_plan_by_hand():
    """roots (2, 0), neighbours [[0, 2], [2, 2]] over 4 rows. Contributions: roots 0 -> row 2, 1 -> row 0;
    slots 2 (r0, j0) -> row 0, 3 (r0, j1) -> row 2, 4 (r1, j0) -> row 2, 5 (r1, j1) -> row 2. Stably sorted
    by row: row 0 <- [1, 2], row 1 <- [], row 2 <- [0, 3, 4, 5], row 3 <- []; a root reads its own g_root
    row r, a slot of root r reads emb[roots[r]]: 1 -> 1, 2 -> roots[0] = 2, 0 -> 0, 3 -> 2, 4 -> 0, 5 -> 0."""
    plan = ops.knn_backward_plan(torch.tensor([2, 0]), torch.tensor([[0, 2], [2, 2]]), 4)
    assert plan.tolist() == [0, 2, 2, 6, 6] + [1, 2, 0, 3, 4, 5] + [1, 2, 0, 2, 0, 0]


@pytest.mark.parametrize("per_load", [1, 2, 8])
def test_given_plan_and_gather_widths_match(device, triton_backend, monkeypatch, per_load):
    """A plan built once (as TSGRGraph does) gives the same gradient, bit for bit, as the one the
    backward builds, and the backward then sorts nothing; any number of contributions per load sums
    the same rows (the busiest row here has 16 contributions: chunks of 1, 2, 8 and the default 4)."""
    emb, roots, neighbors, log_q0 = _problem(30, 40, 12, 6, torch.float32, device, seed=21)
    _, want = _loss_and_grad(ops.knn_subgraph_kl, emb, roots, neighbors, log_q0, TAU)
    plan = ops.knn_backward_plan(roots, neighbors, emb.shape[0])
    sorts = []
    real_sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda *a, **kw: sorts.append(1) or real_sort(*a, **kw))
    assert int(torch.diff(plan[:emb.shape[0] + 1]).max()) == 16
    _, got = _loss_and_grad(lambda *a: ops.knn_subgraph_kl(*a, plan=plan), emb, roots, neighbors, log_q0, TAU)
    assert sorts == [] and torch.equal(got, want)
    kl, g, g_root = kernel.knn_kl_forward_triton(emb, roots, neighbors, log_q0, TAU)
    weights = torch.rand_like(kl)  # a per-root upstream gradient, not the mean's uniform one
    grad = kernel.knn_kl_backward_triton(weights, emb, roots, neighbors, g, g_root, plan,
                                         contributions_per_load=per_load)
    e = emb.detach().double().requires_grad_(True)
    log_q = F.log_softmax(torch.einsum("rd,rkd->rk", e[roots], e[neighbors]) / TAU, -1)
    q0 = log_q0.double().exp()
    ((q0 * (log_q0.double() - log_q)).sum(-1) * weights.double()).sum().backward()
    torch.testing.assert_close(grad.double(), e.grad, rtol=1e-4, atol=1e-5)
    stride0 = torch.full((1,), 0.5, device=device).expand(kl.shape[0])  # the mean's gradient: stride 0
    torch.testing.assert_close(kernel.knn_kl_backward_triton(stride0, emb, roots, neighbors, g, g_root, plan),
                               kernel.knn_kl_backward_triton(stride0.contiguous(), emb, roots, neighbors, g, g_root))


def test_plan_opcheck_and_shape_errors(device):
    emb, roots, neighbors, log_q0 = _problem(12, 10, 4, 3, torch.float32, device, seed=22)
    plan = ops.knn_backward_plan(roots, neighbors, 12)
    torch.library.opcheck(torch.ops.segpcl.knn_subgraph_kl_rows.default,
                          (emb.clone().requires_grad_(True), roots, neighbors, log_q0, TAU, plan))
    kl, g, g_root = torch.ops.segpcl.knn_subgraph_kl_rows(emb, roots, neighbors, log_q0, TAU, plan)
    torch.library.opcheck(torch.ops.segpcl.knn_subgraph_kl_backward.default,
                          (torch.rand_like(kl), emb, roots, neighbors, g, g_root, plan))
    stale = ops.knn_backward_plan(roots, neighbors, 11)  # built for another embedding matrix
    for bad in (stale, plan.int(), plan[None]):
        with pytest.raises(ValueError, match=r"plan must be knn_backward_plan\(roots, neighbors, emb.shape\[0\]\)"):
            ops.knn_subgraph_kl(emb, roots, neighbors, log_q0, TAU, plan=bad)


def test_fused_loss_launches_three_kernels_given_a_plan(device, triton_backend, kernel_launches):
    """Forward + backward with the graph's plan: the forward kernel, the sum, autograd's seed and the
    backward kernel; 1 / R is folded into the kernels (a mean would add a division in the backward)."""
    emb, roots, neighbors, log_q0 = _problem(30, 40, 12, 6, torch.float32, device, seed=23)
    plan = ops.knn_backward_plan(roots, neighbors, 30)
    emb.requires_grad_(True)
    with kernel_launches() as launched:
        loss = ops.knn_subgraph_kl(emb, roots, neighbors, log_q0, TAU, check_indices=False, plan=plan)
        (grad,) = torch.autograd.grad(loss, emb)
    assert launched == ["segpcl.knn_subgraph_kl_rows.default", "aten.sum.default", "aten.ones_like.default",
                        "segpcl.knn_subgraph_kl_backward.default"], launched
    want_loss, want_grad = _loss_and_grad(kernel.knn_subgraph_kl_reference, emb, roots, neighbors, log_q0, TAU)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-5)
    kl1 = kernel.knn_kl_forward_triton(emb.detach(), roots, neighbors, log_q0, TAU)
    kl3 = kernel.knn_kl_forward_triton(emb.detach(), roots, neighbors, log_q0, TAU, scale=0.37)
    for one, scaled in zip(kl1, kl3):  # scale multiplies the rows' KL, g and g_root alike
        torch.testing.assert_close(scaled, 0.37 * one, rtol=1e-5, atol=1e-8)


def test_compiled_loss_takes_any_root_count_without_recompiling(device, triton_backend):
    """1 / R is read inside the op: the new classes per task may differ without a recompile."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: ops.knn_subgraph_kl(*a, TAU, check_indices=False), backend=counting,
                             dynamic=True)
    for roots in (3, 5, 6):
        emb, root_idx, neighbors, log_q0 = _problem(20, 16, roots, 4, torch.float32, device, seed=roots)
        loss = compiled(emb, root_idx, neighbors, log_q0)
        torch.testing.assert_close(loss, kernel.knn_subgraph_kl_reference(emb, root_idx, neighbors, log_q0, TAU),
                                   rtol=1e-5, atol=1e-6)
    assert len(graphs) == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("dynamic", [True, None])
def test_compiled_loss_with_its_index_check_takes_any_class_count_without_recompiling(device, triton_backend,
                                                                                     dynamic):
    """The class count grows every task; the index check's message must not specialise the graph on it
    (it did: a recompile per count, and dynamic=True raised a constraint violation). dynamic=None:
    torch's default, one static graph then one dynamic one."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    try:
        compiled = torch.compile(lambda *a: ops.knn_subgraph_kl(*a, TAU), backend=counting, dynamic=dynamic)
        for classes, roots in ((20, 3), (30, 5), (40, 6), (50, 4)):
            emb, root_idx, neighbors, log_q0 = _problem(classes, 16, roots, 4, torch.float32, device, seed=classes)
            loss = compiled(emb, root_idx, neighbors, log_q0)
            torch.testing.assert_close(loss, kernel.knn_subgraph_kl_reference(emb, root_idx, neighbors, log_q0, TAU),
                                       rtol=1e-5, atol=1e-6)
        assert len(graphs) == (1 if dynamic else 2)
    finally:
        torch._dynamo.reset()


def test_the_gpu_launch_shapes_give_the_same_gradient(device):
    """One root and one row of emb per program (the GPU's defaults; the interpreter's are few large
    programs), against the float64 reference."""
    emb, roots, neighbors, log_q0 = _problem(40, 24, 9, 6, torch.float32, device, seed=31)
    plan = ops.knn_backward_plan(roots, neighbors, 40)
    kl, g, g_root = kernel.knn_kl_forward_triton(emb, roots, neighbors, log_q0, TAU, roots_per_program=1)
    weights = torch.rand_like(kl)
    grad = kernel.knn_kl_backward_triton(weights, emb, roots, neighbors, g, g_root, plan, rows_per_program=1)
    e = emb.detach().double().requires_grad_(True)
    log_q = F.log_softmax(torch.einsum("rd,rkd->rk", e[roots], e[neighbors]) / TAU, -1)
    q0 = log_q0.double().exp()
    kl_want = (q0 * (log_q0.double() - log_q)).sum(-1)
    (kl_want * weights.double()).sum().backward()
    torch.testing.assert_close(kl.double(), kl_want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), e.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("trial", range(10))
def test_random_graphs_and_launch_knobs(trial, device):
    """Random sizes (1 included), repeated rows and launch knobs, with and without a given plan and with
    a per-root upstream gradient, against float64 autograd."""
    import random
    rnd = random.Random(trial)
    classes, dim, n_roots, k = (rnd.choice(v) for v in ([2, 5, 13, 40], [1, 3, 16, 33], [1, 2, 7, 20], [1, 2, 5, 9]))
    g = torch.Generator().manual_seed(trial)
    emb = F.normalize(torch.randn(classes, dim, generator=g), dim=-1).to(device)
    roots = torch.randint(0, classes, (n_roots,), generator=g).to(device)
    neighbors = torch.randint(0, classes, (n_roots, k), generator=g).to(device)
    log_q0 = torch.log_softmax(torch.randn(n_roots, k, generator=g), -1).to(device)
    kl, g_s, g_root = kernel.knn_kl_forward_triton(emb, roots, neighbors, log_q0, 0.3,
                                                   roots_per_program=rnd.choice([1, 2, 3, None]))
    weights = torch.rand(n_roots, generator=g).to(device)
    plan = ops.knn_backward_plan(roots, neighbors, classes) if trial % 2 else None
    grad = kernel.knn_kl_backward_triton(weights, emb, roots, neighbors, g_s, g_root, plan,
                                         rows_per_program=rnd.choice([1, 2, None]),
                                         contributions_per_load=rnd.choice([1, 2, 3, 8]))
    e = emb.double().requires_grad_(True)
    log_q = F.log_softmax(torch.einsum("rd,rkd->rk", e[roots], e[neighbors]) / 0.3, -1)
    want = (log_q0.double().exp() * (log_q0.double() - log_q)).sum(-1)
    (want * weights.double()).sum().backward()
    torch.testing.assert_close(kl.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), e.grad, rtol=1e-4, atol=1e-5)


def test_knn_subgraphs_checks_its_roots():
    """ops.knn_subgraphs is public (README): a root past the rows was a raw IndexError, a list an AttributeError,
    and fractional or 2-D roots ran (a review's finding). A list of rows equals the same rows as a tensor."""
    emb = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    as_tensor = ops.knn_subgraphs(emb, torch.tensor([0, 5]), 4, TAU)
    as_list = ops.knn_subgraphs(emb, [0, 5], 4, TAU)
    assert all(torch.equal(a, b) for a, b in zip(as_tensor, as_list)) and as_list[1].shape == (2, 4)
    no_root = ops.knn_subgraphs(emb, [], 4, TAU)  # [] is float32 to torch: no root, not a dtype error
    assert no_root[0].dtype == torch.int64 and no_root[0].numel() == 0 and no_root[1].shape == (0, 0)
    with pytest.raises(ValueError, match=r"roots must be rows 0\.\.11 of ref_emb, got rows 12\.\.12"):
        ops.knn_subgraphs(emb, torch.tensor([12]), 4, TAU)
    with pytest.raises(ValueError, match=r"got rows -1\.\.3"):
        ops.knn_subgraphs(emb, [-1, 3], 4, TAU)
    for bad in (torch.tensor([0.5]), torch.tensor([True])):
        with pytest.raises(TypeError, match="knn_subgraphs: roots must be integer row indices"):
            ops.knn_subgraphs(emb, bad, 4, TAU)
    with pytest.raises(TypeError, match="1-D tensor \\(or list\\) of integer row indices of ref_emb, got shape"):
        ops.knn_subgraphs(emb, torch.tensor([[0]]), 4, TAU)
    with pytest.raises(ValueError, match="ref_emb must be a floating"):
        ops.knn_subgraphs(emb.long(), [0], 4, TAU)
    # k and tau as SubgraphKLLoss checks them: k=0 or -1 gave an empty graph (a loss of 0), tau=0 a NaN q_0 and
    # a negative tau an inverted one, each without a word (a review's finding)
    for k in (0, -1, 2.5):
        with pytest.raises(ValueError, match="knn_subgraphs: k must be an integer >= 1"):
            ops.knn_subgraphs(emb, [0], k, TAU)
    for tau in (0.0, -0.1, float("nan"), float("inf"), torch.tensor([0.1, 0.2]), "0.1", None):
        with pytest.raises(ValueError, match="knn_subgraphs: tau must be a finite number > 0"):
            ops.knn_subgraphs(emb, [0], 4, tau)
    as_tensor_tau = ops.knn_subgraphs(emb, [0], 4, torch.tensor(TAU))[2]
    torch.testing.assert_close(as_tensor_tau, ops.knn_subgraphs(emb, [0], 4, TAU)[2])


def test_the_knob_sweeps_variants_give_the_defaults_result(device):
    """benchmarks/tune_kernels_cuda.py knn builds the benchmark's problem and runs each part at its defaults and
    at other programs / warps: on a small graph every variant's forward (kl, g, g_root) and backward equal the
    default's, up to the rounding of a reduction spread over other warps (the knobs change the launch, not the
    sums)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        import tune_kernels_cuda as tune
    finally:
        sys.path.pop(0)
    problem = tune.knn_problem(60, 12, 5, 24, device=device)
    assert problem["plan"].numel() == kernel.plan_size(60, 12, 5) and problem["grad_kl"].shape == (12,)
    results = {}
    for part, knobs, run in tune.knn_runs(problem):
        results.setdefault(part, []).append((knobs, run()))
    assert [k for k, _ in results["forward"]][0] == "default" and len(results["forward"]) == 1 + len(tune.KNN_FORWARD)
    assert len(results["backward"]) == 1 + len(tune.KNN_BACKWARD)
    for knobs, out in results["forward"][1:]:
        for got, want in zip(out, results["forward"][0][1]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=knobs)
    for knobs, out in results["backward"][1:]:
        torch.testing.assert_close(out, results["backward"][0][1], rtol=1e-5, atol=1e-6, msg=knobs)
    grad = results["backward"][0][1]
    assert grad.abs().sum() > 0  # a real gradient, not the zero of an empty graph
    sizes = tune.knn_gathered_bytes(60, 12, 5, 24)
    assert sizes["backward"] > 60 * 24 * 4 and sizes["forward"] > 12 * 6 * 24 * 4


@pytest.mark.parametrize("warps", [0, 3, -2])
def test_a_warp_count_that_is_not_a_power_of_two_is_refused(device, warps):
    """num_warps (the knob sweep's): 0 fell back to the default unsaid; 3 reached Triton."""
    emb, roots, neighbors, log_q0 = _problem(12, 8, 3, 2, torch.float32, device, seed=4)
    with pytest.raises(ValueError, match=f"num_warps must be a power of two >= 1 .*got {warps}"):
        kernel.knn_kl_forward_triton(emb, roots, neighbors, log_q0, TAU, num_warps=warps)
    _, g, g_root = kernel.knn_kl_forward_triton(emb, roots, neighbors, log_q0, TAU)
    with pytest.raises(ValueError, match=f"num_warps must be a power of two >= 1 .*got {warps}"):
        kernel.knn_kl_backward_triton(torch.ones(3, device=device), emb, roots, neighbors, g, g_root, num_warps=warps)
