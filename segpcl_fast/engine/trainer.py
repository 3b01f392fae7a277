"""The task loop: for each task, stage 1 / train / stage 3, evaluate, checkpoint.

Determinism: every task re-seeds torch and its data-loader generator from (run.seed, t), so a
run resumed at a task boundary continues exactly as the uninterrupted run would.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.profiler import record_function
from torch.utils.data import ConcatDataset, DataLoader

from .. import metrics, ops
from ..config import Config, ConfigError, apply_overrides, check_resume_run, config_value, save_config, task_count
from ..data import ClassIncrementalScenario, ClassSubset, build_datasets, build_transforms, format_prompts
from ..data.build import ClassCountError
from ..data.base import legacy_split_digest, split_digest
from ..fileio import unwritable_dir_reason
from ..method.anchors import frozen_eval
from ..method.learner import Learner, builds_anchor_cache
from ..method.variants import resolve_variant
from ..model.clip import config_quick_gelu, float32_default, load_model, native_bf16
from ..model.lora import inject_lora, lora_state_dict
from ..model.tf32 import cuda_matmul_tf32, run_tf32, set_cuda_matmul_tf32
from ..version import __version__
from . import accel
from . import checkpoint as ckpt
from . import compiling
from . import distributed as ddp
from .loss_history import cls_chance_fraction, divergence_warning, epoch_means
from .step_outcome import (ScalerSkips, StepOutcome, loss_nonfinite, make_grad_scaler, skips_nonfinite_on_device,
                           total_grad_norm, with_step_before)
from .tensorboard_log import TENSORBOARD_DIR, TensorBoardLog, check_tensorboard

log = logging.getLogger("segpcl_fast.engine")
# a run's progress (each task's accuracy, resumes, replaced runs): INFO on its own logger, which the CLI shows
# without -v (cli.show_run_progress); the API's caller decides, as for any logger
run_log = logging.getLogger("segpcl_fast.run")

@dataclass
class Result:
    """What train() returns: the accuracy matrix, metrics and the files written."""
    accuracy_matrix: list
    acc_per_task: list
    metrics: dict
    fwt_before: list
    output_dir: str
    paths: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    ops: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    # a_own[t][j]: task j's accuracy among C_<=j (metrics.forgetting_own_space); [] if unknown
    accuracy_matrix_own: list = field(default_factory=list)
    # per task, per epoch: the mean of each loss term over the epoch's steps (epoch_means); a task
    # without training steps has []; [] for runs from before it was recorded
    loss_per_epoch: list = field(default_factory=list)
    # test_images[j]: task j's test images; correct[t][j] / correct_own[t][j]: how many were right after
    # task t (None above the diagonal): the matrix and acc_t recomputed under any weighting
    counts: dict = field(default_factory=dict)
    run: dict = field(default_factory=dict)  # world_size, device: what ran it (not config keys)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device='{name}' but no CUDA device is available; use run.device=cpu (or auto; "
                          f"--set run.device=cpu, also for evaluate)")
    return torch.device(name)


# where the run, its data and its weights cache lie: run-only keys (checkpoint.RUN_ONLY_KEYS) that
# a relative path would tie to the working directory of the command that started the run
LOCATION_KEYS = ("run.output_dir", "data.root", "model.cache_dir")
# the dataset's side files: a relative one is looked up in data.root, then in the working directory
# (data/files.user_data_file); one found in the working directory is made absolute, as the folders are
DATA_FILE_KEYS = ("data.names_file", "data.class_list", "data.split_file")


def absolute_locations(cfg: Config) -> dict[str, str]:
    """{key: absolute path} of the LOCATION_KEYS that are set (`~` expanded; symlinks kept), of
    acgd.source_folder, of model.pretrained where it is a weights file here, and of the DATA_FILE_KEYS
    found in the working directory (not in data.root: those move with it). config.yaml then holds no
    path that only the starting directory resolves, so evaluate and --resume work from anywhere."""
    located = {}
    for key in LOCATION_KEYS:
        value = config_value(cfg, key)
        if value:
            located[key] = os.path.abspath(os.path.expanduser(value))
    root = located.get("data.root")
    for key in DATA_FILE_KEYS:
        value = config_value(cfg, key)
        path = Path(os.path.expanduser(value)) if value else None
        if (path is not None and not path.is_absolute() and not (root and (Path(root) / path).is_file())
                and path.is_file()):
            located[key] = str(path.resolve())
    folder = cfg.acgd.source_folder
    if folder:
        located["acgd.source_folder"] = os.path.abspath(os.path.expanduser(folder))
    weights = cfg.model.pretrained
    if weights and Path(os.path.expanduser(weights)).is_file():
        located["model.pretrained"] = os.path.abspath(os.path.expanduser(weights))
    return located


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def build_model(cfg: Config, device: torch.device) -> tuple:
    """(model, trainable B parameters): the run's open_clip model with LoRA-B injected, its image
    tower under bf16 / fp16 autocast when run.precision says so (CLIPModel.image_autocast: every stage,
    the features come out fp32), and its text transformer so by run.text_precision. Random
    weights (model.pretrained none) are drawn on the CPU (open_clip builds there) after its generator is
    seeded with run.seed, so a run's model can be rebuilt outside its Trainer (classifier.load_classifier)
    with the same weights; CUDA's generators are not touched (a seed the caller queued before CUDA starts
    stays theirs). Built in float32 whatever torch's default dtype. An autocast tower's frozen GEMM weights
    are stored in its dtype (model/frozen_cast.py: what autocast would cast them to every forward, so the
    same results)."""
    torch.default_generator.manual_seed(cfg.run.seed)
    with float32_default():
        model = load_model(cfg.model.name, cfg.model.pretrained, device=device, cache_dir=cfg.model.cache_dir,
                           preprocess=cfg.model.preprocess)
        model.set_precision(image=cfg.run.precision, text=cfg.run.text_precision)
        params = inject_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.towers,
                             seed=cfg.run.seed if cfg.lora.init_seed is None else cfg.lora.init_seed)
        model.store_frozen_weights()  # an autocast tower's frozen GEMM weights cast once (same results)
    if cfg.model.pretrained is None:  # the seed its random weights were drawn after (peft adapters say so)
        model.weights_seed = cfg.run.seed
    return model, params


RANK_SEED_STRIDE = 100003  # rank r's own random streams (augmentation, anchors) start at seed + r * this


def _eval_loader(dataset, batch_size: int, cfg: Config, pin: bool = False,
                 parts: Optional[Sequence[int]] = None) -> DataLoader:
    """In order, every item once (a private generator: starting its workers leaves the global RNG alone).
    pin: batches bound for a CUDA device (Trainer.pin); not for batches kept on the CPU: torch caches freed
    pinned blocks (rounded up to a power of two) instead of giving them back, so a whole task's pinned
    images would stay page-locked, nor for a CPU run on a GPU host (pinning starts a CUDA context).
    parts: the sizes of consecutive pieces of `dataset` whose items never share a batch (see PartBatches)."""
    batching = {"batch_size": batch_size} if parts is None else {"batch_sampler": PartBatches(parts, batch_size)}
    return DataLoader(dataset, **batching, shuffle=False, generator=torch.Generator().manual_seed(0),
                      num_workers=cfg.data.num_workers, pin_memory=pin)


class PartBatches:
    """Batches of consecutive indices over pieces of sizes `sizes` laid end to end, no batch crossing
    a piece's end: each piece is batched exactly as a loader over it alone would batch it, so one
    loader (its workers started once) gives every piece the batches, and so the logits, of its own."""

    def __init__(self, sizes: Sequence[int], batch_size: int):
        self.sizes, self.batch_size = [int(n) for n in sizes], int(batch_size)

    def piece_of_batch(self) -> list[int]:
        return [j for j, n in enumerate(self.sizes) for _ in range(math.ceil(n / self.batch_size))]

    def __iter__(self):
        start = 0
        for n in self.sizes:
            for lo in range(0, n, self.batch_size):
                yield list(range(start + lo, start + min(lo + self.batch_size, n)))
            start += n

    def __len__(self) -> int:
        return len(self.piece_of_batch())


def _train_loader(dataset, cfg: Config, seed: int, ctx: "ddp.DistContext", num_batches: int,
                  pin: bool = False) -> DataLoader:
    """A task's `num_batches` training batches, epoch after epoch, from one loader iterator: its
    workers start once per task and prefetch across epoch boundaries. Under torchrun, this rank's
    slices of the global batches the single-process loader draws (same seed, same permutations)."""
    sampler = ddp.ShardedBatchSampler(len(dataset), cfg.optim.batch_size, ctx.rank, ctx.world_size,
                                      torch.Generator().manual_seed(seed), num_batches=num_batches)
    # the loader's own generator only feeds its workers' base seed (their augmentation draws): one per
    # rank, rank 0 keeping the 1-process stream (the same seed made every rank crop and flip alike);
    # a private generator leaves the global RNG alone. The sampler's is shared: one global permutation.
    worker_seed = seed + RANK_SEED_STRIDE * ctx.rank
    return DataLoader(dataset, batch_sampler=sampler, generator=torch.Generator().manual_seed(worker_seed),
                      collate_fn=ddp.collate_allow_empty, num_workers=cfg.data.num_workers, pin_memory=pin)


def record_compiled_choices(model, device: torch.device) -> None:
    """Record (ops.choices_used) what a compiled run's graphs trace, which calls inside them cannot:
    the LoRA linear with B trained (the step) and with B frozen (evaluation, the teacher: under
    SEGPCL_LORA_COMPILE=cpp the first is the C++ op, the second still the merged GEMM), SDPA
    attention (xformers is never traced), the patch embedding and the ViT tail."""
    from ..ops.lora_linear import OP, lora_b_linear_impl
    probe = torch.empty(0, device=device)
    for B in (torch.empty(0, device=device, requires_grad=True), torch.empty(0, device=device)):
        ops.dispatch.record_choice(OP, lora_b_linear_impl(probe, B, compiling=True), device.type)
    ops.dispatch.record_choice("attention", "sdpa", device.type)
    for op, impl in model.compiled_choices(device).items():
        ops.dispatch.record_choice(op, impl, device.type)


def record_compiled_loss_choices(learner, device: torch.device) -> None:
    """Record what the compiled loss terms' graph traces for ACGD's anchor_kl and TSGR's
    knn_subgraph_kl (compile_learner; the ops record only outside a graph), where the run's config
    uses them: the same rule (ops._kernels.impl_for) on fp32 probes of the step's dtype and device, the
    knn tile rule at tsgr.k (the largest k the run uses; an early task's smaller k fits where it does)."""
    from ..ops._kernels import impl_for
    from ..ops.knn_kl import knn_fused_fits
    cfg, probe = learner.cfg, torch.empty(0, device=device)
    if cfg.acgd.enabled and cfg.acgd.weight > 0:
        ops.dispatch.record_choice("anchor_kl", impl_for("anchor_kl", probe, probe), device.type)
    if cfg.tsgr.enabled and cfg.tsgr.weight > 0:
        fits = knn_fused_fits(cfg.tsgr.k, learner.ref_text.shape[-1], 1)
        index = torch.empty(0, dtype=torch.long, device=device)
        ops.dispatch.record_choice("knn_subgraph_kl", impl_for("knn_subgraph_kl", probe, index, index, probe,
                                                               supported=fits), device.type)


def record_frozen_storage(model, device: torch.device) -> None:
    """Record (ops.choices_used, results.json "ops") how an autocast tower gets its frozen GEMM weights:
    "stored bf16" (cast once at build time, model/frozen_cast.py) or "autocast per call"
    (SEGPCL_FROZEN_CAST=per_call)."""
    for tower, autocast, op in (("visual", "image_autocast", "frozen_image_weights"),
                                ("text", "text_autocast", "frozen_text_weights")):
        if getattr(model, autocast, None) is not None:
            stored = model.frozen_storage.get(tower)
            how = f"stored {str(stored).removeprefix('torch.')}" if stored is not None else "autocast per call"
            ops.dispatch.record_choice(op, how, device.type)


def make_optimizer(params: list, cfg: Config) -> torch.optim.Optimizer:
    """SGD (momentum 0.9) over the LoRA B matrices.

    optim.fused: "auto" = torch's fused SGD on CUDA (its kernel skips a non-finite step on the device:
    Trainer.train_step reads no value back to decide), else foreach; "apex" = NVIDIA apex FusedSGD where
    installed and the params are on CUDA (the step then reads its loss and gradient norm on the host
    before the update: two syncs a step), else what "auto" takes, logged; "foreach" = torch's foreach
    SGD always.
    """
    o = cfg.optim
    if o.fused == "apex":
        opt = accel.apex_fused_sgd(params, o)
        if opt is not None:
            return opt
    kwargs = dict(lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    on_cuda = params and params[0].is_cuda
    if o.fused in ("auto", "apex") and on_cuda:
        return _with_momentum_buffers(torch.optim.SGD(params, fused=True, **kwargs))
    return torch.optim.SGD(params, foreach=True, **kwargs)


def _with_momentum_buffers(optimizer: torch.optim.SGD) -> torch.optim.SGD:
    """Zero momentum buffers made up front. torch's fused SGD makes a buffer uninitialised at a
    parameter's first step and, when found_inf skips that step, keeps the garbage for the next (seen on
    torch 2.14); from zeros, the first update is the same: buf = momentum * 0 + grad = grad."""
    for group in optimizer.param_groups:
        if group["momentum"] != 0 and group["dampening"] == 0:  # with dampening d the first step would be (1-d) grad
            for p in group["params"]:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer


def lr_at(step: int, total: int, cfg: Config) -> float:
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant" or total <= 1:
        return o.lr
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return 0.5 * o.lr * (1 + math.cos(math.pi * min(1.0, progress)))


def idle_setting_warnings(cfg: Config, t: int, n_new: int, total_steps: int) -> list[tuple[str, str]]:
    """Legal settings under which a part of task t's training does nothing, said before it trains: L_cls over a
    task's one new class (a softmax over one class is exactly 1: L_cls = 0), a warmup longer than the task
    (its lr stays under optim.lr throughout; warmup_steps 1000 over 10 steps trained as epochs=0 did).
    Returns (kind, message) pairs: the trainer says each kind once a run."""
    said = []
    if n_new == 1 and cfg.optim.cls_over == "current" and total_steps and cfg.run.method != "zeroshot":
        said.append(("one_class", f"task {t + 1} has one new class and optim.cls_over=current: L_cls, a softmax over "
                                  f"that one class, is 0 and trains nothing (so on every such task); set "
                                  f"optim.cls_over=seen to classify among every seen class"))
    if 0 < total_steps < cfg.optim.warmup_steps:
        last = lr_at(total_steps - 1, total_steps, cfg)
        said.append(("warmup", f"optim.warmup_steps={cfg.optim.warmup_steps} is longer than task {t + 1}'s "
                               f"{total_steps} steps: its learning rate ends at {last:.3g}, {last / cfg.optim.lr:.0%} of "
                               f"optim.lr={cfg.optim.lr:g}; lower optim.warmup_steps (warmup restarts with each task)"))
    return said


def earlier_run_files(out: Path) -> list[Path]:
    """The files of a run that finished a task in `out` (results.json, checkpoints/task_*.pt)."""
    checkpoints = out / ckpt.CHECKPOINT_DIR
    stale = sorted(checkpoints.glob("task_*.pt")) if checkpoints.is_dir() else []
    results = out / "results.json"
    return ([results] if results.exists() else []) + stale


def check_new_run_dir(cfg: Config) -> None:
    """A new run (no --resume, no run.overwrite) into a folder holding another run's files is refused:
    api.train asks before the data and weights load, the trainer again when it claims the folder."""
    if not (cfg.run.resume or cfg.run.overwrite):
        out = Path(cfg.run.output_dir)
        refuse_earlier_run(out, earlier_run_files(out))


def refuse_earlier_run(out: Path, earlier: list[Path]) -> None:
    """One error naming `earlier` (earlier_run_files(out)) when there are any."""
    if earlier:
        raise ConfigError(
            f"output dir {out} already holds a run ({', '.join(p.name for p in earlier[:3])}"
            f"{', ...' if len(earlier) > 3 else ''}): continue it with --resume (run.resume=true), "
            f"pick another dir with -o, or replace it with --set run.overwrite=true")


def resumes_a_finished_run(cfg: Config) -> bool:
    """--resume of a run that trains nothing: it has results.json (Trainer._run then returns its results), or
    its last checkpoint is its last task's (a deleted results.json is written anew from the checkpoints)."""
    out = Path(cfg.run.output_dir)
    if not cfg.run.resume:
        return False
    if (out / "results.json").exists():
        return True
    try:
        last = ckpt.find_last_checkpoint(out)
    except ckpt.CheckpointError:  # a dangling checkpoints/last: Trainer._run says so
        return False
    return last is not None and ckpt.task_of_file(last) == task_count(cfg.data) - 1


def as_trained(cfg: Config) -> Config:
    """`cfg` as a Trainer holds it, and its config.yaml and checkpoints record it: locations absolute
    (absolute_locations), run.method's switches resolved (method/variants.py)."""
    return resolve_variant(apply_overrides(cfg, absolute_locations(cfg)))


class Trainer:
    """One process of a run; under torchrun (WORLD_SIZE > 1) one rank of a data-parallel run.

    dist: the process group context (default: from torchrun's environment, single process
    otherwise); ddp_settings: all-reduce buckets; compile_settings: torch.compile mode/backend
    used when run.compile is true. See distributed.py and compiling.py. writes=False: the output dir is
    not checked for writing (evaluate, profile); trains=False: it trains nothing (evaluate), so the global
    batch need not divide over the processes (None: it trains unless it resumes a finished run).
    """

    def __init__(self, cfg: Config, log_fn: Optional[Callable[[str], None]] = None,
                 dist: Optional["ddp.DistContext"] = None, ddp_settings: Optional["ddp.DDPSettings"] = None,
                 compile_settings: Optional["compiling.CompileSettings"] = None, writes: bool = True,
                 trains: Optional[bool] = None):
        # locations absolute from here on: config.yaml, results.json and Result all name the same dirs
        self.cfg = as_trained(cfg)
        # checked now: at task 2 it would be after task 1 trained (not for evaluation, which never reads it)
        if writes and self.cfg.acgd.enabled and self.cfg.acgd.source == "folder":
            from ..data.retention import list_reference_images
            list_reference_images(self.cfg.acgd.source_folder)
        self.ddp_settings = ddp_settings or ddp.DDPSettings.from_env()
        # the global batch must divide over the processes only where they train: evaluation (trains=False)
        # batches by eval.batch_size over strided shards, and a finished run's --resume trains nothing, so both
        # run on any number of processes (a paper run's batch 128 on 3 GPUs was refused); profile trains
        trains = not resumes_a_finished_run(self.cfg) if trains is None else trains
        if dist is None:  # errors every rank meets alike, before the ranks join (the CLI prints them once)
            resolve_device(self.cfg.run.device)
            if trains:
                ddp.local_batch_size(self.cfg.optim.batch_size, int(os.environ.get("WORLD_SIZE", "1")),
                                     self.cfg.run.resume)
        self.dist = dist or ddp.DistContext.from_env(self.ddp_settings, self.cfg.run.device)
        self.log_fn = log_fn or (lambda msg: run_log.info(msg))
        if not self.dist.is_main:
            self.log_fn = lambda msg: run_log.debug(msg)
        self.out = Path(self.cfg.run.output_dir)
        # whether self.model holds the run's final weights (after run(): not so for a finished run without
        # checkpoints, which run() answers from its results.json alone)
        self.holds_final_weights = False
        self._lock = None  # ckpt.lock_run_dir's, while run() runs on rank 0
        # the lowest L_cls last quarter / ln(n) of the tasks trained in this process (divergence_warning)
        self._learned_cls_fraction: Optional[float] = None
        self._said: set = set()  # the kinds of idle_setting_warnings logged so far (each once a run)
        if trains:
            ddp.local_batch_size(self.cfg.optim.batch_size, self.dist.world_size, self.cfg.run.resume)  # must divide
        problem = None
        if writes and self.dist.is_main:  # the run folder, and its checkpoints/ where an earlier run made it
            checkpoints = self.out / ckpt.CHECKPOINT_DIR
            folders = [self.out] + ([checkpoints] if checkpoints.is_dir() else [])
            problem = next((reason for reason in map(unwritable_dir_reason, folders) if reason), None)
        fix = ("make it writable to resume this run there (chmod u+w), or copy the run to a folder you can write and "
               "resume that" if self.cfg.run.resume else "pick another folder with -o (run.output_dir)")
        # before the data is indexed and weights load, not at the first file written; on every rank
        ddp.raise_on_every_rank(ConfigError(f"run.output_dir: {problem}; {fix}") if problem else None, self.dist)
        self._tb: Optional[TensorBoardLog] = None  # run.tensorboard's writers, while run() trains (rank 0)
        if writes and self.cfg.run.tensorboard:  # the same config on every rank: all call the collective or none
            missing = None
            if self.dist.is_main:
                try:
                    check_tensorboard()
                except ConfigError as e:
                    missing = e
            ddp.raise_on_every_rank(missing, self.dist)
        self.device = self.dist.device(self.cfg.run.device) if self.dist.enabled else resolve_device(self.cfg.run.device)
        if self.cfg.run.num_threads:
            torch.set_num_threads(self.cfg.run.num_threads)
        _check_ops_backend(self.cfg.run.ops, self.device)
        if self.cfg.run.compile and compile_settings is None:  # SEGPCL_COMPILE_*: a bad value is one line, now, not
            with _env_switch_errors():                           # a traceback after the data and weights have loaded
                compile_settings = compiling.CompileSettings.from_env()
        slow_bf16 = precision_warning(self.cfg, self.device, new_run=trains and not self.cfg.run.resume)
        if slow_bf16 and self.dist.is_main:
            log.warning(slow_bf16)
        self._previous_ops = ops.get_backend()  # run() gives it back: a run's backend does not outlive the run
        ops.set_backend(self.cfg.run.ops)
        # run.tf32 on CUDA (where it is torch's switch), given back by run() as the backend is
        self._undo_tf32 = set_cuda_matmul_tf32(True) if run_tf32(self.cfg.run.tf32, self.device) else None
        self.tasks_on_disk: Optional[int] = None  # finished tasks checkpointed (None: not known yet)
        try:
            self._build(compile_settings)
        except BaseException as e:  # a bad data root, weights that do not load: no run() will give the backend back
            self._give_back_process_state()
            # a new run: nothing of it on disk (run.overwrite: the run it replaces is still there, not yet removed)
            if isinstance(e, KeyboardInterrupt) and not (self.cfg.run.resume or self.cfg.run.overwrite):
                e.tasks_on_disk = 0
            raise

    @property
    def pin(self) -> bool:
        """Loader batches in page-locked memory: only where a GPU takes them."""
        return self.device.type == "cuda"

    def _give_back_process_state(self) -> None:
        """The ops backend and TF32 switch the process had before this Trainer set the run's."""
        if getattr(self, "_previous_ops", None) is not None:
            ops.set_backend(self._previous_ops)
        undo, self._undo_tf32 = getattr(self, "_undo_tf32", None), None
        if undo is not None:
            undo()

    def _build(self, compile_settings: Optional["compiling.CompileSettings"]) -> None:
        """Data, model, learner (and compiled model, gradient sync) of the run."""
        # before any collective: a rank that failed stops every rank. float32 whatever the caller's default dtype
        with ddp.failing_together(self.dist), float32_default():
            self._build_rank(compile_settings)
        self.grad_sync = None
        if self.dist.enabled:
            self.grad_sync = ddp.LoRAGradSync(self.lora_params, self.dist, self.ddp_settings)
            self._anchors_on_rank0()

    def _build_rank(self, compile_settings: Optional["compiling.CompileSettings"]) -> None:
        """What each rank builds on its own, with no collective: data, task split, model, learner, compiled
        model."""
        _seed_everything(self.cfg.run.seed)
        c = self.cfg
        # the data is indexed before the model loads, so a bad data root fails before any weights
        # are fetched; the transforms need the model's image size and stats, so they come after
        try:
            raw_train, raw_test = build_datasets(c.data)
        except ClassCountError as e:  # a resumed run's fix is its own data, not a new data.expected_classes
            if not c.run.resume:
                raise
            raise e.for_trained_run("--resume --set data.root=PATH") from None
        self.split_digest = split_digest(raw_train, raw_test)
        self.legacy_split_digest = legacy_split_digest(raw_train, raw_test)  # older checkpoints' (check_split)
        # the class order and task split too (a wrong data.task_sizes failed after the weights loaded)
        ClassIncrementalScenario.from_config(c.data, raw_train, raw_test)
        self.model, self.lora_params = build_model(c, self.device)
        stats = self.model.image_stats
        train_tf, self.test_tf = build_transforms(stats.size, stats.mean, stats.std, c.data.train_augment,
                                                 **stats.geometry())
        train_ds = ClassSubset(raw_train, range(len(raw_train)), transform=train_tf)
        test_ds = ClassSubset(raw_test, range(len(raw_test)), transform=self.test_tf)
        self.scenario = ClassIncrementalScenario.from_config(c.data, train_ds, test_ds)
        self.prompts = format_prompts(self.scenario.class_names, c.data.templates)
        self.learner = Learner(c, self.model, self.prompts, self.device)
        self.compiled = {}
        if c.run.compile:
            self.compiled = compiling.compile_learner(self.learner, compile_settings)  # read in __init__

    def _claim_output_dir(self) -> None:
        """A new run must not mix its files with another run's (stale task_03.pt next to new ones)."""
        earlier = earlier_run_files(self.out)
        stale = [p for p in earlier if p.name != "results.json"]
        if not earlier:  # at most the config.yaml of a run that finished no task (a NaN, a bad file): replaced
            if (self.out / "config.yaml").exists():
                self.log_fn(f"{self.out} holds the config of a run that finished no task: starting over there")
                shutil.rmtree(self.out / TENSORBOARD_DIR, ignore_errors=True)  # its curves are not this run's
            return
        if not self.cfg.run.overwrite:
            refuse_earlier_run(self.out, earlier)
        checkpoints = self.out / ckpt.CHECKPOINT_DIR
        for p in stale:
            p.unlink()
        (checkpoints / ckpt.LAST_POINTER).unlink(missing_ok=True)
        from ..report.run_report import REPORT_FILES
        for name in REPORT_FILES:  # results.json: else a later --resume could report the old run; the
            (self.out / name).unlink(missing_ok=True)  # plots: else they show it (run.plots=false, a crash)
        shutil.rmtree(self.out / TENSORBOARD_DIR, ignore_errors=True)  # its curves, as its plots
        self.log_fn(f"run.overwrite: replacing the run in {self.out}")

    def _anchors_on_rank0(self) -> None:
        """Stage 1 runs on rank 0 only; its anchor caches (ACGD's, the transfer's) are broadcast. An error there
        (DPGD's non-finite fp16 gradient, a bad image) stops every rank (the others waited in the broadcast)."""
        build = self.learner._build_anchors

        def build_once(loader, seed):
            acgd = transfer = None
            with ddp.failing_together(self.dist):
                if self.dist.is_main:
                    acgd, transfer = build(loader, seed)
            same = [transfer is acgd if self.dist.is_main else None]
            torch.distributed.broadcast_object_list(same, src=0)
            acgd = ddp.broadcast_anchor_cache(acgd, self.dist, self.device)
            return acgd, acgd if same[0] else ddp.broadcast_anchor_cache(transfer, self.dist, self.device)
        self.learner._build_anchors = build_once

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _count_correct_local(self, parts: Sequence[tuple], logits_fn) -> list[tuple[int, int, int]]:
        """(correct, correct_own, total) per (dataset, n_own) in `parts`, on this rank's shards:
        correct_own restricts the argmax to the first n_own classes (the own label space, see
        evaluate_seen); n_own=None: all, same as correct.

        One loader over all the parts (a loader per part started its workers once per part: 55
        start-ups in a 10-task run), batched per part exactly as a loader of its own would (PartBatches):
        the same batches, so the same logits and counts."""
        shards = [ddp.shard_dataset(dataset, self.dist) for dataset, _ in parts]
        sizes = [len(shard) for shard in shards]
        loader = _eval_loader(ConcatDataset(shards), self.cfg.eval.batch_size, self.cfg, self.pin, parts=sizes)
        # the counts stay on the device until the end: a read per batch would make the host wait for
        # each batch's forward before it queues the next one's
        correct = torch.zeros(len(parts), 2, dtype=torch.long, device=self.device)  # (all seen, own space)
        for j, (images, labels) in zip(loader.batch_sampler.piece_of_batch(), loader, strict=True):
            images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            logits = logits_fn(images)
            n_own = parts[j][1]
            hit = logits.argmax(dim=-1) == labels
            hit_own = hit if n_own is None else logits[:, :n_own].argmax(dim=-1) == labels
            correct[j, 0] += hit.sum()
            correct[j, 1] += hit_own.sum()
        return [(c, c_own, n) for (c, c_own), n in zip(correct.tolist(), sizes)]

    def _count_correct(self, dataset, logits_fn) -> tuple[int, int]:
        """(correct, total) over the whole dataset; each rank counts its shard, the counts are summed."""
        correct, _, total = ddp.all_reduce_counts(self._count_correct_local([(dataset, None)], logits_fn),
                                                  self.dist, self.device)[0]
        return correct, total

    def evaluate_seen(self, t: int) -> list[tuple[int, int, int]]:
        """(correct, correct_own, total) per task j <= t with the dual-path logits.

        correct: predicting among all seen classes C_<=t (the accuracy matrix a[t][j]);
        correct_own: predicting among C_<=j only, the label space task j was learned in (the
        own-space matrix, which factors the growth of the label space out of forgetting).
        """
        self.model.eval()  # before frozen_eval, which restores the mode it finds: evaluation leaves eval mode
        # B frozen, as stage 1's teacher runs: under torch.compile one no-grad graph per tower serves both
        with record_function("eval"), frozen_eval(self.model):
            counts = self._count_correct_local([(self.scenario.test_dataset(j), len(self.scenario.seen_classes(j)))
                                                for j in range(t + 1)], self.learner.logits)
        return ddp.all_reduce_counts(counts, self.dist, self.device)

    def forward_transfer(self, t: int) -> float:
        """Accuracy on task t before training it: CLIP path, among all classes of the benchmark."""
        self.model.eval()
        with frozen_eval(self.model):  # as evaluate_seen
            with torch.no_grad():
                text = self.model.class_embeddings(self.prompts, device=self.device)
            c, n = self._count_correct(self.scenario.test_dataset(t), lambda x: self.learner.clip_logits(x, text))
        return metrics.percent(c, n)

    # ------------------------------------------------------------------ training
    def task_seed(self, t: int) -> int:
        """Task t's seed: global RNGs, the loader's shuffle, DPGD's random start and the anchor batches."""
        return self.cfg.run.seed * 1000 + t

    def train_task(self, t: int) -> dict:
        c = self.cfg
        n_new = len(self.scenario.task_classes(t))
        task_seed = self.task_seed(t)
        _seed_everything(task_seed)
        timings = {}
        t0 = time.perf_counter()
        self.model.eval()
        task_images = self.scenario.train_dataset(t, transform=self.test_tf)  # the evaluation transform
        stage1_loader = _eval_loader(task_images, c.eval.batch_size, c, pin=False)  # kept whole on the CPU
        # stage 1 (teacher outputs, DPGD, the graph) shows as one step: minutes on a large task, not silence
        bar = _progress(1, f"task {t + 1}/{self.scenario.num_tasks} stage 1 (DPGD anchors)",
                        c.run.progress and self.dist.is_main and t > 0)
        try:  # closed on an error too: a bar left open put the error's message on its line
            with record_function("dpgd"):  # run.precision=bf16: the image tower under autocast, all else fp32
                info = self.learner.begin_task(t, n_new, stage1_loader, seed=task_seed)
            if bar is not None:
                bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        if self.dist.rank:  # each rank samples its own anchors per step (rank 0 keeps the 1-process stream),
            own = task_seed + RANK_SEED_STRIDE * self.dist.rank  # and, with num_workers=0, its own augmentation
            self.learner.anchor_generator.manual_seed(own)  # (drawn from the global RNG in this process)
            torch.manual_seed(own)
        timings["stage1_s"] = time.perf_counter() - t0

        train_ds = self.scenario.train_dataset(t)
        steps_per_epoch = math.ceil(len(train_ds) / c.optim.batch_size)
        total_steps = steps_per_epoch * c.optim.epochs
        if c.run.max_steps_per_task:
            total_steps = min(total_steps, c.run.max_steps_per_task)
        optimizer = make_optimizer(self.lora_params, c) if total_steps else None
        # fp16 autocast only; one per task, as the optimizer
        scaler = make_grad_scaler(self.device, c.run.precision, c.run.text_precision) if total_steps else None
        skips = ScalerSkips()  # steps the loss scaler skipped (fp16 overflow)
        for kind, message in idle_setting_warnings(c, t, n_new, total_steps):
            if self.dist.is_main and kind not in self._said:  # once a run (from the first task that meets it)
                self._said.add(kind)
                log.warning(message)
        t1 = time.perf_counter()
        losses, epochs = [], []
        bar = _progress(total_steps, f"task {t + 1}/{self.scenario.num_tasks}", c.run.progress and self.dist.is_main)
        self.model.train()
        recorded = None  # (step, outcome) last recorded: a non-finite step's error may quote it

        def record(step: int, done) -> None:
            nonlocal recorded
            # a StepOutcome raises FloatingPointError for a non-finite step (its update was skipped)
            parts = done.values(c) if isinstance(done, StepOutcome) else done
            if scaler is not None:
                skips.note(done, parts, step, t, c, scaler)
            recorded = (step, done)
            losses.append(parts)  # {} where this rank had no images (torchrun, a short last batch)
            if getattr(self, "_tb", None) is not None:  # (a Trainer built part way by a test has none)
                self._tb.log_step(parts, lr_at(step, total_steps, c))
            epochs.append(step // steps_per_epoch)
            if bar is not None:
                bar.update(1)
                if parts:
                    bar.set_postfix({k: f"{round(v, 3) + 0.0:.3f}" for k, v in parts.items()})  # no "-0.000"

        # a step's outcome is read back while the next step's kernels are queued (`StepOutcome`): with
        # torch's fused SGD the device skips a non-finite update itself, so no step waits for its own
        # results (elsewhere train_step reads them before the update, as it always did)
        pending = None
        try:  # closed on an error too (a NaN loss, Ctrl-C): else the message lands on the bar's line
            batches = _train_loader(train_ds, c, task_seed, self.dist, total_steps, self.pin)
            for step, (images, labels) in enumerate(batches):
                b = step % steps_per_epoch  # the global batch's place in its epoch
                global_n = min(c.optim.batch_size, len(train_ds) - b * c.optim.batch_size)
                outcome = self.train_step(optimizer, images, labels, lr_at(step, total_steps, c), step, t, global_n,
                                          scaler)
                if pending is not None:
                    record(*pending)
                pending = (step, outcome)
            if pending is not None:
                record(*pending)
        except FloatingPointError as e:
            # the step before the bad one: pending where train_step read it before its update, else recorded
            raise with_step_before(e, [pending, recorded], c)
        finally:
            if bar is not None:
                bar.close()
        timings["train_s"] = time.perf_counter() - t1
        timings["steps"] = len(losses)
        if scaler is not None:
            timings["fp16_skipped_steps"] = skips.total  # of those steps: overflowed under the loss scale, no update
            warning = skips.warning(t, len(losses))
            if warning and self.dist.is_main:
                log.warning(warning)
        t2 = time.perf_counter()
        with record_function("prototypes"):
            info.update(self.learner.end_task(t, n_new, _eval_loader(task_images, c.eval.batch_size, c, self.pin)))  # streamed
            if self.dist.enabled:  # identical on every rank up to float order; make them bit-identical
                self.learner.prototypes.tensor = ddp.broadcast_tensor(
                    self.learner.prototypes.tensor, self.dist, self.learner.prototypes.tensor.device)
                self.learner.text_cache = ddp.broadcast_tensor(self.learner.text_cache, self.dist, self.device)
        timings["stage3_s"] = time.perf_counter() - t2
        info["final_loss"] = next((p for p in reversed(losses) if p), {})
        info["loss_per_epoch"] = epoch_means(losses, epochs)
        info["timings"] = timings
        info["world_size"] = self.dist.world_size  # the processes it trained on (a resume may use others)
        info["device_type"] = self.device.type  # and their device: run.device's "auto" names none (_warn_other_settings)
        # chance level of L_cls: its softmax spans the seen classes (optim.cls_over=seen) or the new ones
        cls_classes = self.learner.n_old + n_new if c.optim.cls_over == "seen" else n_new
        cls_losses = [p.get("cls") for p in losses]
        warning = divergence_warning(cls_losses, cls_classes, t, c.optim.lr, self._learned_cls_fraction)
        if warning and self.dist.is_main:
            log.warning(warning)
        info["cls_chance_fraction"] = cls_chance_fraction(cls_losses, cls_classes)  # kept in checkpoints: a resume
        self._note_learned(info)  # knows what the tasks before it learned
        return info

    def _note_learned(self, info: dict) -> None:
        """The lowest L_cls last quarter / ln(n) of the tasks so far (divergence_warning's `learned_before`),
        from a task's info (train_task's, or a checkpoint's on resume; older checkpoints have none)."""
        fraction = info.get("cls_chance_fraction")
        if fraction is not None:  # (0.0 is a fraction: fp32 cross-entropy rounds to exactly 0 past a margin of ~17)
            self._learned_cls_fraction = fraction if self._learned_cls_fraction is None else \
                min(fraction, self._learned_cls_fraction)

    def train_step(self, optimizer, images: torch.Tensor, labels: torch.Tensor, lr: float, step: int, t: int,
                   global_n: int, scaler: Optional[torch.amp.GradScaler] = None) -> "StepOutcome":
        """One SGD step on this rank's part of a global batch of `global_n` images; returns its outcome
        (`StepOutcome.values(cfg)`: the loss parts as floats, or the FloatingPointError of a non-finite step).

        Non-finite loss terms or LoRA-B gradients never reach the weights. With torch's fused SGD
        (CUDA's default) the check runs on the device: the optimizer's found_inf flag (what AMP's
        GradScaler uses) makes the fused kernel skip the whole update, momentum included, and nothing
        here waits for the GPU; the outcome is read when the caller asks, after it has queued the next
        step; until then the steps queued after a non-finite one are skipped too, so the weights at the
        raise are the synchronous path's. Otherwise (foreach SGD, apex) the outcome is read here, before
        the update: a host sync, free on the CPU (under DDP after the all-reduce, which carries a rank's
        non-finite loss to every rank's gradients, so every rank raises, not only the one that diverged).

        Under DDP the local loss is weighted by n_local * world / global_n before the averaging
        all-reduce, so the L_cls and L_GR parts of the update equal the single-process update on the
        whole global batch; each rank samples its own anchors (engine/distributed.py), so the ACGD
        part equals it in expectation over the anchor draw.

        With a `scaler` (fp16 autocast: make_grad_scaler) the backward runs on the scaled loss and the
        gradients are unscaled before the norm and clipping. Non-finite gradients under a finite loss are then
        an fp16 overflow, not an error: the update is skipped (on the device with fused SGD, not sticky), the
        scaler halves its scale, and the outcome reads `overflowed` (the task loop raises after
        MAX_OVERFLOWS_IN_A_ROW). A non-finite loss term raises as without a scaler.
        """
        c = self.cfg
        for g in optimizer.param_groups:
            g["lr"] = lr
        n_local = len(labels)
        if self.grad_sync is not None:
            self.grad_sync.prepare()
        else:
            optimizer.zero_grad(set_to_none=True)
        parts, loss = {}, None
        on_device = skips_nonfinite_on_device(optimizer)
        if n_local:
            images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            with record_function("student_forward_losses"):
                loss, parts = self.learner.loss(images, labels)
            weighted = loss * (n_local * self.dist.world_size / global_n) if self.grad_sync is not None else loss
            with record_function("backward"):
                (weighted if scaler is None else scaler.scale(weighted)).backward()
        if self.grad_sync is not None:
            with record_function("grad_sync"):
                self.grad_sync.finish()
        with record_function("optimizer"):
            if scaler is not None:
                scaler.unscale_(optimizer)  # on the device: records found_inf, which scaler.update() reads
            if c.optim.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.lora_params, c.optim.grad_clip)
            else:
                grad_norm = total_grad_norm(self.lora_params)
            # under torchrun a rank's non-finite loss reaches every rank's gradients, which a scaler takes for an
            # fp16 overflow: every rank must learn it, and raise with it (else the rank that raises leaves the others
            # in their next collective)
            any_loss_bad = (ddp.any_rank(loss_nonfinite(loss, grad_norm.device), self.dist)
                            if scaler is not None and self.grad_sync is not None else None)
            outcome = StepOutcome(step, t, parts, loss, grad_norm, copy_ahead=on_device, scaled=scaler is not None,
                                  any_loss_bad=any_loss_bad)
            if on_device:
                # 1: the fused kernel leaves weights and momentum. Sticky: the steps queued after a non-finite
                # one (before its error is read) are skipped too, so the weights at the raise are those the
                # synchronous path raises with. Under a scaler only what raises is sticky (a non-finite loss);
                # an overflow skips its own step alone
                skip = outcome.nonfinite(gradients=scaler is None)
                earlier = getattr(optimizer, "_segpcl_nonfinite", None)
                optimizer._segpcl_nonfinite = skip = skip if earlier is None else torch.maximum(skip, earlier)
                outcome.skips_in = optimizer  # reading a non-finite outcome clears the flag
                optimizer.found_inf = skip if scaler is None else torch.maximum(skip, outcome.overflow())
                try:
                    optimizer.step()
                finally:
                    del optimizer.found_inf
            else:
                outcome.values(c)  # the host sync, before the update: raises for a non-finite step
                if not outcome.overflowed:
                    optimizer.step()
            if scaler is not None:
                scaler.update()  # from unscale_'s found_inf: halve the scale after an overflow, else maybe grow it
        return outcome

    def _moved_paths(self, saved: dict) -> dict:
        """results.json's file paths, written absolute where the run was: under this output dir now (a
        copied or moved run lists its own files, not the original's)."""
        old = Path((saved.get("config") or {}).get("run", {}).get("output_dir") or self.out)
        paths = {}
        for name, value in (saved.get("paths") or {}).items():
            try:
                paths[name] = str(self.out / Path(value).relative_to(old))
            except ValueError:  # not under the run's folder: as written
                paths[name] = value
        return paths

    def restore_checkpoint(self, path: Path, purpose: str = "resume", restore: bool = True) -> dict:
        """The checkpoint at `path`, checked against this run (its config, data, test transform and, in
        restore_learner, its pretrained weights) and, with `restore`, loaded into the model and learner. Every
        rank checks it; a refusal stops them all and is printed once (failing_together)."""
        c = self.cfg
        with ddp.failing_together(self.dist):
            state = ckpt.load_checkpoint(path, ckpt.config_fingerprint(c.to_dict()), c.to_dict(),
                                         defaults=type(c)().to_dict(), purpose=purpose)
            ckpt.check_same_data(path, state, self.scenario.class_names, self.split_digest,
                                 self.model.image_stats.geometry(), self.legacy_split_digest)
            ckpt.check_activation(path, state, self.model.quick_gelu, config_quick_gelu(c.model.name))
            if restore:
                ckpt.restore_lora(path, self.model, state)
                ckpt.restore_learner(path, self.learner, state, c.model.pretrained)
        return state

    def _warn_other_settings(self, saved: dict, device_type: Optional[str]) -> None:
        """A resume with other values of the run-only keys that change results (checkpoint.RESULT_CHANGING_KEYS):
        allowed, and said, as its later tasks are not what an uninterrupted run gives. `saved`: the last
        checkpoint's config; `device_type`: the device its last task trained on (None: an older checkpoint), which
        run.device stands for ("auto" and "cuda" may be one device)."""
        c = self.cfg
        # keys that change nothing here: workers without augmentation, TF32 off CUDA, dpgd.batch_size without an
        # anchor cache (it batches DPGD and the teacher's pass over any ACGD source's images)
        idle = {"data.num_workers": not c.data.train_augment,
                "run.tf32": self.device.type != "cuda" and device_type != "cuda",
                "dpgd.batch_size": not builds_anchor_cache(c)}
        changed = []
        for key in ckpt.RESULT_CHANGING_KEYS:
            section, _, name = key.partition(".")
            before = (saved.get(section) or {}).get(name, config_value(type(c)(), key))
            now = config_value(c, key)
            if key == "run.device":
                if device_type is None:
                    continue
                before, now = device_type, self.device.type
            if before != now and not idle.get(key, False):
                changed.append(f"{key} {before} -> {now}")
        if changed:
            workers = changed[0].startswith("data.num_workers")  # first in RESULT_CHANGING_KEYS
            why = ["each loader worker draws its own augmentations"] * workers + \
                ["the other keys round differently" if workers else "they round differently"] * (len(changed) > workers)
            log.warning("resumed with %s (%s): the later tasks are as valid, but not bit-identical to what an "
                        "uninterrupted run gives; resume with the checkpoint's values to continue the same run",
                        ", ".join(changed), "; ".join(why))

    def _warn_other_world_size(self, task_info: list, start: int, T: int) -> None:
        """A resume on another number of processes than its tasks trained on: allowed (a lost node), and said,
        as it is not the run an uninterrupted one would be."""
        before = sorted({info["world_size"] for info in task_info if info.get("world_size") is not None})
        if not self.dist.is_main or not before or before == [self.dist.world_size] or start >= T:
            return
        log.warning("tasks 1..%d of this run trained on %s process(es), this resume trains tasks %d..%d on %d: each "
                    "rank draws its own augmentation and anchors, so the rest of the run is the same training in "
                    "distribution, not what an uninterrupted run gives (equal up to rounding only with "
                    "data.train_augment=false and acgd.anchor_batch >= the anchor pool); results.json's "
                    "run.world_size_per_task records each task's", start, "/".join(map(str, before)), start + 1, T,
                    self.dist.world_size)

    def _finished_result(self, T: int) -> Result:
        """--resume of a run whose every task is done: nothing runs and nothing is rewritten; the
        Result is the run's results.json (which also holds the ops and timings of the real run)."""
        from ..report.results import read_results
        path = self.out / "results.json"
        try:
            saved = read_results(path)
        except ValueError as e:
            raise ckpt.CheckpointError(f"{e}: delete it and --resume again, which writes it anew from the "
                                       "run's checkpoints (no task trains)") from None
        diff = ckpt.config_diff(saved.get("config") or {}, self.cfg.to_dict(), defaults=type(self.cfg)().to_dict())
        if diff:
            raise ckpt.CheckpointError(
                f"{path} holds a finished run of another config ({ckpt.format_config_diff(diff, limit=5)}): "
                f"resume it with its own config (--config {self.out / 'config.yaml'}), or start a new run with -o "
                "or --set run.overwrite=true")
        if self.dist.is_main:  # shown without -v: the table that follows was not trained now
            log.warning("all %d tasks of the run in %s are finished: nothing to resume (%s kept)", T, self.out, path)
        return Result(accuracy_matrix=metrics.matrix_to_list(saved["matrix"]), acc_per_task=saved["acc_per_task"],
                      metrics=saved["metrics"], fwt_before=saved.get("fwt_before") or [None] * T,
                      output_dir=str(self.out), paths=self._moved_paths(saved), timings=saved.get("timings", {}),
                      ops=saved.get("ops", {}), config=saved.get("config", {}),
                      accuracy_matrix_own=saved.get("matrix_own", []),
                      loss_per_epoch=saved.get("loss_per_epoch", []), counts=saved.get("counts", {}),
                      run=saved.get("run", {}))

    def _run_record(self, task_info: list[dict], trained: bool) -> dict:
        """results.json "run": the processes and device that trained. A results.json rebuilt from the
        checkpoints (nothing trained in this process) takes the world size of the last task's record
        and names no device: this process's are not the run's."""
        per_task = [info.get("world_size") for info in task_info]  # None: a checkpoint older than this record
        if not trained:
            return {"world_size": next((w for w in reversed(per_task) if w), None), "world_size_per_task": per_task}
        return {"world_size": self.dist.world_size, "device": str(self.device), "world_size_per_task": per_task,
                **({"tf32": cuda_matmul_tf32()} if self.device.type == "cuda" else {})}

    # ------------------------------------------------------------------ the run
    def run(self) -> Result:
        """Train (or resume) every task; rank 0 holds the output dir's run lock meanwhile."""
        try:
            with float32_default():  # the run's tensors, whatever the caller's default dtype (api.train sets it too)
                return self._run()
        except KeyboardInterrupt as e:  # the CLI's line says whether a --resume has anything to continue from
            e.tasks_on_disk = getattr(self, "tasks_on_disk", None)
            raise
        finally:
            if getattr(self, "_tb", None) is not None:
                self._tb.close()
                self._tb = None
            if getattr(self, "_lock", None) is not None:
                ckpt.unlock_run_dir(self.out, self._lock)
                self._lock = None
            self._give_back_process_state()

    def _run(self) -> Result:
        c = self.cfg
        T = self.scenario.num_tasks
        main = self.dist.is_main
        ops.reset_choices()  # results.json "ops": what this run ran
        if getattr(self, "compiled", None):  # a call inside a compiled graph records nothing: the choices the graphs traced
            record_compiled_choices(self.model, self.device)
            if "loss" in self.compiled and self.scenario.num_tasks > 1:  # ACGD and TSGR run from task 2 on
                record_compiled_loss_choices(self.learner, self.device)
        record_frozen_storage(self.model, self.device)
        self.holds_final_weights = False
        check_resume_run(c)
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        fingerprint = ckpt.config_fingerprint(c.to_dict())
        correct = np.full((T, T), np.nan)
        correct_own = np.full((T, T), np.nan)
        totals = [len(self.scenario.test_dataset(j)) for j in range(T)]
        fwt_before = [None] * T
        task_info = []
        start = 0
        last = None
        if c.run.resume:
            with ddp.failing_together(self.dist):  # a dangling checkpoints/last: one error, from rank 0
                last = ckpt.find_last_checkpoint(self.out)
        self.tasks_on_disk = 0 if c.run.resume else None  # a new run's: 0 once it has claimed the dir
        if last is not None:
            state = self.restore_checkpoint(last)
            correct = np.array(state["correct"], dtype=np.float64)
            correct_own = np.array(state.get("correct_own", np.full((T, T), np.nan)), dtype=np.float64)
            fwt_before = state["fwt_before"]
            task_info = state["task_info"]
            for info in task_info:
                self._note_learned(info)
            start = self.tasks_on_disk = state["task"] + 1
            ops.restore_choices(state.get("ops", {}))  # results.json "ops": the whole run's, not this part's
            self.log_fn(f"resumed from {last}: tasks 1..{start} done")
            if main and start < T:
                self._warn_other_settings(state.get("config") or {}, task_info[-1].get("device_type") if task_info else None)
        # a finished run is its results, whichever task its last checkpoint holds: with run.checkpoint=false
        # (also set on a --resume) the tasks trained since wrote none
        if c.run.resume and (self.out / "results.json").exists():
            self.holds_final_weights = start == T  # the last checkpoint, loaded above, is the final one
            if c.run.checkpoint and start < T and main:  # e.g. a damaged last checkpoint deleted, as its error says
                log.warning("the run in %s is finished (results.json) but its checkpoints end at task %d of %d: the "
                            "final weights are not on disk. To train tasks %d..%d again from %s, delete %s and "
                            "resume", self.out, start, T, start + 1, T,
                            ckpt.find_last_checkpoint(self.out) or "the start", self.out / "results.json")
            with ddp.failing_together(self.dist):  # a results.json of another config: one error, from rank 0
                finished = self._finished_result(T)
            return finished
        if c.run.resume and start == 0 and main:
            log.warning("run.resume is set but %s has no finished task; starting from task 1",
                        self.out / ckpt.CHECKPOINT_DIR)
        self._warn_other_world_size(task_info, start, T)
        problem = None
        if main:
            try:
                # first: a second process in this folder (a run started twice, workers orphaned by a killed
                # torchrun) would mix its files with this one's, and the clean-up below would delete its temps
                self._lock = ckpt.lock_run_dir(self.out)
                if not c.run.resume:
                    self._claim_output_dir()
                    self.tasks_on_disk = 0
                for stale in ckpt.remove_stale_run_temps(self.out):  # a killed run's half-written files
                    log.info("removed %s, left by a run killed while writing", stale)
                # resuming and overwriting are actions, not part of the run's config: a later `train --config
                # <dir>/config.yaml` without --resume must neither resume silently nor delete this run's
                # checkpoints (a saved run.overwrite=true did, with nothing said); locations are saved
                # absolute, so `evaluate` and `--resume` of the run work from any working directory
                save_config(_as_saved(c), self.out / "config.yaml")
            except Exception as e:  # noqa: BLE001  (whatever stops rank 0 here must stop every rank)
                problem = e
        ddp.raise_on_every_rank(problem, self.dist)  # no rank trains into a run rank 0 refused
        # a resume goes on after its finished tasks' steps
        self._tb = (TensorBoardLog(self.out, sum(i["timings"].get("steps", 0) for i in task_info), start)
                    if main and c.run.tensorboard and start < T else None)
        t_run = time.perf_counter()
        for t in range(start, T):
            if c.eval.fwt and t > 0:
                fwt_before[t] = self.forward_transfer(t)
            info = self.train_task(t)
            t_eval = time.perf_counter()
            counts = self.evaluate_seen(t)
            info["timings"]["eval_s"] = time.perf_counter() - t_eval
            for j, (cj, cj_own, _) in enumerate(counts):
                correct[t, j], correct_own[t, j] = cj, cj_own
            acc_t = metrics.percent(sum(c[0] for c in counts), sum(c[-1] for c in counts))
            info["acc"] = acc_t
            task_info.append(info)
            if self._tb is not None:
                self._tb.log_task(t + 1, [metrics.percent(correct[t, j], totals[j]) for j in range(t + 1)], acc_t,
                                  metrics.average([i["acc"] for i in task_info]))
            skipped = info["timings"].get("fp16_skipped_steps")
            self.log_fn(f"task {t + 1}/{T}: acc on seen classes {acc_t:.2f}%  "
                        f"(train {info['timings']['train_s']:.1f}s, stage1 {info['timings']['stage1_s']:.1f}s"
                        + (f", fp16 skipped {skipped}/{info['timings']['steps']} steps" if skipped else "") + ")")
            if c.run.checkpoint and main:
                ckpt.save_task_checkpoint(self.out, t, {
                    "task": t, "fingerprint": fingerprint, "config": c.to_dict(), "segpcl_fast_version": __version__,
                    "lora": lora_state_dict(self.model), "learner": self.learner.state_dict(),
                    "class_names": list(self.scenario.class_names),  # ordered: logit column c = class c
                    "split_digest": self.split_digest,  # which images are train and which test
                    "image_geometry": self.model.image_stats.geometry(),  # its test transform
                    "quick_gelu": self.model.quick_gelu,  # its MLPs' activation (OpenAI's weights: QuickGELU)
                    "correct": correct.tolist(),
                    "correct_own": correct_own.tolist(), "fwt_before": fwt_before, "task_info": task_info,
                    "ops": ops.choices_used(),
                })
                self.tasks_on_disk = t + 1
        self.holds_final_weights = True
        matrix = metrics.accuracy_matrix(correct, totals)
        acc = metrics.acc_per_task(correct, totals)
        # a run resumed from a checkpoint written before own-space counts existed has no own matrix
        lower = np.tril(np.ones((T, T), dtype=bool))
        matrix_own = metrics.accuracy_matrix(correct_own, totals) if np.isfinite(correct_own[lower]).all() else None
        summary = metrics.summarize(matrix, acc, fwt_before if c.eval.fwt else None, matrix_own)
        result = Result(accuracy_matrix=metrics.matrix_to_list(matrix), acc_per_task=acc.tolist(),
                        accuracy_matrix_own=metrics.matrix_to_list(matrix_own) if matrix_own is not None else [],
                        metrics=summary, fwt_before=fwt_before, output_dir=str(self.out),
                        timings=_run_timings(time.perf_counter() - t_run, [i["timings"] for i in task_info], start, T),
                        ops=ops.choices_used(), config=_as_saved(c).to_dict(),
                        loss_per_epoch=[i.get("loss_per_epoch", []) for i in task_info],
                        counts={"test_images": totals, "correct": _count_rows(correct),
                                "correct_own": _count_rows(correct_own) if matrix_own is not None else []},
                        run=self._run_record(task_info, trained=start < T))
        if main:
            from ..report import write_run_report
            result.paths = write_run_report(result, self.out, plots=c.run.plots,
                                            class_names=self.scenario.class_names)
        return result


def _as_saved(cfg: Config) -> Config:
    """The run's config as config.yaml and results.json keep it: resuming and overwriting are actions, not
    part of the run's config (a saved run.resume=true made `train --config` of it with another -o fail, a
    saved run.overwrite=true deleted the run's checkpoints without a word)."""
    return apply_overrides(cfg, {"run.resume": False, "run.overwrite": False})


def _run_timings(run_s: float, tasks: list[dict], start: int, T: int) -> dict:
    """results.json "timings": each task's, and run_s, this process's wall-clock seconds: a resume's part
    from task run_s_from_task on; none when no task ran (a finished run's results rebuilt from its
    checkpoints: rebuilt_from_checkpoints)."""
    if start == T:
        return {"tasks": tasks, "rebuilt_from_checkpoints": True}
    return {"run_s": run_s, "tasks": tasks, **({"run_s_from_task": start + 1} if start else {})}


def _count_rows(counts: np.ndarray) -> list[list[Optional[int]]]:
    """A count matrix as JSON rows: ints, None where not measured (above the diagonal)."""
    return [[None if v is None else int(v) for v in row] for row in metrics.matrix_to_list(counts)]


def precision_warning(cfg: Config, device: torch.device, new_run: bool = True) -> Optional[str]:
    """What to say about run.precision / run.text_precision = bf16 on a GPU without native bf16 (before Ampere:
    V100, T4, the RTX 20 series; compute capability < 8, of the run's own device): torch runs bf16 there
    emulated, slowly, where fp16 (loss-scaled) would use the tensor cores. new_run=False (evaluate, --resume):
    the run keeps the precision it was trained with, so the advice is for a new run. None elsewhere."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    keys = [key for key in ("run.precision", "run.text_precision") if config_value(cfg, key) == "bf16"]
    if not keys or native_bf16(device):
        return None
    major, minor = torch.cuda.get_device_capability(device)
    switch = " ".join(f"--set {k}=fp16" for k in keys)
    advice = (f"train with {switch} (autocast with loss scaling, on its tensor cores; --set wins over a --hw preset)"
              if new_run else f"this run keeps the precision it was trained with (its checkpoints' config); a new "
              f"run with {switch} (autocast with loss scaling) uses its tensor cores")
    return (f"{' and '.join(f'{k}=bf16' for k in keys)} on {torch.cuda.get_device_name(device)} (compute capability "
            f"{major}.{minor}), which has no native bf16: torch emulates it, slowly (and torch.compile may skip its "
            f"bf16 graphs); {advice}")


@contextlib.contextmanager
def _env_switch_errors():
    """An environment switch's bad value (a ValueError naming the variable) as one ConfigError, before the run
    starts."""
    try:
        yield
    except ValueError as e:
        raise ConfigError(f"{e} (an environment variable; unset it for the default)") from None


def _check_ops_backend(name: str, device: torch.device) -> None:
    """run.ops=triton on a device the Triton kernels cannot run on fails here, before the data is
    indexed and weights load (it failed at the first TSGR call, deep in a traceback); SEGPCL_OPS set to
    something else than the run's run.ops is named (a run takes run.ops, whose default is auto)."""
    from ..ops._kernels import _utils
    if name == "triton" and not _utils.can_run_triton(torch.empty(0, device=device)):
        why = ("triton is not installed" if not _utils.HAS_TRITON else
               f"they take CUDA tensors, and this run is on {device} without TRITON_INTERPRET=1 (the CPU "
               "interpreter, for tests: set it before segpcl_fast is imported)")
        raise ConfigError(f"run.ops=triton forces the Triton kernels, but {why}; use run.ops=auto (the fast path "
                          "where there is one)")
    from ..model import frozen_cast, patch_embed, vit_tail
    from ..ops import lora_linear
    with _env_switch_errors():  # every A/B switch, read where its path runs: a bad value now, not mid-run
        lora_linear.switches(), patch_embed.choice(), vit_tail.choice(), frozen_cast.choice()
    env = os.environ.get("SEGPCL_OPS")
    if env and env != name:
        log.warning("SEGPCL_OPS=%s is not what this run uses: a run takes run.ops (%s here); set --set run.ops=%s "
                    "(or run.ops in the config) to run it", env, name, env)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
