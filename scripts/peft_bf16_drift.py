"""README's two bf16 figures for the peft adapter (BENCHMARKS.md, session 53). (1) A bf16 run's image
features (our model, image tower under bf16 autocast) vs what to_peft's model computes (the base in fp32, no autocast): largest
relative difference of the image embeddings. (2) peft's own MultiheadAttention adapter on a bf16 model:
after one forward, how far its in_proj weight sits from the pretrained one (largest relative difference)."""
import copy

import peft
import torch

from segpcl_fast.model.clip import load_model
from segpcl_fast.model.lora import inject_lora, lora_parameters
from segpcl_fast.model.peft_adapter import to_peft

torch.manual_seed(0)
base = load_model("segpcl-tiny", "segpcl-world")
x = torch.randn(8, 3, base.image_stats.size, base.image_stats.size)
model = copy.deepcopy(base)
inject_lora(model, rank=4, alpha=4.0, targets=["q", "k", "v", "c_fc", "c_proj"], towers=("visual", "text"))
with torch.no_grad():
    for p in lora_parameters(model):
        p.copy_(0.02 * torch.randn_like(p))
peft_model = to_peft(copy.deepcopy(model))
model.set_precision(image="bf16", text="fp32")
with torch.no_grad():
    ours = model.encode_image(x)[1].float()
    theirs = peft_model.base_model.model.encode_image(x).float()
rel = ((ours - theirs).norm(dim=-1) / theirs.norm(dim=-1)).max()
print(f"(1) bf16 run vs to_peft's fp32 model: image embeddings, largest relative difference {rel:.1e}")
bf = copy.deepcopy(base).clip.to(torch.bfloat16)
before = {n: p.detach().clone() for n, p in bf.named_parameters() if n.endswith("in_proj_weight")}
cfg = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["attn"], init_lora_weights=False)
wrapped = peft.get_peft_model(bf, cfg)
with torch.no_grad():
    wrapped.base_model.model.encode_image(x.to(torch.bfloat16))
worst = 0.0
for n, p in wrapped.base_model.model.named_parameters():
    key = n.replace("base_layer.", "")
    if key in before:
        worst = max(worst, float(((p.float() - before[key].float()).abs().max() / before[key].float().abs().max())))
print(f"(2) peft MultiheadAttention adapter, bf16 weights, after one forward: in_proj weight moved by up to "
      f"{worst:.1e} of its largest entry")
