"""One SeGP-CL training step in isolation, for the end-to-end benchmark and FLOP checks.

`build_step(...)` sets up a model with LoRA-B, a Learner in the state of a mid-run task (old and
new classes, an anchor cache, the TSGR graph; random tensors stand in for what stage 1 would have
cached: they cost the same) and returns a `Step`: calling it runs exactly the trainer's step
(`Trainer.train_step`: Learner.loss with the image tower at the given precision, backward, the
gradient norm and the finiteness check, SGD) on fixed random images, and reads the previous step's
outcome after queueing its own, as the trainer's loop does.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional

import torch

from ..config import Config
from ..method import anchors as stage1
from ..method import losses as stage2
from ..method.learner import Learner
from ..model.clip import load_model
from ..model.lora import inject_lora
from .flops import StepShape
from .distributed import DistContext
from .step_outcome import make_grad_scaler
from .trainer import Trainer, make_optimizer

_WORDS = ("red", "green", "striped", "small", "round", "wooden", "spotted", "large", "metal", "blue")


def class_names(n: int) -> list[str]:
    """n distinct multi-word class names of varying length (so the truncated length is realistic)."""
    return [" ".join(_WORDS[(i + j) % len(_WORDS)] for j in range(1 + i % 3)) + f" thing{i}" for i in range(n)]


@dataclass
class Step:
    run: Callable[[], torch.Tensor]
    shape: StepShape
    model: object
    learner: Learner
    device: torch.device
    # fp16: the steps whose scaled gradients overflowed, so the scaler skipped their update (each counted when
    # the next step reads its outcome back, as the trainer's loop does)
    skipped: dict

    def __call__(self) -> torch.Tensor:
        return self.run()


def build_step(model_name: str, device: str | torch.device, n_images: int, n_old: int, n_new: int,
               precision: str = "fp32", compile_settings=None, pretrained: Optional[str] = None,
               anchor_pool: Optional[int] = None, seed: int = 0, cfg: Optional[Config] = None) -> Step:
    """A training step of task t with n_old old and n_new new classes, n_images images + as many anchors."""
    torch.manual_seed(seed)
    device = torch.device(device)
    cfg = cfg or Config()
    cfg.model.name, cfg.model.pretrained = model_name, pretrained
    model = load_model(model_name, pretrained, device=device)
    # as trainer.build_model does, before the learner caches its reference text
    model.set_precision(image=precision, text=cfg.run.text_precision)
    params = inject_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.towers)
    model.store_frozen_weights()
    n_total = n_old + n_new
    prompts = [[t.format(c) for t in cfg.data.templates] for c in class_names(n_total)]
    learner = Learner(cfg, model, prompts, device)
    learner.n_old, learner.n_new = n_old, n_new
    learner.graph = stage2.TSGRGraph.build(learner.ref_text[:n_total], list(range(n_old, n_total)),
                                           k=cfg.tsgr.k, tau=cfg.tsgr.tau) if n_total > 1 else None
    size = model.image_stats.size
    n_anchors = 0
    if n_old > 0:
        pool = anchor_pool or cfg.dpgd.k_seed * n_old
        with torch.no_grad():
            raw = model.raw_features(torch.randn(1, 3, size, size, device=device))
        learner.anchor_cache = stage1.AnchorCache(
            torch.randn(pool, 3, size, size, device=device), torch.randint(0, n_old, (pool,), device=device),
            torch.randn(pool, n_old, device=device) * 10, torch.randn(pool, raw.shape[-1], device=device))
        n_anchors = min(cfg.acgd.anchor_batch or n_images, pool)
    if compile_settings is not None:
        from .compiling import compile_learner
        compile_learner(learner, compile_settings)
    images = torch.randn(n_images, 3, size, size, device=device)
    labels = torch.randint(n_old, n_total, (n_images,), device=device)
    optimizer = make_optimizer(params, cfg)
    scaler = make_grad_scaler(device, precision, cfg.run.text_precision)  # fp16: loss scaling, as a task's
    model.train()

    # what Trainer.train_step reads of its trainer, for one process
    runner = SimpleNamespace(cfg=cfg, device=device, learner=learner, lora_params=params, grad_sync=None,
                             dist=DistContext())
    previous, steps, skipped = [], itertools.count(), {"fp16_skipped_steps": 0}

    def run() -> torch.Tensor:
        outcome = Trainer.train_step(runner, optimizer, images, labels, cfg.optim.lr, next(steps), 1, n_images, scaler)
        if previous:
            before = previous.pop()
            before.values(cfg)  # the trainer's loop: the last step's outcome, read after queueing this one
            skipped["fp16_skipped_steps"] += before.overflowed
        previous.append(outcome)
        return outcome.loss

    tokens = model.tokenize([p for plist in prompts for p in plist])
    text_len = int(tokens.argmax(dim=-1).max()) + 1
    n_cls = n_total if cfg.optim.cls_over == "seen" else n_new
    graph = learner.graph
    pairs = int(graph.neighbors.numel()) if graph is not None else 0
    shape = StepShape(n_images=n_images, n_anchors=n_anchors, n_prompts=len(tokens), text_len=text_len,
                      n_cls_classes=n_cls, n_old=n_old, tsgr_pairs=pairs)
    return Step(run=run, shape=shape, model=model, learner=learner, device=device, skipped=skipped)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(device: str | torch.device, dtype: torch.dtype, n: Optional[int] = None,
                      repeats: int = 5) -> float:
    """Best measured FLOP/s of an n x n x n matmul on this device (the MFU denominator)."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = float("inf")
    inner = 10 if device.type == "cuda" else 1
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / inner)
    return 2 * n ** 3 / best
