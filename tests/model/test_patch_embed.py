"""PatchEmbedGEMM (model/patch_embed.py): a stride = kernel convolution as one GEMM must equal
nn.Conv2d (values and both gradients), be swapped in only where it qualifies, keep the state dict,
and trace under torch.compile with no graph break."""
import pytest
import torch
import torch.nn as nn

from segpcl_fast import ops
from segpcl_fast.model.clip import load_model
from segpcl_fast.model.patch_embed import PatchEmbedGEMM, qualifies, use_patch_gemm


class Tower(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv1 = conv


def _run(conv, x):
    out = conv(x)
    grad_out = torch.randn(out.shape, dtype=out.dtype)  # randn_like would follow the GEMM output's strides
    grads = torch.autograd.grad(out, [x] + [p for p in conv.parameters()], grad_out)
    return out, grads


@pytest.mark.parametrize("kernel, channels, bias", [(16, 3, False), ((4, 8), 3, True), (2, 5, True)])
@pytest.mark.parametrize("size", [(32, 48), (16, 16)])
def test_gemm_equals_the_convolution_and_its_gradients(kernel, channels, bias, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, 24, kernel, stride=kernel, bias=bias).double()
    tower = Tower(conv)
    x = torch.randn(3, channels, *size, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    want, want_grads = _run(conv, x)
    assert use_patch_gemm(tower) == "gemm"
    gemm = tower.conv1
    assert isinstance(gemm, PatchEmbedGEMM) and gemm.weight is conv.weight
    torch.manual_seed(1)
    got, got_grads = _run(gemm, x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)
    # open_clip's next step: (N, C, gh, gw) -> (N, gh * gw, C); with the GEMM's NHWC result it needs no copy
    tokens = got.reshape(got.shape[0], got.shape[1], -1).permute(0, 2, 1)
    assert tokens.is_contiguous()
    assert ops.last_choice()["patch_embed"] == "gemm"


def test_only_a_patch_tiling_conv_is_swapped(monkeypatch):
    kept = [nn.Conv2d(3, 8, 4, stride=2), nn.Conv2d(3, 8, 4, stride=4, padding=1), nn.Conv2d(4, 8, 4, stride=4, groups=2),
            nn.Conv2d(3, 8, 4, stride=4, dilation=2), nn.Conv2d(3, 8, 4, stride=4, padding_mode="reflect")]
    for conv in kept:
        assert not qualifies(conv)
        tower = Tower(conv)
        assert use_patch_gemm(tower) == "conv" and tower.conv1 is conv
    assert use_patch_gemm(nn.Module()) == "none"
    monkeypatch.setenv("SEGPCL_PATCH_EMBED", "conv")
    conv = nn.Conv2d(3, 8, 4, stride=4)
    tower = Tower(conv)
    assert use_patch_gemm(tower) == "conv" and tower.conv1 is conv
    monkeypatch.setenv("SEGPCL_PATCH_EMBED", "fast")
    with pytest.raises(ValueError, match="SEGPCL_PATCH_EMBED='fast' is unknown"):
        use_patch_gemm(Tower(nn.Conv2d(3, 8, 4, stride=4)))


def test_a_ragged_input_falls_back_to_the_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 4, stride=4)
    tower = Tower(conv)
    use_patch_gemm(tower)
    x = torch.randn(2, 3, 18, 17)  # the convolution drops the last 2 rows and 1 column
    torch.testing.assert_close(tower.conv1(x), conv(x))
    assert ops.last_choice()["patch_embed"] == "conv"


def test_clip_vit_gets_the_gemm_and_keeps_its_state_dict_and_features(tiny_model_name, monkeypatch):
    model = load_model(tiny_model_name, pretrained=None)
    assert model.patch_embed == "gemm" and isinstance(model.visual.conv1, PatchEmbedGEMM)
    monkeypatch.setenv("SEGPCL_PATCH_EMBED", "conv")
    plain = load_model(tiny_model_name, pretrained=None)
    assert plain.patch_embed == "conv" and type(plain.visual.conv1) is nn.Conv2d
    assert list(plain.state_dict()) == list(model.state_dict())
    plain.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x)[1], plain.encode_image(x)[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_image(x)[1], model.clip.encode_image(x), rtol=1e-5, atol=1e-5)


def test_compiles_with_no_graph_break():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    conv = nn.Conv2d(3, 8, 4, stride=4)
    tower = Tower(conv)
    use_patch_gemm(tower)
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(tower.conv1, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), conv(x))
    assert not counters["graph_break"]


def test_fp32_on_cuda_outside_autocast_keeps_the_convolution(tf32_flags, monkeypatch):
    """torch's defaults give cuDNN convolutions TF32 but fp32 matmuls none: there the GEMM would be
    slower and not the same arithmetic, so the convolution runs. Checked by making tensors say they
    are on CUDA (the arithmetic still runs on the CPU)."""
    from segpcl_fast.model import patch_embed
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 4, stride=4)
    tower = Tower(conv)
    use_patch_gemm(tower)
    ran = []
    monkeypatch.setattr(nn.Conv2d, "forward", lambda self, x: ran.append("conv") or conv._conv_forward(x, self.weight, self.bias))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    tf32_flags(cudnn=True, matmul=False)
    x = torch.randn(2, 3, 16, 16)
    assert patch_embed._conv_is_cheaper_in_fp32(x)
    tower.conv1(x)
    assert ran == ["conv"] and ops.last_choice()["patch_embed"] == "conv"
    assert not patch_embed._conv_is_cheaper_in_fp32(x.to(torch.bfloat16))  # bf16 storage: the GEMM
    tf32_flags(matmul=True)
    assert not patch_embed._conv_is_cheaper_in_fp32(x)  # TF32 matmuls allowed: the GEMM is as cheap
