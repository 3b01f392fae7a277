"""data.dataset=imagefolder: torchvision ImageFolder's layout (pre-split train/ + test/, or flat class folders
with a seeded split), read as torchvision.datasets.ImageFolder reads it (the peer), and one run end to end."""
import json

import pytest
import torch
from torchvision.datasets import ImageFolder

from data_fakes import decode_colour, write_image
from segpcl_fast.api import evaluate, make_config, train
from segpcl_fast.config import DataConfig
from segpcl_fast.data import build_datasets
from segpcl_fast.data.base import DatasetFormatError
from segpcl_fast.data.imagefolder import load_imagefolder
from segpcl_fast.data.protocol import ClassIncrementalScenario

FOLDERS = ["golden_retriever", "Abyssinian", "tabby_cat", "zebra"]  # ImageFolder sorts by str: 'A' < 'g' < 't'


def _colour(c, i):
    return (10 + 20 * c, 5 + 10 * i, 100)


def make_tree(root, folders=FOLDERS, per_class=5, split=True, test_dir="test"):
    for c, folder in enumerate(sorted(folders)):
        for i in range(per_class):
            part = (test_dir if i % 2 else "train") if split else ""
            write_image(root / part / folder / f"img_{i}.png", _colour(c, i))
    return root


def test_a_presplit_tree_reads_as_torchvision_imagefolder_reads_it(tmp_path):
    root = make_tree(tmp_path / "ds")
    train, test = load_imagefolder(str(root))
    assert train.class_names == ["Abyssinian", "golden retriever", "tabby cat", "zebra"]
    for ds, part in ((train, "train"), (test, "test")):
        peer = ImageFolder(str(root / part))
        assert [p for p, _ in peer.samples] == ds.paths and peer.targets == ds.targets
        for i in range(len(ds)):
            img, label = ds[i]
            assert decode_colour(img)[0] == label
    train_v, test_v = load_imagefolder(str(make_tree(tmp_path / "v", test_dir="val")))
    assert len(test_v) == len(test) and train_v.class_names == train.class_names


def test_flat_folders_split_by_seed_and_fraction_alike_in_a_partial_copy(tmp_path):
    root = make_tree(tmp_path / "flat", per_class=10, split=False)
    train, test = load_imagefolder(str(root), test_fraction=0.3, split_seed=7)
    assert len(train) == 4 * 7 and len(test) == 4 * 3
    assert not set(train.paths) & set(test.paths)
    again = load_imagefolder(str(root), test_fraction=0.3, split_seed=7)[1]
    assert again.paths == test.paths  # seeded
    assert load_imagefolder(str(root), test_fraction=0.3, split_seed=8)[1].paths != test.paths
    partial = make_tree(tmp_path / "partial", folders=FOLDERS[1:], per_class=10, split=False)  # no golden_retriever
    part_test = load_imagefolder(str(partial), test_fraction=0.3, split_seed=7)[1]
    names = lambda ds, folder: sorted(p.rsplit("/", 1)[1] for p in ds.paths if f"/{folder}/" in p)  # noqa: E731
    for folder in FOLDERS[1:]:  # each class splits by its folder name, not its place among the classes
        assert names(part_test, folder) == names(test, folder)


def test_names_file_json_or_text_and_its_errors(tmp_path):
    root = make_tree(tmp_path / "ds")
    (tmp_path / "names.json").write_text(json.dumps({f: f"{f.lower()} dog" for f in FOLDERS}))
    train, _ = build_datasets(DataConfig(dataset="imagefolder", root=str(root), names_file=str(tmp_path / "names.json")))
    assert train.class_names == ["abyssinian dog", "golden_retriever dog", "tabby_cat dog", "zebra dog"]
    # data.class_order may name the classes by their folders once names_file has renamed them (or by the new names)
    order = ["zebra", "tabby cat dog", "Abyssinian", "golden_retriever"]
    cfg = DataConfig(dataset="imagefolder", root=str(root), names_file=str(tmp_path / "names.json"),
                     class_order=order, num_tasks=2)
    scenario = ClassIncrementalScenario.from_config(cfg, *build_datasets(cfg))
    assert scenario.class_names == ["zebra dog", "tabby_cat dog", "abyssinian dog", "golden_retriever dog"]
    (root / "names.txt").write_text("".join(f"{f} the {f}\n" for f in FOLDERS))  # relative: found in data.root
    assert load_imagefolder(str(root), names_file="names.txt")[0].class_names[0] == "the Abyssinian"
    (root / "short.txt").write_text("zebra a zebra\n")
    with pytest.raises(DatasetFormatError, match="names no class for 3 of the 4 class folders"):
        load_imagefolder(str(root), names_file="short.txt")
    # a JSON file's fix is an entry, not a line with a tab (the text format's)
    (root / "short.json").write_text(json.dumps({"zebra": "a zebra"}))
    with pytest.raises(DatasetFormatError, match='names no class for 3 of the 4 class folders') as e:
        load_imagefolder(str(root), names_file="short.json")
    assert str(e.value).splitlines()[-1] == 'Fix: add an entry "<folder>": "<name>" for each class folder', str(e.value)
    (root / "same.txt").write_text("".join(f"{f} Cat\n" for f in FOLDERS))
    with pytest.raises(DatasetFormatError, match="give the same class name"):
        load_imagefolder(str(root), names_file="same.txt")


