import logging

import numpy as np
import pytest

from data_fakes import (IN_KAGGLE_IMAGES, IN_SUBSET, IN_SYNSETS, colour, decode_colour, in_val_name,
                        make_imagenet_subset, write_image, write_meta_bin)
from segpcl_fast.data.base import DatasetFormatError
from segpcl_fast.data.imagenet_subset import load_imagenet_subset

SORTED = sorted(IN_SYNSETS)
SUBSET_SORTED = sorted(IN_SUBSET)
assert SUBSET_SORTED != IN_SUBSET  # the fake's list is unsorted, so the tests below prove sorting


def assert_images_match_labels(ds, wnids):
    """Every image's colour encodes the class of its wnid (index in SORTED)."""
    for i in range(len(ds)):
        img, label = ds[i]
        assert decode_colour(img)[0] == SORTED.index(wnids[label])


def test_class_list_order_and_names(imagenet_subset_root):
    train, val = load_imagenet_subset(str(imagenet_subset_root))
    assert train.class_names == ["tench", "great white shark", "hammerhead"]  # sorted wnids, not line order
    assert train.class_ids == val.class_ids == SUBSET_SORTED
    assert len(train) == 3 * 3 and len(val) == 3 * 2
    for ds in (train, val):
        for path, label in zip(ds.paths, ds.targets):
            assert f"/{SUBSET_SORTED[label]}/" in path
    assert_images_match_labels(val, SUBSET_SORTED)


def test_explicit_class_list_and_flat_val(tmp_path):
    root = make_imagenet_subset(tmp_path / "in", class_list=False, flat_val=True)
    (root / "mine.txt").write_text("# two classes\nn01491361 tiger shark\nn01443537\n")
    train, val = load_imagenet_subset(str(root), class_list="mine.txt")
    assert train.class_names == ["goldfish", "tiger shark"]
    assert train.class_ids == ["n01443537", "n01491361"]
    assert len(val) == 4 and sorted(val.targets) == [0, 0, 1, 1]
    assert_images_match_labels(val, ["n01443537", "n01491361"])


def test_missing_class_list_is_an_error(tmp_path):
    root = make_imagenet_subset(tmp_path / "in", class_list=False)
    with pytest.raises(DatasetFormatError, match="imagenet100.txt"):
        load_imagenet_subset(str(root))
    with pytest.raises(DatasetFormatError, match="not found"):
        load_imagenet_subset(str(root), class_list="absent.txt")


def test_missing_class_list_of_a_partial_copy_names_the_expected_classes_that_reads_it(tmp_path):
    """A copy of a few classes with data.expected_classes null (README: 'set it to the count you have (or null)')
    was told only to write 100 wnids to imagenet100.txt; the fix that runs it, expected_classes=<its count>, is
    named too."""
    root = make_imagenet_subset(tmp_path / "in", class_list=False)
    count = len([p for p in (root / "train").iterdir() if p.is_dir()])
    with pytest.raises(DatasetFormatError, match=rf"set data.expected_classes={count} \(null means 100\)"):
        load_imagenet_subset(str(root))
    train, _ = load_imagenet_subset(str(root), n_classes=count)
    assert len(train.class_names) == count


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


def test_no_mapping_file_gives_ilsvrc_wnids_clips_names(tmp_path, caplog):
    """ILSVRC-2012 extracted from its train/val tars (valprep.sh) + PODNet's lists has no mapping file:
    its wnids get CLIP's curated names, as a shipped LOC_synset_mapping.txt would give them."""
    root = make_imagenet_subset(tmp_path / "in", mapping=False, split_lists=True)
    with caplog.at_level(logging.INFO, logger="segpcl_fast.data"):
        train, val = load_imagenet_subset(str(root))
    assert train.class_names == val.class_names == ["tench", "great white shark", "hammerhead shark"]  # CLIP's
    assert any("no class-name mapping file" in r.getMessage() and "CLIP's ImageNet names" in r.getMessage()
               for r in caplog.records)
    assert_images_match_labels(train, SUBSET_SORTED)


