"""pgd_step: Triton kernel vs reference (bitwise), vs torchattacks' PGD, autograd, opcheck, compile."""
import importlib.util

import pytest
import torch

from segpcl_fast import ops
from segpcl_fast.ops._kernels import load_kernel

kernel = load_kernel("pgd_step")

SHAPES = [(1, 1, 1, 1), (2, 3, 7, 9), (3, 4, 5, 13)]


def _triton_version() -> tuple:
    import triton
    return tuple(int(part) for part in triton.__version__.split(".")[:2])


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x0 = torch.rand(shape, generator=g)
    x_adv = (x0 + 0.06 * (torch.rand(shape, generator=g) - 0.5)).clamp(0, 1)
    grad = torch.randn(shape, generator=g)
    grad[grad.abs() < 0.1] = 0.0  # exercise sign(0) = 0
    per_channel = [0.01 + 0.02 * torch.rand(c, generator=g),  # gamma
                   0.02 + 0.02 * torch.rand(c, generator=g),  # eps
                   -0.1 * torch.rand(c, generator=g),  # lo
                   0.9 + 0.2 * torch.rand(c, generator=g)]  # hi
    tensors = [t.to(device=device, dtype=dtype) for t in (x_adv, grad, x0)]
    return tensors + [p.to(device) for p in per_channel]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_bitwise(shape, dtype, device, triton_backend):
    args = _inputs(shape, dtype, device, seed=sum(shape))
    out = ops.pgd_step(*args)
    assert ops.last_choice()["pgd_step"] == "triton"
    expected = kernel.pgd_step_reference(*args)
    assert out.dtype == dtype and out.shape == args[0].shape
    assert torch.equal(out, expected)
    if out.numel() > 8:  # the step really moved: not a copy of x_adv or x0
        assert not torch.equal(out, args[0]) and not torch.equal(out, args[2])


