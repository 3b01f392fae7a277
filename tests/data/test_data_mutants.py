"""Tests added by a mutation audit of segpcl_fast/data: each pins a documented rule that the other
data tests leave open (a config option that must reach its reader, the test split's transform,
the seeded split / cap rules computed by hand, the published prompt templates and normalisation)."""
import numpy as np
import pytest
from PIL import Image

from data_fakes import (IMR_WNIDS, UCF_CLASSES, colour, decode_colour, make_cifar100, make_cub, make_imagenet_r,
                        make_imagenet_subset, make_ucf101, write_image)
from segpcl_fast.config import DataConfig
from segpcl_fast.data.base import ArrayDataset, DatasetFormatError
from segpcl_fast.data.build import build_datasets, cap_per_class
from segpcl_fast.data.files import stratified_split
from segpcl_fast.data.protocol import ClassIncrementalScenario


def _pair(num_classes, n_train=2, n_test=1):
    names = [f"class_{c}" for c in range(num_classes)]
    make = lambda n: ArrayDataset(np.zeros((num_classes * n, 2, 2, 3), np.uint8),  # noqa: E731
                                  [c for c in range(num_classes) for _ in range(n)], names)
    return make(n_train), make(n_test)


# ----------------------------------------------------------------------------- protocol
def test_from_config_passes_task_sizes_and_order_seed():
    """The UCF101 preset's [11, 10, ...] and data.order_seed must reach the scenario."""
    train, test = _pair(6)
    cfg = DataConfig(num_tasks=3, task_sizes=[3, 1, 2], class_order="seeded", order_seed=7)
    sc = ClassIncrementalScenario.from_config(cfg, train, test)
    assert sc.tasks == [[0, 1, 2], [3], [4, 5]]
    assert sc.order == np.random.RandomState(7).permutation(6).tolist()
    assert sc.order != np.random.RandomState(1993).permutation(6).tolist()
    assert len(sc.train_dataset(0)) == 3 * 2 and len(sc.test_dataset(1)) == 1


def test_ucf101_preset_first_task_takes_the_extra_class():
    from segpcl_fast.config import load_config
    data = load_config("ucf101").data
    train, test = _pair(101, 1, 1)
    sc = ClassIncrementalScenario.from_config(data, train, test)
    assert [len(c) for c in sc.tasks] == [11] + [10] * 9
    assert sc.seen_classes(0) == list(range(11)) and sc.old_classes(1) == list(range(11))


def test_train_and_test_must_share_their_class_list():
    train, test = _pair(4)
    test.class_names = list(reversed(test.class_names))
    with pytest.raises(DatasetFormatError, match="different class lists"):
        ClassIncrementalScenario(train, test, num_tasks=2)


# ----------------------------------------------------------------------------- caps (build.py)
def test_cap_per_class_is_the_documented_seeded_choice():
    """RandomState(seed + label).choice(indices of the class, cap), kept in dataset order."""
    targets = [c for _ in range(7) for c in range(3)]  # interleaved: 0 1 2 0 1 2 ...
    ds = ArrayDataset(np.zeros((len(targets), 2, 2, 3), np.uint8), targets, ["a", "b", "c"])
    for seed in (0, 5):
        capped = cap_per_class(ds, 3, seed=seed)
        expected = []
        for label in range(3):
            idx = np.flatnonzero(np.asarray(targets) == label)
            expected += np.random.RandomState(seed + label).choice(idx, 3, replace=False).tolist()
        assert capped.indices == sorted(expected)
        assert capped.targets == [targets[i] for i in sorted(expected)]


# ----------------------------------------------------------------------------- test split transform
READERS = {"cifar100": make_cifar100, "cub200": make_cub, "imagenet-r": make_imagenet_r,
           "imagenet-subset": make_imagenet_subset, "ucf101": make_ucf101}


@pytest.mark.parametrize("name", sorted(READERS))
def test_the_test_split_gets_the_test_transform(tmp_path, name):
    """No augmentation on the test set: build_datasets (and each reader) hands test_transform to the test
    split and train_transform to the train split."""
    root = READERS[name](tmp_path / name)
    train, test = build_datasets(DataConfig(dataset=name, root=str(root)), lambda im: "train", lambda im: "test")
    assert train[0][0] == "train" and test[0][0] == "test"
    assert {test[i][0] for i in range(len(test))} == {"test"}


