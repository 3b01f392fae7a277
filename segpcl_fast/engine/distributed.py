"""Data-parallel training over torch.distributed: torchrun, NCCL on GPU, gloo on CPU.

    torchrun --nproc_per_node 2 -m segpcl_fast.cli train --config cifar100 --hw 2x4090
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
             --rdzv_id run1 -m segpcl_fast.cli train ...            (multi-node: standard rendezvous)

What is distributed and how (one process per device, `DistContext.from_env()` reads torchrun's
RANK / WORLD_SIZE / LOCAL_RANK):

- Gradients: only the LoRA B matrices are trained, so only their gradients are all-reduced
  (`LoRAGradSync`: DDP-style buckets of at most `bucket_cap_mb`, each launched asynchronously as
  soon as backward has produced all its gradients, overlapping communication with the rest of
  backward; with `gradient_as_bucket_view` the .grad tensors are views into the flat buckets, so
  no copy in or out). The frozen backbone is never wrapped or communicated. DDP itself is not
  used because the method calls the two towers through several methods (encode_image,
  class_embeddings), not one module forward, which DDP's reducer needs.
- Data: `optim.batch_size` is the GLOBAL batch. `ShardedBatchSampler` draws the global
  permutation exactly as the single-process DataLoader does (same generator, same draws) and gives
  rank r its contiguous slice of every global batch, so the union of the ranks' batches is the
  single-process batch. Each rank's loss is weighted by n_r * world / N before the averaging
  all-reduce, which makes uneven last batches exact too.
- Anchors: generated once, on rank 0 (teacher seeds + DPGD), then broadcast tensor by tensor
  (each rank then draws its per-step anchor batch from its own generator stream);
  stage 1 is a few % of a task's compute (about 5 |C_old| x K_adv image passes vs 2 x epochs x
  |task| for training), so it is not sharded.
- Evaluation: each rank counts correct / total on a strided shard of the test set; the counts are
  all-reduced (sum). Prototypes (computed on every rank from identical weights) are broadcast from
  rank 0 so that every rank holds bit-identical state.
- Files: only rank 0 writes (checkpoints, config, results, plots), under the run lock
  (checkpoint.lock_run_dir). The analyses, which train runs one after another, refuse to start
  under torchrun (refuse_multi_process).
- Errors: the CLI prints one every rank meets alike once (from rank 0); a rank whose collective
  fails because a peer stopped first says so in one line (lost_peer), not with a traceback.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler, Subset, default_collate

log = logging.getLogger("segpcl_fast.engine")


@dataclass
class DDPSettings:
    """Knobs of the gradient all-reduce (names as in torch DDP)."""
    bucket_cap_mb: float = 25.0
    gradient_as_bucket_view: bool = True
    backend: str = "auto"  # "auto" = nccl on CUDA, gloo on CPU
    timeout_s: int = 1800

    @classmethod
    def from_env(cls) -> "DDPSettings":
        """Defaults, overridden by SEGPCL_DDP_BUCKET_MB, SEGPCL_DDP_GRAD_AS_BUCKET_VIEW (0/1),
        SEGPCL_DDP_BACKEND (auto/nccl/gloo), SEGPCL_DDP_TIMEOUT_S (hardware presets set these)."""
        from ..config import ConfigError
        env = os.environ
        s = cls()

        def number(name, kind, low, default):
            try:
                value = kind(env[name])
            except ValueError:
                value = None
            if value is None or not math.isfinite(value) or value < low:
                raise ConfigError(f"{name}='{env[name]}' is not {'an integer' if kind is int else 'a number'} "
                                  f">= {low}: set one (the default is {default}) or unset it")
            return value
        if "SEGPCL_DDP_BUCKET_MB" in env:
            s.bucket_cap_mb = number("SEGPCL_DDP_BUCKET_MB", float, 0.001, s.bucket_cap_mb)
        if "SEGPCL_DDP_GRAD_AS_BUCKET_VIEW" in env:
            flag = env["SEGPCL_DDP_GRAD_AS_BUCKET_VIEW"].lower()
            if flag not in ("0", "1", "true", "false", "yes", "no"):
                raise ConfigError(f"SEGPCL_DDP_GRAD_AS_BUCKET_VIEW='{env['SEGPCL_DDP_GRAD_AS_BUCKET_VIEW']}' is "
                                  "not a switch: set 1 or 0 (true / false), or unset it")
            s.gradient_as_bucket_view = flag in ("1", "true", "yes")
        if "SEGPCL_DDP_BACKEND" in env:
            s.backend = env["SEGPCL_DDP_BACKEND"]
        if "SEGPCL_DDP_TIMEOUT_S" in env:
            s.timeout_s = number("SEGPCL_DDP_TIMEOUT_S", int, 1, s.timeout_s)
        if s.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"SEGPCL_DDP_BACKEND='{s.backend}' is unknown; use auto, nccl or gloo")
        return s


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None  # None: single process, no process group

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> torch.device:
        """The device of this rank: cuda:LOCAL_RANK under NCCL, and under gloo where run.device is auto
        or cuda and CUDA is there (every rank was on cuda:0); else what run.device resolves to."""
        on_gpus = requested in ("auto", "cuda") and torch.cuda.is_available()
        if self.enabled and (self.backend == "nccl" or on_gpus):
            return torch.device("cuda", self.local_rank)
        if requested == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(requested)

    @classmethod
    def from_env(cls, settings: Optional[DDPSettings] = None, device: str = "auto") -> "DistContext":
        """Single process unless torchrun's WORLD_SIZE > 1; then join (or reuse) the process group."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 and not dist.is_initialized():
            return cls()
        settings = settings or DDPSettings()
        if not dist.is_initialized():
            backend = settings.backend
            if backend == "auto":
                wants_cuda = device != "cpu" and torch.cuda.is_available()
                backend = "nccl" if wants_cuda else "gloo"
            if backend == "nccl" and not torch.cuda.is_available():
                from ..config import ConfigError
                raise ConfigError("SEGPCL_DDP_BACKEND=nccl needs CUDA devices, and none is available here: on "
                                  "CPU use gloo (SEGPCL_DDP_BACKEND=gloo or auto, with run.device=cpu)")
            if backend == "nccl" or (device in ("auto", "cuda") and torch.cuda.is_available()):
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # this rank's GPU, any backend
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=settings.timeout_s))
        elif dist.get_backend() == "nccl" and "LOCAL_RANK" in os.environ:
            # a group set up outside this package: NCCL's object collectives (the anchor broadcast) serialise
            # through the current device, cuda:0 on every rank unless this rank's GPU is made current
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        ctx = cls(rank=dist.get_rank(), world_size=dist.get_world_size(),
                  local_rank=int(os.environ.get("LOCAL_RANK", "0")), backend=dist.get_backend())
        log.info("distributed: rank %d of %d (local rank %d), backend %s", ctx.rank, ctx.world_size,
                 ctx.local_rank, ctx.backend)
        return ctx


