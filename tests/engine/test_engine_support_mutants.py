"""Checks added by a mutation audit of the engine's support modules (segpcl_fast/engine: compiling,
accel, step_outcome, loss_history, tensorboard_log): each test here fails on a small semantic change (a
mutant) of that code which the rest of tests/ let through, and passes on the code as it is. Values are
hand-computed (exact floats where a rule has a boundary), or torch.compile / the optional packages are
stood in for by recording fakes (no GPU, no code generation).

Covered:
- accel: the xformers probe asks for ViT-B's attention (bf16, head size 64) on the GPU;
- step_outcome: a non-finite later term or total is a loss error (not an fp16 overflow to skip), the
  scaler's run of overflows stops exactly at the scale 2^-8, the gradient norm is the L2 norm of the
  gradients there are, the gradient error blames another rank only where there is one;
- loss_history: epoch_means refuses steps and epochs of other lengths, cls_chance_fraction of tasks under
  4 steps and of one class, the at-chance rule's boundaries (learned exactly at 80 %, a last quarter at
  exactly 95 % of ln(n), a mean under it, a first quarter not the first half, a fall of over 2 %), the rise
  rule's boundaries (exactly +10 %, exactly two Welch standard errors, sample variances);
- tensorboard_log: a task's curves are on disk at its end, before the writers close;
- compiling: SEGPCL_COMPILE_MODE read and checked by from_env, the C++-wrapper refusal for inductor only, the
  switches read while tracing checked up front for any backend; what torch.compile is given for each tower,
  a trunk compiled alone and the loss terms (dynamic, options), duck sizing off while they run, the image
  batch marked dynamic on dim 0, idempotence, the loss terms' code copy per loss settings, no output copies
  without inductor; _code_for's copies (a code object per structure: shapes, dtypes, requires_grad, buffers,
  constants; keyword defaults and attributes kept); inductor's skip log (its filter, its last reasons, its
  handler removed after the block, skips from before the first tower not said, several skips said
  together); uncompile of a trunk compiled alone and is_compiled for it; dynamo's counters as
  compile_counters reads them.
"""
import logging
import math
import re
import sys
import types

import pytest
import torch
from run_cases import first_token_model_name

from segpcl_fast.api import make_config
from segpcl_fast.engine import compiling
from segpcl_fast.engine import loss_history as lh
from segpcl_fast.engine import step_outcome as so

# ----------------------------------------------------------------------------- accel


def test_the_xformers_probe_asks_for_vitb_attention_in_bf16_on_the_gpu(monkeypatch):
    """With CUDA present, has_xformers runs xformers' attention once where training runs it: on the GPU, in
    bf16, at ViT-B's head size 64 (a wheel whose bf16 or head-64 kernels are missing must read as absent)."""
    from segpcl_fast.engine import accel
    from segpcl_fast.ops import mha
    for name in ("xformers", "xformers.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    asked = []
    monkeypatch.setattr(mha, "xformers_failure", lambda device, dtype, head: asked.append((device, dtype, head)))
    assert accel.has_xformers() is True
    assert asked == [(torch.device("cuda"), torch.bfloat16, 64)]


# ----------------------------------------------------------------------------- step_outcome


def test_a_nonfinite_later_term_or_total_is_a_loss_error_not_an_overflow():
    """The loss check reads the total loss: a NaN in a term after the first (L_GR) raises naming it even under
    a loss scaler (where non-finite gradients alone would be an overflow, skipped), and finite terms whose sum
    overflows to inf raise naming the total."""
    cfg = make_config()
    nan, inf = float("nan"), float("inf")
    gr_nan = so.StepOutcome(7, 1, {"cls": torch.tensor(0.5), "gr": torch.tensor(nan)}, torch.tensor(nan),
                            torch.tensor(inf), scaled=True)
    with pytest.raises(FloatingPointError, match=r"^loss is nan at task 2, step 7 \(non-finite term\(s\): L_GR\)"):
        gr_nan.values(cfg)
    assert not gr_nan.overflowed
    big = torch.tensor(3e38)
    summed = so.StepOutcome(2, 0, {"cls": big, "acgd": big}, big + big, torch.tensor(1.0))
    with pytest.raises(FloatingPointError, match=r"^loss is inf at task 1, step 2 \(non-finite term\(s\): total\)"):
        summed.values(cfg)


def test_the_loss_scaler_stops_the_run_when_its_scale_reaches_2_to_the_minus_8():
    """From GradScaler's 2^16, each skipped step halves the scale: the run stops at the overflow that takes it
    to 2^-8 (24 in a row), not one step earlier or later."""
    cfg = make_config(precision="fp16")
    skips = so.ScalerSkips()
    scale = {"now": 2.0 ** 16}
    scaler = types.SimpleNamespace(get_scale=lambda: scale["now"])
    done = None
    for n in range(1, 40):
        done = so.StepOutcome(n, 0, {"cls": torch.tensor(0.5)}, torch.tensor(0.5), torch.tensor(float("inf")),
                              scaled=True)
        parts = done.values(cfg)
        scale["now"] /= 2  # the scaler's update after the skipped step
        if scale["now"] > 2.0 ** -8:
            skips.note(done, parts, n, 0, cfg, scaler)
            continue
        with pytest.raises(FloatingPointError, match=r"not finite in 24 steps in a row at task 1, up to step 24, "
                                                     r"under fp16 loss scaling \(each skipped and the scale halved, "
                                                     r"to 0.00390625 now\)"):
            skips.note(done, parts, n, 0, cfg, scaler)
        break
    assert done.step == 24 and skips.in_a_row == 24


def test_the_gradient_norm_is_the_l2_norm_of_the_gradients_there_are():
    a, b, unused = (torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1)),
                    torch.nn.Parameter(torch.zeros(3)))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])
    assert float(so.total_grad_norm([a, unused, b])) == 13.0  # sqrt(9 + 16 + 144)


