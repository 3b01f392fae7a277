"""segpcl_fast.ablate: one table over variants and seeds; variants with the same config train once."""
import json

import pytest

from segpcl_fast.api import ablate
from segpcl_fast.config import ConfigError


def _tiny(tiny_model_name, out):
    return dict(model__name=tiny_model_name, model__pretrained=None, max_train_per_class=2, max_test_per_class=2,
                num_tasks=2, epochs=1, optim__batch_size=32, dpgd__k_adv=1, dpgd__k_seed=1, output_dir=str(out),
                progress=False, plots=False, num_threads=1)


def test_ablate_writes_one_row_per_variant_and_trains_a_shared_config_once(tiny_model_name, tmp_path):
    out = tmp_path / "abl"
    result = ablate(variants=["lora_finetune", "+prototype_transfer", "onlyclip"], seeds=[0, 1],
                    **_tiny(tiny_model_name, out))
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["lora_finetune", "+prototype_transfer", "onlyclip (= +prototype_transfer)"]
    # onlyclip is +prototype_transfer's config: reused, not retrained
    assert result["runs"]["onlyclip"] is result["runs"]["+prototype_transfer"]
    assert not (out / "onlyclip").exists()
    assert sorted(p.name for p in (out / "plus_prototype_transfer").iterdir()) == ["seed0", "seed1"]
    # each row is the mean over its seeds' results.json
    for name, folder in (("lora_finetune", "lora_finetune"), ("+prototype_transfer", "plus_prototype_transfer")):
        lasts = [json.loads((out / folder / f"seed{s}" / "results.json").read_text())["metrics"]["Last"]
                 for s in (0, 1)]
        assert rows[name]["Last"] == pytest.approx(sum(lasts) / 2)
        fwts = [json.loads((out / folder / f"seed{s}" / "results.json").read_text())["metrics"]["FWT"]
                for s in (0, 1)]
        assert rows[name]["FWT"] == pytest.approx(sum(fwts) / 2)  # the table has every metric train prints
    assert "| FWT " in (out / "ablation.txt").read_text().splitlines()[1]
    assert rows["onlyclip (= +prototype_transfer)"]["Last"] == rows["+prototype_transfer"]["Last"]
    saved = json.loads((out / "ablation.json").read_text())
    assert [r["method"] for r in saved["rows"]] == list(rows) and saved["seeds"] == [0, 1]
    assert "onlyclip (= +prototype_transfer)" in (out / "ablation.txt").read_text()


def test_ablate_checks_every_variant_before_running_any(tiny_model_name, tmp_path):
    with pytest.raises(ConfigError, match="unknown method variant 'segpcl\\+\\+'"):
        ablate(variants=["lora_finetune", "segpcl++"], **_tiny(tiny_model_name, tmp_path / "abl"))
    assert not (tmp_path / "abl").exists()


def test_ablate_checks_each_variant_against_the_config_and_its_seeds_before_running_any(tiny_model_name, tmp_path,
                                                                                       monkeypatch):
    """prototypes.beta = 0 with a variant that uses the prototype path: refused before lora_finetune trains (it
    was found at that variant, after the ones before it had trained), naming the variant and onlyclip as a variant;
    no seeds at all: refused (the table came out all n/a, then an IndexError)."""
    monkeypatch.setattr("segpcl_fast.api.train", lambda cfg: pytest.fail(f"trained {cfg.run.method}"))
    with pytest.raises(ConfigError, match=r"ablate: variant segpcl: method 'segpcl' uses the prototype path but "
                                          r"prototypes.beta = 0.0; .* or run the variant onlyclip instead of it"):
        ablate(variants=["lora_finetune", "segpcl"], prototypes__beta=0.0, **_tiny(tiny_model_name, tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"ablate\(\) needs at least one seed"):
        ablate(variants=["zeroshot"], seeds=[], **_tiny(tiny_model_name, tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_finished_ablation_run_again_without_resume_is_refused_keeping_its_tables(tiny_model_name, tmp_path):
    """The runs it plans are checked as the trainer will (a folder holding a run, no --resume) before the earlier
    tables are removed: run again, it was refused after ablation.{json,txt} had gone."""
    out = tmp_path / "abl"
    ablate(variants=["zeroshot"], **_tiny(tiny_model_name, out))
    table = (out / "ablation.txt").read_text()
    with pytest.raises(ConfigError, match="already holds a run .*continue it with --resume"):
        ablate(variants=["zeroshot"], **_tiny(tiny_model_name, out))
    assert (out / "ablation.txt").read_text() == table and (out / "ablation.json").is_file()
    resumed = ablate(variants=["zeroshot"], run__resume=True, **_tiny(tiny_model_name, out))  # rebuilt from its runs
    assert (out / "ablation.txt").read_text() == table and resumed["rows"][0]["method"] == "zeroshot"
