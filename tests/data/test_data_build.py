import numpy as np
import pytest
import torch

from data_fakes import make_cifar100, make_cub, make_imagenet_r, make_imagenet_subset, make_ucf101
from segpcl_fast.config import DataConfig
from segpcl_fast.data.base import DatasetFormatError
from segpcl_fast.data.build import build_datasets, cap_per_class
from segpcl_fast.data.protocol import ClassIncrementalScenario
from segpcl_fast.data.transforms import build_transforms

MAKERS = {"cifar100": (make_cifar100, 5), "imagenet-r": (make_imagenet_r, 4),
          "imagenet-subset": (make_imagenet_subset, 3), "cub200": (make_cub, 3), "ucf101": (make_ucf101, 3)}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_build_each_dataset_end_to_end(tmp_path, name):
    maker, num_classes = MAKERS[name]
    root = maker(tmp_path / name)
    cfg = DataConfig(dataset=name, root=str(root), num_tasks=1, class_order="seeded")
    train_tf, test_tf = build_transforms(16, train_augment=True)
    train, test = build_datasets(cfg, train_tf, test_tf)
    assert len(train.class_names) == num_classes and train.class_names == test.class_names
    sc = ClassIncrementalScenario.from_config(cfg, train, test)
    x, y = sc.test_dataset_upto(0)[0]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 16, 16) and 0 <= y < num_classes


def test_caps_are_deterministic(tmp_path):
    root = make_cifar100(tmp_path / "c", n_train=6, n_test=4)
    cfg = DataConfig(dataset="cifar100", root=str(root), max_train_per_class=2, max_test_per_class=3)
    train, test = build_datasets(cfg)
    assert sorted(train.targets) == sorted(list(range(5)) * 2)
    assert sorted(test.targets) == sorted(list(range(5)) * 3)
    again, _ = build_datasets(cfg)
    assert again.indices == train.indices
    assert train.class_names[1] == "aquarium fish"
    full, _ = build_datasets(DataConfig(dataset="cifar100", root=str(root)))
    assert cap_per_class(full, 0) is full and cap_per_class(full, 6) is full
    assert np.array_equal(np.asarray(train[0][0]), np.asarray(full[train.indices[0]][0]))


def test_errors(tmp_path):
    with pytest.raises(DatasetFormatError, match="unknown data.dataset 'mnist'"):
        build_datasets(DataConfig(dataset="mnist", root=str(tmp_path)))
    for name in MAKERS:
        with pytest.raises(DatasetFormatError, match="data.root"):
            build_datasets(DataConfig(dataset=name, root=None))
        with pytest.raises(DatasetFormatError, match="Expected layout"):
            build_datasets(DataConfig(dataset=name, root=str(tmp_path)))  # empty folder


def test_synthetic_dispatch():
    cfg = DataConfig(dataset="synthetic", max_train_per_class=2, max_test_per_class=1, num_tasks=10)
    train, test = build_datasets(cfg)
    assert len(train) == 2 * len(train.class_names) and len(test) == len(test.class_names)
    sc = ClassIncrementalScenario.from_config(cfg, train, test)
    assert sc.num_classes == len(train.class_names) and len(sc.train_dataset(0)) == 2 * len(sc.task_classes(0))


def test_a_preset_refuses_a_partial_copy_of_its_benchmark(tmp_path):
    from segpcl_fast.config import load_config
    root = make_imagenet_r(tmp_path / "imagenet-r")  # 4 of ImageNet-R's 200 wnids
    cfg = load_config("imagenet-r").data
    assert cfg.expected_classes == 200
    cfg.root = str(root)
    with pytest.raises(DatasetFormatError, match=r"has 4 classes, but data.expected_classes is 200.*"
                                                 r"full copy.*data.expected_classes=4"):
        build_datasets(cfg)
    for deliberate in (4, None, 0):
        cfg.expected_classes = deliberate
        train, _ = build_datasets(cfg)
        assert len(train.class_names) == 4
    cfg.expected_classes = 5
    with pytest.raises(DatasetFormatError, match="has 4 classes"):
        build_datasets(cfg)


def test_data_split_file_reaches_the_imagenet_r_reader(tmp_path):
    from data_fakes import IMR_WNIDS
    root = make_imagenet_r(tmp_path / "r")
    wnids = sorted(IMR_WNIDS)
    split = tmp_path / "split.txt"  # RAPF's sectioned format: image 0 of each class trains, image 1 tests
    split.write_text("\n".join(["train"] + [f"{w}/cartoon_0.jpg" for w in wnids]
                               + ["test"] + [f"{w}/cartoon_1.jpg" for w in wnids]) + "\n")
    train, test = build_datasets(DataConfig(dataset="imagenet-r", root=str(root), split_file=str(split)))
    assert (len(train), len(test)) == (len(wnids), len(wnids))
    assert all(p.endswith("cartoon_0.jpg") for p in train.paths)
    with pytest.raises(DatasetFormatError, match="absent.txt"):
        build_datasets(DataConfig(dataset="imagenet-r", root=str(root), split_file=str(tmp_path / "absent.txt")))


@pytest.mark.parametrize("damage", ["truncated", "not_an_image", "missing"])
def test_an_unreadable_image_is_one_error_naming_the_file(tmp_path, damage):
    """A truncated, foreign or vanished image file surfaces when it is loaded (mid-run): one
    DatasetFormatError naming the file and the fix, also through a DataLoader worker."""
    from PIL import Image
    from segpcl_fast.data.base import FileListDataset
    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(good)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(bad)
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:300])
    elif damage == "not_an_image":
        bad.write_text("<html>404</html>")
    else:
        bad.unlink()
    ds = FileListDataset([str(good), str(bad)], [0, 1], ["a", "b"])
    assert ds[0][0].size == (64, 64)
    with pytest.raises(DatasetFormatError, match=r"image file '.*bad\.jpg' cannot be read .* re-extract it"):
        ds[1]
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=lambda batch: batch)
    with pytest.raises(DatasetFormatError, match=r"bad\.jpg' cannot be read"):
        next(iter(loader))


def test_the_class_count_error_survives_pickling():
    """A process pool (ProcessPoolExecutor, joblib) pickles a worker's error: rebuilt from its message alone, the
    partial-copy error's four-argument constructor failed, and the pool reported an unpickling error instead."""
    import pickle
    from segpcl_fast.data.build import ClassCountError
    error = ClassCountError("cifar100", "/data/c100", 3, 100)
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is ClassCountError and str(again) == str(error)
    assert (again.found, again.expected) == (3, 100)
    error.echo = True  # torchrun: another rank's copy, kept quiet by the CLI
    assert error.for_trained_run("evaluate").echo is True
