"""segpcl::lora_b_linear (C++ CPU op) against the plain-PyTorch reference: values, grads, dtypes,
opcheck, gradcheck, saved tensors, torch.compile, dispatch and fallback."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from segpcl_fast.ops import dispatch, lora_linear
from segpcl_fast.ops._ext import has_kernel
from segpcl_fast.ops.lora_linear import lora_b_linear, lora_b_linear_reference

from lora_cases import (PATHS, backward_ops, check_autocast_casts_like_linear, check_saves_u_not_x, forward_backward, in_place_bias_case, make_inputs,
                        require_extension, saved_tensors, set_paths, small_update_slopes, upcast)

pytestmark = pytest.mark.usefixtures("_extension")


@pytest.fixture
def _extension():
    """The C++ op itself: backend "cpp" (under "auto" a call whose B needs no gradient runs merged)."""
    require_extension()
    with dispatch.backend("cpp"):
        yield


CPU_PATHS = [p for p in PATHS if p[1] != "fused"]  # fused runs split on the CPU


@pytest.fixture(params=CPU_PATHS, ids=["-".join(p) for p in CPU_PATHS])
def lora_path(request, monkeypatch):
    set_paths(monkeypatch, *request.param)
    return request.param


# (lead dims, in, out, rank): wide and narrow layers, with and without leading dims (each fits in
# one row block of the CPU backward; test_ops_mutants.py runs several blocks).
SHAPES = [((3, 5), 24, 40, 4), ((7,), 40, 24, 4), ((2, 150), 32, 96, 8), ((300,), 96, 32, 16),
          ((), 16, 16, 2)]


@pytest.mark.parametrize("lead,n_in,n_out,rank", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference_fp32(lead, n_in, n_out, rank, bias, lora_path):
    args = make_inputs(lead, n_in, n_out, rank, bias=bias)
    y, gx, gB = forward_backward(lora_b_linear, *args, 0.75)
    assert dispatch.last_choice()["lora_b_linear"] == "cpp"
    ry, rgx, rgB = forward_backward(lora_b_linear_reference, *args, 0.75)
    assert y.shape == ry.shape == (*lead, n_out)
    torch.testing.assert_close(y, ry, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx, rgx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gB, rgB, rtol=1e-4, atol=1e-4)


def test_hand_computed_values():
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    bias = torch.tensor([0.5, 0.0, -1.0])
    lora_A = torch.tensor([[1.0, -1.0]])            # u = x A^T = -1
    lora_B = torch.tensor([[2.0], [0.0], [1.0]], requires_grad=True)
    y = lora_b_linear(x, weight, bias, lora_A, lora_B, 0.5)
    # x W^T + b = [1.5, 2, 2]; s u B^T = 0.5 * -1 * [2, 0, 1] = [-1, 0, -0.5]
    torch.testing.assert_close(y, torch.tensor([[0.5, 2.0, 1.5]]))
    y.sum().backward()
    # grad_x = 1 W + s (1 B) A = [2, 2] + 0.5 * 3 * [1, -1]; grad_B = s 1^T u = 0.5 * -1
    torch.testing.assert_close(x.grad, torch.tensor([[3.5, 0.5]]))
    torch.testing.assert_close(lora_B.grad, torch.full((3, 1), -0.5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_no_worse_than_reference(dtype, lora_path):
    """Against a float64 ground truth, the op's bf16/fp16 error (fp32 accumulation) stays within
    the plain-PyTorch low-precision reference's error."""
    args = make_inputs((4, 64), 96, 160, 8, dtype=dtype)
    ours = forward_backward(lora_b_linear, *args, 2.0)
    low_ref = forward_backward(lora_b_linear_reference, *args, 2.0)
    g = torch.randn(ours[0].shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    truth = forward_backward(lora_b_linear_reference, *upcast(args), 2.0, grad_out=g.double())
    for got, ref, exact in zip(ours, low_ref, truth):
        assert got.dtype == dtype
        err = (got.double() - exact).abs().max().item()
        ref_err = (ref.double() - exact).abs().max().item()
        scale = exact.abs().max().item()
        assert err <= 1.5 * ref_err + 1e-3 * scale, (err, ref_err, scale)


@pytest.mark.parametrize("bscale", [1e-3, 3e-4])
def test_bf16_keeps_small_updates_at_least_as_well_as_the_reference(bscale, lora_path):
    """`merged` rounds W + s B A once (slope 0.97 / 0.60 here against the reference's 0.90 / 0.46)."""
    ours, ref = small_update_slopes(lora_b_linear, lora_b_linear_reference, bscale)
    assert dispatch.last_choice()["lora_b_linear"] == "cpp"
    assert ref < 0.95  # the effect under test exists at this size
    assert ref - 0.02 <= ours <= 1.02, (ours, ref)  # keeps at least as much, and invents none


def test_unknown_path_names_the_choices(monkeypatch):
    args = make_inputs((2,), 8, 8, 2)
    monkeypatch.setenv("SEGPCL_LORA_FWD", "fastest")
    with pytest.raises(RuntimeError, match="SEGPCL_LORA_FWD='fastest' is not a forward path; use merged"):
        lora_b_linear(*args, 1.0)
    monkeypatch.setenv("SEGPCL_LORA_FWD", "merged")
    monkeypatch.setenv("SEGPCL_LORA_BWD", "cublas")  # refused by the forward, before any work
    with pytest.raises(RuntimeError, match="SEGPCL_LORA_BWD='cublas' is not a backward path; use merged"):
        lora_b_linear(*args, 1.0)


def test_empty_batch_and_rank_zero(lora_path):
    x, weight, bias, lora_A, lora_B = make_inputs((0,), 24, 40, 4)
    y, gx, gB = forward_backward(lora_b_linear, x, weight, bias, lora_A, lora_B, 0.5)
    assert y.shape == (0, 40) and gx.shape == (0, 24)
    torch.testing.assert_close(gB, torch.zeros_like(gB))  # no rows: no gradient, not garbage
    with pytest.raises(RuntimeError, match="rank must be >= 1"):
        lora_b_linear(*make_inputs((3,), 8, 8, 1)[:3], torch.zeros(0, 8), torch.zeros(8, 0), 1.0)


def test_a_layer_with_no_features_is_refused_by_every_entry():
    """out = 0 made the backward's row check divide by zero (SIGFPE: the process died, no traceback);
    in = 0 failed in a reshape. Now one message, from the wrapper and from the raw ops; run in a child
    so that a crash is a failed test, not a dead test session."""
    code = """
import torch, segpcl_fast.ops.lora_linear as L
from segpcl_fast.ops import dispatch
dispatch.set_backend("cpp")
msgs = []
for n_in, out in ((8, 0), (0, 8)):
    x, W, A, B = torch.randn(3, n_in), torch.randn(out, n_in), torch.randn(2, n_in), torch.randn(out, 2)
    for call in (lambda: L.lora_b_linear(x, W, None, A, B.requires_grad_(), 1.0),
                 lambda: torch.ops.segpcl.lora_b_linear_fwd(x, W, None, A, B, 1.0),
                 lambda: torch.ops.segpcl.lora_b_linear_bwd(torch.randn(3, out), torch.randn(3, 2), W, A, B,
                                                            1.0, True, True)):
        try:
            call()
            msgs.append("no error")
        except RuntimeError as exc:
            msgs.append(str(exc).splitlines()[0])
print("\\n".join(msgs))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().split("\n")
    assert len(lines) == 6, proc.stdout
    assert all("a layer needs at least one input and one output feature" in line for line in lines), lines


def test_u_is_not_differentiable_and_its_gradient_is_not_materialised():
    """u = x A^T is returned for the backward only. A gradient through it was silently dropped
    (grad of u.sum() w.r.t. x came out zero), and each backward made an (N, r) zeros tensor for it."""
    x, weight, bias, lora_A, lora_B = make_inputs((5,), 24, 40, 4)
    y, u = torch.ops.segpcl.lora_b_linear_fwd(x, weight, bias, lora_A, lora_B, 0.5)
    assert y.requires_grad and not u.requires_grad
    ran = backward_ops(y)
    assert "segpcl.lora_b_linear_bwd.default" in ran
    assert not any("zeros" in name or "fill" in name for name in ran), ran


def test_the_ops_name_the_module_of_their_fake_kernels():
    """A process that loads _C but not segpcl_fast (torch.ops.load_library, torch.export.load) gets
    torch's message naming segpcl_fast.ops._ext (TORCH_LIBRARY's set_python_module), not 'unsupported'."""
    from segpcl_fast.ops import _ext
    code = f"""
