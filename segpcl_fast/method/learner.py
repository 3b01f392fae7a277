"""SeGP-CL as the paper's three stages around one task, on top of a LoRA-B-only CLIP.

    learner.begin_task(t, ...)   stage 1: teacher (the model, frozen), seeds, DPGD anchors + cache; TSGR graph
    learner.loss(images, labels) stage 2: L_cls + lambda_ACGD * L_ACGD + lambda_GR * L_GR
    learner.end_task(t, ...)     stage 3: new prototypes, anchor-induced drift transfer, text cache
    learner.logits(images)       dual-path inference over all seen classes

Labels are ordered labels (positions in the class order): after task t the seen classes are
0..n_seen-1 and task t's classes are the last ones. Variants (lora_finetune, onlyclip, ...) are
config flags of this one learner (see variants.py).
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..config import Config
from ..model.clip import CLIPModel
from ..model.lora import lora_parameters
from . import anchors as stage1
from . import losses as stage2
from . import prototypes as stage3

log = logging.getLogger("segpcl_fast.method")


def stack_batches(batches: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat(batches), emptying the list as it copies: each batch is freed once it sits in the
    result (whose pages become resident as they are written), so peak memory is about one copy of
    the data, not two (a task of ImageNet-Subset at 224 px is ~8 GB in fp32)."""
    if not batches:
        raise ValueError("stack_batches: no batches (the task's training set is empty?)")
    out = torch.empty((sum(len(b) for b in batches), *batches[0].shape[1:]), dtype=batches[0].dtype,
                      device=batches[0].device)
    start = 0
    batches.reverse()
    while batches:
        batch = batches.pop()
        out[start:start + len(batch)] = batch
        start += len(batch)
        del batch
    return out


class ReferenceMismatch(RuntimeError):
    """A checkpoint's reference embeddings (B = 0) are not this model's: its `tower` ("text": other
    weights or prompts; "image": another image tower) differs."""

    def __init__(self, tower: str, message: str):
        super().__init__(message)
        self.tower = tower


PROBE_IMAGES = 4  # fixed images whose pretrained embeddings a checkpoint keeps (Learner.ref_image)


def acgd_source(cfg) -> Optional[str]:
    """acgd.source where ACGD runs (enabled, weight > 0), else None."""
    return cfg.acgd.source if cfg.acgd.enabled and cfg.acgd.weight > 0 else None


def builds_anchor_cache(cfg) -> bool:
    """Whether stage 1 caches the teacher on anchor images (batched by dpgd.batch_size): for ACGD from any
    source, or for the prototypes' drift transfer (DPGD anchors)."""
    return acgd_source(cfg) is not None or cfg.prototypes.transfer


def probe_images(stats) -> torch.Tensor:
    """PROBE_IMAGES fixed images at the model's input (`stats`: model.clip.ImageStats), normalised: smooth
    colour fields, bilinear from 8 x 8 draws of a seeded CPU generator (the same on every machine)."""
    coarse = torch.rand(PROBE_IMAGES, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    pixels = F.interpolate(coarse, size=(stats.size, stats.size), mode="bilinear", align_corners=False)
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (stats.mean, stats.std))
    return (pixels - mean) / std


def reference_image_embeddings(model: CLIPModel, device: torch.device) -> torch.Tensor:
    """Unit image embeddings of probe_images under the model as it is (B = 0 at a run's start, as
    ref_text): what lets a resume or an evaluation recognise the run's pretrained image tower, which
    the text embeddings do not cover (model.pretrained may name a moved file; its weights are checked)."""
    with torch.no_grad(), stage1.frozen_eval(model):
        _, emb = model.encode_image(probe_images(model.image_stats).to(device))
    return F.normalize(emb.float(), dim=-1)