def refuse_multi_process(what: str) -> None:
    """Stop `what` (an analysis that trains its runs one after another) under torchrun, before any
    rank trains or writes: every rank would write the same tables, and each would decide on its own
    whether a run's folder is there to resume (rank 0 creates it, another rank may look later)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        world = max(world, dist.get_world_size())
    if world > 1:
        from ..config import ConfigError
        raise ConfigError(f"{what} runs in one process, but this is one of {world} (torchrun): launch it "
                          "without torchrun (its runs train one after another), or train each run on several "
                          "GPUs with `torchrun ... -m segpcl_fast.cli train` and compare their results.json")


# what a collective raises when a peer rank is gone (it stopped on an error or a signal): gloo raises
# a RuntimeError naming its transport, NCCL a DistBackendError; the other rank's own report says why
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo/transport")


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another rank stopped."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    return isinstance(error, RuntimeError) and any(s in str(error) for s in _LOST_PEER)


def raise_on_every_rank(error: Optional[Exception], ctx: DistContext) -> None:
    """Raise rank 0's `error` (None: nothing) on every rank: checks only rank 0 makes (the output dir
    it alone writes) must stop all ranks, not leave the others training into a dead peer's collective.
    Other ranks raise a ConfigError with its message, marked `echo` (the CLI prints it from rank 0 only)."""
    if ctx.enabled:
        message = [None if error is None else str(error)]
        # NCCL serialises through this rank's GPU: name it (the current device may be cuda:0 on every rank
        # when the process group was set up outside this package)
        device = torch.device("cuda", ctx.local_rank) if ctx.backend == "nccl" else None
        dist.broadcast_object_list(message, src=0, device=device)
        if message[0] is not None and not ctx.is_main:
            from ..config import ConfigError
            echo = ConfigError(message[0])
            echo.echo = True
            raise echo
    if error is not None:
        raise error


def raise_together(error: Optional[Exception], ctx: DistContext) -> None:
    """After a step every rank takes on its own and alike (indexing the data, splitting the tasks, loading
    the weights): when any rank failed (`error`, None where it did not), every rank stops here, and the job's
    error is printed once. The ranks' messages are gathered; rank 0 raises its own error, or where only
    others failed, the first failing rank's message, naming that rank. Another rank raises its own error,
    marked `echo` (the CLI prints it from rank 0 only) when rank 0 says the same, or rank 0's, echoed,
    where it did not fail. Without this, a rank that failed alone left the others waiting in the next
    collective for its lost peer, and an error every rank met (data.num_tasks=3) was printed once a rank."""
    if not ctx.enabled:
        if error is not None:
            raise error
        return
    messages = [None] * ctx.world_size
    mine = None if error is None else _as_said(error)
    if ctx.backend == "nccl":  # NCCL serialises through this rank's GPU, as raise_on_every_rank's broadcast
        with torch.cuda.device(ctx.local_rank):
            dist.all_gather_object(messages, mine)
    else:
        dist.all_gather_object(messages, mine)
    failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
    if not failed:
        return
    first_rank, first = failed[0]  # what rank 0 prints: its own error, else the first failing rank's
    from ..config import ConfigError
    if ctx.is_main:
        raise error if error is not None else ConfigError(f"rank {first_rank}: {first}")
    if error is None:
        error, mine = ConfigError(first), first
    if mine == first:
        error.echo = True
    raise error


# the errors the CLI prints as one line of their own message (cli.main); any other is said with its type
_USER_ERRORS = {"ConfigError", "DatasetFormatError", "ModelLoadError", "CheckpointError", "ClassifierError",
                "FloatingPointError"}


@contextlib.contextmanager
def failing_together(ctx: DistContext):
    """`with failing_together(ctx): ...` around a step every rank takes on its own and alike (loading and
    checking a checkpoint): what it raises goes through raise_together, so every rank stops there and the
    error is printed once. Every rank must enter it (it ends in a collective); one process: as raised."""
    if not ctx.enabled:
        yield
        return
    error = None
    try:
        yield
    except Exception as e:  # noqa: BLE001  (whatever one rank meets must stop every rank)
        error = e
    raise_together(error, ctx)


def _as_said(error: Exception) -> str:
    """An error's message as rank 0 says it for another rank: a user error's own message (an OSError's
    too: '[Errno 13] Permission denied: ...'), a bug's with its type ('KeyError: ...', not "'oops'")."""
    if isinstance(error, OSError) or any(c.__name__ in _USER_ERRORS for c in type(error).__mro__):
        return str(error)
    return f"{type(error).__name__}: {error}"


