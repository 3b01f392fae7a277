"""Tests added by a mutation audit of segpcl_fast/data: each pins a documented rule that the other
data tests leave open (a config option that must reach its reader, the test split's transform,
the seeded split / cap rules computed by hand, the published prompt templates and normalisation).
A second audit (the readers changed since 7a90c2d) added the tests at the end: case-folded folder
names, hidden folders, test/ over val/, names-file normalisation, pre-split and CoOp precedence,
class_order's loose / compact / id lookups, Kaggle imagenet100's sorted wnids.
A third audit (data + metrics, since 2026-12-05) added the tests after 'third audit': class_order's
exact-before-loose lookup, its clash message, negative / bool / single-problem refusals; split_tasks' empty
sizes, zero-size tasks and num_tasks <= 0; labels outside the class list; task index -1 and task_of_class;
literal braces in templates; Food-101 labels.txt, Pets' class ids; retention templates and defaults; the
reference folder's order, folders named like images and seeds."""
import numpy as np
import pytest
from PIL import Image

from data_fakes import (CUB_CLASSES, IMR_PER_CLASS, IMR_WNIDS, UCF_CLASSES, UCF_TEST_GROUPS, UCF_TRAIN_GROUPS, colour,
                        decode_colour, make_cifar100, make_cub, make_imagenet_r, make_imagenet_subset, make_ucf101,
                        ucf_videos, write_image)
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


# ----------------------------------------------------------------------------- second mutation audit (since 7a90c2d)
# Each test below pins a rule of the readers changed since 7a90c2d that a surviving mutant showed untested.
def _flat_imagefolder(root, folders, per_class=4):
    """<root>/<folder>/img_<i>.png, folders in the order given (labels are the sorted order)."""
    for c, folder in enumerate(folders):
        for i in range(per_class):
            write_image(root / folder / f"img_{i}.png", colour(c, i), size=(2, 2))
    return root


def test_imagefolder_folders_differing_only_in_case_are_one_name(tmp_path):
    """CLIP's tokenizer lowercases: folders 'Cat' and 'cat' would give one prompt to two classes."""
    from segpcl_fast.data.imagefolder import load_imagefolder
    root = _flat_imagefolder(tmp_path / "ds", ["Cat", "cat", "dog"])
    with pytest.raises(DatasetFormatError, match=r"give the same class name: \['Cat', 'cat'\]"):
        load_imagefolder(str(root))


def test_stratified_split_leaves_each_class_a_training_image():
    """At least 1 test image when n >= 2, and at most n - 1: round(0.8 * 2) = 2 and round(0.9 * 3) = 3 would
    leave the class nothing to train on."""
    targets = [0, 0, 1, 1, 1]
    for fraction in (0.8, 0.9):
        train, test = stratified_split(targets, fraction, seed=0)
        assert sorted(targets[i] for i in train) == [0, 1] and len(test) == 3
        assert sorted(train + test) == list(range(5))


def test_imagefolder_hidden_folders_are_neither_classes_nor_images(tmp_path):
    """.ipynb_checkpoints/ (a notebook's) beside the class folders is no class, and inside a class folder its
    images are not the class's; the rest is what torchvision's ImageFolder reads."""
    from torchvision.datasets import ImageFolder

    from segpcl_fast.data.imagefolder import load_imagefolder
    root = tmp_path / "ds"
    for split in ("train", "test"):
        _flat_imagefolder(root / split, ["cat", "dog"], per_class=2)
        write_image(root / split / ".ipynb_checkpoints" / "img_0-checkpoint.png", (1, 2, 3), size=(2, 2))
        write_image(root / split / "cat" / ".ipynb_checkpoints" / "img_0-checkpoint.png", (1, 2, 3), size=(2, 2))
    train, test = load_imagefolder(str(root))
    assert train.class_names == ["cat", "dog"]
    for ds, split in ((train, "train"), (test, "test")):
        peer = [(p, t) for p, t in ImageFolder(str(root / split)).samples if "/." not in p]
        assert list(zip(ds.paths, ds.targets)) == [(p, t - 1) for p, t in peer]  # the peer's class 0: the hidden one
        assert len(ds) == 4


