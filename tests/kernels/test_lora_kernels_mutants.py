"""The LoRA-B-only linear's Triton GEMMs (kernels/lora_fused.py, kernels/lora_merge.py) and the shared
launch helpers (kernels/_triton_utils.py): properties the other kernel tests leave open (found by a
mutation audit):

- _is_side with no GEMM tile at all (out = 0 in the forward, in = 0 in the backward) over several row /
  out blocks: every side program (period 1) still runs its own block; and nothing launched by the
  backward with out = 0 or no row;
- operands in other layouts: x, A, grad_y and u with a non-unit last stride (column-major), W a column
  slice of a wider matrix and A with a row stride past its width (lora_merge), all giving the same bits;
- bf16 / fp16 outputs of all three launchers are their fp32 results rounded to nearest (the interpreter's
  own cast truncates: store_dtype), and grad_B takes lora_B's dtype (also in the fake kernel);
- every launch enters its tensors' device (launch_device) and u / W' come out non-differentiable;
- the launchers' checks: a bias or W' of another shape, a B of another shape for lora_merge, float64, the
  int32 reach of W (the forward reads a contiguous W', the backward W' as given: patched limit), rank
  MAX_RANK itself taken, splits 0 read as 1 and the split count's 4096-row rule;
- fused_supported: fp16 on the CPU under the interpreter, rank MAX_RANK, a CPU tensor off the interpreter;
- _triton_utils: interpret_mode's spellings, can_run_triton / check_can_run for meta tensors and without
  triton, launch_device on a (stub) CUDA tensor, next_pow2 / prev_pow2 / common_divisor by hand,
  store_dtype on and off the interpreter, compute_dtype; cuda:0 and cuda:1 (stubs) refused as two devices,
  a CUDA / CPU mix run nowhere;
- registration and autograd: the three ops' schemas mutate and alias nothing; each fake kernel gives its
  launch's shapes, dtypes and strides (a column-major W, a W of another dtype than A and B in the merge,
  fp16 in the fused ops); the fused backward launches its kernel only when grad_x and grad_B are both
  needed (one alone: its own product, values checked for each); create_graph=True through the fused op
  is refused (u is saved without its graph); an empty W launches no merge kernel.

Grids are kept small: under the interpreter each program costs a few ms."""
import contextlib
import types

import pytest
import torch

from segpcl_fast.ops._kernels import load_kernel

fused = load_kernel("lora_fused")
merge = load_kernel("lora_merge")
utils = load_kernel("_triton_utils")

F32 = torch.float32


def _dt(device):
    """fp32 under the interpreter; bf16 on CUDA (there the fused kernels take bf16 / fp16)."""
    return F32 if device == "cpu" else torch.bfloat16


def _tol(device):
    return dict(rtol=1e-5, atol=1e-5) if device == "cpu" else dict(rtol=3e-2, atol=3e-2)


def _tiles(**kw):
    base = dict(block_m=16, block_n=16, block_k=16, block_o=16, group_m=2, num_warps=4, num_stages=1)
    return fused.FusedTiles(**{**base, **kw})