@pytest.mark.parametrize("world, peers", [(1, False), (2, True)])
def test_the_gradient_error_blames_another_rank_only_where_there_is_one(monkeypatch, world, peers):
    """Finite terms, non-finite gradients: under torchrun with other ranks the all-reduced gradients may carry
    another rank's bad loss, and the error says so; a process group of one (torchrun --nproc_per_node=1) has
    no other rank to blame."""
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: world)
    done = so.StepOutcome(3, 0, {"cls": torch.tensor(0.5)}, torch.tensor(0.5), torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError) as raised:
        done.values(make_config())
    said = str(raised.value)
    assert said.startswith("the LoRA B gradients are not finite at task 1, step 3 while every loss term ")
    assert ("another rank's loss was not finite" in said) == peers
    assert ("every loss term on this rank is (L_CLS=0.5)" in said) == peers
    assert ("every loss term is (L_CLS=0.5): a term's backward overflowed" in said) == (not peers)


# ----------------------------------------------------------------------------- loss_history


def test_epoch_means_refuses_steps_and_epochs_of_other_lengths():
    with pytest.raises(ValueError, match=r"epoch_means: 2 steps' losses but 3 epochs"):
        lh.epoch_means([{"cls": 1.0}, {"cls": 2.0}], [0, 0, 1])
    assert lh.epoch_means([{"cls": 1.0}, {"cls": 2.0}], [0, 0]) == [{"epoch": 1, "steps": 2, "cls": 1.5}]


def test_cls_chance_fraction_of_short_tasks_and_of_one_class():
    """The last quarter of a task's steps, at least its last step: a task of 1 to 3 steps is judged by its last
    step alone (a task of 3 steps falling 3.0, 2.0, 1.0 ended at 1.0, not at the mean 2.0); None steps are not
    steps; one class has no chance level (ln 1 = 0)."""
    assert lh.cls_chance_fraction([3.0, 2.0, 1.0], 20) == pytest.approx(1.0 / math.log(20))
    assert lh.cls_chance_fraction([3.0, None, 1.0], 20) == pytest.approx(1.0 / math.log(20))
    assert lh.cls_chance_fraction([2.0] * 6 + [1.0, 0.5], 20) == pytest.approx(0.75 / math.log(20))
    assert lh.cls_chance_fraction([], 20) is None
    assert lh.cls_chance_fraction([1.0], 1) is None


AT_CHANCE_20 = [3.0, 3.01, 2.99, 3.02, 3.0, 3.01, 3.0, 3.02]  # 8 steps at ln(20) = 2.996


def test_a_task_at_chance_is_flagged_only_after_one_under_80_percent_of_its_chance():
    assert "stayed at chance" in lh.divergence_warning(AT_CHANCE_20, 20, 1, 1e-3, learned_before=0.79)
    assert lh.divergence_warning(AT_CHANCE_20, 20, 1, 1e-3, learned_before=0.8) is None  # exactly 80 %: not learned


