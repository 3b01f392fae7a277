"""Mutation audit of the changes since 6d39d5b (config, api, classifier, data roots, checkpoint, lora, clip, pgd):
the mutants the existing suite let live, each killed here by a property a wrong implementation breaks.

- config.keys_set_by_user_file: a `base:` chain that loops ends (each file read once), the keys of both files;
- api.keeps_process_state: the analyses it wraps name themselves for a refused resume (distill_sources as the
  command distill-sources), and the name is given back after the call;
- checkpoint.load_checkpoint of a damaged file beside a `last` pointer that is no text: the CheckpointError
  without the pointer, not a UnicodeDecodeError;
- data.files.require_root on an archive: the extract command for .tar.xz / .tar.bz2 and an upper-case .TAR.GZ,
  extracting beside the archive (tar -C / unzip -d its folder);
- imagenet_subset: no expected_classes hint for an empty train/ nor for one with more wnid folders than asked
  for; a shared data root names first the copy whose train/ holds n_classes wnid folders (no class list);
  Kaggle's imagenet100 with a val image copied into a train.X part is refused as images in both splits;
- imagefolder: a root whose only folder holds one class folder is not suggested; a names file spelled .JSON
  gets the JSON fix;
- ucf101's per-video frames hint: no folder without v_ entries, never a hidden one, the first one by name;
- classifier.image_paths' class-folder hint: three folders named with no "...", four with it, hidden ones left
  out; a whole zip that is no torch file "cannot be read" (not "damaged");
- inject_lora refuses a full backward hook on a layer it replaces;
- ops.pgd_step(inplace=True) where only grad requires grad: autograd sees it (grad gets its zero gradient);
- model.clip.configs_fitting of a state dict whose image positional embedding has no rows: [] (no ValueError).
"""
import os
import sys
import zipfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/kernels/conftest.py: the Triton kernels on CPU tensors

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "data"))
from data_fakes import IN_SUBSET, IN_SYNSETS, make_imagenet_subset, make_ucf101  # noqa: E402

from segpcl_fast.data.base import DatasetFormatError  # noqa: E402


def _image(path: Path, rgb=(1, 2, 3)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 6), rgb).save(path)


# ----------------------------------------------------------------------------- config / api / checkpoint

def test_keys_set_by_user_file_ends_on_a_base_chain_that_loops(tmp_path, monkeypatch):
    from segpcl_fast import config
    (tmp_path / "a.yaml").write_text("base: b.yaml\noptim:\n  lr: 0.1\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nrun:\n  precision: fp32\n")
    read = []
    real = config._read_yaml

    def counted(p):
        read.append(Path(p).name)
        if len(read) > 10:
            raise AssertionError(f"read {read}: the base chain never ends")
        return real(p)
    monkeypatch.setattr(config, "_read_yaml", counted)
    assert config.keys_set_by_user_file(tmp_path / "a.yaml") == {"optim.lr", "run.precision"}
    assert sorted(read) == ["a.yaml", "b.yaml"]


def test_an_analysis_wrapped_by_keeps_process_state_names_its_command():
    from segpcl_fast.api import keeps_process_state
    from segpcl_fast.engine.checkpoint import resuming_analysis_name

    @keeps_process_state
    def distill_sources():
        return resuming_analysis_name()
    assert distill_sources() == "distill-sources"
    assert resuming_analysis_name() is None


def test_a_damaged_checkpoint_beside_a_pointer_that_is_no_text(tmp_path):
    from segpcl_fast.engine import checkpoint as ckpt
    ckpt.save_task_checkpoint(tmp_path, 0, {"task": 0})
    path = ckpt.checkpoint_path(tmp_path, 0)
    path.write_bytes(path.read_bytes()[:40])
    (tmp_path / ckpt.CHECKPOINT_DIR / ckpt.LAST_POINTER).write_bytes(b"\xff\xfe\x00task")
    with pytest.raises(ckpt.CheckpointError, match="cannot be read") as e:
        ckpt.load_checkpoint(path, purpose="resume")
    assert "it names this file" not in str(e.value)


# ----------------------------------------------------------------------------- data roots

@pytest.mark.parametrize("archive,command", [("imagenet-r.tar.xz", "tar xf"), ("CUB_200_2011.tar.bz2", "tar xf"),
                                             ("CIFAR-100-PYTHON.TAR.GZ", "tar xf"), ("UCF101.zip", "unzip")])
