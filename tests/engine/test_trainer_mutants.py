"""Properties of the trainer's task loop and of the DDP helpers that a mutation audit found unchecked:
per-task and per-rank seeding (module docstring of trainer.py, distributed.py "Anchors"), the
divergence warning's thresholds (README: over 10 %, over two standard errors, above ln of the
task's class count; exactly ln(n) is not flagged), a results.json-only run dir refused like a
checkpointed one, shard_slice over more than two ranks, and the all-reduce bucket cap ("at most").
Everything runs on stub trainers (Trainer.__new__): no model, no data, no process group."""
import logging
import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from segpcl_fast.api import make_config
from segpcl_fast.config import ConfigError
from segpcl_fast.engine import checkpoint as ckpt
from segpcl_fast.engine import distributed as ddp
from segpcl_fast.engine.loss_history import COLLAPSE_FRACTION, divergence_warning
from segpcl_fast.engine.trainer import Trainer
from segpcl_fast.model.clip import ImageStats


# ----------------------------------------------------------------------------- train_task on a stub

class _StubLearner:
    """What train_task touches: begin_task seeds the anchor generator (as Learner.begin_task does)."""

    def __init__(self):
        self.anchor_generator = torch.Generator()
        self.seeds = []
        self.prototypes = SimpleNamespace(tensor=torch.zeros(2, 3))
        self.text_cache = torch.zeros(2, 3)

    def begin_task(self, t, n_new, loader, seed=0):
        self.seeds.append(seed)
        self.anchor_generator.manual_seed(seed)
        return {"anchors": 0}

    def end_task(self, t, n_new, loader):
        return {}


def _stub_trainer(monkeypatch, rank=0, world=1, n_train=1, n_classes=(2, 2, 2), cls_losses=None, **cfg):
    """A trainer whose tasks have n_classes[t] classes and n_train training images; train_step
    returns cls_losses[step] (no model, no optimizer work); collectives are identity."""
    monkeypatch.setattr(ddp, "broadcast_tensor", lambda t, ctx, device, src=0: t)
    tr = Trainer.__new__(Trainer)
    tr.cfg = make_config(progress=False, num_threads=1, **cfg)
    tr.device = torch.device("cpu")
    tr.dist = ddp.DistContext(rank=rank, world_size=world, backend="gloo" if world > 1 else None)
    tr.model = SimpleNamespace(eval=lambda: None, train=lambda: None)
    tr.test_tf = None
    data = TensorDataset(torch.zeros(n_train, 1), torch.zeros(n_train, dtype=torch.long))
    tr.scenario = SimpleNamespace(num_tasks=len(n_classes), task_classes=lambda t: list(range(n_classes[t])),
                                  train_dataset=lambda t, transform=None: data)
    tr.learner = _StubLearner()
    tr.lora_params = [torch.nn.Parameter(torch.zeros(1))]
    tr.grad_sync = None
    tr._learned_cls_fraction = None
    tr._said = set()
    losses = list(cls_losses or [])
    tr.train_step = lambda opt, images, labels, lr, step, t, global_n, scaler=None: (
        {"cls": torch.tensor(losses[step])} if step < len(losses) else {})
    return tr


def _anchor_draws(tr, n=16):
    return torch.randperm(1000, generator=tr.learner.anchor_generator)[:n].tolist()


def test_every_task_gets_its_own_seed_from_run_seed_and_t(monkeypatch):
    """trainer.py: every task re-seeds torch (and its loader) from (run.seed, t): different tasks
    get different streams (shuffle, augmentation, anchor batches); the same (seed, t) the same."""
    tr = _stub_trainer(monkeypatch, seed=3)
    torch_seeds, draws = [], []
    for t in range(3):
        tr.train_task(t)
        torch_seeds.append(torch.initial_seed())
        draws.append(_anchor_draws(tr))
    assert len(set(tr.learner.seeds)) == 3 and torch_seeds == tr.learner.seeds
    assert len({tuple(d) for d in draws}) == 3  # no two tasks replay the same anchor stream
    again = _stub_trainer(monkeypatch, seed=3)
    again.train_task(1)
    assert again.learner.seeds == [tr.learner.seeds[1]] and _anchor_draws(again) == draws[1]
    other = _stub_trainer(monkeypatch, seed=4)
    other.train_task(1)
    assert other.learner.seeds[0] not in tr.learner.seeds  # run.seed changes every task's seed