def test_a_last_quarter_at_exactly_95_percent_of_chance_is_at_chance():
    chance = math.log(20)
    edge = lh.COLLAPSE_FRACTION * chance
    assert edge / chance == lh.COLLAPSE_FRACTION  # exact here: the rule's boundary itself
    assert "stayed at chance" in lh.divergence_warning([edge] * 8, 20, 1, 1e-3, learned_before=0.5)
    below = math.nextafter(edge, 0.0)
    assert lh.divergence_warning([below] * 8, 20, 1, 1e-3, learned_before=0.5) is None


def test_a_task_whose_mean_is_under_chance_is_not_one_that_stayed_at_chance():
    """Its last quarter at chance and no fall, but a mean of 2.0 (its first half learned): the task did not stay
    at chance (under 20 steps no rise is judged either)."""
    losses = [1.0] * 4 + [3.0] * 4
    assert lh.cls_chance_fraction(losses, 20) >= lh.COLLAPSE_FRACTION
    assert lh.divergence_warning(losses, 20, 1, 1e-3, learned_before=0.5) is None


def test_at_chance_compares_the_last_quarter_with_the_first_quarter():
    """8 steps, quarters of 2: the first quarter 3.0, the second 3.5, the last 3.0: not under 0.98 x the first
    quarter's mean (3.0), so flagged (under 0.98 x the first half's 3.25, which the rule does not read)."""
    losses = [3.0, 3.0, 3.5, 3.5, 3.0, 3.0, 3.0, 3.0]
    assert "stayed at chance" in lh.divergence_warning(losses, 20, 1, 1e-3, learned_before=0.5)


def test_a_task_that_falls_by_over_2_percent_is_not_one_that_stayed_at_chance():
    """From 3.3 to 3.1 (a fall to 0.94 of its first quarter, still over 0.95 ln(20)): a task that learned, not
    flagged; a fall under 2 % (3.3 to 3.25) is no fall."""
    assert lh.divergence_warning([3.3, 3.3, 3.2, 3.2] + [3.1] * 4, 20, 1, 1e-3, learned_before=0.5) is None
    assert "stayed at chance" in lh.divergence_warning([3.3, 3.3, 3.2, 3.2] + [3.25] * 4, 20, 1, 1e-3,
                                                       learned_before=0.5)


def test_a_rise_of_exactly_ten_percent_is_not_a_divergence():
    """Noise-free quarters (20 steps, quarters of 5): 2.0 to exactly 1.1 x 2.0 is not over 10 %; above it is."""
    middle = [2.1] * 10
    assert lh.divergence_warning([2.0] * 5 + middle + [1.1 * 2.0] * 5, 8, 0, 0.1) is None
    assert "training diverged" in lh.divergence_warning([2.0] * 5 + middle + [2.3] * 5, 8, 0, 0.1)


def test_a_rise_of_exactly_two_welch_standard_errors_is_not_a_divergence():
    """Quarters of k = 8 steps with sample variance 28 / 7 = 4 each (deviations 3, -3, 2, -2, 1, -1, 0, 0): the
    standard error of the difference of the means is sqrt((4 + 4) / 8) = 1, the bar 2. A rise of exactly 2 is
    not over it (with population variances, 3.5, the bar would be 1.87); a rise of 2.25 is."""
    head = [7.0, 1.0, 6.0, 2.0, 5.0, 3.0, 4.0, 4.0]  # mean 4
    for rise, warned in ((2.0, False), (2.25, True)):
        losses = head + [5.0] * 16 + [v + rise for v in head]
        assert len(losses) // 4 == 8
        assert (lh.divergence_warning(losses, 100, 0, 0.1) is not None) == warned, rise


# ----------------------------------------------------------------------------- tensorboard_log