def test_missing_synset_mapping(tmp_path):
    root = make_imagenet_subset(tmp_path / "in", mapping=False)
    for split in ("train", "val"):  # a class outside ILSVRC-2012: CLIP's names do not cover it
        write_image(root / split / "n09999999" / "x.JPEG", colour(0, 0))
    (root / "imagenet100.txt").write_text("n01440764\nn09999999\n")
    with pytest.raises(DatasetFormatError, match="LOC_synset_mapping.txt comes with Kaggle's ImageNet download"):
        load_imagenet_subset(str(root))
    (root / "imagenet100.txt").write_text("".join(f"{w}\n" for w in IN_SUBSET))
    (tmp_path / "map.json").write_text('{"0": ["n01440764", "tench"], "1": ["n01484850", "great_white_shark"],'
                                       ' "2": ["n01494475", "hammerhead"]}')
    train, _ = load_imagenet_subset(str(root), names_file=str(tmp_path / "map.json"))
    assert train.class_names == ["tench", "great white shark", "hammerhead"]


def test_no_train_folder(tmp_path):
    with pytest.raises(DatasetFormatError, match="no train/"):
        load_imagenet_subset(str(tmp_path))


def test_a_shared_root_names_the_subset_before_another_wnid_dataset(tmp_path):
    """PROOF-style data root: imagenet-r/train/<wnid>/ beside imagenet100/ (with its class list): the fix names
    imagenet100 first, though 'imagenet-r' sorts before it (a review's finding)."""
    for wnid in IN_SUBSET:
        write_image(tmp_path / "imagenet-r" / "train" / wnid / "a.jpg", (1, 2, 3))
    make_imagenet_subset(tmp_path / "imagenet100")
    assert any((tmp_path / "imagenet100" / name).is_file() for name in ("imagenet100.txt", "train_100.txt"))
    with pytest.raises(DatasetFormatError, match=f"set data.root={tmp_path / 'imagenet100'} "
                                                 rf"\(also found in: {tmp_path / 'imagenet-r'}\)"):
        load_imagenet_subset(str(tmp_path))


# ----------------------------------------------------------------------------- class index = sorted wnids
def make_precut_100(root):
    """An already cut ImageNet-100: train/ and val/ with 100 wnid folders, one image each."""
    wnids = [f"n{1000000 + 37 * k:08d}" for k in range(100)]
    for k, wnid in enumerate(wnids):
        write_image(root / "train" / wnid / f"{wnid}_0.JPEG", (k, 0, 0), size=(2, 2))
        write_image(root / "val" / wnid / f"{wnid}_v.JPEG", (k, 0, 0), size=(2, 2))
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} thing {k}\n" for k, w in enumerate(wnids)))
    return wnids


def test_folders_and_list_file_give_the_same_class_indices(tmp_path):
    root = tmp_path / "in100"
    wnids = make_precut_100(root)
    from_folders = load_imagenet_subset(str(root))
    (root / "imagenet100.txt").write_text("\n".join(reversed(wnids)) + "\n")
    from_list = load_imagenet_subset(str(root))
    for a, b in zip(from_folders, from_list):
        assert a.class_names == b.class_names == [f"thing {k}" for k in range(100)]
        assert a.paths == b.paths and a.targets == b.targets
    # so 'seeded' 1993 over sorted-wnid labels is RAPF's class_orders/imagenet100.yaml
    assert list(np.random.RandomState(1993).permutation(100)[:5]) == [68, 56, 78, 8, 23]


def test_a_precut_smaller_subset_is_taken_when_expected_classes_says_so(tmp_path):
    """README: data.expected_classes runs a subset on purpose. A train/ cut to exactly that many wnids
    is the subset (it was refused: 'not 100', with 'write the 100 wnids' as the fix)."""
    from segpcl_fast.api import make_config
    from segpcl_fast.data.base import DatasetFormatError
    from segpcl_fast.data.build import build_datasets
    root = tmp_path / "in4"
    wnids = make_precut_100(root)
    import shutil
    for wnid in wnids[4:]:
        shutil.rmtree(root / "train" / wnid)
        shutil.rmtree(root / "val" / wnid)
    cfg = make_config("imagenet-subset", [f"data.root={root}", "data.expected_classes=4", "data.task_sizes=null",
                                          "data.num_tasks=2"])
    train, val = build_datasets(cfg.data)
    assert train.class_names == val.class_names == [f"thing {k}" for k in range(4)]
    with pytest.raises(DatasetFormatError, match=r"(?s)train/ holds 4 wnid folders, not 100.*write the 100 wnids.*"
                                                 r"PODNet's imagenet_split/train_100.txt and val_100.txt"):
        build_datasets(make_config("imagenet-subset", [f"data.root={root}"]).data)


