"""Properties of the engine that a mutation audit found unchecked: the LR schedule's values, the
trainer step (LR applied, exact DDP loss weighting, empty shards), resume bookkeeping, checkpoint
lookup and class-order checks, the DDP / compile / preset settings read from the environment, the
collectives used by the trainer (2 gloo processes), and the analytic FLOPs of count="model"."""
import json
import math
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from segpcl_fast.api import make_config, train
from segpcl_fast.config import ConfigError
from segpcl_fast.engine import checkpoint as ckpt
from segpcl_fast.engine import distributed as ddp
from segpcl_fast.engine.trainer import Trainer, lr_at, make_optimizer

import run_cases


def small_config(tiny_model_name, out, **kw):
    return run_cases.small_config(tiny_model_name, out, **{
        "plots": False, "train_augment": False, "run__device": "cpu", **kw})


# ----------------------------------------------------------------------------- LR schedule

def test_lr_schedule_warmup_then_cosine_hand_values():
    """Linear warmup reaches the full LR at its last step; the cosine then runs over the steps after
    the warmup, starting at the full LR and stopping one step short of zero."""
    cfg = make_config(lr=0.1, optim__warmup_steps=4, optim__schedule="cosine")
    total = 12
    got = [lr_at(s, total, cfg) for s in range(total)]
    warm = [0.025, 0.05, 0.075, 0.1]
    cosine = [0.05 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]  # progress k / (12 - 4)
    assert got == pytest.approx(warm + cosine, rel=1e-12, abs=1e-15)
    assert got[4] == pytest.approx(0.1) and got[8] == pytest.approx(0.05)
    assert got[-1] == pytest.approx(0.05 * (1 - math.cos(math.pi / 8))) and got[-1] > 0


def test_lr_schedule_constant_keeps_its_warmup_and_edge_cases():
    const = make_config(lr=0.2, optim__warmup_steps=2, optim__schedule="constant")
    assert [lr_at(s, 6, const) for s in range(6)] == pytest.approx([0.1, 0.2, 0.2, 0.2, 0.2, 0.2])
    cos = make_config(lr=0.2, optim__schedule="cosine")
    assert lr_at(0, 1, cos) == pytest.approx(0.2)  # one step: the full LR
    assert lr_at(0, 0, cos) == pytest.approx(0.2)
    assert [lr_at(s, 4, cos) for s in range(4)] == pytest.approx(
        [0.2, 0.1 * (1 + math.cos(math.pi / 4)), 0.1, 0.1 * (1 + math.cos(3 * math.pi / 4))])


# ----------------------------------------------------------------------------- train_step on a stub

class _LinearLearner:
    """loss = mean over the batch of (x . w - y)^2: a per-sample mean, like L_cls."""

    def __init__(self, w):
        self.w = w
        self.calls = 0

    def loss(self, images, labels):
        self.calls += 1
        loss = ((images @ self.w - labels.float()) ** 2).mean()
        return loss, {"cls": loss}


class _RecordingSync:
    """Stands in for LoRAGradSync on one rank: keeps the rank's (weighted) gradient."""

    def __init__(self, params):
        self.params, self.grads, self.finished = params, None, 0

    def prepare(self):
        for p in self.params:
            p.grad = torch.zeros_like(p)

    def finish(self):
        self.finished += 1
        self.grads = [p.grad.clone() for p in self.params]


class _NoStep:
    def __init__(self):
        self.param_groups = [{"lr": None}]

    def step(self):
        pass


def _stub_trainer(w, rank=0, world=1, sync=True, **cfg):
    tr = Trainer.__new__(Trainer)  # no model, data or files: only what train_step reads
    tr.cfg = make_config(**cfg)
    tr.device = torch.device("cpu")
    tr.lora_params = [w]
    tr.learner = _LinearLearner(w)
    tr.dist = ddp.DistContext(rank=rank, world_size=world, backend="gloo" if world > 1 else None)
    tr.grad_sync = _RecordingSync([w]) if sync else None
    return tr


@pytest.mark.parametrize("n", [5, 1])  # 5 rows: shards of 2 and 3; 1 row: rank 0's shard is empty
def test_ddp_loss_weighting_makes_the_averaged_gradient_the_global_batch_gradient(n):
    torch.manual_seed(0)
    x, y = torch.randn(n, 3), torch.randint(0, 3, (n,))
    w = torch.nn.Parameter(torch.randn(3))
    expected, = torch.autograd.grad(((x @ w - y.float()) ** 2).mean(), w)
    per_rank = []
    for rank in range(2):
        tr = _stub_trainer(w, rank=rank, world=2)
        idx = ddp.shard_slice(list(range(n)), rank, 2)
        parts = Trainer.train_step(tr, _NoStep(), x[idx], y[idx], 0.1, 0, 0, global_n=n).values(tr.cfg)
        assert tr.grad_sync.finished == 1  # an empty shard still joins the all-reduce
        assert tr.learner.calls == (1 if idx else 0) and (parts == {}) == (not idx)
        per_rank.append(tr.grad_sync.grads[0])
    torch.testing.assert_close((per_rank[0] + per_rank[1]) / 2, expected)  # what the averaging all-reduce gives


def test_train_step_sets_the_scheduled_lr_on_the_optimizer():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    tr = _stub_trainer(w, sync=False, lr=0.5)
    opt = make_optimizer([w], tr.cfg)
    x, y = torch.tensor([[1.0, 1.0]]), torch.tensor([0])
    grad, = torch.autograd.grad(((x @ w - y.float()) ** 2).mean(), w)
    before = w.detach().clone()
    Trainer.train_step(tr, opt, x, y, 0.125, 0, 0, global_n=1)
    assert opt.param_groups[0]["lr"] == 0.125
    torch.testing.assert_close(w.detach(), before - 0.125 * grad)  # the step's LR, not optim.lr = 0.5
    # single process: the gradient of the previous step does not leak into the next one
    before = w.detach().clone()
    grad, = torch.autograd.grad(((x @ w - y.float()) ** 2).mean(), w)
    Trainer.train_step(tr, torch.optim.SGD([w], lr=0.0), x, y, 0.25, 1, 0, global_n=1)
    torch.testing.assert_close(w.detach(), before - 0.25 * grad)


def _fused_sgd(w, **kw):
    """torch's fused SGD as make_optimizer builds it on CUDA (zero momentum buffers up front); on the CPU
    here, where its found_inf flag works the same way."""
    from segpcl_fast.engine.trainer import _with_momentum_buffers
    return _with_momentum_buffers(torch.optim.SGD([w], fused=True, **kw))


def test_fused_sgd_steps_check_on_the_device_and_equal_the_synchronous_ones(monkeypatch):
    """With fused SGD a step reads nothing back before its update (the caller reads its outcome after
    queueing the next step); its updates equal the synchronous path's (foreach SGD, outcome read before
    the update), momentum and weight decay included."""
    torch.manual_seed(1)
    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
    w_dev, w_sync = torch.nn.Parameter(torch.randn(3)), None
    w_sync = torch.nn.Parameter(w_dev.detach().clone())
    tr_dev, tr_sync = _stub_trainer(w_dev, sync=False), _stub_trainer(w_sync, sync=False)
    opt_dev, opt_sync = _fused_sgd(w_dev, **kw), torch.optim.SGD([w_sync], foreach=True, **kw)
    reads = []
    for name in ("__float__", "__bool__", "item", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _n=name: reads.append(_n) or _real(self, *a))
    outcomes = []
    for step in range(3):
        outcomes.append(Trainer.train_step(tr_dev, opt_dev, x, y, 0.1, step, 0, global_n=4))
        assert reads == [], reads  # nothing read back: the GPU would keep its queue
        Trainer.train_step(tr_sync, opt_sync, x, y, 0.1, step, 0, global_n=4)
        reads.clear()
    monkeypatch.undo()
    torch.testing.assert_close(w_dev.detach(), w_sync.detach(), rtol=1e-6, atol=1e-7)
    assert [o.values(tr_dev.cfg)["cls"] > 0 for o in outcomes] == [True] * 3


class _PoisonedLearner(_LinearLearner):
    """From step `bad_from` on: a NaN loss (nan_loss) or a finite loss whose gradient is not finite."""

    def __init__(self, w, bad_from, nan_loss):
        super().__init__(w)
        self.bad_from, self.nan_loss = bad_from, nan_loss

    def loss(self, images, labels):
        self.calls += 1
        if self.calls - 1 < self.bad_from:
            return super().loss(images, labels)
        loss = (self.w * float("nan")).sum() if self.nan_loss else (self.w - self.w.detach()).abs().sqrt().sum()
        return loss, {"cls": loss}


@pytest.mark.parametrize("nan_loss", [True, False])
def test_a_non_finite_step_is_skipped_on_the_device_and_raised_when_read(nan_loss):
    """The fused kernel leaves weights and momentum as they were when the step's loss or gradient is
    not finite; reading the step's outcome raises the error the synchronous path raises, naming it.
    The trainer reads a step's outcome after queueing the next one: that step is skipped too (the flag
    is sticky until the error is read), so the weights at the raise are the synchronous path's."""
    torch.manual_seed(2)
    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    w = torch.nn.Parameter(torch.randn(3))
    tr = _stub_trainer(w, sync=False)
    tr.learner = _PoisonedLearner(w, bad_from=1, nan_loss=nan_loss)
    opt = _fused_sgd(w, lr=0.1, momentum=0.9)
    Trainer.train_step(tr, opt, x, y, 0.1, 0, 0, global_n=4).values(tr.cfg)
    before, buf = w.detach().clone(), opt.state[w]["momentum_buffer"].clone()
    bad = Trainer.train_step(tr, opt, x, y, 0.1, 1, 0, global_n=4)
    assert torch.equal(w.detach(), before) and torch.equal(opt.state[w]["momentum_buffer"], buf)
    assert not hasattr(opt, "found_inf")  # the flag is the step's own
    tr.learner = _LinearLearner(w)  # finite again
    queued = Trainer.train_step(tr, opt, x, y, 0.1, 2, 0, global_n=4)
    assert queued.values(tr.cfg)["cls"] > 0  # finite, but queued before the bad step was read: skipped
    assert torch.equal(w.detach(), before) and torch.equal(opt.state[w]["momentum_buffer"], buf)
    message = "loss is nan at task 1, step 1" if nan_loss else "LoRA B gradients are not finite at task 1, step 1"
    with pytest.raises(FloatingPointError, match=message):
        bad.values(tr.cfg)
    Trainer.train_step(tr, opt, x, y, 0.1, 3, 0, global_n=4).values(tr.cfg)  # read: steps apply again
    assert not torch.equal(w.detach(), before)


