"""Zero-shot accuracy of an open_clip model on the synthetic world, computed with open_clip only.

    python scripts/zeroshot_eval.py                       # shipped tiny CLIP, seed-0 world
    python scripts/zeroshot_eval.py --checkpoint other.pt --template "a photo of a {}."

For each split (CL test set of the shifted domain, fresh source-domain images, held-out
sketch images): encode_image / encode_text, L2-normalise, argmax over all 100 classes.
Also reports the mean over the 10 tasks of the default class order (order_seed 1993),
each task's accuracy still predicting among all 100 classes. Images go through open_clip's
own preprocess (the same path a user's checkpoint takes).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import open_clip
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segpcl_fast.config import DataConfig  # noqa: E402
from segpcl_fast.data import synthetic  # noqa: E402

MODEL_CONFIGS = ROOT / "segpcl_fast" / "model_configs"
DEFAULT_CKPT = ROOT / "segpcl_fast" / "assets" / "segpcl-tiny-world.pt"


def load_tiny_clip(checkpoint: Path, name: str = "segpcl-tiny"):
    open_clip.add_model_config(MODEL_CONFIGS)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(checkpoint))
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


@torch.no_grad()
def zeroshot_predictions(model, tokenizer, dataset, template: str, batch_size: int = 500) -> np.ndarray:
    """Predicted class index per image of `dataset` (its transform must give model-ready tensors)."""
    text = model.encode_text(tokenizer([template.format(c) for c in dataset.class_names]))
    text = text / text.norm(dim=-1, keepdim=True)
    preds = []
    for start in range(0, len(dataset), batch_size):
        batch = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))])
        img = model.encode_image(batch)
        img = img / img.norm(dim=-1, keepdim=True)
        preds.append((img @ text.T).argmax(dim=-1).numpy())
    return np.concatenate(preds)


def class_order(num_classes: int, order_seed: int) -> list[int]:
    """The 'seeded' class order of PyCIL/RAPF: np.random.seed(order_seed); permutation."""
    return np.random.RandomState(order_seed).permutation(num_classes).tolist()


def evaluate(checkpoint: Path, template: str, seed: int, num_tasks: int, order_seed: int) -> dict:
    torch.set_num_threads(2)
    model, preprocess, tokenizer = load_tiny_clip(checkpoint)
    _, cl_test = synthetic.build_synthetic_datasets(DataConfig(synthetic_seed=seed), None, preprocess)
    splits = {
        "cl_test_shifted": cl_test,
        "source_test": synthetic.build_source_test_dataset(seed, transform=preprocess),
        "heldout_sketch": synthetic.build_heldout_dataset(seed, transform=preprocess),
    }
    out = {"checkpoint": str(checkpoint), "template": template, "seed": seed}
    for name, ds in splits.items():
        preds = zeroshot_predictions(model, tokenizer, ds, template)
        targets = np.asarray(ds.targets)
        correct = preds == targets
        out[f"{name}_acc"] = float(correct.mean() * 100)
        if name == "cl_test_shifted":
            order = class_order(len(ds.class_names), order_seed)
            tasks = np.array_split(np.asarray(order), num_tasks)
            per_task = [float(correct[np.isin(targets, t)].mean() * 100) for t in tasks]
            out["cl_test_per_task_acc"] = per_task
            out["cl_test_task_mean_acc"] = float(np.mean(per_task))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CKPT)
    p.add_argument("--template", default="a good photo of a {}.")
    p.add_argument("--seed", type=int, default=0, help="synthetic world seed")
    p.add_argument("--num-tasks", type=int, default=10)
    p.add_argument("--order-seed", type=int, default=1993)
    args = p.parse_args(argv)
    print(json.dumps(evaluate(args.checkpoint, args.template, args.seed, args.num_tasks, args.order_seed), indent=1))


if __name__ == "__main__":
    main()
