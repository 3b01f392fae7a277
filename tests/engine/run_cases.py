"""Shared by the engine tests: a tiny run's config, a run killed at a chosen task, a tiny model whose text tower
pools its first token."""
import json

import open_clip

from segpcl_fast.api import make_config
from segpcl_fast.engine.trainer import Trainer


def small_config(tiny_model_name, out, **kw):
    base = dict(model__name=tiny_model_name, model__pretrained=None, max_train_per_class=2, max_test_per_class=2,
                num_tasks=2, epochs=1, optim__batch_size=32, dpgd__k_adv=2, dpgd__k_seed=2, output_dir=str(out),
                progress=False, num_threads=1)
    base.update(kw)
    return make_config(**base)


def crash_at_task(monkeypatch, task: int = 0) -> None:
    """Trainer.train_task raises KeyboardInterrupt (a killed run) at 0-based task `task`, after the
    earlier tasks trained and were checkpointed as usual."""
    original = Trainer.train_task

    def crash(self, t):
        if t == task:
            raise KeyboardInterrupt("simulated crash")
        return original(self, t)
    monkeypatch.setattr(Trainer, "train_task", crash)


def first_token_model_name(tmp_path, name: str) -> str:
    """Registers with open_clip a tiny CLIP `name` whose text tower pools its first token (one the text
    truncation does not apply to), its config written under tmp_path; returns the name."""
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 48, "patch_size": 8,
                                           "head_width": 16},
           "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                        "pool_type": "first"}}
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    return name