def test_a_tasks_curves_are_on_disk_at_its_end_before_the_writers_close(tmp_path):
    """log_task flushes both writers (SummaryWriter alone writes every 2 minutes): TensorBoard, reading a run
    still going, shows every finished task's accuracies and the steps before it."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from segpcl_fast.engine.tensorboard_log import TensorBoardLog
    board = TensorBoardLog(tmp_path, steps_done=0, tasks_done=0)
    try:
        board.log_step({"cls": 2.5}, 0.1)
        board.log_step({"cls": 2.0}, 0.05)
        board.log_task(1, [80.0], 80.0, 80.0)

        def scalars(name):
            acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard" / name))
            acc.Reload()
            return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
        assert scalars("steps") == {"loss/cls": [(0, 2.5), (1, 2.0)], "lr": [(0, pytest.approx(0.1)),
                                                                            (1, pytest.approx(0.05))]}
        assert scalars("tasks") == {"accuracy/task_01": [(1, 80.0)], "accuracy/seen_classes": [(1, 80.0)],
                                    "accuracy/avg": [(1, 80.0)]}
    finally:
        board.close()


def test_close_writes_the_steps_of_a_task_that_did_not_finish(tmp_path):
    """A run stopped inside a task (an error, an interrupt) closes its writers (Trainer.run's finally): the
    steps it trained since the last finished task are on disk, as a resume's purge_step expects."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from segpcl_fast.engine.tensorboard_log import TensorBoardLog
    board = TensorBoardLog(tmp_path, steps_done=0, tasks_done=0)
    for step in range(3):
        board.log_step({"cls": 1.0 + step}, 0.1)
    board.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard" / "steps"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss/cls")] == [(0, 1.0), (1, 2.0), (2, 3.0)]


# ----------------------------------------------------------------------------- compiling: settings


def test_the_compile_mode_comes_from_the_environment_and_is_checked_there(monkeypatch):
    monkeypatch.setenv("SEGPCL_COMPILE_MODE", "max-autotune-no-cudagraphs")
    monkeypatch.setenv("SEGPCL_COMPILE_BACKEND", "aot_eager")
    assert compiling.CompileSettings.from_env().mode == "max-autotune-no-cudagraphs"
    monkeypatch.setenv("SEGPCL_COMPILE_MODE", "fast")
    with pytest.raises(ValueError, match=r"compile mode 'fast' is unknown; choose one of \('default'"):
        compiling.CompileSettings.from_env()  # at the start of the run, not at the first compile


def test_the_cpp_wrapper_switch_is_an_inductor_one_only():
    """SEGPCL_COMPILE_CPP_WRAPPER=1 with a CUDA-graph mode is refused for inductor alone: another backend runs
    neither a C++ wrapper nor CUDA graphs, and its options are the backend alone."""
    for mode in compiling.CUDA_GRAPH_MODES:
        settings = compiling.CompileSettings(mode=mode, backend="aot_eager", cpp_wrapper=True)
        assert settings.options() == {"backend": "aot_eager"}


