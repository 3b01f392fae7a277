import os

import pytest

from data_fakes import CUB_PER_CLASS, decode_colour, make_cub
from segpcl_fast.data.base import DatasetFormatError
from segpcl_fast.data.cub import class_name, load_cub200


def test_official_split_and_names(cub_root):
    train, test = load_cub200(str(cub_root))
    assert train.class_names == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
    assert train.class_ids == test.class_ids == ["001.Black_footed_Albatross", "002.Laysan_Albatross",
                                                 "003.Sooty_Albatross"]  # classes.txt's folders: class_order takes them
    assert len(train) == len(test) == 3 * CUB_PER_CLASS // 2
    assert train.targets == [0, 0, 1, 1, 2, 2]
    for ds, parity in ((train, 0), (test, 1)):  # the fake marks even image indices as train
        for i in range(len(ds)):
            img, label = ds[i]
            c, k = decode_colour(img)
            assert c == label and k % 2 == parity


def test_class_name():
    assert class_name("200.Common_Yellowthroat") == "Common Yellowthroat"
    assert class_name("045.Northern_Fulmar") == "Northern Fulmar"


def test_missing_metadata(cub_root):
    os.remove(cub_root / "CUB_200_2011" / "train_test_split.txt")
    with pytest.raises(DatasetFormatError, match="train_test_split.txt"):
        load_cub200(str(cub_root))


def test_a_split_flag_other_than_0_or_1_is_refused(cub_root):
    split = cub_root / "CUB_200_2011" / "train_test_split.txt"
    lines = split.read_text().splitlines()
    image_id = lines[0].split()[0]
    split.write_text("\n".join([f"{image_id} 2"] + lines[1:]) + "\n")
    with pytest.raises(DatasetFormatError, match=f"image id {image_id} the flag '2', not 1 .train. or 0 .test."):
        load_cub200(str(cub_root))


def test_labels_the_class_folders_contradict_are_refused(cub_root):
    """A label from another copy (image 4 lies in 002.Laysan_Albatross/, labelled 1), or class ids
    swapped in classes.txt: silently wrong class names before."""
    folder = cub_root / "CUB_200_2011"
    labels = folder / "image_class_labels.txt"
    original = labels.read_text()
    lines = original.splitlines()
    image_id, cid = lines[CUB_PER_CLASS].split()  # the first image of class 2
    assert cid == "2"
    labels.write_text("\n".join(lines[:CUB_PER_CLASS] + [f"{image_id} 1"] + lines[CUB_PER_CLASS + 1:]) + "\n")
    with pytest.raises(DatasetFormatError, match=f"image id {image_id} .'002.Laysan_Albatross/.*'. has class id 1 "
                                                 r".'001.Black_footed_Albatross'. in image_class_labels.txt but lies "
                                                 r"in the folder of '002.Laysan_Albatross'"):
        load_cub200(str(cub_root))
    labels.write_text(original)
    classes = folder / "classes.txt"
    classes.write_text(classes.read_text().replace("1 001.", "X 001.").replace("2 002.", "1 002.").replace("X 001.", "2 001."))
    with pytest.raises(DatasetFormatError, match="classes.txt gives class id 2 to '001.Black_footed_Albatross'"):
        load_cub200(str(cub_root))


def test_a_root_one_level_too_high_names_the_root_to_use(tmp_path):
    make_cub(tmp_path / "CUB_200_2011")  # extracted into a folder named like the archive's own
    with pytest.raises(DatasetFormatError, match=f"Fix: the layout was found one level further down: set "
                                                 f"data.root={tmp_path / 'CUB_200_2011'}$"):
        load_cub200(str(tmp_path))
    assert len(load_cub200(str(tmp_path / "CUB_200_2011"))[0]) == 3 * CUB_PER_CLASS // 2


def test_missing_image(cub_root):
    folder = cub_root / "CUB_200_2011" / "images" / "002.Laysan_Albatross"
    os.remove(sorted(folder.iterdir())[0])
    with pytest.raises(DatasetFormatError, match="missing"):
        load_cub200(str(cub_root / "CUB_200_2011"))


def test_not_cub(tmp_path):
    with pytest.raises(DatasetFormatError, match="images.txt"):
        load_cub200(str(tmp_path))


def test_metadata_errors_cite_the_file_line_past_blank_lines(cub_root):
    path = cub_root / "CUB_200_2011" / "images.txt"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n\n" + "not-an-id " + lines[1] + "\n")
    with pytest.raises(DatasetFormatError, match=r"images.txt:3: expected '<id> <value>'"):
        load_cub200(str(cub_root))


def _proof_copy(root, official):
    """PROOF's data/cub/{train,test}/<class>/ (ImageFolder) made from the official copy's split."""
    import shutil
    folder = official / "CUB_200_2011"
    split = dict(line.split() for line in (folder / "train_test_split.txt").read_text().split("\n") if line)
    for line in (folder / "images.txt").read_text().split("\n"):
        if line:
            image_id, rel = line.split()
            dest = root / "cub" / ("train" if split[image_id] == "1" else "test") / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(folder / "images" / rel, dest)
    return root


def test_a_presplit_imagefolder_copy_is_read_as_the_official_split(cub_root, tmp_path):
    """PROOF ships CUB as cub/{train,test}/<NNN.Class>/*.jpg (ImageFolder): the same images, labels and names as
    the official metadata give (the class folders sort by class id), the root at cub/ or above it."""
    official = load_cub200(str(cub_root))
    proof = _proof_copy(tmp_path / "proof", cub_root)
    for root in (proof, proof / "cub"):
        copy = load_cub200(str(root))
        for ds, ref in zip(copy, official):
            assert ds.class_names == ref.class_names == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
            assert [(p.split("/")[-2:], t) for p, t in zip(ds.paths, ds.targets)] == \
                [(p.split("/")[-2:], t) for p, t in zip(ref.paths, ref.targets)]
        img, label = copy[1][0]
        assert decode_colour(img)[0] == label


def test_a_presplit_copy_with_the_same_image_in_both_splits_or_an_extra_test_class_is_refused(cub_root, tmp_path):
    import shutil
    proof = _proof_copy(tmp_path / "proof", cub_root) / "cub"
    first = sorted((proof / "train" / "001.Black_footed_Albatross").iterdir())[0]
    shutil.copy(first, proof / "test" / "001.Black_footed_Albatross" / first.name)
    with pytest.raises(DatasetFormatError, match=r"1 images are in both .* \(the same <class>/<file name>\)"):
        load_cub200(str(proof))
    (proof / "test" / "001.Black_footed_Albatross" / first.name).unlink()
    (proof / "test" / "004.Groove_billed_Ani").mkdir()
    with pytest.raises(DatasetFormatError, match=r"has 1 class folders that are not among train/'s classes, e.g. "
                                                 r"\['004.Groove_billed_Ani'\]"):
        load_cub200(str(proof))


def test_a_shared_root_reads_cub_not_imagenets_train_and_val(cub_root, tmp_path):
    """data.root=/data holding ImageNet's train/<wnid>/ + val/<wnid>/ beside PROOF's cub/: cub/ is read (the
    wnid folders were taken for CUB's classes)."""
    from data_fakes import write_image
    shared = _proof_copy(tmp_path / "data", cub_root)
    for split in ("train", "val"):
        write_image(shared / split / "n01440764" / "x.JPEG", (1, 2, 3))
    train, _ = load_cub200(str(shared))
    assert train.class_names == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
    assert train.class_ids == ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    assert all("/cub/train/" in p for p in train.paths)