import sys, torch
from torch._subclasses.fake_tensor import FakeTensorMode
torch.ops.load_library({_ext._C.__file__!r})
assert "segpcl_fast" not in sys.modules
args = lambda: (torch.randn(4, 8), torch.randn(6, 8), None, torch.randn(2, 8), torch.randn(6, 2), 1.0)
try:
    with FakeTensorMode():
        torch.ops.segpcl.lora_b_linear_fwd(*args())
except Exception as exc:
    print("before:", str(exc.__context__ or exc).replace(chr(10), " "))
import segpcl_fast.ops._ext
with FakeTensorMode():
    y, u = torch.ops.segpcl.lora_b_linear_fwd(*args())
print("after:", tuple(y.shape), tuple(u.shape))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = proc.stdout.strip().splitlines()
    assert "import the 'segpcl_fast.ops._ext' Python module" in before, before
    assert after == "after: (4, 6) (4, 2)"


def test_grad_flags_skip_unneeded_grads(lora_path):
    x, weight, bias, lora_A, lora_B = make_inputs()
    y = lora_b_linear(x.detach(), weight, bias, lora_A, lora_B, 0.5)  # only B needs a grad
    (gB,) = torch.autograd.grad(y.sum(), lora_B)
    ref = lora_b_linear_reference(x.detach(), weight, bias, lora_A, lora_B, 0.5)
    torch.testing.assert_close(gB, torch.autograd.grad(ref.sum(), lora_B)[0])
    y = lora_b_linear(x, weight, bias, lora_A, lora_B.detach(), 0.5)   # frozen B (teacher, DPGD)
    (gx,) = torch.autograd.grad(y.sum(), x)
    ref = lora_b_linear_reference(x, weight, bias, lora_A, lora_B.detach(), 0.5)
    torch.testing.assert_close(gx, torch.autograd.grad(ref.sum(), x)[0])
    u = torch.randn(15, 4)
    g = torch.randn(15, 40)
    gx_only, gB_empty = torch.ops.segpcl.lora_b_linear_bwd(g, u, weight, lora_A, lora_B.detach(), 0.5, True, False)
    assert gx_only.shape == (15, 24) and gB_empty.numel() == 0


