"""What a user following the README ran into. Train runs and analyses keep out of each other's folders (found by following the README as a user:
`train --config cifar100` then `ablate --config cifar100` was refused; the other order mixed a train
run into the ablation's folder), and a new run into an occupied folder is refused before any data or
weights load."""
import pytest

import segpcl_fast
from segpcl_fast.cli import main
from segpcl_fast.api import make_config
from segpcl_fast.config import ConfigError, analysis_config, load_config, preset_output_dirs


def test_a_presets_default_folder_becomes_its_own_for_an_analysis():
    assert "runs/cifar100" in preset_output_dirs() and "runs/world-by-colour" in preset_output_dirs()
    assert analysis_config(load_config("cifar100"), "ablate").run.output_dir == "runs/cifar100-ablate"
    assert analysis_config(make_config(), "sweep").run.output_dir == "runs/sweep"
    assert analysis_config(make_config(run__output_dir="runs/mine"), "sweep").run.output_dir == "runs/mine"


def _fail_if_built(monkeypatch):
    from segpcl_fast.engine import trainer

    def refuse(*args, **kwargs):
        raise AssertionError("the trainer was built: data and weights would load before the refusal")
    monkeypatch.setattr(trainer.Trainer, "__init__", refuse)


def test_train_refuses_an_analysis_folder_before_loading(tmp_path, monkeypatch):
    run = tmp_path / "abl" / "segpcl" / "seed0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("run: {}\n")
    _fail_if_built(monkeypatch)
    with pytest.raises(ConfigError, match="holds an analysis' runs .*-o .*abl-train"):
        segpcl_fast.train(run__output_dir=str(tmp_path / "abl"))


def test_train_refuses_a_finished_run_before_loading(tmp_path, monkeypatch):
    out = tmp_path / "r"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "task_01.pt").write_bytes(b"")
    _fail_if_built(monkeypatch)
    with pytest.raises(ConfigError, match="already holds a run \\(task_01.pt\\)"):
        segpcl_fast.train(run__output_dir=str(out))


def test_profile_keeps_out_of_a_train_run(tmp_path, capsys):
    out = tmp_path / "ft"
    out.mkdir()
    (out / "config.yaml").write_text("run: {}\n")
    assert main(["profile", "--steps", "1", "-o", str(out)]) == 2
    assert "is a train run's folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_evaluate_names_a_typo_as_an_unknown_key(tmp_path):
    (tmp_path / "config.yaml").write_text("run: {}\n")
    with pytest.raises(ConfigError, match="unknown config key 'run.devcie' \\(did you mean run.device\\?\\)"):
        segpcl_fast.evaluate(tmp_path, ["run.devcie=cpu"])
    with pytest.raises(ConfigError, match="cannot override 'optim.lr'"):
        segpcl_fast.evaluate(tmp_path, ["optim.lr=0.1"])


def test_version_and_the_help_texts_a_user_reads(capsys):
    from segpcl_fast.version import __version__
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"segpcl-fast {__version__}"
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    from segpcl_fast.api import EVALUATE_OVERRIDABLE
    assert all(key in text for key in EVALUATE_OVERRIDABLE), text  # every key evaluate takes is listed


def test_another_model_with_the_offline_default_weights_says_to_set_them():
    from segpcl_fast.model.clip import ModelLoadError, _resolve_pretrained
    with pytest.raises(ModelLoadError, match="'segpcl-world' is the weights of segpcl-tiny.*set model.pretrained"):
        _resolve_pretrained("ViT-B-16", "segpcl-world", None)
    with pytest.raises(ModelLoadError) as typo:
        _resolve_pretrained("ViT-B-16", "opnai", None)
    assert "offline default" not in str(typo.value) and "known tags" in str(typo.value)


def test_reference_folder_errors_name_the_option_given_and_a_broken_image_as_a_reference_one(tmp_path):
    from PIL import Image

    from segpcl_fast.data.base import DatasetFormatError
    from segpcl_fast.data.retention import list_reference_images, load_reference_images
    with pytest.raises(DatasetFormatError, match="point --folder \\(folder=\\) at a folder"):
        list_reference_images(str(tmp_path / "missing"), "--folder (folder=)")
    with pytest.raises(DatasetFormatError, match="point acgd.source_folder at"):
        list_reference_images(str(tmp_path / "missing"))
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetFormatError, match="reference image .*broken.jpg.*delete it from the reference folder") as e:
        load_reference_images(str(tmp_path), lambda im: __import__("torch").zeros(3))
    assert "re-extract" not in str(e.value)
