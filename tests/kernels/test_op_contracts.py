"""Contracts every path of the three Triton-backed ops keeps alike (reference and Triton): NaN stays
NaN, the teacher / q_0 is a constant, bad indices and bounds raise, float64 computes in float64 on
the reference and is refused by the kernels, pgd_step(inplace=True) stays differentiable, and a
TRITON_INTERPRET set too late is named. Found by a user trial of the ops (each failed before).
"""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from segpcl_fast import ops

PATHS = ["reference", "triton"]


def _path(name, device):
    """The backend for a path; the `device` fixture already skips CPU Triton without the interpreter."""
    return ops.backend(name)


def _knn_problem(device, seed=0, classes=7, dim=8, roots=4, k=3):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(classes, dim, generator=g), dim=-1).to(device)
    root_idx = torch.tensor([0, 2, 5, 6], device=device)[:roots]
    neighbors = torch.randint(0, classes, (roots, k), generator=g).to(device)
    ref = torch.log_softmax(torch.randn(roots, k, generator=g), -1).to(device)
    return emb, root_idx, neighbors, ref


@pytest.mark.parametrize("path", PATHS)
def test_nan_in_the_teacher_or_q0_makes_the_loss_nan(path, device):
    student, teacher = torch.zeros(2, 3, device=device), torch.zeros(2, 3, device=device)
    teacher[0, 0] = float("nan")
    no_mass = torch.zeros(2, 3, device=device)
    no_mass[1] = float("-inf")  # a row with no probability anywhere: softmax is undefined
    emb, roots, neighbors, ref = _knn_problem(device)
    ref[1, 0] = float("nan")
    with _path(path, device):
        assert ops.anchor_kl(student, teacher, 2.0).isnan()
        assert ops.anchor_kl(student, no_mass, 2.0).isnan()
        assert ops.knn_subgraph_kl(emb, roots, neighbors, ref, 0.5).isnan()
        # one -inf class is a zero-probability class: exactly no contribution, the loss stays finite
        assert ops.anchor_kl(student, torch.tensor([[0.0, float("-inf"), 0.0]] * 2, device=device), 2.0).isfinite()


@pytest.mark.parametrize("path", PATHS)
def test_gradient_flows_into_the_student_only(path, device):
    student = torch.randn(3, 5, device=device, requires_grad=True)
    for teacher_is_logprob in (False, True):
        teacher = torch.randn(3, 5, device=device)
        if teacher_is_logprob:
            teacher = teacher.log_softmax(-1)
        teacher.requires_grad_(True)
        with _path(path, device):
            ops.anchor_kl(student, teacher, 2.0, teacher_is_logprob=teacher_is_logprob).backward()
        assert teacher.grad is None and student.grad is not None
    emb, roots, neighbors, ref = _knn_problem(device)
    emb.requires_grad_(True)
    ref.requires_grad_(True)
    with _path(path, device):
        ops.knn_subgraph_kl(emb, roots, neighbors, ref, 0.5).backward()
    assert ref.grad is None and emb.grad.abs().sum() > 0


@pytest.mark.parametrize("path", PATHS)
def test_a_teacher_that_requires_grad_gives_no_graph(path, device):
    """With only the teacher / q_0 requiring grad the loss is a constant on every path (the kernels'
    paths made it require grad, and backward() then did nothing instead of raising: a review's finding)."""
    student, teacher = torch.randn(3, 5, device=device), torch.randn(3, 5, device=device, requires_grad=True)
    emb, roots, neighbors, ref = _knn_problem(device)
    ref.requires_grad_(True)
    with _path(path, device):
        assert not ops.anchor_kl(student, teacher, 2.0).requires_grad
        assert not ops.anchor_kl(student, teacher.log_softmax(-1), 2.0, teacher_is_logprob=True).requires_grad
        assert not ops.knn_subgraph_kl(emb, roots, neighbors, ref, 0.5).requires_grad


