"""Checks added by a mutation audit of engine/distributed.py and engine/bench.py: each test here fails
on a small semantic change (a mutant) of that code which the rest of tests/ let through, and passes on
the code as it is. No process group: the torch.distributed calls are stood in for by recording fakes
(a peer rank's contribution is a known tensor), so what each helper sends, where and in which order is
checked exactly in one process (the 2-rank gloo runs themselves are in test_distributed.py and
test_engine_mutants.py).

Covered:
- settings and context: the lowest accepted SEGPCL_DDP_* values, a single process on a GPU machine
  (plain "cuda", not a rank's cuda:i), a process group set up outside the package (its rank, world
  size and LOCAL_RANK; NCCL's current GPU set to LOCAL_RANK), an explicit nccl backend taking the
  rank's GPU, refuse_multi_process counting such a group, every lost-peer marker alone;
- errors over ranks: raise_on_every_rank broadcasting through the rank's GPU under NCCL, rank 0 raising
  its own error, others an echo; raise_together gathering under the rank's GPU, naming the FIRST failing
  rank over three; failing_together handing its error to the gather; _as_said for every user error
  (and a subclass of one); destroy() without a group;
- data: local_batch_size an int, the unshuffled sampler (in order, generator untouched);
- collectives: _comm_device, any_rank (MAX, on a copy: the rank's own flag kept), broadcast_tensor
  (whole where the backend's device is the tensor's, else in BROADCAST_CHUNK_BYTES pieces sized by the
  element size, received pieces copied in, a non-contiguous tensor sent in its logical order),
  broadcast_anchor_cache placing each tensor where rank 0 keeps it;
- LoRAGradSync: frozen parameters left out, a parameter over the cap alone in its bucket (no empty
  bucket), buckets in the parameters' dtype, views partitioning each flat bucket, a bucket launched only
  once all its gradients are in and every ready bucket launched in order from one hook, the average over
  the ranks left in .grad with and without gradient_as_bucket_view, buckets zeroed every step, remove();
- bench: class_names' hand values, build_step seeded, the text precision, frozen weight storage,
  learner's old / new counts, the anchor pool (k_seed x old classes, old-class targets), labels among
  the new classes, train mode, n_prompts over several templates, a step reading the previous step's
  outcome (raising on its NaN loss), matmul_peak_flops' dtype and size.
"""
import contextlib
from types import SimpleNamespace

import pytest
import torch

from segpcl_fast.config import ConfigError
from segpcl_fast.engine import distributed as ddp

# ----------------------------------------------------------------------------- settings and context


def test_ddp_settings_accept_their_lowest_values(monkeypatch):
    """The bounds are inclusive (">= 1", ">= 0.001" as the messages say); infinity is no number."""
    monkeypatch.setenv("SEGPCL_DDP_TIMEOUT_S", "1")
    monkeypatch.setenv("SEGPCL_DDP_BUCKET_MB", "0.001")
    s = ddp.DDPSettings.from_env()
    assert (s.timeout_s, s.bucket_cap_mb) == (1, 0.001) and isinstance(s.timeout_s, int)
    monkeypatch.setenv("SEGPCL_DDP_BUCKET_MB", "inf")
    with pytest.raises(ConfigError, match="SEGPCL_DDP_BUCKET_MB='inf' is not a number"):
        ddp.DDPSettings.from_env()


def test_one_process_on_a_gpu_machine_takes_plain_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    one = ddp.DistContext()
    assert one.device("auto") == torch.device("cuda") and one.device("cuda") == torch.device("cuda")
    assert one.device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert one.device("auto") == torch.device("cpu")


