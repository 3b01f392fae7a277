import logging

import pytest
from PIL import Image

from data_fakes import IMR_PER_CLASS, IMR_WNIDS, colour, decode_colour, make_imagenet_r, write_image
from segpcl_fast.data.base import DatasetFormatError
from segpcl_fast.data.imagenet_r import load_imagenet_r

WNIDS = sorted(IMR_WNIDS)


def _check_labels_follow_folders(ds):
    for path, label in zip(ds.paths, ds.targets):
        assert path.split("/")[-2] == WNIDS[label]


def test_seeded_80_20_split_per_class(imagenet_r_root):
    train, test = load_imagenet_r(str(imagenet_r_root))
    assert train.class_names == ["goldfish", "great white shark", "hammerhead shark", "stingray"]  # CLIP's curated names
    assert train.class_ids == test.class_ids == WNIDS
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


def test_names_from_readme_else_clips_imagenet_names_else_a_mapping_is_needed(imagenet_r_root, tmp_path, monkeypatch, caplog):
    (imagenet_r_root / "imagenet-r" / "README.txt").unlink()
    # without README.txt: CLIP's curated names of the wnids (all ILSVRC-2012 ones), said at INFO
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from segpcl_fast.data import files
    with caplog.at_level(logging.INFO, logger="segpcl_fast.data.files"):
        train, _ = load_imagenet_r(str(imagenet_r_root))
    index = {w: i for i, w in enumerate(files.ilsvrc2012_wnids())}
    assert train.class_names == [IMAGENET_CLASSNAMES[index[w]] for w in WNIDS]
    assert "CLIP's ImageNet names" in caplog.text
    # where CLIP cannot name them (open_clip's names unavailable): one error naming both fixes
    monkeypatch.setattr(files, "clip_imagenet_names", lambda mapping, subsets=False: None)
    with pytest.raises(DatasetFormatError, match="README.txt") as err:
        load_imagenet_r(str(imagenet_r_root))
    assert "names_file" in str(err.value)
    assert "Fix: put the mapping file there (README.txt is in imagenet-r.tar, beside the class folders)" in str(err.value)
    mapping = tmp_path / "names.txt"
    mapping.write_text("".join(f"{w} Name {i}\n" for i, w in enumerate(WNIDS)))
    train, _ = load_imagenet_r(str(imagenet_r_root / "imagenet-r"), names_file=str(mapping))
    assert train.class_names == [f"Name {i}" for i in range(4)]
    mapping.write_text(f"{WNIDS[0]} only one\n")
    with pytest.raises(DatasetFormatError, match="lacks 3 of the 4 wnids"):
        load_imagenet_r(str(imagenet_r_root), names_file=str(mapping))
    # RAPF's imagenet_R_classes.txt: '<index>\t<wnid>\t<name>', indices in another order than the wnids
    mapping.write_text("".join(f"{3 - i}\t{w}\tRapf name {i}\n" for i, w in enumerate(WNIDS)))
    train, _ = load_imagenet_r(str(imagenet_r_root), names_file=str(mapping))
    assert train.class_names == [f"Rapf name {i}" for i in range(4)]
    mapping.write_text("goldfish\nshark\n")
    with pytest.raises(DatasetFormatError, match="has no line '<wnid> <class name>'"):
        load_imagenet_r(str(imagenet_r_root), names_file=str(mapping))
    with pytest.raises(DatasetFormatError, match="not found"):
        load_imagenet_r(str(imagenet_r_root), names_file=str(tmp_path / "absent.txt"))


def test_one_copy_or_another_the_same_prompts(imagenet_r_root):
    """README.txt's WordNet lemmas ('hammerhead') are not what a copy without it gets (CLIP's 'hammerhead shark'):
    every copy gets CLIP's curated names, so that its prompts do not depend on which files came with it (a review's
    finding); data.names_file=README.txt takes the README's as written."""
    readme = imagenet_r_root / "imagenet-r" / "README.txt"
    with_readme = load_imagenet_r(str(imagenet_r_root))[0].class_names
    as_written = load_imagenet_r(str(imagenet_r_root), names_file=str(readme))[0].class_names
    readme.unlink()
    assert with_readme == load_imagenet_r(str(imagenet_r_root))[0].class_names == ["goldfish", "great white shark", "hammerhead shark", "stingray"]
    assert as_written == ["goldfish", "great white shark", "hammerhead", "stingray"]


