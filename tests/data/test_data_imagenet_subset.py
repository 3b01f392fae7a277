import pytest

from data_fakes import IN_SUBSET, IN_SYNSETS, decode_colour, make_imagenet_subset
from segpcl_fast.data.base import DatasetFormatError
from segpcl_fast.data.imagenet_subset import load_imagenet_subset

SORTED = sorted(IN_SYNSETS)


def test_class_list_order_and_names(imagenet_subset_root):
    train, val = load_imagenet_subset(str(imagenet_subset_root))
    assert train.class_names == ["great white shark", "tench", "hammerhead"]
    assert len(train) == 3 * 3 and len(val) == 3 * 2
    for ds in (train, val):
        for path, label in zip(ds.paths, ds.targets):
            assert f"/{IN_SUBSET[label]}/" in path
    img, label = val[3]
    assert decode_colour(img)[0] == SORTED.index(IN_SUBSET[label])


def test_explicit_class_list_and_flat_val(tmp_path):
    root = make_imagenet_subset(tmp_path / "in", class_list=False, flat_val=True)
    (root / "mine.txt").write_text("# two classes\nn01491361 tiger shark\nn01443537\n")
    train, val = load_imagenet_subset(str(root), class_list="mine.txt")
    assert train.class_names == ["tiger shark", "goldfish"]
    assert len(val) == 4 and sorted(val.targets) == [0, 0, 1, 1]
    for i in range(len(val)):
        img, label = val[i]
        assert decode_colour(img)[0] == SORTED.index(["n01491361", "n01443537"][label])


def test_missing_class_list_is_an_error(tmp_path):
    root = make_imagenet_subset(tmp_path / "in", class_list=False)
    with pytest.raises(DatasetFormatError, match="imagenet100.txt"):
        load_imagenet_subset(str(root))
    with pytest.raises(DatasetFormatError, match="not found"):
        load_imagenet_subset(str(root), class_list="absent.txt")


def test_class_list_wnid_without_folder(imagenet_subset_root):
    (imagenet_subset_root / "imagenet100.txt").write_text("n01440764\nn09999999\n")
    with pytest.raises(DatasetFormatError, match="lacks 1 of the 2 wnids"):  # mapping checked first
        load_imagenet_subset(str(imagenet_subset_root))
    with open(imagenet_subset_root / "LOC_synset_mapping.txt", "a") as f:
        f.write("n09999999 volcano\n")
    with pytest.raises(DatasetFormatError, match=r"n09999999"):
        load_imagenet_subset(str(imagenet_subset_root))
    (imagenet_subset_root / "imagenet100.txt").write_text("tench\n")
    with pytest.raises(DatasetFormatError, match="not wnids"):
        load_imagenet_subset(str(imagenet_subset_root))


def test_missing_synset_mapping(tmp_path):
    root = make_imagenet_subset(tmp_path / "in", mapping=False)
    with pytest.raises(DatasetFormatError, match="LOC_synset_mapping.txt"):
        load_imagenet_subset(str(root))
    (tmp_path / "map.json").write_text('{"0": ["n01440764", "tench"], "1": ["n01484850", "great_white_shark"],'
                                       ' "2": ["n01494475", "hammerhead"]}')
    train, _ = load_imagenet_subset(str(root), names_file=str(tmp_path / "map.json"))
    assert train.class_names == ["great white shark", "tench", "hammerhead"]


def test_no_train_folder(tmp_path):
    with pytest.raises(DatasetFormatError, match="no train/"):
        load_imagenet_subset(str(tmp_path))
