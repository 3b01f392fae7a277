"""What the other lora_b_linear tests leave open (found by a mutation audit): the CPU backward's
row blocks (every other test fits in one block), the C++ argument checks the GEMMs would not
catch (a broadcastable bias, mixed dtypes), non-contiguous operands, the fake kernels in bf16, and
has_kernel's per-device answer. Then (a mutation audit of the ops since 7a90c2d): jit.trace and torch.func
dispatch and logging, autocast on meta, anchor_kl's reductions and log-prob teacher check, knn_subgraphs' k, dtype
and tau handling, the loss modules' construction checks and pickles, and pgd_step's per-channel bounds."""
from __future__ import annotations

import types

import pytest
import torch

from segpcl_fast.ops import _ext, dispatch
from segpcl_fast.ops.lora_linear import lora_b_linear, lora_b_linear_reference

from lora_cases import PATHS, make_inputs, require_extension, set_paths, upcast

CPU_PATHS = [p for p in PATHS if p[1] != "fused"]


@pytest.fixture
def cpp():
    require_extension()
    with dispatch.backend("cpp"):
        yield


# out = 1024: blocks of 4 MB / (1024 * 4 B) = 1024 rows, so 1100 rows are a full block and a ragged
# one; out = 16384 hits the 64-row floor: 150 rows are blocks of 64, 64 and 22.
BLOCK_SHAPES = [((1100,), 8, 1024, 4), ((3, 50), 6, 16384, 2)]