def test_each_rank_draws_its_own_anchor_batches_and_rank0_keeps_the_single_process_stream(monkeypatch):
    """distributed.py: each rank samples its per-step anchor batch from its own generator stream;
    rank 0's stream is the one the single-process run uses."""
    single = _stub_trainer(monkeypatch, n_train=3, seed=1)
    single.train_task(1)
    draws = []
    for rank in range(3):
        tr = _stub_trainer(monkeypatch, rank=rank, world=3, n_train=3, seed=1)  # one image per rank
        tr.train_task(1)
        assert tr.learner.seeds == single.learner.seeds  # stage 1 itself is seeded the same on every rank
        draws.append(_anchor_draws(tr))
    assert draws[0] == _anchor_draws(single)
    assert draws[0] != draws[1] and draws[0] != draws[2] and draws[1] != draws[2]


def test_train_task_judges_divergence_against_ln_of_the_tasks_class_count(monkeypatch, caplog):
    """A task of 3 classes whose L_cls rises from 0.5 to 1.5: above ln(3) = 1.099, so it is flagged,
    naming ln(3) (not the number of seen classes or anything else)."""
    tr = _stub_trainer(monkeypatch, n_train=20, n_classes=(4, 3), cls_losses=[0.5] * 10 + [1.5] * 10,
                       optim__batch_size=1, epochs=1, lr=0.25)
    with caplog.at_level(logging.WARNING, logger="segpcl_fast.engine"):
        info = tr.train_task(1)
    assert info["timings"]["steps"] == 20
    flagged = [r.getMessage() for r in caplog.records if "training diverged" in r.getMessage()]
    assert len(flagged) == 1 and flagged[0].startswith("task 2: L_CLS rose from 0.500 to 1.500")
    assert "ln(3) = 1.099" in flagged[0] and "optim.lr (now 0.25)" in flagged[0]
    # the same losses ending below ln(4) = 1.386 on a 4-class task would not be flagged
    caplog.clear()
    tr = _stub_trainer(monkeypatch, n_train=20, n_classes=(4, 3), cls_losses=[0.5] * 10 + [1.3] * 10,
                       optim__batch_size=1, epochs=1)
    with caplog.at_level(logging.WARNING, logger="segpcl_fast.engine"):
        tr.train_task(0)
    assert not [r for r in caplog.records if "training diverged" in r.getMessage()]


def test_train_task_flags_a_task_at_chance_after_one_that_learned(monkeypatch, caplog):
    """The trainer keeps the lowest last-quarter L_cls / ln(n) of the tasks it trained: a later task spent
    at chance is a collapse even with no rise inside it; the first task at chance is not."""
    chance = math.log(4)
    tr = _stub_trainer(monkeypatch, n_train=8, n_classes=(4, 4, 4), optim__batch_size=1, epochs=1)
    for t, losses, flagged in ((0, [chance] * 8, False), (1, [1.0, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.4], False),
                               (2, [chance] * 8, True)):
        tr.train_step = lambda opt, images, labels, lr, step, t, global_n, scaler=None, losses=losses: {"cls": torch.tensor(losses[step])}
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="segpcl_fast.engine"):
            tr.train_task(t)
        collapsed = [r.getMessage() for r in caplog.records if "training collapsed" in r.getMessage()]
        assert len(collapsed) == flagged, (t, collapsed)
    assert tr._learned_cls_fraction == pytest.approx(0.4 / chance)
    assert "after an earlier task ended at 29% of its chance level" in collapsed[0]