def test_wrong_format(tmp_path):
    (tmp_path / "imagenet-r" / "goldfish").mkdir(parents=True)
    with pytest.raises(DatasetFormatError, match="no wnid class folders"):
        load_imagenet_r(str(tmp_path))


# ----------------------------------------------------------------------------- other split sources
def _write_presplit(base, test_dir="test", n_train=3, n_test=2):
    """A pre-split copy: base/train/<wnid>/ and base/<test_dir>/<wnid>/ (RAPF README layout)."""
    for c, wnid in enumerate(WNIDS):
        for i in range(n_train):
            write_image(base / "train" / wnid / f"art_{i}.jpg", colour(c, i))
        for i in range(n_test):
            write_image(base / test_dir / wnid / f"sketch_{i}.jpg", colour(c, n_train + i))
    (base / "README.txt").write_text("".join(f"{w} {n}\n" for w, n in sorted(IMR_WNIDS.items())))
    return base


@pytest.mark.parametrize("test_dir,nested", [("test", False), ("val", False), ("val", True)])
def test_presplit_folders_used_as_given(tmp_path, test_dir, nested):
    _write_presplit(tmp_path / "imagenet-r" if nested else tmp_path, test_dir)
    train, test = load_imagenet_r(str(tmp_path))
    assert len(train) == 4 * 3 and len(test) == 4 * 2
    assert all(p.split("/")[-3] == "train" for p in train.paths)
    assert all(p.split("/")[-3] == test_dir for p in test.paths)
    assert train.targets == [c for c in range(4) for _ in range(3)]
    assert train.class_names[1] == "great white shark"
    _check_labels_follow_folders(train)
    _check_labels_follow_folders(test)
    img, label = test[5]
    assert decode_colour(img) == (label, 3 + 5 % 2)  # test image sketch_1 of class 2


def test_a_presplit_copy_with_the_same_images_in_train_and_test_is_refused(tmp_path):
    """train/ and test/ made by copying the same folder twice share no path, yet every test image is in train:
    images are compared by <wnid>/<file name>."""
    _write_presplit(tmp_path)
    for c, wnid in enumerate(WNIDS):
        write_image(tmp_path / "test" / wnid / "art_0.jpg", colour(c, 0))  # train's art_0, copied into test
    with pytest.raises(DatasetFormatError, match=r"4 images are in both train and test .*<wnid>/<file name>"):
        load_imagenet_r(str(tmp_path))


def test_a_presplit_copy_reads_its_names_from_train_readme(tmp_path, monkeypatch):
    """`cp -r imagenet-r train` takes README.txt into train/: it is read there (CLIP's names of its wnids; its own
    names where open_clip's are unavailable)."""
    from segpcl_fast.data import files
    _write_presplit(tmp_path)
    (tmp_path / "README.txt").rename(tmp_path / "train" / "README.txt")
    train, test = load_imagenet_r(str(tmp_path))
    assert train.class_names == ["goldfish", "great white shark", "hammerhead shark", "stingray"] == test.class_names
    monkeypatch.setattr(files, "clip_imagenet_names", lambda mapping, subsets=False: None)
    train, _ = load_imagenet_r(str(tmp_path))
    assert train.class_names == ["goldfish", "great white shark", "hammerhead", "stingray"]


@pytest.mark.parametrize("where", ["root", "imagenet-r"])
@pytest.mark.parametrize("emptied", [False, True])
def test_presplit_folders_win_over_unsplit_wnid_folders_beside_them(tmp_path, where, emptied, caplog):
    """A split made by copying (the unsplit folders still full) or by moving (left empty): the user's
    split is used, never a seeded one over the unsplit folders."""
    make_imagenet_r(tmp_path)
    if emptied:
        for img in (tmp_path / "imagenet-r").glob("n*/*"):
            img.unlink()
    _write_presplit(tmp_path / "imagenet-r" if where == "imagenet-r" else tmp_path)
    with caplog.at_level(logging.INFO, logger="segpcl_fast.data"):
        train, test = load_imagenet_r(str(tmp_path))
    assert len(train) == 4 * 3 and len(test) == 4 * 2
    assert all(p.split("/")[-3] == "train" for p in train.paths) and all(p.split("/")[-3] == "test" for p in test.paths)
    _check_labels_follow_folders(train)
    assert any("using the pre-split" in r.getMessage() and "not read" in r.getMessage() for r in caplog.records)