def _randn(*shape, seed, device, dtype, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(device=device, dtype=dtype)


def _layer(rows, n_in, n_out, rank, device, seed=0, bias=True):
    dt = _dt(device)
    x = _randn(rows, n_in, seed=seed, device=device, dtype=dt)
    w = _randn(n_out, n_in, seed=seed + 1, device=device, dtype=dt, scale=max(n_in, 1) ** -0.5)
    b = _randn(n_out, seed=seed + 2, device=device, dtype=dt) if bias else None
    a = _randn(rank, n_in, seed=seed + 3, device=device, dtype=dt, scale=max(n_in, 1) ** -0.5)
    lb = _randn(n_out, rank, seed=seed + 4, device=device, dtype=dt, scale=0.3)
    return x, w, b, a, lb


def _check_products(device, x, w, b, a, lb, s, tiles, seed=9):
    """Forward and backward through the launchers against plain fp32 products."""
    y, u, merged = fused.lora_fused_forward(x, w, b, a, lb, s, tiles)
    g = _randn(*y.shape, seed=seed, device=device, dtype=y.dtype)
    grad_x, grad_B = fused.lora_fused_backward(g, u, merged, lb, s, tiles)
    f = F32
    tol = _tol(device)
    torch.testing.assert_close(merged.to(f), w.to(f) + s * lb.to(f) @ a.to(f), **tol)
    torch.testing.assert_close(u.to(f), x.to(f) @ a.to(f).T, **tol)
    torch.testing.assert_close(y.to(f), x.to(f) @ merged.to(f).T + (0.0 if b is None else b.to(f)), **tol)
    torch.testing.assert_close(grad_x.to(f), g.to(f) @ merged.to(f), **tol)
    torch.testing.assert_close(grad_B.to(f), s * g.to(f).T @ u.to(f), **tol)
    return y, u, merged, grad_x, grad_B


# ------------------------------------------------------------------------ grid mapping (_is_side, _tile_mn)

def test_no_gemm_tile_still_runs_every_side_program(device):
    """out = 0: the forward's grid is side programs only (3 row blocks of u); in = 0: the backward's is the
    g^T u programs only (3 blocks of out x 2 splits). Each must take its own block (period 1): a period
    of 0 sent every program to block 0."""
    x, w, b, a, lb = _layer(40, 24, 0, 3, device, seed=1)
    y, u, merged = fused.lora_fused_forward(x, w, b, a, lb, 0.5, _tiles())
    assert y.shape == (40, 0) and merged.shape == (0, 24)
    torch.testing.assert_close(u.to(F32), x.to(F32) @ a.to(F32).T, **_tol(device))
    g = _randn(40, 40, seed=2, device=device, dtype=_dt(device))
    u = _randn(40, 3, seed=3, device=device, dtype=_dt(device))
    merged = torch.empty(40, 0, device=device, dtype=_dt(device))
    lb = torch.zeros(40, 3, device=device, dtype=_dt(device))
    grad_x, grad_B = fused.lora_fused_backward(g, u, merged, lb, 0.5, _tiles(splits=2))
    assert grad_x.shape == (40, 0)
    torch.testing.assert_close(grad_B.to(F32), 0.5 * g.to(F32).T @ u.to(F32), **_tol(device))




def test_nothing_to_reduce_launches_no_backward_kernel(device, monkeypatch):
    """out = 0 or no row: the backward launches nothing (with out = 0 its grid would hold no g^T u side
    program, and _is_side's period divides by their count: a division by zero on a GPU, numpy's 0 here)."""
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError(f"the backward kernel was launched on grid {grid}")

    x, w, b, a, lb = _layer(9, 16, 0, 2, device, seed=17)
    y, u, merged = fused.lora_fused_forward(x, w, b, a, lb, 0.5, _tiles())
    monkeypatch.setattr(fused, "_lora_bwd_kernel", NoLaunch())
    grad_x, grad_B = fused.lora_fused_backward(torch.zeros_like(y), u, merged, lb, 0.5, _tiles())
    assert grad_x.shape == (9, 16) and bool((grad_x == 0).all()) and grad_B.shape == (0, 2)
    g, u0 = torch.zeros(0, 5, device=device, dtype=x.dtype), torch.zeros(0, 2, device=device, dtype=x.dtype)
    merged, lb = torch.randn(5, 16, device=device, dtype=x.dtype), torch.randn(5, 2, device=device, dtype=x.dtype)
    grad_x, grad_B = fused.lora_fused_backward(g, u0, merged, lb, 0.5, _tiles(splits=3))
    assert grad_x.shape == (0, 16) and bool((grad_B == 0).all()) and grad_B.shape == (5, 2)


# ------------------------------------------------------------------------------------- layouts

def test_operands_in_other_layouts_give_the_same_bits(device):
    """The launchers make x, A, grad_y and u unit-stride along their last dim (the kernels read them so);
    lora_merge reads W and A through their row strides."""
    x, w, b, a, lb = _layer(40, 24, 20, 3, device, seed=5)
    tiles = _tiles()
    col = lambda t: t.t().contiguous().t()  # noqa: E731  (same values, column-major)
    y, u, merged = fused.lora_fused_forward(x, w, b, a, lb, 0.5, tiles)
    y2, u2, merged2 = fused.lora_fused_forward(col(x), w, b, col(a), lb, 0.5, tiles)
    assert col(x).stride(-1) != 1 and col(a).stride(-1) != 1
    assert torch.equal(y, y2) and torch.equal(u, u2) and torch.equal(merged, merged2)
    g = _randn(40, 20, seed=6, device=device, dtype=y.dtype)
    want = fused.lora_fused_backward(g, u, merged, lb, 0.5, tiles)
    got = fused.lora_fused_backward(col(g), col(u), merged, lb, 0.5, tiles)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    wide_w = torch.zeros(20, 31, device=device, dtype=w.dtype)
    wide_w[:, 4:28] = w
    wide_a = torch.zeros(3, 29, device=device, dtype=a.dtype)
    wide_a[:, :24] = a
    ref = merge.lora_merged_weight_triton(w, a, lb, 0.5, block=(16, 16))
    for ww, aa in ((wide_w[:, 4:28], wide_a[:, :24]), (w, col(a))):
        assert torch.equal(merge.lora_merged_weight_triton(ww, aa, lb, 0.5, block=(16, 16)), ref)


# ------------------------------------------------------------------------------------- rounding, dtypes

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_outputs_are_the_fp32_results_rounded_to_nearest(dtype, device):
    """Under the interpreter the kernels compute the same fp32 sums from half and fp32 storage of the same
    values: the half results must be those sums rounded to nearest even (Triton's interpreter truncates
    in its own cast; a GPU rounds)."""
    if device == "cuda":
        pytest.skip("on a GPU fp32 storage takes the merged arrangement: nothing to compare bit for bit")
    x, w, b, a, lb = (t.to(dtype) for t in _layer(20, 20, 18, 3, device, seed=7))
    full = [t.float() for t in (x, w, b, a)]
    merged = merge.lora_merged_weight_triton(w, a, lb, 0.3, block=(16, 16))
    assert merged.dtype == dtype
    assert torch.equal(merged, merge.lora_merged_weight_triton(w.float(), a.float(), lb.float(), 0.3,
                                                               block=(16, 16)).to(dtype))
    zero_b = torch.zeros_like(lb)  # W' = W exactly in both storages: the GEMMs read the same values
    y, u, _ = fused.lora_fused_forward(x, w, b, a, zero_b, 0.3, _tiles())
    y32, u32, _ = fused.lora_fused_forward(*full, zero_b.float(), 0.3, _tiles())
    assert y.dtype == dtype and torch.equal(y, y32.to(dtype)) and torch.equal(u, u32.to(dtype))
    g = _randn(20, 18, seed=8, device=device, dtype=dtype)
    for splits in (1, 2):
        gx, gb = fused.lora_fused_backward(g, u, merged, lb, 0.3, _tiles(splits=splits))
        gx32, gb32 = fused.lora_fused_backward(g.float(), u.float(), merged.float(), lb.float(), 0.3,
                                               _tiles(splits=splits))
        assert gx.dtype == dtype and gb.dtype == dtype
        assert torch.equal(gx, gx32.to(dtype)) and torch.equal(gb, gb32.to(dtype)), splits


def test_grad_B_takes_lora_B_dtype_in_the_op_and_its_fake(device):
    """lora_fused_bwd's operands share one dtype, lora_B aside: it gives grad_B's dtype and shape only."""
    x, w, b, a, lb = (t.to(torch.bfloat16) for t in _layer(6, 16, 32, 4, device, seed=10))
    y, u, merged = fused.lora_fused_forward(x, w, b, a, lb, 0.5, _tiles())
    g = torch.randn_like(y)
    grad_x, grad_B = torch.ops.segpcl.lora_fused_bwd(g, u, merged, lb.float(), 0.5)
    assert grad_x.dtype == torch.bfloat16 and grad_B.dtype == F32
    torch.testing.assert_close(grad_B, 0.5 * g.float().T @ u.float(), rtol=1e-2, atol=1e-2)
    fake_x, fake_B = fused._lora_fused_bwd_fake(g, u, merged, lb.float(), 0.5)  # the fake kernels' dtypes
    assert (fake_x.dtype, fake_B.dtype, fake_B.shape) == (torch.bfloat16, F32, lb.shape)
    assert merge._lora_merged_weight_fake(w, a, lb, 0.5).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------- launches

def test_every_lora_launch_enters_its_tensors_device(device, monkeypatch):
    """W + s B A, the fused forward and the fused backward each launch inside launch_device(their tensor):
    Triton launches on the current GPU, not the tensors'."""
    entered = []

    def recording(t):
        entered.append(t.device.type)
        return contextlib.nullcontext()

    for module in (fused, merge):
        monkeypatch.setattr(module, "launch_device", recording)
    x, w, b, a, lb = _layer(6, 16, 32, 4, device, seed=11)
    y, u, merged = fused.lora_fused_forward(x, w, b, a, lb, 0.5, _tiles())
    assert entered == [device, device]  # the merge, then the forward
    fused.lora_fused_backward(torch.randn_like(y), u, merged, lb, 0.5, _tiles())
    assert entered == [device] * 3


def test_u_and_the_merged_weight_are_not_differentiable(device):
    x, w, b, a, lb = _layer(6, 16, 32, 4, device, seed=12)
    y, u, merged = torch.ops.segpcl.lora_fused_fwd(x.requires_grad_(), w, b, a, lb.requires_grad_(), 0.5)
    assert y.requires_grad and not u.requires_grad and not merged.requires_grad


# ------------------------------------------------------------------------------------- launcher checks

def test_launchers_refuse_a_mis_shaped_bias_merged_weight_or_B(device):
    x, w, b, a, lb = _layer(6, 16, 32, 4, device, seed=13)
    with pytest.raises(ValueError, match=r"bias must have shape \(32,\)"):
        fused.lora_fused_forward(x, w, torch.cat([b, b[:1]]), a, lb, 0.5)
    y, u, merged = fused.lora_fused_forward(x, w, b, a, lb, 0.5)
    with pytest.raises(ValueError, match="merged must have shape"):
        fused.lora_fused_backward(torch.randn_like(y), u, merged[:31], lb, 0.5)
    with pytest.raises(ValueError, match=r"lora_B \(out, r\)"):
        merge.lora_merged_weight_triton(w, a, lb[:, :3], 0.5)
    with pytest.raises(TypeError, match="float64"):
        merge.lora_merged_weight_triton(w.double(), a.double(), lb.double(), 0.5)


def test_the_int32_reach_of_W_per_launcher(device, monkeypatch):
    """The forward reads its own contiguous W' (W's strides do not matter); the backward reads W' as given,
    through its row stride. Limit patched to 20 x 32 elements; W a 20 x 16 column slice of 20 x 64."""
    monkeypatch.setattr(fused, "MAX_WEIGHT_ELEMS", 20 * 32)
    x, _, b, a, lb = _layer(6, 16, 20, 2, device, seed=14)
    w = torch.randn(20, 64, device=device, dtype=x.dtype)[:, :16]
    y, u, merged = fused.lora_fused_forward(x, w, b, a, lb, 0.5, _tiles())
    torch.testing.assert_close(y.to(F32), x.to(F32) @ merged.to(F32).T + b.to(F32), **_tol(device))
    with pytest.raises(ValueError, match="spans 2\\^31 elements"):
        fused.lora_fused_backward(torch.randn_like(y), u, w, lb, 0.5, _tiles())
    fused.lora_fused_backward(torch.randn_like(y), u, merged, lb, 0.5, _tiles())  # contiguous: 320 elements
    monkeypatch.undo()
    one_row = torch.empty(1 << 31, device="meta").as_strided((1, 1 << 31), (0, 1))  # row stride 0 < its width
    with pytest.raises(ValueError, match="spans 2\\^31 elements"):  # its one row spans 2^31 elements
        fused._check_weight_size(one_row)


def test_rank_max_rank_itself_runs_fused(device):
    r = fused.MAX_RANK
    assert fused.fused_supported(torch.device("cuda"), torch.bfloat16, r, (32, 32))
    assert not fused.fused_supported(torch.device("cuda"), torch.bfloat16, r + 1, (32, 32))
    x, w, b, a, lb = _layer(3, 5, 2, r, device, seed=15)
    _check_products(device, x, w, b, a, lb, 0.5, _tiles())


def test_split_count():
    """splits 0 (or less) is one split; by default about 4096 rows a split, at most 16."""
    assert fused.FusedTiles(splits=0).n_splits(100) == 1 and fused.FusedTiles(splits=-2).n_splits(100) == 1
    assert fused.FusedTiles(splits=3).n_splits(10) == 3
    tiles = fused.FusedTiles()
    assert [tiles.n_splits(n) for n in (1, 4096, 4097, 8193, 16 * 4096 + 1, 10 ** 7)] == [1, 1, 2, 3, 16, 16]


def test_splits_zero_runs_as_one(device):
    _check_products(device, *_layer(20, 8, 12, 2, device, seed=16), 0.5, _tiles(splits=0))


def test_fused_supported_on_and_off_the_interpreter(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert fused.fused_supported(cpu, dtype, fused.MAX_RANK, (33, 17)), dtype
    assert not fused.fused_supported(cpu, torch.float64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not fused.fused_supported(cpu, torch.bfloat16, 16, (768, 768))  # a CPU tensor, no interpreter
    assert fused.fused_supported(cuda, torch.bfloat16, 16, (768, 768))


# ------------------------------------------------------------------------------------- _triton_utils

def test_interpret_mode_spellings(monkeypatch):
    for value, want in (("1", True), ("true", True), ("Yes", True), ("ON", True), ("0", False), ("", False),
                        ("off", False), ("false", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert utils.interpret_mode() is want, value
    monkeypatch.delenv("TRITON_INTERPRET")
    assert utils.interpret_mode() is False


def test_can_run_and_check_can_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(utils, "HAS_TRITON", True)
    meta = torch.empty(2, device="meta")
    assert utils.can_run_triton(torch.zeros(2)) and not utils.can_run_triton(meta)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        utils.check_can_run("op", meta)
    monkeypatch.setattr(utils, "HAS_TRITON", False)
    assert not utils.can_run_triton(torch.zeros(2))
    with pytest.raises(RuntimeError, match="triton is not installed"):
        utils.check_can_run("op", torch.zeros(2))


def test_launch_device_makes_a_cuda_tensors_device_current():
    stub = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    guard = utils.launch_device(stub)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


def test_power_of_two_helpers_by_hand():
    assert [utils.next_pow2(n) for n in (0, 1, 2, 3, 16, 17, 100)] == [1, 1, 2, 4, 16, 32, 128]
    assert [utils.prev_pow2(n) for n in (0, 1, 2, 3, 16, 17, 100)] == [1, 1, 2, 2, 16, 16, 64]
    assert utils.common_divisor(16, 3) == 1 and utils.common_divisor(16, 6, 10) == 2
    assert utils.common_divisor(16, 0, 32) == 16 and utils.common_divisor(8, 24, 40) == 8
    assert [utils.cdiv(a, 4) for a in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]


def test_store_and_compute_dtypes(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert [utils.store_dtype(d) for d in (torch.bfloat16, torch.float16, torch.float32)] == [F32] * 3
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert [utils.store_dtype(d) for d in (torch.bfloat16, torch.float16, torch.float32)] == [
        torch.bfloat16, torch.float16, F32]
    assert utils.compute_dtype(torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)) == F32
    assert utils.compute_dtype(torch.zeros(1), torch.zeros(1, dtype=torch.float64)) == torch.float64


# ------------------------------------------------------------------------------------- registration and autograd

def test_op_schemas_mutate_and_alias_nothing():
    """The three ops are functional: no argument is written or aliased by an output (torch.compile would
    otherwise order and copy around them), in the argument order the callers pass."""
    ops_and_args = ((torch.ops.segpcl.lora_fused_fwd.default, ["x", "weight", "bias", "lora_A", "lora_B", "scaling"]),
                    (torch.ops.segpcl.lora_fused_bwd.default, ["grad_y", "u", "merged", "lora_B", "scaling"]),
                    (torch.ops.segpcl.lora_merged_weight.default, ["weight", "lora_A", "lora_B", "scaling"]))
    for op, names in ops_and_args:
        schema = op._schema
        assert [a.name for a in schema.arguments] == names, schema
        assert not schema.is_mutable and all(a.alias_info is None for a in (*schema.arguments, *schema.returns)), schema


def test_fake_kernels_match_the_launches(device, monkeypatch):
    """Each fake kernel gives its launch's shapes, dtypes and strides: a column-major W (the merge's output is
    contiguous, not W's layout) and a W of another dtype than A and B (the merge stores in W's dtype)."""
    x, w, b, a, lb = _layer(6, 16, 32, 4, device, seed=21)
    w32_t = w.float().t().contiguous().t()
    half_a, half_b = a.to(torch.bfloat16), lb.to(torch.bfloat16)
    real = torch.ops.segpcl.lora_merged_weight(w32_t, half_a, half_b, 0.5)
    fake = merge._lora_merged_weight_fake(w32_t, half_a, half_b, 0.5)
    assert (real.dtype, real.shape, real.stride()) == (F32, (32, 16), (16, 1))
    assert (fake.dtype, fake.shape, fake.stride(), fake.device) == (real.dtype, real.shape, real.stride(), real.device)
    torch.testing.assert_close(real, torch.addmm(w.float(), half_b.float(), half_a.float(), alpha=0.5),
                               rtol=1e-5, atol=1e-5)
    with monkeypatch.context() as m:  # as on a GPU: the kernel stores W's dtype itself (not A's: bf16 would round)
        m.setattr(merge, "store_dtype", lambda dtype: dtype)
        torch.testing.assert_close(torch.ops.segpcl.lora_merged_weight(w32_t, half_a, half_b, 0.5), real,
                                   rtol=1e-6, atol=1e-6)
    for dtype in (x.dtype, torch.float16):  # the fused ops: every output in x's dtype
        x3, w_t, bd, ad, lbd = (t.to(dtype) for t in (x.reshape(2, 3, 16), w.t().contiguous().t(), b, a, lb))
        outs = fused.lora_fused_forward(x3, w_t, bd, ad, lbd, 0.5, _tiles())
        fakes = fused._lora_fused_fwd_fake(x3, w_t, bd, ad, lbd, 0.5)
        g = torch.randn_like(outs[0])
        outs_b = fused.lora_fused_backward(g, outs[1], outs[2], lbd, 0.5, _tiles())
        fakes_b = fused._lora_fused_bwd_fake(g, outs[1], outs[2], lbd, 0.5)
        for got, want in zip((*fakes, *fakes_b), (*outs, *outs_b)):
            assert (got.shape, got.dtype, got.stride(), got.device) == (want.shape, dtype, want.stride(), want.device)
        assert [tuple(t.shape) for t in (*outs, *outs_b)] == [(2, 3, 32), (2, 3, 4), (32, 16), (2, 3, 16), (32, 4)]


def test_fused_op_refuses_double_backward(device):
    """u is saved without its graph: a create_graph=True backward through the fused op is refused (the merged
    and C++ paths' guard, tests/kernels/test_double_backward.py), not a silently wrong second order."""
    x, w, b, a, lb = _layer(6, 16, 32, 4, device, seed=22)
    x.requires_grad_()
    lb.requires_grad_()
    y = fused.lora_b_linear_fused(x, w, b, a, lb, 0.5)
    with pytest.raises(RuntimeError, match=r"lora_b_linear \(fused Triton\): double backward"):
        torch.autograd.grad(y.pow(2).sum(), (x, lb), create_graph=True)
    gx, gb = torch.autograd.grad(fused.lora_b_linear_fused(x, w, b, a, lb, 0.5).pow(2).sum(), (x, lb))
    y32 = x @ (w + 0.5 * lb @ a).T + b
    want_x, want_b = torch.autograd.grad(y32.pow(2).sum(), (x, lb))
    torch.testing.assert_close((gx, gb), (want_x, want_b), **_tol(device))


def test_one_device_means_one_device_index(monkeypatch):
    """cuda:0 and cuda:1 are two devices (check_can_run compares devices, not their type); CUDA and CPU
    tensors together run nowhere, interpreter or not (stub CUDA tensors)."""
    monkeypatch.setattr(utils, "HAS_TRITON", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cuda0, cuda1 = (types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", i), dtype=F32) for i in (0, 1))
    assert utils.can_run_triton(cuda0, cuda1) and utils.can_run_triton(cuda0)
    utils.check_can_run("op", cuda0, cuda0)
    with pytest.raises(RuntimeError, match=r"all tensors must be on one device, got \['cuda:0', 'cuda:1'\]"):
        utils.check_can_run("op", cuda0, cuda1)
    assert not utils.can_run_triton(cuda0, torch.zeros(2)) and not utils.can_run_triton(torch.zeros(2), cuda0)


def test_backward_runs_the_fused_kernel_only_for_both_gradients(device, monkeypatch):
    """grad_x and grad_B together: the fused backward kernel; one of them alone (a tower's first layer: x needs
    no gradient; a frozen B): its own product, without the other's work. Values as the plain products."""
    calls = []
    real = fused.lora_fused_backward
    monkeypatch.setattr(fused, "lora_fused_backward", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    x, w, b, a, lb = _layer(6, 16, 32, 4, device, seed=23)
    g = _randn(6, 32, seed=24, device=device, dtype=x.dtype)
    merged = w + 0.5 * lb @ a
    for need_x, need_b, want_calls in ((True, True, 1), (False, True, 0), (True, False, 0)):
        xi, lbi = x.detach().requires_grad_(need_x), lb.detach().requires_grad_(need_b)
        y = fused.lora_b_linear_fused(xi, w, b, a, lbi, 0.5)
        wrt = [t for t in (xi, lbi) if t.requires_grad]
        grads = torch.autograd.grad(y, wrt, g)
        want = ([g @ merged] if need_x else []) + ([0.5 * g.T @ (x @ a.T)] if need_b else [])
        torch.testing.assert_close(list(grads), want, **_tol(device))
        assert len(calls) == want_calls, (need_x, need_b)
        calls.clear()


def test_an_empty_weight_launches_no_merge_kernel(monkeypatch):
    """W + s B A with no row or no column of W: an empty result in W's dtype and no launch (a grid of 0
    programs is not a launch CUDA takes; check_triton_build's launch_problems)."""
    grids = []

    class Recording:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None
    monkeypatch.setattr(merge, "_lora_merge_kernel", Recording())
    for n_out, n_in in ((0, 8), (8, 0)):
        w, a, b = torch.zeros(n_out, n_in), torch.zeros(2, n_in), torch.zeros(n_out, 2)
        out = merge.lora_merged_weight_triton(w, a, b, 0.5)
        assert out.shape == (n_out, n_in) and out.dtype == F32
    assert grids == []
    merge.lora_merged_weight_triton(torch.zeros(3, 5), torch.zeros(2, 5), torch.zeros(3, 2), 0.5)
    assert grids == [(1,)]
