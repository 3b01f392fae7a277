"""Data-parallel training on CPU: 2 gloo processes reproduce the 1-process run (same global batch)."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from segpcl_fast.api import make_config
from segpcl_fast.engine import distributed as ddp
from segpcl_fast.engine.trainer import Trainer


def _config(model_name, out, **kw):
    base = dict(model__name=model_name, model__pretrained=None, max_train_per_class=2, max_test_per_class=2,
                num_tasks=2, epochs=1, optim__batch_size=32, dpgd__k_adv=2, dpgd__k_seed=2, output_dir=str(out),
                progress=False, plots=False, num_threads=1, train_augment=False, run__device="cpu",
                acgd__anchor_batch=1000)  # every anchor every step: the ACGD term is independent of sharding
    base.update(kw)
    return make_config(**base)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, model_dir, model_name, out, result_file):
    import open_clip
    open_clip.add_model_config(model_dir)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        trainer = Trainer(_config(model_name, out))
        assert trainer.dist.world_size == world and trainer.dist.backend == "gloo"
        result = trainer.run()
        lora = {k: v.tolist() for k, v in trainer.model.state_dict().items() if "lora_B" in k}
        with open(f"{result_file}.{rank}", "w") as f:
            json.dump({"matrix": result.accuracy_matrix, "fwt": result.fwt_before, "lora": lora,
                       "protos": trainer.learner.prototypes.tensor.tolist(), "paths": result.paths}, f)
    finally:
        ddp.destroy()


@pytest.fixture(scope="module")
def runs(tiny_model_name, tmp_path_factory):
    import open_clip
    tmp = tmp_path_factory.mktemp("ddp")
    model_dir = str(next(p for p in open_clip.factory._MODEL_CONFIG_PATHS if (p / "test-tiny.json").exists()))
    single = Trainer(_config(tiny_model_name, tmp / "single"))
    result = single.run()
    one = {"matrix": result.accuracy_matrix, "fwt": result.fwt_before,
           "lora": {k: v.tolist() for k, v in single.model.state_dict().items() if "lora_B" in k},
           "protos": single.learner.prototypes.tensor.tolist()}
    mp.spawn(_worker, args=(2, _free_port(), model_dir, tiny_model_name, str(tmp / "ddp"), str(tmp / "res")),
             nprocs=2, join=True)
    ranks = [json.loads((tmp / f"res.{r}").read_text()) for r in range(2)]
    return one, ranks, tmp


def test_two_gloo_ranks_match_one_process(runs):
    one, ranks, _ = runs
    lora_1 = {k: torch.tensor(v) for k, v in one["lora"].items()}
    for rank in ranks:
        assert rank["matrix"] == one["matrix"]
        assert rank["fwt"] == pytest.approx(one["fwt"])
        for k, v in rank["lora"].items():
            torch.testing.assert_close(torch.tensor(v), lora_1[k], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.tensor(rank["protos"]), torch.tensor(one["protos"]), rtol=1e-4, atol=1e-5)
    assert any(float(torch.tensor(v).abs().sum()) > 0 for v in one["lora"].values())  # training moved B


def test_ranks_hold_identical_state_and_only_rank0_writes(runs):
    _, (r0, r1), tmp = runs
    assert r0["lora"] == r1["lora"] and r0["protos"] == r1["protos"]  # bit-identical across ranks
    assert (tmp / "ddp" / "results.json").exists() and (tmp / "ddp" / "checkpoints" / "task_01.pt").exists()
    assert r0["paths"] and not r1["paths"]


def test_sharded_sampler_reproduces_the_single_process_loader():
    from torch.utils.data import DataLoader
    n, batch = 23, 8
    dl = DataLoader(list(range(n)), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(7))
    expected = [b.tolist() for epoch in range(2) for b in dl]
    g0, g1, g2 = (torch.Generator().manual_seed(7) for _ in range(3))
    s0, s1 = ddp.ShardedBatchSampler(n, batch, 0, 2, g0), ddp.ShardedBatchSampler(n, batch, 1, 2, g1)
    got = [a + b for epoch in range(2) for a, b in zip(list(s0), list(s1))]
    assert got == expected
    assert [len(b) for b in ddp.ShardedBatchSampler(n, batch, 1, 2, g2)] == [4, 4, 4]


@pytest.mark.parametrize("num_batches", [0, 2, 3, 7, 9])
def test_one_sampler_iterator_runs_on_through_epochs_as_the_loader_does(num_batches):
    """num_batches batches from one __iter__ (3 per epoch here) are the first num_batches of the
    single-process DataLoader's epochs, one iterator per epoch, on one rank and split over two."""
    from torch.utils.data import DataLoader
    n, batch = 23, 8
    dl = DataLoader(list(range(n)), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(7))
    expected = [b.tolist() for epoch in range(4) for b in dl][:num_batches]
    one = ddp.ShardedBatchSampler(n, batch, 0, 1, torch.Generator().manual_seed(7), num_batches=num_batches)
    assert len(one) == num_batches and list(one) == expected
    halves = [ddp.ShardedBatchSampler(n, batch, r, 2, torch.Generator().manual_seed(7), num_batches=num_batches)
              for r in range(2)]
    assert [a + b for a, b in zip(*halves)] == expected