def test_settings_that_train_nothing_are_said_once_before_training(monkeypatch, caplog):
    """One new class under optim.cls_over=current (L_cls = 0 exactly) and a warmup as long as the task (the
    lr never reaches optim.lr: 1000 over 10 steps trained as epochs=0) are legal and silent no-ops: said
    once a run (from the first task that meets them), before that task trains."""
    from segpcl_fast.engine.trainer import idle_setting_warnings
    cfg = make_config(optim__warmup_steps=4, lr=0.1)
    assert idle_setting_warnings(cfg, 0, 1, 10) == [("one_class",
        "task 1 has one new class and optim.cls_over=current: L_cls, a softmax over that one class, is 0 and trains "
        "nothing (so on every such task); set optim.cls_over=seen to classify among every seen class")]
    assert idle_setting_warnings(cfg, 2, 2, 3) == [("warmup",
        "optim.warmup_steps=4 is longer than task 3's 3 steps: its learning rate ends at 0.075, 75% of "
        "optim.lr=0.1; lower optim.warmup_steps (warmup restarts with each task)")]
    assert idle_setting_warnings(make_config(optim__warmup_steps=1000), 0, 2, 10)[0][1].endswith(
        "ends at 1e-05, 1% of optim.lr=0.001; lower optim.warmup_steps (warmup restarts with each task)")
    assert idle_setting_warnings(cfg, 0, 2, 4) == []  # 4 steps: the fourth trains at optim.lr
    assert idle_setting_warnings(make_config(optim__cls_over="seen"), 0, 1, 10) == []
    assert idle_setting_warnings(cfg, 0, 1, 0) == []  # no step, nothing idle
    tr = _stub_trainer(monkeypatch, n_train=2, n_classes=(1, 1, 2), cls_losses=[0.0, 0.0], optim__batch_size=1,
                       epochs=1)
    with caplog.at_level(logging.WARNING, logger="segpcl_fast.engine"):
        for t in range(3):
            tr.train_task(t)
    said = [r.getMessage() for r in caplog.records if "one new class" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("task 1 ")  # once a run, not once a task


# ----------------------------------------------------------------------------- divergence thresholds

def _two_quarters(head, tail, middle=2.5, n_middle=10):
    return list(head) + [middle] * n_middle + list(tail)


@pytest.mark.parametrize("rise, warned", [(0.05, False), (0.15, True)])
def test_divergence_needs_a_rise_over_ten_percent(rise, warned):
    """Noise-free quarters well above ln(10): a 5 % rise is not a divergence, a 15 % one is."""
    losses = _two_quarters([3.0] * 5, [3.0 * (1 + rise)] * 5)
    assert (divergence_warning(losses, 10, 0, 0.1) is not None) == warned


@pytest.mark.parametrize("delta, warned", [(0.5, False), (0.8, True)])
def test_divergence_needs_a_rise_over_two_welch_standard_errors(delta, warned):
    """Quarters of k = 5 steps [2, 3, 2, 3, 2.5]: variances 1/4 each, so the standard error of the
    difference of the means is sqrt((1/4 + 1/4) / 5) = 0.316 and the bar is 2 x 0.316 = 0.632. Both
    rises are over 10 % and end above ln(10)."""
    head = [2.0, 3.0, 2.0, 3.0, 2.5]
    losses = _two_quarters(head, [v + delta for v in head])
    assert len(losses) // 4 == 5  # the first and last quarter are exactly `head` and its shifted copy
    assert (divergence_warning(losses, 10, 0, 0.1) is not None) == warned


def test_a_rise_to_chance_is_a_collapse_from_95_percent_of_it():
    """A rise from a confident start that ends at >= 0.95 ln(n) is a collapse (near-uniform
    predictions; equal logits give exactly ln(n)), over ln(n) a divergence; under 0.95 ln(n) neither."""
    edge = COLLAPSE_FRACTION * math.log(10)
    assert COLLAPSE_FRACTION == 0.95
    assert divergence_warning([1.0] * 15 + [edge - 1e-9] * 5, 10, 0, 0.1) is None
    assert "training collapsed" in divergence_warning([1.0] * 15 + [edge] * 5, 10, 0, 0.1)
    assert "training collapsed" in divergence_warning([1.0] * 15 + [math.log(10)] * 5, 10, 0, 0.1)
    assert "training diverged" in divergence_warning([1.0] * 15 + [math.log(10) + 1e-9] * 5, 10, 0, 0.1)
    assert divergence_warning([math.log(10)] * 20, 10, 0, 0.1) is None  # at chance from the start: no rise


def test_fewer_than_twenty_steps_are_never_called_a_rise():
    """A smoke run's 4 steps are quarters of one step each, with no noise estimate: a small last batch
    (29 images) read as a 'diverged' rise; at 10 steps (the review's lr=1e-3 run: L_cls 1.71 1.57 2.24 0.92
    1.84 1.87 1.70 1.97 3.40 2.93 over 20 classes, a healthy task) two unlucky last batches did. From 20
    steps (quarters of 5) the rule applies."""
    assert divergence_warning([2.9, 3.0, 3.1, 3.5], 10, 0, 0.1) is None
    assert divergence_warning([1.71, 1.57, 2.24, 0.92, 1.84, 1.87, 1.7, 1.97, 3.4, 2.93], 20, 2, 1e-3) is None
    ramp = [1.0 + 3.0 * i / 19 for i in range(20)]
    assert divergence_warning(ramp[1:], 10, 0, 0.1) is None
    assert "training diverged" in divergence_warning(ramp, 10, 0, 0.1)


def test_a_task_spent_at_chance_after_one_that_learned_is_a_collapse():
    """lr=1 (the review's run): task 2's L_cls spiked (3.64 -> 12.2) in its first steps and came back to
    ln(20); tasks 3-5 sat at ln(20) throughout; last quarter-over-first showed no rise, so no warning. Now a
    task that did not learn (its last quarter not under 0.98 x its first's) with its mean and last quarter at
    >= 0.95 ln(n), after a task that ended under 0.8 of its chance, is flagged, at any step count. Not
    flagged: a model at chance from its first task (untrained), and a task that starts confidently wrong
    and falls toward chance (world-by-colour's healthy tasks 4, 5, 7: 1.38 -> 1.07 of ln(10)), which a
    spike-then-settle task like lr=1's task 2 cannot be told from by its loss: the task after it warns."""
    from segpcl_fast.engine.loss_history import cls_chance_fraction
    chance = math.log(20)
    task1 = [2.9, 2.5, 2.0, 1.6, 1.4, 1.3, 1.2, 1.2, 1.1, 1.1]
    task2 = [3.64, 4.75, 8.63, 12.2, 6.31, 8.43, 3.17, 3.01, 3.03, 3.09]
    task3 = [2.99, 3.01, 3.03, 3.05, 2.99, 3.02, 3.0, 3.04, 3.0, 2.99]
    learned = cls_chance_fraction(task1, 20)
    assert learned == pytest.approx(1.1 / chance)
    assert divergence_warning(task1, 20, 0, 1.0) is None
    message = divergence_warning(task3, 20, 2, 1.0, learned_before=learned)
    assert message.startswith("task 3: L_CLS stayed at chance level ln(20) = 2.996 or above (mean 3.012") and \
        "after an earlier task ended at 37% of its chance level: training collapsed" in message
    assert divergence_warning(task3, 20, 2, 1.0, learned_before=None) is None  # nothing learned before
    assert divergence_warning(task3, 20, 2, 1.0, learned_before=0.81) is None  # nor under 80 % of chance
    assert divergence_warning(task2, 20, 1, 1.0, learned_before=learned) is None  # fell: as a healthy task
    falling = [v * math.log(10) for v in (1.45, 1.31, 1.25, 1.2, 1.15, 1.12, 1.1, 1.08, 1.07, 1.07)]
    assert divergence_warning(falling, 10, 3, 0.01, learned_before=0.72) is None
    # a hard task that learned a little (its last quarter under 0.95 ln(n)) is not a collapse
    assert divergence_warning([3.0] * 8 + [2.8, 2.8], 20, 1, 1.0, learned_before=learned) is None


def test_a_task_ending_at_exactly_zero_loss_counts_as_learned(monkeypatch, caplog):
    """fp32 cross-entropy rounds to exactly 0 past a margin of ~17: a 0.0 fraction read as 'none yet', and
    the next task's fraction (at chance) took its place, so every later task at chance went unflagged."""
    chance = math.log(4)
    tr = _stub_trainer(monkeypatch, n_train=8, n_classes=(4, 4, 4, 4), optim__batch_size=1, epochs=1)
    said = []
    for t, losses in enumerate(([1.0, 0.7, 0.5, 0.2, 0.1, 0.0, 0.0, 0.0], [chance] * 8, [chance] * 8, [chance] * 8)):
        tr.train_step = lambda opt, images, labels, lr, step, t, global_n, scaler=None, losses=losses: {"cls": torch.tensor(losses[step])}
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="segpcl_fast.engine"):
            tr.train_task(t)
        said.append(any("training collapsed" in r.getMessage() for r in caplog.records))
    assert said == [False, True, True, True] and tr._learned_cls_fraction == 0.0


