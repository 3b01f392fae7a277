"""Does the synthetic world make sequential fine-tuning forget? A plain-torch check, no segpcl method.

    python scripts/forgetting_probe.py --mode full --epochs 2 --lr 1e-4
    python scripts/forgetting_probe.py --mode lora-mlp --epochs 10 --lr 1e-3

Fine-tunes the shipped tiny CLIP task after task on the shifted-domain CL splits (10 tasks,
seeded class order 1993), cross-entropy of s * cos(image, text) over the current task's
classes only, no memory. --mode full: every weight of both towers, AdamW. --mode lora-mlp:
a plain-torch LoRA-B-only stand-in (frozen Kaiming-uniform A, zero-init trained B, rank 32,
alpha/r = 1) on mlp.c_fc / mlp.c_proj of every block of both towers, SGD momentum 0.9 with
cosine decay per task, as in the method's baseline (minus K/V, which sit inside
nn.MultiheadAttention). After each task: accuracy on every seen task's
test images predicting among all seen classes. Prints the accuracy matrix, Last, Avg and
Forgetting (mean over j < T of max_t a[t][j] - a[T][j]).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from pretrain_tiny_clip import images_to_tensor  # noqa: E402
from zeroshot_eval import DEFAULT_CKPT, class_order, load_tiny_clip  # noqa: E402

from segpcl_fast.config import DataConfig  # noqa: E402
from segpcl_fast.data import synthetic  # noqa: E402


class LoRABLinear(torch.nn.Module):
    """y = W x + b + (alpha / r) * B (A x); only B trains."""

    def __init__(self, base: torch.nn.Linear, rank: int, gen: torch.Generator):
        super().__init__()
        self.base = base
        a = torch.empty(rank, base.in_features)
        bound = 1.0 / np.sqrt(base.in_features)  # kaiming_uniform_(a=sqrt(5)), as peft does
        self.register_buffer("lora_a", a.uniform_(-bound, bound, generator=gen))
        self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    @property
    def weight(self):  # open_clip reads mlp.c_fc.weight.dtype
        return self.base.weight

    def forward(self, x):
        return self.base(x) + (x @ self.lora_a.T) @ self.lora_b.T


def add_lora_mlp(model, rank: int, seed: int) -> list[torch.nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    blocks = list(model.visual.transformer.resblocks) + list(model.transformer.resblocks)
    for block in blocks:
        block.mlp.c_fc = LoRABLinear(block.mlp.c_fc, rank, gen)
        block.mlp.c_proj = LoRABLinear(block.mlp.c_proj, rank, gen)
    return [m.lora_b for b in blocks for m in (b.mlp.c_fc, b.mlp.c_proj)]


def text_features(model, tokenizer, names, template):
    return F.normalize(model.encode_text(tokenizer([template.format(n) for n in names])), dim=-1)


@torch.no_grad()
def accuracy(model, tokenizer, images, targets, classes, names, template):
    text = text_features(model, tokenizer, [names[c] for c in classes], template)
    img = F.normalize(model.encode_image(images), dim=-1)
    pred = torch.as_tensor(classes)[(img @ text.T).argmax(-1)]
    return float((pred == targets).float().mean() * 100)


def run(args) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    model, _, tokenizer = load_tiny_clip(args.checkpoint)
    train, test = synthetic.build_synthetic_datasets(DataConfig(synthetic_seed=args.world_seed,
                                                                synthetic_shift=args.shift), None, None)
    names = train.class_names
    x_tr, y_tr = images_to_tensor(train.images), torch.as_tensor(train.targets)
    x_te, y_te = images_to_tensor(test.images), torch.as_tensor(test.targets)
    tasks = [t.tolist() for t in np.array_split(np.asarray(class_order(len(names), args.order_seed)), args.num_tasks)]
    if args.mode == "full":
        params = list(model.parameters())
        make_opt = lambda: torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)  # noqa: E731
    else:
        params = add_lora_mlp(model, args.rank, args.seed)
        make_opt = lambda: torch.optim.SGD(params, lr=args.lr, momentum=0.9)  # noqa: E731
    gen = torch.Generator().manual_seed(args.seed)
    matrix = []
    for t, classes in enumerate(tasks):
        sel = torch.as_tensor(np.flatnonzero(np.isin(y_tr.numpy(), classes)))
        remap = {c: i for i, c in enumerate(classes)}
        opt = make_opt()
        steps = args.epochs * int(np.ceil(len(sel) / args.batch_size))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        model.train()
        for _ in range(args.epochs):
            perm = sel[torch.randperm(len(sel), generator=gen)]
            for start in range(0, len(perm), args.batch_size):
                idx = perm[start:start + args.batch_size]
                text = text_features(model, tokenizer, [names[c] for c in classes], args.template)
                img = F.normalize(model.encode_image(x_tr[idx]), dim=-1)
                logits = model.logit_scale.exp() * img @ text.T
                labels = torch.as_tensor([remap[int(c)] for c in y_tr[idx]])
                loss = F.cross_entropy(logits, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        seen = [c for task in tasks[:t + 1] for c in task]
        row = []
        for j in range(t + 1):
            m = torch.as_tensor(np.isin(y_te.numpy(), tasks[j]))
            row.append(accuracy(model, tokenizer, x_te[m], y_te[m], seen, names, args.template))
        matrix.append(row)
    last = matrix[-1]
    forgetting = float(np.mean([max(matrix[t][j] for t in range(j, len(tasks) - 1)) - last[j]
                                for j in range(len(tasks) - 1)]))
    acc_t = [float(np.mean(r)) for r in matrix]  # equal test counts per task
    return {"matrix": matrix, "last": acc_t[-1], "avg": float(np.mean(acc_t)), "forgetting": forgetting,
            "args": {k: str(v) for k, v in vars(args).items()}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CKPT)
    p.add_argument("--mode", choices=("full", "lora-mlp"), default="lora-mlp")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--shift", type=float, default=DataConfig().synthetic_shift,
                   help="domain shift of the continual-learning world (data.synthetic_shift)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-tasks", type=int, default=10)
    p.add_argument("--order-seed", type=int, default=1993)
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--template", default="a good photo of a {}.")
    res = run(p.parse_args(argv))
    for r in res["matrix"]:
        print(" ".join(f"{a:5.1f}" for a in r))
    print(json.dumps({k: res[k] for k in ("last", "avg", "forgetting")}))


if __name__ == "__main__":
    main()