def _fake_group(monkeypatch, initialized, rank=0, world=2, backend="gloo"):
    import torch.distributed as dist
    made, set_to = [], []
    monkeypatch.setattr(dist, "is_initialized", lambda: initialized or bool(made))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: made.append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda: rank)
    monkeypatch.setattr(dist, "get_world_size", lambda: world)
    monkeypatch.setattr(dist, "get_backend", lambda: made[-1] if made else backend)
    monkeypatch.setattr(torch.cuda, "set_device", set_to.append)
    return made, set_to


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_a_group_set_up_outside_the_package_is_joined_as_it_is(monkeypatch, backend):
    """No WORLD_SIZE in the environment (the caller made the group): the context is the group's, its
    local rank LOCAL_RANK (rank 3 of 4 is the second process of its node); NCCL's current GPU is made
    the rank's own (its object collectives serialise through it)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    made, set_to = _fake_group(monkeypatch, True, rank=3, world=4, backend=backend)
    ctx = ddp.DistContext.from_env()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend) == (3, 4, 1, backend)
    assert made == [] and set_to == ([1] if backend == "nccl" else [])


def test_an_explicit_nccl_backend_takes_the_ranks_gpu_and_needs_cuda(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    made, set_to = _fake_group(monkeypatch, False, rank=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ctx = ddp.DistContext.from_env(ddp.DDPSettings(backend="nccl"), device="cuda:1")
    assert made == ["nccl"] and set_to == [1] and ctx.backend == "nccl"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    made.clear()
    with pytest.raises(ConfigError, match="SEGPCL_DDP_BACKEND=nccl needs CUDA devices"):
        ddp.DistContext.from_env(ddp.DDPSettings(backend="nccl"), device="cpu")
    assert made == []


def test_an_analysis_refuses_a_group_set_up_outside_the_package(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _fake_group(monkeypatch, True, world=3)
    with pytest.raises(ConfigError, match=r"the sweep runs in one process, but this is one of 3"):
        ddp.refuse_multi_process("the sweep")
    _fake_group(monkeypatch, False)
    ddp.refuse_multi_process("the sweep")  # one process: nothing to refuse


@pytest.mark.parametrize("message", ["[enforce fail at gloo/transport/tcp/unbound_buffer.cc:81] Timed out",
                                     "Broken pipe", "Connection closed by peer [10.0.0.2]:4021"])
def test_each_lost_peer_marker_alone_is_a_lost_peer(message):
    assert ddp.lost_peer(RuntimeError(message))
    assert not ddp.lost_peer(RuntimeError("size mismatch"))


# ----------------------------------------------------------------------------- errors over ranks


def test_raise_on_every_rank_goes_through_the_ranks_gpu_under_nccl(monkeypatch):
    sent = []

    def broadcast_object_list(message, src, device=None):
        sent.append(device)
        message[0] = "output dir x already holds a run"  # rank 0's error
    monkeypatch.setattr(ddp.dist, "broadcast_object_list", broadcast_object_list)
    with pytest.raises(ConfigError, match="already holds a run") as echoed:
        ddp.raise_on_every_rank(None, ddp.DistContext(rank=1, world_size=2, local_rank=1, backend="nccl"))
    assert echoed.value.echo is True and sent == [torch.device("cuda", 1)]
    own = KeyError("rank 0's own")
    with pytest.raises(KeyError) as raised:
        ddp.raise_on_every_rank(own, ddp.DistContext(rank=0, world_size=2, backend="gloo"))
    assert raised.value is own and not getattr(raised.value, "echo", False) and sent[-1] is None


def _gather(monkeypatch, messages):
    def all_gather_object(out, mine):
        out[:] = messages
    monkeypatch.setattr(ddp.dist, "all_gather_object", all_gather_object)


def test_raise_together_gathers_under_the_ranks_gpu_with_nccl(monkeypatch):
    current = []

    @contextlib.contextmanager
    def device(index):
        current.append(index)
        yield
    monkeypatch.setattr(torch.cuda, "device", device)
    _gather(monkeypatch, [None, None])
    ddp.raise_together(None, ddp.DistContext(rank=1, world_size=2, local_rank=1, backend="nccl"))
    assert current == [1]
    ddp.raise_together(None, ddp.DistContext(rank=1, world_size=2, local_rank=1, backend="gloo"))
    assert current == [1]


def test_rank0_names_the_first_failing_rank_of_several(monkeypatch):
    _gather(monkeypatch, [None, "bad root", "bad file"])
    with pytest.raises(ConfigError) as raised:
        ddp.raise_together(None, ddp.DistContext(rank=0, world_size=3, backend="gloo"))
    assert str(raised.value) == "rank 1: bad root"
    with pytest.raises(ConfigError) as raised:  # rank 2 did not fail: it echoes the job's (rank 1's) error
        ddp.raise_together(None, ddp.DistContext(rank=2, world_size=3, backend="gloo"))
    assert str(raised.value) == "bad root" and raised.value.echo is True


def test_failing_together_hands_its_error_to_the_gather(monkeypatch):
    from segpcl_fast.engine.checkpoint import CheckpointError
    gathered = []

    def all_gather_object(out, mine):
        gathered.append(mine)
        out[:] = [mine, None]
    monkeypatch.setattr(ddp.dist, "all_gather_object", all_gather_object)
    two = ddp.DistContext(rank=0, world_size=2, backend="gloo")
    with pytest.raises(CheckpointError, match="refused"):
        with ddp.failing_together(two):
            raise CheckpointError("refused")
    assert gathered == ["refused"]
    with ddp.failing_together(two):
        pass
    assert gathered == ["refused", None]


def test_every_user_error_is_said_as_its_own_message():
    from segpcl_fast.data.build import ClassCountError
    ClassifierError = type("ClassifierError", (RuntimeError,), {})  # segpcl_fast.classifier's, by name (its import is slow)
    from segpcl_fast.model.clip import ModelLoadError
    for error in (ModelLoadError("no weights"), ClassifierError("no weights"), FloatingPointError("no weights")):
        assert ddp._as_said(error) == "no weights", type(error)
    subset = ClassCountError("cifar100", "/data", 10, 100)  # a DatasetFormatError
    assert ddp._as_said(subset) == str(subset) and not str(subset).startswith("ClassCountError")
    assert ddp._as_said(RuntimeError("no weights")) == "RuntimeError: no weights"


def test_destroy_without_a_group_does_nothing():
    assert not ddp.dist.is_initialized()
    ddp.destroy()
    ddp.destroy(after_error=True)


# ----------------------------------------------------------------------------- data


def test_the_local_batch_is_an_int():
    size = ddp.local_batch_size(128, 4)
    assert size == 32 and type(size) is int


def test_an_unshuffled_sampler_slices_in_order_and_draws_nothing():
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    got = [list(ddp.ShardedBatchSampler(5, 4, r, 2, g, shuffle=False, num_batches=3)) for r in range(2)]
    assert got == [[[0, 1], [], [0, 1]], [[2, 3], [4], [2, 3]]]
    assert torch.equal(g.get_state(), state)


# ----------------------------------------------------------------------------- collectives


def test_the_communication_device_is_the_tensors_under_nccl_and_the_cpu_under_gloo():
    gpu = torch.device("cuda", 1)
    assert ddp._comm_device(ddp.DistContext(1, 2, 1, "nccl"), gpu) == gpu
    assert ddp._comm_device(ddp.DistContext(1, 2, 1, "gloo"), gpu) == torch.device("cpu")


def test_any_rank_takes_the_max_on_a_copy(monkeypatch):
    ops = []

    def all_reduce(t, op=None):
        ops.append(op)
        t.fill_(1.0)  # another rank's loss was not finite
    monkeypatch.setattr(ddp.dist, "all_reduce", all_reduce)
    mine = torch.tensor(0.0)
    assert float(ddp.any_rank(mine, ddp.DistContext(0, 2, 0, "gloo"))) == 1.0
    assert ops == [ddp.dist.ReduceOp.MAX] and float(mine) == 0.0  # this rank's own flag is kept


def _broadcasts(monkeypatch, meta=None, source=None):
    """Record dist.broadcast's tensors (a receiving rank gets `source`'s values, piece by piece)."""
    sent, offset = [], [0]

    def broadcast_object_list(objects, src):
        if objects[0] is None:
            objects[0] = meta

    def broadcast(t, src):
        if source is not None:
            t.copy_(source.reshape(-1)[offset[0]:offset[0] + t.numel()].view_as(t))
            offset[0] += t.numel()
        sent.append(t.clone())
    monkeypatch.setattr(ddp.dist, "broadcast_object_list", broadcast_object_list)
    monkeypatch.setattr(ddp.dist, "broadcast", broadcast)
    return sent


def test_broadcast_tensor_sends_whole_where_the_backend_uses_the_tensors_device(monkeypatch):
    sent = _broadcasts(monkeypatch)
    monkeypatch.setattr(ddp, "BROADCAST_CHUNK_BYTES", 8)
    t = torch.arange(6.0)
    out = ddp.broadcast_tensor(t, ddp.DistContext(0, 2, 0, "gloo"), torch.device("cpu"))
    assert len(sent) == 1 and torch.equal(sent[0], t) and torch.equal(out, t)


@pytest.mark.parametrize("dtype,pieces", [(torch.float32, [10, 10, 10, 7]), (torch.float64, [5] * 7 + [2])])
def test_broadcast_tensor_through_another_device_goes_in_pieces_of_the_chunk_bytes(monkeypatch, dtype, pieces):
    monkeypatch.setattr(ddp, "_comm_device", lambda ctx, like: torch.device("cpu", 0))  # "another device"
    monkeypatch.setattr(ddp, "BROADCAST_CHUNK_BYTES", 40)
    whole = torch.arange(37, dtype=dtype).view(37, 1)
    sent = _broadcasts(monkeypatch)
    ddp.broadcast_tensor(whole, ddp.DistContext(0, 2, 0, "gloo"), torch.device("cpu"))
    assert [p.numel() for p in sent] == pieces and torch.equal(torch.cat(sent), whole.view(-1))
    sent = _broadcasts(monkeypatch, meta=((37, 1), dtype), source=whole)  # rank 1 receives, piece by piece
    got = ddp.broadcast_tensor(None, ddp.DistContext(1, 2, 1, "gloo"), torch.device("cpu"))
    assert torch.equal(got, whole) and got.dtype == dtype


def test_a_non_contiguous_tensor_is_sent_in_its_own_order(monkeypatch):
    monkeypatch.setattr(ddp, "_comm_device", lambda ctx, like: torch.device("cpu", 0))
    monkeypatch.setattr(ddp, "BROADCAST_CHUNK_BYTES", 16)
    t = torch.arange(12.0).view(3, 4).t()
    sent = _broadcasts(monkeypatch)
    out = ddp.broadcast_tensor(t, ddp.DistContext(0, 2, 0, "gloo"), torch.device("cpu"))
    assert torch.equal(torch.cat(sent), t.reshape(-1)) and torch.equal(out, t)


def test_anchor_cache_tensors_land_where_rank0_keeps_them(monkeypatch):
    """Rank 1: the pixels rank 0 keeps on the CPU stay on the CPU, the rest go to the rank's device."""
    from segpcl_fast.method.anchors import AnchorCache
    infos = iter([[True], [("new_data", [True, False, False, False])]])

    def broadcast_object_list(objects, src):
        objects[:] = next(infos)
    placed = []

    def broadcast_tensor(t, ctx, device, to=None):
        placed.append(to)
        return torch.zeros(2, 3)
    monkeypatch.setattr(ddp.dist, "broadcast_object_list", broadcast_object_list)
    monkeypatch.setattr(ddp, "broadcast_tensor", broadcast_tensor)
    device = torch.device("cuda", 1)  # only passed along
    cache = ddp.broadcast_anchor_cache(None, ddp.DistContext(1, 2, 1, "gloo"), device)
    assert isinstance(cache, AnchorCache) and cache.source == "new_data"
    assert placed == [torch.device("cpu"), device, device, device]