def test_presplit_copies_take_test_over_val_and_refuse_an_empty_train_class(cub_root, tmp_path):
    """find_presplit: test/ wins when test/ and val/ both hold class folders; a class whose train/ folder holds no
    image is refused (it would have nothing to train on)."""
    from segpcl_fast.data.cub import load_cub200
    official = load_cub200(str(cub_root))
    root = _cub_presplit(cub_root, tmp_path / "proof")
    for f in (root / "train").rglob("*.jpg"):  # a val/ of other images beside test/
        write_image(root / "val" / f.parent.name / f.name.replace(".jpg", "_val.jpg"), (0, 0, 0), size=(2, 2))
    _, test = load_cub200(str(root))
    assert [p.split("/")[-3:] for p in test.paths] == [["test"] + p.split("/")[-2:] for p in official[1].paths]
    assert test.targets == official[1].targets
    for f in (root / "train" / CUB_CLASSES[1]).iterdir():
        f.unlink()
    with pytest.raises(DatasetFormatError, match=r"1 class folders of .* hold no images, e.g. \['002.Laysan_Albatross'\]"):
        load_cub200(str(root))


def test_imagefolder_a_class_named_train_with_images_and_sub_folders_is_a_class(tmp_path):
    """A folder named as a split is a split only when it holds no images of its own: a flat dataset's class
    'train' with images directly in it and more in a sub-folder is a class."""
    from segpcl_fast.data.imagefolder import load_imagefolder
    root = _flat_imagefolder(tmp_path / "ds", ["bus", "train"], per_class=3)
    write_image(root / "train" / "more" / "img_9.png", colour(1, 9), size=(2, 2))
    train, test = load_imagefolder(str(root))
    assert train.class_names == ["bus", "train"]
    assert sorted(train.targets + test.targets) == [0] * 3 + [1] * 4


def test_imagefolder_test_folder_wins_over_val(tmp_path):
    """TEST_DIRS: the first present wins, test/ before val/ (a copy with both keeps val/ for tuning)."""
    from segpcl_fast.data.imagefolder import load_imagefolder
    root = tmp_path / "ds"
    for split in ("train", "test", "val"):
        _flat_imagefolder(root / split, ["cat", "dog"], per_class=2)
    _, test = load_imagefolder(str(root))
    assert {p.split("/")[-3] for p in test.paths} == {"test"}


def test_imagefolder_names_file_keys_and_values_are_normalised(tmp_path):
    """A names file written on macOS spells its keys decomposed (NFD) where the folders are composed: the same
    folder; a name's runs of blanks are one space (CLIP's prompt), and a blank name is refused."""
    import json
    import unicodedata

    from segpcl_fast.data.imagefolder import load_imagefolder
    root = _flat_imagefolder(tmp_path / "ds", [unicodedata.normalize("NFC", "café"), "tea"], per_class=2)
    (tmp_path / "nfd.json").write_text(json.dumps({unicodedata.normalize("NFD", "café"): "coffee  \t cup ",
                                                   "tea": " green   tea"}))
    train, _ = load_imagefolder(str(root), names_file=str(tmp_path / "nfd.json"))
    assert train.class_names == ["coffee cup", "green tea"]
    (tmp_path / "blank.json").write_text(json.dumps({"café": "coffee", "tea": "   "}))
    with pytest.raises(DatasetFormatError, match=r"give an empty class name: \['tea'\]"):
        load_imagefolder(str(root), names_file=str(tmp_path / "blank.json"))


def test_imagefolder_a_root_at_a_split_half_in_another_case_warns(tmp_path, caplog):
    """data.root=<dataset>/Train (split folders in any case) warns as <dataset>/train does."""
    from segpcl_fast.data.imagefolder import load_imagefolder
    root = tmp_path / "ds"
    for split in ("Train", "Test"):
        _flat_imagefolder(root / split, ["cat", "dog"], per_class=3)
    with caplog.at_level("WARNING", logger="segpcl_fast.data.imagefolder"):
        load_imagefolder(str(root / "Train"))
    assert f"data.root {root / 'Train'} is one half of the split in {root} (beside Test/)" in caplog.text


