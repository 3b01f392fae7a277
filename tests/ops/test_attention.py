"""ops.attention: SDPA by default; the optional xformers path (a stand-in module here: xformers has
no CPU kernels) must get the (B, L, H, D) layout right, and masked / reference / compiled calls
must stay on SDPA."""
import math
import sys
import types

import pytest
import torch

from segpcl_fast import ops
from segpcl_fast.ops import mha as attn_mod


def _explicit_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(D) + mask) v on (B, H, L, D), written out."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    return scores.softmax(-1) @ v


@pytest.fixture
def fake_xformers(monkeypatch):
    """A stand-in `xformers.ops` whose memory_efficient_attention takes (B, L, H, D) like the real one
    (queries (B, Mq, H, D) over keys and values (B, Mkv, H, D): Mq may differ from Mkv)."""
    calls = []

    def memory_efficient_attention(q, k, v):
        assert q.dim() == 4 and k.shape == v.shape and q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:]
        calls.append(tuple(q.shape))
        out = _explicit_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    pkg = types.ModuleType("xformers")
    mod = types.ModuleType("xformers.ops")
    mod.memory_efficient_attention = memory_efficient_attention
    pkg.ops = mod
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", mod)
    monkeypatch.setattr(attn_mod, "XFORMERS_DEVICES", {"cuda", "cpu"})
    attn_mod._xformers_ops.cache_clear()
    attn_mod._probed.clear()
    yield calls
    attn_mod._xformers_ops.cache_clear()
    attn_mod._probed.clear()


@pytest.mark.parametrize("shape", [(2, 3, 5, 8), (1, 1, 7, 4), (3, 2, 17, 16)])
@pytest.mark.parametrize("masked", [False, True])
def test_default_is_sdpa_and_matches_the_formula(shape, masked):
    q, k, v = (torch.randn(shape) for _ in range(3))
    mask = torch.full((shape[2], shape[2]), float("-inf")).triu(1) if masked else None
    out = ops.attention(q, k, v, mask)
    torch.testing.assert_close(out, _explicit_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)
    assert ops.last_choice()["attention"] == "sdpa"  # no xformers on this machine


