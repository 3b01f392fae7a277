"""What the other lora_b_linear tests leave open (found by a mutation audit): the CPU backward's
row blocks (every other test fits in one block), the C++ argument checks the GEMMs would not
catch (a broadcastable bias, mixed dtypes), non-contiguous operands, the fake kernels in bf16, and
has_kernel's per-device answer. Then (a mutation audit of the ops since 7a90c2d): jit.trace and torch.func
dispatch and logging, autocast on meta, anchor_kl's reductions and log-prob teacher check, knn_subgraphs' k, dtype
and tau handling, the loss modules' construction checks and pickles, and pgd_step's per-channel bounds.

Then a mutation audit of the op layer's Python (ops/dispatch.py, _kernels.py, _ext.py, pgd.py, anchor_kl.py,
knn_kl.py, modules.py, mha.py): each test from the "mutation audit of the op layer" section on fails on a small
semantic change that the rest of the suite let through, and passes on the code as it is. Covered:
- dispatch: env_choice (empty = default, unknown refused), set_backend / backend() refusing an unknown name,
  logging once per device, choose_impl recording the tensors' device, last_choice as a copy, restore_choices'
  order and empty entries, "cpp" / "reference" running the Triton ops' references on CUDA tensors;
- _ext: extension_status's cuda flag, the C++ backward asking for grad_x / grad_B only when needed;
- pgd_step: refusing bounds that require grad, a NaN eps where the bounds live on the device (meta), the
  Triton path running the kernel (in and out of place) and an in-place step following an x0 in a graph;
- anchor_kl / knn: a tau that requires grad refused, knn_subgraphs' ref_emb / roots / tau checks and its
  edge-less int64 result, complex row indices, a plan checked on the reference path too;
- modules: AnchorKLLoss's defaults (tau_A = 20), SubgraphKLLoss's num_classes / row-count / device checks and
  normalize (default True, False taken as given);
- mha: the xformers probe per dtype, in that dtype, with its backward.
Last, the fix it found: an in-place Triton step with only grad in a graph keeps x_adv in the graph."""
from __future__ import annotations

import os
import types

import pytest
import torch

from segpcl_fast.ops import _ext, dispatch
from segpcl_fast.ops.lora_linear import lora_b_linear, lora_b_linear_reference

from lora_cases import PATHS, make_inputs, require_extension, set_paths, upcast

# the Triton path on CPU tensors runs in Triton's interpreter, which must be on before triton is first imported
# (importing torch and segpcl_fast does not import it): tests/kernels/conftest.py sets it for a whole run, this
# file alone sets it here
os.environ.setdefault("TRITON_INTERPRET", "1")

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


# ------------------------------------------------------------------ a mutation audit of the op layer (ops/*.py)

def test_env_choice_reads_an_empty_switch_as_unset_and_refuses_an_unknown_one(monkeypatch):
    """env_choice: unset or empty is the default (as for SEGPCL_OPS), a listed value is taken, anything else is one
    ValueError naming the variable."""
    name = "SEGPCL_AUDIT_SWITCH"
    monkeypatch.delenv(name, raising=False)
    assert dispatch.env_choice(name, ("a", "b"), "b") == "b"
    monkeypatch.setenv(name, "")
    assert dispatch.env_choice(name, ("a", "b"), "b") == "b"
    monkeypatch.setenv(name, "a")
    assert dispatch.env_choice(name, ("a", "b"), "b") == "a"
    monkeypatch.setenv(name, "c")
    with pytest.raises(ValueError, match="SEGPCL_AUDIT_SWITCH='c' is unknown"):
        dispatch.env_choice(name, ("a", "b"), "b")


def test_set_backend_refuses_an_unknown_name_and_keeps_the_current_one():
    before = dispatch.get_backend()
    for bad in ("fast", "Triton", ""):
        with pytest.raises(ValueError, match="unknown ops backend"):
            dispatch.set_backend(bad)
        assert dispatch.get_backend() == before
    with pytest.raises(ValueError, match="unknown ops backend"), dispatch.backend("cuda"):
        pass
    assert dispatch.get_backend() == before


@pytest.mark.parametrize("op, name", [("pgd_step", "gamma"), ("pgd_step", "eps"), ("pgd_step", "lo"), ("pgd_step", "hi"),
                                      ("anchor_kl", "tau"), ("knn_subgraph_kl", "tau")])
