"""How far the rounding-level run-only keys move a tiny run (README, "run-only keys"; BENCHMARKS.md,
session 53).
(1) DPGD anchors, 10 seeds (random pixels), batches of 3 vs one of 10, fp32, the tiny model with the bundled
segpcl-world weights (or random weights: argv[1] == "random"): how many pixels differ, by how many gamma steps,
over 10 seed orders. (2) Unless argv[2] == "anchors": two 2-task offline runs, run.num_threads 1 vs 2: the
largest relative difference (Frobenius) of the final LoRA B matrices."""
import dataclasses
import sys
import tempfile

import torch

import segpcl_fast
from segpcl_fast.config import DPGDConfig
from segpcl_fast.method.anchors import run_dpgd, normalised_bounds
from segpcl_fast.model.clip import load_model

weights = None if sys.argv[1:2] == ["random"] else "segpcl-world"
torch.manual_seed(0)
model = load_model("segpcl-tiny", weights)
stats = model.image_stats
mean, std = torch.tensor(stats.mean).view(1, 3, 1, 1), torch.tensor(stats.std).view(1, 3, 1, 1)
with torch.no_grad():
    old_text = model.class_embeddings([f"a photo of a {n}." for n in ("red circle", "green square", "blue triangle")])
    seeds = (torch.rand(10, 3, stats.size, stats.size) - mean) / std
    protos = model.raw_features(seeds[:3]).float()
targets = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
scale = float(model.logit_scale().detach())
cfg = DPGDConfig()
_, gamma_n, _, _ = normalised_bounds(stats.mean, stats.std, cfg.eps, cfg.gamma)
counts = []
for order in range(10):
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(order))
    x, y = seeds[perm], targets[perm]
    a = run_dpgd(model, x, y, old_text, protos, scale, dataclasses.replace(cfg, batch_size=3), stats.mean, stats.std)
    b = run_dpgd(model, x, y, old_text, protos, scale, dataclasses.replace(cfg, batch_size=10), stats.mean, stats.std)
    steps = int(((a - b).abs() / gamma_n.view(1, 3, 1, 1)).round().max())
    counts.append(int((a != b).sum()))
    print(f"weights {weights}, order {order}: {counts[-1]} of {a.numel()} pixels differ "
          f"({100 * counts[-1] / a.numel():.3f} %), by at most {steps} gamma steps")
print(f"weights {weights}: mean {100 * sum(counts) / len(counts) / a.numel():.3f} % of pixels over {len(counts)} orders")
if sys.argv[2:3] != ["anchors"]:
    out = tempfile.mkdtemp()
    b_mats = []
    for threads in (1, 2):
        segpcl_fast.train(data__num_tasks=2, optim__epochs=1, run__num_threads=threads, run__progress=False,
                          run__plots=False, run__output_dir=f"{out}/t{threads}")
        lora = torch.load(f"{out}/t{threads}/checkpoints/task_01.pt", weights_only=True)["lora"]
        b_mats.append({k: v for k, v in lora.items() if torch.is_tensor(v)})
    rel = max(float((b_mats[0][k] - b_mats[1][k]).norm() / b_mats[1][k].norm().clamp_min(1e-30)) for k in b_mats[0])
    print(f"LoRA B after 2 tasks, run.num_threads 1 vs 2: largest relative difference (Frobenius) {rel:.2e}")