# ----------------------------------------------------------------------------- output dir

def _claiming_trainer(out, **cfg):
    tr = Trainer.__new__(Trainer)
    tr.cfg, tr.out, tr.log_fn = make_config(output_dir=str(out), **cfg), out, lambda msg: None
    return tr


def test_a_dir_holding_only_results_json_is_a_run_too(tmp_path):
    """A finished run.checkpoint=false run leaves results.json and no checkpoints: a new run there
    is refused like any other, and with run.overwrite the old results are removed."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"already holds a run \(results.json\)"):
        Trainer._claim_output_dir(_claiming_trainer(out))
    assert (out / "results.json").exists()
    Trainer._claim_output_dir(_claiming_trainer(out, run__overwrite=True))
    assert not (out / "results.json").exists()
    (out / ckpt.CHECKPOINT_DIR).mkdir()
    Trainer._claim_output_dir(_claiming_trainer(out))  # an empty checkpoints dir is no run


# ----------------------------------------------------------------------------- distributed helpers

@pytest.mark.parametrize("n", [0, 1, 5, 7, 10, 11])
@pytest.mark.parametrize("world", [3, 4])
def test_shard_slice_is_a_contiguous_near_equal_partition_for_any_world(n, world):
    items = list(range(n))
    chunks = [ddp.shard_slice(items, r, world) for r in range(world)]
    assert sum(chunks, []) == items  # contiguous, in rank order, nothing dropped or repeated
    sizes = [len(c) for c in chunks]
    assert max(sizes) - min(sizes) <= 1


def test_grad_sync_buckets_hold_at_most_the_cap_and_a_bucket_may_fill_it_exactly():
    """bucket_cap_mb is an upper bound: two 1 KiB parameters share a 2 KiB bucket, a third opens
    the next; buckets follow reverse parameter order. (Construction needs no process group.)"""
    params = [torch.nn.Parameter(torch.zeros(256)) for _ in range(5)]  # 1 KiB each in fp32
    sync = ddp.LoRAGradSync(params, ddp.DistContext(rank=0, world_size=2, backend="gloo"),
                            ddp.DDPSettings(bucket_cap_mb=2048 / 2 ** 20))
    try:
        assert [[next(i for i, q in enumerate(params) if q is p) for p in b] for b in sync.buckets] == [[4, 3], [2, 1], [0]]
        assert [f.numel() for f in sync.flat] == [512, 512, 256]
    finally:
        sync.remove()


# ----------------------------------------------------------------------------- run() on a stub

# (correct, correct_own, total) per task j <= t, as evaluate_seen returns them; test sets of 4 and 2
COUNTS = {0: [(3, 3, 4)], 1: [(1, 2, 4), (2, 2, 2)]}


def _run_trainer(out, calls, **cfg):
    tr = Trainer.__new__(Trainer)
    tr.cfg = make_config(output_dir=str(out), plots=False, progress=False, num_tasks=2, **cfg)
    tr.out, tr.log_fn, tr.dist, tr.device = out, lambda msg: None, ddp.DistContext(), torch.device("cpu")
    tr.scenario = SimpleNamespace(num_tasks=2, test_dataset=lambda j: [0] * (4, 2)[j], class_names=["a", "b", "c", "d"])
    tr.model = torch.nn.Linear(1, 1)
    tr.model.image_stats = ImageStats(8, (0.5,) * 3, (0.25,) * 3, resize_mode="squash", interpolation="bilinear")
    tr.model.quick_gelu = True  # CLIPModel.quick_gelu: its MLPs' activation
    tr.learner = SimpleNamespace(state_dict=lambda: {"n_seen": 2})
    tr.split_digest = "0123456789abcdef"

    def train_task(t):
        calls.append(("train", t))
        return {"timings": {"train_s": 0.0, "stage1_s": 0.0, "steps": 1}}

    def evaluate_seen(t):
        calls.append(("eval", t))
        return COUNTS[t]

    def forward_transfer(t):
        calls.append(("fwt", t))
        return 40.0 + t
    tr.train_task, tr.evaluate_seen, tr.forward_transfer = train_task, evaluate_seen, forward_transfer
    return tr


def test_run_fills_row_t_of_both_matrices_and_writes_them_with_a_checkpoint_per_task(tmp_path):
    """Row t of a[t][j] comes from the correct counts after task t, row t of the own-space matrix
    from the own-space counts; acc_t (the task log) is over all seen classes; results.json and
    one checkpoint per task hold them."""
    import json
    import numpy as np
    calls = []
    out = tmp_path / "run"
    result = Trainer.run(_run_trainer(out, calls))
    assert calls == [("train", 0), ("eval", 0), ("fwt", 1), ("train", 1), ("eval", 1)]
    nan = float("nan")
    np.testing.assert_equal(np.array(result.accuracy_matrix, dtype=float), [[75.0, nan], [25.0, 100.0]])
    np.testing.assert_equal(np.array(result.accuracy_matrix_own, dtype=float), [[75.0, nan], [50.0, 100.0]])
    assert result.acc_per_task == pytest.approx([75.0, 50.0])  # (1 + 2) / (4 + 2), not the own-space 4 / 6
    assert result.fwt_before == [None, 41.0]
    assert result.metrics["Last"] == pytest.approx(50.0) and result.metrics["Avg"] == pytest.approx(62.5)
    assert result.metrics["Forgetting"] == pytest.approx(50.0) and result.metrics["Forgetting_own"] == pytest.approx(25.0)
    saved = json.loads((out / "results.json").read_text())
    assert saved["acc_per_task"] == pytest.approx([75.0, 50.0])
    assert saved["matrix_own"] == result.accuracy_matrix_own and saved["fwt_before"] == [None, 41.0]
    assert saved["metrics"] == pytest.approx(result.metrics)
    for t in range(2):  # every task leaves its own checkpoint, holding the counts so far and the task log
        state = torch.load(ckpt.checkpoint_path(out, t), weights_only=True)
        assert state["task"] == t and len(state["task_info"]) == t + 1
        assert [info["acc"] for info in state["task_info"]] == pytest.approx([75.0, 50.0][:t + 1])
        assert state["correct"][t][:t + 1] == [c[0] for c in COUNTS[t]]
        assert state["correct_own"][t][:t + 1] == [c[1] for c in COUNTS[t]]
        assert state["image_geometry"] == {"resize_mode": "squash", "interpolation": "bilinear", "fill_color": 0}
        assert state["split_digest"] == "0123456789abcdef"  # which images were train and which test
        assert state["quick_gelu"] is True  # the model's activation
    assert ckpt.find_last_checkpoint(out).name == "task_01.pt"


# ----------------------------------------------------------------------------- non-finite gradients

class _SqrtLearner:
    """loss = sum(sqrt(w)) at w = 0: the loss is 0 (finite), its gradient +inf (not NaN)."""

    def loss(self, images, labels):
        loss = torch.sqrt(self.w).sum()
        return loss, {"cls": loss}


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_an_infinite_gradient_stops_the_step_before_the_update(grad_clip):
    from segpcl_fast.engine.trainer import make_optimizer
    w = torch.nn.Parameter(torch.zeros(3))
    tr = Trainer.__new__(Trainer)
    tr.cfg = make_config(optim__grad_clip=grad_clip)
    tr.device, tr.lora_params, tr.dist, tr.grad_sync = torch.device("cpu"), [w], ddp.DistContext(), None
    tr.learner = _SqrtLearner()
    tr.learner.w = w
    opt = make_optimizer([w], tr.cfg)
    with pytest.raises(FloatingPointError, match=r"LoRA B gradients are not finite at task 2, step 5 .*L_CLS=0\)"):
        Trainer.train_step(tr, opt, torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), 0.1, 5, 1, global_n=2)
    assert torch.equal(w.detach(), torch.zeros(3))  # the weights never saw the infinite gradient


@pytest.mark.parametrize("workers", [0, 1])
def test_a_rank_with_an_empty_slice_of_the_last_batch_gets_an_empty_batch(workers):
    """5 images, global batch 4, 2 ranks: the last global batch holds 1 image, so rank 0's slice is
    empty. Its loader must still yield that step (an empty batch: the rank joins the all-reduce with
    zero gradients) instead of failing in default_collate([]); rank 1 gets the image."""
    from segpcl_fast.engine.trainer import _train_loader
    ds = TensorDataset(torch.arange(5.0).view(5, 1), torch.arange(5))
    cfg = make_config(num_workers=workers, optim__batch_size=4)
    seen = []
    for rank in range(2):
        batches = list(_train_loader(ds, cfg, seed=0, ctx=ddp.DistContext(rank=rank, world_size=2, backend="gloo"),
                                     num_batches=2))
        assert len(batches) == 2
        assert [len(labels) for _, labels in batches] == ([2, 0] if rank == 0 else [2, 1])
        for images, labels in batches:
            assert images.shape[0] == len(labels) and labels.dtype == torch.long
            seen += labels.tolist()
    assert sorted(seen) == [0, 1, 2, 3, 4]


class _RandomDraws(torch.utils.data.Dataset):
    """Each item: one draw from the process's global torch RNG, as an augmentation makes."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.rand(1), i