def test_bad_trees_are_one_error_naming_the_layout(tmp_path):
    with pytest.raises(DatasetFormatError, match="holds no class folders"):
        load_imagefolder(str(tmp_path))
    flat = make_tree(tmp_path / "flat", split=False)
    (flat / "empty_class").mkdir()
    with pytest.raises(DatasetFormatError, match="holds no images"):
        load_imagefolder(str(flat))
    split = make_tree(tmp_path / "split")
    write_image(split / "test" / "unicorn" / "a.png", (1, 2, 3))  # a test class that train/ does not have
    with pytest.raises(DatasetFormatError, match="class folders that are not among"):
        load_imagefolder(str(split))
    clash = make_tree(tmp_path / "clash", folders=["tabby_cat", "tabby cat"])
    with pytest.raises(DatasetFormatError, match="give the same class name"):
        load_imagefolder(str(clash))
    with pytest.raises(DatasetFormatError, match="no data root given"):
        load_imagefolder(None)


def test_a_run_on_an_imagefolder_tree_trains_and_evaluates(tiny_model_name, tmp_path):
    root = make_tree(tmp_path / "ds", per_class=4)
    cfg = make_config(model__name=tiny_model_name, model__pretrained=None, data__dataset="imagefolder",
                      data__root=str(root), num_tasks=2, epochs=1, optim__batch_size=4, dpgd__k_adv=1,
                      dpgd__k_seed=1, output_dir=str(tmp_path / "run"), progress=False, plots=False, num_threads=1)
    torch.manual_seed(0)
    result = train(cfg)
    assert len(result.acc_per_task) == 2
    assert evaluate(tmp_path / "run")["acc"] == pytest.approx(result.acc_per_task[-1])


def test_what_torchvision_reads_is_read_nested_folders_and_its_extensions_too(tmp_path):
    """Images below sub-folders and torchvision's other extensions (tif, ppm, pgm, upper case) were skipped
    without a word (a review's finding): the samples now equal ImageFolder's."""
    from PIL import Image
    root = tmp_path / "ds"
    for c, folder in enumerate(["cat", "dog"]):
        for split in ("train", "test"):
            write_image(root / split / folder / "a.jpg", _colour(c, 0))
            write_image(root / split / folder / "views" / "b.PNG", _colour(c, 1))
            Image.new("RGB", (8, 8), _colour(c, 2)).save(root / split / folder / "c.tif")
            Image.new("L", (8, 8), 40).save(root / split / folder / "views" / "d.pgm")
            (root / split / folder / "notes.txt").write_text("not an image")
    train, test = load_imagefolder(str(root))
    for ds, split in ((train, "train"), (test, "test")):
        peer = ImageFolder(str(root / split))
        assert [p for p, _ in peer.samples] == ds.paths and peer.targets == ds.targets and len(ds) == 8


