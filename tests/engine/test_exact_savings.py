"""Savings that change no result: the teacher runs only in stage 1, reference text is computed once,
the student's text embeddings once per step, one image forward (images + anchors) per step."""

from segpcl_fast.api import make_config
from segpcl_fast.engine.trainer import Trainer
from segpcl_fast.method import anchors as stage1
from segpcl_fast.method import losses as stage2


def _config(model_name, out):
    return make_config(model__name=model_name, model__pretrained=None, max_train_per_class=2, max_test_per_class=1,
                       num_tasks=2, epochs=1, optim__batch_size=32, dpgd__k_adv=2, dpgd__k_seed=1,
                       output_dir=str(out), progress=False, plots=False, checkpoint=False, num_threads=1, fwt=False)


def _count(obj, name, counter, when=lambda: True):
    original = getattr(obj, name)

    def counted(*args, **kwargs):
        if when():
            counter[name] = counter.get(name, 0) + 1
        return original(*args, **kwargs)
    setattr(obj, name, counted)


def _frozen(model) -> bool:
    """The model under anchors.frozen_eval (stage 1's teacher; evaluation and stage 3 run it so too, to
    share its compiled no-grad graphs): nothing requires grad."""
    return not any(p.requires_grad for p in model.parameters())


def test_teacher_and_reference_text_run_once_text_once_per_step(tiny_model_name, tmp_path, monkeypatch):
    trainer = Trainer(_config(tiny_model_name, tmp_path / "run"))
    teacher_calls, teachers, graph_refs = {}, [], []
    training = [False]  # from the cached anchors to the task's stage 3: where a teacher could run again
    build = stage1.build_anchor_cache

    def build_and_watch(teacher, *args, **kwargs):
        cache = build(teacher, *args, **kwargs)
        teachers.append(teacher)  # from here on, any forward of the model as the frozen teacher is counted
        _count(teacher, "raw_features", teacher_calls, lambda: training[0] and _frozen(teacher))
        _count(teacher, "encode_text", teacher_calls, lambda: training[0] and _frozen(teacher))
        training[0] = True
        return cache
    monkeypatch.setattr(stage1, "build_anchor_cache", build_and_watch)
    end_task = trainer.learner.end_task

    def end_of_training(*args, **kwargs):
        training[0] = False
        return end_task(*args, **kwargs)
    trainer.learner.end_task = end_of_training
    graph_build = stage2.TSGRGraph.build.__func__

    def build_graph(cls, ref_text_all, *args, **kwargs):
        graph_refs.append(ref_text_all.untyped_storage().data_ptr())
        return graph_build(cls, ref_text_all, *args, **kwargs)
    monkeypatch.setattr(stage2.TSGRGraph, "build", classmethod(build_graph))

    student_calls, per_step = {}, []
    _count(trainer.model, "class_embeddings", student_calls)
    _count(trainer.model, "raw_features", student_calls)
    step = trainer.train_step

    def counted_step(*args, **kwargs):
        before = dict(student_calls)
        parts = step(*args, **kwargs)
        per_step.append({k: student_calls.get(k, 0) - before.get(k, 0) for k in ("class_embeddings", "raw_features")})
        return parts
    trainer.train_step = counted_step
    trainer.run()

    assert len(teachers) == 1  # task 2 built anchors once
    assert teacher_calls == {}  # the teacher never ran after its outputs were cached
    assert len(per_step) >= 4 and all(s == {"class_embeddings": 1, "raw_features": 1} for s in per_step)
    ref_ptr = trainer.learner.ref_text.untyped_storage().data_ptr()
    assert graph_refs == [ref_ptr, ref_ptr]  # both tasks' TSGR graphs read the one cached reference tensor