@pytest.mark.parametrize("name, value", [("SEGPCL_LORA_COMPILE", "c++"), ("SEGPCL_COMPILE_BATCH_MERGE", "yes")])
def test_the_switches_read_while_tracing_are_checked_before_it_whatever_the_backend(monkeypatch, name, value):
    """options() checks the switches the LoRA layers read while dynamo traces (where an error may reach the user as
    dynamo's "Observed exception", without its message), for every backend, not only where inductor's options
    happen to read one of them."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=re.escape(f"{name}={value!r} is unknown")):
        compiling.CompileSettings(backend="aot_eager").options()


# ----------------------------------------------------------------------------- compiling: what torch.compile gets


def _recording_compile(monkeypatch, returns=None):
    """torch.compile stood in for: each call recorded (the function, its keyword arguments, and whether duck
    sizing was on at each call of the result); the result runs the function, or returns `returns(name)`."""
    calls = []

    def fake_compile(fn, **kwargs):
        record = {"name": fn.__qualname__, "fn": fn, "kwargs": kwargs, "duck": []}
        calls.append(record)

        def compiled(*args, **kw):
            record["duck"].append(torch.fx.experimental._config.use_duck_shape)
            return returns(record["name"]) if returns else fn(*args, **kw)
        return compiled
    monkeypatch.setattr(compiling.torch, "compile", fake_compile)
    return calls


def test_compile_model_gives_each_tower_its_dynamic_setting_once(tiny_model_name, monkeypatch):
    """The image tower: dynamic=None (dynamo's choice) with its batch dimension (dim 0, the images themselves)
    marked dynamic before each call; the text tower: dynamic=True from the start and traced with duck sizing
    off; both with the settings' options. A second compile_model compiles nothing more. With dynamic_batch /
    dynamic_text off: no mark, and dynamic=None for the text tower too."""
    from segpcl_fast.model.clip import load_model
    calls = _recording_compile(monkeypatch)
    marks = []
    monkeypatch.setattr(torch._dynamo, "maybe_mark_dynamic", lambda t, dim: marks.append((t, dim)))
    model = load_model(tiny_model_name, pretrained=None)
    settings = compiling.CompileSettings(backend="aot_eager")
    assert compiling.compile_model(model, settings) == {"image": "CLIPModel.raw_features",
                                                         "text": "CLIPModel.text_features"}
    assert [(c["name"], c["kwargs"]) for c in calls] == [
        ("CLIPModel.raw_features", {"dynamic": None, "backend": "aot_eager"}),
        ("CLIPModel.text_features", {"dynamic": True, "backend": "aot_eager"})]
    bound = dict(model.__dict__)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.raw_features(x), type(model).raw_features(model, x))
        model.class_embeddings([["a dog."], ["a cat."]])
    assert len(marks) == 1 and marks[0][0] is x and marks[0][1] == 0
    assert calls[1]["duck"] == [False] and torch.fx.experimental._config.use_duck_shape  # off inside the call only
    compiling.compile_model(model, settings)
    assert len(calls) == 2
    assert model.__dict__["raw_features"] is bound["raw_features"]
    assert model.__dict__["text_features"] is bound["text_features"]
    compiling.uncompile_model(model)

    calls.clear()
    marks.clear()
    static = compiling.CompileSettings(backend="aot_eager", dynamic_batch=False, dynamic_text=False)
    compiling.compile_model(model, static)
    assert [c["kwargs"]["dynamic"] for c in calls] == [None, None]
    with torch.no_grad():
        model.raw_features(x)
    assert marks == []
    compiling.uncompile_model(model)


def test_a_trunk_compiled_alone_is_compiled_once_and_symbolic_from_the_start(tmp_path, monkeypatch):
    """A text tower the truncation does not apply to (pooling its first token): its trunk is compiled with
    dynamic=True, once however often compile_model is called."""
    from segpcl_fast.model.clip import load_model
    name = first_token_model_name(tmp_path, "support-tiny-first")
    calls = _recording_compile(monkeypatch)
    model = load_model(name, pretrained=None)
    trunk = model.text_tower.transformer
    assert not model.truncates_text
    for _ in range(2):
        done = compiling.compile_model(model, compiling.CompileSettings(backend="aot_eager"))
    assert done["text"] == f"{type(trunk).__name__}.forward (text trunk)"
    assert [(c["name"], c["kwargs"]["dynamic"]) for c in calls] == [("CLIPModel.raw_features", None),
                                                                     (f"{type(trunk).__name__}.forward", True)]
    compiling.uncompile_model(model)


class _StubLearner:
    """What compile_learner reads of a learner (compile_model is stubbed: the model is a plain module)."""

    def __init__(self, cfg):
        from segpcl_fast.method import losses
        self.cfg, self.model, self.loss_terms = cfg, torch.nn.Linear(2, 2), losses.training_losses


def test_compile_learner_compiles_the_loss_terms_once_per_learner_and_per_loss_settings(monkeypatch):
    """dynamic=True, the settings' options, duck sizing off while they run; marked as compiled (a second call
    compiles nothing more); a learner with other loss constants (tsgr.weight) gets a code copy of its own, one
    with the same ones shares it; settings.loss=False leaves the eager function."""
    from segpcl_fast.config import Config
    from segpcl_fast.method import losses
    monkeypatch.setattr(compiling, "compile_model", lambda model, settings=None: {})
    calls = _recording_compile(monkeypatch, returns=lambda name: "ran")
    settings = compiling.CompileSettings(backend="aot_eager")
    learner = _StubLearner(Config())
    assert not compiling.loss_terms_compiled(learner)
    assert compiling.compile_learner(learner, settings) == {"loss": "Learner.loss_terms (method/losses.py: "
                                                                     "training_losses)"}
    assert [(c["name"], c["kwargs"]) for c in calls] == [
        ("training_losses", {"dynamic": True, "backend": "aot_eager"})]
    assert compiling.loss_terms_compiled(learner) and learner.loss_terms is not losses.training_losses
    assert learner.loss_terms() == "ran" and calls[0]["duck"] == [False]
    compiling.compile_learner(learner, settings)
    assert len(calls) == 1

    compiling.compile_learner(_StubLearner(Config()), settings)
    other = Config()
    other.tsgr.weight = 2.0 * other.tsgr.weight
    compiling.compile_learner(_StubLearner(other), settings)
    assert calls[1]["fn"] is calls[0]["fn"]  # same structure and constants: dynamo's graphs shared
    assert calls[2]["fn"] is not calls[0]["fn"] and calls[2]["fn"].__code__ is not calls[0]["fn"].__code__

    eager = _StubLearner(Config())
    assert compiling.compile_learner(eager, compiling.CompileSettings(backend="aot_eager", loss=False)) == {}
    assert eager.loss_terms is losses.training_losses and len(calls) == 3


def test_no_output_copies_without_inductor_whatever_the_mode(tiny_model_name, monkeypatch):
    """The copies (and the skip warnings) are for inductor's CUDA graphs: another backend replays nothing, so a
    CUDA-graph mode named with it hands out the compiled functions' own outputs."""
    from segpcl_fast.config import Config
    from segpcl_fast.model.clip import load_model
    out = {"CLIPModel.raw_features": torch.zeros(2, 4), "training_losses": (torch.zeros(()), {})}
    _recording_compile(monkeypatch, returns=lambda name: out[name])
    settings = compiling.CompileSettings(mode="reduce-overhead", backend="aot_eager")
    model = load_model(tiny_model_name, pretrained=None)
    compiling.compile_model(model, settings)
    assert model.raw_features(torch.randn(2, 3, 32, 32)) is out["CLIPModel.raw_features"]
    compiling.uncompile_model(model)
    monkeypatch.setattr(compiling, "compile_model", lambda model, settings=None: {})
    learner = _StubLearner(Config())
    compiling.compile_learner(learner, settings)
    assert learner.loss_terms() is out["training_losses"]