class Learner:
    def __init__(self, cfg: Config, model: CLIPModel, class_prompts: Sequence[Sequence[str]],
                 device: torch.device):
        self.cfg = cfg
        self.model = model
        self.class_prompts = [list(p) for p in class_prompts]
        self.device = device
        self.n_seen = 0  # classes seen after the last finished task
        self.n_old = 0  # classes before the current task
        self.n_new = 0  # classes of the current task
        self.prototypes = stage3.PrototypeMemory()
        self.anchor_cache: Optional[stage1.AnchorCache] = None  # what ACGD distils on (acgd.source)
        self.transfer_cache: Optional[stage1.AnchorCache] = None  # DPGD anchors for the drift transfer
        self.graph: Optional[stage2.TSGRGraph] = None
        # stage 2's math on the towers' outputs; run.compile binds a compiled one (engine/compiling.py)
        self.loss_terms = stage2.training_losses
        self.text_cache: Optional[torch.Tensor] = None  # u_S for seen classes after the last task
        self.anchor_generator = torch.Generator()
        # transform for acgd.source="folder" images; None = the CLIP test transform of the model's stats
        self.eval_transform = None
        # Reference (pretrained, B = 0) text embeddings of every class: fixed for the whole run.
        with torch.no_grad():
            self.ref_text = model.class_embeddings(self.class_prompts, device=device).detach()
        # and of fixed probe images: a checkpoint's pair of them identifies its pretrained weights
        self.ref_image = reference_image_embeddings(model, device)

    # ------------------------------------------------------------------ helpers
    @property
    def uses_anchors(self) -> bool:
        """Anchors serve ACGD and the prototype drift transfer; none exist at the first task."""
        return self.n_old > 0 and ((self.cfg.acgd.enabled and self.cfg.acgd.weight > 0) or
                                   self.cfg.prototypes.transfer)

    def text_embeddings(self, n_classes: int) -> torch.Tensor:
        """u_S for classes 0..n_classes-1 (gradients flow to the text tower's LoRA).

        fp32 out, and fp32 throughout by default, also under the image tower's bf16 autocast: TSGR
        compares them with the fp32 reference at tau_T = 0.05, where bf16 rounding alone gave
        L_GR ~ 1e-3 with nothing trained (loss() also computes L_GR itself in fp32). With
        run.text_precision=bf16 (opt-in) the text transformer runs under bf16 autocast here and for
        the reference and teacher embeddings alike (CLIPModel.text_autocast), its output still fp32:
        on an H200 the fp32 text trunk's GEMMs ran on SIMT cores, about 7 ms of an 82 ms step."""
        with torch.autocast(self.device.type, enabled=False):
            return self.model.class_embeddings(self.class_prompts[:n_classes], device=self.device)

    def tsgr_reference(self, n_classes: int) -> torch.Tensor:
        """The text space TSGR's subgraphs keep (tsgr.reference), classes 0..n_classes-1: the pretrained u_0
        (ref_text, method.md), or the teacher's, the model's own text at the task's start (built as
        text_embeddings builds u_S, so that q_S = q_0 before the task's first step)."""
        if self.cfg.tsgr.reference == "teacher":
            with torch.no_grad():
                return self.text_embeddings(n_classes).detach()
        return self.ref_text[:n_classes]

    @torch.no_grad()
    def _embed_loader(self, model: CLIPModel, loader: Iterable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raws, embs, labels = [], [], []
        for images, y in loader:
            raw, emb = model.encode_image(images.to(self.device, non_blocking=True))
            raws.append(raw.float())
            embs.append(emb.float())
            labels.append(y)
        return torch.cat(raws), torch.cat(embs), torch.cat(labels).to(self.device)

    # ------------------------------------------------------------------ stage 1
    def begin_task(self, t: int, n_new: int, train_eval_loader: Iterable, seed: int = 0) -> dict:
        """Prepare task t (0-based) with n_new new classes; train_eval_loader: task t images, eval transform."""
        self.n_old, self.n_new = self.n_seen, n_new
        n_total = self.n_old + n_new
        self.anchor_generator.manual_seed(seed)
        info = {"anchors": 0}
        if self.cfg.tsgr.enabled and self.cfg.tsgr.weight > 0:
            self.graph = stage2.TSGRGraph.build(self.tsgr_reference(n_total), list(range(self.n_old, n_total)),
                                                k=self.cfg.tsgr.k, tau=self.cfg.tsgr.tau)
        else:
            self.graph = None
        self.anchor_cache = self.transfer_cache = None
        if self.uses_anchors:
            self.anchor_cache, self.transfer_cache = self._build_anchors(train_eval_loader, seed)
            info["anchors"] = len(self.anchor_cache.targets) if self.anchor_cache is not None else 0
            if self.transfer_cache is not None and self.transfer_cache is not self.anchor_cache:
                info["transfer_anchors"] = len(self.transfer_cache.targets)
        return info

    def _build_anchors(self, train_eval_loader: Iterable, seed: int) -> tuple[Optional["stage1.AnchorCache"],
                                                                                Optional["stage1.AnchorCache"]]:
        """(ACGD cache from acgd.source, drift-transfer cache = DPGD anchors): one object when the
        source is the anchors; either is None when its stage is off. Teacher = the model at the end of
        task t-1: the model itself, frozen and in eval mode for the block (nothing trains here).

        The task's images stay on the CPU (a task of ImageNet-Subset at 224 px is ~8 GB in fp32):
        they go to the device in batches for the teacher, and only the chosen seeds move for good.
        DPGD's random start (dpgd.random_start) draws from its own generator seeded with `seed`.
        """
        # the teacher is the model itself, frozen and in eval mode for the block: nothing trains in stage 1, so
        # it is the model at the end of task t-1 (a deep copy cost a second model's memory and compiled graphs)
        with stage1.frozen_eval(self.model) as teacher:
            source = acgd_source(self.cfg)
            with torch.no_grad():
                old_text = teacher.class_embeddings(self.class_prompts[:self.n_old], device=self.device)
                logit_scale = teacher.logit_scale()
            images = stack_batches([x for x, _ in train_eval_loader])  # one copy of the task at a time, not two
            stats = self.model.image_stats

            def build(pixels, targets, kind):
                return stage1.build_anchor_cache(
                    teacher, pixels, targets, old_text, self.prototypes.tensor[:self.n_old].to(self.device),
                    logit_scale, self.cfg.dpgd, stats.mean, stats.std, source=kind,
                    generator=torch.Generator().manual_seed(seed))
            seeds = None
            if source in ("anchors", "seeds") or self.cfg.prototypes.transfer:
                with torch.no_grad():
                    embs = torch.cat([teacher.encode_image(images[i:i + 256].to(self.device))[1]
                                      for i in range(0, len(images), 256)])
                seed_idx, seed_targets = stage1.select_seeds(F.normalize(embs.float(), dim=-1), old_text.float(),
                                                             self.cfg.dpgd.k_seed)
                seeds = (images[seed_idx.cpu()].to(self.device), seed_targets)
            # method.md: the drift is measured on the DPGD anchors, whatever ACGD distils on
            transfer = build(*seeds, "anchors") if self.cfg.prototypes.transfer else None
            if source is None:
                acgd = None
            elif source == "anchors":
                acgd = transfer if transfer is not None else build(*seeds, "anchors")
            elif source == "seeds":
                acgd = build(*seeds, "seeds")
            elif source == "new_data":
                pixels = images  # on the CPU, like the cache built from it: batches move in loss()
                targets = torch.full((len(images),), -1, dtype=torch.long)
            elif source == "folder":  # ZSCL-style: unlabeled reference images, as many as the task has (at most)
                from ..data.retention import load_reference_images
                from ..data.transforms import clip_test_transform
                transform = self.eval_transform or clip_test_transform(stats.size, stats.mean, stats.std,
                                                                       **stats.geometry())
                pixels = load_reference_images(self.cfg.acgd.source_folder, transform, limit=len(images),
                                               seed=self.anchor_generator.initial_seed())
                targets = torch.full((len(pixels),), -1, dtype=torch.long)
            else:
                raise ValueError(f"acgd.source='{source}' is not supported by the trainer; use anchors, seeds, "
                                 f"new_data or folder")
            if source in ("new_data", "folder"):
                acgd = build(pixels, targets, source)
            return acgd, transfer

    # ------------------------------------------------------------------ stage 2
    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Total training loss on a batch of task-t images (labels: ordered labels)."""
        cfg = self.cfg
        n_total = self.n_old + self.n_new
        scale = self.model.logit_scale()
        n_img = images.shape[0]
        teacher = None
        if self.anchor_cache is not None and cfg.acgd.enabled and cfg.acgd.weight > 0:
            n_anchor = cfg.acgd.anchor_batch or n_img
            pixels, teacher = stage1.sample_anchor_inputs(self.anchor_cache, n_anchor, self.anchor_generator,
                                                          self.device)
            images = torch.cat([images, pixels.to(images.dtype)])
        _, emb = self.model.encode_image(images)
        # the text tower after the image tower: its many small kernels (C prompts, fp32) are launched
        # while the GPU still works through the image batch, instead of in front of it on an idle GPU
        text = self.text_embeddings(n_total)
        graph = self.graph if self.graph is not None and len(self.graph.roots) > 0 else None
        return self.loss_terms(emb, text, labels, scale, self.n_old, teacher, graph, cfg)

    # ------------------------------------------------------------------ stage 3
    @torch.no_grad()
    def end_task(self, t: int, n_new: int, train_eval_loader: Iterable) -> dict:
        """New prototypes (eval transform), drift transfer for old ones, cache text embeddings.

        The model runs as stage 1's teacher does (frozen_eval: eval mode, B frozen): under
        torch.compile the same no-grad graphs serve both (B's requires_grad is in dynamo's guards)."""
        with stage1.frozen_eval(self.model):
            return self._end_task(n_new, train_eval_loader)

    def _end_task(self, n_new: int, train_eval_loader: Iterable) -> dict:
        n_total = self.n_old + n_new
        info = {}
        # Prototypes are kept for every variant: DPGD's visual term needs p_c even when beta = 0.
        raw, _, labels = self._embed_loader(self.model, train_eval_loader)
        new = stage3.class_means(raw, labels, list(range(self.n_old, n_total)))
        if self.n_old > 0 and self.cfg.prototypes.transfer and self.transfer_cache is not None:
            cache = self.transfer_cache
            student_raw = torch.cat([self.model.raw_features(cache.pixels[i:i + 256].to(self.device)).float()
                                     for i in range(0, len(cache.pixels), 256)])
            shift = self.prototypes.transfer(self.n_old, cache.teacher_raw.float().to(self.device), student_raw,
                                             weight_rule=self.cfg.prototypes.weight_rule)
            info["prototype_shift"] = float(shift.mean())
        self.prototypes.add(new)
        self.n_seen = n_total
        self.text_cache = self.text_embeddings(n_total).detach()
        self.anchor_cache = self.transfer_cache = None  # the anchors belong to task t only
        return info

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Dual-path logits over the seen classes (beta = 0: CLIP path only)."""
        raw, emb = self.model.encode_image(images)
        beta = self.cfg.prototypes.beta
        protos = self.prototypes.tensor[:self.n_seen].to(self.device) if beta > 0 and len(self.prototypes) else None
        if protos is None:
            return self.model.logit_scale() * F.normalize(emb.float(), dim=-1) @ self.text_cache.float().T
        return stage3.dual_path_logits(emb.float(), raw.float(), self.text_cache.float(), protos.float(),
                                       self.model.logit_scale(), beta)

    @torch.no_grad()
    def clip_logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """CLIP-path logits against given (normalised) text embeddings (zero-shot, FWT)."""
        _, emb = self.model.encode_image(images)
        return self.model.logit_scale() * F.normalize(emb.float(), dim=-1) @ text.float().T

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"n_seen": self.n_seen, "prototypes": self.prototypes.state_dict(),
                "text_cache": self.text_cache, "ref_text": self.ref_text, "ref_image": self.ref_image}

    def load_state_dict(self, state: dict) -> None:
        self.n_seen = state["n_seen"]
        self.n_old = self.n_seen
        self.prototypes.load_state_dict(state["prototypes"])
        self.prototypes.tensor = self.prototypes.tensor.to(self.device)  # where an unbroken run keeps them
        self.text_cache = state["text_cache"].to(self.device) if state["text_cache"] is not None else None
        stored = state["ref_text"].to(self.device)
        if not same_reference(stored, self.ref_text, self.cfg.run.text_precision):
            raise ReferenceMismatch("text", "checkpoint's reference text embeddings differ from this model's: "
                                            "the checkpoint was made with other pretrained weights or prompts")
        stored = state.get("ref_image")  # checkpoints since 2026-12-06
        if stored is not None and not same_reference(stored.to(self.device), self.ref_image, self.cfg.run.precision):
            raise ReferenceMismatch("image", "checkpoint's reference image embeddings differ from this model's: "
                                             "the checkpoint was made with another pretrained image tower")

    def trainable_parameters(self) -> list:
        return lora_parameters(self.model)