def test_imagenet_r_a_folder_or_file_named_as_an_image_or_a_wnid_is_not_one(imagenet_r_root):
    """list_images takes files only (a folder 'x.jpg' is none), wnid_folders folders only (a file 'n01440764',
    e.g. a leftover of an extraction, is no class)."""
    from segpcl_fast.data.imagenet_r import load_imagenet_r
    folder = imagenet_r_root / "imagenet-r"
    (folder / "n01443537" / "thumbs.jpg").mkdir()
    (folder / "n01440764").write_bytes(b"")
    train, test = load_imagenet_r(str(imagenet_r_root))
    assert train.class_ids == sorted(IMR_WNIDS)
    assert len(train) + len(test) == len(IMR_WNIDS) * IMR_PER_CLASS
    assert not any(p.endswith("thumbs.jpg") for p in train.paths + test.paths)


def test_class_order_falls_back_loose_then_compact_and_by_id_too():
    """_lookup_name: names case/underscore-insensitively before the compact form (no ambiguity between 'sea lion'
    and 'sealion' for 'Sea_Lion'), and the compact form ignores case and reaches the ids (a folder named
    'golden_retriever' renamed 'dog' by a names file is still 'golden-retriever')."""
    from segpcl_fast.data.protocol import resolve_class_order
    assert resolve_class_order(["sealion", "Sea_Lion"], ["sea lion", "sealion"]) == [1, 0]
    ids = ["golden_retriever", "tabby_cat"]
    assert resolve_class_order(["Tabby-Cat", "golden-retriever"], ["dog", "cat"], class_ids=ids) == [1, 0]
    ucf = ["Apply Eye Makeup", "Yo Yo"]
    assert resolve_class_order(["yoyo", "applyeyemakeup"], ucf, class_ids=["Apply_Eye_Makeup", "Yo_Yo"]) == [1, 0]


def _cub_presplit(cub_root, root):
    """PROOF's cub/{train,test}/<class>/ of the fake's official split, under `root`."""
    import shutil
    folder = cub_root / "CUB_200_2011"
    split = dict(line.split() for line in (folder / "train_test_split.txt").read_text().splitlines())
    for line in (folder / "images.txt").read_text().splitlines():
        image_id, rel = line.split()
        dest = root / ("train" if split[image_id] == "1" else "test") / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / "images" / rel, dest)
    return root


def test_cub_official_metadata_wins_then_cub_folder_then_root_and_names_must_differ(cub_root, tmp_path):
    """The official CUB_200_2011/images.txt wins over a pre-split copy beside it; of the pre-split candidates
    <root>/cub/ comes before <root> (a shared data root whose own train/ + test/ are another dataset's); two class
    folders that give one name (case aside) are refused."""
    from segpcl_fast.data.cub import load_cub200
    _cub_presplit(cub_root, cub_root / "cub")
    train, _ = load_cub200(str(cub_root))
    assert all("/CUB_200_2011/images/" in p for p in train.paths)
    shared = _cub_presplit(cub_root, tmp_path / "data" / "cub").parent
    for split in ("train", "test"):  # another dataset's ImageFolder split in the shared root itself
        for folder in ("cat", "dog"):
            write_image(shared / split / folder / "a.jpg", (1, 2, 3), size=(2, 2))
    train, test = load_cub200(str(shared))
    assert train.class_ids == CUB_CLASSES and all("/data/cub/" in p for p in train.paths + test.paths)
    clash = shared / "cub"
    for split in ("train", "test"):
        write_image(clash / split / "004.Laysan_albatross" / "x.jpg", (1, 2, 3), size=(2, 2))
    with pytest.raises(DatasetFormatError, match=r"give the same class name: \['002.Laysan_Albatross', "
                                                 r"'004.Laysan_albatross'\]"):
        load_cub200(str(clash))