def destroy(after_error: bool = False) -> None:
    """Leave the process group. After an error (after_error=True) without the torch < 2.8 gloo barrier
    below: one rank's error (a NaN loss) finds its peers in an all-reduce, not at a barrier, and the
    barrier would hold every rank for the group's timeout instead of letting them see a lost peer."""
    if dist.is_initialized():
        if not after_error and dist.get_backend() == "gloo" and _torch_before(2, 8):
            # torch < 2.8: ~ProcessGroupGloo joins its worker thread holding the GIL while the worker's last
            # work item waits for the GIL (pytorch#154976): the exit hung in about half the runs on torch 2.6.
            # Letting every rank's outstanding work finish first avoided it in 15 of 15.
            dist.barrier()
            time.sleep(0.05)
        dist.destroy_process_group()


def _torch_before(major: int, minor: int) -> bool:
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return version < (major, minor)


def local_batch_size(global_batch: int, world_size: int, resume: bool = False) -> int:
    """Each process's share of the global batch, which must divide evenly. On a resume the batch is the
    run's (its checkpoints refuse another), so the fix named is the process count."""
    if global_batch % world_size:
        from ..config import ConfigError
        divisors = [n for n in range(1, min(global_batch, 64) + 1) if global_batch % n == 0]
        fix = (f"resume it on a process count that divides {global_batch} (--nproc_per_node: "
               f"{', '.join(map(str, divisors))}): the run's batch size cannot change on a resume" if resume
               else f"use a multiple of {world_size}")
        raise ConfigError(f"optim.batch_size={global_batch} (the global batch) must divide evenly over "
                          f"{world_size} processes; {fix}")
    return global_batch // world_size


