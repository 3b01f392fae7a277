"""DPGD's pixel gradient through an image tower under fp16 autocast: plain, and as run_dpgd takes it.

    python benchmarks/fp16_dpgd_gradient.py [--model ViT-B-16] [--anchors 2] [--scale 100]

Random weights (no download), CPU. The anchors' target is the teacher's own top class among 5 random
unit text embeddings (CE only, lambda_p = 0): the confident case PGD drives every anchor towards. Against
the fp32 gradient it prints, for each way of taking the fp16 gradient, the fraction of pixels whose
gradient is 0 (sign 0: the pixel stops moving), is an fp16 subnormal (|g| < 6.1e-5: fewer mantissa bits),
and has fp32's sign. "plain": autograd through the fp16 tower; "norm 1" / "norm 2^8": the loss's
gradient at r(x) scaled to that norm per anchor first (method/anchors.py: _fp16_pixel_gradient uses
DPGD_FP16_GRAD_NORM = 2^8). BENCHMARKS.md, session 50.
"""
from __future__ import annotations

import argparse
import time
from unittest import mock

import torch
import torch.nn.functional as F

from segpcl_fast.method import anchors
from segpcl_fast.model.clip import load_model


def pixel_gradient(model, x0, targets, text, scale, how):
    with anchors.frozen_eval(model), torch.enable_grad():
        x = x0.clone().requires_grad_(True)
        if how == "plain":
            raw, emb = model.encode_image(x)
            return torch.autograd.grad(anchors.dpgd_loss(raw, emb, targets, text, None, scale, 0.0), x)[0]
        norm = {"norm 1": 1.0, "norm 2^8": 2.0 ** 8}[how]
        with mock.patch.object(anchors, "DPGD_FP16_GRAD_NORM", norm):
            return anchors._fp16_pixel_gradient(model, x, targets, text, None, scale, 0.0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--anchors", type=int, default=2)
    parser.add_argument("--scale", type=float, default=100.0, help="logit scale s")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = load_model(args.model, pretrained=None)
    size = model.image_stats.size
    x0 = torch.randn(args.anchors, 3, size, size)
    with torch.no_grad():
        emb = model.encode_image(x0)[1]
        text = F.normalize(torch.randn(5, emb.shape[-1]), dim=-1)
        targets = (F.normalize(emb, dim=-1) @ text.T).argmax(1)
    model.set_precision(image="fp32")
    g32 = pixel_gradient(model, x0, targets, text, args.scale, "plain")
    print(f"{args.model}, {args.anchors} anchors, s {args.scale:g}: fp32 |g| median {g32.abs().median():.3g}, "
          f"max {g32.abs().max():.3g}")
    model.set_precision(image="fp16")
    for how in ("plain", "norm 1", "norm 2^8"):
        start = time.perf_counter()
        g = pixel_gradient(model, x0, targets, text, args.scale, how)
        print(f"fp16 {how}: zero {(g == 0).float().mean():.4f}, subnormal {(g.abs() < 6.1e-5).float().mean():.4f}, "
              f"fp32's sign {(g.sign() == g32.sign()).float().mean():.4f}, |g| median {g.abs().median():.3g}, "
              f"max {g.abs().max():.3g}, non-finite {int((~torch.isfinite(g)).sum())} "
              f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