# ----------------------------------------------------------------------------- LoRAGradSync


class _Peer:
    """dist.all_reduce(async_op=True) of a 2-rank group whose other rank's gradients are all `value`:
    records each launch (its bucket's values then) and sums at wait()."""

    def __init__(self, monkeypatch, value=1.0):
        self.launched, self.value = [], value
        monkeypatch.setattr(ddp.dist, "all_reduce", self.all_reduce)

    def all_reduce(self, t, async_op=False):
        assert async_op
        self.launched.append(t.clone())
        return SimpleNamespace(wait=lambda: t.add_(self.value))


def _sync(params, cap_bytes, as_view=True):
    return ddp.LoRAGradSync(params, ddp.DistContext(0, 2, 0, "gloo"),
                            ddp.DDPSettings(bucket_cap_mb=cap_bytes / 2 ** 20, gradient_as_bucket_view=as_view))


def test_buckets_hold_the_trainable_parameters_in_their_dtype_each_over_the_cap_alone():
    params = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)) for _ in range(3)]
    frozen = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64), requires_grad=False)
    sync = _sync(params[:1] + [frozen] + params[1:], cap_bytes=8)  # every parameter (24 bytes) over the cap
    try:
        assert [[id(p) for p in b] for b in sync.buckets] == [[id(p)] for p in reversed(params)]
        assert all(f.dtype == torch.float64 for f in sync.flat)
        sync.prepare()
        assert all(p.grad.dtype == torch.float64 for p in params) and frozen.grad is None
    finally:
        sync.remove()