@pytest.mark.parametrize("backend", ["cpp", "auto", "reference"])
@pytest.mark.parametrize("lead", [(3, 5), (7,)])
def test_the_output_takes_an_in_place_update_as_a_linear_s_does(backend, lead, lora_path):
    """`y += bias` on the output under autograd (timm's EvaAttention adds its q/v biases so) must work
    and differentiate as out of place: an output that is a view made inside the op would be refused."""
    inputs, with_inplace_bias, (ry, rgx, rgB) = in_place_bias_case(lead)
    with dispatch.backend(backend):
        y, gx, gB = forward_backward(with_inplace_bias, *inputs, 0.5)
    torch.testing.assert_close(y, ry, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, rgx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gB, rgB, rtol=1e-5, atol=1e-5)


def test_opcheck_forward_and_backward_ops(lora_path):
    x, weight, bias, lora_A, lora_B = make_inputs((2, 3))
    torch.library.opcheck(torch.ops.segpcl.lora_b_linear_fwd.default, (x, weight, bias, lora_A, lora_B, 0.5))
    torch.library.opcheck(torch.ops.segpcl.lora_b_linear_fwd.default, (x, weight, None, lora_A, lora_B, 0.5))
    g, u = torch.randn(2, 3, 40), torch.randn(2, 3, 4)
    for flags in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(torch.ops.segpcl.lora_b_linear_bwd.default,
                              (g, u, weight, lora_A, lora_B.detach(), 0.5, *flags))
    # the backward op on tensors that require grad (a direct call): an autograd kernel that refuses
    g.requires_grad_()
    torch.library.opcheck(torch.ops.segpcl.lora_b_linear_bwd.default, (g, u, weight, lora_A, lora_B.detach(), 0.5,
                                                                        True, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    for dtype in (torch.float32, torch.bfloat16):
        gx, gB = torch.ops.segpcl.lora_b_linear_bwd(g.to(dtype), u.to(dtype), weight.to(dtype), lora_A.to(dtype),
                                                    lora_B.detach().to(dtype), 0.5, True, True)
        with pytest.raises(RuntimeError, match="lora_b_linear_bwd is not differentiable"):
            gx.float().sum().backward()


def test_constants_that_require_grad_are_refused_on_every_path():
    """tau, scaling and the PGD step's bounds are constants of the ops: no fast path differentiates
    them, so a tensor that requires grad is refused (the reference alone would have given it one)."""
    from segpcl_fast import ops as ops_
    tau = torch.tensor(2.0, requires_grad=True)
    x, weight, bias, lora_A, lora_B = make_inputs((2, 3))
    z = torch.randn(3, 5)
    e, idx = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1), torch.tensor([[1, 2], [0, 3]])
    for backend in ("reference", "auto"):
        with dispatch.backend(backend):
            with pytest.raises(ValueError, match="anchor_kl: tau is a constant"):
                ops_.anchor_kl(z, z, tau)
            with pytest.raises(ValueError, match="knn_subgraph_kl: tau is a constant"):
                ops_.knn_subgraph_kl(e, torch.tensor([4, 5]), idx, torch.log_softmax(torch.randn(2, 2), -1), tau)
            with pytest.raises(ValueError, match="lora_b_linear: scaling is a constant"):
                lora_b_linear(x, weight, bias, lora_A, lora_B, tau)
            img = torch.randn(1, 3, 4, 4)
            with pytest.raises(ValueError, match="pgd_step: eps is a constant"):
                ops_.pgd_step(img, img, img, 0.1, torch.full((3,), 0.5, requires_grad=True), -1.0, 1.0)
    assert float(ops_.anchor_kl(z, z + 1, tau.detach())) >= 0  # detached: a constant again


def test_direct_calls_of_the_fused_ops_refuse_frozen_inputs_that_require_grad(lora_path):
    """The ops' backwards give grad_x and grad_B only; a direct torch.ops call (which skips the wrapper's
    argument checks) with W, b or A requiring grad is refused, not left with a .grad of None."""
    x, weight, bias, lora_A, lora_B = make_inputs((2, 3))
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A)):
        args = [x, weight, bias, lora_A, lora_B]
        args[("weight", "bias", "lora_A").index(name) + 1] = t.detach().clone().requires_grad_()
        with pytest.raises(RuntimeError, match=f"{name} require"):
            torch.ops.segpcl.lora_b_linear_fwd(*args, 0.5)


