import os
import re
import shutil
import struct
from pathlib import Path

import pytest
from PIL import Image

from data_fakes import (UCF_FRAMES, UCF_TEST_GROUPS, UCF_TRAIN_GROUPS, colour, decode_colour, make_ucf101,
                        ucf_videos, write_image)
from segpcl_fast.data import ucf101
from segpcl_fast.data.base import DatasetFormatError
from segpcl_fast.data.ucf101 import class_folders, class_name, load_ucf101, middle_frame


@pytest.mark.parametrize("layout", ["midframes", "frames"])
def test_official_split_both_layouts(tmp_path, layout):
    root = make_ucf101(tmp_path / "ucf", layout=layout)
    train, test = load_ucf101(str(root))
    assert train.class_names == ["Apply Eye Makeup", "Handstand Pushups", "Yo Yo"]
    assert train.class_ids == test.class_ids == ["ApplyEyeMakeup", "HandstandPushups", "YoYo"]  # classInd.txt's
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


# ----------------------------------------------------------------------------- real frame-dump layouts
FLOW_GREY = 60  # flow_x / flow_y images: greyscale JPEGs, as MMAction2's denseflow writes them


def write_lists(root):
    """Only ucfTrainTestlist/ of the fake release (no frames): lists, classInd with the HandStand quirk."""
    make_ucf101(root, layout="frames")
    shutil.rmtree(root / "UCF-101-frames")
    return root