def test_a_skipped_first_step_leaves_no_momentum_behind(monkeypatch):
    """torch's fused SGD makes its momentum buffer uninitialised at the first step (torch.empty_like)
    and keeps it when found_inf skips that step; make_optimizer's zero buffers make the next step a
    clean first step. empty_like is made to return NaNs, so leftover garbage cannot pass as zeros."""
    real_empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: real_empty_like(*a, **k).fill_(float("nan")))
    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    w, fresh = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    tr = _stub_trainer(w, sync=False)
    tr.learner = _PoisonedLearner(w, bad_from=0, nan_loss=True)
    opt = _fused_sgd(w, lr=0.1, momentum=0.9)
    bad = Trainer.train_step(tr, opt, x, y, 0.1, 0, 0, global_n=4)  # skipped on the device
    with pytest.raises(FloatingPointError):
        bad.values(tr.cfg)  # read (and caught): the steps after it run again
    tr.learner = _LinearLearner(w)
    Trainer.train_step(tr, opt, x, y, 0.1, 1, 0, global_n=4).values(tr.cfg)
    tr_fresh = _stub_trainer(fresh, sync=False)
    Trainer.train_step(tr_fresh, torch.optim.SGD([fresh], lr=0.1, momentum=0.9), x, y, 0.1, 0, 0, global_n=4)
    assert torch.equal(w.detach(), fresh.detach()) and torch.equal(opt.state[w]["momentum_buffer"], fresh.grad)


def _optimizer(kind, w, **kw):
    return _fused_sgd(w, **kw) if kind == "fused" else torch.optim.SGD([w], foreach=True, **kw)


@pytest.mark.parametrize("kind,clip", [("fused", 0.0), ("foreach", 0.0), ("fused", 0.05), ("foreach", 0.05)])
def test_a_loss_scaled_step_equals_the_unscaled_step(kind, clip):
    """fp16's loss scaling (make_grad_scaler): the backward runs on loss x 2^k and the gradients are
    unscaled before the norm, the clipping (optim.grad_clip; 0.05 binds here) and the update, so a finite
    step's update, momentum and loss parts are the unscaled step's bit for bit (powers of two scale exactly);
    the scale stays (growth after 2000 steps)."""
    from segpcl_fast.engine.step_outcome import make_grad_scaler
    torch.manual_seed(3)
    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
    w_plain = torch.nn.Parameter(torch.randn(3))
    w_scaled = torch.nn.Parameter(w_plain.detach().clone())
    tr_plain = _stub_trainer(w_plain, sync=False, optim__grad_clip=clip)
    tr_scaled = _stub_trainer(w_scaled, sync=False, optim__grad_clip=clip)
    opt_plain, opt_scaled = _optimizer(kind, w_plain, **kw), _optimizer(kind, w_scaled, **kw)
    scaler = make_grad_scaler(torch.device("cpu"), "fp16", "fp32")
    assert make_grad_scaler(torch.device("cpu"), "bf16", "fp32") is None
    assert make_grad_scaler(torch.device("cpu"), "fp32", "fp16") is not None
    for step in range(3):
        a = Trainer.train_step(tr_plain, opt_plain, x, y, 0.1, step, 0, global_n=4).values(tr_plain.cfg)
        b = Trainer.train_step(tr_scaled, opt_scaled, x, y, 0.1, step, 0, 4, scaler)
        assert b.values(tr_scaled.cfg) == a and not b.overflowed
        assert torch.equal(w_plain.grad, w_scaled.grad)  # unscaled before the update
    assert torch.equal(w_plain.detach(), w_scaled.detach())
    assert torch.equal(opt_plain.state[w_plain]["momentum_buffer"], opt_scaled.state[w_scaled]["momentum_buffer"])
    assert scaler.get_scale() == 2.0 ** 16


@pytest.mark.parametrize("kind", ["fused", "foreach"])
def test_an_overflowing_scaled_step_is_skipped_halves_the_scale_and_raises_nothing(kind):
    """Under a loss scaler, non-finite gradients under a finite loss are an fp16 overflow: the update and
    momentum are skipped, the scale halves, the outcome reads `overflowed` and raises nothing; the skip is
    the step's own (the next, finite step applies, queued before the overflow was read)."""
    from segpcl_fast.engine.step_outcome import make_grad_scaler
    torch.manual_seed(4)
    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    w = torch.nn.Parameter(torch.randn(3))
    tr = _stub_trainer(w, sync=False)
    opt = _optimizer(kind, w, lr=0.1, momentum=0.9)
    scaler = make_grad_scaler(torch.device("cpu"), "fp16")
    Trainer.train_step(tr, opt, x, y, 0.1, 0, 0, 4, scaler).values(tr.cfg)
    before, buf = w.detach().clone(), opt.state[w]["momentum_buffer"].clone()
    tr.learner = _PoisonedLearner(w, bad_from=0, nan_loss=False)
    bad = Trainer.train_step(tr, opt, x, y, 0.1, 1, 0, 4, scaler)
    assert torch.equal(w.detach(), before) and torch.equal(opt.state[w]["momentum_buffer"], buf)
    assert scaler.get_scale() == 2.0 ** 15
    tr.learner = _LinearLearner(w)
    queued = Trainer.train_step(tr, opt, x, y, 0.1, 2, 0, 4, scaler)
    assert bad.values(tr.cfg) == {"cls": 0.0} and bad.overflowed
    assert queued.values(tr.cfg)["cls"] > 0 and not queued.overflowed
    assert not torch.equal(w.detach(), before)  # the finite step after the overflow applied


def test_a_rank_whose_first_batch_is_empty_unscales_under_a_loss_scaler(monkeypatch):
    """torchrun, fp16: a rank with no images in its first step scales no loss but joins the all-reduce and
    unscales the gradients it receives (GradScaler made its scale at the first scale() call: unscale_ failed).
    No process group here: the loss flags' all-reduce is the identity (2 real ranks: test_distributed.py)."""
    from segpcl_fast.engine.step_outcome import make_grad_scaler
    monkeypatch.setattr(ddp, "any_rank", lambda flag, ctx: flag)
    w = torch.nn.Parameter(torch.randn(3))
    tr = _stub_trainer(w, rank=0, world=2)
    opt = torch.optim.SGD([w], lr=0.1, foreach=True)
    before = w.detach().clone()
    outcome = Trainer.train_step(tr, opt, torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 0.1, 0, 0, 1,
                                 make_grad_scaler(torch.device("cpu"), "fp16"))
    assert outcome.values(tr.cfg) == {} and not outcome.overflowed and tr.learner.calls == 0
    assert torch.equal(w.detach(), before)  # zero gradients (no all-reduce partner here): no move


def test_a_non_finite_loss_raises_under_a_loss_scaler_too():
    from segpcl_fast.engine.step_outcome import make_grad_scaler
    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    w = torch.nn.Parameter(torch.randn(3))
    tr = _stub_trainer(w, sync=False)
    tr.learner = _PoisonedLearner(w, bad_from=0, nan_loss=True)
    opt = _fused_sgd(w, lr=0.1, momentum=0.9)
    before = w.detach().clone()
    bad = Trainer.train_step(tr, opt, x, y, 0.1, 0, 0, 4, make_grad_scaler(torch.device("cpu"), "fp16"))
    with pytest.raises(FloatingPointError, match="loss is nan at task 1, step 0.*run.precision=bf16 \\(where the GPU"):
        bad.values(make_config(precision="fp16"))
    assert torch.equal(w.detach(), before)


def test_optimizer_applies_weight_decay_and_momentum():
    p = torch.nn.Parameter(torch.tensor([2.0]))
    opt = make_optimizer([p], make_config(lr=0.1, optim__weight_decay=0.5, optim__fused="foreach"))
    p.grad = torch.tensor([1.0])
    opt.step()  # d = g + wd * p = 1 + 1 = 2; buf = d
    assert p.item() == pytest.approx(2.0 - 0.1 * 2.0)
    p.grad = torch.tensor([1.0])
    opt.step()  # d = 1 + 0.5 * 1.8 = 1.9; buf = 0.9 * 2 + 1.9 = 3.7
    assert p.item() == pytest.approx(1.8 - 0.1 * 3.7)


# ----------------------------------------------------------------------------- checkpoints

def _reordered(d):
    return {k: _reordered(v) if isinstance(v, dict) else v for k, v in reversed(list(d.items()))}


def test_fingerprint_does_not_depend_on_key_order():
    """A config read back from a file (or written by another version) may list its keys in another order."""
    cfg = make_config().to_dict()
    shuffled = _reordered(cfg)
    assert list(shuffled) != list(cfg)
    assert ckpt.config_fingerprint(shuffled) == ckpt.config_fingerprint(cfg)


def test_checkpoint_with_the_older_fingerprint_key_still_matches(tmp_path):
    cfg = make_config().to_dict()
    fp = ckpt.config_fingerprint(cfg)
    path = ckpt.save_checkpoint(tmp_path / "old.pt", {"task": 0, "config_fingerprint": fp, "config": cfg})
    assert ckpt.load_checkpoint(path, fp, cfg)["task"] == 0
    other = make_config(lr=0.5).to_dict()
    with pytest.raises(ckpt.CheckpointError, match="optim.lr was 0.001, now 0.5"):
        ckpt.load_checkpoint(path, ckpt.config_fingerprint(other), other)


def test_a_stale_fingerprint_is_refused_even_when_the_stored_config_matches(tmp_path):
    """Only the defaults path (keys added since, at their default) may excuse a fingerprint mismatch."""
    cfg = make_config().to_dict()
    path = ckpt.save_checkpoint(tmp_path / "c.pt", {"task": 0, "fingerprint": "0123456789abcdef", "config": cfg})
    with pytest.raises(ckpt.CheckpointError, match="fingerprint 0123456789abcdef"):
        ckpt.load_checkpoint(path, ckpt.config_fingerprint(cfg), cfg)