def test_gradcheck_float64(lora_path):
    x, weight, bias, lora_A, lora_B = make_inputs((2, 3), 6, 10, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x_, b_: lora_b_linear(x_, weight, bias, lora_A, b_, 1.3),
                                    (x, lora_B))
    assert dispatch.last_choice()["lora_b_linear"] == "cpp"


def test_saves_u_not_x():
    x, weight, bias, lora_A, lora_B = make_inputs((4, 6), 32, 48, 4)
    check_saves_u_not_x(lora_b_linear, x, weight, bias, lora_A, lora_B)
    # The check can fail: autograd saves x as soon as it needs x for a weight gradient (here: A
    # trainable, as in standard LoRA).
    trainable_A = lora_A.clone().requires_grad_()
    _, ref_saved = saved_tensors(lora_b_linear_reference, x, weight, bias, trainable_A, lora_B, 0.5)
    assert any(t.data_ptr() == x.data_ptr() for t in ref_saved)


class _TwoLoraLayers(torch.nn.Module):
    def __init__(self, n_in=16, n_hidden=32, rank=4):
        super().__init__()
        self.w1, self.w2 = torch.nn.Linear(n_in, n_hidden), torch.nn.Linear(n_hidden, n_in)
        self.w1.requires_grad_(False), self.w2.requires_grad_(False)
        self.a1 = torch.nn.Parameter(torch.randn(rank, n_in) * 0.3, requires_grad=False)
        self.a2 = torch.nn.Parameter(torch.randn(rank, n_hidden) * 0.3, requires_grad=False)
        self.b1 = torch.nn.Parameter(torch.randn(n_hidden, rank) * 0.3)
        self.b2 = torch.nn.Parameter(torch.randn(n_in, rank) * 0.3)

    def forward(self, x):
        h = torch.nn.functional.gelu(lora_b_linear(x, self.w1.weight, self.w1.bias, self.a1, self.b1, 2.0))
        return lora_b_linear(h, self.w2.weight, self.w2.bias, self.a2, self.b2, 2.0)