@pytest.mark.parametrize("lead,n_in,n_out,rank", BLOCK_SHAPES)
@pytest.mark.parametrize("paths", CPU_PATHS, ids=["-".join(p) for p in CPU_PATHS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_over_several_row_blocks(lead, n_in, n_out, rank, paths, dtype, cpp, monkeypatch):
    set_paths(monkeypatch, *paths)
    x, weight, bias, lora_A, lora_B = make_inputs(lead, n_in, n_out, rank, dtype=dtype, seed=3)
    y = lora_b_linear(x, weight, bias, lora_A, lora_B, 0.75)
    assert dispatch.last_choice()["lora_b_linear"] == "cpp"
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    g[-1] *= 3.0  # the last rows (the ragged block) differ from the first ones
    gx, gB = torch.autograd.grad(y, (x, lora_B), g)
    xd, wd, bd, ad, b_d = upcast([x, weight, bias, lora_A, lora_B])
    yd = lora_b_linear_reference(xd, wd, bd, ad, b_d, 0.75)
    gxd, gBd = torch.autograd.grad(yd, (xd, b_d), g.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2

    def close(got, want):  # relative to the largest entry: out = 16384 sums long fp32 dot products
        scale = want.abs().max()
        torch.testing.assert_close(got.double() / scale, want / scale, rtol=0, atol=tol)

    close(y, yd.detach())
    close(gx, gxd)
    close(gB, gBd)
    # the backward op on its own, each gradient alone
    u = (x.detach().reshape(-1, n_in).double() @ lora_A.double().T).to(dtype).reshape(*lead, rank)
    gx_only, empty = torch.ops.segpcl.lora_b_linear_bwd(g, u, weight, lora_A, lora_B.detach(), 0.75, True, False)
    empty2, gB_only = torch.ops.segpcl.lora_b_linear_bwd(g, u, weight, lora_A, lora_B.detach(), 0.75, False, True)
    assert empty.numel() == 0 and empty2.numel() == 0
    close(gx_only, gxd)
    close(gB_only, 0.75 * g.double().reshape(-1, n_out).T @ u.double().reshape(-1, rank))


@pytest.mark.parametrize("paths", CPU_PATHS, ids=["-".join(p) for p in CPU_PATHS])
def test_non_contiguous_operands(paths, cpp, monkeypatch):
    set_paths(monkeypatch, *paths)
    x, weight, bias, lora_A, lora_B = make_inputs((4, 6), 24, 40, 4, seed=5)
    x_nc = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # (4, 6, 24), strided
    w_nc = weight.T.contiguous().T
    a_nc = lora_A.T.contiguous().T
    assert not (x_nc.is_contiguous() or w_nc.is_contiguous() or a_nc.is_contiguous())
    y = lora_b_linear(x_nc, w_nc, bias, a_nc, lora_B, 1.5)
    g = torch.randn(y.shape).transpose(0, 1).contiguous().transpose(0, 1)  # a strided grad_out too
    gx, gB = torch.autograd.grad(y, (x_nc, lora_B), g)
    y_ref = lora_b_linear_reference(x, weight, bias, lora_A, lora_B, 1.5)
    gx_ref, gB_ref = torch.autograd.grad(y_ref, (x, lora_B), g)
    assert y.shape == (4, 6, 40) and gx.shape == x.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gB, gB_ref, rtol=1e-4, atol=1e-4)


def test_cpp_op_rejects_what_a_gemm_would_broadcast_or_reject_vaguely(cpp):
    x, weight, bias, lora_A, lora_B = make_inputs((3,), 8, 8, 2)
    with pytest.raises(RuntimeError, match="bias must be 1-D"):  # (1,) would broadcast in addmm
        lora_b_linear(x, weight, bias[:1].clone(), lora_A, lora_B, 0.5)
    with pytest.raises(RuntimeError, match="bias must be 1-D"):
        lora_b_linear(x, weight, bias.view(1, 8), lora_A, lora_B, 0.5)
    with pytest.raises(RuntimeError, match="all tensors must share x's dtype"):
        lora_b_linear(x, weight.double(), bias, lora_A, lora_B, 0.5)
    with pytest.raises(RuntimeError, match="all tensors must share x's dtype"):
        lora_b_linear(x, weight, bias, lora_A, lora_B.detach().half().requires_grad_(), 0.5)


def test_fake_kernels_keep_bf16(cpp):
    x, weight, bias, lora_A, lora_B = make_inputs((2, 3), dtype=torch.bfloat16)
    fwd, bwd = torch.ops.segpcl.lora_b_linear_fwd.default, torch.ops.segpcl.lora_b_linear_bwd.default
    torch.library.opcheck(fwd, (x.detach(), weight, bias, lora_A, lora_B.detach(), 0.5),
                          test_utils=("test_faketensor",))
    g, u = torch.randn(2, 3, 40).bfloat16(), torch.randn(2, 3, 4).bfloat16()
    for flags in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(bwd, (g, u, weight, lora_A, lora_B.detach(), 0.5, *flags),
                              test_utils=("test_faketensor",))


def test_has_kernel_per_device(monkeypatch):
    monkeypatch.setattr(_ext, "_C", types.SimpleNamespace(WITH_CUDA=False))
    assert _ext.has_kernel("cpu") and not _ext.has_kernel("cuda") and not _ext.has_kernel("mps")
    monkeypatch.setattr(_ext, "_C", types.SimpleNamespace(WITH_CUDA=True))
    assert _ext.has_kernel("cpu") and _ext.has_kernel("cuda") and not _ext.has_kernel("mps")
    monkeypatch.setattr(_ext, "_C", None)
    assert not _ext.has_kernel("cpu") and not _ext.has_kernel("cuda")


def test_jit_trace_runs_the_reference_under_auto_and_a_forced_cpp_op_as_asked():
    """dispatch.reference_under_transform: under torch.jit.trace "auto" runs the reference (a trace of aten ops);
    a forced "cpp" is traced as asked (the C++ op in the graph), and both traces compute the reference's output."""
    import warnings
    require_extension()
    x, weight, bias, lora_A, lora_B = make_inputs((3, 5), 8, 16, 2, seed=5)
    want = lora_b_linear_reference(x, weight, bias, lora_A, lora_B, 0.5)
    for name, impl in (("auto", "reference"), ("cpp", "cpp")):
        with dispatch.backend(name), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(lambda t, b: lora_b_linear(t, weight, bias, lora_A, b, 0.5), (x, lora_B),
                                     check_trace=False)
            assert dispatch.last_choice()["lora_b_linear"] == impl
        kinds = [n.kind() for n in traced.inlined_graph.nodes()]
        assert any("segpcl" in k for k in kinds) == (impl == "cpp"), kinds
        torch.testing.assert_close(traced(x, lora_B), want, rtol=1e-5, atol=1e-5)


def test_a_choice_made_under_torch_func_is_logged_once_more(monkeypatch, caplog):
    """record_choice logs once per (op, device, impl), and once more for the same choice under torch.func."""
    from torch.func import grad
    monkeypatch.setattr(dispatch, "_logged", set())
    x, weight, bias, lora_A, lora_B = make_inputs((3,), 8, 16, 2, seed=6)
    lora_B = lora_B.detach()
    with dispatch.backend("reference"), caplog.at_level("INFO", logger="segpcl_fast.ops"):
        lora_b_linear(x.detach(), weight, bias, lora_A, lora_B, 0.5)
        lora_b_linear(x.detach(), weight, bias, lora_A, lora_B, 0.5)
        grad(lambda b: lora_b_linear(x.detach(), weight, bias, lora_A, b, 0.5).sum())(lora_B)
        grad(lambda b: lora_b_linear(x.detach(), weight, bias, lora_A, b, 0.5).sum())(lora_B)
    lines = [r.getMessage() for r in caplog.records if "lora_b_linear -> reference" in r.getMessage()]
    assert lines == ["segpcl_fast.ops.lora_b_linear -> reference (device=cpu, backend=reference)",
                     "segpcl_fast.ops.lora_b_linear -> reference (device=cpu, backend=reference, under a torch.func "
                     "transform)"], lines


def test_meta_has_no_autocast_even_where_torch_cannot_say(monkeypatch):
    """autocast_available("meta") is False without asking torch (torch.autocast("meta") raises; older torch has no
    torch.amp.is_autocast_available): lora_b_linear and autocast_off then run on the meta device."""
    from segpcl_fast.kernels._triton_utils import autocast_available, autocast_off
    monkeypatch.delattr(torch.amp, "is_autocast_available", raising=False)
    assert not autocast_available("meta") and autocast_available("cpu")
    x, weight, bias, lora_A, lora_B = (t.detach().to("meta") for t in make_inputs((3,), 8, 16, 2, seed=7))
    with autocast_off("meta"):
        assert lora_b_linear(x, weight, bias, lora_A, lora_B.requires_grad_(), 0.5).shape == (3, 16)


@pytest.mark.parametrize("teacher_is_logprob", [False, True])
def test_anchor_kl_reductions_are_torchs_kl_div_over_anchors(teacher_is_logprob):
    """ops.anchor_kl's reduction on the path CPU tensors take: "none" is each anchor's tau^2 KL (torch's kl_div
    summed over classes), "sum" their sum, "mean" / "batchmean" their mean."""
    import torch.nn.functional as F
    from segpcl_fast.ops import anchor_kl
    g = torch.Generator().manual_seed(8)
    z_s, z_t, tau = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g), 2.0
    log_t = F.log_softmax(z_t / tau, dim=-1)
    rows = tau ** 2 * F.kl_div(F.log_softmax(z_s / tau, dim=-1), log_t, reduction="none", log_target=True).sum(-1)
    teacher = log_t if teacher_is_logprob else z_t
    for reduction, want in (("none", rows), ("sum", rows.sum()), ("mean", rows.mean()), ("batchmean", rows.mean())):
        got = anchor_kl(z_s, teacher, tau, teacher_is_logprob, reduction=reduction)
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shift", [1.0, -1.0])
def test_a_logprob_teacher_off_by_either_sign_is_refused(shift):
    """check_teacher_logprob: a row's logsumexp must be 0 within the tolerance, above it or below it (log-probabilities
    of a subset of the classes, or shifted down, are no log_softmax either)."""
    import torch.nn.functional as F
    from segpcl_fast.ops import AnchorKLLoss
    from segpcl_fast.ops.anchor_kl import check_teacher_logprob
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(9))
    assert check_teacher_logprob(F.log_softmax(z, dim=-1))
    bad = F.log_softmax(z, dim=-1)
    bad[2] += shift
    with pytest.raises(ValueError, match="not log-probabilities"):
        check_teacher_logprob(bad)
    with pytest.raises(ValueError, match="not log-probabilities"):
        AnchorKLLoss(tau=1.0, teacher_is_logprob=True)(z, bad)


