"""Checks added by a mutation audit of model/frozen_cast.py, model/patch_embed.py and model/tf32.py:
each test here fails on a small semantic change (a mutant) of that code which the rest of the suite
let through, and passes on the code as it is. Values are checked against torch's own ops
(F.conv2d), a stand-in for a torch without the fp32_precision switches, or as round trips.

Covered:
- PatchEmbedGEMM on an unbatched (C, H, W) image, which nn.Conv2d accepts: the convolution's result;
- the TF32 readers and setter on a torch before 2.9 (allow_tf32 flags only): matmul and cuDNN read
  their own flag, the setter's undo adds no fp32_precision; a switch already as asked gets an undo
  that changes nothing; run_tf32 only for CUDA devices and only when asked;
- frozen_cast: an fp16 tower is recorded as stored in fp16 (and set_precision keeps accepting fp16);
  a module shared by two blocks gives its tensors once; restore_frozen to another dtype casts only
  the towers that were stored.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from segpcl_fast import ops
from segpcl_fast.model import frozen_cast, tf32
from segpcl_fast.model.clip import load_model
from segpcl_fast.model.lora import inject_lora
from segpcl_fast.model.patch_embed import PatchEmbedGEMM, use_patch_gemm


class _Tower(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv1 = conv


# ----------------------------------------------------------------------------- patch embedding

def test_an_unbatched_image_gives_the_convolutions_result():
    """nn.Conv2d takes a (C, H, W) image as a batch of one; the GEMM path unpacks (N, C, H, W), so a
    3-D input runs the convolution."""
    conv = nn.Conv2d(3, 8, 4, stride=4)
    tower = _Tower(conv)
    assert use_patch_gemm(tower) == "gemm" and isinstance(tower.conv1, PatchEmbedGEMM)
    x = torch.randn(3, 8, 12)
    out = tower.conv1(x)
    torch.testing.assert_close(out, F.conv2d(x.unsqueeze(0), conv.weight, conv.bias, stride=4).squeeze(0))
    assert out.shape == (8, 2, 3) and ops.last_choice()["patch_embed"] == "conv"


def test_a_height_that_is_no_multiple_of_the_kernel_falls_back_to_the_convolution():
    """Rows ragged, columns whole: the convolution drops the last rows; the GEMM's reshape cannot."""
    conv = nn.Conv2d(3, 8, 4, stride=4)
    tower = _Tower(conv)
    use_patch_gemm(tower)
    x = torch.randn(2, 3, 18, 16)
    torch.testing.assert_close(tower.conv1(x), F.conv2d(x, conv.weight, conv.bias, stride=4))
    assert ops.last_choice()["patch_embed"] == "conv"


def test_the_choice_is_logged_for_the_inputs_device(monkeypatch, caplog):
    """ops' log says which implementation ran on which device (once per op, device and choice): the
    input's device, here torch's meta device (shapes only), not the CPU."""
    import logging

    from segpcl_fast.ops import dispatch
    monkeypatch.setattr(dispatch, "_logged", set())
    tower = _Tower(nn.Conv2d(3, 8, 4, stride=4, device="meta"))
    use_patch_gemm(tower)
    with caplog.at_level(logging.INFO, logger="segpcl_fast.ops"):
        out = tower.conv1(torch.empty(2, 3, 8, 8, device="meta"))
    assert out.shape == (2, 8, 2, 2) and out.device.type == "meta"
    assert [r.getMessage() for r in caplog.records if "patch_embed" in r.getMessage()] == [
        "segpcl_fast.ops.patch_embed -> gemm (device=meta, backend=%s)" % dispatch._backend]


# ----------------------------------------------------------------------------- TF32 switches

@pytest.fixture
def legacy_torch(monkeypatch):
    """tf32's view of a torch before 2.9: allow_tf32 flags only, no fp32_precision, no cudnn.conv."""
    matmul = SimpleNamespace(allow_tf32=False)
    cudnn = SimpleNamespace(allow_tf32=True)
    monkeypatch.setattr(tf32, "torch", SimpleNamespace(backends=SimpleNamespace(cuda=SimpleNamespace(matmul=matmul),
                                                                                cudnn=cudnn)))
    return matmul, cudnn