# ----------------------------------------------------------------------------- continuum / PODNet split lists
def add_unlisted_images(root, images=None):
    """An extra train and val image of a listed class that the split lists do not name."""
    images = images or root
    wnid = IN_SUBSET[0]
    write_image(images / "train" / wnid / "unlisted.JPEG", colour(SORTED.index(wnid), 9))
    write_image(images / "val" / wnid / "unlisted.JPEG", colour(SORTED.index(wnid), 9))


@pytest.mark.parametrize("explicit", [False, True])
def test_split_lists_use_exactly_the_listed_files(tmp_path, explicit):
    root = make_imagenet_subset(tmp_path / "in", split_lists=True)
    add_unlisted_images(root)
    train, val = load_imagenet_subset(str(root), class_list="train_100.txt" if explicit else None)
    assert train.class_names == ["tench", "great white shark", "hammerhead"]
    assert len(train) == 3 * 3 and len(val) == 3 * 2
    assert not any("unlisted" in p for p in train.paths + val.paths)
    assert_images_match_labels(train, SUBSET_SORTED)
    assert_images_match_labels(val, SUBSET_SORTED)


def test_an_image_in_both_train_and_test_is_an_error(tmp_path):
    """The val list given as data.class_list made ImageNet's val images the training set and tested on them too
    (a review's finding): one error naming the slip; the same for a val image copied into train/."""
    root = make_imagenet_subset(tmp_path / "in", split_lists=True)
    with pytest.raises(DatasetFormatError, match=r"(?s)6 images are in both train and test .*measured on training images"
                                                 r".*must be the train list \(PODNet's train_100.txt\), not the val"):
        load_imagenet_subset(str(root), class_list="val_100.txt")
    folders = make_imagenet_subset(tmp_path / "folders")
    wnid = IN_SUBSET[0]
    val_image = sorted((folders / "val" / wnid).iterdir())[0]
    (folders / "train" / wnid / val_image.name).write_bytes(val_image.read_bytes())
    with pytest.raises(DatasetFormatError, match=f"(?s)1 images are in both .*'{folders / 'train' / wnid / val_image.name}'"
                                                 ".*keep each image in one of train/ and val/"):
        load_imagenet_subset(str(folders))


def test_split_lists_relative_to_the_split_folders(tmp_path):
    """Lists whose paths start at the wnid folder ('n01440764/x.JPEG 0', as many ImageNet-100 lists
    are written) are relative to train/ and val/."""
    root = make_imagenet_subset(tmp_path / "in", split_lists=True)
    add_unlisted_images(root)
    for name, prefix in (("train_100.txt", "train/"), ("val_100.txt", "val/")):
        lines = (root / name).read_text().splitlines()
        assert all(line.startswith(prefix) for line in lines)
        (root / name).write_text("".join(line[len(prefix):] + "\n" for line in lines))
    train, val = load_imagenet_subset(str(root))
    assert len(train) == 3 * 3 and len(val) == 3 * 2
    assert all("/train/" in p for p in train.paths) and all("/val/" in p for p in val.paths)
    assert_images_match_labels(train, SUBSET_SORTED)
    assert_images_match_labels(val, SUBSET_SORTED)


def test_podnet_val_list_over_kaggles_flat_val_folder(tmp_path):
    """PODNet's val_100.txt says val/<wnid>/<file>; Kaggle's val/ is flat: the images are found by
    file name and checked against LOC_val_solution.csv (a list from elsewhere is one error)."""
    root = make_imagenet_subset(tmp_path / "in", split_lists=True, kaggle=True, flat_val=True)
    lines = (root / "val_100.txt").read_text().splitlines()
    assert all(line.startswith("val/") and line.count("/") == 1 for line in lines)  # the fake's flat form
    podnet = [f"val/{SUBSET_SORTED[int(label)]}/{rel[len('val/'):]} {label}" for rel, label in map(str.split, lines)]
    (root / "val_100.txt").write_text("\n".join(podnet) + "\n")
    train, val = load_imagenet_subset(str(root))
    assert len(train) == 3 * 3 and len(val) == 3 * 2
    assert all(f"{IN_KAGGLE_IMAGES}/val/" in p for p in val.paths)
    assert_images_match_labels(val, SUBSET_SORTED)
    (a, la), (b, lb) = podnet[0].split(), podnet[-1].split()  # two images of two classes trade folders
    swapped = [f"{a.rsplit('/', 1)[0]}/{b.rsplit('/', 1)[1]} {la}", f"{b.rsplit('/', 1)[0]}/{a.rsplit('/', 1)[1]} {lb}"]
    (root / "val_100.txt").write_text("\n".join(swapped + podnet[1:-1]) + "\n")
    with pytest.raises(DatasetFormatError, match="found in the flat .* belong to other classes by"):
        load_imagenet_subset(str(root))