@pytest.mark.parametrize("block", [8, 16, 64])
def test_several_pixel_blocks_a_plane_keep_the_result(block, device):
    """The 1-D grid's program -> (plane, pixel block) mapping where a plane takes several programs (on a
    GPU every 224 x 224 plane does: 25 blocks of 2048; the interpreter's default is one a plane), with a
    ragged last block (65 pixels a plane), against the reference bit for bit."""
    args = _inputs((3, 4, 5, 13), torch.float32, device, seed=11)
    out = kernel.pgd_step_triton(*args, block=block)
    assert torch.equal(out, kernel.pgd_step_reference(*args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_writes_x_adv(dtype, device, triton_backend):
    args = _inputs((2, 3, 6, 5), dtype, device, seed=3)
    expected = kernel.pgd_step_reference(*args)
    x_adv = args[0]
    out = ops.pgd_step(*args, inplace=True)
    assert out is x_adv
    assert torch.equal(x_adv, expected)


def test_inplace_non_contiguous_x_adv(device, triton_backend):
    args = _inputs((2, 3, 5, 4), torch.float32, device, seed=4)
    expected = kernel.pgd_step_reference(*args)
    x_adv_t = args[0].transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert not x_adv_t.is_contiguous()
    ops.pgd_step(x_adv_t, *args[1:], inplace=True)
    assert torch.equal(x_adv_t, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_runs_in_its_own_layout(dtype, device, triton_backend):
    """NHWC (channels_last) images: the kernel reads them where they lie (no contiguous copies, which were three
    per DPGD step) and gives the reference's values and layout; in place, x_adv keeps its storage."""
    args = _inputs((2, 3, 5, 7), dtype, device, seed=12)
    expected = kernel.pgd_step_reference(*args)
    last = [t.contiguous(memory_format=torch.channels_last) for t in args[:3]] + args[3:]
    assert not last[0].is_contiguous()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        out = ops.pgd_step(*last)
    image_shape = list(last[0].shape)  # copies of the images (the (C,) bounds' casts are not)
    seen = {event.name for event in prof.events() if image_shape in event.input_shapes}
    assert ops.last_choice()["pgd_step"] == "triton" and torch.equal(out, expected)
    assert out.stride() == kernel.pgd_step_reference(*last).stride() == last[0].stride()
    if dtype == torch.float32:  # (bf16 under the interpreter: stored in fp32 and rounded by torch, one copy)
        # Triton < 3.6's interpreter copies every tensor argument back after a launch (aten::to + copy_ in its
        # _restore_args_dev; seen on 3.2, not on 3.6 / 3.8): there a launcher's own copy shows as a clone only
        interpreter_copies = device == "cpu" and _triton_version() < (3, 6)
        assert not any("clone" in op or ("copy" in op and not interpreter_copies) for op in seen), seen
    x_adv = last[0].clone(memory_format=torch.channels_last)
    storage = x_adv.data_ptr()
    assert ops.pgd_step(x_adv, *last[1:], inplace=True) is x_adv
    assert torch.equal(x_adv, expected) and x_adv.data_ptr() == storage and x_adv.stride() == last[0].stride()
    mixed = [last[0], args[1], last[2]] + args[3:]  # a mixed layout: contiguous copies, the same values
    assert torch.equal(ops.pgd_step(*mixed), expected)
    torch.library.opcheck(torch.ops.segpcl.pgd_step.default, last, test_utils=("test_schema", "test_faketensor"))


def test_inplace_on_an_inference_tensor_is_refused_on_every_path(device):
    """As torch's in-place ops: an inference tensor is written only inside inference_mode (the Triton path wrote it
    silently where the reference raised)."""
    with torch.inference_mode():
        args = _inputs((1, 3, 4, 4), torch.float32, device, seed=13)
        expected = kernel.pgd_step_reference(*args)
    for backend in ("triton", "reference"):
        with ops.backend(backend), pytest.raises(RuntimeError, match="inference tensor outside torch.inference_mode"):
            ops.pgd_step(*args, inplace=True)
        with ops.backend(backend), torch.inference_mode():
            x_adv = args[0].clone()
            ops.pgd_step(x_adv, *args[1:], inplace=True)
        assert torch.equal(x_adv, expected)


def test_hand_computed_values():
    # x0 = 0.5, eps = 0.1, gamma = 0.25: a descent step of 0.25 is cut back to the ball edge 0.4;
    # the upper box hi = 0.55 clips an ascent; a zero gradient does not move.
    x_adv = torch.tensor([0.5, 0.5, 0.45, 0.5]).view(1, 4, 1, 1)
    grad = torch.tensor([1.0, -1.0, 1.0, 0.0]).view(1, 4, 1, 1)
    x0 = torch.full_like(x_adv, 0.5)
    gamma, eps = torch.full((4,), 0.25), torch.full((4,), 0.1)
    lo, hi = torch.zeros(4), torch.full((4,), 0.55)
    out = kernel.pgd_step_reference(x_adv, grad, x0, gamma, eps, lo, hi).flatten()
    assert torch.allclose(out, torch.tensor([0.4, 0.55, 0.4, 0.5]))


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_equals_torchattacks_pgd(impl, device):
    """torchattacks' PGD ascends CE; our step descends, so feed it the negated gradient."""
    if importlib.util.find_spec("torchattacks") is None:  # installed but broken: an error, not a skip
        pytest.skip("torchattacks is not installed (pip install -e '.[test]')")
    import torchattacks
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5)).to(device)
    images = torch.rand(4, 3, 8, 8, device=device)
    labels = torch.randint(0, 5, (4,), device=device)
    steps, alpha, eps = 3, 2 / 255, 8 / 255
    attack = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)
    expected = attack(images, labels)

    adv = images.clone()
    with ops.backend(impl):
        for _ in range(steps):
            adv.requires_grad_(True)
            cost = torch.nn.functional.cross_entropy(model(adv), labels)
            grad = torch.autograd.grad(cost, adv)[0]
            adv = ops.pgd_step(adv.detach(), -grad, images, alpha, eps, 0.0, 1.0)
    assert torch.equal(adv, expected)
    assert (adv - images).abs().max() > 0


