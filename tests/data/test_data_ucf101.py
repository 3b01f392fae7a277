import os

import pytest

from data_fakes import UCF_TEST_GROUPS, UCF_TRAIN_GROUPS, decode_colour, make_ucf101
from segpcl_fast.data.base import DatasetFormatError
from segpcl_fast.data.ucf101 import class_folders, class_name, load_ucf101


@pytest.mark.parametrize("layout", ["midframes", "frames"])
def test_official_split_both_layouts(tmp_path, layout):
    root = make_ucf101(tmp_path / "ucf", layout=layout)
    train, test = load_ucf101(str(root))
    assert train.class_names == ["Apply Eye Makeup", "Handstand Pushups", "Yo Yo"]
    assert len(train) == 3 * len(UCF_TRAIN_GROUPS) and len(test) == 3 * len(UCF_TEST_GROUPS)
    assert test.targets == [0, 1, 2]
    for ds, groups in ((train, UCF_TRAIN_GROUPS), (test, UCF_TEST_GROUPS)):
        for i in range(len(ds)):
            img, label = ds[i]
            c, g = decode_colour(img)  # frames layout: only the (natural-order) middle frame has this colour
            assert c == label and g in groups


def test_class_name():
    assert class_name("ApplyEyeMakeup") == "Apply Eye Makeup"
    assert class_name("YoYo") == "Yo Yo"
    assert class_name("Skijet") == "Skijet"
    assert class_folders("HandstandPushups") == ["HandstandPushups", "Handstand_Pushups"]


def test_missing_frames(ucf_root):
    os.remove(ucf_root / "UCF-101-midframes" / "Yo_Yo" / "v_YoYo_g01_c01.jpg")
    with pytest.raises(DatasetFormatError, match="1 videos of testlist01.txt have no frames"):
        load_ucf101(str(ucf_root))


def test_missing_split_lists(ucf_root):
    os.remove(ucf_root / "ucfTrainTestlist" / "classInd.txt")
    with pytest.raises(DatasetFormatError, match="classInd.txt"):
        load_ucf101(str(ucf_root))


def test_label_mismatch(ucf_root):
    path = ucf_root / "ucfTrainTestlist" / "trainlist01.txt"
    path.write_text(path.read_text().replace(".avi 1", ".avi 3"))
    with pytest.raises(DatasetFormatError, match="disagrees with classInd"):
        load_ucf101(str(ucf_root))


def test_frames_dir_option(ucf_root):
    os.rename(ucf_root / "UCF-101-midframes", ucf_root / "my_frames")
    with pytest.raises(DatasetFormatError, match="no frames folder"):
        load_ucf101(str(ucf_root))
    train, _ = load_ucf101(str(ucf_root), frames_dir="my_frames")
    assert len(train) == 6
