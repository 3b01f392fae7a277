"""The analytic step FLOPs (MFU numerator) against torch.utils.flop_counter on the real step."""
import pytest
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from segpcl_fast import ops
from segpcl_fast.config import Config
from segpcl_fast.engine.bench import build_step, class_names
from segpcl_fast.engine.flops import step_flops


def _counted(step) -> int:
    with ops.backend("reference"), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


@pytest.mark.parametrize("targets,n_old", [(["k", "v", "c_fc", "c_proj"], 6), (["q", "out", "c_proj"], 0),
                                           (["c_fc"], 4)])
def test_analytic_flops_match_the_flop_counter(tiny_model_name, targets, n_old):
    cfg = Config()
    cfg.lora.rank, cfg.lora.targets = 4, targets
    step = build_step(tiny_model_name, "cpu", n_images=5, n_old=n_old, n_new=4, cfg=cfg)
    counted = _counted(step)
    analytic = step_flops(step.model, step.shape, count="executed")
    assert counted == analytic["total"], (counted, analytic)  # every matmul, forward and backward, exactly
    model = step_flops(step.model, step.shape, count="model")["total"]
    assert model <= analytic["total"]
    if "q" in targets or "k" in targets:
        assert model < analytic["total"]  # the packed B_full carries zeros


def test_step_shape_reflects_the_task(tiny_model_name):
    step = build_step(tiny_model_name, "cpu", n_images=3, n_old=5, n_new=2)
    s = step.shape
    assert (s.n_images, s.n_anchors, s.n_prompts, s.n_cls_classes, s.n_old) == (3, 3, 7, 2, 5)
    assert s.tsgr_pairs == 2 * 6  # k = 10 shrinks to the 6 other seen classes
    tokens = step.model.tokenize([f"a good photo of a {c}." for c in class_names(7)])
    assert s.text_len == int(tokens.argmax(-1).max()) + 1 < tokens.shape[1]
    assert len(set(class_names(50))) == 50


@pytest.mark.parametrize("targets", [["q"], ["v"], ["k", "v"], ["q", "c_fc"], ["out"]])
@pytest.mark.parametrize("tail", ["cls", "full"])
def test_a_one_block_tower_is_counted_exactly(tmp_path, targets, tail, monkeypatch):
    """One block is first and last at once: its input needs no gradient, so in the class-token form
    q and k, v each need the attention's backward only where LoRA sits on them."""
    import json

    import open_clip
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 48, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "test-one-block.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    monkeypatch.setenv("SEGPCL_VIT_TAIL", tail)
    config = Config()
    config.lora.rank, config.lora.targets = 4, targets
    step = build_step("test-one-block", "cpu", n_images=3, n_old=4, n_new=3, cfg=config)
    assert _counted(step) == step_flops(step.model, step.shape, count="executed")["total"]


def test_flop_audit_extrapolates_exactly_and_the_merged_arrangement_runs_fewer_flops(tiny_model_name):
    """benchmarks/flop_audit.py (BENCHMARKS.md's statement that MFU's numerator counts LoRA's rank-r
    products, which the merged arrangement skips): the counts it extrapolates from 2 and 4 images are
    affine in the batch, its reference count is the analytic executed one, and the merged arrangement
    executes fewer FLOPs than the model count."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import flop_audit
    ref = {n: flop_audit.counted(tiny_model_name, n, 6, 4, "reference") for n in (2, 4, 6)}
    assert ref[6][0] - ref[4][0] == ref[4][0] - ref[2][0]
    step = ref[6][1]
    assert ref[6][0] == step_flops(step.model, step.shape, count="executed")["total"]
    merged, _ = flop_audit.counted(tiny_model_name, 6, 6, 4, "merged")
    assert merged < step_flops(step.model, step.shape, count="model")["total"] < ref[6][0]


@pytest.mark.parametrize("input_needs_grad", [False, True])
def test_tower_flops_with_a_gradient_for_the_input(tiny_model_name, input_needs_grad):
    """tower_flops(input_needs_grad=True) counts the first blocks' input-gradient GEMMs a gradient w.r.t. the
    tower's input (DPGD's, the ViT tail benchmark's images) runs; False, the step's frozen embeddings, does not."""
    import torch

    from segpcl_fast import load_model
    from segpcl_fast.engine.flops import tower_flops
    from segpcl_fast.model.lora import inject_lora, lora_parameters
    model = load_model(tiny_model_name, None)
    inject_lora(model, rank=4, targets=["c_proj"], towers=["visual"])  # LoRA late in block 0: its attention and
    blocks = model.visual.transformer  # c_fc need an input gradient only for the input's sake
    x = torch.randn(3, 17, blocks.width, requires_grad=input_needs_grad)
    wrt = [x] * input_needs_grad + lora_parameters(model)
    with ops.backend("reference"), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        # (x * 1: the counter's module hooks refuse a leaf in autograd.grad's inputs; a multiply is no FLOP it counts)
        torch.autograd.grad(blocks(x * 1).square().sum(), wrt)
    fwd, bwd, _ = tower_flops(blocks.resblocks, 3, 17, count="executed", input_needs_grad=input_needs_grad)
    assert counter.get_total_flops() == fwd + bwd