def test_reordered_class_names_are_other_classes():
    """Logit column c is class c: the same names in another order are not the same run's classes."""
    with pytest.raises(ckpt.CheckpointError, match="class 0 was 'cat', now 'dog'"):
        ckpt.check_class_names("c.pt", {"class_names": ["cat", "dog", "owl"]}, ["dog", "cat", "owl"])


def test_without_a_pointer_the_numerically_highest_task_wins(tmp_path):
    folder = tmp_path / ckpt.CHECKPOINT_DIR
    folder.mkdir()
    for t in (9, 99, 100):
        ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, t), {"task": t})
    (folder / "notes.txt").write_text("x")
    (folder / "task_7.pt.tmp").write_text("x")
    assert ckpt.checkpoint_path(tmp_path, 100).name == "task_100.pt"
    assert ckpt.find_last_checkpoint(tmp_path) == folder / "task_100.pt"


def test_a_pointer_must_name_a_task_checkpoint(tmp_path):
    ckpt.save_task_checkpoint(tmp_path, 0, {"task": 0})
    folder = tmp_path / ckpt.CHECKPOINT_DIR
    (folder / "other.pt").write_bytes((folder / "task_00.pt").read_bytes())
    (folder / ckpt.LAST_POINTER).write_text("other.pt\n")
    with pytest.raises(ckpt.CheckpointError, match="names 'other.pt', which is not a checkpoint"):
        ckpt.find_last_checkpoint(tmp_path)


def test_checkpoint_and_pointer_are_durable_writes(tmp_path, monkeypatch):
    """Each of the two files goes through a temp file that is fsynced, renamed, and then its folder
    fsynced (else the rename may not survive a power loss)."""
    from segpcl_fast import fileio
    synced, replaced = [], []
    real_fsync, real_replace = fileio._fsync, os.replace
    monkeypatch.setattr(fileio, "_fsync", lambda p: (synced.append(os.path.abspath(p)), real_fsync(p)))
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((str(a), str(b))), real_replace(a, b)))
    path = ckpt.save_task_checkpoint(tmp_path, 3, {"task": 3})
    folder = str(path.parent)
    assert [os.path.basename(b) for _, b in replaced] == ["task_03.pt", "last"]  # the file first, then its pointer
    assert synced.count(folder) == 2
    assert all(os.path.dirname(a) == folder and a in synced for a, _ in replaced)  # temp files beside, fsynced
    assert (path.parent / "last").read_text() == "task_03.pt\n"


def test_trainer_checks_that_the_global_batch_divides_over_the_ranks_first(tmp_path):
    cfg = make_config(optim__batch_size=33, output_dir=str(tmp_path / "run"), run__device="cpu")
    with pytest.raises(ConfigError, match="optim.batch_size=33 .*multiple of 2"):
        Trainer(cfg, dist=ddp.DistContext(rank=0, world_size=2, backend="gloo"), ddp_settings=ddp.DDPSettings())


# ----------------------------------------------------------------------------- settings from the environment

def test_ddp_settings_read_every_variable(monkeypatch):
    for key in ("SEGPCL_DDP_BUCKET_MB", "SEGPCL_DDP_GRAD_AS_BUCKET_VIEW", "SEGPCL_DDP_BACKEND", "SEGPCL_DDP_TIMEOUT_S"):
        monkeypatch.delenv(key, raising=False)
    assert ddp.DDPSettings.from_env() == ddp.DDPSettings(25.0, True, "auto", 1800)
    monkeypatch.setenv("SEGPCL_DDP_BUCKET_MB", "0.5")
    monkeypatch.setenv("SEGPCL_DDP_GRAD_AS_BUCKET_VIEW", "0")
    monkeypatch.setenv("SEGPCL_DDP_BACKEND", "gloo")
    monkeypatch.setenv("SEGPCL_DDP_TIMEOUT_S", "60")
    assert ddp.DDPSettings.from_env() == ddp.DDPSettings(0.5, False, "gloo", 60)
    for value, on in (("true", True), ("Yes", True), ("1", True), ("false", False), ("no", False)):
        monkeypatch.setenv("SEGPCL_DDP_GRAD_AS_BUCKET_VIEW", value)
        assert ddp.DDPSettings.from_env().gradient_as_bucket_view is on, value


def test_each_rank_takes_the_gpu_of_its_local_rank():
    """Multi-node: rank 9 of 16 is the second process on its node, so cuda:1 (not cuda:9)."""
    ctx = ddp.DistContext(rank=9, world_size=16, local_rank=1, backend="nccl")
    assert ctx.device("auto") == torch.device("cuda", 1) and ctx.device("cuda") == torch.device("cuda", 1)
    gloo = ddp.DistContext(rank=1, world_size=2, local_rank=1, backend="gloo")
    assert gloo.device("cpu") == torch.device("cpu")
    assert not ddp.DistContext().enabled and ddp.DistContext().is_main and not gloo.is_main


def test_gloo_on_a_gpu_machine_puts_each_rank_on_its_own_gpu(monkeypatch):
    """SEGPCL_DDP_BACKEND=gloo with run.device auto / cuda put every rank on cuda:0."""
    import torch.distributed as dist
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gloo = ddp.DistContext(rank=1, world_size=2, local_rank=1, backend="gloo")
    assert gloo.device("auto") == gloo.device("cuda") == torch.device("cuda", 1)
    assert gloo.device("cpu") == torch.device("cpu") and gloo.device("cuda:0") == torch.device("cuda", 0)
    set_to = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", set_to.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: None)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    ddp.DistContext.from_env(ddp.DDPSettings(backend="gloo"), device="auto")
    assert set_to == [1]


@pytest.mark.parametrize("device,backend", [("cpu", "gloo"), ("auto", "nccl"), ("cuda", "nccl")])
def test_auto_backend_is_gloo_for_run_device_cpu_even_with_gpus(monkeypatch, device, backend):
    """backend auto = nccl on CUDA, gloo on CPU: run.device=cpu on a GPU machine must not pick nccl."""
    import torch.distributed as dist
    chosen, cuda_device = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", cuda_device.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: chosen.append((backend, timeout)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda: chosen[-1][0])
    ctx = ddp.DistContext.from_env(ddp.DDPSettings(timeout_s=42), device=device)
    assert [b for b, _ in chosen] == [backend] and chosen[0][1].total_seconds() == 42
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend) == (1, 2, 1, backend)
    assert cuda_device == ([1] if backend == "nccl" else [])  # run.device=cpu: no GPU is touched


def test_single_process_without_world_size(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ddp.DistContext.from_env() == ddp.DistContext()


def test_eval_shards_partition_the_test_set():
    data = list(range(10))
    shards = [ddp.shard_dataset(data, ddp.DistContext(rank=r, world_size=3, backend="gloo")) for r in range(3)]
    items = [[s[i] for i in range(len(s))] for s in shards]
    assert items == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]  # strided, no padding, nothing dropped
    assert ddp.shard_dataset(data, ddp.DistContext()) is data


def test_compile_settings_from_env_and_their_torch_compile_options(monkeypatch):
    from segpcl_fast.engine import compiling
    monkeypatch.delenv("SEGPCL_COMPILE_MODE", raising=False)
    monkeypatch.delenv("SEGPCL_COMPILE_BATCH_MERGE", raising=False)
    monkeypatch.setenv("SEGPCL_COMPILE_BACKEND", "aot_eager")
    s = compiling.CompileSettings.from_env()
    assert (s.mode, s.backend) == ("default", "aot_eager")
    assert s.options() == {"backend": "aot_eager"}  # mode is an inductor option only
    merges = {"post_grad_fusion_options": {"batch_linear_post_grad": {"min_fuse_set_size": 2,
                                                                       "max_fuse_search_depth": 6}}}
    for mode in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):  # torch.compile's modes
        # without options of ours, the mode itself; with them (the LoRA merges batched, the default), torch.compile
        # takes a mode or options, not both: the mode's own options, then ours
        monkeypatch.setenv("SEGPCL_COMPILE_BATCH_MERGE", "0")
        assert compiling.CompileSettings(mode=mode).options() == {"backend": "inductor", "mode": mode}
        monkeypatch.delenv("SEGPCL_COMPILE_BATCH_MERGE")
        from torch._inductor import list_mode_options
        assert compiling.CompileSettings(mode=mode).options() == {
            "backend": "inductor", "options": {**list_mode_options(mode), **merges}}
        # a static image batch: no merges batched (the pass would stack activations too)
        assert compiling.CompileSettings(mode=mode, dynamic_batch=False).options() == {"backend": "inductor", "mode": mode}
    monkeypatch.setenv("SEGPCL_COMPILE_BATCH_MERGE", "0")
    assert compiling.CompileSettings(cpp_wrapper=True).options() == {
        "backend": "inductor", "options": {"cpp_wrapper": True}}
    monkeypatch.delenv("SEGPCL_COMPILE_BATCH_MERGE")
    assert compiling.CompileSettings(cpp_wrapper=True).options() == {
        "backend": "inductor", "options": {"cpp_wrapper": True, **merges}}
    autotune = compiling.CompileSettings(mode="max-autotune-no-cudagraphs", cpp_wrapper=True).options()["options"]
    assert autotune["max_autotune"] and autotune["cpp_wrapper"] and not autotune.get("triton.cudagraphs")
    for mode in ("reduce-overhead", "max-autotune"):  # inductor's C++ wrapper turns their CUDA graphs off
        with pytest.raises(ValueError, match=f"SEGPCL_COMPILE_CPP_WRAPPER=1 with compile mode '{mode}': "
                                             "inductor's C\\+\\+ wrapper runs without CUDA graphs"):
            compiling.CompileSettings(mode=mode, cpp_wrapper=True).options()
    assert compiling.CompileSettings(backend="aot_eager", cpp_wrapper=True).options() == {"backend": "aot_eager"}


def test_uncompile_restores_the_class_methods(tiny_model_name):
    from segpcl_fast.engine import compiling
    from segpcl_fast.model.clip import load_model
    model = load_model(tiny_model_name, pretrained=None)
    assert compiling.compile_model(model, compiling.CompileSettings(backend="eager")) == {
        "image": "CLIPModel.raw_features", "text": "CLIPModel.text_features"}
    assert compiling.is_compiled(model) and "text_features" in model.__dict__
    compiling.uncompile_model(model)
    assert not compiling.is_compiled(model) and "text_features" not in model.__dict__


