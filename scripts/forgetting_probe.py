"""Does the synthetic world make sequential fine-tuning forget? A plain-torch check, no segpcl method.

    python scripts/forgetting_probe.py --epochs 3 --lr 1e-5

Fine-tunes the whole shipped tiny CLIP (both towers) task after task on the shifted-domain CL
splits (10 tasks, seeded class order 1993), cross-entropy of s * cos(image, text) over the
current task's classes only, AdamW, no memory. After each task: accuracy on every seen task's
test images predicting among all seen classes. Prints the accuracy matrix, Last, Avg and
Forgetting (mean over j < T of max_t a[t][j] - a[T][j]).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from pretrain_tiny_clip import images_to_tensor  # noqa: E402
from zeroshot_eval import DEFAULT_CKPT, class_order, load_tiny_clip  # noqa: E402

from segpcl_fast.config import DataConfig  # noqa: E402
from segpcl_fast.data import synthetic  # noqa: E402


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
    train, test = synthetic.build_synthetic_datasets(DataConfig(synthetic_seed=args.world_seed), None, None)
    names = train.class_names
    x_tr, y_tr = images_to_tensor(train.images), torch.as_tensor(train.targets)
    x_te, y_te = images_to_tensor(test.images), torch.as_tensor(test.targets)
    tasks = [t.tolist() for t in np.array_split(np.asarray(class_order(len(names), args.order_seed)), args.num_tasks)]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    matrix = []
    for t, classes in enumerate(tasks):
        sel = torch.as_tensor(np.flatnonzero(np.isin(y_tr.numpy(), classes)))
        remap = {c: i for i, c in enumerate(classes)}
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
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=64)
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
