import pickle
import re

import numpy as np
import pytest
import torch

from segpcl_fast.data.base import DatasetFormatError
from segpcl_fast.data.cifar import load_cifar100
from segpcl_fast.data.transforms import clip_test_transform


def test_cifar100_reads_pickles(cifar_root):
    train, test = load_cifar100(str(cifar_root))
    assert len(train) == 5 * 3 and len(test) == 5 * 2
    assert train.class_names == ["apple", "aquarium fish", "baby", "bear", "beaver"]
    with open(cifar_root / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    assert train.targets == raw["fine_labels"]
    img, label = train[4]
    expected = raw["data"][4].reshape(3, 32, 32).transpose(1, 2, 0)  # CHW planes -> HWC
    assert np.array_equal(np.asarray(img), expected) and label == raw["fine_labels"][4]


def test_cifar100_pickles_resaved_with_bytes_keys_read_the_same(cifar_root, tmp_path):
    """A copy re-pickled after pickle.load(f, encoding="bytes") of the Python 2 originals: bytes keys
    and bytes class names."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        with open(cifar_root / "cifar-100-python" / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        entry = {k.encode(): [n.encode() for n in v] if k.endswith("_names") else v for k, v in entry.items()}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    (train, test), (want_train, want_test) = load_cifar100(str(tmp_path)), load_cifar100(str(cifar_root))
    assert train.class_names == want_train.class_names == ["apple", "aquarium fish", "baby", "bear", "beaver"]
    assert train.targets == want_train.targets and test.targets == want_test.targets
    assert np.array_equal(np.asarray(train[3][0]), np.asarray(want_train[3][0]))


def test_cifar100_root_may_be_the_inner_folder_and_transform_applies(cifar_root):
    train, _ = load_cifar100(str(cifar_root / "cifar-100-python"), train_transform=clip_test_transform(24))
    x, _ = train[0]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 24, 24)


def test_cifar100_missing_root(tmp_path):
    with pytest.raises(DatasetFormatError, match="does not exist"):
        load_cifar100(str(tmp_path / "nope"))
    with pytest.raises(DatasetFormatError, match="data.root"):
        load_cifar100(None)


def test_cifar100_wrong_format(cifar_root):
    folder = cifar_root / "cifar-100-python"
    with open(folder / "train", "wb") as f:  # CIFAR-10 style keys
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(DatasetFormatError, match="fine_labels"):
        load_cifar100(str(cifar_root))
    (folder / "test").write_bytes(b"not a pickle at all")
    (folder / "meta").write_bytes(b"garbage")
    with pytest.raises(DatasetFormatError, match="cannot read"):
        load_cifar100(str(cifar_root))


def test_cifar100_no_meta(tmp_path):
    (tmp_path / "cifar-100-python").mkdir()
    with pytest.raises(DatasetFormatError, match="cifar-100-python/meta"):
        load_cifar100(str(tmp_path))


def test_cifar100_root_with_only_the_tarball_says_to_extract_it(tmp_path):
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"\x1f\x8b not extracted")
    with pytest.raises(DatasetFormatError, match=f"extract the tarball there: tar xzf {tmp_path}/cifar-100-python.tar.gz "
                                                 f"-C {tmp_path}"):
        load_cifar100(str(tmp_path))


@pytest.mark.parametrize("inner", [True, False])
def test_a_cifar10_copy_is_named_as_cifar10(tmp_path, inner):
    """torchvision's CIFAR-10 folder (cifar-10-batches-py/: batches.meta, data_batch_1..5, test_batch)."""
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ("batches.meta", "data_batch_1", "test_batch"):
        (folder / name).write_bytes(b"")
    root = folder if inner else folder.parent
    with pytest.raises(DatasetFormatError, match=re.escape(f"Fix: '{folder}' is CIFAR-10 (batches.meta")):
        load_cifar100(str(root))


def _write_pickles(root, names, train_labels, test_labels):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(1)
    for split, labels in (("train", train_labels), ("test", test_labels)):
        entry = {"fine_labels": list(labels), "data": rng.randint(0, 256, (len(labels), 3072)).astype(np.uint8)}
        with open(folder / split, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names}, f, protocol=2)
    return root


def test_pickles_cut_to_a_class_subset_give_that_subset(tmp_path):
    """README: set data.expected_classes to the count you have (or null) to run a subset on purpose. meta lists
    every class whatever the pickles hold, so pickles cut to 3 of 6 classes read as 6 classes, 3 of them
    empty ("3 classes have no training images"), and no setting ran the subset (a review's finding). The
    classes are now those with images, relabelled in CIFAR's order; a preset's 100 refuses the copy."""
    from segpcl_fast.config import load_config
    from segpcl_fast.data import ClassIncrementalScenario, build_datasets
    names = ["apple", "aquarium_fish", "baby", "bear", "beaver", "bed"]
    kept = [1, 3, 4]  # dataset labels the pickles hold
    root = _write_pickles(tmp_path / "c", names, [4, 1, 3, 3, 1, 4], [3, 4, 1])
    train, test = load_cifar100(str(root))
    assert train.class_names == test.class_names == ["aquarium fish", "bear", "beaver"]
    assert list(train.targets) == [2, 0, 1, 1, 0, 2] and list(test.targets) == [1, 2, 0]
    with open(root / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    for i in range(6):  # each image keeps its class
        img, label = train[i]
        assert kept[label] == raw["fine_labels"][i]
        assert np.array_equal(np.asarray(img), raw["data"][i].reshape(3, 32, 32).transpose(1, 2, 0))
    cfg = load_config("cifar100").data
    cfg.root = str(root)
    with pytest.raises(DatasetFormatError, match=r"has 3 classes, but data.expected_classes is 100"):
        build_datasets(cfg)
    for deliberate in (3, None):
        cfg.expected_classes, cfg.num_tasks = deliberate, 3
        scenario = ClassIncrementalScenario.from_config(cfg, *build_datasets(cfg))
        assert sorted(scenario.class_names) == ["aquarium fish", "bear", "beaver"]
    # a class with training images and none to test on is still the protocol's error
    root2 = _write_pickles(tmp_path / "d", names, [1, 3, 4], [1, 3])
    cfg.root, cfg.expected_classes = str(root2), None
    with pytest.raises(DatasetFormatError, match=r"1 classes have no test images, e.g. \['beaver'\]"):
        ClassIncrementalScenario.from_config(cfg, *build_datasets(cfg))
