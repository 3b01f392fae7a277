import pytest

from segpcl_fast.api import make_config


@pytest.fixture
def small_config(tiny_model_name, tmp_path):
    """The trainer tests' tiny setup: 2 tasks of 50 classes, 2 images per class, 1 epoch."""
    def make(out="run", **kw):
        base = dict(model__name=tiny_model_name, model__pretrained=None, max_train_per_class=2,
                    max_test_per_class=2, num_tasks=2, epochs=1, optim__batch_size=32, dpgd__k_adv=2,
                    dpgd__k_seed=2, output_dir=str(tmp_path / out), progress=False, num_threads=1, eval__fwt=False)
        base.update(kw)
        return make_config(**base)
    return make