@pytest.mark.parametrize("under_compile", ["merged", "cpp"])
def test_compile_has_no_graph_breaks_and_matches_eager(under_compile, monkeypatch):
    """Eager runs the C++ op; compiled runs what SEGPCL_LORA_COMPILE names (cpp: the custom op
    through its fake kernel and registered autograd)."""
    monkeypatch.setenv("SEGPCL_LORA_COMPILE", under_compile)
    torch._dynamo.reset()
    dispatch.set_backend("auto")  # the fixture restores "cpp" afterwards
    model = _TwoLoraLayers()
    x = torch.randn(2, 5, 16, requires_grad=True)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    grads = (x.grad.clone(), model.b1.grad.clone(), model.b2.grad.clone())
    x.grad = None
    model.zero_grad()
    y_eager = model(x)
    y_eager.square().sum().backward()
    torch.testing.assert_close(y, y_eager)
    for got, want in zip(grads, (x.grad, model.b1.grad, model.b2.grad)):
        torch.testing.assert_close(got, want)


def test_autocast_casts_like_linear():
    check_autocast_casts_like_linear(lora_b_linear)


def test_bad_shapes_raise_clear_errors():
    x, weight, bias, lora_A, lora_B = make_inputs()
    with pytest.raises(RuntimeError, match="lora_A must be"):
        lora_b_linear(x, weight, bias, lora_A[:, :-1], lora_B, 0.5)
    with pytest.raises(RuntimeError, match="lora_B must be"):
        lora_b_linear(x, weight, bias, lora_A, lora_B[:-1], 0.5)
    with pytest.raises(RuntimeError, match="dtype"):
        lora_b_linear(x, weight.double(), bias, lora_A, lora_B, 0.5)
    # the backward op called directly: its own checks name it, before any kernel runs
    g, u = torch.randn(x.shape[0], 40), torch.randn(x.shape[0], lora_A.shape[0])
    bad = [((g, u, weight, lora_A[:, :-1], lora_B.detach()), "lora_A must be \\(r, in\\)"),
           ((g, u, weight[0], lora_A, lora_B.detach()), "weight must be 2-D"),
           ((g, u, weight, lora_A[0], lora_B.detach()), "lora_A must be 2-D"),
           ((g, u, weight, lora_A, lora_B.detach()[0]), "lora_B must be 2-D")]
    for args, message in bad:
        with pytest.raises(RuntimeError, match=f"lora_b_linear_bwd: {message}"):
            torch.ops.segpcl.lora_b_linear_bwd(*args, 0.5, True, True)


