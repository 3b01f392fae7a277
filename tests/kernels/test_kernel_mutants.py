"""Launcher and kernel properties the other kernel tests leave open (found by a mutation audit):
ragged multi-chunk grids, non-contiguous and strided inputs,
unnormalised teachers / references (the documented p_S * sum(p_T) - p_T gradient), large logits,
non-uniform upstream gradients, fake kernels in bf16, and the dispatch rule for CUDA tensors.

Grids are kept small: under the interpreter each program costs a few ms."""
import types

import pytest
import torch
import torch.nn.functional as F

from segpcl_fast import ops
from segpcl_fast.ops import _kernels, dispatch
from segpcl_fast.ops import knn_kl as knn_op
from segpcl_fast.ops._kernels import load_kernel

pgd = load_kernel("pgd_step")
akl = load_kernel("anchor_kl")
knn = load_kernel("knn_subgraph_kl")
utils = load_kernel("_triton_utils")


# ----------------------------------------------------------------------------------------- pgd_step

def _pgd_inputs(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x0 = torch.rand(shape, generator=g)
    x_adv = (x0 + 0.06 * (torch.rand(shape, generator=g) - 0.5)).clamp(0, 1)
    grad = torch.randn(shape, generator=g)
    grad[grad.abs() < 0.1] = 0.0
    pc = [0.01 + 0.02 * torch.rand(c, generator=g), 0.02 + 0.02 * torch.rand(c, generator=g),
          -0.1 * torch.rand(c, generator=g), 0.9 + 0.2 * torch.rand(c, generator=g)]
    return [t.to(device=device, dtype=dtype) for t in (x_adv, grad, x0)] + [p.to(device) for p in pc]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pgd_several_ragged_chunks_per_plane(dtype, device):
    """block=16 over 7 x 9 = 63 pixels: four chunks per plane, the last one ragged; every pixel
    (not only the first chunk) must be stepped, and nothing written past a plane."""
    args = _pgd_inputs((2, 3, 7, 9), dtype, device, seed=21)
    out = pgd.pgd_step_triton(*args, block=16)
    assert torch.equal(out, pgd.pgd_step_reference(*args))
    x_adv = args[0].clone()
    pgd.pgd_step_triton(x_adv, *args[1:], out=x_adv, block=16)  # in place, also chunked
    assert torch.equal(x_adv, pgd.pgd_step_reference(*args))


def test_pgd_non_contiguous_grad_and_x0(device, triton_backend):
    x_adv, grad, x0, *pc = _pgd_inputs((2, 3, 5, 4), torch.float32, device, seed=22)
    grad_t = grad.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    x0_t = x0.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last
    assert not grad_t.is_contiguous() and not x0_t.is_contiguous()
    out = ops.pgd_step(x_adv, grad_t, x0_t, *pc)
    assert ops.last_choice()["pgd_step"] == "triton"
    assert torch.equal(out, pgd.pgd_step_reference(x_adv, grad, x0, *pc))


def test_pgd_fake_kernels_keep_bf16(device):
    args = _pgd_inputs((2, 3, 3, 5), torch.bfloat16, device, seed=23)
    torch.library.opcheck(torch.ops.segpcl.pgd_step.default, args, test_utils=("test_faketensor",))
    torch.library.opcheck(torch.ops.segpcl.pgd_step_.default, [a.clone() for a in args],
                          test_utils=("test_faketensor",))


# ---------------------------------------------------------------------------------------- anchor_kl

TAU = 4.0


def _logits(rows, cols, seed, device, scale=6.0):
    g = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(rows, cols, generator=g)
    teacher = student + 0.5 * scale * torch.randn(rows, cols, generator=g)
    return student.to(device), teacher.to(device)


def _rows_reference(student, teacher, tau, teacher_is_logprob, weights=None):
    """Per-row KL (fp64) and d (sum_a w_a KL_a) / d student, by autograd of the formula."""
    s = student.detach().double().requires_grad_(True)
    log_pt = teacher.double() if teacher_is_logprob else F.log_softmax(teacher.double() / tau, -1)
    p_t = log_pt.exp()
    rows = torch.where(p_t > 0, p_t * (log_pt - F.log_softmax(s / tau, -1)), 0.0).sum(-1)
    w = torch.ones_like(rows) if weights is None else weights.double()
    (grad,) = torch.autograd.grad((rows * w).sum(), s)
    return rows.detach(), grad


@pytest.mark.parametrize("chunk", [None, 16])
def test_anchor_kl_unnormalised_teacher_logprob(chunk, device):
    """teacher_is_logprob with log-probs that do not sum to one (e.g. restricted to the old classes):
    KL = sum p_T (log p_T - log p_S) and d KL / d z_S = (p_S * sum(p_T) - p_T) / tau, in both kernels."""
    student, teacher = _logits(5, 37, seed=31, device=device)
    mass = torch.tensor([0.3, 0.6, 1.0, 1.7, 0.9], device=device)[:, None]
    log_pt = F.log_softmax(teacher / TAU, -1) + mass.log()
    kl_rows, dkl = akl.anchor_kl_triton(student, log_pt, TAU, True, chunk_cols=chunk)
    ref_rows, ref_grad = _rows_reference(student, log_pt, TAU, True)
    torch.testing.assert_close(kl_rows.double(), ref_rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dkl.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk", [None, 16])
@pytest.mark.parametrize("teacher_is_logprob", [False, True])
def test_anchor_kl_strided_and_transposed_inputs(chunk, teacher_is_logprob, device):
    """student a column slice of a wider matrix (row stride != columns), teacher a transposed copy
    (column stride != 1), on a ragged last program (7 rows, 2 per program)."""
    wide, teacher = _logits(7, 50, seed=32, device=device)
    student = wide[:, 3:3 + 37]
    teacher = teacher[:, :37]
    if teacher_is_logprob:
        teacher = F.log_softmax(teacher / TAU, -1)
    teacher_t = teacher.t().contiguous().t()
    assert student.stride(0) == 50 and teacher_t.stride(-1) != 1
    kl_rows, dkl = akl.anchor_kl_triton(student, teacher_t, TAU, teacher_is_logprob, rows=2, chunk_cols=chunk)
    ref_rows, ref_grad = _rows_reference(student, teacher, TAU, teacher_is_logprob)
    assert dkl.shape == (7, 37) and dkl.is_contiguous()
    torch.testing.assert_close(kl_rows.double(), ref_rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dkl.double(), ref_grad, rtol=1e-4, atol=1e-6)
    # the same with the student transposed (column stride != 1) and the teacher sliced
    student_t = student.t().contiguous().t()
    wide_t = torch.zeros(7, 60, device=device)
    wide_t[:, 5:42] = teacher
    kl_rows, dkl = akl.anchor_kl_triton(student_t, wide_t[:, 5:42], TAU, teacher_is_logprob, rows=2,
                                        chunk_cols=chunk)
    torch.testing.assert_close(kl_rows.double(), ref_rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dkl.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk", [None, 16])
def test_anchor_kl_rows_backward_weights_each_row(chunk, device, monkeypatch):
    """Autograd of the rows op scales each row's gradient by its own upstream gradient (not their mean)."""
    if chunk is not None:  # route the custom op through the chunked kernel
        real = akl.anchor_kl_triton
        monkeypatch.setattr(akl, "anchor_kl_triton", lambda *a, **kw: real(*a, chunk_cols=chunk))
    student, teacher = _logits(6, 21, seed=33, device=device)
    weights = torch.tensor([0.0, 1.0, -2.0, 0.5, 3.0, 1.0], device=device)
    s = student.clone().requires_grad_(True)
    kl_rows, _ = torch.ops.segpcl.anchor_kl_rows(s, teacher, TAU, False)
    (kl_rows * weights).sum().backward()
    _, ref_grad = _rows_reference(student, teacher, TAU, False, weights)
    torch.testing.assert_close(s.grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_anchor_kl_fake_kernel_dtypes_bf16(device):
    student, teacher = _logits(5, 13, seed=34, device=device)
    args = (student.bfloat16(), teacher.bfloat16(), TAU, False)
    torch.library.opcheck(torch.ops.segpcl.anchor_kl_rows.default, args, test_utils=("test_faketensor",))
    kl_rows, dkl = torch.ops.segpcl.anchor_kl_rows(*args)
    assert kl_rows.dtype == torch.float32 and dkl.dtype == torch.float32


# ---------------------------------------------------------------------------------- knn_subgraph_kl

def _knn_problem(classes, dim, roots, k, device, seed, tau):
    g = torch.Generator().manual_seed(seed)
    ref_emb = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    emb = F.normalize(ref_emb + 0.3 * torch.randn(classes, dim, generator=g), dim=-1)
    root_idx = torch.randperm(classes, generator=g)[:roots]
    neighbors = torch.randint(0, classes, (roots, k), generator=g)
    neighbors[0, 1] = neighbors[0, 0]
    neighbors[-1, 0] = root_idx[-1]
    log_q0 = knn.knn_reference_logprob(ref_emb, root_idx, neighbors, tau)
    return emb.to(device), root_idx.to(device), neighbors.to(device), log_q0.to(device)


def _knn_loss_grad(fn, emb, *args):
    e = emb.detach().clone().requires_grad_(True)
    loss = fn(e, *args)
    loss.backward()
    return loss.detach(), e.grad


def _knn_fp64(emb, roots, neighbors, log_q0, tau, weights=None):
    e = emb.detach().double().requires_grad_(True)
    log_q = F.log_softmax(torch.einsum("rd,rkd->rk", e[roots], e[neighbors]) / tau, -1)
    lq0 = log_q0.double()
    rows = torch.where(lq0.exp() > 0, lq0.exp() * (lq0 - log_q), 0.0).sum(-1)
    loss = rows.mean() if weights is None else (rows * weights.double()).sum()
    loss.backward()
    return loss.detach(), e.grad


def test_knn_strided_and_transposed_embeddings(device, triton_backend):
    """emb a column slice of a wider matrix (row stride != d) and a transposed copy (column stride
    != 1): forward and the segment-sum backward must use the real strides; ref_logprob transposed."""
    tau = 0.1
    emb, roots, neighbors, log_q0 = _knn_problem(20, 12, 7, 5, device, seed=41, tau=tau)
    want_loss, want_grad = _knn_fp64(emb, roots, neighbors, log_q0, tau)
    log_q0_t = log_q0.t().contiguous().t()
    wide = torch.zeros(20, 19, device=device)
    wide[:, 4:16] = emb
    wide.requires_grad_(True)
    emb_t = emb.t().contiguous().t().requires_grad_(True)
    for leaf, e in ((wide, wide[:, 4:16]), (emb_t, emb_t)):
        assert not e.is_contiguous()
        loss = ops.knn_subgraph_kl(e, roots, neighbors, log_q0_t, tau)
        assert ops.last_choice()["knn_subgraph_kl"] == "triton"
        loss.backward()
        grad = leaf.grad if leaf is emb_t else leaf.grad[:, 4:16]
        torch.testing.assert_close(loss.detach().double(), want_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-5)
    assert (wide.grad[:, :4] == 0).all() and (wide.grad[:, 16:] == 0).all()


def test_knn_unnormalised_reference_and_weighted_rows(device):
    """ref_logprob that does not sum to one per root (the documented g = (q_S * sum(q_0) - q_0) / tau),
    and a non-uniform upstream gradient per root through the rows op."""
    tau = 0.1
    emb, roots, neighbors, log_q0 = _knn_problem(16, 10, 5, 4, device, seed=42, tau=tau)
    log_q0 = log_q0 + torch.tensor([-1.0, -0.2, 0.0, 0.4, 0.7], device=device)[:, None]
    weights = torch.tensor([1.0, -0.5, 2.0, 0.0, 0.25], device=device)
    e = emb.clone().requires_grad_(True)
    kl_rows, _, _ = torch.ops.segpcl.knn_subgraph_kl_rows(e, roots, neighbors, log_q0, tau)
    (kl_rows * weights).sum().backward()
    want_loss, want_grad = _knn_fp64(emb, roots, neighbors, log_q0, tau, weights)
    torch.testing.assert_close((kl_rows.detach() * weights).sum().double(), want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e.grad.double(), want_grad, rtol=1e-4, atol=1e-5)


def test_knn_small_tau_large_logits_stay_finite(device, triton_backend):
    """tau = 0.005 puts the logits (cosines / tau) near 200: exp overflows fp32 unless the softmax
    subtracts the row maximum."""
    tau = 0.005
    emb, roots, neighbors, log_q0 = _knn_problem(12, 8, 4, 3, device, seed=43, tau=tau)
    loss, grad = _knn_loss_grad(ops.knn_subgraph_kl, emb, roots, neighbors, log_q0, tau)
    want_loss, want_grad = _knn_fp64(emb, roots, neighbors, log_q0, tau)
    assert loss.isfinite() and grad.isfinite().all()
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-3, atol=1e-2)


def test_knn_fake_kernel_dtypes_bf16(device):
    emb, roots, neighbors, log_q0 = _knn_problem(12, 10, 4, 3, device, seed=44, tau=0.1)
    emb = emb.bfloat16()
    torch.library.opcheck(torch.ops.segpcl.knn_subgraph_kl_rows.default, (emb, roots, neighbors, log_q0, 0.1),
                          test_utils=("test_faketensor",))
    kl, g, g_root = torch.ops.segpcl.knn_subgraph_kl_rows(emb, roots, neighbors, log_q0, 0.1)
    assert kl.dtype == g.dtype == g_root.dtype == torch.float32
    torch.library.opcheck(torch.ops.segpcl.knn_subgraph_kl_backward.default,
                          (torch.rand_like(kl), emb, roots, neighbors, g, g_root), test_utils=("test_faketensor",))
    assert torch.ops.segpcl.knn_subgraph_kl_backward(torch.rand_like(kl), emb, roots, neighbors, g,
                                                     g_root).dtype == torch.bfloat16


def test_knn_supported_flag_follows_the_fused_tile(monkeypatch):
    """ops.knn_subgraph_kl tells the dispatcher whether next_pow2(k) * next_pow2(d) fits the tile."""
    seen = []

    def fake_choose(op, *tensors, supported=True):
        seen.append(supported)
        return "reference"

    monkeypatch.setattr(knn_op, "choose_impl", fake_choose)
    for dim, k, fits in [(8, 3, True), (knn.MAX_FUSED_TILE // 4, 3, True), (knn.MAX_FUSED_TILE // 4 + 1, 3, False),
                         (knn.MAX_FUSED_DIM, 2, True), (knn.MAX_FUSED_DIM + 1, 2, False)]:  # k = 3 -> 4
        emb, roots, neighbors, log_q0 = _knn_problem(6, dim, 2, k, "cpu", seed=45, tau=0.1)
        knn_op.knn_subgraph_kl(emb, roots, neighbors, log_q0, 0.1)
        assert seen[-1] is fits, (dim, k, seen)
    # the tile and width limits that compile without spilling on sm_90 (check_triton_build, Triton 3.8)
    assert (knn.MAX_FUSED_TILE, knn.MAX_FUSED_DIM) == (1 << 15, 1 << 13)


def test_knn_contributions_stay_under_int32(monkeypatch):
    """The backward numbers its R * (k + 1) contributions, and divides by k, in int32: a graph with 2^31 or
    more is not the kernels' (fused_fits), and ops.knn_subgraph_kl asks with its root count."""
    most = (knn.MAX_CONTRIBUTIONS - 1) // 11
    assert knn.MAX_CONTRIBUTIONS == 1 << 31
    assert knn.fused_fits(10, 512, most) and not knn.fused_fits(10, 512, most + 1)
    asked = []
    monkeypatch.setattr(knn, "fused_fits", lambda k, d, n_roots=0: asked.append((k, d, n_roots)) or True)
    monkeypatch.setattr(knn_op, "choose_impl", lambda op, *tensors, supported=True: "reference")
    emb, roots, neighbors, log_q0 = _knn_problem(6, 8, 2, 3, "cpu", seed=45, tau=0.1)
    knn_op.knn_subgraph_kl(emb, roots, neighbors, log_q0, 0.1)
    assert asked == [(3, 8, 2)]


# ---------------------------------------------------------------------------------------- dispatch

def _cuda_stub(dtype=torch.float32):
    """Stands in for a CUDA tensor in impl_for / choose_impl (which read only .is_cuda, .device and .dtype)."""
    return types.SimpleNamespace(is_cuda=True, device=torch.device("cuda"), dtype=dtype)


def test_auto_takes_triton_on_cuda_only_when_supported_and_installed(monkeypatch):
    t = _cuda_stub()
    with dispatch.backend("auto"):
        monkeypatch.setattr(utils, "HAS_TRITON", True)
        assert _kernels.impl_for("knn_subgraph_kl", t, t) == "triton"
        assert _kernels.impl_for("knn_subgraph_kl", t, t, supported=False) == "reference"
        assert _kernels.impl_for("knn_subgraph_kl", t, torch.zeros(1)) == "reference"  # a CPU tensor among them
        assert not utils.can_run_triton(t, torch.zeros(1))  # mixed devices: neither CUDA nor all-CPU
        assert utils.can_run_triton(t, t)
        assert _kernels.impl_for("anchor_kl", t, _cuda_stub(torch.float64)) == "reference"  # kernels are fp32
        assert _kernels.impl_for("anchor_kl", _cuda_stub(torch.bfloat16), _cuda_stub(torch.float16)) == "triton"
        monkeypatch.setattr(utils, "HAS_TRITON", False)
        assert _kernels.impl_for("anchor_kl", t, t) == "reference"
    with dispatch.backend("reference"):
        monkeypatch.setattr(utils, "HAS_TRITON", True)
        assert _kernels.impl_for("anchor_kl", t, t) == "reference"


def test_backend_context_restores_after_an_exception():
    before = dispatch.get_backend()
    with pytest.raises(KeyError):
        with ops.backend("reference"):
            raise KeyError("boom")
    assert dispatch.get_backend() == before


def test_last_choice_follows_every_call(monkeypatch):
    for name, empty in (("_last_choice", {}), ("_used", {}), ("_logged", set())):
        monkeypatch.setattr(dispatch, name, empty)  # this test's choices do not leak into others
    args = _pgd_inputs((1, 2, 2, 2), torch.float32, "cpu", seed=46)
    for name in ("reference", "auto", "reference"):
        with ops.backend(name):
            ops.pgd_step(*args)
        assert ops.last_choice()["pgd_step"] == "reference"
    dispatch.record_choice("pgd_step", "triton", "cpu")
    dispatch.record_choice("pgd_step", "reference", "cpu")  # a repeat of an already logged choice
    assert ops.last_choice()["pgd_step"] == "reference"
    dispatch.record_choice("pgd_step", "triton", "cpu")
    assert ops.last_choice()["pgd_step"] == "triton"


@pytest.mark.parametrize("interpret", [True, False])
def test_rows_per_program_respects_the_tile_cap(interpret, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interpret else "0")
    for n_rows, row_elems in [(1000, 4096), (3, 4096), (10_000, 1), (7, 300), (1, 1 << 17)]:
        rows = utils.rows_per_program(n_rows, row_elems)
        assert rows >= 1 and rows == utils.next_pow2(rows)
        assert rows * row_elems <= max(row_elems, 1 << 16), (n_rows, row_elems, rows)


def test_choices_inside_compile_are_not_recorded(device, triton_backend, graph_breaks, monkeypatch):
    """choose_impl records its choice in eager mode only (choices_used: "Calls inside torch.compile'd
    code are not recorded"); the first choice per key also logs, which must not break the graph."""
    for name, empty in (("_last_choice", {}), ("_used", {}), ("_logged", set())):
        monkeypatch.setattr(dispatch, name, empty)
    student, teacher = _logits(4, 9, seed=47, device=device)
    compiled = torch.compile(lambda s, t: ops.anchor_kl(s, t, TAU), fullgraph=True, backend="aot_eager")
    loss = compiled(student, teacher)
    assert graph_breaks() == 0
    assert "anchor_kl" not in ops.last_choice() and "anchor_kl" not in ops.choices_used()
    torch.testing.assert_close(loss, akl.anchor_kl_reference(student, teacher, TAU), rtol=1e-5, atol=1e-6)
    ops.anchor_kl(student, teacher, TAU)  # eager: recorded
    assert ops.last_choice()["anchor_kl"] == "triton"