def test_a_constant_that_requires_grad_is_refused_by_every_triton_op(op, name):
    """refuse_trained_constants: tau and the PGD step's bounds are constants of the ops (no fast path gives them a
    gradient): one that requires grad is one ValueError, not a gradient that silently does not arrive."""
    from segpcl_fast import ops
    g = torch.Generator().manual_seed(20)
    if op == "pgd_step":
        x = torch.rand(2, 3, 4, 4, generator=g)
        bounds = {"gamma": 0.1, "eps": 0.2, "lo": 0.0, "hi": 1.0}
        bounds[name] = torch.full((3,), bounds[name], requires_grad=True)
        call = lambda: ops.pgd_step(x.clone(), torch.randn(x.shape, generator=g), x, **bounds)
    elif op == "anchor_kl":
        z = torch.randn(3, 5, generator=g)
        call = lambda: ops.anchor_kl(z, z.flip(0), torch.tensor(0.5, requires_grad=True))
    else:
        emb = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1)
        roots, neighbors, q0 = ops.knn_subgraphs(emb, [0, 3], k=2, tau=0.5)
        call = lambda: ops.knn_subgraph_kl(emb, roots, neighbors, q0, torch.tensor(0.5, requires_grad=True))
    with pytest.raises(ValueError, match=f"{op}: {name} is a constant of the op .* requires grad"):
        call()


def test_a_choice_is_logged_once_per_device(monkeypatch, caplog):
    """record_choice logs each (op, device, impl) once: the same choice on another device is a line of its own."""
    for name in ("_logged", "_used"):
        monkeypatch.setattr(dispatch, name, type(getattr(dispatch, name))())
    monkeypatch.setattr(dispatch, "_last_choice", {})
    with caplog.at_level("INFO", logger="segpcl_fast.ops"):
        for device in ("cpu", "cpu", "meta", "cpu", "meta"):
            dispatch.record_choice("audit_op", "reference", device)
    lines = [r.getMessage() for r in caplog.records if "audit_op" in r.getMessage()]
    assert [line.split("device=")[1][:4] for line in lines] == ["cpu,", "meta"], lines
    assert dispatch.last_choice() == {"audit_op": "reference"} and dispatch.choices_used() == {"audit_op": "reference"}


def test_restore_choices_puts_the_checkpoints_record_first_and_skips_empty_entries(monkeypatch):
    """restore_choices: the earlier part's ops first (results.json "ops" in order of first use), each op's earlier
    implementations before this part's; an op recorded with no implementation ("") adds nothing."""
    monkeypatch.setattr(dispatch, "_used", {})
    monkeypatch.setattr(dispatch, "_last_choice", {})
    dispatch.record_choice("lora_b_linear", "merged", "cpu")
    dispatch.record_choice("attention", "sdpa", "cpu")
    dispatch.restore_choices({"anchor_kl": "reference", "lora_b_linear": "cpp+merged", "knn_subgraph_kl": ""})
    assert list(dispatch.choices_used().items()) == [
        ("anchor_kl", "reference"), ("lora_b_linear", "cpp+merged"), ("attention", "sdpa")]


def test_the_triton_ops_run_their_reference_under_cpp_and_reference_even_on_cuda(monkeypatch):
    """impl_for: Triton under "auto" (CUDA, fp32) or "triton" only; "cpp" has no version of these ops and runs their
    references, as "reference" does."""
    from segpcl_fast.ops import _kernels
    t = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda"), dtype=torch.float32)  # a CUDA tensor's view
    monkeypatch.setattr(_kernels._utils, "HAS_TRITON", True)
    monkeypatch.setattr(_kernels._utils, "can_run_triton", lambda *tensors: True)
    want = {"auto": "triton", "triton": "triton", "cpp": "reference", "reference": "reference"}
    for name, impl in want.items():
        with dispatch.backend(name):
            assert {op: _kernels.impl_for(op, t, t) for op in ("pgd_step", "anchor_kl", "knn_subgraph_kl")} == dict.fromkeys(
                ("pgd_step", "anchor_kl", "knn_subgraph_kl"), impl), name