def write_video_frames(folder, rgb, names=("img_{:05d}.jpg",), flow=(), n=UCF_FRAMES):
    """A per-video frame folder: RGB series `names` (only the middle frame has colour `rgb`), plus flow series."""
    folder.mkdir(parents=True, exist_ok=True)
    for pattern in names:
        for k in range(1, n + 1):
            write_image(folder / pattern.format(k), rgb if k == n // 2 + 1 else (250, 250, 250))
    for pattern in flow:
        for k in range(1, n + 1):
            path = folder / pattern.format(k)
            Image.new("L", (10, 8), FLOW_GREY).save(path, quality=95)


def all_videos():
    return ucf_videos(UCF_TRAIN_GROUPS + UCF_TEST_GROUPS)


def group(video):
    return int(video.split("_g")[1][:2])


def assert_middle_rgb_frames(train, test):
    for ds, groups in ((train, UCF_TRAIN_GROUPS), (test, UCF_TEST_GROUPS)):
        assert len(ds) == 3 * len(groups)
        for i in range(len(ds)):
            img, label = ds[i]
            c, g = decode_colour(img)  # only the middle RGB frame has this colour; flow is grey, others white
            assert c == label and g in groups


def test_mmaction_rawframes_skip_optical_flow(tmp_path):
    """MMAction2 rawframes/: img_, flow_x_, flow_y_ in one folder; the middle *RGB* frame is read."""
    root = write_lists(tmp_path / "ucf")
    for c, folder, video in all_videos():
        write_video_frames(root / "rawframes" / folder / video, colour(c, group(video)),
                           flow=("flow_x_{:05d}.jpg", "flow_y_{:05d}.jpg"))
    c, folder, video = all_videos()[0]
    assert middle_frame(root / "rawframes" / folder / video).name == "img_00006.jpg"
    train, test = load_ucf101(str(root))
    assert_middle_rgb_frames(train, test)
    (root / "ucfTrainTestlist").rename(root / "annotations")  # MMAction2 keeps the lists in annotations/
    train, test = load_ucf101(str(root))
    assert_middle_rgb_frames(train, test)


def test_middle_frame_series_choice(tmp_path):
    # no RGB-named series: the largest non-flow one; 'frame000001' (two-stream) and 'image_0001' styles
    write_video_frames(tmp_path / "a", (1, 2, 3), names=("shot{:03d}.png",), n=7)
    write_image(tmp_path / "a" / "thumb_1.jpg", (0, 0, 0))
    assert middle_frame(tmp_path / "a").name == "shot004.png"
    write_video_frames(tmp_path / "b", (1, 2, 3), names=("frame{:06d}.jpg", "other_{:02d}.jpg"), n=5)
    assert middle_frame(tmp_path / "b").name == "frame000003.jpg"  # RGB-named wins a tie
    write_video_frames(tmp_path / "c", (1, 2, 3), names=("image_{:04d}.jpg",), flow=("flowx_{:04d}.jpg",), n=3)
    assert middle_frame(tmp_path / "c").name == "image_0002.jpg"


def test_middle_frame_ambiguous_or_flow_only(tmp_path):
    write_video_frames(tmp_path / "v_mixed", (1, 2, 3), names=("left_{:03d}.jpg", "right_{:03d}.jpg"), n=3)
    with pytest.raises(DatasetFormatError, match=r"v_mixed.*mixes image series.*\n(.*\n)*Fix: keep only the RGB"):
        middle_frame(tmp_path / "v_mixed")
    write_video_frames(tmp_path / "v_flow", (1, 2, 3), names=(), flow=("flow_x_{:05d}.jpg", "flow_y_{:05d}.jpg"))
    with pytest.raises(DatasetFormatError, match="v_flow' holds only optical-flow images"):
        middle_frame(tmp_path / "v_flow")


def test_frame_folders_are_listed_once_when_the_dataset_is_built(tmp_path, monkeypatch):
    """Each folder is listed when the dataset is built, in the main process: a cache filled while
    reading would be filled inside DataLoader workers and die with them (a listing per pass)."""
    from torch.utils.data import DataLoader
    root = write_lists(tmp_path / "ucf")
    for c, folder, video in all_videos():
        write_video_frames(root / "rawframes" / folder / video, colour(c, group(video)), flow=("flow_x_{:05d}.jpg",))
    calls = []
    monkeypatch.setattr(ucf101, "middle_frame", lambda d: calls.append(d) or middle_frame(d))
    train, test = load_ucf101(str(root))
    assert sorted(calls) == sorted(Path(s) for s in train.sources + test.sources)
    first = [train[i][0].getpixel((0, 0)) for i in range(len(train))]
    again = [train[i][0].getpixel((0, 0)) for i in range(len(train))]
    assert first == again and len(calls) == len(train) + len(test)

    def listed_again(d):
        raise AssertionError(f"{d} listed while reading")
    monkeypatch.setattr(ucf101, "middle_frame", listed_again)  # in the forked worker too
    loaded = [y for _, y in DataLoader(train, batch_size=2, num_workers=1, collate_fn=lambda b: b[0])]
    assert len(loaded) == (len(train) + 1) // 2


@pytest.mark.parametrize("style", ["folders", "midframes"])
def test_flat_frames_dir_without_class_folders(tmp_path, style):
    """Two-stream release: jpegs_256/v_ApplyEyeMakeup_g08_c01/frame000001.jpg (no class folders);
    that release spells 'v_HandstandPushups' where the split lists say 'v_HandStandPushups'."""
    root = write_lists(tmp_path / "ucf")
    for c, _, video in all_videos():
        video = video.replace("HandStand", "Handstand")
        if style == "folders":
            write_video_frames(root / "jpegs_256" / video, colour(c, group(video)), names=("frame{:06d}.jpg",))
        else:
            write_image(root / "jpegs_256" / f"{video}.jpg", colour(c, group(video)))
    # without data.frames_dir: the error names the folder (its fix said to extract frames, which were there)
    with pytest.raises(DatasetFormatError, match=f"(?s)Fix: the frames are in '{root / 'jpegs_256'}' .*set "
                                                 "data.frames_dir=jpegs_256$"):
        load_ucf101(str(root))
    train, test = load_ucf101(str(root), frames_dir="jpegs_256")
    assert_middle_rgb_frames(train, test)
    assert test.targets == [0, 1, 2]


def write_avi(path):
    """A minimal RIFF/AVI header: enough to be a '.avi' file of the raw release on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = b"AVI " + b"LIST" + struct.pack("<I", 4) + b"hdrl"
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


@pytest.mark.parametrize("videos", ["UCF-101", "videos"])  # the release's archive; MMAction2's data/ucf101/videos
def test_raw_videos_only_says_extract(tmp_path, videos):
    root = write_lists(tmp_path / "ucf")
    for _, folder, video in all_videos():
        write_avi(root / videos / folder / f"{video}.avi")
    with pytest.raises(DatasetFormatError) as err:
        load_ucf101(str(root))
    msg = str(err.value)
    assert "it holds the videos themselves" in msg and "v_ApplyEyeMakeup_g08_c01.avi" in msg
    assert "ffmpeg" in msg and "UCF-101-midframes" in msg and "data.frames_dir" in msg
    assert "ffmpeg -n " in msg  # a second run skips the frames it made instead of asking
    assert "has no frames" not in msg and "(.jpg or a folder)" not in msg


def test_raw_videos_are_each_named_once(tmp_path):
    """A one-word class ('Archery') had its folder listed twice among the candidates (the list's spelling and
    the CoOp-style underscored one are the same word), so the raw-video error named each of its videos twice
    (a review's one-video root)."""
    lists = tmp_path / "ucf" / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 Archery\n2 YoYo\n")
    (lists / "trainlist01.txt").write_text("Archery/v_Archery_g08_c01.avi 1\nYoYo/v_YoYo_g08_c01.avi 2\n")
    (lists / "testlist01.txt").write_text("Archery/v_Archery_g01_c01.avi\nYoYo/v_YoYo_g01_c01.avi\n")
    avi = tmp_path / "ucf" / "UCF-101" / "Archery" / "v_Archery_g08_c01.avi"
    write_avi(avi)
    with pytest.raises(DatasetFormatError) as err:
        load_ucf101(str(tmp_path / "ucf"))
    msg = str(err.value)
    assert "it holds the videos themselves" in msg and msg.count(f"'{avi}'") == 1, msg


def test_list_errors_cite_the_file_line_past_blank_and_comment_lines(ucf_root):
    path = ucf_root / "ucfTrainTestlist" / "trainlist01.txt"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace(".avi 1", ".avi 3").replace(".avi 2", ".avi 3")
    path.write_text("# UCF101 split 1\n\n" + "\n".join(lines) + "\n")
    with pytest.raises(DatasetFormatError, match=r"trainlist01.txt:4: label 3 disagrees"):
        load_ucf101(str(ucf_root))


def test_hidden_files_in_a_frame_folder_do_not_move_the_middle_frame(tmp_path):
    video = tmp_path / "v_YoYo_g01_c01"
    for k in range(1, 6):
        write_image(video / f"frame_{k}.jpg", colour(1, k))
        (video / f"._frame_{k}.jpg").write_bytes(b"\x00\x05\x16\x07 Mac OS X metadata")
    assert middle_frame(video).name == "frame_3.jpg"  # 5 frames; with the 5 '._' files counted: frame_1


def test_jpeg_middle_frames_and_class_folders_in_another_case(ucf_root):
    frames = ucf_root / "UCF-101-midframes"
    for path in sorted(frames.rglob("*.jpg")):
        path.rename(path.with_suffix(".jpeg"))
    (frames / "Handstand_Pushups").rename(frames / "HANDSTAND_PUSHUPS")
    train, test = load_ucf101(str(ucf_root))
    assert len(train) == 3 * len(UCF_TRAIN_GROUPS) and test.targets == [0, 1, 2]
    for ds in (train, test):
        for i in range(len(ds)):
            img, label = ds[i]
            assert decode_colour(img)[0] == label


def test_data_official_split_picks_the_split_lists(ucf_root):
    """UCF101 has three official splits (trainlist0N / testlist0N); data.official_split picks one."""
    from segpcl_fast.api import make_config
    from segpcl_fast.config import ConfigError
    from segpcl_fast.data import build_datasets
    lists = ucf_root / "ucfTrainTestlist"
    (lists / "trainlist02.txt").write_text((lists / "testlist01.txt").read_text())  # split 2: the roles swapped
    (lists / "testlist02.txt").write_text((lists / "trainlist01.txt").read_text())
    sizes = {}
    for split in (1, 2):
        cfg = make_config(data__dataset="ucf101", data__root=str(ucf_root), data__expected_classes=None,
                          data__official_split=split)
        train, test = build_datasets(cfg.data)
        sizes[split] = (len(train), len(test))
    assert sizes[1] == (3 * len(UCF_TRAIN_GROUPS), 3 * len(UCF_TEST_GROUPS)) and sizes[2] == sizes[1][::-1]
    with pytest.raises(DatasetFormatError, match="trainlist03.txt"):
        build_datasets(make_config(data__dataset="ucf101", data__root=str(ucf_root), data__official_split=3).data)
    with pytest.raises(ConfigError, match="official_split"):
        make_config(data__dataset="ucf101", data__official_split=4)


def _write_coop_split(root: Path) -> None:
    """CoOp's split_zhou_UCF101.json for the fake release: trainlist01 cut into train and val (CoOp
    cut its val out of trainlist01), testlist01 as test; paths relative to UCF-101-midframes/."""
    import json
    import re

    def entries(groups):
        out = []
        for c, folder, video in ucf_videos(groups):
            coop = "_".join(re.findall(r"[A-Z][^A-Z]*", folder))
            out.append([f"{coop}/{video}.jpg", c, coop])
        return out
    train = entries(UCF_TRAIN_GROUPS)
    (root / "split_zhou_UCF101.json").write_text(json.dumps({"train": train[::2], "val": train[1::2],
                                                             "test": entries(UCF_TEST_GROUPS)}))


def test_coop_split_file_without_the_official_lists_gives_the_official_split(ucf_root):
    """CoOp's copy (UCF-101-midframes/ + split_zhou_UCF101.json, no ucfTrainTestlist/): its train + val
    are trainlist01, its test testlist01, so the same images, labels and class names as the lists give."""
    official = load_ucf101(str(ucf_root))
    _write_coop_split(ucf_root)
    assert [sorted(zip(ds.frame_paths, ds.targets)) for ds in load_ucf101(str(ucf_root))] == \
        [sorted(zip(ds.frame_paths, ds.targets)) for ds in official]  # the lists win when both are there
    shutil.rmtree(ucf_root / "ucfTrainTestlist")
    coop = load_ucf101(str(ucf_root))
    for ds, ref in zip(coop, official):
        assert ds.class_names == ref.class_names == ["Apply Eye Makeup", "Handstand Pushups", "Yo Yo"]
        assert sorted(zip(ds.frame_paths, ds.targets)) == sorted(zip(ref.frame_paths, ref.targets))
        for i in range(len(ds)):
            img, label = ds[i]
            assert decode_colour(img)[0] == label
    with pytest.raises(DatasetFormatError, match="lacks .*classInd.txt"):  # split 2 is not in CoOp's file
        load_ucf101(str(ucf_root), split=2)


def test_coop_split_file_errors(ucf_root):
    shutil.rmtree(ucf_root / "ucfTrainTestlist")
    with pytest.raises(DatasetFormatError, match="or, for split 1, put CoOp's split_zhou_UCF101.json there"):
        load_ucf101(str(ucf_root))
    _write_coop_split(ucf_root)
    os.remove(ucf_root / "UCF-101-midframes" / "Yo_Yo" / "v_YoYo_g01_c01.jpg")
    with pytest.raises(DatasetFormatError, match=r"1 images of split_zhou_UCF101.json are missing .*Yo_Yo/v_YoYo_g01"):
        load_ucf101(str(ucf_root))
    path = ucf_root / "split_zhou_UCF101.json"
    path.write_text(path.read_text().replace('"Yo_Yo"]', '"Yo_Yo_2"]', 1))
    with pytest.raises(DatasetFormatError, match=r"one class name each \(label 2: \['Yo_Yo', 'Yo_Yo_2'\]\)"):
        load_ucf101(str(ucf_root))
    path.write_text('{"train": []}')
    with pytest.raises(DatasetFormatError, match="is not CoOp's split file \\(KeyError"):
        load_ucf101(str(ucf_root))


def test_a_coop_copy_one_level_off_names_its_root(ucf_root, tmp_path):
    """CoOp's own convention is data.root=$DATA with the copy in $DATA/ucf101/: the error names that folder
    (and a root inside the copy, its frames folder, the folder above), not the official lists' zip."""
    shutil.rmtree(ucf_root / "ucfTrainTestlist")
    _write_coop_split(ucf_root)
    for wrong in (ucf_root.parent, ucf_root / "UCF-101-midframes"):
        with pytest.raises(DatasetFormatError) as err:
            load_ucf101(str(wrong))
        assert f"set data.root={ucf_root}" in str(err.value), str(err.value)
    with pytest.raises(DatasetFormatError) as err:  # split 2 is not in CoOp's file: no hint towards it
        load_ucf101(str(ucf_root.parent), split=2)
    assert "set data.root" not in str(err.value)


@pytest.mark.parametrize("suffix", [".bmp", ".webp", ".PNG"])
def test_middle_frames_in_any_image_format_frame_folders_take(ucf_root, suffix):
    frames = sorted((ucf_root / "UCF-101-midframes").rglob("*.jpg"))
    for p in frames:
        Image.open(p).save(p.with_suffix(suffix), format={".bmp": "BMP", ".webp": "WEBP"}.get(suffix, "PNG"),
                           **({"lossless": True} if suffix == ".webp" else {}))
        p.unlink()
    train, test = load_ucf101(str(ucf_root))
    assert len(train) + len(test) == len(frames)
    assert all(decode_colour(train[i][0])[0] == train.targets[i] for i in range(len(train)))


def _proof_copy(root: Path, ucf_root: Path) -> Path:
    """PROOF's data/ucf/{train,test}/<Class>/ (ImageFolder) of the official split 1's middle frames, its class
    folders named as classInd.txt names them."""
    for groups, split in ((UCF_TRAIN_GROUPS, "train"), (UCF_TEST_GROUPS, "test")):
        for c, folder, video in ucf_videos(groups):
            coop_folder = "_".join(re.findall(r"[A-Z][^A-Z]*", folder))
            dest = root / "ucf" / split / folder / f"{video}.jpg"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ucf_root / "UCF-101-midframes" / coop_folder / f"{video}.jpg", dest)
    return root


@pytest.mark.parametrize("with_class_list", [False, True])
def test_a_presplit_imagefolder_copy_is_read_as_the_official_split(ucf_root, tmp_path, with_class_list):
    """PROOF ships UCF101 as ucf/{train,test}/<Class>/ (ImageFolder): the official split 1's frames, labels and
    names, in classInd.txt's order where its lists are beside the copy (whose frames are not), else in the folders'
    sorted order (here the same); a root at ucf/ or above it."""
    official = load_ucf101(str(ucf_root))
    proof = _proof_copy(tmp_path / "proof", ucf_root)
    if with_class_list:
        shutil.copytree(ucf_root / "ucfTrainTestlist", proof / "ucf" / "ucfTrainTestlist")
    for root in (proof, proof / "ucf"):
        copy = load_ucf101(str(root))
        for ds, ref in zip(copy, official):
            assert ds.class_names == ref.class_names == ["Apply Eye Makeup", "Handstand Pushups", "Yo Yo"]
            assert sorted((Path(p).name, t) for p, t in zip(ds.frame_paths, ds.targets)) == \
                sorted((Path(p).name, t) for p, t in zip(ref.frame_paths, ref.targets))
        img, label = copy[1][0]
        assert decode_colour(img)[0] == label
    with pytest.raises(DatasetFormatError, match="official_split=2, but .* is a pre-split copy"):
        load_ucf101(str(proof / "ucf"), split=2)


def test_a_presplit_copy_in_another_order_than_classind_follows_classind(ucf_root, tmp_path):
    """Without classInd.txt the classes are the folders in sorted order (ImageFolder's: a renamed first class sorts
    last); with it, labels follow classInd.txt whatever the folders' spelling (underscored, lower case)."""
    proof = _proof_copy(tmp_path / "proof", ucf_root) / "ucf"
    for split in ("train", "test"):
        (proof / split / "ApplyEyeMakeup").rename(proof / split / "Zz_Apply_Eye_Makeup_renamed")
    folders_order = load_ucf101(str(proof))[0]  # no classInd.txt: the folders' sorted order
    assert folders_order.class_names == ["Handstand Pushups", "Yo Yo", "Zz Apply Eye Makeup renamed"]
    assert folders_order.class_ids == ["HandstandPushups", "YoYo", "Zz_Apply_Eye_Makeup_renamed"]
    for split in ("train", "test"):
        (proof / split / "Zz_Apply_Eye_Makeup_renamed").rename(proof / split / "Apply_Eye_Makeup")
    (proof / "train" / "HandstandPushups").rename(proof / "train" / "handstandpushups")
    (proof / "test" / "HandstandPushups").rename(proof / "test" / "handstandpushups")
    shutil.copytree(ucf_root / "ucfTrainTestlist", proof / "ucfTrainTestlist")
    train, test = load_ucf101(str(proof))
    assert train.class_names == ["Apply Eye Makeup", "Handstand Pushups", "Yo Yo"]
    assert train.class_ids == ["ApplyEyeMakeup", "HandstandPushups", "YoYo"]  # classInd.txt's, not the folders'
    for ds in (train, test):
        for i in range(len(ds)):
            img, label = ds[i]
            assert decode_colour(img)[0] == label  # classInd's label of each folder, whatever its spelling
    # the test folders matched as train's are: any spelling, any case
    (proof / "test" / "Apply_Eye_Makeup").rename(proof / "test" / "applyeyemakeup")
    assert load_ucf101(str(proof))[1].targets == test.targets
    (proof / "train" / "Archery").mkdir()
    with pytest.raises(DatasetFormatError, match=r"has 1 class folders that are not among classInd.txt's classes.*Archery"):
        load_ucf101(str(proof))
    (proof / "train" / "Archery").rmdir()
    shutil.rmtree(proof / "train" / "YoYo")  # a class of classInd.txt without its folder
    with pytest.raises(DatasetFormatError, match=r"has no folder for 1 of the 3 classes, e.g. \['YoYo'\]"):
        load_ucf101(str(proof))