def test_imagenets_own_train_val_beside_imagenet_r_is_not_taken_for_a_split(tmp_path, caplog):
    """A shared data root: imagenet-r/ beside ImageNet's train/ + val/ (other wnids). ImageNet-R is read,
    with its README's names, not ImageNet's folders as a "pre-split ImageNet-R"."""
    make_imagenet_r(tmp_path)
    for split in ("train", "val"):
        for wnid in ("n01440764", "n09999999"):  # classes ImageNet-R's folder lacks
            write_image(tmp_path / split / wnid / "x.JPEG", colour(0, 0))
    with caplog.at_level(logging.INFO, logger="segpcl_fast.data"):
        train, test = load_imagenet_r(str(tmp_path))
    assert {p.split("/")[-3] for p in train.paths + test.paths} == {"imagenet-r"}
    assert sorted(train.class_names) == sorted(load_imagenet_r(str(tmp_path / "imagenet-r"))[0].class_names)
    assert any("not a copy of ImageNet-R, not read" in r.getMessage() for r in caplog.records)


def test_a_root_one_level_too_high_names_the_root_to_use(tmp_path):
    make_imagenet_r(tmp_path / "imagenet-r")  # imagenet-r/imagenet-r/<wnid>/
    with pytest.raises(DatasetFormatError, match=f"Fix: the layout was found one level further down: set "
                                                 f"data.root={tmp_path / 'imagenet-r'}$"):
        load_imagenet_r(str(tmp_path))
    assert len(load_imagenet_r(str(tmp_path / "imagenet-r"))[1]) > 0


def test_presplit_beside_the_extracted_folder_takes_its_readme(tmp_path, monkeypatch):
    """imagenet-r.tar extracted into the root, a train/ + val/ copy made beside it: the names come from
    imagenet-r/README.txt, where the tar put them (CLIP's names of its wnids; its own without open_clip's)."""
    from segpcl_fast.data import files
    make_imagenet_r(tmp_path)
    _write_presplit(tmp_path, "val")
    (tmp_path / "README.txt").unlink()
    train, test = load_imagenet_r(str(tmp_path))
    assert train.class_names == test.class_names == ["goldfish", "great white shark", "hammerhead shark", "stingray"]
    monkeypatch.setattr(files, "clip_imagenet_names", lambda mapping, subsets=False: None)
    train, _ = load_imagenet_r(str(tmp_path))
    assert train.class_names == ["goldfish", "great white shark", "hammerhead", "stingray"]
    assert {p.split("/")[-3] for p in train.paths} == {"train"}


# ImageNet-A (same layout as ImageNet-R) wnids that ImageNet-R lacks: bullfrog, agama
IMAGENET_A_ONLY = {"n01641577": "American bullfrog", "n01687978": "agama"}


@pytest.mark.parametrize("foreign,hint", [(IMAGENET_A_ONLY, True), ({"n09999999": "volcano"}, False)])
def test_class_folders_outside_imagenet_r_are_refused(tmp_path, foreign, hint):
    """imagenet-a.tar's layout is ImageNet-R's (wnid folders + README.txt): a root pointing at it is
    refused, not trained under ImageNet-R's name. A subset of ImageNet-R's 200 classes loads (above)."""
    pytest.importorskip("timm")
    folder = make_imagenet_r(tmp_path) / "imagenet-r"
    for wnid, name in foreign.items():
        for i in range(2):
            write_image(folder / wnid / f"x_{i}.jpg", colour(0, i))
    with open(folder / "README.txt", "a") as f:
        f.write("".join(f"{w} {n}\n" for w, n in foreign.items()))
    with pytest.raises(DatasetFormatError, match=rf"{len(foreign)} of the {4 + len(foreign)} class folders in "
                                                 rf"'{folder}' are not ImageNet-R classes") as err:
        load_imagenet_r(str(tmp_path))
    assert sorted(foreign)[0] in str(err.value)
    assert ("ImageNet-A classes" in str(err.value)) == hint
    assert "imagenet-r.tar" in str(err.value)


