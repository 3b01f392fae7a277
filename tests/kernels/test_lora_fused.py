"""The fused Triton LoRA-B linear (kernels/lora_fused.py, backend "triton") against the reference:
values, both gradients, the g^T u splits, determinism, saved tensors, opcheck, torch.compile."""
import pytest
import torch

from segpcl_fast import ops
from segpcl_fast.ops import lora_linear
from segpcl_fast.ops._kernels import load_kernel

fused = load_kernel("lora_fused")


def _layer(lead, n_in, n_out, rank, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n_in, generator=g)
    w = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
    b = torch.randn(n_out, generator=g) if bias else None
    a = torch.randn(rank, n_in, generator=g) / n_in ** 0.5
    lb = torch.randn(n_out, rank, generator=g) * 0.3
    to = dict(device=device, dtype=dtype)
    return (x.to(**to).requires_grad_(), w.to(**to), None if b is None else b.to(**to), a.to(**to),
            lb.to(**to).requires_grad_())


def _dt(device):
    """fp32 under the interpreter; bf16 on CUDA (there fp32 runs the merged arrangement)."""
    return torch.float32 if device == "cpu" else torch.bfloat16


def _tol(device):
    return dict(rtol=1e-4, atol=1e-5) if device == "cpu" else dict(rtol=2e-2, atol=2e-2)


def _fwd_bwd(fn, x, w, b, a, lb, scaling=0.5):
    y = fn(x, w, b, a, lb, scaling)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(y)
    grads = torch.autograd.grad(y, [t for t in (x, lb) if t.requires_grad], g)
    return (y, *grads)