# ----------------------------------------------------------------------------- data

class ShardedBatchSampler(Sampler):
    """Rank r's slice of each global batch of a seeded shuffle, identical to DataLoader(shuffle=True).

    Per epoch it draws, from `generator`, first the int64 the DataLoader draws for its worker base
    seed, then randperm(n), then (once the epoch is exhausted) the extra randperm RandomSampler
    draws for its remainder: the same sequence a DataLoader(shuffle=True, generator=g) consumes,
    epoch after epoch. Global batch i is perm[i*G:(i+1)*G]; rank r gets the r-th of `world`
    near-equal contiguous chunks of it (possibly empty for a tiny last batch).

    One __iter__ yields `num_batches` batches (default: one epoch), running on into as many epochs
    as that takes, so one loader iterator serves a whole task: its workers start once and prefetch
    across epoch boundaries (a new iterator per epoch restarts them and waits for a whole batch).
    """

    def __init__(self, n: int, global_batch: int, rank: int, world_size: int, generator: torch.Generator,
                 shuffle: bool = True, num_batches: Optional[int] = None):
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world_size
        self.generator, self.shuffle = generator, shuffle
        self.batches_per_epoch = math.ceil(n / global_batch)
        self.num_batches = self.batches_per_epoch if num_batches is None else num_batches
        if self.num_batches < 0 or (self.num_batches and not n):
            raise ValueError(f"ShardedBatchSampler: {self.num_batches} batches from {n} items")

    def __len__(self) -> int:
        return self.num_batches

    def global_batches(self) -> Iterator[list[int]]:
        """One epoch's global batches."""
        if self.shuffle:
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
            perm = torch.randperm(self.n, generator=self.generator).tolist()
        else:
            perm = list(range(self.n))
        for start in range(0, self.n, self.global_batch):
            yield perm[start:start + self.global_batch]
        if self.shuffle:  # RandomSampler draws one more (empty) permutation when an epoch is exhausted
            torch.randperm(self.n, generator=self.generator)

    def __iter__(self) -> Iterator[list[int]]:
        left = self.num_batches
        while left:
            for batch in self.global_batches():  # an epoch run to its end draws its extra randperm
                if not left:
                    return
                yield shard_slice(batch, self.rank, self.world)
                left -= 1


def collate_allow_empty(batch: list):
    """default_collate, except that a rank's empty slice of a tiny last global batch gives an
    (images, labels) pair of length 0 (default_collate fails on []); the rank still joins the
    gradient all-reduce with zero gradients (Trainer.train_step)."""
    if not batch:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return default_collate(batch)