def test_legacy_readers_read_their_own_flags(legacy_torch):
    matmul, cudnn = legacy_torch
    assert tf32.cuda_matmul_tf32() is False and tf32.cudnn_conv_tf32() is True
    matmul.allow_tf32, cudnn.allow_tf32 = True, False
    assert tf32.cuda_matmul_tf32() is True and tf32.cudnn_conv_tf32() is False


def test_legacy_setter_sets_and_gives_back_the_flag_alone(legacy_torch):
    matmul, cudnn = legacy_torch
    undo = tf32.set_cuda_matmul_tf32(True)
    assert matmul.allow_tf32 is True and tf32.cuda_matmul_tf32() is True
    undo()
    assert vars(matmul) == {"allow_tf32": False} and cudnn.allow_tf32 is True
    with tf32.cuda_matmul_tf32_for(True) as on:
        assert on is True and matmul.allow_tf32 is True
    assert matmul.allow_tf32 is False


def test_a_switch_already_as_asked_gets_a_no_op_undo(tf32_flags):
    """TF32 already on: run.tf32 sets nothing, and its undo changes nothing, even where the process
    turned the switch off itself in the meantime (the undo does not put back a state it did not make)."""
    tf32_flags(matmul=True)
    undo = tf32.set_cuda_matmul_tf32(True)
    tf32_flags(matmul=False)  # the process's own change during the run
    undo()
    assert tf32.cuda_matmul_tf32() is False


@pytest.mark.parametrize("enabled, device, want", [
    (True, "cuda", True), (True, "cuda:1", True), (True, torch.device("cuda", 0), True),
    (False, "cuda", False), (True, "cpu", False), (True, "mps", False), (True, "meta", False),
    (1, "cuda", True), (0, "cuda:0", False)])
def test_run_tf32_is_for_cuda_runs_that_ask(enabled, device, want):
    assert tf32.run_tf32(enabled, device) is want


# ----------------------------------------------------------------------------- frozen weights stored

def _lora_model(name, image="bf16", text="fp32"):
    model = load_model(name, pretrained=None)
    model.set_precision(image=image, text=text)
    inject_lora(model, rank=2, alpha=2.0, targets=["v", "c_fc"], towers=["visual", "text"])
    return model


def test_an_fp16_tower_is_recorded_as_stored_in_fp16(tiny_model_name):
    model = _lora_model(tiny_model_name, image="fp16")
    n = model.store_frozen_weights()["visual"]
    assert model.frozen_storage == {"visual": torch.float16}
    assert n == sum(t.dtype == torch.float16 for t in model.state_dict().values()) > 0
    assert not any(t.dtype == torch.bfloat16 for t in model.state_dict().values())
    model.set_precision(image="fp16")  # the dtype it is stored in: accepted
    with pytest.raises(ValueError, match="stored in torch.float16"):
        model.set_precision(image="bf16")


def test_a_module_shared_by_two_blocks_gives_its_tensors_once(tiny_model_name):
    """A frozen tensor reached twice (one nn.Linear held by two blocks) is one operand: listed once."""
    model = _lora_model(tiny_model_name)
    blocks = model.visual.transformer.resblocks
    blocks[1].mlp.c_proj = blocks[0].mlp.c_proj  # plain nn.Linear (no LoRA on c_proj), now in both blocks
    operands = list(frozen_cast.frozen_operands(model, "visual"))
    assert len({id(t) for _, _, t in operands}) == len(operands)
    assert sum(t is blocks[0].mlp.c_proj.weight for _, _, t in operands) == 1
    assert model.store_frozen_weights()["visual"] == len(operands)


def test_restoring_to_another_dtype_casts_only_the_stored_towers(tiny_model_name):
    """restore_frozen(model, dtype) casts what store_frozen stored: a tower left in fp32 (run.text_precision
    fp32) keeps its storage, whatever dtype the stored one goes back to."""
    model = _lora_model(tiny_model_name, image="bf16", text="fp32")
    model.store_frozen_weights()
    text = {n: t.dtype for n, t in model.state_dict().items() if ".visual." not in n}
    stored = list(frozen_cast.frozen_operands(model, "visual"))
    assert frozen_cast.restore_frozen(model, torch.float16) == len(stored)
    assert {t.dtype for _, _, t in stored} == {torch.float16} and model.frozen_storage == {}
    assert {n: t.dtype for n, t in model.state_dict().items() if ".visual." not in n} == text
    assert all(t.dtype == torch.float32 for _, _, t in frozen_cast.frozen_operands(model, "text"))
