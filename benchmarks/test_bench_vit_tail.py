"""The ViT's last block for its class token alone (model/vit_tail.py) against the whole block.

    python -m pytest benchmarks/test_bench_vit_tail.py --benchmark-only -q

One round: CLIPModel.raw_features on a batch (the training step's image-tower forward) and its
backward into the input and the image tower's LoRA B matrices, eager. "eager_reference" runs the
whole last block (SEGPCL_VIT_TAIL=full), "cls" the class token's row of it (the default); the
kernel table of benchmarks/summary.py puts them side by side (x eager = full / cls). extra_info
gives each row's analytic image-tower FLOPs (engine/flops.py) and the bytes autograd holds for the
backward (distinct storages, the weights left out: conftest.saved_bytes). CPU: the shipped tiny
ViT (segpcl-tiny, 4 blocks of 17 tokens), fp32, 32 images. CUDA:
ViT-B/16 (12 blocks of 197 tokens, random weights), bf16 autocast, 256 images (the e2e step's 128 +
128 anchors); on CUDA the device time is CUDA events (triton.testing.do_bench's median).
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("open_clip", reason="the ViT models come from open_clip (a wheel the device does not ship)")

from conftest import device_median_ms, saved_bytes, sync
from segpcl_fast.config import Config
from segpcl_fast.engine.flops import tower_flops
from segpcl_fast.model import vit_tail
from segpcl_fast.model.clip import load_model
from segpcl_fast.model.lora import inject_lora, lora_parameters

SETUPS = {  # SEGPCL_BENCH_TAIL_MODEL / _BATCH change the CPU row (e.g. ViT-B-16, 8)
    "cpu": dict(model=os.environ.get("SEGPCL_BENCH_TAIL_MODEL", "segpcl-tiny"),
                batch=int(os.environ.get("SEGPCL_BENCH_TAIL_BATCH", 32)), precision="fp32"),
    "cuda": dict(model="ViT-B-16", batch=256, precision="bf16"),
}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the ViT-B/16 row needs a GPU"))]
IMPLS = {"eager_reference": "full", "cls": "cls"}


@pytest.fixture(scope="module")
def towers():
    made = {}

    def get(device: str):
        if device not in made:
            setup = SETUPS[device]
            torch.manual_seed(0)
            model = load_model(setup["model"], None, device=device)
            model.set_precision(image=setup["precision"])
            lora = Config().lora
            inject_lora(model, lora.rank, lora.alpha, lora.targets, ["visual"])
            for p in lora_parameters(model):
                torch.nn.init.normal_(p, std=0.01)
            model.train()
            size = model.image_stats.size
            images = torch.randn(setup["batch"], 3, size, size, device=device, requires_grad=True)
            made[device] = model, images
        return made[device]
    return get


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("device", DEVICES)
def test_vit_last_block(benchmark, towers, monkeypatch, device, impl):
    monkeypatch.setenv("SEGPCL_VIT_TAIL", IMPLS[impl])
    model, images = towers(device)
    visual = model.visual
    assert vit_tail.applies(visual) == (impl == "cls")
    params = [images] + lora_parameters(model.visual)
    benchmark.group = f"vit last block {device}"

    def forward():
        return model.raw_features(images)

    def run():
        grads = torch.autograd.grad(forward().float().square().sum(), params)
        return grads[0]

    def timed():
        out = run()
        sync(device)
        return out
    timed()  # warm-up
    benchmark(timed)
    patches = model.image_stats.size // visual.conv1.kernel_size[0]
    fwd, bwd, _ = tower_flops(visual.transformer.resblocks, len(images), patches * patches + 1,
                              last_queries=1 if impl == "cls" else None, input_needs_grad=images.requires_grad)
    setup = SETUPS[device]
    size = f"{setup['model']} {setup['precision']} {setup['batch']} img"
    benchmark.extra_info.update(op="vit_last_block", impl=impl, size=size, device=device,
                                tower_gflop=round((fwd + bwd) / 1e9, 3),
                                autograd_saved_bytes=saved_bytes(forward, model.parameters())[1])
    device_ms = device_median_ms(run, device)
    if device_ms is not None:
        benchmark.extra_info.update(device_ms=round(device_ms, 4), timing="cuda events")