@pytest.mark.parametrize("lead,n_in,n_out,rank", [((3, 37), 48, 40, 5), ((1,), 20, 70, 16), ((), 33, 17, 1),
                                                  ((130,), 64, 96, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(lead, n_in, n_out, rank, dtype, bias, device, triton_backend):
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("on CUDA the fused kernels take bf16 / fp16 (fp32 runs the merged arrangement)")
    args = _layer(lead, n_in, n_out, rank, dtype, device, bias)
    # the kernels on every width (the ragged ones exercise the masks); dispatch takes them on a GPU only for
    # widths that are multiples of 16 (fused_supported)
    got = _fwd_bwd(fused.lora_b_linear_fused, *args)
    lora_linear.lora_b_linear(*args, 0.5)
    aligned = n_in % 16 == 0 and n_out % 16 == 0  # else on a GPU what "auto" takes: merged, or the C++ op if built
    assert (ops.last_choice()["lora_b_linear"] == "triton") == (device == "cpu" or aligned)
    want = _fwd_bwd(lora_linear.lora_b_linear_reference, *args)
    truth = _fwd_bwd(lora_linear.lora_b_linear_reference, *[None if t is None else t.detach().double()
                                                            .requires_grad_(t.requires_grad) for t in args])
    for ours, ref, exact in zip(got, want, truth):
        assert ours.dtype == dtype and ours.shape == ref.shape
        if dtype == torch.float32:
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
        else:  # bf16 storage: no further from the float64 truth than the reference's own rounding allows
            err = (ours.double() - exact).abs().max().item()
            ref_err = (ref.double() - exact).abs().max().item()
            assert err <= 2.0 * ref_err + 1e-2 * exact.abs().max().item(), (err, ref_err)


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_g_t_u_splits_and_determinism(splits, device):
    """grad_B from one split (written by the side programs, scaled and rounded there) and from several
    (fp32 partials summed afterwards) are the same product; a repeat is bit-identical (no atomics)."""
    x, w, b, a, lb = _layer((150,), 40, 56, 6, _dt(device), device, seed=1)
    y, u, merged = fused.lora_fused_forward(x.detach(), w, b, a, lb.detach(), 0.5)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y)
    tiles = fused.FusedTiles(block_m=32, block_n=32, block_k=32, block_o=32, group_m=2, num_warps=4, num_stages=1,
                             splits=splits)
    grad_x, grad_B = fused.lora_fused_backward(g, u, merged, lb.detach(), 0.5, tiles)
    again = fused.lora_fused_backward(g, u, merged, lb.detach(), 0.5, tiles)
    assert torch.equal(grad_x, again[0]) and torch.equal(grad_B, again[1])
    f = torch.float32
    tol = dict(rtol=1e-5, atol=1e-5) if device == "cpu" else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad_x.to(f), g.to(f) @ merged.to(f), **tol)
    torch.testing.assert_close(grad_B.to(f), 0.5 * g.to(f).T @ u.to(f), **tol)
    torch.testing.assert_close(u.to(f), x.detach().to(f) @ a.to(f).T, **tol)
    torch.testing.assert_close(merged.to(f), w.to(f) + 0.5 * lb.detach().to(f) @ a.to(f), **tol)


def test_saves_u_not_x_and_partial_gradients(device, triton_backend):
    """Autograd keeps u (N x r) and the merged weight, never x; grad_x alone and grad_B alone (a
    tower's first layer: x needs none) take their own products."""
    x, w, b, a, lb = _layer((200,), 64, 48, 4, _dt(device), device, seed=3)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lora_linear.lora_b_linear(x, w, b, a, lb, 0.5)
    assert sorted(tuple(t.shape) for t in saved) == sorted([(200, 4), (48, 64), (48, 4)])
    assert not any(t.data_ptr() == x.data_ptr() for t in saved)
    g = torch.randn_like(y)
    want_x, want_B = torch.autograd.grad(lora_linear.lora_b_linear_reference(x, w, b, a, lb, 0.5), (x, lb), g)
    (only_x,) = torch.autograd.grad(lora_linear.lora_b_linear(x, w, b, a, lb, 0.5), (x,), g)
    (only_B,) = torch.autograd.grad(lora_linear.lora_b_linear(x.detach(), w, b, a, lb, 0.5), (lb,), g)
    torch.testing.assert_close(only_x, want_x, **_tol(device))
    torch.testing.assert_close(only_B, want_B, **_tol(device))


def test_dispatch_takes_it_only_where_it_runs_and_b_trains(device, triton_backend):
    x, w, b, a, lb = _layer((8,), 16, 32, 4, _dt(device), device)
    with torch.no_grad():  # no gradient for B: the merged arrangement's one GEMM
        lora_linear.lora_b_linear(x, w, b, a, lb, 0.5)
    assert ops.last_choice()["lora_b_linear"] == "merged"
    lora_linear.lora_b_linear(*_layer((8,), 16, 32, 4, torch.float64, device), 0.5)  # float64: not the fused path
    assert ops.last_choice()["lora_b_linear"] != "triton"
    x, w, b, a, lb = _layer((8,), 16, 32, 4, torch.float32, device)
    with torch.autocast(device, dtype=torch.bfloat16):  # fp32 x, cast like F.linear: the fused path in bf16
        y = lora_linear.lora_b_linear(x, w, b, a, lb, 0.5)
    assert ops.last_choice()["lora_b_linear"] == "triton" and y.dtype == torch.bfloat16
    x, w, b, a, lb = _layer((8,), 16, 32, 4, torch.float64, device)
    with torch.autocast(device, dtype=torch.bfloat16):  # autocast leaves float64 alone: not the fused path
        y = lora_linear.lora_b_linear(x, w, b, a, lb, 0.5)
    assert ops.last_choice()["lora_b_linear"] != "triton" and y.dtype == torch.float64
    x, w, b, a, lb = _layer((8,), 16, 32, 4, _dt(device), device)
    with pytest.raises(RuntimeError, match="lora_A require"):  # a direct call: refused, not a silent None
        torch.ops.segpcl.lora_fused_fwd(x, w, b, a.requires_grad_(), lb, 0.5)


def test_opcheck_empty_batch_and_compile(device, triton_backend, graph_breaks):
    x, w, b, a, lb = _layer((6,), 16, 32, 4, _dt(device), device)
    torch.library.opcheck(torch.ops.segpcl.lora_fused_fwd.default, (x, w, b, a, lb, 0.5))
    torch.library.opcheck(torch.ops.segpcl.lora_fused_fwd.default, (x.detach(), w, None, a, lb.detach(), 0.5))
    y, u, merged = torch.ops.segpcl.lora_fused_fwd(x.detach(), w, b, a, lb.detach(), 0.5)
    torch.library.opcheck(torch.ops.segpcl.lora_fused_bwd.default, (torch.randn_like(y), u, merged, lb.detach(), 0.5))
    empty = _fwd_bwd(lora_linear.lora_b_linear, x[:0].detach().requires_grad_(), w, b, a, lb)
    assert empty[0].shape == (0, 32) and empty[1].shape == (0, 16) and (empty[2] == 0).all()
    compiled = torch.compile(lora_linear.lora_b_linear, fullgraph=True, backend="aot_eager")
    got = _fwd_bwd(compiled, x, w, b, a, lb)
    assert graph_breaks() == 0
    for ours, ref in zip(got, _fwd_bwd(lora_linear.lora_b_linear_reference, x, w, b, a, lb)):
        torch.testing.assert_close(ours, ref, **_tol(device))


def test_output_takes_in_place_changes_and_a_strided_bias(device, triton_backend):
    """The op returns its own tensors, not views of them (autograd refuses in-place changes of a
    custom op's view output); a bias with stride 2 is read as such."""
    x, w, b, a, lb = _layer((5, 7), 32, 48, 4, _dt(device), device)
    strided = torch.zeros(96, device=device, dtype=b.dtype)[::2]
    strided.copy_(b)
    y = lora_linear.lora_b_linear(x, w, strided, a, lb, 0.5)
    assert ops.last_choice()["lora_b_linear"] == "triton"
    torch.testing.assert_close(y, lora_linear.lora_b_linear_reference(x, w, b, a, lb, 0.5), **_tol(device))
    y.add_(1.0)
    y.sum().backward()
    assert x.grad is not None and lb.grad is not None


def test_row_slices_of_a_packed_weight(device, triton_backend):
    """The class-token last block (model/vit_tail.py) projects q and k, v with row slices of the packed
    in_proj: W[d:3d], its bias and B_full rows are views with a storage offset. Values and gradients
    equal the reference on the same slices."""
    d = 16
    x, w, b, a, lb = _layer((5, 7), d, 3 * d, 4, _dt(device), device)
    for rows in (slice(0, d), slice(d, 3 * d)):
        args = (x, w[rows], b[rows], a, lb[rows])  # lb[rows]: a view of the trained B_full, as packed_lora_B()[rows]
        assert args[1].storage_offset() == rows.start * d and args[4].storage_offset() == rows.start * 4
        got = _fwd_bwd(lora_linear.lora_b_linear, *args)
        assert ops.last_choice()["lora_b_linear"] == "triton"
        want = _fwd_bwd(lora_linear.lora_b_linear_reference, *args)
        for ours, ref in zip(got, want):
            torch.testing.assert_close(ours, ref, **_tol(device))


def test_gpu_dispatch_wants_widths_in_multiples_of_16():
    """On a GPU, a width (in or out) that is not a multiple of 16 compiles the GEMMs without their K-step
    prefetch (GPU_WIDTH_MULTIPLE): dispatch leaves such layers to the merged arrangement. Under the
    interpreter any width runs (the tests' ragged widths exercise the masks)."""
    cuda = torch.device("cuda")
    assert fused.fused_supported(cuda, torch.bfloat16, 16, (768, 768))
    assert fused.fused_supported(cuda, torch.float16, 16, (3072, 768))
    for shape in ((1000, 1000), (768, 760), (40, 48), (1, 16)):
        assert not fused.fused_supported(cuda, torch.bfloat16, 16, shape), shape
    assert not fused.fused_supported(cuda, torch.float32, 16, (768, 768))  # fp32: no tensor-core tl.dot
    if fused.fused_supported(torch.device("cpu"), torch.float32):
        assert fused.fused_supported(torch.device("cpu"), torch.float32, 16, (33, 17))


def test_backward_reads_a_column_major_merged_weight(device):
    """A direct lora_fused_bwd call with a transposed-layout W' (strides (1, out)) gives the products of its
    values, as with the row-major W' the forward returns (the kernel reads W' rows with unit stride)."""
    x, w, b, a, lb = _layer((40,), 32, 48, 4, _dt(device), device, seed=6)
    y, u, merged = fused.lora_fused_forward(x.detach(), w, b, a, lb.detach(), 0.5)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
    column_major = merged.t().contiguous().t()
    assert column_major.stride() == (1, merged.shape[0]) and torch.equal(column_major, merged)
    want = fused.lora_fused_backward(g, u, merged, lb.detach(), 0.5)
    got = fused.lora_fused_backward(g, u, column_major, lb.detach(), 0.5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_a_layer_with_no_output_column(device):
    """out = 0: y and grad_B are empty and grad_x = g W' is zeros. The backward launches nothing (its
    grid would hold no g^T u side program, and _is_side's period divides by that count: on a GPU a
    division by zero, under the interpreter numpy's 0)."""
    x, w, b, a, lb = _layer((9,), 32, 0, 4, _dt(device), device)
    y, u, merged = fused.lora_fused_forward(x.detach(), w, b, a, lb.detach(), 0.5)
    assert y.shape == (9, 0) and u.shape == (9, 4) and merged.shape == (0, 32)
    torch.testing.assert_close(u.float(), x.detach().float() @ a.float().T, **_tol(device))
    grad_x, grad_B = fused.lora_fused_backward(torch.zeros_like(y), u, merged, lb.detach(), 0.5)
    assert grad_x.shape == (9, 32) and bool((grad_x == 0).all()) and grad_B.shape == (0, 4)


def test_ranks_past_the_tile_take_another_path(device, triton_backend):
    """r > MAX_RANK (a tile the GPU's shared memory cannot hold): dispatch takes another path, and the
    launcher itself refuses with one clear error."""
    x, w, b, a, lb = _layer((6,), 16, 32, fused.MAX_RANK + 1, _dt(device), device)  # widths the GPU's rule takes
    lora_linear.lora_b_linear(x, w, b, a, lb, 0.5)
    assert ops.last_choice()["lora_b_linear"] != "triton"
    with pytest.raises(ValueError, match="exceeds the kernels' tile"):
        fused.lora_fused_forward(x.detach(), w, b, a, lb.detach(), 0.5)


@pytest.mark.parametrize("splits", [None, 3])
def test_the_gpu_tiles_give_the_same_products(splits, device):
    """The GPU's default tiles (128 x 128 x 64, 64-row blocks of out for g^T u), run here through the
    interpreter on a layer none of whose sizes is a multiple of them: the grid mapping, masks and
    split reduction the GPU will use."""
    x, w, b, a, lb = _layer((300,), 200, 260, 40, _dt(device), device, seed=4)
    tiles = fused.FusedTiles(splits=splits)  # the GPU defaults (num_stages has no effect in the interpreter)
    y, u, merged = fused.lora_fused_forward(x.detach(), w, b, a, lb.detach(), 0.5, tiles)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y)
    grad_x, grad_B = fused.lora_fused_backward(g, u, merged, lb.detach(), 0.5, tiles)
    f = torch.float32
    tol = dict(rtol=1e-4, atol=1e-4) if device == "cpu" else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.to(f), x.detach().to(f) @ merged.to(f).T + b.to(f), **tol)
    torch.testing.assert_close(u.to(f), x.detach().to(f) @ a.to(f).T, **tol)
    torch.testing.assert_close(grad_x.to(f), g.to(f) @ merged.to(f), **tol)
    torch.testing.assert_close(grad_B.to(f), 0.5 * g.to(f).T @ u.to(f), **tol)