def test_presplit_errors(tmp_path):
    _write_presplit(tmp_path)
    write_image(tmp_path / "test" / "n09999999" / "x.jpg", colour(0, 0))
    with pytest.raises(DatasetFormatError, match="wnid folders that .* lacks"):
        load_imagenet_r(str(tmp_path))
    with pytest.raises(DatasetFormatError, match="already split"):
        load_imagenet_r(str(tmp_path), split_file=str(tmp_path / "any.txt"))
    only_train = tmp_path / "only_train"
    write_image(only_train / "train" / WNIDS[0] / "a.jpg", colour(0, 0))
    with pytest.raises(DatasetFormatError, match="neither .* nor .*val"):
        load_imagenet_r(str(only_train))


def _rapf_lines(prefix=""):
    """RAPF imgr_train_test_split.txt: 'train' section (images 0-2), 'test' section (images 3-4)."""
    lines = ["train"] + [f"{prefix}{w}/cartoon_{i}.jpg" for w in WNIDS for i in range(3)]
    lines += ["test"] + [f"{prefix}{w}/cartoon_{i}.jpg" for w in WNIDS for i in range(3, 5)]
    return "\n".join(lines) + "\n"


def _assert_rapf_split(train, test):
    assert len(train) == 12 and len(test) == 8
    assert [p.split("/")[-1] for p in test.paths] == [f"cartoon_{i}.jpg" for _ in WNIDS for i in (3, 4)]
    assert train.targets == [c for c in range(4) for _ in range(3)]
    _check_labels_follow_folders(train)
    _check_labels_follow_folders(test)


@pytest.mark.parametrize("where", ["root", "imagenet-r", "imgr_split"])
def test_rapf_split_file_found_next_to_data(imagenet_r_root, where, caplog):
    folder = {"root": imagenet_r_root, "imagenet-r": imagenet_r_root / "imagenet-r",
              "imgr_split": imagenet_r_root / "imgr_split"}[where]
    folder.mkdir(exist_ok=True)
    (folder / "imgr_train_test_split.txt").write_text(_rapf_lines())
    with caplog.at_level(logging.INFO, logger="segpcl_fast.data.imagenet_r"):
        train, test = load_imagenet_r(str(imagenet_r_root))
    _assert_rapf_split(train, test)
    assert "imgr_train_test_split.txt" in caplog.text and "12 train, 8 test" in caplog.text


def test_explicit_split_file(imagenet_r_root, tmp_path, caplog):
    split = tmp_path / "elsewhere" / "my_split.txt"
    split.parent.mkdir()
    split.write_text("# RAPF split\nTrain\n" + _rapf_lines("imagenet-r/").split("\n", 1)[1])
    # an explicit split file wins over train.txt / test.txt in the root
    (imagenet_r_root / "train.txt").write_text(f"imagenet-r/{WNIDS[0]}/cartoon_0.jpg\n")
    (imagenet_r_root / "test.txt").write_text(f"imagenet-r/{WNIDS[0]}/cartoon_1.jpg\n")
    with caplog.at_level(logging.INFO, logger="segpcl_fast.data.imagenet_r"):
        _assert_rapf_split(*load_imagenet_r(str(imagenet_r_root), split_file=str(split)))
    assert "my_split.txt" in caplog.text
    # a relative split file or names file: in data.root, else in the working directory
    (imagenet_r_root / "in_root.txt").write_text(split.read_text())
    _assert_rapf_split(*load_imagenet_r(str(imagenet_r_root), split_file="in_root.txt"))
    with pytest.MonkeyPatch.context() as m:
        m.chdir(split.parent)
        _assert_rapf_split(*load_imagenet_r(str(imagenet_r_root), split_file="my_split.txt"))
        with pytest.raises(DatasetFormatError, match=f"split file '{imagenet_r_root / 'nope.txt'}' or "
                                                     f"'{split.parent / 'nope.txt'}' .data.split_file. not found"):
            load_imagenet_r(str(imagenet_r_root), split_file="nope.txt")
        (split.parent / "names.txt").write_text("".join(f"{w} cwd {w}\n" for w in WNIDS))
        assert load_imagenet_r(str(imagenet_r_root), names_file="names.txt")[0].class_names[0] == f"cwd {WNIDS[0]}"
    # '' means unset (getattr(data_cfg, 'split_file', '')): train.txt / test.txt apply
    train, test = load_imagenet_r(str(imagenet_r_root), split_file="")
    assert len(train) == 1 and len(test) == 1


