import numpy as np
import pytest

from segpcl_fast.config import DataConfig
from segpcl_fast.data.base import ArrayDataset, DatasetFormatError
from segpcl_fast.data.protocol import ClassIncrementalScenario, resolve_class_order, split_tasks

# PyCIL's published CIFAR-100 order for seed 1993 (np.random.seed(1993); np.random.permutation(100)).
PYCIL_CIFAR100_1993_HEAD = [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]


def make_pair(num_classes=12, n_train=3, n_test=2, seed=0):
    rng = np.random.RandomState(seed)
    names = [f"class_{c}" for c in range(num_classes)]

    def one(n):
        targets = rng.permutation([c for c in range(num_classes) for _ in range(n)])
        # pixel value = dataset label, so a view's image tells which sample it returned
        images = np.repeat(targets.astype(np.uint8)[:, None, None, None], 4, 1).repeat(4, 2).repeat(3, 3)
        return ArrayDataset(images, targets.tolist(), names)
    return one(n_train), one(n_test)


def test_seeded_order_matches_pycil():
    order = resolve_class_order("seeded", [str(i) for i in range(100)], seed=1993)
    assert order[:10] == PYCIL_CIFAR100_1993_HEAD
    assert sorted(order) == list(range(100))
    assert resolve_class_order("seeded", [str(i) for i in range(100)], 1993) == order
    assert resolve_class_order("seeded", [str(i) for i in range(100)], 1) != order
    assert resolve_class_order("natural", ["a", "b", "c"]) == [0, 1, 2]


def test_explicit_order_names_and_indices():
    names = ["apple", "aquarium fish", "baby"]
    assert resolve_class_order(["baby", 0, "Aquarium_Fish"], names) == [2, 0, 1]
    with pytest.raises(DatasetFormatError, match="not classes of the dataset.*'pear'"):
        resolve_class_order(["baby", "apple", "pear"], names)
    with pytest.raises(DatasetFormatError, match="more than once.*apple") as err:
        resolve_class_order(["apple", 0, "baby"], names)
    assert "1 classes not listed: ['aquarium fish']" in str(err.value)
    with pytest.raises(DatasetFormatError, match="not classes"):
        resolve_class_order([0, 1, 3], names)
    with pytest.raises(DatasetFormatError, match="class_order"):
        resolve_class_order("random", names)
    with pytest.raises(DatasetFormatError, match="give class indices"):
        resolve_class_order(["crane", "x", 1], ["crane", "crane", "x"])


def test_explicit_order_by_class_ids_wnids_or_folder_names():
    """data.class_order may name classes as the dataset's files do (wnids, folder names), beside names and indices."""
    names, ids = ["goldfish", "great white shark", "Yo Yo"], ["n01443537", "n01484850", "YoYo"]
    assert resolve_class_order(["n01484850", "YoYo", "goldfish"], names, class_ids=ids) == [1, 2, 0]
    assert resolve_class_order(["Great_White_Shark", 2, "n01443537"], names, class_ids=ids) == [1, 2, 0]
    with pytest.raises(DatasetFormatError, match=r"not classes of the dataset \(names, or indices 0..2\): "
                                                 r"\['n01484850'\]"):
        resolve_class_order(["n01484850", "YoYo", "goldfish"], names)  # no ids: a wnid is not a name ('YoYo' is)
    with pytest.raises(DatasetFormatError, match=r"not classes of the dataset \(names, ids such as its folder "
                                                 r"names, or indices 0..2\): \['n0'\].*\(ids \['n01443537'"):
        resolve_class_order(["n01484850", "n0", "goldfish"], names, class_ids=ids)
    # a name that is another class's id (a names file that swaps two folders' names) is refused, not guessed
    with pytest.raises(DatasetFormatError, match="'cat' is the name of class 0 .* and the id of class 1"):
        resolve_class_order(["cat", "dog"], ["cat", "dog"], class_ids=["dog", "cat"])
    assert resolve_class_order(["cat", "dog"], ["cat", "dog"], class_ids=["cat", "dog"]) == [0, 1]
    with pytest.raises(DatasetFormatError, match="'a' matches 2 classes' ids"):
        resolve_class_order(["a", 0, 1], ["x", "y", "z"], class_ids=["b", "a", "a"])
    # UCF101's classInd.txt and CoOp's split file spell a class apart: either spelling finds it, whichever a copy has
    ucf_names = ["Apply Eye Makeup", "Yo Yo"]
    for ids in (["ApplyEyeMakeup", "YoYo"], ["Apply_Eye_Makeup", "Yo_Yo"]):
        assert resolve_class_order(["Yo_Yo", "ApplyEyeMakeup"], ucf_names, class_ids=ids) == [1, 0]
    with pytest.raises(DatasetFormatError, match="'seal' matches 2 classes' names or ids"):  # no guessing
        resolve_class_order(["seal", 0, 1], ["se al", "se-al", "x"], class_ids=["a", "b", "c"])
    # the ids go with the dataset into its scenario (and through ClassSubset views with the same classes)
    train, test = make_pair(num_classes=3)
    train.class_ids = test.class_ids = ["n3", "n1", "n2"]
    sc = ClassIncrementalScenario(train, test, ["n1", "n2", "class_0"], num_tasks=3)
    assert sc.order == [1, 2, 0] and sc.class_names == ["class_1", "class_2", "class_0"]