# ----------------------------------------------------------------------------- CUB
def test_cub_class_index_follows_the_class_id_not_the_name(cub_root):
    """Class index = position of the class id in classes.txt (id 1 -> 0), whatever the names' order."""
    from segpcl_fast.data.cub import load_cub200
    classes = cub_root / "CUB_200_2011" / "classes.txt"
    classes.write_text(classes.read_text().replace("001.Black_footed_Albatross", "001.Zebra_Albatross"))
    train, test = load_cub200(str(cub_root))
    assert train.class_names == ["Zebra Albatross", "Laysan Albatross", "Sooty Albatross"]
    for ds in (train, test):
        for i in range(len(ds)):
            img, label = ds[i]
            assert decode_colour(img)[0] == label


# ----------------------------------------------------------------------------- ImageNet-R split
def _imr_root(tmp_path, per_class):
    root = tmp_path / "imr"
    for c, wnid in enumerate(sorted(IMR_WNIDS)[:2]):
        for i in range(per_class):
            write_image(root / "imagenet-r" / wnid / f"art_{i:02d}.jpg", colour(c, 0), size=(2, 2))
    (root / "imagenet-r" / "README.txt").write_text("".join(f"{w} {n}\n" for w, n in sorted(IMR_WNIDS.items())))
    return root


def test_imagenet_r_default_is_an_80_20_split(tmp_path):
    from segpcl_fast.data.imagenet_r import load_imagenet_r
    root = _imr_root(tmp_path, 20)
    train, test = load_imagenet_r(str(root))
    assert (len(train), len(test)) == (2 * 16, 2 * 4)
    train, test = build_datasets(DataConfig(dataset="imagenet-r", root=str(root)))
    assert (len(train), len(test)) == (2 * 16, 2 * 4)


def test_split_seed_and_test_fraction_reach_the_imagenet_r_reader(tmp_path):
    from segpcl_fast.data.imagenet_r import load_imagenet_r
    root = _imr_root(tmp_path, 10)
    cfg = DataConfig(dataset="imagenet-r", root=str(root), split_seed=3, test_fraction=0.4)
    train, test = build_datasets(cfg)
    assert len(test) == 2 * 4
    ref_train, ref_test = load_imagenet_r(str(root), split_seed=3, test_fraction=0.4)
    assert test.paths == ref_test.paths and train.paths == ref_train.paths
    assert load_imagenet_r(str(root), split_seed=0, test_fraction=0.4)[1].paths != test.paths


def test_stratified_split_hand_computed():
    """Per class: indices shuffled by RandomState(seed + label); the first round(f * n) (at least 1
    when n >= 2) go to test; both lists sorted."""
    targets = [0] * 8 + [1] * 8 + [2] * 2 + [3] * 1
    train, test = stratified_split(targets, 0.2, seed=4)
    want_test = []
    for label, n_test in ((0, 2), (1, 2), (2, 1), (3, 0)):  # round(1.6) = 2, round(0.4) = 0 -> 1, n = 1 -> 0
        idx = [i for i, t in enumerate(targets) if t == label]
        perm = np.random.RandomState(4 + label).permutation(len(idx))
        want_test += [idx[j] for j in perm[:n_test]]
    assert test == sorted(want_test)
    assert train == sorted(set(range(len(targets))) - set(want_test))
    # one class's split does not depend on the other classes
    alone_train, alone_test = stratified_split([1] * 8, 0.2, seed=4)
    mixed_train, mixed_test = stratified_split([0] * 8 + [1] * 8, 0.2, seed=4)
    assert [i - 8 for i in mixed_test if i >= 8] == alone_test


def test_imagenet_r_seeded_split_uses_split_seed(tmp_path):
    from segpcl_fast.data.imagenet_r import load_imagenet_r
    root = _imr_root(tmp_path, 10)
    for seed in (0, 3):
        train, test = load_imagenet_r(str(root), split_seed=seed)
        all_paths = sorted(train.paths + test.paths)
        _, test_idx = stratified_split([0] * 10 + [1] * 10, 0.2, seed)
        assert test.paths == [all_paths[i] for i in test_idx]