def test_cifar100_a_class_with_test_images_only_is_kept_for_the_protocol_to_refuse(tmp_path):
    """Classes are those of either split's pickle: one with test images only stays a class (the protocol then
    names it), and each split keeps its images' classes."""
    import pickle
    from segpcl_fast.data.cifar import load_cifar100
    folder = tmp_path / "c" / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, labels in (("train", [0, 2, 0]), ("test", [3, 2, 0])):
        entry = {"fine_labels": labels, "data": np.full((len(labels), 3072), 7 * np.array(labels)[:, None], np.uint8)}
        (folder / split).write_bytes(pickle.dumps(entry, protocol=2))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": ["apple", "bear", "maple_tree", "otter"]}))
    train, test = load_cifar100(str(tmp_path / "c"))
    assert train.class_names == ["apple", "maple tree", "otter"]
    assert list(train.targets) == [0, 1, 0] and list(test.targets) == [2, 1, 0]
    assert [int(np.asarray(test[i][0])[0, 0, 0]) for i in range(3)] == [21, 14, 0]  # 7 * the CIFAR label
    with pytest.raises(DatasetFormatError, match=r"1 classes have no training images, e.g. \['otter'\]"):
        ClassIncrementalScenario(train, test, num_tasks=1)


def _ucf_coop_split(root):
    """CoOp's split_zhou_UCF101.json for make_ucf101's fake (train = trainlist01 cut in two, test = testlist01)."""
    import json
    import re

    def entries(groups):
        return [[f"{'_'.join(re.findall(r'[A-Z][^A-Z]*', f))}/{v}.jpg", c, "_".join(re.findall(r"[A-Z][^A-Z]*", f))]
                for c, f, v in ucf_videos(groups)]
    train = entries(UCF_TRAIN_GROUPS)
    split = {"train": train[::2], "val": train[1::2], "test": entries(UCF_TEST_GROUPS)}
    (root / "split_zhou_UCF101.json").write_text(json.dumps(split))
    return split


def _ucf_presplit(ucf_root, root):
    """PROOF's <root>/{train,test}/<Class>/<video>.jpg of make_ucf101's midframes."""
    import re
    import shutil
    for groups, split in ((UCF_TRAIN_GROUPS, "train"), (UCF_TEST_GROUPS, "test")):
        for c, folder, video in ucf_videos(groups):
            dest = root / split / folder / f"{video}.jpg"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ucf_root / "UCF-101-midframes" / "_".join(re.findall(r"[A-Z][^A-Z]*", folder)) /
                        f"{video}.jpg", dest)
    return root


def test_ucf101_coop_split_wins_over_a_presplit_copy_and_frames_dir_never_falls_back(ucf_root):
    """Without the official lists, CoOp's split file in data.root is read before a pre-split ucf/ beside it; a set
    data.frames_dir that is not there is an error, not a silent switch to the pre-split copy."""
    import shutil

    from segpcl_fast.data.ucf101 import load_ucf101
    _ucf_presplit(ucf_root, ucf_root / "ucf")
    with pytest.raises(DatasetFormatError, match="data.frames_dir"):
        load_ucf101(str(ucf_root), frames_dir="no_such_frames")
    shutil.rmtree(ucf_root / "ucfTrainTestlist")
    _ucf_coop_split(ucf_root)
    train, test = load_ucf101(str(ucf_root))
    assert all("/UCF-101-midframes/" in p for p in train.sources + test.sources)
    assert train.class_ids == ["Apply_Eye_Makeup", "Handstand_Pushups", "Yo_Yo"]


def test_ucf101_coop_labels_must_be_0_to_n_minus_1(ucf_root):
    import json
    import shutil

    from segpcl_fast.data.ucf101 import load_ucf101
    shutil.rmtree(ucf_root / "ucfTrainTestlist")
    split = _ucf_coop_split(ucf_root)
    shifted = {k: [[rel, label + 1, name] for rel, label, name in v] for k, v in split.items()}  # 1-based
    (ucf_root / "split_zhou_UCF101.json").write_text(json.dumps(shifted))
    with pytest.raises(DatasetFormatError, match=r"labels are not 0..2, one class name each \(labels \[1, 2, 3\]"):
        load_ucf101(str(ucf_root))


