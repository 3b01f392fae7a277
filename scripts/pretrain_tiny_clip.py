"""Pretrain the tiny CLIP ("segpcl-tiny") on the SOURCE domain of the synthetic world.

This is how segpcl_fast/assets/segpcl-tiny-world.pt was made. Regenerate it with

    python scripts/pretrain_tiny_clip.py            # defaults below, ~5-15 min on 2 CPU cores, depending on load

Deterministic: seeded torch Generator and numpy world, CPU, torch.set_num_threads(2).
Contrastive loss (open_clip.loss.ClipLoss), AdamW, linear warmup then cosine decay,
random translation + horizontal flip.
Every step's batch holds one image of each of the 100 classes (so a batch has no two
captions of the same class, i.e. no false negatives), each captioned with a random
template from synthetic.CAPTION_TEMPLATES ("a good photo of a red triangle." ...).
The checkpoint is the model's state_dict in fp16 (open_clip.create_model('segpcl-tiny',
pretrained=<path>) loads it into fp32), written atomically (temp file + os.replace).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segpcl_fast.data import synthetic  # noqa: E402

MODEL_NAME = "segpcl-tiny"
MODEL_CONFIGS = ROOT / "segpcl_fast" / "model_configs"
DEFAULT_OUT = ROOT / "segpcl_fast" / "assets" / "segpcl-tiny-world.pt"

log = logging.getLogger("pretrain_tiny_clip")


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N,H,W,3) -> float (N,3,H,W), normalised like open_clip's preprocess (OpenAI mean/std)."""
    x = torch.from_numpy(np.array(images, copy=True)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 3) -> torch.Tensor:
    """Random translation (replicate-pad then crop) and horizontal flip, per image."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def param_groups(model: torch.nn.Module, weight_decay: float):
    """open_clip's rule: no weight decay on gains, biases, embeddings and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name \
            or "embedding" in name or "token" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_at(step: int, total: int, warmup: int, base_lr: float) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base_lr * (1 + np.cos(np.pi * progress))


def atomic_save(state_dict: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state_dict, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; package data must be world-readable
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def pretrain(steps: int, seed: int, per_class: int, lr: float, warmup: int, weight_decay: float,
             out: Path, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)  # open_clip initialises parameters from the global torch RNG
    open_clip.add_model_config(MODEL_CONFIGS)
    model = open_clip.create_model(MODEL_NAME)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)

    data = synthetic.build_pretraining_dataset(seed=seed, per_class=per_class)
    images = images_to_tensor(data.images)
    targets = np.asarray(data.targets)
    names = data.class_names
    num_classes = len(names)
    by_class = [np.flatnonzero(targets == c) for c in range(num_classes)]
    # every (class, template) caption tokenised once
    templates = synthetic.CAPTION_TEMPLATES
    caption_tokens = tokenizer([t.format(n) for n in names for t in templates]).view(num_classes, len(templates), -1)

    gen = torch.Generator().manual_seed(seed)
    loss_fn = open_clip.loss.ClipLoss()
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    model.train()
    t0 = time.time()
    classes = torch.arange(num_classes)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, warmup, lr)
        pick = torch.randint(0, per_class, (num_classes,), generator=gen)
        idx = torch.as_tensor(np.stack([by_class[c][pick[c]] for c in range(num_classes)]))
        tmpl = torch.randint(0, len(templates), (num_classes,), generator=gen)
        img_f, txt_f, scale = model(augment(images[idx], gen), caption_tokens[classes, tmpl])
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        if step % 100 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.4f scale %.1f lr %.2e  %.0fs", step, steps, loss.item(),
                     model.logit_scale.exp().item(), opt.param_groups[0]["lr"], time.time() - t0)
    seconds = time.time() - t0
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    atomic_save(state, out)
    return {"seconds": seconds, "final_loss": loss.item(), "path": str(out)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-class", type=int, default=synthetic.DEFAULT_PRETRAIN_PER_CLASS, help="source images rendered per class")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    info = pretrain(args.steps, args.seed, args.per_class, args.lr, args.warmup, args.weight_decay,
                    args.out, args.threads)
    size_mb = os.path.getsize(info["path"]) / 2 ** 20
    log.info("wrote %s (%.1f MB) in %.0f s, final loss %.4f", info["path"], size_mb, info["seconds"],
             info["final_loss"])


if __name__ == "__main__":
    main()
