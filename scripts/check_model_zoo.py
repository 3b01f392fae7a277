"""Which of open_clip's model configs LoRA-B-only injection supports, checked on the layers themselves.

For every open_clip config: its text tower must be open_clip's own (not Hugging Face's), and its
image tower open_clip's own transformer or a timm tower whose blocks inject_lora knows. For each
distinct timm image tower, the trunk is built with random weights (one block where timm takes
`depth`) and every LoRA target injected; the check then asserts, on one random image at the
trunk's own input size, that

  B = 0 gives the trunk's own pooled feature (relative difference printed),
  every single B, made non-zero alone, changes that feature (no adapter sits on a layer that
  never runs: "dead" counts those),
  merge_lora's plain weights compute what the adapted trunk computes.

    python scripts/check_model_zoo.py            # all configs (about 3 min on 2 CPU cores)
    python scripts/check_model_zoo.py --quick    # skip timm trunks above 100 M parameters

Prints one line per timm tower and a summary count of supported configs.
"""
from __future__ import annotations

import argparse
import copy
import time

import open_clip
import timm
import torch
from torch import nn

from segpcl_fast.model.lora import inject_lora, merge_lora

ALL_TARGETS = ["q", "k", "v", "out", "c_fc", "c_proj"]


class _Visual(nn.Module):
    """inject_lora's view of a model, holding a bare timm trunk as its image tower."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.visual, self.text_tower, self.name = trunk, nn.Identity(), "timm-trunk"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def check_timm_trunk(timm_name: str) -> str:
    """'ok ...' or why the tower is not supported."""
    try:
        trunk = timm.create_model(timm_name, pretrained=False, depth=1, num_classes=0).eval()
    except TypeError:  # no depth argument (hierarchical models): the whole trunk
        trunk = timm.create_model(timm_name, pretrained=False, num_classes=0).eval()
    x = torch.randn(1, *trunk.pretrained_cfg.get("input_size", (3, 224, 224)))

    def feature():
        return trunk.forward_head(trunk.forward_features(x), pre_logits=True)

    with torch.no_grad():
        ref = feature()
        try:
            params = inject_lora(_Visual(trunk), rank=2, towers=["visual"], targets=ALL_TARGETS)
        except ValueError as e:
            return f"refused: {e}"
        b0 = _rel(feature(), ref)
        for p in params:
            nn.init.normal_(p, std=0.1)
        adapted = feature()
        dead = 0
        for p in params:
            kept = p.clone()
            nn.init.zeros_(p)
            dead += int(torch.equal(feature(), adapted))
            p.copy_(kept)
        merged = copy.deepcopy(trunk)
        merge_lora(merged)
        merge = _rel(merged.forward_head(merged.forward_features(x), pre_logits=True), adapted)
    ok = b0 <= 1e-5 and dead == 0 and merge <= 1e-4
    return f"{'ok' if ok else 'FAILED'}: {len(params)} B, B=0 {b0:.1e}, dead {dead}, merge {merge:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip timm trunks above 100 M parameters")
    args = parser.parse_args()
    torch.manual_seed(0)
    own, timm_towers, refused = [], {}, {}
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name) or {}
        vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
        if "hf_model_name" in text:
            refused[name] = "Hugging Face text tower"
        elif "timm_model_name" in vision:
            timm_towers.setdefault(vision["timm_model_name"], []).append(name)
        elif isinstance(vision.get("layers"), (list, tuple)):
            refused[name] = "modified ResNet image tower"
        else:
            own.append(name)
    supported = list(own)
    for timm_name, names in sorted(timm_towers.items()):
        if args.quick:
            with torch.device("meta"):
                size = sum(p.numel() for p in timm.create_model(timm_name, pretrained=False).parameters())
            if size > 100e6:
                print(f"{timm_name:42s} skipped (--quick, {size / 1e6:.0f} M)")
                continue
        start = time.time()
        verdict = check_timm_trunk(timm_name)
        print(f"{timm_name:42s} {verdict} ({time.time() - start:.1f} s; {', '.join(names)})")
        (supported.extend(names) if verdict.startswith("ok") else refused.update(dict.fromkeys(names, verdict)))
    print(f"\nsupported: {len(supported)} of {len(supported) + len(refused)} configs "
          f"({len(own)} with open_clip's own image tower)")


if __name__ == "__main__":
    main()