def test_require_root_on_an_archive_extracts_it_beside_itself(tmp_path, archive, command):
    from segpcl_fast.data.files import require_root
    path = tmp_path / "downloads" / archive
    path.parent.mkdir()
    path.write_bytes(b"\x1f\x8b")
    with pytest.raises(DatasetFormatError) as e:
        require_root(str(path), "cifar100", "LAYOUT")
    where = "-C" if command == "tar xf" else "-d"
    assert f"extract it first ({command} {path} {where} {path.parent})" in str(e.value), str(e.value)


def test_imagenet_subset_hints_expected_classes_only_for_a_smaller_copy(tmp_path):
    from segpcl_fast.data.imagenet_subset import load_imagenet_subset
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    with pytest.raises(DatasetFormatError, match="no class list") as e:
        load_imagenet_subset(str(empty))
    assert "expected_classes" not in str(e.value), str(e.value)
    bigger = make_imagenet_subset(tmp_path / "big", class_list=False)  # 5 wnid folders
    with pytest.raises(DatasetFormatError, match="no class list") as e:
        load_imagenet_subset(str(bigger), n_classes=3)
    assert "expected_classes" not in str(e.value), str(e.value)


def test_a_shared_root_names_the_copy_cut_to_the_class_count_first(tmp_path):
    from segpcl_fast.data.imagenet_subset import load_imagenet_subset
    make_imagenet_subset(tmp_path / "a_full", class_list=False)  # 5 wnid folders: another dataset
    for wnid in IN_SUBSET:  # 3 wnid folders, no class list: the subset, cut to its classes
        _image(tmp_path / "b_cut" / "train" / wnid / "x.JPEG")
    with pytest.raises(DatasetFormatError, match=f"set data.root={tmp_path / 'b_cut'} "):
        load_imagenet_subset(str(tmp_path), n_classes=3)


def test_kaggle_imagenet100_with_a_val_image_in_train_is_refused(tmp_path):
    import json
    from segpcl_fast.data.imagenet_subset import load_imagenet_subset
    root = tmp_path / "imagenet100"
    for k, wnid in enumerate(sorted(IN_SUBSET)):
        for i in range(2):
            _image(root / "train.X1" / wnid / f"{wnid}_{i}.JPEG", (k, i, 0))
            _image(root / "val.X" / wnid / f"v_{i}.JPEG", (k, i, 9))
    (root / "Labels.json").write_text(json.dumps({w: IN_SYNSETS[w] for w in IN_SUBSET}))
    train, val = load_imagenet_subset(str(root))
    assert len(train) == len(val) == 6
    wnid = sorted(IN_SUBSET)[0]
    (root / "train.X1" / wnid / "v_0.JPEG").write_bytes((root / "val.X" / wnid / "v_0.JPEG").read_bytes())
    with pytest.raises(DatasetFormatError, match="(?s)1 images are in both train and test.*keep each image"):
        load_imagenet_subset(str(root))


def test_imagefolder_does_not_suggest_a_folder_holding_one_class_folder(tmp_path):
    from segpcl_fast.data.imagefolder import load_imagefolder
    for i in range(2):
        _image(tmp_path / "root" / "x" / "only" / f"{i}.jpg")
    with pytest.raises(DatasetFormatError, match="holds 1 class folder") as e:
        load_imagefolder(str(tmp_path / "root"))
    assert "looks like the dataset" not in str(e.value), str(e.value)


def test_an_upper_case_json_names_file_gets_the_json_fix(tmp_path):
    import json
    from segpcl_fast.data.imagefolder import load_imagefolder
    for name in ("ant", "bee"):
        for i in range(3):
            _image(tmp_path / "ds" / name / f"{i}.jpg")
    (tmp_path / "ds" / "NAMES.JSON").write_text(json.dumps({"ant": "an ant"}))
    with pytest.raises(DatasetFormatError, match="names no class for 1 of the 2") as e:
        load_imagefolder(str(tmp_path / "ds"), names_file="NAMES.JSON")
    assert str(e.value).splitlines()[-1] == 'Fix: add an entry "<folder>": "<name>" for each class folder'


def _ucf_lists(root: Path) -> Path:
    import shutil
    make_ucf101(root, layout="frames")
    shutil.rmtree(root / "UCF-101-frames")
    return root