def test_each_rank_draws_its_own_augmentation_in_its_workers():
    """Every rank seeded its loader's worker base seed alike, so the i-th image of every rank got the
    same crop and flip. Rank 0 keeps the 1-process stream, rank 1 has its own."""
    from segpcl_fast.engine.trainer import _train_loader

    def draws(rank, world, batch):
        cfg = make_config(num_workers=1, optim__batch_size=batch)
        ctx = ddp.DistContext(rank=rank, world_size=world, backend="gloo" if world > 1 else None)
        return torch.cat([x for x, _ in _train_loader(_RandomDraws(), cfg, seed=5, ctx=ctx, num_batches=2)])

    rank0, rank1 = draws(0, 2, 8), draws(1, 2, 8)
    assert torch.equal(rank0, draws(0, 2, 8))  # seeded: a rerun draws the same
    assert not torch.equal(rank0, rank1)
    single = draws(0, 1, 4)
    assert torch.equal(rank0, single[:len(rank0)])  # rank 0's worker stream is the 1-process one


def test_a_short_task_at_chance_is_not_called_a_collapse():
    """A review's smoke run (1 step a task): task 2's single step, on classes the model had not trained on, was
    at chance, and its first and last quarter were that one step, so "not under its first's" held trivially:
    it warned "training collapsed" and then scored 100 %. Under MIN_STEPS_AT_CHANCE steps no such warning;
    from that count the same at-chance losses warn."""
    from segpcl_fast.engine.loss_history import MIN_STEPS_AT_CHANCE
    assert MIN_STEPS_AT_CHANCE == 8
    learned = 0.01
    assert divergence_warning([0.842], 2, 1, 1e-3, learned_before=learned) is None
    at_chance = [3.0, 3.01, 2.99, 3.02, 3.0, 3.01, 3.0, 3.02]
    for n in range(1, MIN_STEPS_AT_CHANCE):
        assert divergence_warning(at_chance[:n], 20, 1, 1e-3, learned_before=learned) is None, n
    assert "stayed at chance" in divergence_warning(at_chance, 20, 1, 1e-3, learned_before=learned)