@pytest.mark.parametrize("mode, cloned", [("reduce-overhead", True), ("max-autotune", True), ("default", False),
                                           ("max-autotune-no-cudagraphs", False)])
def test_cuda_graph_modes_hand_out_copies_of_the_towers_outputs(tiny_model_name, monkeypatch, mode, cloned):
    """Under a CUDA-graph mode a replay overwrites its previous outputs, and prototypes keep r(x) of
    every batch: each compiled tower's output must then be a copy, not the graph's own buffer.
    torch.compile is stood in for by a function returning one fixed buffer, as a replay would."""
    from segpcl_fast.engine import compiling
    from segpcl_fast.model.clip import load_model
    model = load_model(tiny_model_name, pretrained=None)
    buffers = {}  # compiled function's name: its one output buffer, rewritten by each replay

    def fake_compile(fn, **kwargs):
        def replay(*args, **kw):
            out = fn(*args, **kw).detach()
            return buffers.setdefault(fn.__qualname__, out.clone()).copy_(out)
        return replay
    monkeypatch.setattr(compiling.torch, "compile", fake_compile)
    compiling.compile_model(model, compiling.CompileSettings(mode=mode))
    with torch.no_grad():
        first = model.raw_features(torch.randn(2, 3, 32, 32))
        second = model.raw_features(torch.randn(2, 3, 32, 32))
    assert (first.data_ptr() != buffers["CLIPModel.raw_features"].data_ptr()) == cloned
    assert not torch.equal(first, second) if cloned else torch.equal(first, second)  # the kept one unchanged
    with torch.no_grad():  # one prompt a class, one chunk: class_embeddings returns the text graph's output
        text = model.class_embeddings([["a dog."], ["a cat."]])
        other = model.class_embeddings([["a red dog."], ["a small cat."]])
    assert text.shape[0] == 2
    assert (text.data_ptr() != buffers["CLIPModel.text_features"].data_ptr()) == cloned
    assert not torch.equal(text, other) if cloned else torch.equal(text, other)
    compiling.uncompile_model(model)


@pytest.mark.parametrize("mode, cloned", [("reduce-overhead", True), ("max-autotune", True), ("default", False)])
def test_cuda_graph_modes_hand_out_copies_of_the_loss_terms(tiny_model_name, monkeypatch, mode, cloned):
    """The compiled loss terms (compile_learner) under a CUDA-graph mode: the step's outcome keeps the
    loss and its parts past the next step's replay, so they must be copies of the graph's buffers.
    torch.compile is stood in for by functions writing into fixed buffers, as a replay would."""
    from segpcl_fast.config import Config
    from segpcl_fast.engine import compiling
    from segpcl_fast.engine.bench import build_step
    buffers = {}

    def fake_compile(fn, **kwargs):
        def replay(*args, **kw):
            out = fn(*args, **kw)
            if not isinstance(out, tuple):  # a tower
                return buffers.setdefault(fn.__qualname__, out.detach().clone()).copy_(out.detach())
            total, parts = out
            kept = buffers.setdefault("loss", (total.detach().clone(), {k: v.detach().clone() for k, v in parts.items()}))
            kept[0].copy_(total.detach())
            for k, v in parts.items():
                kept[1][k].copy_(v.detach())
            return kept
        return replay
    monkeypatch.setattr(compiling.torch, "compile", fake_compile)
    step = build_step(tiny_model_name, "cpu", 4, 5, 3, compile_settings=compiling.CompileSettings(mode=mode),
                      cfg=Config())
    learner = step.learner
    size = step.model.image_stats.size
    with torch.no_grad():
        first, first_parts = learner.loss(torch.randn(4, 3, size, size), torch.tensor([5, 6, 7, 5]))
        kept = (float(first), {k: float(v) for k, v in first_parts.items()})
        learner.loss(torch.randn(4, 3, size, size), torch.tensor([6, 6, 7, 7]))
    assert set(first_parts) == {"cls", "acgd", "gr"}
    assert (first.data_ptr() != buffers["loss"][0].data_ptr()) == cloned
    unchanged = float(first) == kept[0] and all(float(first_parts[k]) == v for k, v in kept[1].items())
    assert unchanged == cloned  # a buffer the second replay rewrote, where nothing copied it
    compiling.uncompile_model(step.model)


# ----------------------------------------------------------------------------- hardware presets

def test_preset_environments_and_launch_lines(monkeypatch):
    from segpcl_fast.engine import presets
    keys = {k for p in presets.PRESETS.values() for k in p.env}
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    presets.apply_preset(make_config(), "2x4090")
    assert {k: os.environ.get(k) for k in keys} == {
        "NCCL_P2P_DISABLE": "1", "NCCL_IB_DISABLE": "1", "SEGPCL_DDP_BUCKET_MB": "25",
        "SEGPCL_DDP_GRAD_AS_BUCKET_VIEW": "1", "SEGPCL_COMPILE_MODE": "max-autotune-no-cudagraphs"}
    assert ddp.DDPSettings.from_env().bucket_cap_mb * 2 ** 20 > 3.44e6 * 4  # every B gradient in one bucket
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    cfg = presets.apply_preset(make_config(), "1gpu")
    assert {k: os.environ.get(k) for k in keys if k in os.environ} == {
        "SEGPCL_COMPILE_MODE": "max-autotune-no-cudagraphs"}
    assert (cfg.run.device, cfg.run.precision, cfg.run.compile, cfg.optim.batch_size) == ("cuda", "bf16", True, 128)
    assert presets.get_preset("1gpu").launch_command("c10", "") == "python -m segpcl_fast.cli train --config c10 --hw 1gpu"
    assert presets.get_preset("2x4090").launch_command("c10", "--set a=1") == (
        "torchrun --standalone --nproc_per_node 2 -m segpcl_fast.cli train --config c10 --hw 2x4090 --set a=1")


def test_apply_preset_without_export_leaves_the_environment_alone(monkeypatch):
    from segpcl_fast.engine import presets
    for key in presets.PRESETS["2x4090"].env:
        monkeypatch.delenv(key, raising=False)
    before = dict(os.environ)
    cfg = presets.apply_preset(make_config(), "2x4090", export_env=False)
    assert dict(os.environ) == before and cfg.run.compile is True


def test_a_preset_yaml_must_be_partial(tmp_path, monkeypatch):
    from segpcl_fast.engine import presets
    monkeypatch.setattr(presets, "CONFIG_DIR", tmp_path)
    monkeypatch.setitem(presets.PRESETS, "tmp", presets.HardwarePreset(name="tmp", nproc_per_node=1))
    (tmp_path / "tmp.yaml").write_text("base: cifar100\noptim:\n  lr: 0.5\n")
    with pytest.raises(ConfigError, match="must be a partial config"):
        presets.apply_preset(make_config(), "tmp")
    (tmp_path / "tmp.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a partial config"):
        presets.preset_overrides("tmp")
    (tmp_path / "tmp.yaml").write_text("optim:\n  lr: 0.5\n")
    assert presets.apply_preset(make_config(), "tmp").optim.lr == 0.5


# ----------------------------------------------------------------------------- collectives (2 gloo processes)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives_worker(rank, world, port, result_file):
    from segpcl_fast.method.anchors import AnchorCache
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    ctx = ddp.DistContext.from_env(ddp.DDPSettings(backend="gloo"), device="cpu")
    try:
        out = {"ctx": [ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend]}
        out["counts"] = ddp.all_reduce_counts([(rank + 1, 10, 3), (2 * rank, 3, rank)], ctx, torch.device("cpu"))
        g = torch.Generator().manual_seed(5)
        made = AnchorCache(torch.randn(4, 3, 2, 2, generator=g), torch.tensor([0, 1, 1, 0]),
                           torch.randn(4, 2, generator=g), torch.randn(4, 6, generator=g).double(), source="seeds")
        got = ddp.broadcast_anchor_cache(made if rank == 0 else None, ctx, torch.device("cpu"))
        out["cache"] = {n: [str(getattr(got, n).dtype), getattr(got, n).tolist()] for n in AnchorCache._TENSORS}
        out["source"] = got.source
        out["cache_ok"] = all(torch.equal(getattr(got, n), getattr(made, n)) for n in AnchorCache._TENSORS)
        out["none"] = ddp.broadcast_anchor_cache(None, ctx, torch.device("cpu")) is None
        # sent through another device than its own (NCCL for CPU pixels): in pieces, whole at the end
        # (torch.device("cpu", 0) stands in for that other device: not equal to "cpu", and real here)
        ddp._comm_device, real_comm = (lambda c, like: torch.device("cpu", 0)), ddp._comm_device
        ddp.BROADCAST_CHUNK_BYTES, real_chunk = 40, ddp.BROADCAST_CHUNK_BYTES  # 10 fp32 values a piece
        try:
            big = torch.arange(37.0).view(37, 1) if rank == 0 else None
            sent = ddp.broadcast_tensor(big, ctx, torch.device("cpu"), to=torch.device("cpu"))
            out["chunked_ok"] = torch.equal(sent, torch.arange(37.0).view(37, 1)) and sent.device.type == "cpu"
        finally:
            ddp._comm_device, ddp.BROADCAST_CHUNK_BYTES = real_comm, real_chunk
        # the trainer's stage 1: built on rank 0 only, broadcast; one cache serving both uses stays one object
        calls = []

        def build(loader, seed):
            calls.append([loader, seed])
            return made, made
        stub = SimpleNamespace(learner=SimpleNamespace(_build_anchors=build), dist=ctx, device=torch.device("cpu"))
        Trainer._anchors_on_rank0(stub)
        acgd, transfer = stub.learner._build_anchors("loader", 7)
        out["build_calls"] = calls
        out["same_object"] = acgd is transfer
        out["built_ok"] = all(torch.equal(getattr(acgd, n), getattr(made, n)) for n in AnchorCache._TENSORS)
        # a check only rank 0 makes (its output dir) stops every rank: rank 1 raises rank 0's message, as an echo
        ddp.raise_on_every_rank(None, ctx)  # nothing to raise: no rank raises
        try:
            ddp.raise_on_every_rank(ConfigError("output dir x already holds a run") if rank == 0 else None, ctx)
        except ConfigError as e:
            out["raised"] = [str(e), getattr(e, "echo", False)]
        # a step each rank takes alike: any rank's failure stops every rank, and the job prints it once
        from segpcl_fast.data.base import DatasetFormatError
        ddp.raise_together(None, ctx)
        out["together"] = {}
        for case, errors in {"both_same": ["bad root", "bad root"], "rank1_only": [None, "bad file"],
                             "rank0_only": ["bad root", None], "different": ["bad root", "bad file"]}.items():
            try:
                mine = errors[rank]
                ddp.raise_together(None if mine is None else DatasetFormatError(mine), ctx)
                out["together"][case] = None
            except (DatasetFormatError, ConfigError) as e:
                out["together"][case] = [type(e).__name__, str(e), getattr(e, "echo", False)]
        try:  # a bug on one rank: rank 0 names its type ("rank 1: 'oops'" said nothing)
            ddp.raise_together(KeyError("oops") if rank == 1 else None, ctx)
        except (KeyError, ConfigError) as e:
            out["together"]["bug"] = [type(e).__name__, str(e), getattr(e, "echo", False)]
        with open(f"{result_file}.{rank}", "w") as f:
            json.dump(out, f)
    finally:
        ddp.destroy()