@pytest.mark.parametrize("backend, b_grad", [("reference", True), ("cpp", True), ("auto", False)],
                         ids=["reference", "cpp", "merged"])
def test_every_path_refuses_bad_arguments_with_one_message(backend, b_grad):
    """The reference ran on anything torch would (int64, a trainable A: then A trained on this path
    only) and the C++ op named no tensor in a dtype error; every path now checks alike."""
    if backend == "cpp" and not has_kernel("cpu"):
        pytest.skip("segpcl_fast._C is not built")
    x, weight, bias, lora_A, lora_B = make_inputs()
    lora_B = lora_B.detach().requires_grad_(b_grad)
    trained = lambda t: t.detach().clone().requires_grad_(True)  # noqa: E731  (a copy: the others stay frozen)
    cases = [((x, weight, bias, lora_A.double(), lora_B), r"lora_A is torch.float64 on cpu, x is torch.float32"),
             ((x.detach().long(), weight.long(), bias.long(), lora_A.long(), lora_B.detach().long()),
              "x must be a floating tensor, got torch.int64"),
             ((x, weight, bias, trained(lora_A), lora_B), r": lora_A requires grad, but this op trains lora_B "
              r"only.*\.requires_grad_\(False\)"),
             ((x, trained(weight), trained(bias), lora_A, lora_B), ": weight, bias require grad")]
    dispatch.reset_choices()
    with dispatch.backend(backend):
        for args, message in cases:
            with pytest.raises(RuntimeError, match=message):
                lora_b_linear(*args, 0.5)
        assert "lora_b_linear" not in dispatch.last_choice()  # a refused call ran nothing
        with torch.no_grad():  # nothing trains: frozen-ness is not asked
            lora_b_linear(x, trained(weight), bias, trained(lora_A), lora_B, 0.5)
        assert dispatch.last_choice()["lora_b_linear"] == {"reference": "reference", "cpp": "cpp", "auto": "merged"}[backend]


def test_reference_backend_forces_reference():
    args = make_inputs()
    with dispatch.backend("reference"):
        y = lora_b_linear(*args, 0.5)
    assert dispatch.last_choice()["lora_b_linear"] == "reference"
    torch.testing.assert_close(y, lora_b_linear_reference(*args, 0.5))


def test_auto_takes_cpp_when_B_trains_and_merged_when_it_does_not():
    x, weight, bias, lora_A, lora_B = make_inputs()
    with dispatch.backend("auto"):
        lora_b_linear(x, weight, bias, lora_A, lora_B, 0.5)
        assert dispatch.last_choice()["lora_b_linear"] == "cpp"
        for b_frozen, grad_mode in [(lora_B.detach(), True), (lora_B, False)]:  # frozen teacher; evaluation
            with torch.set_grad_enabled(grad_mode):
                y = lora_b_linear(x, weight, bias, lora_A, b_frozen, 0.5)
            assert dispatch.last_choice()["lora_b_linear"] == "merged"
            torch.testing.assert_close(y, lora_b_linear_reference(x, weight, bias, lora_A, lora_B, 0.5),
                                       rtol=1e-5, atol=1e-5)


def test_fallback_when_extension_missing(monkeypatch):
    from segpcl_fast.ops import _ext
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_load_error", "ImportError: simulated")
    args = make_inputs()
    with dispatch.backend("auto"):
        y = lora_b_linear(*args, 0.5)
    assert dispatch.last_choice()["lora_b_linear"] == "merged"  # the plain-PyTorch fast path
    torch.testing.assert_close(y, lora_b_linear_reference(*args, 0.5), rtol=1e-5, atol=1e-5)
    assert lora_linear.extension_status() == {"built": False, "cuda": False, "error": "ImportError: simulated"}
    with dispatch.backend("cpp"), pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        lora_b_linear(*args, 0.5)


