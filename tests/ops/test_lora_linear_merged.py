"""The plain-PyTorch merged LoRA-B linear (what "auto" runs under torch.compile and without the
extension) against the reference: values, grads, low precision, saved tensors, torch.compile.
Needs no extension: these tests run under SEGPCL_NO_EXT=1 too."""
from __future__ import annotations

import pytest
import torch

from segpcl_fast.ops import _ext, dispatch, lora_linear
from segpcl_fast.ops.lora_linear import lora_b_linear, lora_b_linear_merged, lora_b_linear_reference

from lora_cases import (saved_tensors, backward_ops, check_autocast_casts_like_linear, check_saves_u_not_x, forward_backward, in_place_bias_case, make_inputs,
                        small_update_slopes, upcast)

SHAPES = [((3, 5), 24, 40, 4), ((7,), 40, 24, 4), ((2, 150), 32, 96, 8), ((), 16, 16, 2)]


@pytest.mark.parametrize("lead,n_in,n_out,rank", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference_fp32(lead, n_in, n_out, rank, bias):
    args = make_inputs(lead, n_in, n_out, rank, bias=bias)
    got = forward_backward(lora_b_linear_merged, *args, 0.75)
    want = forward_backward(lora_b_linear_reference, *args, 0.75)
    assert got[0].shape == (*lead, n_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_hand_computed_values():
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    bias = torch.tensor([0.5, 0.0, -1.0])
    lora_A = torch.tensor([[1.0, -1.0]])
    lora_B = torch.tensor([[2.0], [0.0], [1.0]], requires_grad=True)
    y = lora_b_linear_merged(x, weight, bias, lora_A, lora_B, 0.5)
    # W + s B A = [[2, -1], [0, 1], [1.5, 0.5]]; x (W + s B A)^T + b = [0.5, 2, 1.5]
    torch.testing.assert_close(y, torch.tensor([[0.5, 2.0, 1.5]]))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[3.5, 0.5]]))   # 1 (W + s B A)
    torch.testing.assert_close(lora_B.grad, torch.full((3, 1), -0.5))  # s 1^T u, u = -1


def test_gradcheck_float64():
    x, weight, bias, lora_A, lora_B = make_inputs((2, 3), 6, 10, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x_, b_: lora_b_linear_merged(x_, weight, bias, lora_A, b_, 1.3),
                                    (x, lora_B))


def test_grad_flags_skip_unneeded_grads():
    x, weight, bias, lora_A, lora_B = make_inputs()
    for x_, b_, wrt in [(x.detach(), lora_B, "B"), (x, lora_B.detach(), "x")]:  # student / frozen B (DPGD)
        inputs = (b_,) if wrt == "B" else (x_,)
        got = torch.autograd.grad(lora_b_linear_merged(x_, weight, bias, lora_A, b_, 0.5).sum(), inputs)
        want = torch.autograd.grad(lora_b_linear_reference(x_, weight, bias, lora_A, b_, 0.5).sum(), inputs)
        torch.testing.assert_close(got, want)


def test_empty_batch_and_rank_zero():
    x, weight, bias, lora_A, lora_B = make_inputs((0,), 24, 40, 4)
    y, gx, gB = forward_backward(lora_b_linear_merged, x, weight, bias, lora_A, lora_B, 0.5)
    assert y.shape == (0, 40) and gx.shape == (0, 24)
    torch.testing.assert_close(gB, torch.zeros_like(gB))
    for b in (torch.zeros(8, 0), torch.zeros(8, 0, requires_grad=True)):  # both branches check
        with pytest.raises(RuntimeError, match="rank must be >= 1"):
            lora_b_linear_merged(*make_inputs((3,), 8, 8, 1)[:3], torch.zeros(0, 8), b, 1.0)


@pytest.mark.parametrize("b_grad", [True, False])
def test_bad_arguments_raise_the_c_ops_errors(b_grad):
    x, weight, bias, lora_A, lora_B = make_inputs()
    lora_B = lora_B.detach().requires_grad_(b_grad)
    cases = [((x, weight, bias, lora_A[:, :-1], lora_B), r"lora_A must be \(r, in\)"),
             ((x, weight, bias, lora_A, lora_B[:-1]), r"lora_B must be \(out, r\)"),
             ((x[..., :-1], weight, bias, lora_A, lora_B), "x's last dimension"),
             ((x, weight, bias[:-1], lora_A, lora_B), "bias must be 1-D"),
             ((x, weight.double(), bias, lora_A, lora_B), "must share x's dtype")]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            lora_b_linear_merged(*args, 0.5)


