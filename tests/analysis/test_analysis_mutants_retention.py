"""Tests added by a mutation audit of segpcl_fast/analysis/retention.py: dataset specs in every
accepted form, zero-shot accuracy against a plain argmax of the CLIP path, the prompts and per-class
cap of each loaded set, and the orchestration (before = the untrained model, once; after = each
trained variant; change = after - before) with the trainings replaced by stand-ins."""
import importlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from test_analysis_retention_readers import make_food  # the Food-101 layout those reader tests build
from segpcl_fast.api import make_config
from segpcl_fast.config import ConfigError

ret = importlib.import_module("segpcl_fast.analysis.retention")  # the package exports a function of that name


def test_dataset_specs_other_forms(tmp_path, monkeypatch):
    assert ret.parse_dataset_specs([]) == {"synthetic-sketch": None, "synthetic-source": None}
    root = str(tmp_path)
    assert ret.parse_dataset_specs({"pets": root, "synthetic-source": None}) == {"pets": root,
                                                                               "synthetic-source": None}
    assert ret.parse_dataset_specs([f" pets = {root} "]) == {"pets": root}
    with pytest.raises(ConfigError, match="'imagenet' needs a data root"):
        ret.parse_dataset_specs(["imagenet"])
    with pytest.raises(ConfigError, match="'food101' needs a data root"):
        ret.parse_dataset_specs({"food101": None})
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "pets").mkdir()
    assert ret.parse_dataset_specs(["pets=~/pets"]) == {"pets": "~/pets"}


def test_zeroshot_accuracy_is_the_argmax_of_the_clip_path(tiny_model_name):
    from segpcl_fast.model.clip import load_model
    model = load_model(tiny_model_name, pretrained=None)
    prompts = [["a photo of a cat."], ["a photo of a dog."], ["a photo of a car."]]
    images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        text = model.class_embeddings(prompts)
        pred = (F.normalize(model.encode_image(images)[1], dim=-1) @ text.T).argmax(dim=1)
    labels = pred.clone()
    labels[::3] = (pred[::3] + 1) % 3  # 4 of the 12 wrong
    ds = torch.utils.data.TensorDataset(images, labels)
    assert ret.zeroshot_accuracy(model, ds, prompts, torch.device("cpu"), batch_size=5) == pytest.approx(800 / 12)
    with pytest.raises(ValueError, match="empty"):
        ret.zeroshot_accuracy(model, torch.utils.data.TensorDataset(images[:0], labels[:0]), prompts, "cpu")


def test_loaded_sets_use_their_own_templates_and_the_per_class_cap(tmp_path):
    cfg = make_config(data__templates=["art of a {}."])
    trainer = SimpleNamespace(test_tf=None, cfg=cfg)
    make_food(tmp_path)
    sets = ret._load_sets({"food101": str(tmp_path), "synthetic-sketch": None}, trainer, per_class=1)
    food, food_prompts = sets["food101"]
    assert len(food) == 2 and food_prompts == [["a photo of Apple pie, a type of food."],
                                               ["a photo of Baby back ribs, a type of food."]]
    sketch, sketch_prompts = sets["synthetic-sketch"]
    assert len(sketch) == 100 and sketch_prompts[0] == [f"art of a {sketch.class_names[0]}."]


class _StandInTrainer:
    """A 'model' that is 'pretrained' until run() trains it, which changes its accuracy by `change`."""

    def __init__(self, cfg, change):
        self.cfg, self.change = cfg, change
        self.model = SimpleNamespace(change=0.0)
        self.device, self.test_tf = torch.device("cpu"), None

    def run(self):
        self.model.change = self.change
        self.holds_final_weights = True
        return SimpleNamespace(metrics={"Avg": 90.0, "Last": self.change + 1, "BWT": -1.0})


class _FinishedWithoutCheckpoints(_StandInTrainer):
    """A resumed run that finished with run.checkpoint=false: run() answers from results.json, the model
    stays pretrained (what Trainer.run does; retention measured it as 'after' once)."""

    out = "runs/lora_finetune"

    def run(self):
        self.holds_final_weights = False
        return SimpleNamespace(metrics={"Avg": 90.0, "Last": self.change + 1, "BWT": -1.0})


class _Set(list):
    """A two-image stand-in dataset; `base` is the untrained model's accuracy on it."""
    class_names = ("a", "b")

    def __init__(self, base):
        super().__init__([0, 1])
        self.base = base