def test_extension_status_reports_cuda_kernels_only_when_compiled_with_them(monkeypatch):
    monkeypatch.setattr(_ext, "_load_error", None)
    monkeypatch.setattr(_ext, "_C", types.SimpleNamespace(WITH_CUDA=False))
    assert _ext.extension_status() == {"built": True, "cuda": False, "error": None}
    monkeypatch.setattr(_ext, "_C", types.SimpleNamespace(WITH_CUDA=True))
    assert _ext.extension_status() == {"built": True, "cuda": True, "error": None}
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_load_error", "ImportError: x")
    assert _ext.extension_status() == {"built": False, "cuda": False, "error": "ImportError: x"}


def test_pgd_step_refuses_a_nan_eps_where_the_bounds_are_on_the_device():
    """eps >= 0 is checked on the host floats as `all(e >= 0)`, so a NaN eps is refused like a negative one before the
    bounds go to x_adv's device, where check_pgd_inputs no longer reads them (meta stands in for a GPU here)."""
    from segpcl_fast.ops import pgd_step
    x = torch.empty(1, 3, 2, 2, device="meta")
    assert pgd_step(x, x, x, 0.1, [0.1, 0.2, 0.3], 0.0, 1.0).shape == x.shape  # the reference runs on meta
    for eps in (float("nan"), [0.1, float("nan"), 0.1], -0.1):
        with pytest.raises(ValueError, match="eps must be >= 0"):
            pgd_step(x, x, x, 0.1, eps, 0.0, 1.0)


def test_knn_subgraphs_checks_ref_emb_roots_and_tau():
    """knn_subgraphs refuses what it cannot build a graph from: an integer ref_emb, roots of another rank (a (R, 1)
    column too: the module reshapes it, the function does not), and a tau that is not a finite number > 0 (q_0 at
    tau 0 is NaN, at a negative tau inverted)."""
    from segpcl_fast.ops import knn_subgraphs
    ref = torch.randn(6, 4, generator=torch.Generator().manual_seed(23))
    with pytest.raises(ValueError, match="ref_emb must be a floating"):
        knn_subgraphs((ref * 10).long(), [1, 2], k=2, tau=0.5)
    with pytest.raises(TypeError, match="roots must be a 1-D"):
        knn_subgraphs(ref, [[1], [2]], k=2, tau=0.5)
    for tau in (0.0, -0.5, float("inf"), float("nan")):
        for roots in ([1, 2], []):  # with no root too (no q_0 to compute, the argument still wrong)
            with pytest.raises(ValueError, match="knn_subgraphs: tau must be a finite number > 0"):
                knn_subgraphs(ref, roots, k=2, tau=tau)


@pytest.mark.parametrize("classes, roots", [(6, []), (1, [0])])
def test_knn_subgraphs_without_edges_is_int64_and_empty(classes, roots):
    """No root, or a single class (no neighbour to take): roots[:0], and (0, 0) neighbours that are int64 row
    indices (the modules and the op index with them) and an fp32 q_0."""
    from segpcl_fast.ops import knn_subgraphs
    r, neighbors, q0 = knn_subgraphs(torch.randn(classes, 4), roots, k=3, tau=0.5)
    assert r.shape == (0,) and r.dtype == torch.int64
    assert neighbors.shape == (0, 0) and neighbors.dtype == torch.int64
    assert q0.shape == (0, 0) and q0.dtype == torch.float32


def test_knn_subgraph_kl_checks_a_plan_on_every_path():
    """A plan of another graph's shape is refused even where the reference (which ignores it) runs."""
    import torch.nn.functional as F
    from segpcl_fast.ops import knn_backward_plan, knn_subgraph_kl, knn_subgraphs
    emb = F.normalize(torch.randn(8, 4, generator=torch.Generator().manual_seed(24)), dim=-1)
    roots, neighbors, q0 = knn_subgraphs(emb, [0, 3, 5], k=2, tau=0.5)
    plan = knn_backward_plan(roots, neighbors, 8)
    with dispatch.backend("reference"):
        want = knn_subgraph_kl(emb, roots, neighbors, q0, 0.5)
        torch.testing.assert_close(knn_subgraph_kl(emb, roots, neighbors, q0, 0.5, plan=plan), want)
        for bad in (plan[:-1], plan.int(), plan.view(1, -1)):
            with pytest.raises(ValueError, match="plan must be knn_backward_plan"):
                knn_subgraph_kl(emb, roots, neighbors, q0, 0.5, plan=bad)