def test_stratified_split_seeds_wrap_past_numpys_range():
    """data.split_seed may be any numpy seed (up to 2^32 - 1): seed + label wraps mod 2^32 (it raised at load)."""
    import numpy as np
    _, test = stratified_split([0] * 10 + [1] * 10, 0.2, 2 ** 32 - 1)
    for label, seed in ((0, 2 ** 32 - 1), (1, 0)):
        perm = np.random.RandomState(seed).permutation(10)
        assert [i for i in test if i // 10 == label] == sorted(10 * label + int(j) for j in perm[:2])


def test_imagenet_r_presplit_test_wins_over_val(tmp_path):
    from segpcl_fast.data.imagenet_r import load_imagenet_r
    wnids = sorted(IMR_WNIDS)
    for c, wnid in enumerate(wnids):
        write_image(tmp_path / "train" / wnid / "a.jpg", colour(c, 0))
        write_image(tmp_path / "test" / wnid / "t.jpg", colour(c, 1))
        write_image(tmp_path / "val" / wnid / "v.jpg", colour(c, 2))
    (tmp_path / "README.txt").write_text("".join(f"{w} {n}\n" for w, n in sorted(IMR_WNIDS.items())))
    _, test = load_imagenet_r(str(tmp_path))
    assert all(p.split("/")[-3] == "test" for p in test.paths)


def test_imagenet_r_sectioned_file_accepts_a_val_section(imagenet_r_root, tmp_path):
    from segpcl_fast.data.imagenet_r import load_imagenet_r
    wnids = sorted(IMR_WNIDS)
    split = tmp_path / "split.txt"
    split.write_text("\n".join(["train"] + [f"{w}/cartoon_0.jpg" for w in wnids]
                               + ["val:"] + [f"{w}/cartoon_1.jpg" for w in wnids]) + "\n")
    train, test = load_imagenet_r(str(imagenet_r_root), split_file=str(split))
    assert all(p.endswith("cartoon_1.jpg") for p in test.paths) and len(test) == len(wnids)
    assert all(p.endswith("cartoon_0.jpg") for p in train.paths)


# ----------------------------------------------------------------------------- ImageNet-Subset
def test_imagenet100_txt_is_preferred_over_train_100_txt(tmp_path):
    from segpcl_fast.data.imagenet_subset import load_imagenet_subset
    root = make_imagenet_subset(tmp_path / "in", split_lists=True)
    (root / "imagenet100.txt").write_text("n01443537\nn01491361\n")  # another subset than train_100.txt's
    train, _ = load_imagenet_subset(str(root))
    assert train.class_names == ["goldfish", "tiger shark"]


# ----------------------------------------------------------------------------- UCF101
def test_middle_frame_of_an_even_count_is_index_n_over_2(tmp_path):
    from segpcl_fast.data.ucf101 import middle_frame
    for n, want in ((4, "frame_3.jpg"), (10, "frame_6.jpg"), (1, "frame_1.jpg")):
        video = tmp_path / f"v{n}"
        for k in range(1, n + 1):
            write_image(video / f"frame_{k}.jpg", (k, k, k), size=(2, 2))
        assert middle_frame(video).name == want


def test_ucf101_class_index_is_the_classind_id_not_the_name_order(tmp_path):
    from segpcl_fast.data.ucf101 import load_ucf101
    root = make_ucf101(tmp_path / "ucf")
    lists = root / "ucfTrainTestlist"
    order = [2, 0, 1]  # classInd ids 1, 2, 3 -> YoYo, ApplyEyeMakeup, HandstandPushups
    (lists / "classInd.txt").write_text("".join(f"{k + 1} {UCF_CLASSES[c][0]}\n" for k, c in enumerate(order)))
    train_list = lists / "trainlist01.txt"
    train_list.write_text("".join(f"{line.rsplit(' ', 1)[0]} {order.index(int(line.rsplit(' ', 1)[1]) - 1) + 1}\n"
                                  for line in train_list.read_text().splitlines()))
    train, test = load_ucf101(str(root))
    assert train.class_names == ["Yo Yo", "Apply Eye Makeup", "Handstand Pushups"]
    for ds in (train, test):
        for i in range(len(ds)):
            img, label = ds[i]
            assert decode_colour(img)[0] == order[label]


def test_frames_dir_reaches_the_ucf101_reader(tmp_path):
    root = make_ucf101(tmp_path / "ucf")
    (root / "UCF-101-midframes").rename(root / "my_frames")
    train, test = build_datasets(DataConfig(dataset="ucf101", root=str(root), frames_dir="my_frames"))
    assert len(train) == 6 and len(test) == 3


# ----------------------------------------------------------------------------- prompts
# CLIP's data/prompts.md (OpenAI) ensembles and CoOp's single UCF101 template.
CLIP_CIFAR100 = [
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.", "a low contrast photo of a {}.",
    "a high contrast photo of a {}.", "a bad photo of a {}.", "a good photo of a {}.", "a photo of a small {}.",
    "a photo of a big {}.", "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}."]


def test_published_templates():
    from segpcl_fast.data.prompts import TEMPLATE_SETS, resolve_templates
    assert TEMPLATE_SETS["cifar100"] == CLIP_CIFAR100
    assert resolve_templates("ucf101") == ["a photo of a person doing {}."]  # CoOp
    assert resolve_templates("photo") == ["a photo of a {}."]
    ucf = TEMPLATE_SETS["ucf101_ensemble"]
    want = {f"a {kind} of {art} person {verb}{{}}." for verb in ("", "using ", "doing ", "during ", "performing ",
                                                                    "practicing ")
            for art in ("a", "the") for kind in ("photo", "video", "example", "demonstration")}
    assert len(ucf) == 48 and set(ucf) == want
    assert "a example of a person {}." in ucf  # CLIP's own spelling
    zsm = pytest.importorskip("open_clip.zero_shot_metadata")
    imagenet = [t("{}") for t in zsm.OPENAI_IMAGENET_TEMPLATES]
    assert resolve_templates("imagenet-r") == resolve_templates("imagenet-subset") == imagenet


# ----------------------------------------------------------------------------- transforms
def test_clip_normalisation_constants_and_train_crop():
    open_clip = pytest.importorskip("open_clip")
    from torchvision import transforms as T

    from segpcl_fast.data.transforms import CLIP_MEAN, CLIP_STD, clip_test_transform, clip_train_transform
    assert CLIP_MEAN == open_clip.constants.OPENAI_DATASET_MEAN and CLIP_STD == open_clip.constants.OPENAI_DATASET_STD
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (37, 53, 3), dtype=np.uint8))
    ref = open_clip.image_transform(32, is_train=False)  # open_clip's defaults: OpenAI mean / std
    assert (clip_test_transform(32)(img) - ref(img)).abs().max() == 0
    steps = clip_train_transform(32).transforms
    crop = next(s for s in steps if isinstance(s, T.RandomResizedCrop))
    assert crop.scale == (0.6, 1.0)  # the documented [choice]
    assert any(isinstance(s, T.RandomHorizontalFlip) for s in steps)