def test_a_sampler_refuses_batches_of_nothing():
    with pytest.raises(ValueError, match="3 batches from 0 items"):
        ddp.ShardedBatchSampler(0, 8, 0, 1, torch.Generator(), num_batches=3)
    assert list(ddp.ShardedBatchSampler(0, 8, 0, 1, torch.Generator())) == []
    assert ddp.shard_slice(list(range(5)), 0, 2) == [0, 1] and ddp.shard_slice(list(range(5)), 1, 2) == [2, 3, 4]


def test_global_batch_must_divide():
    with pytest.raises(ValueError, match="multiple of 3"):
        ddp.local_batch_size(128, 3)
    assert ddp.local_batch_size(128, 2) == 64
    # a resume cannot change the batch (its checkpoints refuse another config): the process count is the fix
    with pytest.raises(ValueError, match=r"resume it on a process count that divides 16 \(--nproc_per_node: "
                                         r"1, 2, 4, 8, 16\)"):
        ddp.local_batch_size(16, 3, resume=True)


def _grad_sync_worker(rank, world, port, bucket_mb, as_view):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ctx = ddp.DistContext(rank=rank, world_size=world, backend="gloo")
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(4)] + [torch.nn.Parameter(torch.randn(2))]
        sync = ddp.LoRAGradSync(params, ctx, ddp.DDPSettings(bucket_cap_mb=bucket_mb, gradient_as_bucket_view=as_view))
        assert len(sync.buckets) == (5 if bucket_mb < 1e-4 else 1)
        for step in range(2):
            sync.prepare()
            # the last parameter gets no gradient on rank 1: its bucket must still complete (as zero)
            used = params if rank == 0 else params[:-1]
            loss = sum((p * (rank + 1 + step)).sum() for p in used)
            loss.backward()
            sync.finish()
            for i, p in enumerate(params):
                expected = (1 + step + (2 + step if i < 4 else 0)) / 2
                torch.testing.assert_close(p.grad, torch.full_like(p, expected))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("bucket_mb,as_view", [(25.0, True), (1e-5, False)])
def test_grad_sync_averages_over_ranks(bucket_mb, as_view):
    mp.spawn(_grad_sync_worker, args=(2, _free_port(), bucket_mb, as_view), nprocs=2, join=True)


class _NaNOnRank1:
    """loss = mean (x . w - y)^2; NaN on rank 1 from step `bad` on."""

    def __init__(self, w, rank, bad):
        self.w, self.rank, self.bad, self.calls = w, rank, bad, 0

    def loss(self, images, labels):
        loss = ((images @ self.w - labels.float()) ** 2).mean()
        if self.rank == 1 and self.calls >= self.bad:
            loss = loss * float("nan")
        self.calls += 1
        return loss, {"cls": loss}