@pytest.mark.parametrize("shape, queries", [((2, 3, 5, 8), 5), ((3, 2, 17, 16), 17), ((3, 2, 17, 16), 1)])
def test_xformers_path_layout_equals_sdpa(fake_xformers, shape, queries):
    k, v = (torch.randn(shape) for _ in range(2))
    q = torch.randn(shape[0], shape[1], queries, shape[3])  # 1 query row: a ViT's class-token last block
    out = ops.attention(q, k, v)
    assert ops.last_choice()["attention"] == "xformers"
    probe = (1, 8, 2, shape[3])  # the one-off check that the kernels run for this dtype/head size
    assert fake_xformers == [probe, (shape[0], queries, shape[1], shape[3])]  # called with (B, L, H, D)
    torch.testing.assert_close(out, ops.attention_reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_a_first_call_under_inference_mode_probes_xformers_right(fake_xformers):
    """The probe runs a backward: under the caller's inference_mode its tensors could not require grad, and
    the failure, cached, turned xformers off for the process."""
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    with torch.inference_mode():
        out = ops.attention(q, k, v)
    assert attn_mod.xformers_failure(q.device, q.dtype, 8) is None
    assert ops.last_choice()["attention"] == "xformers"
    torch.testing.assert_close(out, ops.attention_reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_masked_and_reference_backend_stay_on_sdpa(fake_xformers):
    q, k, v = (torch.randn(2, 2, 6, 8) for _ in range(3))
    mask = torch.full((6, 6), float("-inf")).triu(1)
    ops.attention(q, k, v, mask)
    assert ops.last_choice()["attention"] == "sdpa"
    with ops.backend("reference"):
        ops.attention(q, k, v)
    assert ops.last_choice()["attention"] == "sdpa"
    q3, k3, v3 = (torch.randn(2, 6, 8) for _ in range(3))  # (N, L, D), which SDPA takes and xformers reads otherwise
    torch.testing.assert_close(ops.attention(q3, k3, v3), ops.attention_reference(q3, k3, v3))
    assert ops.last_choice()["attention"] == "sdpa"
    assert fake_xformers == []


def test_lora_model_output_is_the_same_through_xformers(fake_xformers, tiny_model_name):
    from segpcl_fast.model.clip import load_model
    from segpcl_fast.model.lora import inject_lora
    model = load_model(tiny_model_name, None, device="cpu")
    inject_lora(model, rank=4, alpha=4.0)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)  # non-zero B
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        raw_x, emb_x = model.encode_image(images)
        with ops.backend("reference"):
            raw_s, emb_s = model.encode_image(images)
    assert fake_xformers, "the image tower did not reach the xformers path"
    torch.testing.assert_close(raw_x, raw_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb_x, emb_s, rtol=1e-5, atol=1e-5)


def test_xformers_without_kernels_falls_back_to_sdpa_once(fake_xformers, monkeypatch, caplog):
    """A wheel built for another CUDA imports but raises NotImplementedError at dispatch (seen on an
    H100: "xFormers wasn't build with CUDA support"): run SDPA, warn once, do not retry per call."""
    def no_kernels(q, k, v):
        fake_xformers.append(tuple(q.shape))
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward`\n"
                                  "    xFormers wasn't build with CUDA support")
    monkeypatch.setattr(sys.modules["xformers.ops"], "memory_efficient_attention", no_kernels)
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    with caplog.at_level("WARNING", logger="segpcl_fast.ops"):
        for _ in range(3):
            out = ops.attention(q, k, v)
    torch.testing.assert_close(out, _explicit_attention(q, k, v), rtol=1e-5, atol=1e-5)
    assert ops.last_choice()["attention"] == "sdpa"
    assert fake_xformers == [(1, 8, 2, 8)]  # probed once, never called on real inputs
    assert "wasn't build with CUDA support" in caplog.text and caplog.text.count("using SDPA") == 1
    assert attn_mod.xformers_failure(q.device, q.dtype, 8).startswith("NotImplementedError")


def test_compiled_attention_stays_on_sdpa(fake_xformers):
    torch._dynamo.reset()
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    out = torch.compile(ops.attention, backend="eager")(q, k, v)
    torch._dynamo.reset()
    assert fake_xformers == []  # neither probed nor called while tracing
    torch.testing.assert_close(out, ops.attention_reference(q, k, v), rtol=1e-5, atol=1e-5)
    ops.attention(q, k, v)  # eager: probed once, then used
    assert fake_xformers == [(1, 8, 2, 8), (2, 5, 3, 8)]


def test_attention_under_torch_func_stays_on_sdpa(fake_xformers):
    """xformers' autograd.Function does not compose with torch.func: under grad / vmap, SDPA runs."""
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    g = torch.func.grad(lambda q: ops.attention(q, k, v).square().sum())(q)
    assert fake_xformers == [] and ops.last_choice()["attention"] == "sdpa"
    q_ref = q.clone().requires_grad_()
    ops.attention_reference(q_ref, k, v).square().sum().backward()
    torch.testing.assert_close(g, q_ref.grad, rtol=1e-5, atol=1e-5)
    ops.attention(q, k, v)  # eager: probed once, then used
    assert fake_xformers == [(1, 8, 2, 8), (2, 5, 3, 8)]
    # a trace: aten's SDPA, no xformers (trace's check, left out, compares with an eager call, which takes xformers)
    traced = torch.jit.trace(lambda q: ops.attention(q, k, v), (q,), check_trace=False)
    assert fake_xformers == [(1, 8, 2, 8), (2, 5, 3, 8)]
    torch.testing.assert_close(traced(q), ops.attention_reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_xformers_probe_is_per_head_size(fake_xformers, monkeypatch):
    """A head size xformers cannot run must not be cached as runnable because another size was."""
    real = sys.modules["xformers.ops"].memory_efficient_attention

    def no_head_dim_4(q, k, v):
        if q.shape[-1] == 4:
            raise NotImplementedError("no kernel for head_dim 4")
        return real(q, k, v)

    monkeypatch.setattr(sys.modules["xformers.ops"], "memory_efficient_attention", no_head_dim_4)
    q8 = torch.randn(1, 2, 3, 8)
    ops.attention(q8, q8, q8)
    assert ops.last_choice()["attention"] == "xformers"
    q4 = torch.randn(1, 2, 3, 4)
    out = ops.attention(q4, q4, q4)
    assert ops.last_choice()["attention"] == "sdpa"
    torch.testing.assert_close(out, ops.attention_reference(q4, q4, q4), rtol=1e-5, atol=1e-5)