def test_knn_subgraphs_refuses_k_below_one():
    """k = 0 would be an empty graph and a loss of 0 without a word: one ValueError, as for a negative k."""
    from segpcl_fast.ops import knn_subgraphs
    ref = torch.randn(6, 4, generator=torch.Generator().manual_seed(10))
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            knn_subgraphs(ref, [1, 2], k=k, tau=0.5)
    roots, neighbors, _ = knn_subgraphs(ref, [1, 2], k=1, tau=0.5)
    assert neighbors.shape == (2, 1) and (neighbors[:, 0] != roots).all()


def test_an_anchor_kl_loss_pickled_before_reduction_existed_takes_the_mean():
    import pickle
    from segpcl_fast.ops import AnchorKLLoss, anchor_kl
    g = torch.Generator().manual_seed(11)
    z_s, z_t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    old = AnchorKLLoss(tau=2.0, reduction="sum")
    del old.__dict__["reduction"], old.__dict__["_teacher_checked"]  # as the module was before they existed
    revived = pickle.loads(pickle.dumps(old))
    assert revived.reduction == "mean"
    torch.testing.assert_close(revived(z_s, z_t), anchor_kl(z_s, z_t, 2.0, reduction="mean"))


def test_pgd_step_takes_per_channel_bounds_ordered_per_channel_only():
    """lo <= hi is checked channel by channel: lo = [0, 1, 2], hi = [0.5, 1.5, 2.5] is valid (lo[1] > hi[0]), and
    the step clamps each channel to its own box; a channel with lo > hi is one ValueError."""
    from segpcl_fast.ops import pgd_step
    g = torch.Generator().manual_seed(12)
    x0 = torch.rand(2, 3, 4, 4, generator=g) * 3
    x_adv, grad = x0 + 0.1 * torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    lo, hi = [0.0, 1.0, 2.0], [0.5, 1.5, 2.5]
    c = (1, 3, 1, 1)
    want = torch.minimum(torch.maximum(x_adv - 0.2 * grad.sign(), x0 - 0.3), x0 + 0.3)
    want = torch.minimum(torch.maximum(want, torch.tensor(lo).view(c)), torch.tensor(hi).view(c))
    torch.testing.assert_close(pgd_step(x_adv, grad, x0, 0.2, 0.3, lo, hi), want)
    with pytest.raises(ValueError, match="lo must be <= hi"):
        pgd_step(x_adv, grad, x0, 0.2, 0.3, [0.0, 2.0, 2.0], hi)


