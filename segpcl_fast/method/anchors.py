"""Stage 1 of SeGP-CL (method.md): DPGD anchors, built once before training task t >= 2.

1. Seeds:   Q(x, c) = v̄_T(x) · u_T,c; per old class c keep the K_seed highest-scoring images.
2. DPGD:    K_adv projected sign-gradient *descent* steps on
                L_DPGD(x_a, c) = CE(s · v̄_T(x_a) · U_T,<t^T, c) + lambda_p · (1 - cos(r_T(x_a), p_c)),
            delta in the L_inf eps-ball, x + delta in the [0, 1] pixel box, both mapped to
            per-channel bounds in the model's mean/std-normalised input space.
3. Cache:   pixels, targets, teacher logits s · v̄_T(x_a) · U_T,<t^T and teacher raw features
            r_T(x_a), computed once; the teacher is never run again during the task.

All gradients flow through the teacher only (w.r.t. the input); the teacher's parameters are
frozen for the duration of the attack and collect no gradients. The step itself is
`ops.pgd_step` (Triton kernel or reference behind one call).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..config import DPGDConfig

log = logging.getLogger("segpcl_fast.method")

SOURCES = ("anchors", "seeds", "new_data", "folder")  # acgd.source; only "anchors" runs DPGD
Stats = Union[Sequence[float], torch.Tensor]


def _scalar(v: Union[float, torch.Tensor]) -> float:
    """A python float from a float or a 0-d tensor (the logit scale may carry requires_grad)."""
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


# ----------------------------------------------------------------------------- 1. seeds

def select_seeds(teacher_emb_norm: torch.Tensor, old_text: torch.Tensor,
                 k_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per old class c the k_seed images with the highest Q(x, c) = v̄_T(x) · u_T,c.

    teacher_emb_norm: (N, d) L2-normalised teacher image embeddings v̄_T(x) of task t's images.
    old_text: (C_old, d) normalised teacher text embeddings u_T,c of the old classes.
    Returns (seed_index, target_class), both (C_old * k,) int64, grouped by class (class 0's
    seeds first, each class's seeds by decreasing score), with k = min(k_seed, N). An image may
    be a seed for several classes.
    """
    if teacher_emb_norm.dim() != 2 or old_text.dim() != 2:
        raise ValueError(f"select_seeds: expected (N, d) image and (C_old, d) text embeddings, got "
                         f"{tuple(teacher_emb_norm.shape)} and {tuple(old_text.shape)}")
    if teacher_emb_norm.shape[1] != old_text.shape[1]:
        raise ValueError(f"select_seeds: image embeddings have width {teacher_emb_norm.shape[1]} but text "
                         f"embeddings {old_text.shape[1]}; both must be CLIP embeddings v, u")
    n_images, n_old = teacher_emb_norm.shape[0], old_text.shape[0]
    if n_images == 0 or n_old == 0:
        raise ValueError(f"select_seeds: need at least one image and one old class, got {n_images} images, "
                         f"{n_old} old classes")
    if k_seed < 1:
        raise ValueError(f"select_seeds: k_seed must be >= 1, got {k_seed} (dpgd.k_seed)")
    k = min(k_seed, n_images)
    scores = teacher_emb_norm.float() @ old_text.float().T  # Q: (N, C_old)
    top = scores.topk(k, dim=0).indices  # (k, C_old), by decreasing score per column
    seed_index = top.T.reshape(-1)
    target_class = torch.arange(n_old, device=seed_index.device).repeat_interleave(k)
    return seed_index, target_class


# ----------------------------------------------------------------------------- 2. DPGD

def normalised_bounds(mean: Stats, std: Stats, eps: float, gamma: float,
                      device: Optional[torch.device] = None) -> tuple[torch.Tensor, ...]:
    """Map pixel-space PGD constants to the normalised input space x_n = (x - mean) / std.

    Returns per-channel fp32 tensors (eps_n, gamma_n, lo, hi) = (eps / std, gamma / std,
    (0 - mean) / std, (1 - mean) / std): the eps-ball, step and [0, 1] box in normalised units.
    """
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device).flatten()
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device).flatten()
    if mean_t.shape != std_t.shape:
        raise ValueError(f"normalised_bounds: mean has {mean_t.numel()} channels but std {std_t.numel()}")
    if bool((std_t <= 0).any()):
        raise ValueError(f"normalised_bounds: std must be positive per channel, got {std_t.tolist()}")
    if eps < 0 or gamma < 0:
        raise ValueError(f"normalised_bounds: eps and gamma must be >= 0, got eps={eps}, gamma={gamma}")
    return eps / std_t, gamma / std_t, (0.0 - mean_t) / std_t, (1.0 - mean_t) / std_t