@pytest.mark.parametrize("error", ["ImportError: No module named 'segpcl_fast._C'", None])
def test_eager_cuda_without_the_extensions_kernel_warns_once(monkeypatch, caplog, error):
    """A plain `pip install .` (isolated build: no extension) said nothing unless -v: eager training on CUDA then
    ran the merged arrangement instead of the C++ op. One warning says so, with why and the build command;
    not under torch.compile (merged is its choice anyway), not where B is frozen, and only once."""
    from types import SimpleNamespace
    from segpcl_fast.ops import _ext
    monkeypatch.setattr(_ext, "_C", None if error else SimpleNamespace(WITH_CUDA=False))  # None: a CPU-only build
    monkeypatch.setattr(_ext, "_load_error", error)
    monkeypatch.setattr(lora_linear, "_said_no_cuda_kernel", False)
    on_cuda = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)  # what the dispatch reads of x
    trained = torch.zeros(3, 2, requires_grad=True)
    with dispatch.backend("auto"), caplog.at_level("WARNING", logger="segpcl_fast.ops"):
        assert lora_linear.lora_b_linear_impl(on_cuda, trained, compiling=True) == "merged"
        assert lora_linear.lora_b_linear_impl(on_cuda, trained.detach(), compiling=False) == "merged"
        assert not caplog.records
        for _ in range(2):
            assert lora_linear.lora_b_linear_impl(on_cuda, trained, compiling=False) == "merged"
    (record,) = caplog.records
    assert record.getMessage().startswith(f"segpcl_fast._C has no CUDA kernel for lora_b_linear "
                                          f"({error or 'it was built without CUDA kernels'}): the LoRA layers run")
    assert "pip install --no-build-isolation ." in record.getMessage()


def test_an_extension_built_against_another_torch_says_so(monkeypatch, caplog):
    """A wheel's _C under another torch fails to import with 'undefined symbol': the status names
    the cause and the fix (it said only 'not built' before), and a warning says so once."""
    from segpcl_fast.ops import _ext

    def stale(name):
        raise ImportError(f"{name}: undefined symbol: _ZN3c1017RegisterOperators")
    monkeypatch.setattr(_ext.importlib, "import_module", stale)
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_load_error", None)
    _ext._load()
    error = _ext.extension_status()["error"]
    assert error.startswith(f"cannot be loaded, most likely built against another torch than this one "
                            f"({torch.__version__}; else another C++ / CUDA runtime): rebuild it with "
                            "`pip install --no-build-isolation .`") and "undefined symbol" in error
    assert "built against another torch" in caplog.text


def test_import_without_extension_in_fresh_process():
    """The real loader: with segpcl_fast._C unimportable, the package imports and falls back."""
    code = (
        "import sys; sys.modules['segpcl_fast._C'] = None\n"
        "import torch\n"
        "from segpcl_fast.ops import lora_b_linear, last_choice, lora_linear\n"
        "s = lora_linear.extension_status(); assert not s['built'] and 'segpcl_fast._C' in s['error'], s\n"
        "y = lora_b_linear(torch.ones(2, 3), torch.ones(4, 3), None, torch.ones(1, 3), torch.ones(4, 1), 0.5)\n"
        "assert last_choice()['lora_b_linear'] == 'merged'\n"
        "assert torch.equal(y, torch.full((2, 4), 4.5)), y\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("value,ok", [("reference", True), ("", True), ("bogus", False)])
def test_segpcl_ops_sets_the_starting_backend_and_rejects_unknown_values(value, ok):
    code = "from segpcl_fast.ops import dispatch; print(dispatch.get_backend())"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), SEGPCL_OPS=value)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    if ok:
        assert result.returncode == 0 and result.stdout.strip() == (value or "auto"), result.stderr[-2000:]
    else:
        assert result.returncode != 0 and "SEGPCL_OPS='bogus' is not an ops backend" in result.stderr
