"""data.dataset=imagefolder: torchvision ImageFolder's layout (pre-split train/ + test/, or flat class folders
with a seeded split), read as torchvision.datasets.ImageFolder reads it (the peer), and one run end to end."""
import json

import pytest
import torch
from torchvision.datasets import ImageFolder

from data_fakes import decode_colour, write_image
from segpcl_fast.api import evaluate, make_config, train
from segpcl_fast.config import DataConfig
from segpcl_fast.data import build_datasets
from segpcl_fast.data.base import DatasetFormatError
from segpcl_fast.data.imagefolder import load_imagefolder

FOLDERS = ["golden_retriever", "Abyssinian", "tabby_cat", "zebra"]  # ImageFolder sorts by str: 'A' < 'g' < 't'


def _colour(c, i):
    return (10 + 20 * c, 5 + 10 * i, 100)


def make_tree(root, folders=FOLDERS, per_class=5, split=True, test_dir="test"):
    for c, folder in enumerate(sorted(folders)):
        for i in range(per_class):
            part = (test_dir if i % 2 else "train") if split else ""
            write_image(root / part / folder / f"img_{i}.png", _colour(c, i))
    return root


def test_a_presplit_tree_reads_as_torchvision_imagefolder_reads_it(tmp_path):
    root = make_tree(tmp_path / "ds")
    train, test = load_imagefolder(str(root))
    assert train.class_names == ["Abyssinian", "golden retriever", "tabby cat", "zebra"]
    for ds, part in ((train, "train"), (test, "test")):
        peer = ImageFolder(str(root / part))
        assert [p for p, _ in peer.samples] == ds.paths and peer.targets == ds.targets
        for i in range(len(ds)):
            img, label = ds[i]
            assert decode_colour(img)[0] == label
    train_v, test_v = load_imagefolder(str(make_tree(tmp_path / "v", test_dir="val")))
    assert len(test_v) == len(test) and train_v.class_names == train.class_names


def test_flat_folders_split_by_seed_and_fraction_alike_in_a_partial_copy(tmp_path):
    root = make_tree(tmp_path / "flat", per_class=10, split=False)
    train, test = load_imagefolder(str(root), test_fraction=0.3, split_seed=7)
    assert len(train) == 4 * 7 and len(test) == 4 * 3
    assert not set(train.paths) & set(test.paths)
    again = load_imagefolder(str(root), test_fraction=0.3, split_seed=7)[1]
    assert again.paths == test.paths  # seeded
    assert load_imagefolder(str(root), test_fraction=0.3, split_seed=8)[1].paths != test.paths
    partial = make_tree(tmp_path / "partial", folders=FOLDERS[1:], per_class=10, split=False)  # no golden_retriever
    part_test = load_imagefolder(str(partial), test_fraction=0.3, split_seed=7)[1]
    names = lambda ds, folder: sorted(p.rsplit("/", 1)[1] for p in ds.paths if f"/{folder}/" in p)  # noqa: E731
    for folder in FOLDERS[1:]:  # each class splits by its folder name, not its place among the classes
        assert names(part_test, folder) == names(test, folder)


def test_names_file_json_or_text_and_its_errors(tmp_path):
    root = make_tree(tmp_path / "ds")
    (tmp_path / "names.json").write_text(json.dumps({f: f"{f.lower()} dog" for f in FOLDERS}))
    train, _ = build_datasets(DataConfig(dataset="imagefolder", root=str(root), names_file=str(tmp_path / "names.json")))
    assert train.class_names == ["abyssinian dog", "golden_retriever dog", "tabby_cat dog", "zebra dog"]
    (root / "names.txt").write_text("".join(f"{f} the {f}\n" for f in FOLDERS))  # relative: found in data.root
    assert load_imagefolder(str(root), names_file="names.txt")[0].class_names[0] == "the Abyssinian"
    (root / "short.txt").write_text("zebra a zebra\n")
    with pytest.raises(DatasetFormatError, match="names no class for 3 of the 4 class folders"):
        load_imagefolder(str(root), names_file="short.txt")
    (root / "same.txt").write_text("".join(f"{f} Cat\n" for f in FOLDERS))
    with pytest.raises(DatasetFormatError, match="give the same class name"):
        load_imagefolder(str(root), names_file="same.txt")


def test_bad_trees_are_one_error_naming_the_layout(tmp_path):
    with pytest.raises(DatasetFormatError, match="holds no class folders"):
        load_imagefolder(str(tmp_path))
    flat = make_tree(tmp_path / "flat", split=False)
    (flat / "empty_class").mkdir()
    with pytest.raises(DatasetFormatError, match="holds no images"):
        load_imagefolder(str(flat))
    split = make_tree(tmp_path / "split")
    write_image(split / "test" / "unicorn" / "a.png", (1, 2, 3))  # a test class that train/ does not have
    with pytest.raises(DatasetFormatError, match="class folders that are not among"):
        load_imagefolder(str(split))
    clash = make_tree(tmp_path / "clash", folders=["tabby_cat", "tabby cat"])
    with pytest.raises(DatasetFormatError, match="give the same class name"):
        load_imagefolder(str(clash))
    with pytest.raises(DatasetFormatError, match="no data root given"):
        load_imagefolder(None)


def test_a_run_on_an_imagefolder_tree_trains_and_evaluates(tiny_model_name, tmp_path):
    root = make_tree(tmp_path / "ds", per_class=4)
    cfg = make_config(model__name=tiny_model_name, model__pretrained=None, data__dataset="imagefolder",
                      data__root=str(root), num_tasks=2, epochs=1, optim__batch_size=4, dpgd__k_adv=1,
                      dpgd__k_seed=1, output_dir=str(tmp_path / "run"), progress=False, plots=False, num_threads=1)
    torch.manual_seed(0)
    result = train(cfg)
    assert len(result.acc_per_task) == 2
    assert evaluate(tmp_path / "run")["acc"] == pytest.approx(result.acc_per_task[-1])