def test_bucket_views_partition_the_flat_bucket():
    params = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4))]
    sync = _sync(params, cap_bytes=1 << 20)
    try:
        sync.prepare()
        flat, = sync.flat
        for p in params:
            p.grad.fill_(float(p.numel()))
        assert flat.tolist() == [4.0] * 4 + [6.0] * 6  # reverse order: the second parameter first
    finally:
        sync.remove()


def test_a_bucket_launches_once_complete_and_one_hook_launches_every_ready_bucket_in_order(monkeypatch):
    peer = _Peer(monkeypatch)
    p = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]  # cap: two parameters a bucket
    sync = _sync(p, cap_bytes=16)
    try:
        assert [[id(q) for q in b] for b in sync.buckets] == [[id(p[2]), id(p[1])], [id(p[0])]]
        sync.prepare()
        for q in p:
            q.grad.fill_(2.0)
        sync._on_grad(p[0])  # bucket 1 complete, bucket 0 not: nothing may start (order)
        sync._on_grad(p[2])  # bucket 0 half
        assert peer.launched == []
        sync._on_grad(p[1])  # bucket 0 complete: it and the ready bucket 1 start, in order
        assert [t.numel() for t in peer.launched] == [4, 2]
        assert all(torch.equal(t, torch.full_like(t, 2.0)) for t in peer.launched)
        sync.finish()
        assert all(torch.equal(q.grad, torch.full_like(q, 1.5)) for q in p)  # (2 + 1) / 2
    finally:
        sync.remove()