@pytest.mark.parametrize("path", PATHS)
def test_pgd_step_gives_grad_a_zero_gradient(path, device):
    """sign(grad) is piecewise constant: grad's gradient is zeros on every path (None on the kernel's before)."""
    x = torch.rand(2, 3, 4, 4, device=device, requires_grad=True)
    grad = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    with _path(path, device):
        ops.pgd_step(x, grad, x.detach(), 0.1, 0.3, -1.0, 1.0).sum().backward()
    assert grad.grad is not None and torch.equal(grad.grad, torch.zeros_like(grad))
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad", [7, -1])
def test_out_of_range_neighbours_and_roots_raise(path, device, bad):
    if device == "cuda":  # a device-side assert ends the process's CUDA context: see it fail in a child
        probe = ("import torch, torch.nn.functional as F\nfrom segpcl_fast import ops\n"
                 "emb = F.normalize(torch.randn(7, 8, device='cuda'), dim=-1)\n"
                 f"nb = torch.tensor([[1, 2, 3], [0, {bad}, 4]], device='cuda')\n"
                 f"with ops.backend('{path}'):\n"
                 "    ops.knn_subgraph_kl(emb, torch.tensor([0, 2], device='cuda'), nb,\n"
                 "                        torch.zeros(2, 3, device='cuda'), 0.5)\n"
                 "torch.cuda.synchronize()\n")
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
        assert out.returncode != 0 and "assert" in out.stderr.lower(), out.stderr[-2000:]
        return
    emb, roots, neighbors, ref = _knn_problem(device)
    with _path(path, device):
        ops.knn_subgraph_kl(emb, roots, neighbors, ref, 0.5)  # in range
        bad_neighbors = neighbors.clone()
        bad_neighbors[1, 2] = bad
        with pytest.raises(RuntimeError, match=r"row indices of emb, in \[0, 7\)"):
            ops.knn_subgraph_kl(emb, roots, bad_neighbors, ref, 0.5)
        bad_roots = roots.clone()
        bad_roots[0] = bad
        with pytest.raises(RuntimeError, match=r"row indices of emb"):
            ops.knn_subgraph_kl(emb, bad_roots, neighbors, ref, 0.5)
        with pytest.raises(RuntimeError, match=r"row indices of emb"):  # k = 0: the roots are still checked
            ops.knn_subgraph_kl(emb, bad_roots, neighbors[:, :0], ref[:, :0], 0.5)
        compiled = torch.compile(ops.knn_subgraph_kl, fullgraph=True, backend="aot_eager")
        with pytest.raises(RuntimeError, match=r"row indices of emb"):
            compiled(emb, roots, bad_neighbors, ref, 0.5)


@pytest.mark.parametrize("path", PATHS)
def test_inplace_pgd_step_inside_an_autograd_graph_gets_the_reference_gradient(path, device):
    def run(p):
        leaf = torch.tensor([[[[0.0, 0.3], [-0.05, 0.9]]]], device=device, requires_grad=True)
        x = leaf * 1.0
        grad = torch.tensor([[[[1.0, -1.0], [1.0, 0.0]]]], device=device)
        x0 = torch.full((1, 1, 2, 2), 0.5, device=device)
        with _path(p, device):
            out = ops.pgd_step(x, grad, x0, 0.1, 0.2, -1.0, 1.0, inplace=True)
        assert out is x
        (x * torch.arange(1.0, 5.0, device=device).view(1, 1, 2, 2)).sum().backward()
        return x.detach(), leaf.grad
    values, grad = run(path)
    # x_adv - 0.1*sign(g) = [-0.1, 0.4, -0.15, 0.9]; in the ball [0.3, 0.7]: only 0.4 -> gradient 2 there
    torch.testing.assert_close(values.flatten(), torch.tensor([0.3, 0.4, 0.3, 0.7], device=device))
    torch.testing.assert_close(grad.flatten(), torch.tensor([0.0, 2.0, 0.0, 0.0], device=device))


def test_float64_computes_in_float64_and_the_kernels_refuse_it(device):
    g = torch.Generator().manual_seed(3)
    student = torch.randn(4, 6, dtype=torch.float64, generator=g).to(device).requires_grad_(True)
    teacher = torch.randn(4, 6, dtype=torch.float64, generator=g).to(device)
    assert torch.autograd.gradcheck(lambda s: ops.anchor_kl(s, teacher, 2.0), (student,))
    emb, roots, neighbors, ref = _knn_problem(device)
    emb = emb.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: ops.knn_subgraph_kl(e, roots, neighbors, ref, 0.5), (emb,))
    x = torch.full((1, 3, 1, 1), 0.1, dtype=torch.float64, device=device)
    out = ops.pgd_step(x, -torch.ones_like(x), torch.zeros_like(x), 1e-9, 0.5, -1.0, 1.0)
    assert out.dtype == torch.float64 and out[0, 0, 0, 0].item() == 0.1 + 1e-9  # fp32 would round 1e-9 away
    with _path("triton", device):
        with pytest.raises(TypeError, match="float64"):
            ops.anchor_kl(student, teacher, 2.0)
        with pytest.raises(TypeError, match="float64"):
            ops.pgd_step(x, torch.ones_like(x), x, 0.1, 0.5, -1.0, 1.0)