def test_ucf101_presplit_class_folder_samples_are_sorted_by_name(ucf_root, tmp_path):
    """A pre-split class folder holding both frames (images) and per-video frame folders: its samples in name
    order, whatever their kind."""
    from segpcl_fast.data.ucf101 import load_ucf101
    root = _ucf_presplit(ucf_root, tmp_path / "proof")
    video = root / "train" / "YoYo" / "v_YoYo_g00_c01"  # sorts before the fake's v_YoYo_g08 / _g09 images
    for k in range(1, 4):
        write_image(video / f"frame_{k}.jpg", colour(2, 0) if k == 2 else (250, 250, 250), size=(2, 2))
    train, _ = load_ucf101(str(root))
    yoyo = [p.rsplit("/", 1)[1] for p, t in zip(train.sources, train.targets) if t == 2]
    assert yoyo == ["v_YoYo_g00_c01", "v_YoYo_g08_c01.jpg", "v_YoYo_g09_c01.jpg"]
    assert decode_colour(train[train.targets.index(2)][0]) == (2, 0)


def test_ucf101_presplit_with_only_classind_follows_its_order(ucf_root, tmp_path):
    """A pre-split copy with classInd.txt beside it (no train/test lists): classes in classInd.txt's order."""
    from segpcl_fast.data.ucf101 import load_ucf101
    root = _ucf_presplit(ucf_root, tmp_path / "proof")
    (root / "ucfTrainTestlist").mkdir()
    (root / "ucfTrainTestlist" / "classInd.txt").write_text("1 YoYo\n2 ApplyEyeMakeup\n3 HandstandPushups\n")
    train, test = load_ucf101(str(root))
    assert train.class_ids == ["YoYo", "ApplyEyeMakeup", "HandstandPushups"]
    for ds in (train, test):
        for i in range(len(ds)):
            assert decode_colour(ds[i][0])[0] == [2, 0, 1][ds.targets[i]]


def _kaggle100(root, parts):
    """Kaggle's imagenet100 of make_imagenet_subset's synsets: parts = {"train.X1": [wnids], ...}, val.X/ of all."""
    import json

    from data_fakes import IN_SYNSETS
    ranked = sorted(IN_SYNSETS)
    for part, wnids in parts.items():
        for wnid in wnids:
            for i in range(2):
                write_image(root / part / wnid / f"{wnid}_{i}.JPEG", colour(ranked.index(wnid), i), size=(2, 2))
                write_image(root / "val.X" / wnid / f"v_{i}.JPEG", colour(ranked.index(wnid), i), size=(2, 2))
    (root / "Labels.json").write_text(json.dumps({w: IN_SYNSETS[w] for ws in parts.values() for w in ws}))
    return root


def test_kaggle_imagenet100_class_index_is_the_sorted_wnid_whichever_part_holds_it(tmp_path):
    """Class index = position in the sorted wnids (the module's rule), not the order of train.X1, train.X2; a
    data.class_list of train/ image lines (PODNet's) is refused for this copy, which has no train/."""
    from segpcl_fast.data.imagenet_subset import load_imagenet_subset
    root = _kaggle100(tmp_path / "in100", {"train.X1": ["n01494475"], "train.X2": ["n01440764", "n01484850"]})
    train, val = load_imagenet_subset(str(root))
    from data_fakes import IN_SYNSETS
    assert train.class_ids == ["n01440764", "n01484850", "n01494475"]
    for ds in (train, val):
        for i in range(len(ds)):
            assert train.class_ids[ds.targets[i]] == sorted(IN_SYNSETS)[decode_colour(ds[i][0])[0]]
    (root / "podnet.txt").write_text("train/n01440764/n01440764_0.JPEG 0\ntrain/n01484850/n01484850_0.JPEG 1\n")
    with pytest.raises(DatasetFormatError, match="lists train/ images, but this copy is Kaggle's imagenet100"):
        load_imagenet_subset(str(root), class_list="podnet.txt")


