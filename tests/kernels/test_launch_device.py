"""Every Triton launch runs on its tensors' device (Triton launches on the *current* GPU and stream),
the launchers refuse tensors on several devices, and the extra outputs that carry a forward-computed
gradient (anchor_kl's dkl_dz, knn's g and g_root) are not differentiable."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from segpcl_fast.ops._kernels import load_kernel

KERNELS = ("pgd_step", "anchor_kl", "knn_subgraph_kl")


def _launches(device):
    """One call of each launcher (name, thunk) on small inputs."""
    pgd, akl, knn = (load_kernel(name) for name in KERNELS)
    x = torch.rand(2, 3, 4, 5, device=device)
    bounds = [torch.full((3,), v, device=device) for v in (0.01, 0.03, -2.0, 2.0)]
    z = torch.randn(6, 10, device=device)
    emb = F.normalize(torch.randn(8, 4, device=device), dim=-1)
    roots = torch.tensor([0, 3], device=device)
    neighbors = torch.tensor([[1, 2], [4, 5]], device=device)
    log_q0 = F.log_softmax(torch.randn(2, 2, device=device), -1)
    g, g_root = torch.randn(2, 2, device=device), torch.randn(2, 4, device=device)
    return [("pgd_step", lambda: pgd.pgd_step_triton(x, torch.randn_like(x), x.clone(), *bounds)),
            ("anchor_kl", lambda: akl.anchor_kl_triton(z, z + 1, 20.0)),
            ("anchor_kl chunked", lambda: akl.anchor_kl_triton(z, z + 1, 20.0, chunk_cols=4)),
            ("knn forward", lambda: knn.knn_kl_forward_triton(emb, roots, neighbors, log_q0, 0.1)),
            ("knn backward", lambda: knn.knn_kl_backward_triton(torch.ones(2, device=device), emb, roots, neighbors,
                                                                g, g_root))]


def test_every_launch_is_made_on_its_tensors_device(device, monkeypatch):
    entered = []

    def recording(t):
        entered.append(t.device)
        return contextlib.nullcontext()

    for name in KERNELS:
        monkeypatch.setattr(load_kernel(name), "launch_device", recording)
    for name, launch in _launches(device):
        entered.clear()
        launch()
        assert [d.type for d in entered] == [device], name


def test_launch_device_makes_the_tensors_gpu_current():
    utils = load_kernel("_triton_utils")
    assert isinstance(utils.launch_device(torch.zeros(1)), contextlib.nullcontext)
    meta_cuda = torch.empty(1, device="meta")
    assert isinstance(utils.launch_device(meta_cuda), contextlib.nullcontext)
    if torch.cuda.is_available():
        guard = utils.launch_device(torch.zeros(1, device="cuda:0"))
        assert isinstance(guard, torch.cuda.device) and guard.idx == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_on_the_second_gpu_while_the_first_is_current():
    torch.cuda.set_device(0)
    for name, launch in _launches("cuda:1"):
        out = launch()
        torch.cuda.synchronize(1)
        first = out[0] if isinstance(out, tuple) else out
        assert first.device == torch.device("cuda:1") and first.isfinite().all(), name


def test_tensors_on_several_devices_are_refused(device):
    if device == "cuda":
        pytest.skip("the CPU/meta mix below is enough")
    akl, pgd = load_kernel("anchor_kl"), load_kernel("pgd_step")
    z = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="must be on one device"):
        akl.anchor_kl_triton(z, torch.randn(3, 4, device="meta"), 20.0)
    x = torch.rand(1, 3, 2, 2)
    bounds = [torch.full((3,), 0.1) for _ in range(3)] + [torch.full((3,), 1.0, device="meta")]
    with pytest.raises(RuntimeError, match="must be on x_adv's device"):
        pgd.pgd_step_triton(x, x, x, *bounds)


def test_forward_computed_gradients_are_not_differentiable(device):
    """A gradient taken through dkl_dz (or knn's g, g_root) was silently dropped: now they are marked
    non-differentiable, and autograd materialises no zeros for them."""
    load_kernel("anchor_kl"), load_kernel("knn_subgraph_kl")  # registers the ops
    z = torch.randn(5, 7, device=device, requires_grad=True)
    kl_rows, dkl = torch.ops.segpcl.anchor_kl_rows(z, torch.randn(5, 7, device=device), 20.0, False)
    assert kl_rows.requires_grad and not dkl.requires_grad
    emb = F.normalize(torch.randn(8, 4, device=device), dim=-1).requires_grad_(True)
    log_q0 = F.log_softmax(torch.randn(2, 2, device=device), -1)
    kl, g, g_root = torch.ops.segpcl.knn_subgraph_kl_rows(emb, torch.tensor([0, 3], device=device),
                                                          torch.tensor([[1, 2], [4, 5]], device=device), log_q0, 0.1)
    assert kl.requires_grad and not g.requires_grad and not g_root.requires_grad
    (kl.sum() + kl_rows.sum()).backward()
    assert emb.grad.isfinite().all() and z.grad.isfinite().all()
