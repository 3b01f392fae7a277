"""A data.root one folder too high (the dataset below it) or too deep (pointing into the dataset):
every loader's error names the root to use, for each of the five benchmarks."""
import re

import pytest

from data_fakes import IMR_WNIDS, make_cifar100, make_cub, make_imagenet_r, make_imagenet_subset, make_ucf101
from segpcl_fast.data.base import DatasetFormatError
from segpcl_fast.data.cifar import load_cifar100
from segpcl_fast.data.cub import load_cub200
from segpcl_fast.data.imagenet_r import load_imagenet_r
from segpcl_fast.data.imagenet_subset import load_imagenet_subset
from segpcl_fast.data.ucf101 import load_ucf101

# loader, dataset writer, a folder inside the dataset a user may take for the root (relative to it)
CASES = {
    "cifar100": (load_cifar100, make_cifar100, None),  # cifar-100-python/ itself is a root that loads
    "imagenet-r": (load_imagenet_r, make_imagenet_r, f"imagenet-r/{sorted(IMR_WNIDS)[0]}"),
    "imagenet-subset": (load_imagenet_subset, make_imagenet_subset, "train"),
    "cub200": (load_cub200, make_cub, "CUB_200_2011/images"),
    "ucf101": (load_ucf101, make_ucf101, "ucfTrainTestlist"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_root_above_or_inside_the_dataset_names_the_root_to_use(tmp_path, name):
    load, make, inside = CASES[name]
    root = make(tmp_path / "data" / name)
    assert len(load(str(root))[1]) > 0  # the right root loads
    with pytest.raises(DatasetFormatError, match=re.escape(f"one level further down: set data.root={root}")):
        load(str(tmp_path / "data"))
    if inside is None:
        assert len(load(str(root / "cifar-100-python"))[1]) > 0
        return
    up = "one level up" if inside.count("/") == 0 else "two levels up"
    with pytest.raises(DatasetFormatError, match=re.escape(f"{up}: set data.root={root}")):
        load(str(root / inside))


@pytest.mark.parametrize("name", ["cub200", "imagenet-subset"])
def test_several_copies_below_a_root_are_all_named_sorted(tmp_path, name):
    """The first glob hit depends on the file system's listing order: the suggestion is the first
    copy in name order, and the others are named too (a user may have meant any of them)."""
    load, make, _ = CASES[name]
    roots = [make(tmp_path / "data" / sub) for sub in ("b_copy", "a_copy", "c_copy")]
    with pytest.raises(DatasetFormatError, match=re.escape(
            f"one level further down: set data.root={roots[1]} (also found in: {roots[0]}, {roots[2]})")):
        load(str(tmp_path / "data"))


@pytest.mark.parametrize("archive,command", [("cifar-100-python.tar.gz", "tar xf"), ("imagenet-r.tar", "tar xf"),
                                             ("CUB_200_2011.tgz", "tar xf"), ("UCF101TrainTestSplits.zip", "unzip")])
def test_a_root_that_is_the_downloaded_archive_says_to_extract_it(tmp_path, archive, command):
    """data.root=<the archive> (as downloaded, not yet extracted) was 'does not exist or is not a folder' with the fix
    'point data.root at the folder': the file exists, and it is the archive to extract."""
    (tmp_path / archive).write_bytes(b"\x1f\x8b")
    with pytest.raises(DatasetFormatError, match=re.escape(f"'{tmp_path / archive}' is a file, not a folder")) as e:
        load_cifar100(str(tmp_path / archive))
    assert f"extract it first ({command} {tmp_path / archive}" in str(e.value)
    root = make_cifar100(tmp_path / "data")
    with pytest.raises(DatasetFormatError, match=re.escape(f"not at a file (this one lies in {root / 'cifar-100-python'})")):
        load_cifar100(str(root / "cifar-100-python" / "train"))
    with pytest.raises(DatasetFormatError, match="does not exist or is not a folder"):
        load_cifar100(str(tmp_path / "absent"))