@pytest.mark.parametrize("bounds, message", [(dict(eps=-0.1, lo=-1.0, hi=1.0), "eps must be >= 0"),
                                             (dict(eps=0.1, lo=1.0, hi=-1.0), "lo must be <= hi")])
@pytest.mark.parametrize("as_tensors", [False, True])
def test_pgd_step_refuses_a_negative_eps_or_lo_above_hi(bounds, message, as_tensors):
    x = torch.zeros(1, 3, 2, 2)
    if as_tensors:
        bounds = {k: torch.full((3,), v) for k, v in bounds.items()}
        message = "every eps must be >= 0 and every lo <= hi"
    with pytest.raises(ValueError, match=message):
        ops.pgd_step(x, torch.ones_like(x), x, 0.1, **bounds)


def test_interpreter_switched_on_after_triton_was_imported_is_named():
    probe = ("import os, torch, triton.language\n"  # triton imported (as torch.compile does) before the variable
             "os.environ['TRITON_INTERPRET'] = '1'\n"
             "from segpcl_fast import ops\n"
             "with ops.backend('triton'):\n"
             "    ops.anchor_kl(torch.randn(3, 5), torch.randn(3, 5), 2.0)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode != 0
    assert "TRITON_INTERPRET=1 was set after triton had been imported" in out.stderr, out.stderr[-1500:]


@pytest.mark.parametrize("path", PATHS)
def test_tsgr_loss_and_its_target_stay_fp32_under_autocast(path, device):
    """knn_subgraph_kl and knn_reference_logprob compute their similarities in fp32 whatever the caller's autocast
    (the reference's einsum ran in bf16 there: a bf16 loss, > 0 at student = reference, off the kernel's)."""
    emb, roots, neighbors, _ = _knn_problem(device, classes=30, dim=64, roots=4, k=3)
    tau = 0.05
    ref = ops.knn_reference_logprob(emb, roots, neighbors, tau)
    want = ops.knn_subgraph_kl(emb * 0.9 + 0.1 * emb.roll(1, 0), roots, neighbors, ref, tau)
    with _path(path, device), torch.autocast(device, dtype=torch.bfloat16):
        ref_autocast = ops.knn_reference_logprob(emb, roots, neighbors, tau)
        at_ref = ops.knn_subgraph_kl(emb, roots, neighbors, ref_autocast, tau)
        loss = ops.knn_subgraph_kl(emb * 0.9 + 0.1 * emb.roll(1, 0), roots, neighbors, ref_autocast, tau)
    assert ref_autocast.dtype == at_ref.dtype == loss.dtype == torch.float32
    torch.testing.assert_close(ref_autocast, ref)
    assert at_ref.abs() < 1e-6
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("path", PATHS)
def test_a_tensor_tau_is_read_as_a_float_on_every_path(path, device):
    """tau is a constant: a one-element tensor (any dtype, shape () or (1,)) gives the float's result, an fp32 scalar,
    on both paths (the reference's was float64, or shape (1,)); inside torch.compile it is one clear error."""
    student, teacher = torch.randn(4, 6, device=device), torch.randn(4, 6, device=device)
    emb, roots, neighbors, ref = _knn_problem(device)
    with _path(path, device):
        want_a, want_k = ops.anchor_kl(student, teacher, 2.0), ops.knn_subgraph_kl(emb, roots, neighbors, ref, 0.5)
        for as_tensor in (lambda v: torch.tensor(v, dtype=torch.float64), lambda v: torch.tensor([v])):
            got_a = ops.anchor_kl(student, teacher, as_tensor(2.0))
            got_k = ops.knn_subgraph_kl(emb, roots, neighbors, ref, as_tensor(0.5))
            for got, want in ((got_a, want_a), (got_k, want_k)):
                assert got.dtype == torch.float32 and got.shape == () and torch.equal(got, want)
        torch.testing.assert_close(ops.knn_reference_logprob(emb, roots, neighbors, torch.tensor(0.5, dtype=torch.float64)),
                                   ops.knn_reference_logprob(emb, roots, neighbors, 0.5))
        torch._dynamo.reset()
        compiled = torch.compile(lambda s, t, tau: ops.anchor_kl(s, t, tau), fullgraph=True, backend="eager")
        # torch 2.6's dynamo reports a user exception raised under fullgraph as 'Observed exception' without
        # its message (torch 2.11 and 2.14 pass it on)
        old_dynamo = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 11)
        message = "inside torch.compile tau must be a Python float" + ("|Observed exception" if old_dynamo else "")
        with pytest.raises(Exception, match=message):
            compiled(student, teacher, torch.tensor(2.0))
        torch._dynamo.reset()