def test_split_seed_and_test_fraction_reach_the_imagefolder_reader(tmp_path):
    from segpcl_fast.data.imagefolder import load_imagefolder
    root = _flat_imagefolder(tmp_path / "ds", ["cat", "dog"], per_class=10)
    train, test = build_datasets(DataConfig(dataset="imagefolder", root=str(root), split_seed=3, test_fraction=0.4))
    assert len(test) == 2 * 4
    ref_train, ref_test = load_imagefolder(str(root), split_seed=3, test_fraction=0.4)
    assert test.paths == ref_test.paths and train.paths == ref_train.paths
    assert load_imagefolder(str(root), split_seed=0, test_fraction=0.4)[1].paths != test.paths


def test_check_task_split_takes_data_task_sizes():
    """A preset's unequal tasks (7 classes as [4, 3]) pass the check before training; sizes that do not sum refuse."""
    from segpcl_fast.data.build import check_task_split
    check_task_split(DataConfig(dataset="imagefolder", expected_classes=7, num_tasks=2, task_sizes=[4, 3]))
    with pytest.raises(DatasetFormatError, match=r"task sizes \[4, 4\] .* sum to the 7 classes"):
        check_task_split(DataConfig(dataset="imagefolder", expected_classes=7, num_tasks=2, task_sizes=[4, 4]))


# ----------------------------------------------------------------------------- third audit (since 2026-12-05)
def test_class_order_exact_name_or_id_wins_before_the_loose_forms():
    """_lookup_name's order: an exact name or id is taken before the case/underscore-insensitive name, so two
    classes that differ only in case ('Cat', 'cat') are each found by their exact spelling, and an exact id is not
    beaten by another class whose name matches it loosely."""
    from segpcl_fast.data.protocol import resolve_class_order
    assert resolve_class_order(["cat", "Cat"], ["Cat", "cat"]) == [1, 0]
    # 'n1' is class 0's id exactly and class 1's name in another case: the exact id wins
    assert resolve_class_order(["n1", "N1"], ["zebra", "N1"], class_ids=["n1", "n2"]) == [0, 1]


def test_class_order_name_id_clash_message_quotes_the_other_label_of_each_class():
    """The refusal of a string that is one class's name and another's id describes class by_name by its id and
    class by_id by its name (the label the user did not type), so the two classes can be told apart."""
    from segpcl_fast.data.protocol import resolve_class_order
    with pytest.raises(DatasetFormatError, match=r"'cat' is the name of class 0 \('n1'\) and the id of class 1 "
                                                 r"\('dog'\)"):
        resolve_class_order(["cat", "dog", "cow"], ["cat", "dog", "cow"], class_ids=["n1", "cat", "n3"])


@pytest.mark.parametrize("order, message", [
    ([0, 1, 2, -1], r"1 entries are not classes of the dataset \(names, or indices 0..2\): \[-1\]$"),
    ([True, 0, 2], (r"1 entries are not classes of the dataset \(names, or indices 0..2\): \[True\]; "
                    r"1 classes not listed: \['b'\]")),
    ([0, 1, 2, "d"], r"1 entries are not classes of the dataset .*: \['d'\]$"),
    ([0, 1, 2, 0], r"classes listed more than once: \['a'\]$"),
])
def test_class_order_refuses_a_negative_index_a_bool_and_a_single_problem(order, message):
    """Indices are 0..n-1 (a negative one is not Python's from-the-end index: [0, 1, 2, -1] is not a
    4-entry order of 3 classes), a bool is not an index (True is not class 1), and one problem alone (an extra
    entry, a repeat) is refused as well as several."""
    from segpcl_fast.data.protocol import resolve_class_order
    with pytest.raises(DatasetFormatError, match=message.replace("$", r"\. Dataset classes start with")):
        resolve_class_order(order, ["a", "b", "c"])