def test_splits_numbered_apart_and_split_folders_in_any_case(tmp_path):
    """train/cat/00000.jpg beside test/cat/00000.jpg (a split numbered apart) was refused as one image in both
    splits; only the same file in both is. Train/ + Test/ (or valid/) are a split too (a review's finding)."""
    root = tmp_path / "ds"
    for c, folder in enumerate(["cat", "dog"]):
        for i in range(2):
            write_image(root / "Train" / folder / f"{i:05d}.jpg", _colour(c, i))
            write_image(root / "valid" / folder / f"{i:05d}.jpg", _colour(c, i + 2))
    train, test = load_imagefolder(str(root))
    assert len(train) == len(test) == 4 and "/valid/" in test.paths[0]
    (root / "valid" / "cat" / "same.jpg").symlink_to(root / "Train" / "cat" / "00000.jpg")
    with pytest.raises(DatasetFormatError, match="1 images are in both .* \\(the same file\\)"):
        load_imagefolder(str(root))


def test_layouts_that_are_not_one_name_the_fix(tmp_path):
    only_train = tmp_path / "only_train"
    for folder in ("cat", "dog"):
        write_image(only_train / "train" / folder / "a.jpg", (1, 2, 3))
    with pytest.raises(DatasetFormatError, match=r"holds train/ \(class folders\) but no test \(or val\) folder"):
        load_imagefolder(str(only_train))
    above = tmp_path / "above"
    make_tree(above / "ds")  # data.root one level above the dataset
    with pytest.raises(DatasetFormatError, match=f"set data.root={above / 'ds'}"):
        load_imagefolder(str(above))
    flat_above = tmp_path / "flat_above"
    make_tree(flat_above / "ds", split=False)
    with pytest.raises(DatasetFormatError, match=f"set data.root={flat_above / 'ds'}"):
        load_imagefolder(str(flat_above))
    # data.root at one class folder whose images sit in a sub-folder (a/sub/*.jpg): that sub-folder, which holds
    # images and no class folders, is not suggested (a review's finding); its parent holds the classes
    one_class = tmp_path / "one_class"
    for i in range(2):
        write_image(one_class / "a" / "sub" / f"{i}.jpg", (1, 2, 3))
    with pytest.raises(DatasetFormatError, match="holds 1 class folder: a class-incremental run needs two or more") \
            as err:
        load_imagefolder(str(one_class / "a"))
    assert "sub, which looks like the dataset" not in str(err.value)
    lone = make_tree(tmp_path / "lone", split=False)
    write_image(lone / "unicorn" / "only.jpg", (1, 2, 3))
    with pytest.raises(DatasetFormatError, match="holds 1 image .* the seeded split needs two or more"):
        load_imagefolder(str(lone))