def test_frozen_B_is_one_gemm_and_saves_no_activation():
    """B needs no gradient (teacher in DPGD, evaluation): no u; grad_x still exact."""
    x, weight, bias, lora_A, lora_B = make_inputs((4, 6), 32, 48, 4)
    frozen = lora_B.detach()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lora_b_linear_merged(x, weight, bias, lora_A, frozen, 0.5)
    assert all(t.shape[:-1] != x.shape[:-1] for t in saved), [t.shape for t in saved]  # neither x nor u
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    y_ref = lora_b_linear_reference(x, weight, bias, lora_A, frozen, 0.5)
    (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)


def test_backward_makes_no_zeros_for_u():
    """u is marked non-differentiable and grads are not materialised: each backward made an (N, r)
    zeros tensor for u's gradient; and B's gradient is scaled in the GEMM (addmm alpha), not after."""
    x, weight, bias, lora_A, lora_B = make_inputs((5,), 24, 40, 4)
    ran = backward_ops(lora_b_linear_merged(x, weight, bias, lora_A, lora_B, 0.5))
    assert "aten.addmm.default" in ran
    assert not any("zeros" in name or "fill" in name or name.startswith("aten.mul") for name in ran), ran
    assert lora_B.grad is not None and x.grad is not None


def test_saves_u_not_x(monkeypatch):
    """u and the merged weight by default (kept for grad_x); u and the parameters alone with
    SEGPCL_LORA_MERGED_BACKWARD=recompute, whose backward forms W + s B A again."""
    check_saves_u_not_x(lora_b_linear_merged, *make_inputs((4, 6), 32, 48, 4), merged_weight=True)
    monkeypatch.setenv("SEGPCL_LORA_MERGED_BACKWARD", "recompute")
    check_saves_u_not_x(lora_b_linear_merged, *make_inputs((4, 6), 32, 48, 4))