def shard_slice(items: Sequence, rank: int, world: int) -> list:
    """The rank-th of `world` contiguous, near-equal chunks (sizes differ by at most one)."""
    n = len(items)
    start = rank * n // world
    return list(items[start:(rank + 1) * n // world])


def shard_dataset(dataset, ctx: DistContext):
    """Strided shard (rank, rank + world, ...) without padding, for evaluation; counts are summed after."""
    if not ctx.enabled:
        return dataset
    return Subset(dataset, list(range(ctx.rank, len(dataset), ctx.world_size)))


# ----------------------------------------------------------------------------- collectives

def _comm_device(ctx: DistContext, like: torch.device) -> torch.device:
    return like if ctx.backend == "nccl" else torch.device("cpu")


def all_reduce_counts(counts: Sequence[tuple[int, ...]], ctx: DistContext, device: torch.device) -> list[tuple[int, ...]]:
    """Sum count tuples, e.g. (correct, total), element-wise over the ranks."""
    if not ctx.enabled:
        return [tuple(c) for c in counts]
    t = torch.tensor([list(c) for c in counts], dtype=torch.int64, device=_comm_device(ctx, device))
    dist.all_reduce(t)
    return [tuple(int(v) for v in row) for row in t.tolist()]


def any_rank(flag: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The largest of every rank's `flag` (a scalar on the rank's device; 1.0: something went wrong there), on
    that device. NCCL reduces it on the GPU with no host sync; gloo through the CPU."""
    if not ctx.enabled:
        return flag
    comm = flag.to(_comm_device(ctx, flag.device), copy=True)
    dist.all_reduce(comm, op=dist.ReduceOp.MAX)
    return comm.to(flag.device)


BROADCAST_CHUNK_BYTES = 256 << 20  # a tensor sent through another device than its own goes in pieces of this


def broadcast_tensor(t: Optional[torch.Tensor], ctx: DistContext, device: torch.device, src: int = 0,
                     to: Optional[torch.device] = None) -> torch.Tensor:
    """Rank src's tensor on every rank, placed on `to` (default: device; others may pass None: shape
    and dtype are broadcast first). Where the backend sends through another device than `to` (NCCL
    for a CPU tensor, gloo for a GPU one) it goes in BROADCAST_CHUNK_BYTES pieces, so a task's
    images kept on the CPU never sit whole on the GPU."""
    meta = [(tuple(t.shape), t.dtype) if ctx.rank == src else None]
    dist.broadcast_object_list(meta, src=src)
    shape, dtype = meta[0]
    to = device if to is None else to
    comm = _comm_device(ctx, device)
    out = t.detach().to(to).contiguous() if ctx.rank == src else torch.empty(shape, dtype=dtype, device=to)
    if out.device == comm:
        dist.broadcast(out, src=src)
        return out
    flat = out.view(-1)
    step = max(1, BROADCAST_CHUNK_BYTES // out.element_size())
    for start in range(0, flat.numel(), step):
        piece = flat[start:start + step]
        buf = piece.to(comm) if ctx.rank == src else torch.empty(piece.shape, dtype=dtype, device=comm)
        dist.broadcast(buf, src=src)
        if ctx.rank != src:
            piece.copy_(buf)
    return out


def broadcast_anchor_cache(cache, ctx: DistContext, device: torch.device):
    """Rank 0's AnchorCache (or None) on every rank, each tensor where rank 0 keeps it: on `device`,
    or on the CPU (the pixels of the new_data / folder sources: a whole task's images)."""
    from ..method.anchors import AnchorCache
    present = [cache is not None if ctx.is_main else None]
    dist.broadcast_object_list(present, src=0)
    if not present[0]:
        return None
    info = [(cache.source, [getattr(cache, n).device.type == "cpu" for n in AnchorCache._TENSORS])
            if ctx.is_main else None]
    dist.broadcast_object_list(info, src=0)
    source, on_cpu = info[0]
    tensors = [broadcast_tensor(getattr(cache, n) if ctx.is_main else None, ctx, device,
                                to=torch.device("cpu") if cpu else device)
               for n, cpu in zip(AnchorCache._TENSORS, on_cpu)]
    return AnchorCache(*tensors, source=source)


# ----------------------------------------------------------------------------- gradients

class LoRAGradSync:
    """Average the LoRA B gradients over the ranks, DDP-style: flat buckets, async all-reduce per bucket.

    Usage per step:   sync.prepare()  ->  loss.backward()  ->  sync.finish()  ->  optimizer.step()
    Buckets follow reverse parameter order (roughly the order backward produces the gradients);
    a bucket's all-reduce starts from a post-accumulate-grad hook as soon as it and every bucket
    before it have all their gradients (collectives must be issued in the same order on every
    rank, as DDP does). finish() launches any bucket that did not fill (parameters without a
    gradient this step count as zero), waits, and divides by the world size.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], ctx: DistContext, settings: DDPSettings):
        self.ctx, self.settings = ctx, settings
        self.params = [p for p in params if p.requires_grad]
        cap = max(1, int(settings.bucket_cap_mb * 1024 * 1024))
        self.buckets: list[list[torch.nn.Parameter]] = []
        current, size = [], 0
        for p in reversed(self.params):
            nbytes = p.numel() * p.element_size()
            if current and size + nbytes > cap:
                self.buckets.append(current)
                current, size = [], 0
            current.append(p)
            size += nbytes
        if current:
            self.buckets.append(current)
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self.flat = [torch.zeros(sum(p.numel() for p in b), dtype=b[0].dtype, device=b[0].device)
                     for b in self.buckets]
        self._views = [self._split(i) for i in range(len(self.buckets))]
        self._pending = [0] * len(self.buckets)
        self._next = 0  # the next bucket to launch: launches go in bucket order on every rank
        self._handles: list = [None] * len(self.buckets)
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def _split(self, i: int) -> list[torch.Tensor]:
        views, offset = [], 0
        for p in self.buckets[i]:
            views.append(self.flat[i][offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        return views

    def prepare(self) -> None:
        """Before backward: zero the buckets; with gradient_as_bucket_view, point .grad at them."""
        self._next = 0
        for i, bucket in enumerate(self.buckets):
            self._pending[i] = len(bucket)
            self._handles[i] = None
            self.flat[i].zero_()
            if self.settings.gradient_as_bucket_view:
                for p, v in zip(bucket, self._views[i]):
                    p.grad = v
            else:
                for p in bucket:
                    p.grad = None

    def _on_grad(self, p: torch.Tensor) -> None:
        i = self._bucket_of[id(p)]
        self._pending[i] -= 1
        while self._next < len(self.buckets) and self._pending[self._next] == 0:
            self._launch_next()

    def _launch_next(self) -> None:
        i = self._next
        self._next += 1
        if not self.settings.gradient_as_bucket_view:
            for p, v in zip(self.buckets[i], self._views[i]):
                if p.grad is not None:
                    v.copy_(p.grad)
        comm = self.flat[i] if self.ctx.backend == "nccl" or not self.flat[i].is_cuda else self.flat[i].cpu()
        self._handles[i] = (dist.all_reduce(comm, async_op=True), comm)

    def finish(self) -> None:
        """After backward: complete every bucket's all-reduce and leave the averaged gradients in .grad."""
        while self._next < len(self.buckets):
            self._launch_next()
        for i, bucket in enumerate(self.buckets):
            work, comm = self._handles[i]
            work.wait()
            if comm is not self.flat[i]:
                self.flat[i].copy_(comm)
            self.flat[i].div_(self.ctx.world_size)
            for p, v in zip(bucket, self._views[i]):
                if p.grad is None or p.grad.data_ptr() != v.data_ptr():
                    p.grad = v
            self._handles[i] = None

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