@pytest.mark.parametrize("as_view", [True, False])
def test_each_step_leaves_the_average_over_the_ranks_in_grad(monkeypatch, as_view):
    """Two steps (buckets zeroed in between), one parameter without a gradient (zero on this rank)."""
    peer = _Peer(monkeypatch, value=1.0)
    p = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
    sync = _sync(p, cap_bytes=12, as_view=as_view)
    try:
        for step in (1, 2):
            sync.prepare()
            (step * 4.0 * (p[1].sum() + p[2].sum())).backward()
            assert len(peer.launched) == 3 * step - 1  # buckets of p[2] and p[1] start in backward
            sync.finish()
            assert len(peer.launched) == 3 * step  # p[0]'s (last) bucket: with no gradient, by finish()
            for q, own in zip(p, (0.0, 4.0 * step, 4.0 * step)):
                torch.testing.assert_close(q.grad, torch.full_like(q, (own + 1.0) / 2))
    finally:
        sync.remove()


def test_a_removed_sync_launches_nothing(monkeypatch):
    peer = _Peer(monkeypatch)
    w = torch.nn.Parameter(torch.zeros(2))
    sync = _sync([w], cap_bytes=1 << 20)
    sync.prepare()
    sync.remove()
    w.sum().backward()
    assert peer.launched == []


# ----------------------------------------------------------------------------- bench


def test_class_names_hand_values():
    from segpcl_fast.engine.bench import class_names
    assert class_names(4) == ["red thing0", "green striped thing1", "striped small round thing2",
                              "small thing3"]


@pytest.fixture
def recorded_steps(monkeypatch):
    """Trainer.train_step records the labels each bench step trains on."""
    from segpcl_fast.engine import bench
    labels, real = [], bench.Trainer.train_step

    def train_step(runner, optimizer, images, step_labels, *args):
        labels.append(step_labels.clone())
        return real(runner, optimizer, images, step_labels, *args)
    monkeypatch.setattr(bench.Trainer, "train_step", train_step)
    return labels