def test_no_merged_weight_is_kept_where_x_needs_no_gradient():
    """A tower's first LoRA layer sees frozen embeddings: no grad_x, so the merged weight kept for it
    would only hold memory until the backward."""
    x, weight, bias, lora_A, lora_B = make_inputs((4, 6), 32, 48, 4)
    x = x.detach()
    _, saved = saved_tensors(lora_b_linear_merged, x, weight, bias, lora_A, lora_B, 0.5)
    assert not any(t.shape == weight.shape and t.data_ptr() != weight.data_ptr() for t in saved)
    y = lora_b_linear_merged(x, weight, bias, lora_A, lora_B, 0.5)
    (grad_B,) = torch.autograd.grad(y.square().sum(), lora_B)
    (want,) = torch.autograd.grad(lora_b_linear_reference(x, weight, bias, lora_A, lora_B, 0.5).square().sum(), lora_B)
    torch.testing.assert_close(grad_B, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("choice", ["keep", "recompute"])
def test_both_merged_backwards_equal_the_reference(monkeypatch, choice):
    monkeypatch.setenv("SEGPCL_LORA_MERGED_BACKWARD", choice)
    x, weight, bias, lora_A, lora_B = make_inputs((3, 5), 24, 40, 4, dtype=torch.float64)
    ours = forward_backward(lora_b_linear_merged, x, weight, bias, lora_A, lora_B, 0.5)
    ref = forward_backward(lora_b_linear_reference, x, weight, bias, lora_A, lora_B, 0.5)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    ran = backward_ops(lora_b_linear_merged(*make_inputs((5,), 24, 40, 4), 0.5))
    assert ran.count("aten.addmm.default") == (1 if choice == "keep" else 2), ran  # grad_B (+ W + s B A again)


def test_an_unknown_merged_backward_is_refused(monkeypatch):
    monkeypatch.setenv("SEGPCL_LORA_MERGED_BACKWARD", "lazy")
    with pytest.raises(ValueError, match="SEGPCL_LORA_MERGED_BACKWARD='lazy' is unknown"):
        lora_b_linear_merged(*make_inputs((5,), 24, 40, 4), 0.5)


def on_cuda(*values):
    """A parameter set whose first value is "cuda": marked gpu, skipped without a CUDA device."""
    return pytest.param("cuda", *values, marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device")])


# (device, lead, in, out, rank): on CUDA the sizes of the C++ op's CUDA tests
TRUTH_CASES = [("cpu", (4, 64), 96, 160, 8)] + [on_cuda(*case) for case in [
    ((4, 197), 768, 3072, 32), ((333,), 3072, 768, 32), ((1000,), 200, 130, 64), ((5000,), 96, 64, 8)]]


@pytest.mark.parametrize("device,lead,n_in,n_out,rank", TRUTH_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_error_against_float64_no_worse_than_reference(device, lead, n_in, n_out, rank, dtype):
    """Against a float64 ground truth, the merged path's error stays within the plain-PyTorch
    reference's error at the same precision."""
    args = make_inputs(lead, n_in, n_out, rank, dtype=dtype, device=device)
    ours = forward_backward(lora_b_linear_merged, *args, 2.0)
    low_ref = forward_backward(lora_b_linear_reference, *args, 2.0)
    g = torch.randn(ours[0].shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    truth = forward_backward(lora_b_linear_reference, *upcast(args), 2.0, grad_out=g.double())
    for got, ref, exact in zip(ours, low_ref, truth):
        assert got.dtype == dtype and got.shape == exact.shape
        err = (got.double() - exact).abs().max().item()
        ref_err = (ref.double() - exact).abs().max().item()
        assert err <= 2.0 * ref_err + 1e-4 * exact.abs().max().item(), (err, ref_err)


@pytest.mark.parametrize("bscale", [1e-3, 3e-4])
def test_bf16_keeps_small_updates_at_least_as_well_as_the_reference(bscale):
    ours, ref = small_update_slopes(lora_b_linear_merged, lora_b_linear_reference, bscale)
    assert ref < 0.95
    assert ref - 0.02 <= ours <= 1.02, (ours, ref)


def test_autocast_casts_like_linear():
    check_autocast_casts_like_linear(lora_b_linear_merged)


def test_auto_runs_merged_without_the_extension(monkeypatch):
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_load_error", "ImportError: simulated")
    args = make_inputs()
    with dispatch.backend("auto"):
        y = lora_b_linear(*args, 0.5)
    assert dispatch.last_choice()["lora_b_linear"] == "merged"
    torch.testing.assert_close(y, lora_b_linear_reference(*args, 0.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("lead", [(3, 5), (7,), ()])
def test_the_output_takes_an_in_place_update_as_a_linear_s_does(lead, compiled, monkeypatch):
    """`y += extra` on the merged arrangement's output (what "auto" runs under torch.compile and without the
    extension), as test_lora_linear.py asks of the C++ op: F.linear with a bias on a (..., in) input returns a
    view of its 2-D addmm, and an autograd.Function's output that is a view refuses an in-place update
    ("Output 0 of _MergedLoRABLinear is a view and is being modified inplace")."""
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_load_error", "ImportError: simulated")
    inputs, with_inplace_bias, want = in_place_bias_case(lead)
    torch._dynamo.reset()
    fn = torch.compile(with_inplace_bias, backend="aot_eager", fullgraph=True) if compiled else with_inplace_bias
    with dispatch.backend("auto"):
        got = forward_backward(fn, *inputs, 0.5)
    if not compiled:
        assert dispatch.last_choice()["lora_b_linear"] == "merged"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def _traced_targets(fn, *args):
    """The ops in the graph dynamo captures for fn(*args), subgraphs (autograd.Function bodies) included."""
    targets = []

    def backend(gm, example_inputs):
        for module in gm.modules():
            if isinstance(module, torch.fx.GraphModule):
                targets.extend(str(n.target) for n in module.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return out, targets


@pytest.mark.parametrize("setting,opaque", [(None, False), ("merged", False), ("cpp", True)])
def test_under_compile_auto_traces_merged_unless_told_cpp(setting, opaque, monkeypatch):
    """Under torch.compile "auto" hands inductor the merged arrangement's aten ops; with
    SEGPCL_LORA_COMPILE=cpp (and the extension built) the opaque C++ op instead."""
    if setting is None:
        monkeypatch.delenv("SEGPCL_LORA_COMPILE", raising=False)
    else:
        monkeypatch.setenv("SEGPCL_LORA_COMPILE", setting)
    if opaque and not lora_linear.extension_status()["built"]:
        pytest.skip("SEGPCL_LORA_COMPILE=cpp needs the extension")
    args = make_inputs((2, 5), 16, 24, 4)
    with dispatch.backend("auto"):
        y, targets = _traced_targets(lora_b_linear, *args, 0.5)
    assert any("segpcl.lora_b_linear_fwd" in t for t in targets) == opaque, targets
    assert any("linear" in t or "addmm" in t for t in targets)
    torch.testing.assert_close(y, lora_b_linear_reference(*args, 0.5), rtol=1e-5, atol=1e-5)


def test_unknown_compile_setting_names_the_choices(monkeypatch):
    """Refused by the compile settings, in eager code, before anything is traced (an error raised
    while tracing reaches the user as dynamo's "Observed exception", its message dropped, on torch 2.6;
    2.11 and 2.14 keep it), and by the trace itself where the C++ op could run."""
    from segpcl_fast.engine.compiling import CompileSettings
    monkeypatch.setenv("SEGPCL_LORA_COMPILE", "fastest")
    with pytest.raises(ValueError, match="SEGPCL_LORA_COMPILE='fastest'.*merged"):
        CompileSettings.from_env()
    if not lora_linear.extension_status()["built"] or torch.__version__ < (2, 11):
        return  # the trace reads the setting only where the C++ op could run; checked on 2.11+ (above)
    with dispatch.backend("auto"), pytest.raises(Exception, match="SEGPCL_LORA_COMPILE='fastest'.*merged"):
        torch._dynamo.reset()
        torch.compile(lora_b_linear, backend="aot_eager", fullgraph=True)(*make_inputs(), 0.5)


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), on_cuda(torch.float32), on_cuda(torch.bfloat16)])
def test_inductor_compiles_it_with_no_graph_break_and_matches_eager(device, dtype):
    """Real code generation (inductor: C++ on the CPU, Triton on CUDA), forward and backward,
    against the eager reference."""
    x, weight, bias, lora_A, lora_B = make_inputs((2, 7), 32, 48, 4, dtype=dtype, device=device)
    explanation = torch._dynamo.explain(lora_b_linear_merged)(x, weight, bias, lora_A, lora_B, 0.5)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(lora_b_linear_merged, fullgraph=True)
    got = forward_backward(compiled, x, weight, bias, lora_A, lora_B, 0.5)
    want = forward_backward(lora_b_linear_reference, x, weight, bias, lora_A, lora_B, 0.5)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


def test_the_parts_scripts_experiments_compute_the_op():
    """benchmarks/lora_parts_cuda.py times a variant that keeps W + s B A for backward; on the GPU its
    time is only worth comparing if it computes the same y, grad_x and grad_B (float64, vs the reference)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from lora_parts_cuda import ConcatKeep, KeepMerged, split_k_gtu
    x, weight, bias, lora_A, lora_B = make_inputs((3, 5), 24, 40, 4, dtype=torch.float64)
    ref = forward_backward(lora_b_linear_reference, x, weight, bias, lora_A, lora_B, 0.5)
    for experiment in (KeepMerged, ConcatKeep):
        ours = forward_backward(experiment.apply, x, weight, bias, lora_A, lora_B, 0.5)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b)
    g, u = torch.randn(37, 12, dtype=torch.float64), torch.randn(37, 5, dtype=torch.float64)
    for splits in (1, 4, 8):  # 37 rows: a remainder past the last whole chunk
        torch.testing.assert_close(split_k_gtu(g, u, splits), g.T @ u)


@pytest.mark.parametrize("choice, backward_gemms", [("keep", 2), ("recompute", 3)])
def test_under_compile_the_backward_graph_uses_the_kept_merged_weight(monkeypatch, choice, backward_gemms):
    """AOTAutograd's backward graph of the merged arrangement: grad_x = g M and grad_B = s g^T u, and
    with SEGPCL_LORA_MERGED_BACKWARD=recompute a third GEMM forming M = W + s B A again."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    monkeypatch.setenv("SEGPCL_LORA_MERGED_BACKWARD", choice)
    graphs = {}

    def keep(name):
        def compiler(gm, _inputs):
            graphs[name] = [(str(n.target), tuple(getattr(n.meta.get("val"), "shape", ())))
                            for n in gm.graph.nodes if n.op == "call_function"]
            return make_boxed_func(gm.forward)
        return compiler
    x, weight, bias, lora_A, lora_B = make_inputs((2, 5), 16, 24, 4)
    torch._dynamo.reset()
    compiled = torch.compile(lora_b_linear_merged, backend=aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw")),
                             fullgraph=True)
    got = forward_backward(compiled, x, weight, bias, lora_A, lora_B, 0.5)
    gemms = [(t, shape) for t, shape in graphs["bw"] if t.split(".")[1] in ("mm", "addmm", "bmm")]
    # the merged weight (out x in = 24 x 16) formed again in the backward only with recompute; torch 2.6's
    # partitioner also recomputes u = x A^T there (one more GEMM, of another shape), torch 2.14's keeps it
    assert sum(shape == (24, 16) for _, shape in gemms) == backward_gemms - 2, graphs["bw"]
    assert len(gemms) >= backward_gemms, graphs["bw"]
    want = forward_backward(lora_b_linear_reference, x, weight, bias, lora_A, lora_B, 0.5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), on_cuda(torch.float32), on_cuda(torch.bfloat16)])
def test_overlap_on_a_second_stream_changes_no_value(device, dtype, monkeypatch):
    """SEGPCL_LORA_OVERLAP=1 moves u = x A^T and g^T u onto a second CUDA stream: the same kernels on
    the same inputs, so y, grad_x and grad_B are bit for bit those of one stream (on the CPU it is
    ignored). Repeated, so that a missing stream wait (a read of g or u before it is written, memory
    handed out while the other stream reads it) has chances to show."""
    args = make_inputs((4, 197), 96, 160, 8, dtype=dtype, device=device)
    want = forward_backward(lora_b_linear_merged, *args, 0.5)
    monkeypatch.setenv("SEGPCL_LORA_OVERLAP", "1")
    for _ in range(5):
        got = forward_backward(lora_b_linear_merged, *args, 0.5)
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    if device == "cuda":
        assert lora_linear._side_stream(args[0]) is not None
    monkeypatch.setenv("SEGPCL_LORA_OVERLAP", "yes")
    with pytest.raises(ValueError, match="SEGPCL_LORA_OVERLAP='yes' must be 0 or 1"):
        lora_b_linear_merged(*args, 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_merge_inside_compiled_graphs_is_an_mm_rounded_once(monkeypatch, dtype):
    """While torch.compile traces, merged_weight forms W + s B A as an mm in fp32 (fp64 for fp64) and one
    rounding to W's dtype, the form inductor's batch_linear_post_grad pass batches across layers; its
    values are addmm's up to summation order (one rounding both). SEGPCL_COMPILE_BATCH_MERGE=0 keeps addmm."""
    from segpcl_fast.ops import lora_linear
    g = torch.Generator().manual_seed(0)
    w, b_, a = (torch.randn(*s, generator=g).to(dtype) for s in ((48, 40), (48, 8), (8, 40)))
    reference = torch.addmm(w.double(), b_.double(), a.double(), alpha=0.5).to(dtype)  # exact, rounded once
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    seen = []
    monkeypatch.setattr(torch, "addmm", lambda *args, **kw: seen.append("addmm") or torch.ops.aten.addmm(*args, **kw))
    merged = lora_linear.merged_weight(w, a, b_, 0.5)
    assert seen == [] and merged.dtype == dtype
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2 ** -7}[dtype]  # about 1 ulp
    torch.testing.assert_close(merged, reference, rtol=tolerance, atol=tolerance)
    monkeypatch.setenv("SEGPCL_COMPILE_BATCH_MERGE", "0")
    lora_linear.merged_weight(w, a, b_, 0.5)
    assert seen == ["addmm"]


def test_compiled_code_calls_no_is_autocast_available(monkeypatch):
    """torch 2.11's dynamo cannot trace torch.amp.is_autocast_available (the device's torch: a graph break in
    every compiled LoRA layer and TSGR loss, which torch 2.14's CI does not show): compiled code must not call
    it. Recorded here by a wrapper that notes whether it ran while dynamo traced."""
    from segpcl_fast import ops
    traced_calls = []
    real = torch.amp.is_autocast_available
    monkeypatch.setattr(torch.amp, "is_autocast_available",
                        lambda device_type: traced_calls.append(torch.compiler.is_compiling()) or real(device_type))
    x, weight, bias, lora_A, lora_B = make_inputs((4,), 16, 24, 4)
    emb = torch.nn.functional.normalize(torch.randn(9, 8), dim=-1).requires_grad_()
    roots, neighbors = torch.tensor([0, 4]), torch.tensor([[1, 2], [3, 5]])
    ref = torch.log_softmax(torch.randn(2, 2), -1)

    def step(x, B, emb):
        tsgr = ops.knn_subgraph_kl(emb, roots, neighbors, ref, 0.5)
        return lora_b_linear(x, weight, bias, lora_A, B, 0.5).sum() + tsgr
    torch._dynamo.reset()
    try:
        loss = torch.compile(step, fullgraph=True, backend="eager")(x, lora_B, emb)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(loss, step(x, lora_B, emb))
    assert True not in traced_calls