def test_ucf101_names_the_first_visible_per_video_folder_and_no_other(tmp_path):
    from segpcl_fast.data.ucf101 import load_ucf101
    root = _ucf_lists(tmp_path / "ucf")
    with pytest.raises(DatasetFormatError) as e:  # only ucfTrainTestlist/: its files are no videos
        load_ucf101(str(root))
    assert str(e.value).rstrip().endswith("extract frames there, or set data.frames_dir"), str(e.value)
    for folder in (".cache", "b_frames", "a_frames"):
        (root / folder / "v_ApplyEyeMakeup_g01_c01").mkdir(parents=True)
    with pytest.raises(DatasetFormatError) as e:
        load_ucf101(str(root))
    assert str(e.value).rstrip().endswith("set data.frames_dir=a_frames"), str(e.value)


# ----------------------------------------------------------------------------- classifier

@pytest.mark.parametrize("names,listed", [(["a", "b", "c"], "a, b, c)"), (["a", "b", "c", "d"], "a, b, c, ...)")])
def test_image_paths_names_three_class_folders_then_an_ellipsis(tmp_path, names, listed):
    from segpcl_fast.classifier import image_paths
    for name in [".ipynb_checkpoints"] + names:
        (tmp_path / "split" / name).mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as e:
        image_paths([tmp_path / "split"])
    assert f"only folders ({listed}:" in str(e.value), str(e.value)
    assert f"e.g. {tmp_path / 'split' / 'a'}" in str(e.value) and ".ipynb" not in str(e.value)


def test_a_whole_zip_that_is_no_torch_file_is_not_called_damaged(tmp_path):
    from segpcl_fast.classifier import ClassifierError, load_classifier
    with zipfile.ZipFile(tmp_path / "model.pt", "w") as z:
        z.writestr("a.txt", "hello")
    with pytest.raises(ClassifierError, match="cannot be read .*not a segpcl_fast checkpoint or export") as e:
        load_classifier(tmp_path / "model.pt")
    assert "is damaged" not in str(e.value)


# ----------------------------------------------------------------------------- lora, pgd, clip

def test_inject_lora_refuses_a_full_backward_hook_on_a_replaced_layer(tiny_model_name):
    from segpcl_fast.model.clip import load_model
    from segpcl_fast.model.lora import inject_lora, lora_parameters
    model = load_model(tiny_model_name, pretrained=None)
    model.clip.transformer.resblocks[0].mlp.c_fc.register_full_backward_hook(lambda *a: None)
    with pytest.raises(ValueError, match=r"carry a hook \(e.g. .*c_fc\)"):
        inject_lora(model, rank=2, targets=["c_fc"])
    assert not lora_parameters(model) and all(p.requires_grad for p in model.parameters())


@pytest.mark.skipif(os.environ["TRITON_INTERPRET"].lower() not in ("1", "true", "yes", "on"),
                    reason="CPU Triton needs TRITON_INTERPRET=1 (tests/kernels runs the CUDA variants)")
def test_pgd_step_in_place_with_only_grad_tracked_is_seen_by_autograd():
    from segpcl_fast import ops
    from segpcl_fast.kernels import pgd_step as kernel
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(2, 3, 4, 4, generator=g)
    x_adv = (x0 + 0.02 * torch.randn(2, 3, 4, 4, generator=g)).clamp(0, 1)
    grad = torch.randn(2, 3, 4, 4, generator=g).requires_grad_(True)
    with ops.backend("triton"):
        out = ops.pgd_step(x_adv.clone(), grad, x0, 0.01, 0.03, 0.0, 1.0, inplace=True)
    assert out.requires_grad
    out.sum().backward()
    assert torch.equal(grad.grad, torch.zeros_like(grad))
    c = torch.full((3,), 1.0)
    expected = kernel.pgd_step_reference(x_adv, grad.detach(), x0, 0.01 * c, 0.03 * c, 0.0 * c, c)
    assert torch.equal(out.detach(), expected)


def test_configs_fitting_of_an_image_embedding_without_rows_is_empty(tiny_model_name):
    from segpcl_fast.model.clip import configs_fitting, load_model
    state = load_model(tiny_model_name, pretrained=None).clip.state_dict()
    assert tiny_model_name in configs_fitting(state)  # (with configs of the same sizes other tests registered)
    width = state["visual.positional_embedding"].shape[1]
    assert configs_fitting({**state, "visual.positional_embedding": torch.empty(0, width)}) == []