def test_split_list_without_val_list_falls_back_to_val_folders(tmp_path):
    root = make_imagenet_subset(tmp_path / "in", split_lists=True)
    add_unlisted_images(root)
    (root / "val_100.txt").unlink()
    train, val = load_imagenet_subset(str(root))
    assert len(train) == 3 * 3 and len(val) == 3 * 2 + 1
    assert_images_match_labels(val, SUBSET_SORTED)


def test_split_list_errors(tmp_path):
    root = make_imagenet_subset(tmp_path / "in", split_lists=True)
    good = (root / "train_100.txt").read_text()
    wnid = SUBSET_SORTED[0]
    (root / "train_100.txt").write_text(good + f"train/{wnid}/{wnid}_0.JPEG 2\n")  # a second label for wnid
    with pytest.raises(DatasetFormatError, match=f"one to one.*{wnid} has labels \\[0, 2\\]"):
        load_imagenet_subset(str(root))
    (root / "train_100.txt").write_text(good + "train/sharks/x.JPEG 1\n")
    with pytest.raises(DatasetFormatError, match="folder of 'train/sharks/x.JPEG' is not a wnid"):
        load_imagenet_subset(str(root))
    (root / "train_100.txt").write_text(good + f"train/{wnid}/absent.JPEG 0\n")
    with pytest.raises(DatasetFormatError, match="1 images listed in .*absent.JPEG"):
        load_imagenet_subset(str(root))
    (root / "train_100.txt").write_text(good)
    val = (root / "val_100.txt").read_text()
    swapped = {"0": "0", "1": "2", "2": "1"}  # one to one within val_100.txt, but not train_100.txt's labels
    (root / "val_100.txt").write_text("".join(
        f"{ln.rsplit(' ', 1)[0]} {swapped[ln.rsplit(' ', 1)[1]]}\n" for ln in val.splitlines()))
    with pytest.raises(DatasetFormatError, match=r"val_100.txt' does not match .*labels \[1, 2\]"):
        load_imagenet_subset(str(root))


def test_split_lists_in_another_label_order_say_which_class_order_reproduces_them(tmp_path, caplog):
    root = make_imagenet_subset(tmp_path / "in", split_lists=True)
    new_label = {"0": "2", "1": "0", "2": "1"}  # the list's label 0 is the second sorted wnid, ...
    for name in ("train_100.txt", "val_100.txt"):
        lines = (root / name).read_text().splitlines()
        (root / name).write_text("".join(f"{ln.rsplit(' ', 1)[0]} {new_label[ln.rsplit(' ', 1)[1]]}\n" for ln in lines))
    with caplog.at_level(logging.WARNING, logger="segpcl_fast.data"):
        train, _ = load_imagenet_subset(str(root))
    assert_images_match_labels(train, SUBSET_SORTED)  # class index stays the sorted wnid order
    assert "--set data.class_order=[1,2,0])" in caplog.text


def test_flat_val_without_its_csv_and_a_root_inside_kaggles_tree_name_the_fix(tmp_path):
    root = make_imagenet_subset(tmp_path / "in", class_list=False, flat_val=True)
    (root / "LOC_val_solution.csv").unlink()
    (tmp_path / "list.txt").write_text("\n".join(SUBSET_SORTED) + "\n")
    with pytest.raises(DatasetFormatError, match=r"Fix: sort the validation images into val/<wnid>/ folders "
                                                 r"\(e.g. with valprep.sh .*\), put Kaggle's LOC_val_solution.csv in .*, "
                                                 r"or extract ILSVRC2012_devkit_t12.tar.gz there"):
        load_imagenet_subset(str(root), class_list=str(tmp_path / "list.txt"))
    kaggle = make_imagenet_subset(tmp_path / "kg", kaggle=True, flat_val=True)
    with pytest.raises(DatasetFormatError, match=f"Fix: point data.root at {kaggle} .Kaggle's layout"):
        load_imagenet_subset(str(kaggle / IN_KAGGLE_IMAGES))