@pytest.mark.parametrize("text,match", [
    (f"{WNIDS[0]}/cartoon_0.jpg\ntrain\n", "before any 'train'"),
    (f"train\n{WNIDS[0]}/cartoon_0.jpg\n", "no 'test' images"),
    (f"train\n{WNIDS[0]}/cartoon_0.jpg\ntest\n{WNIDS[0]}/cartoon_0.jpg\n", "in both train and test"),
    (f"train\n{WNIDS[0]}/cartoon_0.jpg\ntest\n{WNIDS[0]}/cartoon_9.jpg\n", r"split.txt:4: image .* not found"),
])
def test_sectioned_split_file_errors(imagenet_r_root, tmp_path, text, match):
    split = tmp_path / "split.txt"
    split.write_text(text)
    with pytest.raises(DatasetFormatError, match=match):
        load_imagenet_r(str(imagenet_r_root), split_file=str(split))
    with pytest.raises(DatasetFormatError, match="not found"):
        load_imagenet_r(str(imagenet_r_root), split_file=str(tmp_path / "absent.txt"))


def test_split_file_paths_with_folder_prefix_when_root_is_the_folder(imagenet_r_root):
    folder = imagenet_r_root / "imagenet-r"
    (folder / "train.txt").write_text("".join(f"imagenet-r/{w}/cartoon_0.jpg\n" for w in WNIDS))
    (folder / "test.txt").write_text("".join(f"{w}/cartoon_1.jpg\n" for w in WNIDS))
    train, test = load_imagenet_r(str(folder))
    assert len(train) == 4 and len(test) == 4
    assert all(p.endswith("cartoon_0.jpg") for p in train.paths)
    _check_labels_follow_folders(train)
    _check_labels_follow_folders(test)


def test_seeded_split_is_logged(imagenet_r_root, caplog):
    with caplog.at_level(logging.INFO, logger="segpcl_fast.data.imagenet_r"):
        load_imagenet_r(str(imagenet_r_root), split_seed=3)
    assert "seeded per-class split (split_seed=3" in caplog.text


def test_names_that_collide_case_insensitively_are_one_error(imagenet_r_root, tmp_path):
    """CLIP lowercases prompts: 'Crane' and 'crane' would be one class to the text tower."""
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"{w} {'Crane' if i == 0 else 'crane' if i == 1 else f'class {i}'}"
                               for i, w in enumerate(WNIDS)) + "\n")
    with pytest.raises(DatasetFormatError, match=f"(?s)collide.*'crane' \\({WNIDS[0]}, {WNIDS[1]}\\).*data.names_file"):
        load_imagenet_r(str(imagenet_r_root), names_file=str(names))


def test_macos_appledouble_files_are_not_images(imagenet_r_root):
    """A copy from a Mac leaves '._<name>.jpg' (resource-fork metadata, not a JPEG) beside every image."""
    folder = imagenet_r_root / "imagenet-r"
    for wnid in WNIDS:
        (folder / wnid / "._cartoon_0.jpg").write_bytes(b"\x00\x05\x16\x07 Mac OS X metadata")
        (folder / wnid / ".hidden.png").write_bytes(b"not an image")
    train, test = load_imagenet_r(str(imagenet_r_root))
    assert len(train) + len(test) == len(WNIDS) * IMR_PER_CLASS
    assert not any("/." in p for p in train.paths + test.paths)


def test_a_byte_order_mark_does_not_hide_the_first_wnid(imagenet_r_root):
    readme = imagenet_r_root / "imagenet-r" / "README.txt"
    readme.write_text("\ufeff" + "".join(f"{w} {n}\n" for w, n in sorted(IMR_WNIDS.items())), encoding="utf-8")
    train, _ = load_imagenet_r(str(imagenet_r_root))
    assert train.class_names[0] == "goldfish"