def dpgd_loss(raw: torch.Tensor, emb: torch.Tensor, targets: torch.Tensor, old_text: torch.Tensor,
              prototypes: Optional[torch.Tensor], logit_scale: Union[float, torch.Tensor],
              lambda_p: float) -> torch.Tensor:
    """L_DPGD summed over the anchors of a batch.

    L_DPGD(x_a, c) = CE(s · v̄_T(x_a) · U_T,<t^T, c) + lambda_p · (1 - cos(r_T(x_a), p_c)).

    raw: (M, D) teacher r_T(x_a); emb: (M, d) teacher v_T(x_a) (unnormalised); targets: (M,) old
    classes; old_text: (C_old, d) normalised u_T; prototypes: (C_old, D) raw prototypes p_c, or None
    to drop the visual term. The sum (not the mean) over anchors makes each anchor's input gradient
    independent of how many anchors share its PGD batch (sign steps ignore scale, but this also keeps
    per-anchor losses comparable across batch sizes).
    """
    logits = _scalar(logit_scale) * F.normalize(emb.float(), dim=-1) @ old_text.float().T
    loss = F.cross_entropy(logits, targets, reduction="sum")
    if prototypes is not None and lambda_p != 0:
        cos = F.cosine_similarity(raw.float(), prototypes.float()[targets], dim=-1)
        loss = loss + lambda_p * (1.0 - cos).sum()
    return loss


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and requires_grad=False on every parameter for the block; both restored after."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _check_prototypes(prototypes: Optional[torch.Tensor], n_old: int) -> Optional[torch.Tensor]:
    """None when there are no prototypes (variants without the visual branch): CE term only."""
    if prototypes is None or prototypes.numel() == 0:
        return None
    if prototypes.dim() != 2 or prototypes.shape[0] != n_old:
        raise ValueError(f"DPGD: prototypes must be (C_old={n_old}, D_raw), got {tuple(prototypes.shape)}")
    return prototypes