def _devkit(root, meta=True):
    """ILSVRC2012_devkit_t12/data/ as the tar.gz extracts it: the ground truth (line n: ILSVRC2012_val_<n>.JPEG's
    ILSVRC2012_ID) and meta.mat (synsets: ILSVRC2012_ID -> WNID, IDs in the devkit's own order, not sorted wnids)."""
    import numpy as np
    import scipy.io
    from data_fakes import in_val_name
    wnids = sorted(IN_SYNSETS)
    ids = {w: 100 + 7 * k for k, w in enumerate(reversed(wnids))}  # not the sorted-wnid order
    other = 999  # a class outside the fake ImageNet: the lines of val images that are not there
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    truth = {int(in_val_name(c, i).rsplit("_", 1)[1]): ids[w] for c, w in enumerate(wnids) for i in range(2)}
    truth.pop(0, None)  # line numbers start at 1
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{truth.get(n, other)}\n" for n in range(1, max(truth) + 1)))
    if meta:
        fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
        rows = [(np.array([[i]]), np.array([w]), np.array(["x"]), np.array([[0]])) for w, i in ids.items()]
        rows.append((np.array([[other]]), np.array(["n99999999"]), np.array(["x"]), np.array([[0]])))
        scipy.io.savemat(data / "meta.mat", {"synsets": np.array(rows, dtype=fields).reshape(-1, 1)})
    return data


def test_a_flat_val_with_the_devkit_is_labelled_from_its_ground_truth_and_meta_mat(tmp_path):
    """ILSVRC2012_img_val.tar extracts flat; the devkit's ground truth gives each image's ILSVRC2012_ID, meta.mat
    maps IDs to wnids: the same val set and labels as Kaggle's CSV gives."""
    pytest.importorskip("scipy")
    root = make_imagenet_subset(tmp_path / "in", class_list=False, flat_val=True)
    # the fakes number val images from 0; ILSVRC-2012's (and the ground truth's lines) from 1
    (root / "val" / "ILSVRC2012_val_00000000.JPEG").unlink()
    csv = root / "LOC_val_solution.csv"
    csv.write_text("".join(ln + "\n" for ln in csv.read_text().splitlines() if not ln.startswith("ILSVRC2012_val_00000000,")))
    (tmp_path / "list.txt").write_text("\n".join(SUBSET_SORTED) + "\n")
    _, from_csv = load_imagenet_subset(str(root), class_list=str(tmp_path / "list.txt"))
    csv.unlink()
    data = _devkit(root)
    _, from_devkit = load_imagenet_subset(str(root), class_list=str(tmp_path / "list.txt"))
    assert sorted(zip(from_devkit.paths, from_devkit.targets)) == sorted(zip(from_csv.paths, from_csv.targets))
    assert len(from_devkit) == 2 * len(SUBSET_SORTED) - 1
    assert_images_match_labels(from_devkit, SUBSET_SORTED)
    truth = data / "ILSVRC2012_validation_ground_truth.txt"
    lines = truth.read_text().split("\n")
    truth.write_text("\n".join(["5"] + lines[1:]))
    with pytest.raises(DatasetFormatError, match=r"ground_truth.txt:1: '5' is not an ILSVRC2012_ID of .*meta.mat"):
        load_imagenet_subset(str(root), class_list=str(tmp_path / "list.txt"))
    (data / "meta.mat").unlink()
    with pytest.raises(DatasetFormatError, match=r"(?s)is there but its .*meta.mat' is not .*Fix: extract the whole "
                                                 r"ILSVRC2012_devkit_t12.tar.gz"):
        load_imagenet_subset(str(root), class_list=str(tmp_path / "list.txt"))


# ----------------------------------------------------------------------------- Kaggle layout
@pytest.mark.parametrize("split_lists", [False, True])
def test_kaggle_layout(tmp_path, split_lists):
    root = make_imagenet_subset(tmp_path / "in", kaggle=True, flat_val=True, split_lists=split_lists)
    assert not (root / "train").exists() and (root / IN_KAGGLE_IMAGES / "train").is_dir()
    train, val = load_imagenet_subset(str(root))
    assert train.class_names == ["tench", "great white shark", "hammerhead"]
    assert len(train) == 3 * 3 and len(val) == 3 * 2
    assert all(str(IN_KAGGLE_IMAGES) in p for p in train.paths + val.paths)
    assert_images_match_labels(train, SUBSET_SORTED)
    assert_images_match_labels(val, SUBSET_SORTED)