def test_subgraph_kl_loss_refuses_a_graph_it_cannot_hold():
    """SubgraphKLLoss: num_classes a positive integer (0 or 6.5 refused, not floored), one neighbour row per root,
    and roots, neighbors and ref_logprob on one device."""
    from segpcl_fast.ops import SubgraphKLLoss
    roots, neighbors = torch.tensor([5]), torch.tensor([[0, 1]])
    log_q0 = torch.log(torch.tensor([[0.25, 0.75]]))
    for bad in (0, 6.5, -1):
        with pytest.raises(ValueError, match="num_classes must be a positive integer"):
            SubgraphKLLoss(roots[:0], neighbors[:0], log_q0[:0], 0.1, num_classes=bad)
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        SubgraphKLLoss(roots, neighbors, log_q0, 0.1, num_classes=6.5)
    with pytest.raises(ValueError, match=r"roots must be \(R,\) and neighbors \(R, k\)"):
        SubgraphKLLoss(roots, neighbors.repeat(2, 1), log_q0.repeat(2, 1), 0.1, num_classes=6)
    with pytest.raises(ValueError, match="must be on one device"):
        SubgraphKLLoss(roots, neighbors, log_q0.to("meta"), 0.1, num_classes=6)
    assert SubgraphKLLoss(roots, neighbors, log_q0, 0.1, num_classes=6).num_classes == 6


def test_inplace_pgd_step_on_the_triton_path_follows_an_x0_that_requires_grad():
    """pgd_step(inplace=True) with x0 in an autograd graph (x_adv not): the Triton path copies the functional op's
    result into x_adv, so the ball's bounds x0 -/+ eps still pass their gradient to x0 (the in-place kernel would
    leave x_adv out of the graph)."""
    from segpcl_fast.kernels import _triton_utils
    from segpcl_fast.ops import pgd_step
    if not _triton_utils.can_run_triton(torch.zeros(1)):
        pytest.skip("CPU Triton needs TRITON_INTERPRET=1 before triton is imported")
    leaf = torch.full((1, 1, 2, 2), 0.5, requires_grad=True)
    x0 = leaf * 1.0
    x = torch.tensor([[[[0.0, 0.3], [-0.05, 0.9]]]])
    grad = torch.tensor([[[[1.0, -1.0], [1.0, 0.0]]]])
    with dispatch.backend("triton"):
        out = pgd_step(x, grad, x0, 0.1, 0.2, -1.0, 1.0, inplace=True)
    assert out is x and dispatch.last_choice()["pgd_step"] == "triton"
    (x * torch.arange(1.0, 5.0).view(1, 1, 2, 2)).sum().backward()
    # x - 0.1 sign(grad) = [-0.1, 0.4, -0.15, 0.9] into [0.3, 0.7]: rows 0, 2 and 3 sit on the ball's bounds
    torch.testing.assert_close(x.detach().flatten(), torch.tensor([0.3, 0.4, 0.3, 0.7]))
    torch.testing.assert_close(leaf.grad.flatten(), torch.tensor([1.0, 0.0, 3.0, 4.0]))


def test_subgraph_kl_loss_normalizes_only_when_asked():
    """normalize=True (the default) L2-normalises emb: 2 x the reference is the reference, loss 0; normalize=False
    takes emb as given: 2 x the reference doubles the similarities, the op's loss on it."""
    import torch.nn.functional as F
    from segpcl_fast.ops import SubgraphKLLoss, knn_subgraph_kl
    ref = F.normalize(torch.randn(8, 4, generator=torch.Generator().manual_seed(25)), dim=-1)
    normalized = SubgraphKLLoss.from_reference(ref, [0, 3, 6], k=3, tau=0.5)
    as_given = SubgraphKLLoss.from_reference(ref, [0, 3, 6], k=3, tau=0.5, normalize=False)
    direct = SubgraphKLLoss(as_given.roots, as_given.neighbors, as_given.ref_logprob, 0.5, num_classes=8)
    assert normalized.normalize and direct.normalize and not as_given.normalize
    emb = 2.0 * ref
    want = knn_subgraph_kl(emb, as_given.roots, as_given.neighbors, as_given.ref_logprob, 0.5)
    assert want > 1e-3
    torch.testing.assert_close(as_given(emb), want)
    for module in (normalized, direct):
        torch.testing.assert_close(module(emb), torch.tensor(0.0), rtol=0, atol=1e-6)