def test_nan_behaviour(device, triton_backend):
    """sign(NaN) = 0 (torch.sign): a NaN gradient does not move the pixel; NaN pixels stay NaN."""
    x_adv, grad, x0, *pc = _inputs((1, 3, 4, 4), torch.float32, device, seed=5)
    grad[0, 0, 0, 0] = float("nan")
    x_adv[0, 1, 1, 1] = float("nan")
    x0[0, 2, 2, 2] = float("nan")
    x_adv[0, 2, 3, 3] = float("inf")
    out = ops.pgd_step(x_adv, grad, x0, *pc)
    expected = kernel.pgd_step_reference(x_adv, grad, x0, *pc)
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(expected))
    assert out.isnan().sum() == 2 and out[0, 1, 1, 1].isnan() and out[0, 2, 2, 2].isnan()
    no_step = kernel.pgd_step_reference(x_adv, torch.zeros_like(grad), x0, *pc)
    assert out[0, 0, 0, 0] == no_step[0, 0, 0, 0]
    assert out[0, 2, 3, 3].isfinite()  # +inf is projected into the eps-ball around x0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_subnormal_gradients_step_like_torch_sign(dtype, device, triton_backend):
    """A gradient too small to be normal still has a sign (torch.sign gives +-1): the step moves the
    pixel as for any other gradient of that sign. On the GPU a flush-to-zero anywhere in the kernel's
    sign would leave those pixels in place. Triton's CPU interpreter converts bf16 subnormals to 0, so
    there the bf16 case is the GPU's only."""
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the interpreter flushes bf16 subnormals on load (a GPU converts them exactly)")
    x_adv, grad, x0, *pc = _inputs((1, 3, 4, 4), dtype, device, seed=6)
    tiny = torch.finfo(dtype).tiny
    grad[0, :, :2] = tiny / 4  # subnormal, positive
    grad[0, :, 2:] = -tiny / 8  # subnormal, negative
    assert (grad != 0).all() and (grad.abs() < tiny).all()
    out = ops.pgd_step(x_adv, grad, x0, *pc)
    assert torch.equal(out, kernel.pgd_step_reference(x_adv, grad, x0, *pc))
    assert not torch.equal(out, kernel.pgd_step_reference(x_adv, torch.zeros_like(grad), x0, *pc))


def test_autograd_matches_reference(device, triton_backend):
    x_adv, grad, x0, *pc = _inputs((2, 3, 5, 5), torch.float32, device, seed=6)
    x_adv.requires_grad_(True)
    x0.requires_grad_(True)
    weights = torch.randn(x_adv.shape, device=device)
    (ops.pgd_step(x_adv, grad, x0, *pc) * weights).sum().backward()
    got = (x_adv.grad.clone(), x0.grad.clone())
    x_adv.grad = x0.grad = None
    (kernel.pgd_step_reference(x_adv, grad, x0, *pc) * weights).sum().backward()
    assert torch.equal(got[0], x_adv.grad) and torch.equal(got[1], x0.grad)
    assert got[0].abs().sum() > 0 and got[1].abs().sum() > 0  # both clamps active somewhere