def test_collectives_sum_counts_and_broadcast_rank0s_anchors(tmp_path):
    mp.spawn(_collectives_worker, args=(2, _free_port(), str(tmp_path / "res")), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"res.{r}").read_text()) for r in range(2))
    assert r0["ctx"] == [0, 2, 0, "gloo"] and r1["ctx"] == [1, 2, 1, "gloo"]
    for r in (r0, r1):
        assert r["counts"] == [[3, 20, 6], [2, 6, 1]]  # element-wise sums over the ranks, in order
        assert r["source"] == "seeds" and r["cache_ok"] and r["none"] and r["chunked_ok"] and r["built_ok"] and r["same_object"]
        assert [r["cache"][n][0] for n in ("pixels", "targets", "teacher_logits", "teacher_raw")] == [
            "torch.float32", "torch.int64", "torch.float32", "torch.float64"]
    assert r0["cache"] == r1["cache"]
    assert (r0["build_calls"], r1["build_calls"]) == ([["loader", 7]], [])  # rank 0 only, task seed
    assert r0["raised"] == ["output dir x already holds a run", False]
    assert r1["raised"] == ["output dir x already holds a run", True]  # the CLI prints it from rank 0 only
    # raise_together: rank 0 prints the job's error (its own, else the first failing rank's, named); another
    # rank prints its own only where it differs from rank 0's (echo False)
    assert r0["together"] == {"both_same": ["DatasetFormatError", "bad root", False],
                              "rank1_only": ["ConfigError", "rank 1: bad file", False],
                              "rank0_only": ["DatasetFormatError", "bad root", False],
                              "different": ["DatasetFormatError", "bad root", False],
                              "bug": ["ConfigError", "rank 1: KeyError: 'oops'", False]}
    assert r1["together"] == {"both_same": ["DatasetFormatError", "bad root", True],
                              "rank1_only": ["DatasetFormatError", "bad file", True],
                              "rank0_only": ["ConfigError", "bad root", True],
                              "different": ["DatasetFormatError", "bad file", False],
                              "bug": ["KeyError", "'oops'", True]}


# ----------------------------------------------------------------------------- analytic FLOPs, bench

def _model_flops(tiny_model_name, targets, shape):
    from segpcl_fast.engine.flops import step_flops
    from segpcl_fast.model.clip import load_model
    from segpcl_fast.model.lora import inject_lora
    model = load_model(tiny_model_name, pretrained=None)
    inject_lora(model, rank=4, alpha=4.0, targets=targets)
    return step_flops(model, shape, count="model")


def test_model_count_charges_each_attention_slice_as_one_lora_linear(tiny_model_name):
    """count="model": adding the k slice next to q (everything downstream already needs gradients)
    adds, per block, one LoRA path d -> r -> d: forward 2·M·r·(d + d); backward dB 2·M·r·d, plus
    dU and dX 2·M·r·(d + d) where the block's input needs a gradient (block 2, not block 1)."""
    from segpcl_fast.engine.flops import StepShape
    shape = StepShape(n_images=3, n_anchors=2, n_prompts=5, text_len=7, n_cls_classes=2, n_old=2, tsgr_pairs=4)
    q = _model_flops(tiny_model_name, ["q"], shape)
    qk = _model_flops(tiny_model_name, ["q", "k"], shape)
    r = 4
    m_img, d_img = 5 * 17, 48  # (3 images + 2 anchors) x (4 x 4 patches + cls), width 48
    m_txt, d_txt = 5 * 7, 32

    def per_tower(m, d):
        fwd = 2 * (2 * m * r * (d + d))
        bwd = 2 * m * r * d + (2 * m * r * d + 2 * m * r * (d + d))
        return fwd, bwd
    (fi, bi), (ft, bt) = per_tower(m_img, d_img), per_tower(m_txt, d_txt)
    assert qk["image"] - q["image"] == fi + bi
    assert qk["text"] - q["text"] == ft + bt
    assert (qk["forward"] - q["forward"], qk["backward"] - q["backward"]) == (fi + ft, bi + bt)
    assert qk["losses"] == q["losses"]


def test_matmul_peak_is_two_n_cubed_over_the_best_time(monkeypatch):
    from segpcl_fast.engine import bench
    clock = iter([0.0, 0.5, 1.0, 1.25, 2.0, 3.0])  # three timed repeats: 0.5 s, 0.25 s, 1.0 s
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    assert bench.matmul_peak_flops("cpu", torch.float32, n=8, repeats=3) == pytest.approx(2 * 8 ** 3 / 0.25)


def test_bench_step_takes_no_more_anchors_than_its_pool(tiny_model_name):
    from segpcl_fast.config import Config
    from segpcl_fast.engine.bench import build_step
    cfg = Config()
    cfg.acgd.anchor_batch = 50
    step = build_step(tiny_model_name, "cpu", n_images=3, n_old=2, n_new=2, anchor_pool=4, cfg=cfg)
    assert step.shape.n_anchors == 4 == len(step.learner.anchor_cache)
    assert step.shape.n_cls_classes == 2  # optim.cls_over=current: the task's new classes
    cfg.optim.cls_over = "seen"
    seen = build_step(tiny_model_name, "cpu", n_images=3, n_old=2, n_new=2, anchor_pool=4, cfg=cfg)
    assert seen.shape.n_cls_classes == 4  # every seen class


def test_bench_step_under_fp16_scales_its_loss_and_counts_the_steps_its_scaler_skipped(tiny_model_name, monkeypatch):
    """The e2e benchmark's fp16_fused row: build_step's steps go through a GradScaler, as a task's do, and
    count the overflowed (skipped) ones. A start scale of 2^40 overflows fp16 at once, and each skip halves it."""
    from segpcl_fast.engine import bench
    scalers = []

    def huge_scale_scaler(device, *precisions):
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 40) if "fp16" in precisions else None
        scalers.append(scaler)
        return scaler
    monkeypatch.setattr(bench, "make_grad_scaler", huge_scale_scaler)
    step = bench.build_step(tiny_model_name, "cpu", n_images=3, n_old=2, n_new=2, anchor_pool=4, precision="fp16")
    assert scalers[0] is not None and step.skipped["fp16_skipped_steps"] == 0
    for _ in range(4):
        step()
    read = 3  # the 4th step's outcome is read by a 5th
    skipped = step.skipped["fp16_skipped_steps"]
    assert 1 <= skipped <= read
    # every skip halved the scale: 2^40 / 2^skipped after the 4 steps' update() calls, at most one more unread
    assert scalers[0].get_scale() in {2.0 ** (40 - skipped), 2.0 ** (40 - skipped - 1)}
    fp32 = bench.build_step(tiny_model_name, "cpu", n_images=3, n_old=2, n_new=2, anchor_pool=4)
    for _ in range(3):
        fp32()
    assert scalers[1] is None and fp32.skipped["fp16_skipped_steps"] == 0


# ----------------------------------------------------------------------------- evaluation, steps, resume

def test_evaluate_seen_restricts_each_tasks_own_space_to_its_classes():
    """Two tasks of two classes, evaluated after task 2: task 1's own space is classes 0-1, task 2's all four."""
    logits = torch.tensor([[1.0, 0.0, 5.0, 0.0],   # task 1, label 0: wrong among all (2), right among 0-1
                           [0.0, 2.0, 1.0, 0.0],   # task 1, label 1: right in both
                           [0.0, 1.0, 0.0, 3.0],   # task 1, label 0: wrong in both (own argmax 1)
                           [9.0, 0.0, 1.0, 0.0],   # task 2, label 2: wrong (0); own space is all 4 classes
                           [0.0, 0.0, 0.0, 1.0]])  # task 2, label 3: right
    sets = [torch.utils.data.TensorDataset(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 0])),
            torch.utils.data.TensorDataset(torch.tensor([3, 4]), torch.tensor([2, 3]))]
    tr = Trainer.__new__(Trainer)
    tr.cfg, tr.dist, tr.device = make_config(eval__batch_size=2), ddp.DistContext(), torch.device("cpu")
    tr.model = torch.nn.Module()  # no parameters: evaluation freezes none
    tr.scenario = SimpleNamespace(test_dataset=lambda j: sets[j], seen_classes=lambda j: list(range(2 * (j + 1))))
    tr.learner = SimpleNamespace(logits=lambda idx: logits[idx])
    assert Trainer.evaluate_seen(tr, 1) == [(1, 2, 3), (1, 1, 2)]
    assert Trainer.evaluate_seen(tr, 0) == [(1, 2, 3)]


def test_evaluation_runs_the_model_frozen_and_leaves_it_in_eval_mode_with_its_trainable_parameters():
    """Evaluation runs the model as stage 1's teacher does (eval mode, nothing requires grad: under
    torch.compile they share the no-grad graphs), then gives B its requires_grad back and leaves the
    model in eval mode, as evaluation always did."""
    model = torch.nn.Linear(2, 4)
    model.bias.requires_grad_(False)  # a frozen parameter stays frozen
    seen = []

    def logits(idx):
        seen.append((model.training, [p.requires_grad for p in model.parameters()]))
        return torch.zeros(len(idx), 4)
    tr = Trainer.__new__(Trainer)
    tr.cfg, tr.dist, tr.device = make_config(eval__batch_size=2), ddp.DistContext(), torch.device("cpu")
    tr.model = model.train()
    tr.scenario = SimpleNamespace(test_dataset=lambda j: torch.utils.data.TensorDataset(torch.arange(3),
                                                                                         torch.zeros(3).long()),
                                  seen_classes=lambda j: [0, 1])
    tr.learner = SimpleNamespace(logits=logits)
    Trainer.evaluate_seen(tr, 0)
    assert seen == [(False, [False, False])] * 2
    assert not model.training and [p.requires_grad for p in model.parameters()] == [True, False]