def test_choose_impl_records_the_tensors_device_and_last_choice_is_a_copy(monkeypatch, caplog):
    """choose_impl records (and logs) the device of the call's tensors, a CUDA tensor's as cuda; last_choice() is a
    snapshot, which a caller may change without changing the record."""
    from segpcl_fast.ops import _kernels
    monkeypatch.setattr(dispatch, "_logged", set())
    monkeypatch.setattr(dispatch, "_last_choice", {})
    monkeypatch.setattr(dispatch, "_used", {})
    t = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda"), dtype=torch.float32)
    with dispatch.backend("reference"), caplog.at_level("INFO", logger="segpcl_fast.ops"):
        assert _kernels.choose_impl("anchor_kl", t, t) == "reference"
    assert [r.getMessage() for r in caplog.records] == [
        "segpcl_fast.ops.anchor_kl -> reference (device=cuda, backend=reference)"]
    snapshot = dispatch.last_choice()
    snapshot["anchor_kl"] = "triton"
    assert dispatch.last_choice() == {"anchor_kl": "reference"}


def test_the_cpp_backward_computes_only_the_gradients_asked_for(cpp, monkeypatch):
    """The C++ op's backward asks lora_b_linear_bwd for grad_x only when x requires grad (a frozen input, as the first
    layer's, would be an (N, in) GEMM for nothing) and for grad_B only when B does."""
    asked = []
    real = torch.ops.segpcl.lora_b_linear_bwd
    monkeypatch.setattr(torch.ops.segpcl, "lora_b_linear_bwd", lambda *args: asked.append(args[-2:]) or real(*args))
    x, weight, bias, lora_A, lora_B = make_inputs((3,), 8, 16, 2, seed=26)
    for x_in, b_in, want in ((x, lora_B, (True, True)), (x.detach(), lora_B, (False, True)),
                             (x, lora_B.detach(), (True, False))):
        y = lora_b_linear(x_in, weight, bias, lora_A, b_in, 0.5)
        assert dispatch.last_choice()["lora_b_linear"] == "cpp"
        y.sum().backward()
        assert asked.pop() == want
    assert not asked


def test_pgd_step_on_the_triton_path_runs_the_kernel(monkeypatch):
    """What choose_impl records is what runs: "triton" is the kernel's launcher (out of place and in place), with the
    reference's values."""
    from segpcl_fast.kernels import _triton_utils, pgd_step as kernel
    from segpcl_fast.ops import pgd_step, pgd_step_reference
    if not _triton_utils.can_run_triton(torch.zeros(1)):
        pytest.skip("CPU Triton needs TRITON_INTERPRET=1 before triton is imported")
    launches = []
    real = kernel.pgd_step_triton
    monkeypatch.setattr(kernel, "pgd_step_triton", lambda *args, **kw: launches.append(kw.get("out") is None)
                        or real(*args, **kw))
    g = torch.Generator().manual_seed(27)
    x0 = torch.rand(1, 2, 2, 2, generator=g)
    x_adv, grad = x0 + 0.1 * torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    bounds = [torch.full((2,), v) for v in (0.1, 0.05, 0.0, 1.0)]
    want = pgd_step_reference(x_adv, grad, x0, *bounds)
    with dispatch.backend("triton"):
        out = pgd_step(x_adv, grad, x0, 0.1, 0.05, 0.0, 1.0)
        assert launches == [True] and not torch.equal(out, x_adv)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        assert pgd_step(x_adv, grad, x0, 0.1, 0.05, 0.0, 1.0, inplace=True) is x_adv
    assert launches == [True, False] and dispatch.last_choice()["pgd_step"] == "triton"
    torch.testing.assert_close(x_adv, want, rtol=0, atol=0)


def test_complex_row_indices_are_refused():
    """row_indices refuses complex values (their .long() drops the imaginary part with a warning only), at every
    entry point that reads rows."""
    from segpcl_fast.ops import SubgraphKLLoss, knn_subgraphs
    ref = torch.randn(6, 4, generator=torch.Generator().manual_seed(28))
    rows = torch.tensor([1, 4], dtype=torch.complex64)
    with pytest.raises(TypeError, match="integer row indices, got torch.complex64"):
        knn_subgraphs(ref, rows, k=2, tau=0.5)
    with pytest.raises(TypeError, match="integer row indices, got torch.complex64"):
        SubgraphKLLoss.from_reference(ref, rows, k=2, tau=0.5)


