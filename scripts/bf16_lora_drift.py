"""How much of a small LoRA update's effect on r(x) survives bf16? A check of run.precision=bf16.

    python scripts/bf16_lora_drift.py [--model segpcl-tiny --pretrained segpcl-world --images 16]

Builds the run's model (LoRA-B injected, B = 0), computes r(x) (the prototype path's raw feature)
of random images in fp32 and under bf16 autocast, then sets every B to Gaussian noise of a few sizes
and compares the change d = r(x; B) - r(x; 0) in both precisions: |d_fp32| / |r| is the update's
effect, |d_bf16 - d_fp32| / |d_fp32| how much of it bf16 rounding changes (1 = as large as the
effect itself), and the cosine between d_bf16 and d_fp32. Early in a task B is small, so prototype
drift and the ACGD student/teacher gap sit in the first rows.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from segpcl_fast.api import make_config
from segpcl_fast.engine.trainer import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="segpcl-tiny")
    parser.add_argument("--pretrained", default="segpcl-world")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--scales", default="1e-4,1e-3,1e-2")
    args = parser.parse_args()
    cfg = make_config(model__name=args.model, model__pretrained=args.pretrained)
    model, lora_B = build_model(cfg, torch.device("cpu"))
    size = model.image_stats.size
    images = torch.randn(args.images, 3, size, size, generator=torch.Generator().manual_seed(0))

    def raw_features(bf16: bool) -> torch.Tensor:
        model.image_autocast = torch.bfloat16 if bf16 else None
        with torch.no_grad():
            return model.encode_image(images)[0].float()

    base32, base16 = raw_features(False), raw_features(True)
    print(f"{args.model}/{args.pretrained}, {args.images} images: |r_bf16 - r_fp32| / |r_fp32| at B = 0: "
          f"{((base16 - base32).norm() / base32.norm()).item():.4f}")
    print(f"{'B entries ~':>12} {'|d_fp32|/|r|':>13} {'|d_bf16-d_fp32|/|d_fp32|':>25} {'cos':>6}")
    for scale in (float(s) for s in args.scales.split(",")):
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for b in lora_B:
                b.copy_(torch.randn(b.shape, generator=gen) * scale)
        d32, d16 = raw_features(False) - base32, raw_features(True) - base16
        with torch.no_grad():
            for b in lora_B:
                b.zero_()
        cos = F.cosine_similarity(d32.flatten(), d16.flatten(), dim=0).item()
        print(f"{scale:>12g} {(d32.norm() / base32.norm()).item():>13.4f} "
              f"{((d16 - d32).norm() / d32.norm()).item():>25.3f} {cos:>6.3f}")


if __name__ == "__main__":
    main()