# ----------------------------------------------------------------------------- retention
def test_reference_images_limit_is_a_seeded_choice_in_file_order(tmp_path):
    import torch

    from segpcl_fast.data.retention import list_reference_images, load_reference_images
    for k in range(8):
        write_image(tmp_path / "ref" / f"img_{k}.png", (k * 20, 0, 0), size=(2, 2))
    files = list_reference_images(str(tmp_path / "ref"))
    to_tensor = lambda im: torch.tensor(np.asarray(im)[0, 0, 0], dtype=torch.float32)  # noqa: E731
    got = load_reference_images(str(tmp_path / "ref"), to_tensor, limit=3, seed=11)
    keep = np.sort(np.random.RandomState(11).choice(8, 3, replace=False))
    assert got.tolist() == [float(int(files[i].stem.split("_")[1]) * 20) for i in keep]


def test_retention_real_dataset_cap_applies(tmp_path):
    from segpcl_fast.data.retention import build_retention_dataset
    folder = tmp_path / "food-101"
    (folder / "meta").mkdir(parents=True)
    (folder / "meta" / "classes.txt").write_text("apple_pie\nbaby_back_ribs\n")
    lines = [f"{c}/{k}" for c in ("apple_pie", "baby_back_ribs") for k in range(3)]
    (folder / "meta" / "test.txt").write_text("\n".join(lines) + "\n")
    for line in lines:
        write_image(folder / "images" / f"{line}.jpg", (0, 0, 0), size=(2, 2))
    ds, templates = build_retention_dataset("food101", str(tmp_path), per_class=2)
    assert sorted(ds.targets) == [0, 0, 1, 1] and ds.class_names == ["apple pie", "baby back ribs"]
    assert templates == ["a photo of {}, a type of food."]  # CLIP's Food101 template