def _nan_worker(rank, world, port, fused, out, scaled=False):
    from segpcl_fast.engine.step_outcome import make_grad_scaler
    from segpcl_fast.engine.trainer import _with_momentum_buffers
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(3))
        x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
        tr = Trainer.__new__(Trainer)  # only what train_step reads
        tr.cfg, tr.device, tr.lora_params = make_config(), torch.device("cpu"), [w]
        tr.dist = ddp.DistContext(rank=rank, world_size=world, backend="gloo")
        tr.grad_sync = ddp.LoRAGradSync([w], tr.dist, ddp.DDPSettings())
        tr.learner = _NaNOnRank1(w, rank, bad=1)
        kw = dict(lr=0.1, momentum=0.9)
        opt = (_with_momentum_buffers(torch.optim.SGD([w], fused=True, **kw)) if fused
               else torch.optim.SGD([w], foreach=True, **kw))
        shard = slice(2 * rank, 2 * rank + 2)
        scaler = make_grad_scaler(tr.device, "fp16") if scaled else None
        message, pending, after_first = "no error", None, None
        try:  # the trainer's loop: a step's outcome is read after the next step is queued
            for step in range(3):
                outcome = Trainer.train_step(tr, opt, x[shard], y[shard], 0.1, step, 0, 4, scaler)
                if pending is not None:
                    pending.values(tr.cfg)
                pending = outcome
                if step == 0:
                    outcome.values(tr.cfg)
                    after_first = w.detach().clone()
            pending.values(tr.cfg)
        except FloatingPointError as e:
            message = str(e)
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"message": message, "unchanged": bool(torch.equal(w.detach(), after_first))}, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("fused,scaled", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["foreach", "fused", "foreach-fp16", "fused-fp16"])
def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_that_step(tmp_path, fused, scaled):
    """Rank 1's loss turns NaN at step 1. The all-reduce carries it into every rank's gradients, so every
    rank raises for step 1 (none waits in a collective for a rank that left) and none applies step 1 or
    the step queued after it: rank 1's error names its loss, the other's names the other rank. Under fp16's
    loss scaler (scaled) rank 0 would take its non-finite gradients for an overflow and go on: the ranks'
    loss flags are all-reduced (ddp.any_rank), so it raises too."""
    mp.spawn(_nan_worker, args=(2, _free_port(), fused, str(tmp_path / "res"), scaled), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"res.{rank}").read_text()) for rank in range(2)]
    assert "loss is nan at task 1, step 1" in results[1]["message"], results[1]
    assert "not finite at task 1, step 1" in results[0]["message"], results[0]
    assert "another rank's loss was not finite" in results[0]["message"]
    assert all(r["unchanged"] for r in results), results


def _stage1_error_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        def build(loader, seed):
            raise FloatingPointError("DPGD: the teacher's pixel gradient is not finite under fp16 autocast")
        tr = Trainer.__new__(Trainer)  # only what _anchors_on_rank0 reads
        tr.dist = ddp.DistContext(rank=rank, world_size=world, backend="gloo")
        tr.device = torch.device("cpu")
        tr.learner = type("Learner", (), {})()
        tr.learner._build_anchors = build
        tr._anchors_on_rank0()
        try:
            tr.learner._build_anchors(None, 0)
            said = "no error"
        except Exception as e:  # noqa: BLE001
            said = f"{type(e).__name__}: {e} (echo={getattr(e, 'echo', False)})"
        with open(f"{out}.{rank}", "w") as f:
            f.write(said)
    finally:
        torch.distributed.destroy_process_group()


def test_a_stage1_error_on_rank0_stops_every_rank(tmp_path):
    """Stage 1 (DPGD) runs on rank 0 alone while the others wait for its anchors: its error (here fp16 DPGD's)
    is raised on every rank, echoed by the others (printed once), instead of leaving them in the broadcast."""
    mp.spawn(_stage1_error_worker, args=(2, _free_port(), str(tmp_path / "res")), nprocs=2, join=True)
    said = [(tmp_path / f"res.{rank}").read_text() for rank in range(2)]
    assert said[0] == ("FloatingPointError: DPGD: the teacher's pixel gradient is not finite under fp16 autocast "
                       "(echo=False)")
    assert said[1] == ("ConfigError: DPGD: the teacher's pixel gradient is not finite under fp16 autocast "
                       "(echo=True)")


