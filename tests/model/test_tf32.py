"""run.tf32: torch's TF32 switch for fp32 CUDA matmuls read and set through either of its APIs, given
back after a run, and the patch embedding's choice no longer tripping over the new API. The switches are
process state only: these run on the CPU (no CUDA kernel is launched)."""
import pytest
import torch

from segpcl_fast.model import patch_embed
from segpcl_fast.model.tf32 import (cuda_matmul_tf32, cuda_matmul_tf32_for, cudnn_conv_tf32,
                                    set_cuda_matmul_tf32)

NEW_TF32_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")  # torch >= 2.9 (conftest's tf32_flags too)
new_api_only = pytest.mark.skipif(not NEW_TF32_API, reason="torch < 2.9 has no fp32_precision switches")


def test_reads_and_gives_back_the_legacy_switch(tf32_flags):
    tf32_flags(matmul=False)
    assert cuda_matmul_tf32() is False
    undo = set_cuda_matmul_tf32(True)
    assert cuda_matmul_tf32() is True and torch.backends.cuda.matmul.allow_tf32
    undo()
    assert cuda_matmul_tf32() is False and not torch.backends.cuda.matmul.allow_tf32


def test_a_switch_already_in_place_is_left_alone(tf32_flags):
    """Nothing is set when the state already is what is asked: the undo is then a no-op too, so a process
    that turned TF32 on itself keeps it after a run with run.tf32."""
    tf32_flags(matmul=True)
    undo = set_cuda_matmul_tf32(True)
    undo()
    assert cuda_matmul_tf32() is True


@new_api_only
def test_the_new_api_is_read_without_raising_and_kept(tf32_flags):
    """Once a process set torch.backends.cuda.matmul.fp32_precision to what the legacy flag does not say,
    reading allow_tf32 raises ("mix of the legacy and new APIs"): the reader and the setter stay on the new
    API then."""
    tf32_flags(matmul=False)
    tf32_flags(matmul_precision="tf32")
    with pytest.raises(RuntimeError, match="mix of the legacy and new"):
        torch.backends.cuda.matmul.allow_tf32  # what the patch embedding's check read before
    assert cuda_matmul_tf32() is True
    undo = set_cuda_matmul_tf32(False)
    assert torch.backends.cuda.matmul.fp32_precision == "ieee" and cuda_matmul_tf32() is False
    undo()
    assert torch.backends.cuda.matmul.fp32_precision == "tf32" and cuda_matmul_tf32() is True


@new_api_only
def test_an_inherited_precision_is_followed(tf32_flags):
    """fp32_precision "none" inherits the process-wide torch.backends.fp32_precision."""
    tf32_flags(matmul_precision="none")
    torch.backends.fp32_precision = "tf32"  # the fixture restores it
    assert cuda_matmul_tf32() is True
    torch.backends.fp32_precision = "ieee"
    assert cuda_matmul_tf32() is False


@new_api_only
def test_the_legacy_switch_set_leaves_both_apis_readable(tf32_flags):
    """From a fresh state the setter takes the legacy switch, after which both kinds of reader work:
    inductor reads fp32_precision, other code allow_tf32."""
    tf32_flags(matmul=False)
    undo = set_cuda_matmul_tf32(True)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cuda.matmul.fp32_precision == "tf32"
    undo()
    assert not torch.backends.cuda.matmul.allow_tf32 and torch.backends.cuda.matmul.fp32_precision != "tf32"


@new_api_only
def test_an_inheriting_switch_inherits_again_after_the_undo(tf32_flags):
    """The legacy setter leaves fp32_precision at "tf32" / "ieee"; the undo puts back "none", so a
    process-wide torch.backends.fp32_precision set after a run still reaches matmuls."""
    tf32_flags(matmul_precision="none")
    undo = set_cuda_matmul_tf32(True)
    assert cuda_matmul_tf32() is True
    undo()
    assert torch.backends.cuda.matmul.fp32_precision == "none" and not torch.backends.cuda.matmul.allow_tf32
    torch.backends.fp32_precision = "tf32"  # the fixture restores it
    assert cuda_matmul_tf32() is True


def test_the_block_turns_it_on_only_when_asked(tf32_flags):
    tf32_flags(matmul=False)
    with cuda_matmul_tf32_for(True) as on:
        assert on is True and cuda_matmul_tf32()
    assert not cuda_matmul_tf32()
    with cuda_matmul_tf32_for(False) as on:  # run.tf32=false: torch's setting as found
        assert on is False
    tf32_flags(matmul=True)
    with cuda_matmul_tf32_for(False) as on:
        assert on is True
    assert cuda_matmul_tf32()


def test_given_back_when_the_block_raises(tf32_flags):
    tf32_flags(matmul=False)
    with pytest.raises(ValueError):
        with cuda_matmul_tf32_for(True):
            raise ValueError("boom")
    assert not cuda_matmul_tf32()


@new_api_only
def test_patch_embed_choice_reads_the_new_api(tf32_flags):
    """fp32 on CUDA outside autocast keeps cuDNN's convolution unless matmuls may use TF32. With the
    switches set through the new API this check raised torch's mixed-API error (it read allow_tf32)."""
    tf32_flags(cudnn=True, matmul=False)
    tf32_flags(matmul_precision="tf32")
    assert patch_embed.conv_is_cheaper(True, torch.float32, False) is False
    tf32_flags(matmul_precision="ieee")
    assert patch_embed.conv_is_cheaper(True, torch.float32, False) is True
    torch.backends.cudnn.conv.fp32_precision = "ieee"  # the fixture restores it
    with pytest.raises(RuntimeError, match="mix of the legacy and new"):
        torch.backends.cudnn.allow_tf32
    assert cudnn_conv_tf32() is False
    assert patch_embed.conv_is_cheaper(True, torch.float32, False) is False