def test_before_is_the_untrained_model_and_change_is_after_minus_before(tmp_path, monkeypatch):
    built, figs = [], []

    def make(cfg):
        built.append(cfg)
        return _StandInTrainer(cfg, {"zeroshot": 0.0, "lora_finetune": -15.0, "segpcl": -3.0}[cfg.run.method])
    monkeypatch.setattr(ret, "make_trainer", make)
    bases = {"synthetic-sketch": 40.0, "synthetic-source": 30.0}
    monkeypatch.setattr(ret, "_load_sets", lambda specs, trainer, per_class: {d: (_Set(bases[d]), None) for d in specs})
    monkeypatch.setattr(ret, "zeroshot_accuracy", lambda model, ds, prompts, device, bs=256: ds.base + model.change)
    monkeypatch.setattr(ret, "save_png", lambda fig, path: figs.append(fig) or str(path))
    out = ret.retention(make_config(output_dir=str(tmp_path)), variants=["zeroshot", "lora_finetune", "segpcl"],
                        datasets=["synthetic-sketch", "synthetic-source"])
    assert [c.run.output_dir for c in built] == [str(tmp_path / "zeroshot"), str(tmp_path / "lora_finetune"),
                                                 str(tmp_path / "segpcl")]
    assert out["before"] == bases
    rows = {(r["dataset"], r["method"]): r for r in out["rows"]}
    assert [(rows["synthetic-sketch", m]["before"], rows["synthetic-sketch", m]["after"],
             rows["synthetic-sketch", m]["change"], rows["synthetic-sketch", m]["Last"])
            for m in ("zeroshot", "lora_finetune", "segpcl")] == [(40.0, 40.0, 0.0, 1.0), (40.0, 25.0, -15.0, -14.0),
                                                                 (40.0, 37.0, -3.0, -2.0)]
    assert rows["synthetic-source", "segpcl"]["after"] == 27.0 and rows["synthetic-source", "segpcl"]["before"] == 30.0
    line = next(ln for ln in out["table"].splitlines() if ln.startswith("synthetic-sketch | lora_finetune"))
    assert [c.strip() for c in line.split("|")][2:6] == ["40.00", "25.00", "-15.00", "-14.00"]
    # the plot: one bar per (dataset, method) at its after-accuracy, a dashed line per dataset at before
    ax = figs[0].axes[0]
    heights = [[bar.get_height() for bar in bars] for bars in ax.containers]
    assert heights == [[40.0, 30.0], [25.0, 15.0], [37.0, 27.0]]
    levels = sorted(float(seg[0][1]) for c in ax.collections for seg in c.get_segments())
    assert levels == [30.0, 40.0]


def test_an_unknown_variant_anywhere_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(ret, "make_trainer", lambda cfg: pytest.fail("built a trainer"))
    with pytest.raises(ConfigError, match="unknown method variant 'nope'"):
        ret.retention(make_config(output_dir=str(tmp_path)), variants=["zeroshot", "nope"])


def test_a_finished_run_without_its_weights_is_trained_again(tmp_path, monkeypatch):
    built = []

    def make(cfg):
        built.append(cfg)
        kind = _FinishedWithoutCheckpoints if len(built) == 1 else _StandInTrainer
        return kind(cfg, -15.0)
    monkeypatch.setattr(ret, "make_trainer", make)
    monkeypatch.setattr(ret, "_load_sets", lambda specs, trainer, per_class: {d: (_Set(40.0), None) for d in specs})
    monkeypatch.setattr(ret, "zeroshot_accuracy", lambda model, ds, prompts, device, bs=256: ds.base + model.change)
    out = ret.retention(make_config(output_dir=str(tmp_path), plots=False), variants=["lora_finetune"],
                        datasets=["synthetic-sketch"])
    assert [r["after"] for r in out["rows"]] == [25.0]  # the trained model's, not the pretrained 40
    assert len(built) == 2 and built[1].run.overwrite and not built[1].run.resume
    assert built[1].run.output_dir == built[0].run.output_dir