def test_evaluation_reads_its_counts_back_once_per_evaluation_not_per_batch_or_task(monkeypatch):
    """A read per batch makes the host wait for each batch's forward before queueing the next: the counts
    stay on the device and are read once at the end, whatever the batch and task counts."""
    logits = torch.randn(11, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 5, (11,), generator=torch.Generator().manual_seed(1))
    data = [torch.utils.data.TensorDataset(torch.arange(7), labels[:7]),
            torch.utils.data.TensorDataset(torch.arange(7, 11), labels[7:])]
    tr = Trainer.__new__(Trainer)
    tr.cfg, tr.dist, tr.device = make_config(eval__batch_size=3), ddp.DistContext(), torch.device("cpu")
    reads = []
    for name in ("__int__", "__float__", "__bool__", "item", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _n=name: reads.append(_n) or _real(self, *a))
    counts = Trainer._count_correct_local(tr, [(data[0], 3), (data[1], None)], lambda idx: logits[idx])
    monkeypatch.undo()
    # 3 + 2 batches of up to 3: one tolist at the end; the one .item() is the DataLoader's own (its base
    # seed, from a CPU generator, once per iterator)
    assert sorted(reads) == ["item", "tolist"]
    hit = logits.argmax(-1) == labels
    assert counts == [(int(hit[:7].sum()), int((logits[:7, :3].argmax(-1) == labels[:7]).sum()), 7),
                      (int(hit[7:].sum()), int(hit[7:].sum()), 4)]


def test_evaluation_starts_one_loader_and_batches_each_task_as_its_own_loader_did(monkeypatch):
    """Worker start-ups: one loader per evaluation, not one per seen task. The batches stay those of a
    loader per task (none spans two tasks' images, the last of each task may be short), so the logits,
    and the accuracy matrix, are what per-task loaders gave, bit for bit."""
    from segpcl_fast.engine import trainer as trainer_mod
    sizes = [7, 4, 6]
    sets = [torch.utils.data.TensorDataset(torch.arange(100 * j, 100 * j + n), torch.full((n,), j))
            for j, n in enumerate(sizes)]
    tr = Trainer.__new__(Trainer)
    tr.cfg, tr.dist, tr.device = make_config(eval__batch_size=3), ddp.DistContext(), torch.device("cpu")
    tr.model = torch.nn.Module()  # no parameters: evaluation freezes none
    tr.scenario = SimpleNamespace(test_dataset=lambda j: sets[j], seen_classes=lambda j: list(range(j + 1)))
    batches = []
    tr.learner = SimpleNamespace(logits=lambda idx: batches.append(idx.tolist()) or torch.zeros(len(idx), 3))
    loaders = []
    make = trainer_mod._eval_loader
    monkeypatch.setattr(trainer_mod, "_eval_loader", lambda *a, **kw: loaders.append(a) or make(*a, **kw))
    counts = Trainer.evaluate_seen(tr, 2)
    assert len(loaders) == 1
    per_task = [b.tolist() for ds in sets for (b, _) in torch.utils.data.DataLoader(ds, batch_size=3)]
    assert batches == per_task  # [0 1 2] [3 4 5] [6] [100 101 102] [103] [200 201 202] [203 204 205]
    assert [n for *_, n in counts] == sizes
    assert counts[0][:2] == (7, 7) and counts[1][:2] == counts[2][:2] == (0, 0)  # argmax 0 of zeros: label 0


def test_steps_per_task_are_epochs_times_batches_capped_by_max_steps(tiny_model_name, tmp_path):
    cfg = small_config(tiny_model_name, tmp_path / "run", method="lora_finetune", epochs=2, optim__batch_size=8,
                       checkpoint=False, num_tasks=10)
    trainer = Trainer(cfg)
    n = [len(trainer.scenario.train_dataset(t)) for t in range(3)]
    assert min(n) > 8  # several batches per epoch
    assert trainer.train_task(0)["timings"]["steps"] == 2 * math.ceil(n[0] / 8)
    trainer.cfg.run.max_steps_per_task = 2  # a cap inside the first epoch
    assert trainer.train_task(1)["timings"]["steps"] == 2
    trainer.cfg.run.max_steps_per_task, trainer.cfg.optim.epochs = 1000, 1  # a cap above the task's steps
    assert trainer.train_task(2)["timings"]["steps"] == math.ceil(n[2] / 8)


def test_a_task_trains_from_one_loader_iterator_each_epoch_seeing_every_image_once(tiny_model_name, tmp_path,
                                                                                   monkeypatch):
    """Workers start once per task (one iterator over all epochs; a new one per epoch restarts them
    and stalls for a whole batch), and each epoch still visits each of the task's images once."""
    from segpcl_fast.engine import trainer as trainer_mod
    cfg = small_config(tiny_model_name, tmp_path / "run", method="lora_finetune", epochs=3, optim__batch_size=8,
                       checkpoint=False, num_tasks=10, num_workers=1, train_augment=False)
    trainer = Trainer(cfg)
    iterators, seen = [], []
    make_loader = trainer_mod._train_loader

    def counting_loader(*args, **kw):
        loader = make_loader(*args, **kw)
        original_iter = type(loader).__iter__
        iterators.append(0)

        class Counted(type(loader)):
            def __iter__(self):
                iterators[-1] += 1
                return original_iter(self)
        loader.__class__ = Counted
        return loader
    monkeypatch.setattr(trainer_mod, "_train_loader", counting_loader)
    original_step = Trainer.train_step

    def record(self, optimizer, images, labels, *rest):
        seen.append(labels.tolist())
        return original_step(self, optimizer, images, labels, *rest)
    monkeypatch.setattr(Trainer, "train_step", record)
    trainer.train_task(0)
    n = len(trainer.scenario.train_dataset(0))
    per_epoch = math.ceil(n / 8)
    assert iterators == [1] and len(seen) == 3 * per_epoch
    task_labels = sorted(trainer.scenario.train_dataset(0).targets)
    for e in range(3):
        assert sorted(sum(seen[e * per_epoch:(e + 1) * per_epoch], [])) == task_labels
    assert seen[:per_epoch] != seen[per_epoch:2 * per_epoch]  # reshuffled each epoch


def test_stage_one_loader_is_not_pinned_the_evaluation_loader_is(tiny_model_name, tmp_path, monkeypatch):
    """Stage 1 keeps a whole task's images on the CPU; pinned, torch's pinned-memory cache would keep
    them page-locked (rounded up to powers of two) after the task. Stage 3's and evaluation's batches
    stream to the device: pinned, where the device is a GPU (Trainer.pin). A CPU run pins nothing (on a GPU
    host, pinning started a CUDA context per rank for nothing)."""
    from segpcl_fast.engine import trainer as trainer_mod
    ds = TensorDataset(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))
    cfg = make_config()
    assert trainer_mod._eval_loader(ds, 2, cfg, pin=True).pin_memory is True
    assert trainer_mod._eval_loader(ds, 2, cfg).pin_memory is False
    pins = []
    make = trainer_mod._eval_loader

    def record(dataset, batch_size, cfg, pin=False, **kw):
        pins.append(pin)
        return make(dataset, batch_size, cfg, False, **kw)  # no GPU here to pin for
    monkeypatch.setattr(trainer_mod, "_eval_loader", record)
    trainer = Trainer(small_config(tiny_model_name, tmp_path / "run", checkpoint=False, num_tasks=10))
    assert trainer.pin is False  # run.device cpu
    trainer.train_task(0)
    trainer.evaluate_seen(0)
    assert pins == [False, False, False]
    pins.clear()
    monkeypatch.setattr(trainer_mod.Trainer, "pin", property(lambda self: True))  # as on run.device=cuda
    trainer.train_task(1)
    assert pins == [False, True]  # stage 1 (kept), stage 3 (streamed to the device for the prototypes)
    trainer.evaluate_seen(1)
    assert pins == [False, True, True]


def test_forward_transfer_predicts_among_all_the_benchmarks_classes(tiny_model_name, tmp_path, monkeypatch):
    """method.md: FWT is the CLIP path's accuracy on task j before training it, predicting among all
    classes of the benchmark (not the classes seen so far); labels are positions in the class order."""
    from segpcl_fast.method.learner import Learner
    trainer = Trainer(small_config(tiny_model_name, tmp_path / "run", checkpoint=False, num_tasks=10))
    texts = []
    clip_logits = Learner.clip_logits
    monkeypatch.setattr(Learner, "clip_logits", lambda self, x, text: texts.append(text) or clip_logits(self, x, text))
    fwt = trainer.forward_transfer(1)
    n_classes = trainer.scenario.num_classes
    assert texts and all(text.shape[0] == n_classes > len(trainer.scenario.seen_classes(1)) for text in texts)
    with torch.no_grad():
        want = trainer.model.class_embeddings(trainer.prompts, device=trainer.device)
    torch.testing.assert_close(texts[0], want)
    correct = total = 0
    for images, labels in torch.utils.data.DataLoader(trainer.scenario.test_dataset(1), batch_size=64):
        with torch.no_grad():
            correct += int((clip_logits(trainer.learner, images, want).argmax(-1) == labels).sum())
        total += len(labels)
    assert fwt == pytest.approx(100.0 * correct / total)