def test_build_step_is_seeded_and_trains_the_new_classes(tiny_model_name, recorded_steps):
    from segpcl_fast.config import Config
    from segpcl_fast.engine.bench import build_step
    cfg = Config()
    cfg.dpgd.k_seed = 3
    step = build_step(tiny_model_name, "cpu", n_images=6, n_old=2, n_new=3, seed=4, cfg=cfg)
    assert (step.learner.n_old, step.learner.n_new) == (2, 3) and step.model.training
    cache = step.learner.anchor_cache
    assert len(cache) == 3 * 2 and cache.teacher_logits.shape == (6, 2)  # k_seed x old classes
    assert int(cache.targets.min()) >= 0 and int(cache.targets.max()) < 2  # old classes
    first = float(step())
    assert int(recorded_steps[0].min()) >= 2 and int(recorded_steps[0].max()) < 5  # the task's new classes
    again = build_step(tiny_model_name, "cpu", n_images=6, n_old=2, n_new=3, seed=4, cfg=cfg)
    assert float(again()) == first and torch.equal(recorded_steps[1], recorded_steps[0])
    other = build_step(tiny_model_name, "cpu", n_images=6, n_old=2, n_new=3, seed=5, cfg=cfg)
    other()
    assert not torch.equal(recorded_steps[2], recorded_steps[0])


def test_build_step_runs_the_text_tower_at_its_precision_and_stores_the_frozen_weights(tiny_model_name,
                                                                                      monkeypatch):
    from segpcl_fast.config import Config
    from segpcl_fast.engine import bench
    scalers = []
    monkeypatch.setattr(bench, "make_grad_scaler", lambda device, *precisions: scalers.append(precisions))
    cfg = Config()
    cfg.run.text_precision = "bf16"
    cfg.data.templates = ["a photo of a {}.", "a drawing of a {}."]
    step = bench.build_step(tiny_model_name, "cpu", n_images=2, n_old=0, n_new=3, precision="bf16", cfg=cfg)
    assert step.model.text_autocast == torch.bfloat16 and step.model.image_autocast == torch.bfloat16
    assert scalers == [("bf16", "bf16")]
    assert step.model.frozen_storage.get("visual") == torch.bfloat16
    assert step.shape.n_prompts == 2 * 3  # every template of every class


def test_a_bench_step_reads_the_previous_steps_outcome_and_raises_on_its_nan_loss(tiny_model_name, monkeypatch):
    """As the trainer's loop: with fused SGD (a GPU's: the update skips a non-finite step on the device, nothing
    read back) the step after a non-finite loss raises, reading that step's outcome. Fused SGD on the CPU here."""
    from segpcl_fast.engine import bench
    from segpcl_fast.engine.trainer import _with_momentum_buffers
    monkeypatch.setattr(bench, "make_optimizer", lambda params, cfg: _with_momentum_buffers(
        torch.optim.SGD(params, lr=cfg.optim.lr, momentum=0.9, fused=True)))
    step = bench.build_step(tiny_model_name, "cpu", n_images=2, n_old=0, n_new=2)
    real = step.learner.loss

    def nan_loss(images, labels):
        loss, parts = real(images, labels)
        return loss * float("nan"), parts
    step()
    step.learner.loss = nan_loss
    step()  # queued; its outcome is read by the next step
    step.learner.loss = real
    with pytest.raises(FloatingPointError, match="nan"):
        step()


def test_matmul_peak_measures_the_dtype_asked_at_1024_on_the_cpu(monkeypatch):
    from segpcl_fast.engine import bench
    made, real = [], torch.randn

    def randn(*size, **kw):
        made.append((size, kw.get("dtype")))
        return real(2, 2, dtype=kw.get("dtype"))
    monkeypatch.setattr(bench.torch, "randn", randn)
    clock = iter([0.0, 2.0, 2.0, 3.0])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    assert bench.matmul_peak_flops("cpu", torch.float64, repeats=2) == pytest.approx(2 * 1024 ** 3 / 1.0)
    assert made == [((1024, 1024), torch.float64)] * 2