def test_split_tasks_empty_sizes_zero_size_and_zero_tasks():
    """task_sizes=[] is unset (equal tasks, as config.task_count reads it); a task of 0 classes is refused as not
    positive; data.num_tasks=0 (or negative) is the same DatasetFormatError as a non-divisor, with no unequal split
    to suggest (not a ZeroDivisionError)."""
    from segpcl_fast.data.protocol import split_tasks
    assert split_tasks(6, 3, task_sizes=[]) == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(DatasetFormatError, match=r"task sizes \[0, 6\] .* must be positive"):
        split_tasks(6, 1, task_sizes=[0, 6])
    for num_tasks in (0, -2):
        refusal = (rf"data.num_tasks={num_tasks} does not divide the 6 classes.*"
                   r"\[1, 2, 3, 6\], or give unequal tasks' sizes in data.task_sizes$")
        with pytest.raises(DatasetFormatError, match=refusal):
            split_tasks(6, num_tasks)


@pytest.mark.parametrize("bad_label", [6, -1])
def test_scenario_refuses_labels_outside_the_class_list(bad_label):
    """A test label equal to the class count (one past the end) or negative is a DatasetFormatError naming the
    range, not a numpy IndexError / ValueError later."""
    train, test = _pair(6)
    bad = ArrayDataset(np.zeros((7, 2, 2, 3), np.uint8), list(range(6)) + [bad_label], test.class_names)
    with pytest.raises(DatasetFormatError, match=r"test labels outside 0..5"):
        ClassIncrementalScenario(train, bad, "natural", num_tasks=3)


def test_scenario_task_index_and_task_of_class():
    """Task indices are 0..T-1: -1 is refused (not the last task); task_of_class(label) is the task whose
    ordered labels hold it."""
    train, test = _pair(6)
    sc = ClassIncrementalScenario(train, test, "natural", num_tasks=3, task_sizes=[3, 1, 2])
    for fn in (sc.task_classes, sc.seen_classes, sc.old_classes, sc.train_dataset, sc.test_dataset_upto):
        with pytest.raises(IndexError, match=r"task -1 out of range 0..2"):
            fn(-1)
        with pytest.raises(IndexError, match=r"task 3 out of range 0..2"):
            fn(3)
    assert [sc.task_of_class(c) for c in range(6)] == [0, 0, 0, 1, 2, 2]


def test_templates_other_braces_are_literal_and_a_non_string_template_is_refused():
    """A template's one '{}' is where the class name goes and nothing else is formatting: other braces stay as
    written (str.format would read '{curly}' as a field); a template that is not a string is the same ValueError
    as a malformed one."""
    from segpcl_fast.data.prompts import format_prompts, resolve_templates
    assert format_prompts(["cat"], ["a {} with {curly} {{braces}}."]) == [["a cat with {curly} {{braces}}."]]
    for bad in (None, 3):
        with pytest.raises(ValueError, match="must be a string with exactly one"):
            resolve_templates(["a photo of a {}.", bad])


def test_food101_labels_must_match_classes_line_for_line(tmp_path):
    """meta/labels.txt names the classes of classes.txt in order; one of another length is refused (a shorter one
    would shift every later name onto the wrong class)."""
    from segpcl_fast.data.retention import load_food101
    folder = tmp_path / "food-101"
    (folder / "meta").mkdir(parents=True)
    (folder / "meta" / "classes.txt").write_text("apple_pie\nbaby_back_ribs\n")
    (folder / "meta" / "labels.txt").write_text("Apple pie\n")
    (folder / "meta" / "test.txt").write_text("apple_pie/1\nbaby_back_ribs/2\n")
    for line in ("apple_pie/1", "baby_back_ribs/2"):
        write_image(folder / "images" / f"{line}.jpg", (0, 0, 0), size=(2, 2))
    with pytest.raises(DatasetFormatError, match="meta/labels.txt has 1 lines but classes.txt 2"):
        load_food101(str(tmp_path))


