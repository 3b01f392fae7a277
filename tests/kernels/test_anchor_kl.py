"""anchor_kl: Triton kernel vs reference vs torch's kl_div, gradients, NaN/inf, opcheck, compile."""
import math

import pytest
import torch
import torch.nn.functional as F

from segpcl_fast import ops
from segpcl_fast.ops._kernels import load_kernel

kernel = load_kernel("anchor_kl")

TAU = 20.0


def _logits(rows, cols, dtype, device, seed, scale=30.0):
    g = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(rows, cols, generator=g)
    teacher = student + 0.5 * scale * torch.randn(rows, cols, generator=g)
    return student.to(device=device, dtype=dtype), teacher.to(device=device, dtype=dtype)


def _count_launches(monkeypatch, name):
    """Replace kernel.<name> by a wrapper that records each launch's grid; returns that list."""
    launches = []
    real = getattr(kernel, name)

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(kernel, name, Counting())
    return launches


def _grad(fn, student, *args):
    student = student.detach().clone().requires_grad_(True)
    loss = fn(student, *args)
    loss.backward()
    return loss.detach(), student.grad


@pytest.mark.parametrize("rows,cols", [(1, 1), (5, 3), (37, 100), (8, 999)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("teacher_is_logprob", [False, True])
def test_matches_reference(rows, cols, dtype, teacher_is_logprob, device, triton_backend):
    student, teacher = _logits(rows, cols, dtype, device, seed=rows * cols)
    if teacher_is_logprob:
        teacher = F.log_softmax(teacher.float() / TAU, dim=-1)
    loss, grad = _grad(ops.anchor_kl, student, teacher, TAU, teacher_is_logprob)
    assert ops.last_choice()["anchor_kl"] == "triton"
    ref_loss, ref_grad = _grad(kernel.anchor_kl_reference, student, teacher, TAU, teacher_is_logprob)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == dtype
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    else:  # both round an fp32 gradient to bf16 once
        torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=2 ** -7, atol=1e-8)
    if cols > 1:
        assert loss > 0


@pytest.mark.parametrize("rows,cols,chunk", [(3, 5, 4), (5, 100, 16), (4, 999, 256), (2, 64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("teacher_is_logprob", [False, True])
def test_chunked_kernel_matches_reference(rows, cols, chunk, dtype, teacher_is_logprob, device):
    """The wide-row kernel (online softmax over column chunks, a second walk for the gradient),
    forced with small chunks: a ragged last chunk, one exact chunk, many chunks."""
    student, teacher = _logits(rows, cols, dtype, device, seed=rows + cols)
    if teacher_is_logprob:
        teacher = F.log_softmax(teacher.float() / TAU, dim=-1)
    kl_rows, dkl = kernel.anchor_kl_triton(student, teacher, TAU, teacher_is_logprob, chunk_cols=chunk)
    ref = student.detach().float().requires_grad_(True)
    p_t = teacher.float().exp() if teacher_is_logprob else F.softmax(teacher.float() / TAU, -1)
    log_p_t = teacher.float() if teacher_is_logprob else F.log_softmax(teacher.float() / TAU, -1)
    ref_rows = (p_t * (log_p_t - F.log_softmax(ref / TAU, -1))).sum(-1)
    (ref_grad,) = torch.autograd.grad(ref_rows.sum(), ref)
    torch.testing.assert_close(kl_rows, ref_rows.detach(), rtol=1e-5, atol=1e-6)
    assert dkl.dtype == torch.float32  # the gradient stays fp32 until the backward's one rounding
    torch.testing.assert_close(dkl, ref_grad, rtol=1e-4, atol=1e-7)
    assert (kl_rows > 0).all()


def test_chunked_kernel_nan_inf_and_identical(device):
    student, teacher = _logits(4, 40, torch.float32, device, seed=8)
    teacher[1, 3] = float("-inf")          # a zero-probability class
    teacher[2, :16] = float("-inf")        # a whole chunk without mass
    kl_rows, dkl = kernel.anchor_kl_triton(student, teacher, TAU, chunk_cols=16)
    ref_rows = torch.stack([kernel.anchor_kl_reference(student[i:i + 1], teacher[i:i + 1], TAU) for i in range(4)])
    assert kl_rows.isfinite().all() and dkl.isfinite().all()
    torch.testing.assert_close(kl_rows * TAU ** 2, ref_rows, rtol=1e-5, atol=1e-6)
    same, _ = kernel.anchor_kl_triton(student, student.clone(), TAU, chunk_cols=16)
    assert same.abs().max() < 1e-5
    student[2, 35] = float("nan")          # in the last chunk: poisons row 2 only, in both walks
    kl_rows, dkl = kernel.anchor_kl_triton(student, teacher, TAU, chunk_cols=16)
    assert kl_rows[2].isnan() and dkl[2].isnan().all()
    assert kl_rows[[0, 1, 3]].isfinite().all() and dkl[[0, 1, 3]].isfinite().all()
    teacher[0, 20] = float("nan")          # a teacher NaN poisons its row too
    kl_rows, dkl = kernel.anchor_kl_triton(student, teacher, TAU, chunk_cols=16)
    assert kl_rows[0].isnan() and dkl[0].isnan().all() and kl_rows[[1, 3]].isfinite().all()
    with pytest.raises(ValueError, match="power of two"):
        kernel.anchor_kl_triton(student, teacher, TAU, chunk_cols=24)


@pytest.mark.parametrize("where", [slice(0, 16), slice(20, 22)], ids=["first-chunk", "after-finite"])
def test_a_student_minus_inf_under_teacher_mass_is_an_infinite_loss_in_the_chunked_kernel(device, where):
    """q = 0 where p > 0: KL = +inf (the reference's value), also when the row's first chunk is all -inf
    (the running student maximum still -inf there: -inf - -inf had made the row nan)."""
    student, teacher = _logits(2, 40, torch.float32, device, seed=9)
    student[1, where] = float("-inf")
    kl_rows, _ = kernel.anchor_kl_triton(student, teacher, TAU, chunk_cols=16)
    one_tile, _ = kernel.anchor_kl_triton(student, teacher, TAU)
    assert kl_rows[1] == float("inf") and one_tile[1] == float("inf")
    assert kernel.anchor_kl_reference(student[1:], teacher[1:], TAU) == float("inf")
    torch.testing.assert_close(kl_rows[0], one_tile[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("teacher_is_logprob", [False, True])
def test_chunked_kernel_keeps_precision_at_large_logits(teacher_is_logprob, device):
    """Logits offset by 3000 at tau 1 (and rising along the row, so the running maxima move in
    every chunk): the KL is a small difference of large numbers unless the sums are kept
    relative to the maxima. Both kernels against float64."""
    g = torch.Generator().manual_seed(11)
    ramp = torch.linspace(0, 6, 200)
    student = (3000 + ramp + 0.5 * torch.randn(3, 200, generator=g)).to(device)
    teacher = (3000 + ramp + 0.5 * torch.randn(3, 200, generator=g)).to(device)
    if teacher_is_logprob:
        teacher = F.log_softmax(teacher.double(), -1).float()
    exact_p = teacher.double().exp() if teacher_is_logprob else F.softmax(teacher.double(), -1)
    exact_log_p = teacher.double() if teacher_is_logprob else F.log_softmax(teacher.double(), -1)
    exact = (exact_p * (exact_log_p - F.log_softmax(student.double(), -1))).sum(-1)
    for chunk in (None, 16):
        kl_rows, _ = kernel.anchor_kl_triton(student, teacher, 1.0, teacher_is_logprob,
                                             chunk_cols=chunk)
        torch.testing.assert_close(kl_rows.double(), exact, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("chunk", [None, 16])
@pytest.mark.parametrize("teacher_is_logprob", [False, True])
def test_both_kernels_keep_the_gradient_at_large_logits_and_a_small_tau(chunk, teacher_is_logprob, device):
    """Logits near 3000 at tau 0.05: scaled before the row maximum is subtracted, z / tau (60000) rounds
    by about 0.004, 1e-4 of the probabilities' exponent scale, and the gradient was off by 9e-3 of its
    largest entry. Both kernels subtract first, then scale."""
    g = torch.Generator().manual_seed(5)
    student = (3000 + torch.randn(3, 64, generator=g)).to(device)
    teacher = student + 0.1 * torch.randn(3, 64, generator=g).to(device)
    if teacher_is_logprob:
        teacher = F.log_softmax(teacher.double() / 0.05, -1).float()
    ref_student = student.double().requires_grad_(True)
    ref_rows = torch.stack([kernel.anchor_kl_reference(ref_student[i:i + 1], teacher[i:i + 1].double(), 0.05,
                                                       teacher_is_logprob) for i in range(3)]) / 0.05 ** 2
    (ref_dz,) = torch.autograd.grad(ref_rows.sum(), ref_student)
    kl_rows, dz = kernel.anchor_kl_triton(student, teacher, 0.05, teacher_is_logprob, chunk_cols=chunk)
    assert (dz.double() - ref_dz).abs().max() < 1e-5 * ref_dz.abs().max()
    torch.testing.assert_close(kl_rows.double(), ref_rows.detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows_per_program,num_warps", [(1, 2), (2, 8), (8, 16)])
@pytest.mark.parametrize("teacher_is_logprob", [False, True])
def test_one_tile_kernel_knobs_keep_the_result(rows_per_program, num_warps, teacher_is_logprob, device, monkeypatch):
    """Rows and warps per program (benchmarks/tune_kernels_cuda.py sweeps them) change the launch,
    not the values: 7 rows (a ragged last program) x 300 classes against the reference."""
    student, teacher = _logits(7, 300, torch.float32, device, seed=11)
    if teacher_is_logprob:
        teacher = F.log_softmax(teacher / TAU, dim=-1)
    launches = _count_launches(monkeypatch, "_anchor_kl_kernel")
    kl_rows, dkl = kernel.anchor_kl_triton(student, teacher, TAU, teacher_is_logprob, rows=rows_per_program,
                                           num_warps=num_warps)
    assert launches == [(-(-7 // rows_per_program),)]
    ref = student.detach().requires_grad_(True)
    log_p_t = teacher if teacher_is_logprob else F.log_softmax(teacher / TAU, -1)
    ref_rows = (log_p_t.exp() * (log_p_t - F.log_softmax(ref / TAU, -1))).sum(-1)
    (ref_grad,) = torch.autograd.grad(ref_rows.sum(), ref)
    torch.testing.assert_close(kl_rows, ref_rows.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dkl, ref_grad, rtol=1e-4, atol=1e-7)
    for knob, bad in [("rows", 3), ("rows", 0), ("num_warps", 6), ("num_warps", 0), ("chunk_cols", 24)]:
        for chunked in (None, 64):  # both kernels refuse, before any launch
            knobs = {"chunk_cols": chunked, knob: bad}
            with pytest.raises(ValueError, match=f"{knob} must be a power of two >= 1 .* got {bad}"):
                kernel.anchor_kl_triton(student, teacher, TAU, teacher_is_logprob, **knobs)
    assert len(launches) == 1


@pytest.mark.parametrize("cols", [10, 30, 60, 90, 200, 500, 1000, 2000, 4000])
def test_the_gpu_tile_defaults_keep_the_result(cols, device, monkeypatch):
    """Each width band's GPU default (TILE_DEFAULTS: rows and warps per program) on a ragged row count,
    launched as the launcher would on a GPU, against the reference."""
    rows, warps = kernel.TILE_DEFAULTS[max(16, kernel.next_pow2(cols))]
    assert kernel.tile_warps(rows, cols) == warps
    n = rows + 3  # a ragged last program
    student, teacher = _logits(n, cols, torch.float32, device, seed=cols)
    launches = _count_launches(monkeypatch, "_anchor_kl_kernel")
    kl_rows, dkl = kernel.anchor_kl_triton(student, teacher, TAU, rows=rows, num_warps=warps)
    assert launches == [(-(-n // rows),)]
    ref = student.detach().requires_grad_(True)
    log_p_t = F.log_softmax(teacher / TAU, -1)
    ref_rows = (log_p_t.exp() * (log_p_t - F.log_softmax(ref / TAU, -1))).sum(-1)
    (ref_grad,) = torch.autograd.grad(ref_rows.sum(), ref)
    torch.testing.assert_close(kl_rows, ref_rows.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dkl, ref_grad, rtol=1e-4, atol=1e-7)


def test_reference_equals_torch_kl_div():
    student, teacher = _logits(16, 50, torch.float32, "cpu", seed=1)
    peer = TAU ** 2 * F.kl_div(F.log_softmax(student / TAU, -1), F.log_softmax(teacher / TAU, -1),
                               log_target=True, reduction="batchmean")
    torch.testing.assert_close(kernel.anchor_kl_reference(student, teacher, TAU), peer, rtol=1e-5, atol=1e-7)


def test_hand_computed_two_classes(device, triton_backend):
    # tau = 1; teacher p = (0.5, 0.5), student q = (sigmoid(1), sigmoid(-1))
    student = torch.tensor([[1.0, 0.0]], device=device, requires_grad=True)
    teacher = torch.zeros(1, 2, device=device)
    q = 1 / (1 + math.exp(-1))
    expected = 0.5 * math.log(0.5 / q) + 0.5 * math.log(0.5 / (1 - q))
    loss = ops.anchor_kl(student, teacher, 1.0)
    loss.backward()
    assert abs(loss.item() - expected) < 1e-6
    torch.testing.assert_close(student.grad.cpu(), torch.tensor([[q - 0.5, 0.5 - q]]))


def test_identical_logits_give_zero(device, triton_backend):
    student, _ = _logits(6, 33, torch.float32, device, seed=2)
    loss, grad = _grad(ops.anchor_kl, student, student.clone(), TAU)
    assert abs(loss.item()) < 1e-5 and grad.abs().max() < 1e-6  # fp32 rounding only


def test_gradient_computed_in_forward_pass(device, triton_backend, monkeypatch):
    """One kernel launch for forward + backward: backward reuses the saved gradient."""
    launches = _count_launches(monkeypatch, "_anchor_kl_kernel")
    student, teacher = _logits(9, 21, torch.float32, device, seed=3)
    loss, grad = _grad(ops.anchor_kl, student, teacher, TAU)
    assert len(launches) == 1
    assert grad.abs().sum() > 0


def test_nan_and_inf(device, triton_backend):
    student, teacher = _logits(4, 10, torch.float32, device, seed=4)
    # teacher -inf = a zero-probability class: contributes 0, everything finite
    teacher[1, 3] = float("-inf")
    loss, grad = _grad(ops.anchor_kl, student, teacher, TAU)
    ref_loss, ref_grad = _grad(kernel.anchor_kl_reference, student, teacher, TAU)
    assert loss.isfinite() and grad.isfinite().all()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    logprob = F.log_softmax(teacher / TAU, dim=-1)
    assert logprob[1, 3] == float("-inf")
    assert ops.anchor_kl(student, logprob, TAU, teacher_is_logprob=True).isfinite()
    # a NaN student logit poisons its row (loss NaN, that row's gradient NaN), not other rows
    student[2, 5] = float("nan")
    loss, grad = _grad(ops.anchor_kl, student, teacher, TAU)
    assert loss.isnan()
    assert grad[2].isnan().all() and grad[[0, 1, 3]].isfinite().all()


def test_bf16_gradient_is_rounded_once(device):
    """dkl_dz was stored in bf16 and scaled and rounded again in the backward: about a quarter of the
    entries missed the correctly rounded gradient (the reference's rounding misses a handful)."""
    student, teacher = _logits(96, 120, torch.bfloat16, device, seed=21)
    weights = torch.rand(96, dtype=torch.float64, device=device) + 0.5
    s = student.detach().requires_grad_(True)
    kl_rows, dkl = torch.ops.segpcl.anchor_kl_rows(s, teacher, TAU, False)
    assert dkl.dtype == torch.float32 and not dkl.requires_grad  # not a differentiable output
    (kl_rows * weights.float()).sum().backward()
    s64 = student.detach().double().requires_grad_(True)
    p_t = F.softmax(teacher.double() / TAU, -1)
    rows64 = (p_t * (p_t.log() - F.log_softmax(s64 / TAU, -1))).sum(-1)
    (truth,) = torch.autograd.grad((rows64 * weights).sum(), s64)
    s_ref = student.detach().requires_grad_(True)
    ref_rows = torch.stack([kernel.anchor_kl_reference(s_ref[i:i + 1], teacher[i:i + 1], TAU)
                            for i in range(96)]) / TAU ** 2
    (ref_rows * weights.float()).sum().backward()
    rounded = truth.to(torch.bfloat16)
    misses, ref_misses = (s.grad != rounded).sum().item(), (s_ref.grad != rounded).sum().item()
    assert s.grad.dtype == torch.bfloat16
    assert misses <= max(ref_misses, 0.01 * truth.numel()), (misses, ref_misses)


def test_opcheck(device):
    student, teacher = _logits(7, 13, torch.float32, device, seed=5)
    op = torch.ops.segpcl.anchor_kl_rows.default
    torch.library.opcheck(op, (student, teacher, TAU, False))
    torch.library.opcheck(op, (student.requires_grad_(True), F.log_softmax(teacher / TAU, -1), TAU, True))


def test_compile_fullgraph_no_breaks(device, triton_backend, graph_breaks):
    student, teacher = _logits(12, 30, torch.float32, device, seed=6)

    def loss_fn(s, t):
        return 5.0 * ops.anchor_kl(s, t, TAU)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss, grad = _grad(compiled, student, teacher)
    assert graph_breaks() == 0
    ref_loss, ref_grad = _grad(lambda s, t: 5.0 * kernel.anchor_kl_reference(s, t, TAU), student, teacher)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_dispatch_and_errors():
    student, teacher = _logits(3, 4, torch.float32, "cpu", seed=7)
    ops.anchor_kl(student, teacher, TAU)
    assert ops.last_choice()["anchor_kl"] == "reference"
    with pytest.raises(ValueError, match="teacher has shape"):
        ops.anchor_kl(student, teacher[:, :3], TAU)
    # "2" passed float() and failed in a division; a 2-element tensor and None raised torch / float() errors naming
    # neither the op nor the fix
    for tau in (0.0, -1.0, float("inf"), float("nan"), "2", True, torch.tensor([2.0, 3.0]), None):
        with pytest.raises(ValueError, match="tau must be a finite number > 0"):
            ops.anchor_kl(student, teacher, tau)


def test_rows_wider_than_one_tile_take_the_chunked_kernel(device, triton_backend, monkeypatch):
    launches = _count_launches(monkeypatch, "_anchor_kl_chunked_kernel")
    student, teacher = _logits(2, kernel.SINGLE_BLOCK_COLS + 3, torch.float32, device, seed=9)
    loss, grad = _grad(ops.anchor_kl, student, teacher, TAU)
    assert ops.last_choice()["anchor_kl"] == "triton" and len(launches) == 1
    ref_loss, ref_grad = _grad(kernel.anchor_kl_reference, student, teacher, TAU)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("chunk", [None, 16])
def test_scale_multiplies_both_outputs(chunk, device):
    """anchor_kl_rows(..., scale) = scale * (KL rows, their gradient): what the fused loss folds
    tau^2 / A into, so that the loss is a plain sum."""
    z_s, z_t = torch.randn(6, 50, device=device), torch.randn(6, 50, device=device) * 4
    kl1, dz1 = kernel.anchor_kl_triton(z_s, z_t, 2.0, chunk_cols=chunk)
    kl3, dz3 = kernel.anchor_kl_triton(z_s, z_t, 2.0, chunk_cols=chunk, scale=0.37)
    torch.testing.assert_close(kl3, 0.37 * kl1, rtol=1e-6, atol=0)
    torch.testing.assert_close(dz3, 0.37 * dz1, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_launches_four_kernels(dtype, device, triton_backend, kernel_launches, monkeypatch):
    """Forward + backward of the fused loss: the kernel, the sum, autograd's seed and one scaling of
    the saved gradient: in place for fp32 (the launcher of _scale_grad_kernel, called directly, not
    through the dispatcher; here, under a gradient of 1, it touches nothing), into z_S's dtype for bf16.
    (The mean, tau^2 and their backward products, and a separate cast for bf16, were 4-5 more
    launches, each about 40 us of host time on the H200.)"""
    scalings, real = [], kernel._scale_grad_kernel

    class Counting:  # counts the launch; the interpreter's own tensor ops are not the GPU's launches
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                scalings.append(grid)
                with torch.utils._python_dispatch._disable_current_modes():
                    return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(kernel, "_scale_grad_kernel", Counting())
    z_s = torch.randn(8, 90, device=device, dtype=dtype, requires_grad=True)
    z_t = torch.randn(8, 90, device=device)
    with kernel_launches() as launched:
        loss = ops.anchor_kl(z_s, z_t, 2.0)
        (grad,) = torch.autograd.grad(loss, z_s)
    in_place = dtype == torch.float32
    assert launched == ["segpcl.anchor_kl_rows.default", "aten.sum.default", "aten.ones_like.default"] + \
        ([] if in_place else ["aten.mul.out"]), launched
    assert len(scalings) == (1 if in_place else 0)
    want = torch.autograd.grad(kernel.anchor_kl_reference(z_s, z_t, 2.0), z_s)[0]
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), want.float(), rtol=1e-4 if dtype == torch.float32 else 2 ** -7,
                               atol=1e-7 if dtype == torch.float32 else 1e-5)


def test_compiled_loss_takes_any_anchor_count_without_recompiling(device, triton_backend):
    """1 / A is read inside the op from the tensor it gets: a scale built from the shape by the caller
    would be a new constant per anchor count, and a recompile per count (a task's short last batch)."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    compiled = torch.compile(lambda s, t: ops.anchor_kl(s, t, 2.0), backend=counting, dynamic=True)
    for rows in (5, 7, 9):
        z_s = torch.randn(rows, 30, device=device, requires_grad=True)
        z_t = torch.randn(rows, 30, device=device)
        loss = compiled(z_s, z_t)
        torch.testing.assert_close(loss, kernel.anchor_kl_reference(z_s, z_t, 2.0), rtol=1e-5, atol=1e-6)
    assert len(graphs) == 1
    torch._dynamo.reset()


def _recording_launches(monkeypatch, name):
    """Replace kernel.<name> by a recorder of each launch's keyword arguments, and its positional ones
    under "args" (no kernel runs)."""
    launches = []

    class Recording:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(dict(kwargs, args=args))

    monkeypatch.setattr(kernel, name, Recording())
    return launches


@pytest.mark.parametrize("rows, width, pad_s, pad_t, dtype, chunk, vec", [
    (4, 1000, 0, 0, torch.float32, None, 8), (4, 1024, 0, 0, torch.float32, None, 16),
    (4, 1000, 8, 0, torch.float32, None, 8), (4, 1000, 12, 0, torch.float32, None, 4),
    (4, 1000, 0, 2, torch.bfloat16, None, 2), (4, 1001, 0, 0, torch.float32, None, 1),
    (4, 90, 0, 0, torch.float32, None, 2), (4, 8000, 0, 0, torch.float32, None, 16),
    (4, 5000, 0, 0, torch.bfloat16, None, 8),
    (4, 1000, 0, 0, torch.float32, 4, 4), (4, 64, 0, 0, torch.float32, 8, 8),  # a chunk holds whole runs
    (1, 1000, 3, 5, torch.float32, None, 8)])  # one row: its stride is never used
def test_the_alignment_promise_divides_the_width_and_every_row_stride(monkeypatch, rows, width, pad_s, pad_t, dtype,
                                                                      chunk, vec):
    """On a GPU the kernels tell Triton that runs of VEC columns start aligned and are all in or all out
    of the mask (tl.multiple_of / max_constancy), so that it loads 4 fp32 at once; a VEC that does not
    divide the width or a row stride would read misaligned or past the row there, silently, and one
    wider than a chunk does not compile. The interpreter ignores the hints, so the promise is checked
    here: VEC is the largest power of two up to 16 and up to the chunk dividing the width and the
    student's, teacher's and gradient's row strides (a single row's strides are passed as 0)."""
    name = "_anchor_kl_chunked_kernel" if width > kernel.SINGLE_BLOCK_COLS or chunk else "_anchor_kl_kernel"
    launches = _recording_launches(monkeypatch, name)
    monkeypatch.setattr(kernel, "check_can_run", lambda *args: None)  # meta tensors: nothing runs
    student = torch.empty(rows, width + pad_s, dtype=dtype, device="meta")[:, :width]
    teacher = torch.empty(rows, width + pad_t, dtype=dtype, device="meta")[:, :width]
    kernel.anchor_kl_triton(student, teacher, TAU, chunk_cols=chunk)
    assert [launch["VEC"] for launch in launches] == [vec]
    if rows == 1:
        assert launches[0]["args"][6:9] == (0, 0, 0)  # the row strides the kernel computes offsets with


@pytest.mark.parametrize("width, pad, chunk", [(1000, 8, None), (1000, 12, None), (100, 4, None), (999, 1, None),
                                               (1000, 8, 256)])
@pytest.mark.parametrize("teacher_is_logprob", [False, True])
def test_views_of_wider_rows_match_the_reference(width, pad, chunk, teacher_is_logprob, device):
    """Logits that are column slices of wider rows (a row stride other than the width), at widths where
    the alignment promise is 8, 4 or 1: the values the GPU's vector loads give (CUDA) and the
    interpreter's (CPU) against the reference."""
    wide_s, wide_t = _logits(6, width + pad, torch.float32, device, seed=width + pad)
    student, teacher = wide_s[:, :width], wide_t[:, :width]
    if teacher_is_logprob:
        teacher = F.log_softmax(wide_t / TAU, dim=-1)[:, :width]
    kl_rows, dz = kernel.anchor_kl_triton(student, teacher, TAU, teacher_is_logprob, chunk_cols=chunk)
    ref_student = student.detach().clone().requires_grad_(True)
    ref_rows = [kernel.anchor_kl_reference(ref_student[i:i + 1], teacher[i:i + 1], TAU, teacher_is_logprob) / TAU ** 2
                for i in range(student.shape[0])]
    (ref_dz,) = torch.autograd.grad(torch.stack(ref_rows).sum(), ref_student)
    torch.testing.assert_close(kl_rows, torch.stack(ref_rows), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dz, ref_dz, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------ the backward's in-place scaling (fp32 z_S)

def _row_gradients(form, rows, device):
    g = torch.Generator().manual_seed(rows)
    if form == "rows":  # per-row weights, some exactly 1 (left untouched), a 0, a negative, a NaN
        w = torch.randn(rows, generator=g)
        w[::3] = 1.0
        w[1 % rows] = 0.0
        w[-1] = float("nan") if rows > 2 else w[-1]
        return w.to(device)
    if form == "one_row":  # every row's gradient 1 but the last one's (one column: one element in its block)
        w = torch.ones(rows)
        w[-1] = 2.0
        return w.to(device)
    if form == "strided_rows":  # a non-contiguous per-row gradient (stride 2)
        w = torch.randn(2 * rows, generator=g)
        w[::4] = 1.0
        return w.to(device)[::2]
    value = {"one": 1.0, "five": 5.0, "minus_zero": -0.0, "nan": float("nan")}[form]
    return torch.full((), value, device=device).expand(rows)  # what kl_rows.sum()'s backward gives


@pytest.mark.parametrize("rows, cols", [(1, 1), (6, 1), (7, 33), (37, 1000), (3, 5000)])
@pytest.mark.parametrize("form", ["one", "five", "minus_zero", "nan", "rows", "one_row", "strided_rows"])
def test_scale_grad_in_place_equals_the_product(rows, cols, form, device):
    """dkl_dz *= grad_rows[:, None] in place, bit for bit torch's fp32 product, whatever the incoming
    gradient: one value (1: nothing to do; 5; -0; NaN) or per row (some exactly 1, all but one, non-contiguous).
    37 x 1000 and 3 x 5000 elements span several blocks per program (each program steps over the
    grid), with a ragged last block."""
    dz = torch.randn(rows, cols, device=device)
    grad_rows = _row_gradients(form, rows, device)
    want = dz * grad_rows[:, None]
    ptr = dz.data_ptr()
    kernel.anchor_kl_scale_grad_triton(dz, grad_rows)
    assert dz.data_ptr() == ptr
    torch.testing.assert_close(dz, want, rtol=0, atol=0, equal_nan=True)
    if form == "minus_zero":
        assert torch.equal(torch.signbit(dz), torch.signbit(want))


def test_scale_grad_refuses_what_is_not_its_own_gradient(device):
    dz = torch.randn(4, 6, device=device)
    with pytest.raises(ValueError, match="contiguous fp32"):
        kernel.anchor_kl_scale_grad_triton(dz.t(), torch.ones(6, device=device))
    with pytest.raises(ValueError, match="contiguous fp32"):
        kernel.anchor_kl_scale_grad_triton(dz.bfloat16(), torch.ones(4, device=device))
    with pytest.raises(ValueError, match="one incoming gradient per row"):
        kernel.anchor_kl_scale_grad_triton(dz, torch.ones(5, device=device))


@pytest.mark.parametrize("upstream", [1.0, 5.0])
def test_fp32_backward_hands_the_saved_gradient_out(upstream, device, triton_backend):
    """fp32 z_S: the backward scales the forward's dkl_dz in place and returns it, no new buffer: under a
    gradient of 1 (the loss is where backward starts) it is returned as the forward wrote it; under 5,
    times 5. The value equals the reference's gradient either way."""
    student, teacher = _logits(9, 70, torch.float32, device, seed=31)
    s = student.detach().requires_grad_(True)
    kl_rows, dkl = torch.ops.segpcl.anchor_kl_rows(s, teacher, TAU, False, TAU ** 2, True)
    written = dkl.clone()
    (grad,) = torch.autograd.grad(upstream * kl_rows.sum(), s)
    assert grad.data_ptr() == dkl.data_ptr()
    assert torch.equal(grad, written * upstream)
    (want,) = torch.autograd.grad(upstream * kernel.anchor_kl_reference(s, teacher, TAU), s)
    torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-7)


def test_bf16_backward_leaves_the_saved_gradient(device, triton_backend):
    """bf16 z_S: the gradient is a new bf16 tensor (one rounding of the fp32 product); dkl_dz keeps its values."""
    student, teacher = _logits(9, 70, torch.bfloat16, device, seed=32)
    s = student.detach().requires_grad_(True)
    kl_rows, dkl = torch.ops.segpcl.anchor_kl_rows(s, teacher, TAU, False)
    written = dkl.clone()
    (grad,) = torch.autograd.grad(3.0 * kl_rows.sum(), s)
    assert grad.dtype == torch.bfloat16 and torch.equal(dkl, written)
    assert torch.equal(grad, (written * 3.0).bfloat16())


def test_a_second_backward_through_one_forward(device, triton_backend):
    """retain_graph=True and a second backward: fp32 z_S (the saved gradient was handed out by the first)
    is refused with a clear error, not given a gradient scaled twice; bf16 z_S runs both."""
    student, teacher = _logits(5, 40, torch.float32, device, seed=33)
    s = student.detach().requires_grad_(True)
    loss = 5.0 * ops.anchor_kl(s, teacher, TAU)
    (first,) = torch.autograd.grad(loss, s, retain_graph=True)
    torch.testing.assert_close(first, torch.autograd.grad(5.0 * kernel.anchor_kl_reference(s, teacher, TAU), s)[0],
                               rtol=1e-4, atol=1e-7)
    with pytest.raises(RuntimeError, match="second backward through one forward.*backend\\('reference'\\)"):
        torch.autograd.grad(loss, s)
    with pytest.raises(RuntimeError, match="second backward through one forward"):  # one backward per output row
        torch.autograd.functional.jacobian(lambda z: torch.ops.segpcl.anchor_kl_rows(z, teacher, TAU, False)[0],
                                           student.detach().clone())
    s16 = student.detach().bfloat16().requires_grad_(True)
    loss16 = ops.anchor_kl(s16, teacher.bfloat16(), TAU)
    (a,) = torch.autograd.grad(loss16, s16, retain_graph=True)
    (b,) = torch.autograd.grad(loss16, s16)
    assert torch.equal(a, b)


def test_compiled_backward_scales_out_of_place(device, triton_backend, graph_breaks):
    """Traced by AOTAutograd (torch.compile), the backward is the out-of-place product (the eager path's
    in-place launch would run once, at tracing, on fake tensors: the compiled backward would not scale
    at all). The compiled gradients equal the eager ones, under an incoming gradient of 5."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    backward_targets = []

    def fw(gm, example_inputs):
        return make_boxed_func(gm.forward)

    def bw(gm, example_inputs):
        backward_targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    student, teacher = _logits(12, 30, torch.float32, device, seed=34)
    loss_fn = lambda s, t: 5.0 * ops.anchor_kl(s, t, TAU)  # noqa: E731
    compiled = torch.compile(loss_fn, fullgraph=True, backend=aot_autograd(fw_compiler=fw, bw_compiler=bw))
    loss, grad = _grad(compiled, student, teacher)
    assert graph_breaks() == 0
    assert any("mul" in t for t in backward_targets), backward_targets
    want_loss, want_grad = _grad(loss_fn, student, teacher)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("pre_dispatch", [False, True])
def test_a_make_fx_trace_records_the_backward_product(pre_dispatch, device, triton_backend):
    """make_fx records ops on real tensors under its proxy mode, where torch.compiler.is_compiling() is
    False (at pre-dispatch the mode sits on another stack): the eager path's direct launch would scale
    the tracing call's buffer and leave the graph without the product, so a replay under an incoming
    gradient of 5 gave the unscaled gradient."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def grad_of_weighted_loss(s, t):
        return torch.autograd.grad(5.0 * ops.anchor_kl(s, t, TAU), s)[0]

    student, teacher = _logits(6, 40, torch.float32, device, seed=35)
    graph = make_fx(grad_of_weighted_loss, tracing_mode="real", pre_dispatch=pre_dispatch)(
        student.detach().requires_grad_(True), teacher)
    other_student, other_teacher = _logits(6, 40, torch.float32, device, seed=36)
    s = other_student.detach().requires_grad_(True)
    want = torch.autograd.grad(5.0 * kernel.anchor_kl_reference(s, other_teacher, TAU), s)[0]
    torch.testing.assert_close(graph(s, other_teacher), want, rtol=1e-4, atol=1e-7)


def test_the_handed_out_gradient_is_a_new_version(device, triton_backend):
    """dkl_dz kept from a direct op call and saved by another node (here w's gradient needs it): the
    backward scaled it in place, so that node's later backward would read the scaled values. The version
    bump makes autograd refuse that, rather than give w a gradient 3 times too large."""
    student, teacher = _logits(5, 7, torch.float32, device, seed=37)
    s = student.detach().requires_grad_(True)
    w = torch.ones(5, 7, device=device, requires_grad=True)
    kl_rows, dkl = torch.ops.segpcl.anchor_kl_rows(s, teacher, TAU, False)
    aux = (dkl * w).sum()
    (3.0 * kl_rows.sum()).backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        aux.backward()


def test_saved_tensor_hooks_and_checkpoint(device, triton_backend):
    """A saved-tensor hook that gives dkl_dz back non-contiguous takes the out-of-place product; under
    torch.utils.checkpoint (non-reentrant) each backward recomputes a fresh dkl_dz, so two backwards
    through one forward both run. The gradients equal the reference's."""
    from torch.utils.checkpoint import checkpoint

    student, teacher = _logits(5, 7, torch.float32, device, seed=38)
    s = student.detach().requires_grad_(True)
    want = torch.autograd.grad(3.0 * kernel.anchor_kl_reference(s, teacher, TAU), s)[0]
    with torch.autograd.graph.saved_tensors_hooks(lambda x: x.t().contiguous(), lambda x: x.t()):
        loss = 3.0 * ops.anchor_kl(s, teacher, TAU)
    torch.testing.assert_close(torch.autograd.grad(loss, s)[0], want, rtol=1e-4, atol=1e-7)
    loss = checkpoint(lambda z: 3.0 * ops.anchor_kl(z, teacher, TAU), s, use_reentrant=False)
    first = torch.autograd.grad(loss, s, retain_graph=True)[0]
    second = torch.autograd.grad(loss, s)[0]
    torch.testing.assert_close(first, want, rtol=1e-4, atol=1e-7)
    assert torch.equal(first, second)


def test_compiled_autograd_records_the_backward_product(device, triton_backend, monkeypatch):
    """Compiled autograd: dynamo traces the backward function itself, and there type(t) answers
    torch.Tensor, so the trace check also asks torch.compiler.is_compiling(). Without it the launch ran
    inside dynamo's trace (into Triton's own code). Two incoming gradients, 5 then 3, through one
    captured graph."""
    compiled_autograd = pytest.importorskip("torch._dynamo.compiled_autograd")
    if not hasattr(compiled_autograd, "_enable"):
        pytest.skip("this torch has no compiled_autograd._enable")
    launches = []
    real = kernel.anchor_kl_scale_grad_triton
    monkeypatch.setattr(kernel, "anchor_kl_scale_grad_triton", lambda *args: launches.append(1) or real(*args))
    student, teacher = _logits(5, 7, torch.float32, device, seed=39)
    torch._dynamo.reset()
    try:
        for weight in (5.0, 3.0):
            s = student.detach().requires_grad_(True)
            want = torch.autograd.grad(weight * kernel.anchor_kl_reference(s, teacher, TAU), s)[0]
            loss = torch.tensor(weight, device=device) * ops.anchor_kl(s, teacher, TAU)
            with compiled_autograd._enable(torch.compile(backend="aot_eager")):
                loss.backward()
            torch.testing.assert_close(s.grad, want, rtol=1e-4, atol=1e-7)
    finally:
        torch._dynamo.reset()
    assert launches == []


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("teacher_is_logprob", [False, True])
def test_reductions_match_the_reference(reduction, dtype, teacher_is_logprob, device, triton_backend):
    """reduction over anchors as Liger-Kernel's KL losses take it: "sum" and "none" (each anchor's tau^2 KL,
    to weight anchors); under per-anchor weights the fp32 backward scales each row of its saved gradient in
    place (the per-row path), bf16 out of place. Each equals the reference, and "mean" / "sum" are "none"'s
    mean / sum."""
    student, teacher = _logits(9, 70, dtype, device, seed=40)
    if teacher_is_logprob:
        teacher = F.log_softmax(teacher.float() / TAU, dim=-1)
    weights = torch.linspace(0.5, 2.0, 9, device=device)
    weights[3] = 1.0  # a row the in-place scaling leaves as it is

    def run(fn):
        s = student.detach().clone().requires_grad_(True)
        loss = fn(s, teacher, TAU, teacher_is_logprob, reduction=reduction)
        (loss * weights if reduction == "none" else loss).sum().backward()
        return loss.detach(), s.grad

    loss, grad = run(ops.anchor_kl)
    assert ops.last_choice()["anchor_kl"] == "triton"
    ref_loss, ref_grad = run(kernel.anchor_kl_reference)
    assert loss.dtype == torch.float32 and loss.shape == ((9,) if reduction == "none" else ())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    per_row = 1 if reduction == "mean" else 9  # "sum" / "none": each row's gradient is not divided by A
    if dtype == torch.float32:
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7 * per_row)
    else:
        torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=2 ** -7, atol=1e-8 * per_row)
    rows = ops.anchor_kl(student, teacher, TAU, teacher_is_logprob, reduction="none")
    want = {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)


def test_reduction_edge_cases_and_errors(device, triton_backend):
    """0 anchors: mean NaN (as torch.mean), sum 0, none empty; an unknown reduction is one error, on the op and
    the module."""
    empty = torch.zeros(0, 5, device=device)
    assert ops.anchor_kl(empty, empty, TAU).isnan()
    assert ops.anchor_kl(empty, empty, TAU, reduction="sum").item() == 0.0
    assert ops.anchor_kl(empty, empty, TAU, reduction="none").shape == (0,)
    student, teacher = _logits(3, 4, torch.float32, device, seed=41)
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum', 'none', 'batchmean'\).*'avg'"):
        ops.anchor_kl(student, teacher, TAU, reduction="avg")
    # torch's and Liger's name for the batch mean; not their element-wise "mean" (a C-times smaller loss)
    assert torch.equal(ops.anchor_kl(student, teacher, TAU, reduction="batchmean"), ops.anchor_kl(student, teacher, TAU))
    torch_batchmean = F.kl_div(F.log_softmax(student / TAU, -1), F.log_softmax(teacher / TAU, -1), log_target=True,
                               reduction="batchmean") * TAU ** 2
    torch.testing.assert_close(ops.anchor_kl(student, teacher, TAU), torch_batchmean, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="AnchorKLLoss: reduction must be one of"):
        ops.AnchorKLLoss(reduction="avg")
    module = ops.AnchorKLLoss(tau=TAU, reduction="none")
    assert "reduction='none'" in repr(module)
    old = ops.AnchorKLLoss.__new__(ops.AnchorKLLoss)  # one pickled whole before reduction existed
    old.__setstate__({k: v for k, v in ops.AnchorKLLoss(tau=TAU).__dict__.items() if k != "reduction"})
    assert torch.equal(old(student, teacher), ops.anchor_kl(student, teacher, TAU))
    torch.testing.assert_close(module(student, teacher), ops.anchor_kl(student, teacher, TAU, reduction="none"))


def test_reduction_none_compiles_without_graph_breaks(device, triton_backend, graph_breaks):
    student, teacher = _logits(6, 30, torch.float32, device, seed=42)
    weights = torch.rand(6, device=device)
    fn = torch.compile(lambda s, t: (ops.anchor_kl(s, t, TAU, reduction="none") * weights).sum(), fullgraph=True)
    s = student.detach().clone().requires_grad_(True)
    fn(s, teacher).backward()
    ref = student.detach().clone().requires_grad_(True)
    (kernel.anchor_kl_reference(ref, teacher, TAU, reduction="none") * weights).sum().backward()
    torch.testing.assert_close(s.grad, ref.grad, rtol=1e-4, atol=1e-7)
    assert graph_breaks() == 0