def test_anchor_kl_loss_defaults_are_the_methods():
    """AnchorKLLoss() is method.md's L_ACGD: tau_A = 20, raw teacher logits, the mean over anchors."""
    from segpcl_fast.ops import AnchorKLLoss, anchor_kl
    loss = AnchorKLLoss()
    assert (loss.tau, loss.teacher_is_logprob, loss.reduction) == (20.0, False, "mean")
    g = torch.Generator().manual_seed(29)
    z_s, z_t = 30 * torch.randn(4, 6, generator=g), 30 * torch.randn(4, 6, generator=g)
    torch.testing.assert_close(loss(z_s, z_t), anchor_kl(z_s, z_t, 20.0))


def test_the_xformers_probe_is_per_dtype_runs_in_that_dtype_and_runs_backward(monkeypatch):
    """xformers_failure probes each (device, dtype, head size) in that dtype, forward and backward: a wheel with no
    fp32 kernel still runs bf16 (and fp32 stays on SDPA), and one whose backward fails is not taken."""
    import sys
    import torch.nn.functional as F
    from segpcl_fast.ops import mha

    class NoBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("no backward kernel for this head size")

    def memory_efficient_attention(q, k, v):  # (B, L, H, D), as the real one
        if q.dtype == torch.float32:
            raise NotImplementedError("no kernel for float32")
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return NoBackward.apply(out) if q.shape[-1] == 16 else out

    xops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setitem(sys.modules, "xformers", types.SimpleNamespace(ops=xops))
    monkeypatch.setitem(sys.modules, "xformers.ops", xops)
    monkeypatch.setattr(mha, "XFORMERS_DEVICES", {"cpu"})
    monkeypatch.setattr(mha, "_probed", {})
    mha._xformers_ops.cache_clear()
    try:
        g = torch.Generator().manual_seed(30)
        for dtype, head_dim, want in ((torch.float32, 8, "sdpa"), (torch.bfloat16, 8, "xformers"),
                                      (torch.bfloat16, 16, "sdpa"), (torch.float32, 8, "sdpa")):
            q = torch.randn(1, 2, 3, head_dim, generator=g).to(dtype)
            out = mha.attention(q, q.flip(2), q)
            assert dispatch.last_choice()["attention"] == want, (dtype, head_dim)
            torch.testing.assert_close(out, mha.attention_reference(q, q.flip(2), q))
    finally:
        mha._xformers_ops.cache_clear()


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_an_inplace_pgd_step_gives_a_grad_in_a_graph_its_zero_gradient_on_every_path(path):
    """pgd_step(inplace=True) with only grad in an autograd graph: x_adv joins the graph on every path, and grad's
    gradient is zeros (sign is piecewise constant), as for the functional step. The Triton path ran its in-place
    kernel there: x_adv out of the graph, and backward from it an error ("does not require grad")."""
    from segpcl_fast.kernels import _triton_utils
    from segpcl_fast.ops import pgd_step, pgd_step_reference
    if path == "triton" and not _triton_utils.can_run_triton(torch.zeros(1)):
        pytest.skip("CPU Triton needs TRITON_INTERPRET=1 before triton is imported")
    g = torch.Generator().manual_seed(31)
    x0 = torch.rand(1, 2, 2, 2, generator=g)
    x_adv = x0 + 0.1 * torch.randn(x0.shape, generator=g)
    leaf = torch.randn(x0.shape, generator=g, requires_grad=True)
    grad = 2.0 * leaf
    bounds = (0.1, 0.05, 0.0, 1.0)
    want = pgd_step_reference(x_adv, grad.detach(), x0, *(torch.full((2,), v) for v in bounds))
    with dispatch.backend(path):
        out = pgd_step(x_adv, grad, x0, *bounds, inplace=True)
    assert out is x_adv and dispatch.last_choice()["pgd_step"] == path and x_adv.requires_grad
    torch.testing.assert_close(x_adv.detach(), want, rtol=0, atol=0)
    x_adv.sum().backward()
    assert torch.equal(leaf.grad, torch.zeros_like(leaf))