def _pets(root, listing, test):
    folder = root / "oxford-iiit-pet"
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    (folder / "annotations" / "list.txt").write_text(listing)
    (folder / "annotations" / "test.txt").write_text(test)
    for line in (listing + test).splitlines():
        if line and not line.startswith("#"):
            write_image(folder / "images" / f"{line.split()[0]}.jpg", (0, 0, 0), size=(2, 2))
    return root


def test_pets_class_index_is_the_sorted_class_id_and_test_rows_are_checked(tmp_path):
    """Pets' label is the rank of its CLASS-ID column (1..37), whatever order list.txt lists the breeds in; a test.txt
    id that list.txt lacks and a line without a class id are DatasetFormatErrors naming the file."""
    from segpcl_fast.data.retention import load_pets
    root = _pets(tmp_path / "a", "pug_1 3 2 3\nBengal_4 2 1 2\nAbyssinian_9 1 1 1\n", "pug_2 3 2 3\nBengal_5 2 1 2\n")
    ds = load_pets(str(root))
    assert ds.class_names == ["Abyssinian", "Bengal", "pug"] and ds.targets == [2, 1]
    root = _pets(tmp_path / "b", "Abyssinian_9 1 1 1\n", "Abyssinian_9 1 1 1\npug_2 3 2 3\n")
    with pytest.raises(DatasetFormatError, match=r"test.txt has class id 3 \('pug_2'\) that list.txt lacks"):
        load_pets(str(root))
    root = _pets(tmp_path / "c", "Abyssinian_9 1 1 1\n", "Abyssinian_9\n")
    with pytest.raises(DatasetFormatError, match=r"test.txt:1: expected '<image> <class id> <species> <breed id>'"):
        load_pets(str(root))


def test_retention_imagenet_uses_the_80_templates_and_synthetic_the_heldout_default(tmp_path, monkeypatch):
    """build_retention_dataset: ImageNet is scored with CLIP's 80 ImageNet templates; a synthetic set with
    per_class=0 renders synthetic.DEFAULT_HELDOUT_PER_CLASS images of each of the 100 classes."""
    from segpcl_fast.data import synthetic
    from segpcl_fast.data.prompts import OPENAI_IMAGENET
    from segpcl_fast.data.retention import build_retention_dataset
    for wnid in ("n01440764", "n01443537"):
        write_image(tmp_path / "val" / wnid / f"{wnid}_0.JPEG", (0, 0, 0), size=(2, 2))
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01440764 tench\nn01443537 goldfish\n")
    ds, templates = build_retention_dataset("imagenet", str(tmp_path))
    assert ds.class_names == ["tench", "goldfish"] and templates == OPENAI_IMAGENET and len(templates) == 80
    monkeypatch.setattr(synthetic, "DEFAULT_HELDOUT_PER_CLASS", 2)
    sketch, templates = build_retention_dataset("synthetic-sketch", None, per_class=0)
    assert templates is None and len(sketch) == 200


def test_reference_folder_lists_image_files_sorted_by_path_and_seeds_wrap(tmp_path):
    """list_reference_images: image files only (not a folder named like one), sorted by path across sub-folders
    (not the top folder's files first); load_reference_images' seed is taken modulo 2**32, as RandomState needs."""
    import torch

    from segpcl_fast.data.retention import list_reference_images, load_reference_images
    ref = tmp_path / "ref"
    for k, rel in enumerate(("z.png", "a.png", "m/b.png", "album.jpg/c.png")):
        write_image(ref / rel, (20 * k, 0, 0), size=(2, 2))
    files = list_reference_images(str(ref))
    assert [f.relative_to(ref).as_posix() for f in files] == ["a.png", "album.jpg/c.png", "m/b.png", "z.png"]
    to_tensor = lambda im: torch.tensor(float(np.asarray(im)[0, 0, 0]))  # noqa: E731
    seed = 2**32 + 2**31 + 7
    keep = np.sort(np.random.RandomState(seed % 2**32).choice(4, 2, replace=False))
    got = load_reference_images(str(ref), to_tensor, limit=2, seed=seed)
    assert got.tolist() == [float(np.asarray(Image.open(files[i]))[0, 0, 0]) for i in keep]