@pytest.mark.parametrize("present", ["train.txt", "test.txt"])
def test_half_a_split_file_pair_is_an_error_not_the_seeded_split(imagenet_r_root, present):
    (imagenet_r_root / present).write_text(f"imagenet-r/{WNIDS[0]}/cartoon_0.jpg\n")
    missing = "test.txt" if present == "train.txt" else "train.txt"
    with pytest.raises(DatasetFormatError, match=f"{present}' is there but .*{missing}' is not"):
        load_imagenet_r(str(imagenet_r_root))


def _write_coda(folder, train_keys, test_keys, stem="imagenet-r"):
    """CODA-Prompt's dataloaders/splits/<stem>_{train,test}.yaml: paths under its own data/imagenet-r/{train,test}/
    (where it had moved the images; a file of either list may name either folder), targets = sorted-wnid index."""
    import yaml
    for name, keys in (("train", train_keys), ("test", test_keys)):
        data = [f"data/imagenet-r/{'train' if i % 3 else 'test'}/{w}/{f}" for i, (w, f) in enumerate(keys)]
        (folder / f"{stem}_{name}.yaml").write_text(yaml.safe_dump({"data": data, "targets": [WNIDS.index(w)
                                                                                           for w, _ in keys]}))


def test_coda_prompt_yaml_split_files_are_read_by_wnid_and_file_name(imagenet_r_root, tmp_path):
    """data.split_file = CODA-Prompt's imagenet-r_train.yaml (or its _test): the images it lists by <wnid>/<file>,
    wherever CODA-Prompt's own paths put them; labels from the wnid folders, its targets only checked."""
    files = sorted((p.parent.name, p.name) for p in (imagenet_r_root / "imagenet-r").glob("n*/*.jpg"))
    train_keys, test_keys = files[1::2], files[0::2][:5]  # a test list need not hold every other image
    splits = tmp_path / "splits"
    splits.mkdir()
    _write_coda(splits, train_keys, test_keys)
    for named in ("imagenet-r_train.yaml", "imagenet-r_test.yaml"):
        train, test = load_imagenet_r(str(imagenet_r_root), split_file=str(splits / named))
        assert [tuple(p.split("/")[-2:]) for p in train.paths] == train_keys
        assert [tuple(p.split("/")[-2:]) for p in test.paths] == test_keys
        _check_labels_follow_folders(train)
        _check_labels_follow_folders(test)
    # a label given to two wnids, an image listed in both, a missing sibling, not CODA's format
    _write_coda(splits, train_keys, test_keys + [train_keys[0]])
    with pytest.raises(DatasetFormatError, match="1 images are in both train and test"):
        load_imagenet_r(str(imagenet_r_root), split_file=str(splits / "imagenet-r_train.yaml"))
    (splits / "imagenet-r_test.yaml").unlink()
    with pytest.raises(DatasetFormatError, match="imagenet-r_test.yaml' is not beside it"):
        load_imagenet_r(str(imagenet_r_root), split_file=str(splits / "imagenet-r_train.yaml"))
    (splits / "other.yaml").write_text("data: [a]\n")
    with pytest.raises(DatasetFormatError, match="not named like CODA-Prompt's"):
        load_imagenet_r(str(imagenet_r_root), split_file=str(splits / "other.yaml"))
    (splits / "x_train.yaml").write_text("data: [a]\n")
    (splits / "x_test.yaml").write_text("data: [a]\n")
    with pytest.raises(DatasetFormatError, match="is not a CODA-Prompt split file \\(KeyError"):
        load_imagenet_r(str(imagenet_r_root), split_file=str(splits / "x_train.yaml"))
    import yaml
    two_classes = [next(k for k in train_keys if k[0] == w) for w in WNIDS[:2]]
    (splits / "x_train.yaml").write_text(yaml.safe_dump({"data": [f"d/{w}/{f}" for w, f in two_classes],
                                                        "targets": [7, 7]}))
    (splits / "x_test.yaml").write_text(yaml.safe_dump({"data": [f"d/{w}/{f}" for w, f in test_keys[:1]],
                                                       "targets": [WNIDS.index(test_keys[0][0])]}))
    with pytest.raises(DatasetFormatError, match=r"x_train.yaml, entry 2: label 7 is used for both"):
        load_imagenet_r(str(imagenet_r_root), split_file=str(splits / "x_train.yaml"))