def test_pgd_step_takes_eps_zero_and_lo_equal_to_hi():
    """The documented bounds are eps >= 0 and lo <= hi, ends included: eps = 0 projects onto x0 (then [lo, hi]),
    lo = hi pins every value there."""
    from segpcl_fast.ops import pgd_step
    g = torch.Generator().manual_seed(13)
    x0 = torch.rand(2, 3, 4, 4, generator=g)
    x_adv, grad = x0 + 0.1 * torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(pgd_step(x_adv, grad, x0, 0.2, 0.0, 0.0, 1.0), x0)
    torch.testing.assert_close(pgd_step(x_adv, grad, x0, 0.2, [0.0, 0.1, 0.0], 0.5, 0.5), torch.full_like(x0, 0.5))


def test_loss_modules_check_their_arguments_when_built_and_take_an_empty_or_column_root_list():
    from segpcl_fast.ops import AnchorKLLoss, SubgraphKLLoss
    with pytest.raises(ValueError, match="reduction must be one of"):
        AnchorKLLoss(reduction="avg")
    ref = torch.randn(6, 4, generator=torch.Generator().manual_seed(14))
    empty = SubgraphKLLoss.from_reference(ref, [], k=2, tau=0.5)  # no root: nothing to preserve, loss 0
    emb = ref.clone().requires_grad_()
    loss = empty(emb)
    loss.backward()
    assert loss.item() == 0 and torch.equal(emb.grad, torch.zeros_like(ref))
    flat = SubgraphKLLoss.from_reference(ref, torch.tensor([1, 4]), k=2, tau=0.5)
    column = SubgraphKLLoss.from_reference(ref, torch.tensor([[1], [4]]), k=2, tau=0.5)  # (R, 1) taken as (R,)
    assert torch.equal(column.roots, flat.roots) and torch.equal(column.neighbors, flat.neighbors)
    moved = ref + 0.3 * torch.randn(6, 4, generator=torch.Generator().manual_seed(15))
    torch.testing.assert_close(column(moved), flat(moved))