def test_gloo_teardown_on_old_torch_lets_outstanding_work_finish_first(monkeypatch):
    """torch < 2.8 could hang in destroy_process_group on gloo (pytorch#154976; seen on torch 2.6 at the
    end of a 2-rank torchrun): destroy() runs a barrier first there, and only there."""
    from segpcl_fast.engine import distributed as d
    calls = []
    monkeypatch.setattr(d.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(d.dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(d.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(d.dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(d.torch, "__version__", "2.6.0+cu124")
    assert d._torch_before(2, 8)
    d.destroy()
    assert calls == ["barrier", "destroy"]
    calls.clear()
    monkeypatch.setattr(d.torch, "__version__", "2.14.1")
    assert not d._torch_before(2, 8)
    d.destroy()
    assert calls == ["destroy"]


def _finished_run_worker(rank, world, port, model_dir, model_name, out, result_file):
    """A finished 1-process run (global batch 3) under 2 ranks: evaluate, a --resume that has nothing to
    train, and a --resume with another optim.lr (refused)."""
    import open_clip

    from segpcl_fast.api import evaluate
    open_clip.add_model_config(model_dir)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        said = {"eval": evaluate(out)}
        said["resumed_matrix"] = Trainer(_config(model_name, out, optim__batch_size=3, run__resume=True)).run().accuracy_matrix
        try:
            Trainer(_config(model_name, out, optim__batch_size=3, run__resume=True, optim__lr=0.5)).run()
        except Exception as e:  # noqa: BLE001
            said["refused"] = {"kind": type(e).__name__, "echo": bool(getattr(e, "echo", False)), "message": str(e)}
        with open(f"{result_file}.{rank}", "w") as f:
            json.dump(said, f)
    finally:
        ddp.destroy()


def test_a_finished_run_evaluates_and_resumes_on_a_world_size_its_batch_does_not_divide(tiny_model_name, tmp_path):
    """evaluate and a finished run's --resume train nothing, so the global batch (3 here) need not divide over
    the processes (2): a paper run's batch 128 could not be re-evaluated on 3 GPUs. Both ranks give the
    1-process evaluation; a resume the checkpoint refuses (another lr) is rank 0's error, echoed by rank 1
    (the CLI prints it once)."""
    import open_clip
    from segpcl_fast.api import evaluate
    out = tmp_path / "run"
    model_dir = str(next(p for p in open_clip.factory._MODEL_CONFIG_PATHS if (p / "test-tiny.json").exists()))
    trained = Trainer(_config(tiny_model_name, out, optim__batch_size=3)).run()
    alone = evaluate(out)
    mp.spawn(_finished_run_worker, args=(2, _free_port(), model_dir, tiny_model_name, str(out), str(tmp_path / "res")),
             nprocs=2, join=True)
    for rank in range(2):
        said = json.loads((tmp_path / f"res.{rank}").read_text())
        assert said["eval"]["acc"] == alone["acc"] and said["eval"]["acc_per_task_j"] == alone["acc_per_task_j"]
        assert said["resumed_matrix"] == trained.accuracy_matrix
        assert said["refused"]["kind"] in ("CheckpointError", "ConfigError") and "optim.lr" in said["refused"]["message"]
        assert said["refused"]["echo"] == (rank == 1), said["refused"]


def test_a_resume_on_another_world_size_says_so(caplog):
    """Tasks trained on 1 process, resumed on 2: allowed (a lost node), and warned, once, by rank 0."""
    from types import SimpleNamespace
    one = [{"world_size": 1}, {"world_size": 1}]
    for is_main, world, infos, start, warned in [(True, 2, one, 2, True), (False, 2, one, 2, False),
                                                 (True, 1, one, 2, False), (True, 2, one, 4, False),
                                                 (True, 2, [{}, {}], 2, False)]:
        fake = SimpleNamespace(dist=SimpleNamespace(is_main=is_main, world_size=world))
        caplog.clear()
        with caplog.at_level("WARNING", logger="segpcl_fast.engine"):
            Trainer._warn_other_world_size(fake, infos, start, 4)
        assert ("tasks 1..2 of this run trained on 1 process(es), this resume trains tasks 3..4 on 2" in caplog.text) \
            == warned, (is_main, world, infos, start, caplog.text)