def same_reference(stored: torch.Tensor, ref: torch.Tensor, precision: str) -> bool:
    """Whether a checkpoint's reference embeddings (unit norm, B = 0: ref_text, or ref_image of the probe
    images) are this model's, at the tolerance of the tower's precision (run.text_precision, run.precision).
    bf16 rounds differently on another device or attention / GEMM kernel (text: about 4e-4 between CPU SDPA
    backends; probe images: about 2e-3), fp16 too, by less (3.8e-4 and 2.3e-4 there): both get bf16's
    tolerance. fp32 computed with TF32 GEMMs (run.tf32, or a process that turned
    TF32 on itself, as open_clip's training script does; cuDNN's convolutions use it by default) and read
    back without them moves by a few 1e-4 (text: 3.7e-4 at most in a CPU emulation of TF32's rounding on a
    tiny tower, 1.8e-4 on ViT-B/16's text tower with random weights; probe images: 1.6e-4;
    tests/method/test_method_learner.py). Other weights, prompts or class order move them by far more than
    either tolerance (text: 0.09-0.3 in the same emulation; probe images: 0.19-0.56)."""
    atol = 2e-2 if precision != "fp32" else 2.5e-3
    return stored.shape == ref.shape and torch.allclose(stored.float(), ref.float(), atol=atol)