def test_names_files_with_spaces_a_byte_order_mark_and_composed_or_decomposed_names(tmp_path):
    import unicodedata
    root = tmp_path / "ds"
    for c, folder in enumerate(["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]):
        for i in range(2):
            write_image(root / "train" / folder / f"{i}.jpg", _colour(c, i))
            write_image(root / "test" / folder / f"{i}.jpg", _colour(c, i))
    (tmp_path / "names.txt").write_text("AM General Hummer SUV 2000\tHummer\nAcura RL Sedan 2012\tAcura RL\n")
    assert load_imagefolder(str(root), names_file=str(tmp_path / "names.txt"))[0].class_names == ["Hummer", "Acura RL"]
    (tmp_path / "names.json").write_text(json.dumps({"AM General Hummer SUV 2000": "a", "Acura RL Sedan 2012": "b"}),
                                         encoding="utf-8-sig")  # Notepad's byte-order mark
    assert load_imagefolder(str(root), names_file=str(tmp_path / "names.json"))[0].class_names == ["a", "b"]
    splits = []
    for form in ("NFC", "NFD"):  # a copy made on macOS spells café decomposed: it splits as the composed copy
        flat = tmp_path / form
        for name in ("café", "tea"):
            for i in range(10):
                write_image(flat / unicodedata.normalize(form, name) / f"{i}.jpg", (i, 2, 3))
        splits.append([p.rsplit("/", 1)[1] for p in load_imagefolder(str(flat))[1].paths])
    assert splits[0] == splits[1]


def test_second_review_classes_named_as_splits_loops_linked_classes_and_order(tmp_path):
    """A re-review's findings on the fix: a flat dataset's class named 'train' (CIFAR-100 as folders) was taken
    for a split; a root above two datasets was read as a dataset; link loops multiplied images into both splits;
    a class folder linked to another was a silent duplicate; nested files came in another order than
    ImageFolder's."""
    cifar = tmp_path / "cifar"
    for c, folder in enumerate(["bicycle", "bus", "train"]):
        for i in range(3):
            write_image(cifar / folder / f"{i}.png", _colour(c, i))
    train, test = load_imagefolder(str(cifar))
    assert train.class_names == ["bicycle", "bus", "train"] and len(train) + len(test) == 9
    above = tmp_path / "above"
    make_tree(above / "ds1")
    make_tree(above / "ds2", split=False)
    with pytest.raises(DatasetFormatError, match=f"(?s)holds datasets, not classes .*set data.root={above / 'ds1'}"):
        load_imagefolder(str(above))
    loops = make_tree(tmp_path / "loops", split=False)
    (loops / "zebra" / "up").symlink_to(loops, target_is_directory=True)
    (loops / "tabby_cat" / "self").symlink_to(loops / "tabby_cat", target_is_directory=True)
    with pytest.raises(DatasetFormatError, match="is a file two class folders of .* hold"):  # zebra/up/ holds all
        load_imagefolder(str(loops))
    (loops / "zebra" / "up").unlink()
    train, test = load_imagefolder(str(loops))  # tabby_cat/self -> tabby_cat: its images once, no loop
    assert len(train) + len(test) == 20 and not set(train.paths) & set(test.paths)
    (loops / "puppy").symlink_to(loops / "zebra", target_is_directory=True)
    with pytest.raises(DatasetFormatError, match="is a file two class folders of .* hold"):
        load_imagefolder(str(loops))
    order = tmp_path / "order"
    for folder in ("cat", "dog"):
        for name in ("z.jpg", "sub/a.jpg", "a-x/b.jpg", "a/c.jpg"):
            write_image(order / "train" / folder / name, (1, 2, 3))
            write_image(order / "test" / folder / name.replace(".jpg", "t.jpg"), (1, 2, 3))
    train, _ = load_imagefolder(str(order))
    assert train.paths == [p for p, _ in ImageFolder(str(order / "train")).samples]


def test_decomposed_file_and_folder_names_split_and_name_as_composed_ones(tmp_path):
    import unicodedata
    tests, names = [], []
    for form in ("NFC", "NFD"):
        root = tmp_path / form
        for c, folder in enumerate(["a", "b"]):
            for i in range(5):
                for stem in ("caff", "café"):
                    write_image(root / folder / unicodedata.normalize(form, f"{stem}{i}.jpg"), _colour(c, i))
        tests.append(sorted(unicodedata.normalize("NFC", p.rsplit("/", 2)[1] + "/" + p.rsplit("/", 1)[1])
                            for p in load_imagefolder(str(root))[1].paths))
        (root / "names.json").write_text(json.dumps({"a": "café au lait", unicodedata.normalize("NFC", "b"): "b"}))
        names.append(load_imagefolder(str(root), names_file="names.json")[0].class_names)
    assert tests[0] == tests[1] and names[0] == names[1]
    cafe = tmp_path / "cafe_folder"
    for folder in ("café", "tea"):
        for i in range(2):
            write_image(cafe / unicodedata.normalize("NFD", folder) / f"{i}.jpg", (1, 2, 3))
    (cafe / "names.json").write_text(json.dumps({unicodedata.normalize("NFC", "café"): "coffee", "tea": "tea"}))
    assert load_imagefolder(str(cafe), names_file="names.json")[0].class_names == ["coffee", "tea"]


def test_a_root_at_one_half_of_a_split_reads_flat_and_warns(tmp_path, caplog):
    """data.root=<dataset>/train is read as flat class folders (a seeded split of train/ alone), with a warning
    that names the dataset's root; a flat dataset in a folder named train/ (no test/ beside it) gets none."""
    root = make_tree(tmp_path / "ds", per_class=6)
    with caplog.at_level("WARNING", logger="segpcl_fast.data.imagefolder"):
        train, test = load_imagefolder(str(root / "train"))
    assert len(train) + len(test) == 4 * 3 and all("/train/" in p for p in train.paths + test.paths)
    assert f"data.root {root / 'train'} is one half of the split in {root} (beside test/)" in caplog.text
    assert f"set data.root={root} to train on train/ and test on test/" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="segpcl_fast.data.imagefolder"):
        load_imagefolder(str(make_tree(tmp_path / "alone" / "train", per_class=4, split=False)))
        load_imagefolder(str(root))
    assert "one half of the split" not in caplog.text