# ----------------------------------------------------------------------------- class names
def test_names_from_torchvision_meta_bin(tmp_path):
    root = make_imagenet_subset(tmp_path / "in", mapping=False, meta_bin=True)
    train, _ = load_imagenet_subset(str(root))
    assert train.class_names == ["tench", "great white shark", "hammerhead"]
    (root / "meta.bin").write_bytes(b"not a torch file")
    with pytest.raises(DatasetFormatError, match="meta.bin"):
        load_imagenet_subset(str(root))
    import os
    import torch
    torch.save(({"n01440764": os.getcwd}, []), root / "meta.bin")  # code in the file: refused, never called
    with pytest.raises(DatasetFormatError, match=r"meta\.bin.*UnsafeFileError.*posix\.getcwd"):
        load_imagenet_subset(str(root))


def test_colliding_names_are_an_error(tmp_path):
    root = make_imagenet_subset(tmp_path / "in")
    synsets = dict(IN_SYNSETS, n01440764="Cardigan, Cardigan Welsh corgi", n01494475="cardigan")
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {n}\n" for w, n in sorted(synsets.items())))
    with pytest.raises(DatasetFormatError, match=r"collide.*'cardigan' \(n01440764, n01494475\)") as err:
        load_imagenet_subset(str(root))
    assert "data.names_file" in str(err.value)
    (tmp_path / "names.txt").write_text("n01440764 Cardigan corgi\nn01484850 great white shark\n"
                                        "n01494475 cardigan sweater\n")
    train, _ = load_imagenet_subset(str(root), names_file=str(tmp_path / "names.txt"))
    assert train.class_names == ["Cardigan corgi", "great white shark", "cardigan sweater"]


ILSVRC_FILLERS = [f"n{1494476 + k:08d}" for k in range(994)]  # stand-ins for the 994 wnids in between


@pytest.mark.parametrize("source", ["LOC_synset_mapping.txt", "meta.bin"])
def test_clip_names_for_the_1000_ilsvrc_wnids(tmp_path, source):
    root = make_imagenet_subset(tmp_path / "in", mapping=False)
    synsets = dict(IN_SYNSETS, **{w: "filler" for w in ILSVRC_FILLERS}, n15075141="toilet tissue")
    if source == "meta.bin":
        write_meta_bin(root / source, {w: tuple(n.split(", ")) for w, n in synsets.items()})
    else:
        (root / source).write_text("".join(f"{w} {n}\n" for w, n in sorted(synsets.items())))
    train, _ = load_imagenet_subset(str(root))
    assert train.class_names == ["tench", "great white shark", "hammerhead shark"]  # CLIP's: index 4
    (tmp_path / "mine.txt").write_text("".join(f"{w} {n}\n" for w, n in sorted(synsets.items())))
    train, _ = load_imagenet_subset(str(root), names_file=str(tmp_path / "mine.txt"))
    assert train.class_names == ["tench", "great white shark", "hammerhead"]  # the user's file as written


def test_1000_other_wnids_keep_the_file_names(tmp_path):
    root = make_imagenet_subset(tmp_path / "in", mapping=False)
    synsets = dict(IN_SYNSETS, **{w: "filler" for w in ILSVRC_FILLERS}, n15075142="not ilsvrc")
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {n}\n" for w, n in sorted(synsets.items())))
    train, _ = load_imagenet_subset(str(root))
    assert train.class_names == ["tench", "great white shark", "hammerhead"]


def test_invalid_names_json(tmp_path, imagenet_subset_root):
    (tmp_path / "names.json").write_text('{"n01440764": "tench",')
    with pytest.raises(DatasetFormatError, match=r"names.json' is not valid JSON"):
        load_imagenet_subset(str(imagenet_subset_root), names_file=str(tmp_path / "names.json"))