def test_split_tasks():
    assert split_tasks(6, 3) == [[0, 1], [2, 3], [4, 5]]
    assert split_tasks(6, 1, task_sizes=[3, 1, 2]) == [[0, 1, 2], [3], [4, 5]]
    with pytest.raises(DatasetFormatError, match=r"does not divide.*\[1, 2, 5, 10\]") as refused:
        split_tasks(10, 3)
    # the refusal names data.task_sizes with the nearest unequal split, which split_tasks takes as given
    assert str(refused.value).endswith("or give unequal tasks' sizes in data.task_sizes, e.g. --set "
                                       "data.task_sizes=[4,3,3]")
    assert split_tasks(10, 3, task_sizes=[4, 3, 3]) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    with pytest.raises(DatasetFormatError, match=r"\[1, 2, 5, 10\], or give unequal tasks' sizes in data.task_sizes$"):
        split_tasks(10, 11)  # more tasks than classes: no split to suggest
    with pytest.raises(DatasetFormatError, match="sum to"):
        split_tasks(6, 1, task_sizes=[3, 2])


def test_scenario_tasks_and_views():
    train, test = make_pair(num_classes=12)
    sc = ClassIncrementalScenario(train, test, "seeded", order_seed=7, num_tasks=4)
    order = np.random.RandomState(7).permutation(12).tolist()
    assert sc.order == order and sc.class_names == [f"class_{c}" for c in order]
    assert sc.num_tasks == 4
    covered = []
    for t in range(4):
        classes = sc.task_classes(t)
        assert classes == list(range(3 * t, 3 * t + 3))
        assert sc.seen_classes(t) == list(range(3 * t + 3)) and sc.old_classes(t) == list(range(3 * t))
        covered += classes
        for ds, per_class in ((sc.train_dataset(t), 3), (sc.test_dataset(t), 2)):
            assert sorted(ds.targets) == sorted(classes * per_class)
            assert ds.class_names == sc.class_names
            for i in range(len(ds)):
                img, label = ds[i]
                assert np.asarray(img)[0, 0, 0] == order[label]  # sample really is of that class
        upto = sc.test_dataset_upto(t)
        assert sorted(upto.targets) == sorted(list(range(3 * t + 3)) * 2)
        assert sc.test_dataset_task(t).indices == sc.test_dataset(t).indices
    assert covered == list(range(12))
    # task train views are disjoint and cover the train set
    all_idx = sum((sc.train_dataset(t).indices for t in range(4)), [])
    assert sorted(all_idx) == list(range(len(train)))
    with pytest.raises(IndexError):
        sc.task_classes(4)


def test_transform_override_and_from_config():
    train, test = make_pair(num_classes=6)
    cfg = DataConfig(num_tasks=3, class_order="natural")
    sc = ClassIncrementalScenario.from_config(cfg, train, test)
    view = sc.train_dataset(1, transform=lambda im: "transformed")
    assert view[0][0] == "transformed" and train.transform is None and view[0][1] in (2, 3)


def test_scenario_errors():
    train, test = make_pair(num_classes=6)
    with pytest.raises(DatasetFormatError, match="does not divide"):
        ClassIncrementalScenario(train, test, num_tasks=4)
    empty_test = ArrayDataset(test.images[:2], [0, 0], test.class_names)
    with pytest.raises(DatasetFormatError, match="5 classes have no test images"):
        ClassIncrementalScenario(train, empty_test, num_tasks=3)
