"""Retention readers on tiny fakes of each on-disk format, the reference-folder loader, and errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from segpcl_fast.analysis.retention import parse_dataset_specs
from segpcl_fast.config import ConfigError
from segpcl_fast.data.base import DatasetFormatError
from segpcl_fast.data.retention import (build_retention_dataset, list_reference_images, load_food101,
                                        load_imagenet_val, load_pets, load_reference_images)


def _img(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), value, dtype=np.uint8)).save(path)


def make_food(root):
    base = root / "food-101"
    (base / "meta").mkdir(parents=True)
    (base / "meta/classes.txt").write_text("apple_pie\nbaby_back_ribs\n")
    (base / "meta/labels.txt").write_text("Apple pie\nBaby back ribs\n")
    (base / "meta/test.txt").write_text("apple_pie/11\nbaby_back_ribs/22\nbaby_back_ribs/23\n")
    (base / "meta/train.txt").write_text("apple_pie/10\n")
    for rel, v in (("apple_pie/10", 5), ("apple_pie/11", 10), ("baby_back_ribs/22", 20), ("baby_back_ribs/23", 30)):
        _img(base / "images" / f"{rel}.jpg", v)
    return base


def test_food101_test_split_and_names(tmp_path):
    make_food(tmp_path)
    for root in (tmp_path, tmp_path / "food-101"):
        ds = load_food101(str(root))
        assert ds.class_names == ["Apple pie", "Baby back ribs"]
        assert ds.targets == [0, 1, 1] and [p.split("/")[-1] for p in ds.paths] == ["11.jpg", "22.jpg", "23.jpg"]
    (tmp_path / "food-101/images/baby_back_ribs/23.jpg").unlink()
    with pytest.raises(DatasetFormatError, match="23.jpg' listed in meta/test.txt is missing"):
        load_food101(str(tmp_path))


def test_food101_folder_of_that_name_wins_over_root(tmp_path):
    """The documented layout, <root>/food-101/meta/test.txt, is read even where <root> holds a meta/test.txt
    of its own (e.g. another dataset's meta folder beside the extracted archive)."""
    make_food(tmp_path)
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta/classes.txt").write_text("other\n")
    (tmp_path / "meta/test.txt").write_text("other/1\n")
    _img(tmp_path / "images/other/1.jpg", 1)
    ds = load_food101(str(tmp_path))
    assert ds.class_names == ["Apple pie", "Baby back ribs"] and len(ds) == 3


def make_pets(root):
    base = root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    (base / "annotations/list.txt").write_text(
        "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n"
        "Abyssinian_1 1 1 1\namerican_bulldog_7 2 2 1\nAbyssinian_2 1 1 1\nbasset_hound_3 3 2 3\n")
    (base / "annotations/test.txt").write_text("Abyssinian_2 1 1 1\nbasset_hound_3 3 2 3\n")
    for name, v in (("Abyssinian_1", 1), ("Abyssinian_2", 2), ("american_bulldog_7", 3), ("basset_hound_3", 4)):
        _img(base / "images" / f"{name}.jpg", v)
    return base


def test_pets_test_split_all_37_style_names(tmp_path):
    make_pets(tmp_path)
    ds = load_pets(str(tmp_path))
    assert ds.class_names == ["Abyssinian", "american bulldog", "basset hound"]  # from list.txt: all classes
    assert ds.targets == [0, 2]
    img, label = ds[1]
    assert label == 2 and img.size == (6, 6)
    (tmp_path / "oxford-iiit-pet/annotations/test.txt").write_text("Abyssinian_2 x 1 1\n")
    with pytest.raises(DatasetFormatError, match="expected '<image> <class id>"):
        load_pets(str(tmp_path))


def make_imagenet(root):
    for wnid, n in (("n01440764", 2), ("n01443537", 1)):
        for i in range(n):
            _img(root / "val" / wnid / f"ILSVRC2012_val_{wnid}_{i}.JPEG", 40 + i)
    (root / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")


def test_imagenet_val_folders_and_mapping(tmp_path):
    make_imagenet(tmp_path)
    ds = load_imagenet_val(str(tmp_path))
    assert ds.class_names == ["tench", "goldfish"] and ds.targets == [0, 0, 1]
    assert load_imagenet_val(str(tmp_path / "val")).targets == [0, 0, 1]  # root = the val folder itself
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01440764 tench\n")
    with pytest.raises(DatasetFormatError, match="lacks 1 of the 2 wnids"):
        load_imagenet_val(str(tmp_path))
    with pytest.raises(DatasetFormatError, match="no val/<wnid>/ folders"):
        load_imagenet_val(str(tmp_path / "val" / "n01440764"))


def test_build_retention_dataset_templates_and_caps(tmp_path):
    make_food(tmp_path / "f")
    ds, templates = build_retention_dataset("food101", str(tmp_path / "f"), per_class=1)
    assert templates == ["a photo of {}, a type of food."] and sorted(ds.targets) == [0, 1]
    sketch, templates = build_retention_dataset("synthetic-sketch", None, per_class=1)
    assert templates is None and len(sketch) == 100 and sorted(set(sketch.targets)) == list(range(100))
    source, _ = build_retention_dataset("synthetic-source", None, per_class=1)
    assert not np.array_equal(source.images, sketch.images)
    with pytest.raises(ValueError, match="unknown retention dataset"):
        build_retention_dataset("cifar10", None)


def test_dataset_specs(tmp_path):
    assert parse_dataset_specs(None) == {"synthetic-sketch": None, "synthetic-source": None}
    pets = str(tmp_path)
    assert parse_dataset_specs([f"pets={pets}", "synthetic-sketch"]) == {"pets": pets, "synthetic-sketch": None}
    with pytest.raises(ConfigError, match=r"'pets': data root '/no/such/pets' does not exist.*--datasets pets=/path/to/pets"):
        parse_dataset_specs(["pets=/no/such/pets"])
    with pytest.raises(ConfigError, match="needs a data root: write it as food101="):
        parse_dataset_specs(["food101"])
    with pytest.raises(ConfigError, match="unknown retention dataset 'cifar'"):
        parse_dataset_specs(["cifar=/x"])


def test_reference_folder_is_recursive_seeded_and_checked(tmp_path):
    for i in range(5):
        _img(tmp_path / "ref" / ("sub" if i % 2 else "") / f"{i}.png", 10 * i)
    (tmp_path / "ref" / "notes.txt").write_text("not an image")
    assert len(list_reference_images(str(tmp_path / "ref"))) == 5
    to_tensor = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)  # noqa: E731
    all_imgs = load_reference_images(str(tmp_path / "ref"), to_tensor)
    assert all_imgs.shape == (5, 3, 6, 6)
    a = load_reference_images(str(tmp_path / "ref"), to_tensor, limit=3, seed=1)
    b = load_reference_images(str(tmp_path / "ref"), to_tensor, limit=3, seed=1)
    assert a.shape[0] == 3 and torch.equal(a, b)
    with pytest.raises(DatasetFormatError, match="acgd.source_folder is not set"):
        list_reference_images(None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetFormatError, match="holds no image files"):
        list_reference_images(str(tmp_path / "empty"))