def test_the_logprob_teacher_check_skips_rows_without_a_finite_logsumexp_and_holds_fp32_to_1e_4():
    import torch.nn.functional as F
    from segpcl_fast.ops.anchor_kl import check_teacher_logprob, logprob_tolerance
    assert logprob_tolerance(torch.float32) == 1e-4 and logprob_tolerance(torch.bfloat16) == 8 * 2 ** -7
    teacher = F.log_softmax(torch.randn(4, 6, generator=torch.Generator().manual_seed(16)), dim=-1)
    teacher[1] = float("-inf")  # a row with no finite logsumexp: left to the op's NaN rules
    teacher[3] = float("nan")
    assert check_teacher_logprob(teacher[[0, 1, 2]])
    assert not check_teacher_logprob(teacher[[1, 3]])  # no row checked
    with pytest.raises(ValueError, match="not log-probabilities"):  # a NaN row hides no other row's problem
        check_teacher_logprob(torch.stack([teacher[3], teacher[0] + 1.0]))
    with pytest.raises(ValueError, match="not log-probabilities"):
        check_teacher_logprob(teacher[[0, 2]] + 1e-3)  # fp32 rows off by 1e-3: not log_softmax output


def test_knn_subgraphs_builds_q0_in_fp32_from_a_bf16_reference():
    """knn_subgraphs normalises ref_emb in fp32 whatever its dtype: a bf16 reference gives the q_0 of its values
    taken to fp32 (a bf16 normalisation is off by its rounding, amplified by 1 / tau)."""
    import torch.nn.functional as F
    from segpcl_fast.ops import knn_reference_logprob, knn_subgraphs
    ref = torch.randn(12, 16, generator=torch.Generator().manual_seed(17)).bfloat16()
    roots, neighbors, q0 = knn_subgraphs(ref, [0, 5, 9], k=4, tau=0.05)
    want = knn_reference_logprob(F.normalize(ref.float(), dim=-1), roots, neighbors, 0.05)
    assert q0.dtype == torch.float32
    torch.testing.assert_close(q0, want, rtol=1e-5, atol=1e-5)


def test_knn_subgraph_kl_reads_a_float64_one_element_tau_as_a_float():
    """A (1,) float64 tau tensor is the float's loss: an fp32 scalar (a dimensioned float64 tau promoted the
    reference's similarities, and so its loss, to float64)."""
    import torch.nn.functional as F
    from segpcl_fast.ops import knn_subgraph_kl, knn_subgraphs
    ref = F.normalize(torch.randn(10, 8, generator=torch.Generator().manual_seed(18)), dim=-1)
    roots, neighbors, q0 = knn_subgraphs(ref, [1, 6], k=3, tau=0.5)
    emb = F.normalize(ref + 0.2 * torch.randn(10, 8, generator=torch.Generator().manual_seed(19)), dim=-1)
    want = knn_subgraph_kl(emb, roots, neighbors, q0, 0.5)
    got = knn_subgraph_kl(emb, roots, neighbors, q0, torch.tensor([0.5], dtype=torch.float64))
    assert got.dtype == want.dtype == torch.float32 and got.shape == () and torch.equal(got, want)