# ----------------------------------------------------------------------------- compiling: code copies


def test_code_for_gives_one_code_object_per_structure_and_keeps_the_function_otherwise():
    """Dynamo counts graphs against its recompile limit per code object: each structure (parameter and buffer
    names, shapes, dtypes, devices, requires_grad, and the extra constants) gets a function with a code object
    of its own, shared by modules of that structure; the copy is the function otherwise (keyword-only
    defaults, attributes, name)."""
    def scaled(x, *, scale=2.0):
        return x * scale
    scaled.marker = "kept"

    def with_buffer(n):
        module = torch.nn.Linear(2, 3)
        module.register_buffer("stat", torch.zeros(n))
        return module
    code_for = compiling._code_for
    first = code_for(scaled, torch.nn.Linear(2, 3))
    assert first is code_for(scaled, torch.nn.Linear(2, 3))
    assert first.__code__ is not scaled.__code__ and first.__code__.co_code == scaled.__code__.co_code
    assert first(torch.ones(1)).item() == 2.0 and first(torch.ones(1), scale=3.0).item() == 3.0
    assert (first.__kwdefaults__, first.marker, first.__qualname__) == ({"scale": 2.0}, "kept", scaled.__qualname__)
    others = [code_for(scaled, torch.nn.Linear(3, 3)),  # another shape
              code_for(scaled, torch.nn.Linear(2, 3).requires_grad_(False)),  # frozen
              code_for(scaled, torch.nn.Linear(2, 3).double()),  # another dtype
              code_for(scaled, torch.nn.Linear(2, 3), 0.5)]  # other constants
    assert code_for(scaled, with_buffer(1)) is code_for(scaled, with_buffer(1))
    others.append(code_for(scaled, with_buffer(2)))  # a buffer of another shape
    codes = [first.__code__] + [fn.__code__ for fn in others] + [code_for(scaled, with_buffer(1)).__code__]
    assert len({id(c) for c in codes}) == len(codes)
    assert code_for(scaled, torch.nn.Linear(2, 3), 0.5) is others[3]


# ----------------------------------------------------------------------------- compiling: inductor's skips


def test_the_skip_log_keeps_only_the_last_cudagraph_messages():
    handler = compiling._SkipReasons(keep=2)
    logger = logging.getLogger("segpcl_fast.tests.skip_log")
    logger.addHandler(handler)
    try:
        for message in ("skipping cudagraphs due to a", "skipping cudagraphs due to b",
                        "a perf hint about something else", "skipping cudagraphs due to c"):
            logger.warning(message)
    finally:
        logger.removeHandler(handler)
    assert handler.reasons == ["skipping cudagraphs due to b", "skipping cudagraphs due to c"]