def test_opcheck(device):
    args = _inputs((2, 3, 3, 5), torch.float32, device, seed=7)
    torch.library.opcheck(torch.ops.segpcl.pgd_step.default, args)
    torch.library.opcheck(torch.ops.segpcl.pgd_step_.default, [a.clone() for a in args])
    with_grad = [a.clone().requires_grad_(i in (0, 2)) for i, a in enumerate(args)]
    torch.library.opcheck(torch.ops.segpcl.pgd_step.default, with_grad,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compile_fullgraph_no_breaks(device, triton_backend, graph_breaks):
    x_adv, grad, x0, gamma, eps, lo, hi = _inputs((2, 3, 4, 6), torch.float32, device, seed=8)

    def k_steps(x, g):
        x = ops.pgd_step(x, g, x0, gamma, eps, lo, hi)
        return ops.pgd_step(x, -g, x0, gamma, eps, lo, hi, inplace=True)

    compiled = torch.compile(k_steps, fullgraph=True, backend="aot_eager")
    out = compiled(x_adv, grad)
    assert graph_breaks() == 0
    expected = kernel.pgd_step_reference(kernel.pgd_step_reference(x_adv, grad, x0, gamma, eps, lo, hi),
                                         -grad, x0, gamma, eps, lo, hi)
    assert torch.equal(out, expected)


def test_compile_fullgraph_with_number_and_list_bounds(device, triton_backend, graph_breaks):
    """Bounds as Python numbers and lists (the documented host forms) trace too: numpy calls on them
    broke the graph (a review's finding)."""
    x_adv, grad, x0, gamma, eps, lo, hi = _inputs((2, 3, 4, 6), torch.float32, device, seed=9)
    gammas = gamma.tolist()

    def step(x, g):
        return ops.pgd_step(x, g, x0, gammas, 0.05, -1.5, [2.0, 2.5, 3.0])

    out = torch.compile(step, fullgraph=True, backend="aot_eager")(x_adv, grad)
    assert graph_breaks() == 0
    channels = lambda v: torch.tensor(v, dtype=torch.float32, device=device)  # noqa: E731
    expected = kernel.pgd_step_reference(x_adv, grad, x0, gamma, channels([0.05] * 3), channels([-1.5] * 3),
                                         channels([2.0, 2.5, 3.0]))
    assert torch.equal(out, expected)


def test_dispatch_choice_and_errors(monkeypatch):
    args = _inputs((1, 3, 2, 2), torch.float32, "cpu")
    ops.pgd_step(*args)  # auto on CPU: the reference
    assert ops.last_choice()["pgd_step"] == "reference"
    with pytest.raises(ValueError, match="per-channel"):
        ops.pgd_step(*args[:3], torch.zeros(2), *args[4:])
    with pytest.raises(ValueError, match="must match"):
        ops.pgd_step(args[0], args[1][:, :, :1], *args[2:])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with ops.backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.pgd_step(*args)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bounds_as_sequences_of_one_number_per_channel(backend, device):
    """gamma / eps / lo / hi as lists or tuples (CLIP's per-channel mean and std are lists): a list failed in
    float() with no word of what the op takes (a review's finding). They equal the same values as tensors."""
    x_adv, grad, x0, gamma, eps, lo, hi = _inputs((2, 3, 4, 4), torch.float32, device)
    with ops.backend(backend):
        as_lists = ops.pgd_step(x_adv, grad, x0, gamma.tolist(), tuple(eps.tolist()), lo.tolist(), hi.tolist())
        assert ops.last_choice()["pgd_step"] == backend
        assert torch.equal(as_lists, ops.pgd_step(x_adv, grad, x0, gamma, eps, lo, hi))
        import numpy as np  # numpy arrays and scalars, as float() took a 0-d one before
        as_numpy = ops.pgd_step(x_adv, grad, x0, gamma.cpu().numpy(), eps.cpu().numpy(), np.float64(0.0), np.array(1.0))
        assert torch.equal(as_numpy, ops.pgd_step(x_adv, grad, x0, gamma, eps, 0.0, 1.0))
    for bad, message in [({"gamma": "0.1"}, "gamma must be a number, a sequence of one number per channel"),
                         ({"eps": [0.1, None, 0.1]}, "eps must be a number, a sequence"),
                         ({"lo": []}, "lo must be a number, a sequence"),
                         ({"hi": [[1.0, 1.0, 1.0]]}, "hi must be a number, a sequence"),
                         ({"gamma": [True, False, True]}, "gamma must be a number, a sequence"),
                         ({"eps": [0.1, -0.1, 0.1]}, "eps must be >= 0"),
                         ({"lo": [0.0, 2.0, 0.0], "hi": 1.0}, "lo must be <= hi"),
                         ({"lo": [0.0, 0.5, 0.0], "hi": [1.0, 0.4, 1.0]}, "lo must be <= hi")]:
        kwargs = {"gamma": 0.1, "eps": 0.1, "lo": 0.0, "hi": 1.0, **bad}
        with pytest.raises((TypeError, ValueError), match=message):
            ops.pgd_step(x_adv, grad, x0, **kwargs)
