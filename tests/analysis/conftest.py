import pytest

from segpcl_fast.api import make_config
from segpcl_fast.config import ConfigError


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


@pytest.fixture
def tables_kept_only_on_resume(monkeypatch, tmp_path):
    """check(module, stem, analysis, resume): `analysis(cfg)` (output_dir tmp_path) over earlier <stem>.{json,txt,png},
    with the module's make_trainer refusing (its run's checkpoints may still refuse its config). A --resume keeps the
    earlier tables until it writes them again; a new analysis removes them before it trains."""
    def check(module, stem, analysis, resume):
        def refused(cfg):
            raise ConfigError("checkpoint ... was made with a different config")
        monkeypatch.setattr(module, "make_trainer", refused)
        for suffix in (".json", ".txt", ".png"):
            (tmp_path / f"{stem}{suffix}").write_text(f"the earlier {stem}'s")
        with pytest.raises(ConfigError, match="different config"):
            analysis(make_config(output_dir=str(tmp_path), run__resume=resume))
        assert sorted(p.name for p in tmp_path.glob(f"{stem}.*")) == \
            ([f"{stem}.json", f"{stem}.png", f"{stem}.txt"] if resume else [])
    return check