def test_cudagraph_skips_reads_torch_2_6s_perf_hints_logger_too():
    """torch 2.6 logs its "skipping cudagraphs" messages to inductor's perf-hints logger, later versions to the
    cudagraphs artifact logger: a reason logged to either is caught."""
    with compiling.cudagraph_skips() as found:
        for name, reason in zip(compiling.CUDAGRAPH_LOGGERS, ("skipping cudagraphs due to a",
                                                              "skipping cudagraphs due to b")):
            logging.getLogger(name).warning(reason)
    assert found["reasons"] == ["skipping cudagraphs due to a", "skipping cudagraphs due to b"]
    assert compiling.CUDAGRAPH_LOGGERS[1] == "torch._inductor.cudagraph_utils.__perf_hints"


def test_cudagraph_skips_leaves_no_handler_behind():
    before = [list(logging.getLogger(name).handlers) for name in compiling.CUDAGRAPH_LOGGERS]
    with compiling.cudagraph_skips():
        pass
    assert [list(logging.getLogger(name).handlers) for name in compiling.CUDAGRAPH_LOGGERS] == before


def test_skips_found_in_one_call_are_said_together_and_older_ones_not_at_all(caplog, monkeypatch):
    """The first tower's wrapper (which installs the skip log) takes the skips inductor counted before it as
    seen; two graphs skipped within one call are one warning with both reasons."""
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter
    log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to an older graph")
    monkeypatch.setattr(compiling, "_skip_log", None)  # as in a new process: the first wrapper installs it
    monkeypatch.setattr(compiling, "_skips_reported", 0)

    def tower(x):
        if x == 2:
            log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (1 instances)")
            log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to cpu device (x)")
        return x
    run = compiling._warning_on_skips(tower, "reduce-overhead", "the text tower")
    installed = compiling._skip_log
    try:
        with caplog.at_level("WARNING", logger="segpcl_fast.engine"):
            run(1)
            run(2)
            run(3)
    finally:
        for name in compiling.CUDAGRAPH_LOGGERS:
            logging.getLogger(name).removeHandler(installed)
    warned = [r.getMessage() for r in caplog.records if r.name == "segpcl_fast.engine"]
    assert warned == [(
        "torch.compile mode 'reduce-overhead': 2 compiled graph(s) ran without CUDA graphs, seen after the text "
        "tower (skipping cudagraphs due to mutated inputs (1 instances); skipping cudagraphs due to cpu device (x)); "
        "they still run, compiled, with a launch per kernel")]


# ----------------------------------------------------------------------------- compiling: uncompile, counters


def test_uncompile_unbinds_a_trunk_compiled_alone_and_such_a_model_counts_as_compiled():
    trunk = torch.nn.Linear(2, 2)
    text_tower = torch.nn.Module()
    text_tower.transformer = trunk
    model = types.SimpleNamespace(text_tower=text_tower, raw_features=lambda images: images)
    trunk.forward = lambda x: x  # a tower run whole: its trunk compiled, no text_features bound
    assert compiling.is_compiled(model)
    compiling.uncompile_model(model)
    assert "forward" not in trunk.__dict__ and not compiling.is_compiled(model)
    torch.testing.assert_close(trunk(torch.ones(2)), torch.nn.functional.linear(torch.ones(2), trunk.weight,
                                                                                 trunk.bias))


def test_compile_counters_read_dynamos_frames_graphs_and_breaks():
    """A function with one graph break compiles two graphs in two frames, and the break is counted by reason; a
    frame dynamo skips is not counted as converted."""
    def broken(x):
        x = x + 1
        torch._dynamo.graph_break()
        return x * 2
    before = compiling.compile_counters()
    assert torch.equal(torch.compile(broken, backend="eager")(torch.ones(2)), torch.full((2,), 4.0))
    after = compiling.compile_counters()
    assert after["unique_graphs"] - before["unique_graphs"] == 2
    assert after["frames_ok"] - before["frames_ok"] >= 2
    assert sum(after["graph_breaks"].values()) > sum(before["graph_breaks"].values())
    if hasattr(torch._dynamo, "skip_frame"):  # a frame dynamo gives up on is tried, not converted: not "ok"
        def skipped(x):
            torch._dynamo.skip_frame()
            return x + 1
        assert torch.equal(torch.compile(skipped, backend="eager")(torch.ones(2)), torch.full((2,), 2.0))
        assert compiling.compile_counters()["frames_ok"] == after["frames_ok"]