@pytest.mark.parametrize("trial", range(12))
def test_random_shapes_and_tiles(trial, device):
    """Random sizes (1 included) and tiles, grouping and splits: every output against plain products
    (float32 under the interpreter; bf16 on CUDA within its rounding)."""
    import random
    rnd = random.Random(trial)
    M, K, N, R = (rnd.choice(v) for v in ([1, 5, 33, 65, 130], [1, 16, 31, 70], [1, 15, 33, 100], [1, 7, 16, 40]))
    tiles = fused.FusedTiles(block_m=rnd.choice([16, 32, 64]), block_n=rnd.choice([16, 32, 64]),
                             block_k=rnd.choice([16, 32]), block_o=rnd.choice([16, 32]), group_m=rnd.choice([1, 2, 8]),
                             num_warps=4, num_stages=1, splits=rnd.choice([None, 1, 2, 5]))
    x, w, b, a, lb = _layer((M,), K, N, R, _dt(device), device, bias=trial % 2 == 0, seed=trial)
    y, u, merged = fused.lora_fused_forward(x.detach(), w, b, a, lb.detach(), 0.7, tiles)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(trial)).to(y)
    grad_x, grad_B = fused.lora_fused_backward(g, u, merged, lb.detach(), 0.7, tiles)
    f = torch.float32
    tol = dict(rtol=1e-4, atol=1e-4) if device == "cpu" else dict(rtol=3e-2, atol=3e-2)
    bias = b.to(f) if b is not None else 0.0
    torch.testing.assert_close(y.to(f), x.detach().to(f) @ merged.to(f).T + bias, **tol)
    torch.testing.assert_close(u.to(f), x.detach().to(f) @ a.to(f).T, **tol)
    torch.testing.assert_close(grad_x.to(f), g.to(f) @ merged.to(f), **tol)
    torch.testing.assert_close(grad_B.to(f), 0.7 * g.to(f).T @ u.to(f), **tol)