def test_retention_arguments_are_checked_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(ret, "make_trainer", lambda cfg: pytest.fail("built a trainer"))
    for kwargs, match in [({"per_class": -1}, "per_class must be a whole number >= 0"),
                          ({"variants": ["segpcl", "segpcl"]}, "variant 'segpcl' is given twice"),
                          ({"datasets": ["synthetic-source=/x"]}, "is generated, it takes no data root")]:
        with pytest.raises(ConfigError, match=match):
            ret.retention(make_config(output_dir=str(tmp_path)), **kwargs)
    with pytest.raises(ConfigError, match="run.resume is set but .*missing does not exist"):
        ret.retention(make_config(output_dir=str(tmp_path / "missing"), run__resume=True))
    # a real-data run scored on the offline world's toy sets by default: refused, --datasets named
    (tmp_path / "cifar").mkdir()
    cifar = make_config("cifar100", data__root=str(tmp_path / "cifar"), output_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="retention of a cifar100 run needs --datasets"):
        ret.retention(cifar)


def test_a_variant_that_clashes_with_the_config_fails_before_any_trains(tmp_path, monkeypatch):
    """The full check of every variant comes first: lora_finetune did train before segpcl met beta = 0."""
    monkeypatch.setattr(ret, "make_trainer", lambda cfg: pytest.fail(f"built a trainer for {cfg.run.method}"))
    with pytest.raises(ConfigError, match="retention: variant segpcl: .*prototypes.beta = 0.0"):
        ret.retention(make_config(output_dir=str(tmp_path), prototypes__beta=0.0), variants=["lora_finetune", "segpcl"])


# ----------------------------------------------------------------------------- mutation audit (analysis, 2026-12-07)

def test_a_variants_run_folder_is_its_slug(tmp_path, monkeypatch):
    """A variant named with a '+' trains in <output_dir>/plus_<name> (outputs.slug), as ablate's runs do, and its
    row names that folder (whose config.yaml is what the row trained)."""
    built = []

    def make(cfg):
        built.append(cfg)
        return _StandInTrainer(cfg, -2.0)
    monkeypatch.setattr(ret, "make_trainer", make)
    monkeypatch.setattr(ret, "_load_sets", lambda specs, trainer, per_class: {d: (_Set(40.0), None) for d in specs})
    monkeypatch.setattr(ret, "zeroshot_accuracy", lambda model, ds, prompts, device, bs=256: ds.base + model.change)
    out = ret.retention(make_config(output_dir=str(tmp_path), plots=False), variants=["+acgd"],
                        datasets=["synthetic-sketch"])
    assert [c.run.output_dir for c in built] == [str(tmp_path / "plus_acgd")]
    assert [r["run"] for r in out["rows"]] == [str(tmp_path / "plus_acgd")]


@pytest.mark.parametrize("resume", [True, False])
def test_a_resumed_retention_keeps_its_tables_until_it_writes_them_again(resume, tables_kept_only_on_resume):
    """A --resume keeps the earlier retention.{json,txt,png} (its runs' checkpoints may still refuse its config, as
    here); a new retention removes them before it trains."""
    tables_kept_only_on_resume(ret, "retention", lambda cfg: ret.retention(cfg, variants=["lora_finetune"]), resume)


def test_a_real_data_run_with_an_empty_dataset_list_is_refused_as_with_none(tmp_path, monkeypatch):
    """datasets=[] means the default sets as datasets=None does (parse_dataset_specs): a real-data run is refused
    either way, not scored on the offline world's toy sets."""
    monkeypatch.setattr(ret, "make_trainer", lambda cfg: pytest.fail("built a trainer"))
    (tmp_path / "cifar").mkdir()
    cifar = make_config("cifar100", data__root=str(tmp_path / "cifar"), output_dir=str(tmp_path / "c"))
    for datasets in (None, [], {}):
        with pytest.raises(ConfigError, match="retention of a cifar100 run needs --datasets"):
            ret.retention(cifar, datasets=datasets)


def test_a_method_keyword_is_refused_as_retention_trains_every_variant(tmp_path, monkeypatch):
    """retention sets run.method from each variants entry: a method= keyword would be overridden by every run, so
    it is refused, naming variants= instead."""
    monkeypatch.setattr(ret, "make_trainer", lambda cfg: pytest.fail("built a trainer"))
    with pytest.raises(ConfigError, match=r"retention\(\) does not take run.method \(it trains every variants entry: "
                                          r"pass variants=\['segpcl'\]\)"):
        ret.retention(output_dir=str(tmp_path), method="segpcl")