def test_resume_restores_the_trained_state_and_the_task_log(tiny_model_name, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original = Trainer.train_task
    run_cases.crash_at_task(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(tiny_model_name, out, lr=0.05))
    saved = torch.load(ckpt.checkpoint_path(out, 0), weights_only=True)
    assert any(float(v.abs().sum()) > 0 for k, v in saved["lora"].items() if "lora_B" in k)

    at_resume = {}

    def capture(self, t):  # the state the resumed run starts task 2 from
        at_resume.update(t=t, lora={k: v.clone() for k, v in self.model.state_dict().items() if "lora_" in k},
                         learner=self.learner.state_dict())
        return original(self, t)
    monkeypatch.setattr(Trainer, "train_task", capture)
    result = train(small_config(tiny_model_name, out, lr=0.05, resume=True))
    assert at_resume["t"] == 1
    assert at_resume["lora"].keys() == saved["lora"].keys()
    assert all(torch.equal(at_resume["lora"][k], v) for k, v in saved["lora"].items())
    assert at_resume["learner"]["n_seen"] == saved["learner"]["n_seen"] > 0
    torch.testing.assert_close(at_resume["learner"]["prototypes"], saved["learner"]["prototypes"])
    assert len(result.timings["tasks"]) == 2  # task 1's log comes from the checkpoint
    assert json.loads((out / "results.json").read_text())["timings"]["tasks"][0] == saved["task_info"][0]["timings"]

    # the checkpoint's classes in another order: refused on resume (logit column c is class c)
    state = torch.load(ckpt.checkpoint_path(out, 0), weights_only=True)
    state["class_names"] = list(reversed(state["class_names"]))
    ckpt.save_task_checkpoint(out, 0, state)
    (out / "results.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="other classes than data.root now holds"):
        train(small_config(tiny_model_name, out, lr=0.05, resume=True))


def test_an_overwrite_that_dies_early_leaves_no_pointer_to_the_old_run(tiny_model_name, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(small_config(tiny_model_name, out, num_tasks=2, method="lora_finetune"))
    assert ckpt.find_last_checkpoint(out).name == "task_01.pt"

    run_cases.crash_at_task(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(tiny_model_name, out, num_tasks=2, method="lora_finetune", run__overwrite=True))
    assert ckpt.find_last_checkpoint(out) is None  # a --resume now starts at task 1, it does not fail
    assert not list((out / ckpt.CHECKPOINT_DIR).glob("task_*.pt"))


@pytest.mark.parametrize("targets,towers,n_old,n_new", [
    (["out"], ["visual", "text"], 2, 2), (["c_proj"], ["visual", "text"], 2, 2),
    (["c_proj"], ["visual"], 0, 1), (["c_fc"], ["text"], 0, 1),  # one tower frozen, no TSGR pairs
    (["c_proj"], ["visual"], 2, 2), (["c_fc"], ["text"], 2, 2)])  # one tower frozen, TSGR pairs text . text
def test_analytic_flops_match_the_flop_counter_for_single_targets_and_towers(tiny_model_name, targets, towers,
                                                                            n_old, n_new):
    """A LoRA only on out_proj or c_proj still makes everything downstream need gradients; with one
    tower frozen its projection and the logits' operand from it need no backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from segpcl_fast import ops
    from segpcl_fast.config import Config
    from segpcl_fast.engine.bench import build_step
    from segpcl_fast.engine.flops import step_flops
    cfg = Config()
    cfg.lora.rank, cfg.lora.targets, cfg.lora.towers = 4, targets, towers
    step = build_step(tiny_model_name, "cpu", n_images=3, n_old=n_old, n_new=n_new, cfg=cfg)
    with ops.backend("reference"), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step()
    assert counter.get_total_flops() == step_flops(step.model, step.shape, count="executed")["total"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_step_outcome_is_copied_ahead_and_read_after_its_event():
    """On a GPU the outcome is copied to pinned memory behind the step and read after its event (a
    stream-ordered .item() would wait for every kernel queued since); the values and errors are the
    synchronous path's."""
    from segpcl_fast.engine.step_outcome import StepOutcome
    cuda = dict(device="cuda")
    parts = {"cls": torch.tensor(1.5, **cuda), "gr": torch.tensor(0.25, **cuda)}
    done = StepOutcome(3, 0, parts, parts["cls"] + parts["gr"], torch.tensor(2.0, **cuda), copy_ahead=True)
    assert done._event is not None and done._host.is_pinned()
    assert done.values(make_config()) == {"cls": 1.5, "gr": 0.25}
    nan = torch.tensor(float("nan"), **cuda)
    bad = StepOutcome(4, 0, {"cls": nan}, nan, torch.tensor(1.0, **cuda), copy_ahead=True)
    with pytest.raises(FloatingPointError, match="loss is nan at task 1, step 4"):
        bad.values(make_config())


# ----------------------------------------------------------------------------- audit since 7a90c2d

@pytest.mark.parametrize("key, value", [("run.tensorboard", True), ("run.tf32", True)])
def test_run_tensorboard_and_tf32_are_run_only_so_a_resume_may_turn_them_on(tmp_path, key, value):
    """run.tensorboard and run.tf32 (added since 7a90c2d) are run-only keys: a run checkpointed without them
    resumes with them on (its fingerprint and the config diff ignore them)."""
    from segpcl_fast.config import Config
    before = Config().to_dict()
    now = Config().to_dict()
    section, name = key.split(".")
    now[section][name] = value
    assert key in ckpt.RUN_ONLY_KEYS
    assert ckpt.config_fingerprint(now) == ckpt.config_fingerprint(before)
    assert ckpt.config_diff(before, now) == {}
    path = ckpt.save_checkpoint(tmp_path / "task_00.pt", {"task": 0, "fingerprint": ckpt.config_fingerprint(before),
                                                          "config": before})
    state = ckpt.load_checkpoint(path, ckpt.config_fingerprint(now), now, defaults=Config().to_dict())
    assert state["task"] == 0


def test_scaler_skips_warn_past_a_quarter_of_the_steps_and_count_only_overflows_in_a_row():
    """ScalerSkips.warning: exactly a quarter of a task's steps skipped is not warned about, one more is;
    a step that did not overflow ends the run of overflows in a row but not the total."""
    from segpcl_fast.engine.step_outcome import ScalerSkips, StepOutcome
    skips = ScalerSkips()
    skips.total = 2
    assert skips.warning(0, 8) is None  # 2 of 8: exactly 25 %
    skips.total = 3
    said = skips.warning(2, 8)
    assert said is not None and said.startswith("task 3: 3 of its 8 steps overflowed")
    skips = ScalerSkips()
    cfg = make_config(precision="fp16")
    scaler = SimpleNamespace(get_scale=lambda: 1.0)

    def outcome(norm):
        done = StepOutcome(0, 0, {"cls": torch.tensor(0.5)}, torch.tensor(0.5), torch.tensor(norm), scaled=True)
        return done, done.values(cfg)
    for norm in (float("inf"), float("inf"), 1.0, float("inf")):
        done, parts = outcome(norm)
        skips.note(done, parts, 0, 0, cfg, scaler)
    assert (skips.total, skips.in_a_row) == (3, 1)


def test_a_scaled_outcome_raises_for_another_ranks_bad_loss_and_skips_its_own_overflow():
    """Under a loss scaler on torchrun (any_loss_bad: ddp.any_rank of every rank's loss_nonfinite), a finite
    step on this rank raises when another rank's loss was not finite; with every loss finite, non-finite
    gradients are an overflow: skipped, not raised."""
    from segpcl_fast.engine.step_outcome import StepOutcome, loss_nonfinite
    cfg = make_config()
    parts = {"cls": torch.tensor(0.5)}
    other_bad = StepOutcome(5, 1, parts, torch.tensor(0.5), torch.tensor(float("inf")), scaled=True,
                            any_loss_bad=torch.tensor(1.0))
    assert other_bad.nonfinite(gradients=False).item() == 1.0
    with pytest.raises(FloatingPointError, match=r"another rank's loss was not finite at task 2, step 5 .*L_CLS=0.5"):
        other_bad.values(cfg)
    fine = StepOutcome(5, 1, parts, torch.tensor(0.5), torch.tensor(float("inf")), scaled=True,
                       any_loss_bad=loss_nonfinite(torch.tensor(0.5), torch.device("cpu")))
    assert fine.nonfinite(gradients=False).item() == 0.0 and fine.overflow().item() == 1.0
    assert fine.values(cfg) == {"cls": 0.5} and fine.overflowed


def test_a_task_file_holding_another_task_is_refused_and_its_own_loads(tmp_path):
    """checkpoints/task_NN.pt must hold task NN (0-based): task 0's state under task_01.pt (a copy or a rename
    by hand) is refused naming both tasks 1-based; under its own name it loads, as does any other file name."""
    state = {"task": 0, "lora": {"w": torch.ones(2)}}
    ckpt.save_checkpoint(tmp_path / "task_00.pt", state)
    assert ckpt.load_checkpoint(tmp_path / "task_00.pt")["task"] == 0
    ckpt.save_checkpoint(tmp_path / "task_01.pt", state)
    with pytest.raises(ckpt.CheckpointError, match=r"task_01.pt holds task 1 \(1-based\), not task 2 as its name says"):
        ckpt.load_checkpoint(tmp_path / "task_01.pt")
    ckpt.save_checkpoint(tmp_path / "copy.pt", state)
    assert ckpt.load_checkpoint(tmp_path / "copy.pt")["task"] == 0
    assert (ckpt.task_of_file("task_07.pt"), ckpt.task_of_file("task_7.pt.tmp"), ckpt.task_of_file("last")) == (7, None, None)


@pytest.mark.parametrize("precisions, scaled", [(("fp32", "fp16"), True), (("fp16", "fp32"), True),
                                                (("bf16", "fp32"), False), (("fp32", "bf16"), False)])
def test_either_tower_under_fp16_gets_a_loss_scaler(precisions, scaled):
    """make_grad_scaler(device, run.precision, run.text_precision): a scaler (GradScaler's 2^16 start) where
    either tower trains under fp16 autocast, the text tower alone included; none for fp32 / bf16."""
    from segpcl_fast.engine.step_outcome import make_grad_scaler
    scaler = make_grad_scaler(torch.device("cpu"), *precisions)
    assert (scaler is not None) == scaled
    if scaled:
        assert scaler.get_scale() == 65536.0


def test_compile_switches_from_env_default_and_refuse_anything_but_0_or_1(monkeypatch):
    """SEGPCL_COMPILE_DYNAMIC_BATCH / _LOSS default to 1, SEGPCL_COMPILE_CPP_WRAPPER to 0; each is read as
    0 or 1, and any other value (an empty one included) is one ValueError naming the variable."""
    from segpcl_fast.engine import compiling
    names = ("SEGPCL_COMPILE_DYNAMIC_BATCH", "SEGPCL_COMPILE_LOSS", "SEGPCL_COMPILE_CPP_WRAPPER")
    for name in names + ("SEGPCL_COMPILE_MODE", "SEGPCL_COMPILE_BACKEND", "SEGPCL_COMPILE_BATCH_MERGE"):
        monkeypatch.delenv(name, raising=False)
    s = compiling.CompileSettings.from_env()
    assert (s.dynamic_batch, s.loss, s.cpp_wrapper) == (True, True, False)
    for name in names:
        monkeypatch.setenv(name, "0")
    s = compiling.CompileSettings.from_env()
    assert (s.dynamic_batch, s.loss, s.cpp_wrapper) == (False, False, False)
    monkeypatch.setenv("SEGPCL_COMPILE_CPP_WRAPPER", "1")
    assert compiling.CompileSettings.from_env().cpp_wrapper is True
    for name in names:
        for bad in ("", "true", "2"):
            monkeypatch.setenv(name, bad)
            with pytest.raises(ValueError, match=f"{name}={bad!r}: use 1 .* or 0 "):
                compiling.CompileSettings.from_env()
            monkeypatch.setenv(name, "0")


def test_a_peer_ranks_error_is_said_as_its_own_message_or_a_bugs_with_its_type():
    """ddp._as_said: a user error (ConfigError, CheckpointError, ...) and an OSError are said as their own message,
    a bug (KeyError) with its type, as rank 0 prints another rank's error."""
    assert ddp._as_said(ConfigError("data.num_tasks=3 does not divide")) == "data.num_tasks=3 does not divide"
    assert ddp._as_said(ckpt.CheckpointError("gone")) == "gone"
    assert ddp._as_said(PermissionError(13, "Permission denied", "/run")) == "[Errno 13] Permission denied: '/run'"
    assert ddp._as_said(FileNotFoundError(2, "No such file or directory", "x")) == \
        "[Errno 2] No such file or directory: 'x'"
    assert ddp._as_said(KeyError("oops")) == "KeyError: 'oops'"
    assert ddp._as_said(ValueError("v")) == "ValueError: v"


@pytest.mark.parametrize("version, before", [("2.7.1+cu126", True), ("2.8.0", False), ("2.8.0a0+git", False),
                                             ("2.14.1", False), ("1.13.1", True)])
def test_torch_before_compares_major_minor(monkeypatch, version, before):
    """distributed._torch_before(2, 8): the gloo teardown barrier is for torch < 2.8 only (2.8 itself excluded)."""
    monkeypatch.setattr(torch, "__version__", version)
    assert ddp._torch_before(2, 8) is before


def test_reading_a_scaled_overflow_keeps_a_later_nan_loss_steps_skip_sticky():
    """Fused SGD under a loss scaler: an overflow (finite loss) read after a NaN-loss step was queued must not
    clear that step's sticky skip flag (only an outcome that raises does), so the step queued after the NaN one
    is skipped too and the weights at the raise are those before the bad step."""
    from segpcl_fast.engine.step_outcome import make_grad_scaler
    torch.manual_seed(4)
    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    w = torch.nn.Parameter(torch.randn(3))
    tr = _stub_trainer(w, sync=False)
    opt = _fused_sgd(w, lr=0.1, momentum=0.9)
    scaler = make_grad_scaler(torch.device("cpu"), "fp16")
    Trainer.train_step(tr, opt, x, y, 0.1, 0, 0, 4, scaler).values(tr.cfg)
    before = w.detach().clone()
    tr.learner = _PoisonedLearner(w, bad_from=0, nan_loss=False)
    overflow = Trainer.train_step(tr, opt, x, y, 0.1, 1, 0, 4, scaler)
    tr.learner = _PoisonedLearner(w, bad_from=0, nan_loss=True)
    nan = Trainer.train_step(tr, opt, x, y, 0.1, 2, 0, 4, scaler)
    assert overflow.values(tr.cfg) == {"cls": 0.0} and overflow.overflowed  # read: raises nothing
    tr.learner = _LinearLearner(w)
    queued = Trainer.train_step(tr, opt, x, y, 0.1, 3, 0, 4, scaler)
    assert torch.equal(w.detach(), before)  # queued before the NaN step was read: skipped
    with pytest.raises(FloatingPointError, match="loss is nan at task 1, step 2"):
        nan.values(tr.cfg)
    assert queued.values(tr.cfg)["cls"] > 0


def test_a_resume_is_of_a_finished_run_when_its_last_checkpoint_is_the_last_tasks(tmp_path):
    """trainer.resumes_a_finished_run: --resume of a run with results.json, or whose newest checkpoint is its last
    task's (task_02.pt of 3 tasks, results.json deleted), trains nothing; one short of that, or no --resume, trains."""
    from segpcl_fast.engine.trainer import resumes_a_finished_run
    cfg = make_config(num_tasks=3, output_dir=str(tmp_path), resume=True)
    folder = tmp_path / ckpt.CHECKPOINT_DIR
    folder.mkdir()
    assert not resumes_a_finished_run(cfg)  # no checkpoint yet
    (folder / "task_01.pt").write_bytes(b"")
    assert not resumes_a_finished_run(cfg)  # task 3 of 3 still to train
    (folder / "task_02.pt").write_bytes(b"")
    assert resumes_a_finished_run(cfg)
    assert not resumes_a_finished_run(make_config(num_tasks=3, output_dir=str(tmp_path)))
    assert not resumes_a_finished_run(make_config(num_tasks=4, output_dir=str(tmp_path), resume=True))
    (folder / "task_02.pt").unlink()
    (tmp_path / "results.json").write_text("{}")
    assert resumes_a_finished_run(cfg)


def test_results_timings_and_run_record_of_a_resume_and_of_a_rebuilt_run():
    """results.json "timings": a resume's run_s counts from its first trained task (run_s_from_task, 1-based);
    a run whose results are rebuilt from checkpoints (start == T) has no run_s. "run": a rebuilt record takes
    the world size of the last task that recorded one and names no device."""
    from segpcl_fast.engine.trainer import _run_timings
    tasks = [{"steps": 1}, {"steps": 2}, {"steps": 3}]
    assert _run_timings(9.5, tasks, 0, 3) == {"run_s": 9.5, "tasks": tasks}
    assert _run_timings(9.5, tasks, 2, 3) == {"run_s": 9.5, "tasks": tasks, "run_s_from_task": 3}
    assert _run_timings(9.5, tasks, 3, 3) == {"tasks": tasks, "rebuilt_from_checkpoints": True}
    tr = SimpleNamespace(dist=ddp.DistContext(rank=0, world_size=1, backend=None), device=torch.device("cpu"))
    infos = [{"world_size": 2}, {"world_size": 4}, {}]
    assert Trainer._run_record(tr, infos, trained=False) == {"world_size": 4, "world_size_per_task": [2, 4, None]}
    assert Trainer._run_record(tr, infos, trained=True) == {"world_size": 1, "device": "cpu",
                                                            "world_size_per_task": [2, 4, None]}


def test_a_saved_config_neither_resumes_nor_overwrites():
    """config.yaml and results.json keep the run's config without the actions run.resume / run.overwrite."""
    from segpcl_fast.engine.trainer import _as_saved
    saved = _as_saved(make_config(resume=True, run__overwrite=True, lr=0.25))
    assert (saved.run.resume, saved.run.overwrite, saved.optim.lr) == (False, False, 0.25)


def test_an_earlier_runs_files_are_named_three_at_most():
    from segpcl_fast.engine.trainer import refuse_earlier_run
    from pathlib import Path
    refuse_earlier_run(Path("out"), [])
    three = [Path("results.json"), Path("task_00.pt"), Path("task_01.pt")]
    with pytest.raises(ConfigError, match=r"already holds a run \(results.json, task_00.pt, task_01.pt\): continue"):
        refuse_earlier_run(Path("out"), three)
    with pytest.raises(ConfigError, match=r"\(results.json, task_00.pt, task_01.pt, ...\): continue"):
        refuse_earlier_run(Path("out"), three + [Path("task_02.pt")])


def test_the_learned_fraction_is_the_lowest_of_the_tasks_so_far():
    tr = SimpleNamespace(_learned_cls_fraction=None)
    for info in ({"cls_chance_fraction": 0.4}, {}, {"cls_chance_fraction": 0.0}, {"cls_chance_fraction": 0.7}):
        Trainer._note_learned(tr, info)
    assert tr._learned_cls_fraction == 0.0
    tr = SimpleNamespace(_learned_cls_fraction=None)
    for info in ({"cls_chance_fraction": 0.4}, {"cls_chance_fraction": 0.9}):
        Trainer._note_learned(tr, info)
    assert tr._learned_cls_fraction == 0.4


def test_a_resume_on_the_world_size_its_tasks_trained_on_says_nothing(caplog):
    """_warn_other_world_size: no warning at all when every finished task trained on this resume's process
    count; tasks trained on several counts are named, each once, sorted."""
    for infos, world, said in [([{"world_size": 2}, {"world_size": 2}], 2, None),
                               ([{"world_size": 2}, {"world_size": 1}], 2, "trained on 1/2 process(es)"),
                               ([{"world_size": 2}, {"world_size": 2}], 1, "trained on 2 process(es)")]:
        fake = SimpleNamespace(dist=SimpleNamespace(is_main=True, world_size=world))
        caplog.clear()
        with caplog.at_level("WARNING", logger="segpcl_fast.engine"):
            Trainer._warn_other_world_size(fake, infos, 2, 3)
        if said is None:
            assert caplog.records == []
        else:
            assert len(caplog.records) == 1 and said in caplog.text and "tasks 3..3 on" in caplog.text


def test_one_process_raises_its_own_error_through_raise_together_and_failing_together():
    """Without torchrun, raise_together and failing_together raise the error as it is (no collective) and
    return when there is none."""
    one = ddp.DistContext(rank=0, world_size=1, backend=None)
    error = ckpt.CheckpointError("refused")
    with pytest.raises(ckpt.CheckpointError) as caught:
        ddp.raise_together(error, one)
    assert caught.value is error
    assert ddp.raise_together(None, one) is None
    with pytest.raises(KeyError, match="oops"):
        with ddp.failing_together(one):
            raise KeyError("oops")
    with ddp.failing_together(one):
        done = True
    assert done