def run_dpgd(teacher, seeds: torch.Tensor, targets: torch.Tensor, old_text: torch.Tensor,
             prototypes: Optional[torch.Tensor], logit_scale: Union[float, torch.Tensor], cfg: DPGDConfig,
             mean: Stats, std: Stats, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """K_adv steps of x <- clamp_box(clamp_eps(x - gamma · sign(grad_x L_DPGD))) on each seed.

    teacher: a segpcl_fast.model.CLIPModel (the model at the end of task t-1, frozen: the learner
    passes the model itself under frozen_eval).
    seeds: (M, 3, H, W) normalised images; targets: (M,) old classes; old_text: (C_old, d)
    normalised u_T; prototypes: (C_old, D_raw) or None/empty (visual term dropped).
    Runs in batches of cfg.batch_size: equal anchors in exact arithmetic (float64: bit for bit), but in
    fp32 / bf16 a GEMM rounds differently per batch size and sign(grad) turns a rounding-level change of
    the gradient into a whole gamma step (on 0-3 of 30,720 pixels, by 2 steps, tiny model, fp32, 10 seeds
    in batches of 3 vs one of 10: BENCHMARKS.md, session 53); no random start unless
    cfg.random_start (then uniform in the eps-ball, projected into the box, drawn from `generator`).
    Returns the anchors (M, 3, H, W), detached, in the seeds' dtype.
    """
    if seeds.dim() != 4 or targets.shape != (seeds.shape[0],):
        raise ValueError(f"run_dpgd: seeds must be (M, C, H, W) with targets (M,), got {tuple(seeds.shape)} "
                         f"and {tuple(targets.shape)}")
    if cfg.k_adv < 0 or cfg.batch_size < 1:
        raise ValueError(f"run_dpgd: need dpgd.k_adv >= 0 and dpgd.batch_size >= 1, got {cfg.k_adv}, "
                         f"{cfg.batch_size}")
    prototypes = _check_prototypes(prototypes, old_text.shape[0])
    if prototypes is None and cfg.lambda_p != 0:
        log.info("DPGD without prototypes: the visual anchoring term is dropped (CE term only)")
    eps_n, gamma_n, lo, hi = normalised_bounds(mean, std, cfg.eps, cfg.gamma, device=seeds.device)
    if eps_n.shape[0] != seeds.shape[1]:
        raise ValueError(f"run_dpgd: mean/std have {eps_n.shape[0]} channels but the seeds have {seeds.shape[1]}")
    view = (1, -1, 1, 1)
    scale = _scalar(logit_scale)
    fp16 = getattr(teacher, "image_autocast", None) is torch.float16  # run.precision=fp16
    out = torch.empty_like(seeds)
    with frozen_eval(teacher), torch.enable_grad():
        for start in range(0, seeds.shape[0], cfg.batch_size):
            x0 = seeds[start:start + cfg.batch_size].detach()
            y = targets[start:start + cfg.batch_size]
            x = x0.clone()
            if cfg.random_start:
                noise = torch.rand(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
                x = x0 + ((2 * noise - 1) * eps_n.view(view)).to(x0.dtype)
                x = torch.maximum(torch.minimum(x, hi.view(view).to(x.dtype)), lo.view(view).to(x.dtype))
            # fp16: whether any step's gradient was not finite, kept on the device
            nonfinite = torch.zeros((), dtype=torch.bool, device=x.device) if fp16 else None
            for _ in range(cfg.k_adv):
                x.requires_grad_(True)
                if fp16:
                    grad = _fp16_pixel_gradient(teacher, x, y, old_text, prototypes, scale, cfg.lambda_p)
                    nonfinite |= ~torch.isfinite(grad).all()
                else:
                    raw, emb = teacher.encode_image(x)
                    loss = dpgd_loss(raw, emb, y, old_text, prototypes, scale, cfg.lambda_p)
                    (grad,) = torch.autograd.grad(loss, x)
                x = ops.pgd_step(x.detach(), grad, x0, gamma_n, eps_n, lo, hi)
            if fp16 and bool(nonfinite):  # one read a batch (sign(inf) = 1 would step on, finite but wrong)
                raise FloatingPointError(
                    "DPGD: the teacher's pixel gradient is not finite under fp16 autocast (run.precision=fp16: the "
                    "image tower's fp16 activations overflowed, or the seeds hold NaN pixels); use run.precision=bf16 "
                    "(where the GPU has it) or fp32")
            out[start:start + cfg.batch_size] = x.detach()
    return out


def _fp16_pixel_gradient(teacher, x: torch.Tensor, targets: torch.Tensor, old_text: torch.Tensor,
                         prototypes: Optional[torch.Tensor], logit_scale: float, lambda_p: float) -> torch.Tensor:
    """grad_x L_DPGD up to a positive factor per anchor, through an image tower under fp16 autocast.

    fp16 flushes gradients below 6e-8 to zero, and L_DPGD's gets that small as PGD drives an anchor's CE
    towards 0 (its gradient shrinks with 1 - p_c, at s = 100): sign() then reads 0 and the anchor stops
    moving, where fp32 and bf16 (fp32's exponent range) keep stepping. So the loss is differentiated down to
    r(x) first, in fp32 (the tail after the tower: projection, logits, CE, cosine), and that gradient is
    scaled to norm DPGD_FP16_GRAD_NORM (2^8) per anchor before it enters the fp16 tower. Each anchor's pixel
    gradient is then its exact one times 2^8 / ||grad_r L|| (a positive factor, which sign() ignores: in eval
    mode the tower mixes no samples) and stays in fp16's range however small the loss's gradient got
    (benchmarks/fp16_dpgd_gradient.py, random weights, CPU): on the tiny model at s = 300 plain fp16 zeroed
    37 % of the pixel gradients (61 % had fp32's sign), this path none (99.9 %); on ViT-B/16 at s = 100, where
    plain fp16 zeroed none, it leaves 0.05 % of them fp16 subnormals (plain: 5.8 %; norm 1: 13 %).
    run_dpgd checks the gradients are finite once a batch.
    """
    raw = teacher.raw_features(x)
    r = raw.detach().requires_grad_(True)
    loss = dpgd_loss(r, teacher.project(r), targets, old_text, prototypes, logit_scale, lambda_p)
    (grad_r,) = torch.autograd.grad(loss, r)
    norm = grad_r.flatten(1).norm(dim=1).view(-1, *[1] * (grad_r.dim() - 1))
    scaled = grad_r * (DPGD_FP16_GRAD_NORM / norm.clamp_min(torch.finfo(norm.dtype).tiny))
    (grad,) = torch.autograd.grad(raw, x, grad_outputs=torch.where(norm > 0, scaled, grad_r))
    return grad


DPGD_FP16_GRAD_NORM = 2.0 ** 8  # the norm of each anchor's r(x) gradient entering an fp16 backward


# ----------------------------------------------------------------------------- 3. cache

@dataclass
class AnchorCache:
    """Everything stage 2 and stage 3 need from the teacher, computed once per task.

    pixels (M, 3, H, W) normalised anchors; targets (M,) their old classes (-1 when the anchors
    are raw task or reference-folder images, acgd.source="new_data" / "folder"); source is acgd.source; teacher_logits (M, C_old) = s · v̄_T(x_a) ·
    U_T,<t^T (fp32); teacher_raw (M, D_raw) = r_T(x_a) (fp32).
    """
    pixels: torch.Tensor
    targets: torch.Tensor
    teacher_logits: torch.Tensor
    teacher_raw: torch.Tensor
    source: str = "anchors"

    _TENSORS = ("pixels", "targets", "teacher_logits", "teacher_raw")  # class constant, not a field

    def __post_init__(self) -> None:
        m = self.pixels.shape[0]
        bad = [n for n in self._TENSORS if getattr(self, n).shape[0] != m]
        if bad:
            raise ValueError(f"AnchorCache: {bad} do not have one row per anchor ({m} pixels rows)")

    def __len__(self) -> int:
        return self.pixels.shape[0]

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    def to(self, device: Union[str, torch.device]) -> "AnchorCache":
        return AnchorCache(*(host_to_device(getattr(self, n), device) for n in self._TENSORS), source=self.source)

    def select(self, index: torch.Tensor) -> "AnchorCache":
        """The anchors at `index` (a (n,) int64 tensor), as a new cache."""
        index = host_to_device(index, self.device)
        return AnchorCache(*(getattr(self, n)[index] for n in self._TENSORS), source=self.source)

    def state_dict(self) -> dict:
        state = {n: getattr(self, n) for n in self._TENSORS}
        state["source"] = self.source
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> "AnchorCache":
        missing = [n for n in (*cls._TENSORS, "source") if n not in state]
        if missing:
            raise KeyError(f"AnchorCache state is missing {missing}; was it saved by AnchorCache.state_dict()?")
        return cls(*(state[n] for n in cls._TENSORS), source=state["source"])


def host_to_device(t: torch.Tensor, device: Union[str, torch.device]) -> torch.Tensor:
    """t on `device`, without a host sync when a CPU tensor goes to a GPU: torch's blocking copy of a
    CPU tensor to CUDA synchronises the stream (it waits for every kernel queued before it), which in a
    training step stops the host from launching the step's kernels ahead of the GPU. The CPU tensor is
    staged in pinned memory (torch's caching host allocator, reused once the copy is done) and copied
    asynchronously, in stream order: kernels queued after it see the data. That cache keeps its blocks
    page-locked for the process: with acgd.source=new_data / folder (anchor pixels kept on the CPU) one
    or two blocks of a batch's size, rounded up to a power of two (128 MB for 128 images at 224 px),
    reused every step."""
    device = torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def gather_to_device(t: torch.Tensor, index: torch.Tensor, device: Union[str, torch.device]) -> torch.Tensor:
    """t[index] (rows; index on t's device) on `device`. From a CPU tensor to a GPU the rows are gathered
    straight into pinned memory (torch's caching host allocator: a block reused step after step) and copied
    from there as host_to_device does: t[index] then pin_memory() made two host copies, the first into
    freshly allocated memory, which page-faults. On this 2-core box (`python benchmarks/host_probes.py
    anchor_gather`: 128 rows of 3 x 224 x 224 fp32 from 1280) t[index] took 52.0 ms and index_select into a
    buffer already allocated 4.5 ms (BENCHMARKS.md, session 50; not yet timed with a GPU's pinned memory)."""
    device = torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda":
        staged = _pinned_empty((index.numel(), *t.shape[1:]), t.dtype)  # torch's caching host allocator
        torch.index_select(t, 0, index, out=staged)
        return staged.to(device, non_blocking=True)
    return host_to_device(t[index], device)


def _pinned_empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=True)


@torch.no_grad()
def teacher_outputs(teacher, pixels: torch.Tensor, old_text: torch.Tensor,
                    logit_scale: Union[float, torch.Tensor],
                    batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(s · v̄_T(x) · U_T,<t^T, r_T(x)) in fp32, in batches, teacher in eval mode."""
    logits, raws = [], []
    text = F.normalize(old_text.float(), dim=-1)
    scale = _scalar(logit_scale)  # once: a read per batch would wait for each batch's forward
    with frozen_eval(teacher):
        for start in range(0, pixels.shape[0], batch_size):  # pixels may be on the CPU: batches move
            raw, emb = teacher.encode_image(pixels[start:start + batch_size].to(text.device))
            logits.append(scale * F.normalize(emb.float(), dim=-1) @ text.T)
            raws.append(raw.float())
    return torch.cat(logits), torch.cat(raws)


def build_anchor_cache(teacher, seeds_pixels: torch.Tensor, targets: torch.Tensor, old_text: torch.Tensor,
                       prototypes: Optional[torch.Tensor], logit_scale: Union[float, torch.Tensor],
                       cfg: DPGDConfig, mean: Stats, std: Stats, source: str = "anchors",
                       generator: Optional[torch.Generator] = None) -> AnchorCache:
    """Run DPGD on the seeds (source="anchors") or keep the images as they are (the other SOURCES), then run
    the teacher once more to cache its logits over the old classes and its raw features.

    This is the only place the teacher runs during a task.
    """
    if source not in SOURCES:
        raise ValueError(f"build_anchor_cache: source must be one of {SOURCES}, got '{source}'")
    if seeds_pixels.shape[0] == 0:
        raise ValueError("build_anchor_cache: no seed images (the task's training set is empty?)")
    if source == "anchors":
        pixels = run_dpgd(teacher, seeds_pixels, targets, old_text, prototypes, logit_scale, cfg, mean, std,
                          generator=generator)
    else:
        pixels = seeds_pixels.detach()
    teacher_logits, teacher_raw = teacher_outputs(teacher, pixels, old_text, logit_scale,
                                                  batch_size=max(cfg.batch_size, 1))
    device = pixels.device  # the cache lives where its pixels do (CPU for a whole task's images)
    return AnchorCache(pixels, targets.to(device), teacher_logits.to(device), teacher_raw.to(device), source=source)


def _draw_anchor_indices(cache: AnchorCache, n: int, generator: Optional[torch.Generator], caller: str) -> torch.Tensor:
    if len(cache) == 0:
        raise ValueError(f"{caller}: the anchor cache is empty")
    if n < 1:
        raise ValueError(f"{caller}: n must be >= 1, got {n}")
    return torch.randperm(len(cache), generator=generator)[:n]


def sample_anchor_batch(cache: AnchorCache, n: int, generator: Optional[torch.Generator] = None) -> AnchorCache:
    """n anchors drawn uniformly without replacement (all of them, shuffled, when n >= len(cache)).

    `generator` is a CPU torch.Generator; the indices are moved to the cache's device.
    """
    return cache.select(_draw_anchor_indices(cache, n, generator, "sample_anchor_batch"))


def sample_anchor_inputs(cache: AnchorCache, n: int, generator: Optional[torch.Generator] = None,
                         device: Union[str, torch.device, None] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels, teacher_logits) of the n anchors sample_anchor_batch draws from the same generator state,
    on `device` (default: the cache's): the two fields a training step reads, gathered (and, from a CPU
    cache, moved) alone; the targets and raw features it never reads are not (two gathers a step, not four)."""
    index = host_to_device(_draw_anchor_indices(cache, n, generator, "sample_anchor_inputs"), cache.device)
    device = device or cache.device
    return gather_to_device(cache.pixels, index, device), gather_to_device(cache.teacher_logits, index, device)