# ----------------------------------------------------------------------------- val CSV
@pytest.mark.parametrize("header", ["id,label", "Image,PredictionString", "ImageId PredictionString"])
def test_val_csv_with_other_header(tmp_path, header):
    root = make_imagenet_subset(tmp_path / "in", flat_val=True)
    csv_path = root / "LOC_val_solution.csv"
    csv_path.write_text(header + "\n" + csv_path.read_text().split("\n", 1)[1])
    with pytest.raises(DatasetFormatError, match=r"(?s)LOC_val_solution.csv' lacks the column.*'ImageId,PredictionString'"):
        load_imagenet_subset(str(root))


def test_val_csv_without_the_subset(tmp_path):
    root = make_imagenet_subset(tmp_path / "in", flat_val=True)
    csv_path = root / "LOC_val_solution.csv"
    keep = [ln for ln in csv_path.read_text().splitlines() if not any(w in ln for w in IN_SUBSET)]
    csv_path.write_text("\n".join(keep) + "\n")
    assert in_val_name(SORTED.index("n01443537"), 0) in csv_path.read_text()  # other classes' rows remain
    with pytest.raises(DatasetFormatError, match="lists no val image of the 3 classes"):
        load_imagenet_subset(str(root))


def make_kaggle_imagenet100(root, n_train: int = 3, n_val: int = 2):
    """Kaggle's "imagenet100": train.X1/ and train.X2/ share the classes, val.X/ has them all, and
    Labels.json maps each wnid to its WordNet names ("great white shark, white shark, man-eater")."""
    import json
    for k, wnid in enumerate(SUBSET_SORTED):
        c = SORTED.index(wnid)
        for i in range(n_train):
            write_image(root / f"train.X{1 + k // 2}" / wnid / f"{wnid}_{i}.JPEG", colour(c, i))
        for i in range(n_val):
            write_image(root / "val.X" / wnid / f"{in_val_name(c, i)}.JPEG", colour(c, i))
    (root / "Labels.json").write_text(json.dumps({w: IN_SYNSETS[w] for w in IN_SUBSET}))
    return root


def test_kaggle_imagenet100_layout_loads_with_clips_names(tmp_path):
    """Its 100 wnids are ILSVRC-2012's, so CLIP's curated names apply as for a 1000-wnid mapping
    ("hammerhead shark", not WordNet's "hammerhead"); indices, images and names are those of the same
    classes in ImageNet's own layout."""
    root = make_kaggle_imagenet100(tmp_path / "imagenet100")
    train, val = load_imagenet_subset(str(root))
    assert train.class_names == val.class_names == ["tench", "great white shark", "hammerhead shark"]
    assert len(train) == 3 * 3 and len(val) == 3 * 2
    for ds in (train, val):
        assert_images_match_labels(ds, SUBSET_SORTED)
    assert sorted(train.targets) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    train, _ = load_imagenet_subset(str(root), names_file=str(root / "Labels.json"))
    assert train.class_names == ["tench", "great white shark", "hammerhead"]  # the user's file as written
    (root / "mine.txt").write_text("n01494475\nn01440764\n")
    train, val = load_imagenet_subset(str(root), class_list="mine.txt")
    assert train.class_names == ["tench", "hammerhead shark"] and len(val) == 2 * 2
    assert_images_match_labels(val, ["n01440764", "n01494475"])


def test_kaggle_imagenet100_names_outside_ilsvrc_and_errors(tmp_path):
    import json
    import shutil
    root = make_kaggle_imagenet100(tmp_path / "imagenet100")
    labels = json.loads((root / "Labels.json").read_text())
    (root / "Labels.json").write_text(json.dumps(dict(labels, n99999999="not ilsvrc")))
    assert load_imagenet_subset(str(root))[0].class_names == ["tench", "great white shark", "hammerhead"]
    (root / "mine.txt").write_text("n01491361\n")
    with pytest.raises(DatasetFormatError, match=r"1 classes have no folder in .*train.X1.*e.g. \['n01491361'\]"):
        load_imagenet_subset(str(root), class_list="mine.txt")
    shutil.copytree(root / "train.X1" / "n01440764", root / "train.X2" / "n01440764")
    with pytest.raises(DatasetFormatError, match="class n01440764 has train folders in both"):
        load_imagenet_subset(str(root))
    shutil.rmtree(root / "train.X2" / "n01440764")
    shutil.rmtree(root / "val.X")
    with pytest.raises(DatasetFormatError, match=r"its val folder '.*val.X' is not"):
        load_imagenet_subset(str(root))
