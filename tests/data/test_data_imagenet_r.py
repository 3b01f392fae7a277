import pytest
from PIL import Image

from data_fakes import IMR_PER_CLASS, IMR_WNIDS, decode_colour
from segpcl_fast.data.base import DatasetFormatError
from segpcl_fast.data.imagenet_r import load_imagenet_r

WNIDS = sorted(IMR_WNIDS)


def _check_labels_follow_folders(ds):
    for path, label in zip(ds.paths, ds.targets):
        assert path.split("/")[-2] == WNIDS[label]


def test_seeded_80_20_split_per_class(imagenet_r_root):
    train, test = load_imagenet_r(str(imagenet_r_root))
    assert train.class_names == ["goldfish", "great white shark", "hammerhead", "electric ray"]
    assert len(train) == 4 * 4 and len(test) == 4 * 1  # 5 per class -> 4 train, 1 test
    assert sorted(test.targets) == [0, 1, 2, 3]
    assert not set(train.paths) & set(test.paths)
    assert len(set(train.paths) | set(test.paths)) == 4 * IMR_PER_CLASS
    _check_labels_follow_folders(train)
    _check_labels_follow_folders(test)
    img, label = test[2]
    assert isinstance(img, Image.Image) and decode_colour(img)[0] == label
    again, _ = load_imagenet_r(str(imagenet_r_root))
    assert again.paths == train.paths


def test_split_seed_changes_split(imagenet_r_root):
    splits = {tuple(load_imagenet_r(str(imagenet_r_root), split_seed=s)[1].paths) for s in range(6)}
    assert len(splits) > 1


def test_split_files_used_when_present(imagenet_r_root):
    lines_train = [f"imagenet-r/{w}/cartoon_{i}.jpg {c}" for c, w in enumerate(WNIDS) for i in range(3)]
    lines_test = [f"imagenet-r/{w}/cartoon_{i}.jpg" for w in WNIDS for i in range(3, 5)]
    (imagenet_r_root / "train.txt").write_text("\n".join(lines_train) + "\n")
    (imagenet_r_root / "test.txt").write_text("\n".join(lines_test) + "\n")
    train, test = load_imagenet_r(str(imagenet_r_root))
    assert len(train) == 12 and len(test) == 8
    assert train.targets == [c for c in range(4) for _ in range(3)]
    _check_labels_follow_folders(test)
    # a label column that maps one label to two wnids is an error
    (imagenet_r_root / "train.txt").write_text(
        f"imagenet-r/{WNIDS[0]}/cartoon_0.jpg 7\nimagenet-r/{WNIDS[1]}/cartoon_0.jpg 7\n")
    with pytest.raises(DatasetFormatError, match="label 7"):
        load_imagenet_r(str(imagenet_r_root))
    (imagenet_r_root / "train.txt").write_text("imagenet-r/n09999999/missing.jpg 0\n")
    with pytest.raises(DatasetFormatError, match="not found"):
        load_imagenet_r(str(imagenet_r_root))


def test_names_need_readme_or_mapping(imagenet_r_root, tmp_path):
    (imagenet_r_root / "imagenet-r" / "README.txt").unlink()
    with pytest.raises(DatasetFormatError, match="README.txt") as err:
        load_imagenet_r(str(imagenet_r_root))
    assert "names_file" in str(err.value)
    mapping = tmp_path / "names.txt"
    mapping.write_text("".join(f"{w} Name {i}\n" for i, w in enumerate(WNIDS)))
    train, _ = load_imagenet_r(str(imagenet_r_root / "imagenet-r"), names_file=str(mapping))
    assert train.class_names == [f"Name {i}" for i in range(4)]
    mapping.write_text(f"{WNIDS[0]} only one\n")
    with pytest.raises(DatasetFormatError, match="lacks 3 of the 4 wnids"):
        load_imagenet_r(str(imagenet_r_root), names_file=str(mapping))
    with pytest.raises(DatasetFormatError, match="not found"):
        load_imagenet_r(str(imagenet_r_root), names_file=str(tmp_path / "absent.txt"))


def test_wrong_format(tmp_path):
    (tmp_path / "imagenet-r" / "goldfish").mkdir(parents=True)
    with pytest.raises(DatasetFormatError, match="no wnid class folders"):
        load_imagenet_r(str(tmp_path))
