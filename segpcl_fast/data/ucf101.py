"""UCF101 as still images: one frame per video, official split (ucfTrainTestlist, split 1).

Two frame layouts are accepted, per video:
  (a) one middle-frame image per video: <frames dir>/<ClassName>/<video>.jpg, or CoOp's
      UCF-101-midframes/<Class_Name>/<video>.jpg (class folders renamed 'Apply_Eye_Makeup');
  (b) a folder of extracted frames per video: <frames dir>/<ClassName>/<video>/*.jpg; the
      middle frame (index n // 2 in natural name order) is read, lazily, at load time.
The frames dir is `frames_dir` (relative to the root) if given, else the first of
FRAME_DIR_CANDIDATES that holds the class folders. Class names: CamelCase split
('ApplyEyeMakeup' -> 'Apply Eye Makeup'); class index = classInd.txt id - 1.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional, Sequence

from PIL import Image

from .base import ClassDataset
from .files import IMAGE_EXTENSIONS, format_error, read_lines, require_root

NAME = "ucf101"
FRAME_DIR_CANDIDATES = ("UCF-101-midframes", "UCF-101-frames", "frames", "rawframes", "UCF-101", "UCF101")
LAYOUT = """  <root>/ucfTrainTestlist/classInd.txt      ('1 ApplyEyeMakeup')
  <root>/ucfTrainTestlist/trainlist01.txt   ('ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1')
  <root>/ucfTrainTestlist/testlist01.txt    ('ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi')
  and frames, either
  <root>/UCF-101-midframes/<Class_Name>/<video>.jpg       (one middle frame per video, CoOp), or
  <root>/<frames dir>/<ClassName>/<video>/<frame>.jpg     (all frames; the middle one is used)
  (<frames dir>: data.frames_dir, or one of """ + ", ".join(FRAME_DIR_CANDIDATES) + ")"


def class_name(camel: str) -> str:
    """'ApplyEyeMakeup' -> 'Apply Eye Makeup', 'YoYo' -> 'Yo Yo', 'Skijet' -> 'Skijet'."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", camel).replace("_", " ").strip()


def class_folders(camel: str) -> list[str]:
    """Folder spellings of a class: 'ApplyEyeMakeup' and CoOp's 'Apply_Eye_Makeup'."""
    return [camel, "_".join(re.findall(r"[A-Z][^A-Z]*", camel)) or camel]


def _natural_key(path: Path):
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", path.name)]


def middle_frame(video_dir: Path) -> Path:
    frames = sorted((p for p in video_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS), key=_natural_key)
    if not frames:
        raise format_error(NAME, f"video frame folder '{video_dir}' holds no images", LAYOUT,
                           "re-extract the frames of this video")
    return frames[len(frames) // 2]


class VideoFrameDataset(ClassDataset):
    """`sources[i]` is an image file (a middle frame) or a folder of frames (middle one is read)."""

    def __init__(self, sources: Sequence[str], targets: Sequence[int], class_names: Sequence[str],
                 transform: Optional[Callable] = None):
        super().__init__(class_names, targets, transform)
        self.sources = list(sources)

    def load_image(self, index: int) -> Image.Image:
        src = Path(self.sources[index])
        path = middle_frame(src) if src.is_dir() else src
        with Image.open(path) as im:
            return im.convert("RGB")


def _classes(lists: Path) -> list[str]:
    entries = {}
    for n, line in enumerate(read_lines(lists / "classInd.txt"), 1):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise format_error(NAME, f"{lists / 'classInd.txt'}:{n}: expected '<id> <ClassName>', got {line!r}",
                               LAYOUT, "use the official UCF101TrainTestSplits-RecognitionTask.zip")
        entries[int(parts[0])] = parts[1]
    if sorted(entries) != list(range(1, len(entries) + 1)):
        raise format_error(NAME, f"classInd.txt ids are not 1..{len(entries)}", LAYOUT,
                           "use the official UCF101TrainTestSplits-RecognitionTask.zip")
    return [entries[i] for i in range(1, len(entries) + 1)]


def _frames_dir(root: Path, classes: list[str], frames_dir: Optional[str]) -> Path:
    if frames_dir:
        path = root / frames_dir
        if not path.is_dir():
            raise format_error(NAME, f"frames dir '{path}' (data.frames_dir) not found", LAYOUT,
                               "fix data.frames_dir (relative to data.root)")
        return path
    for cand in FRAME_DIR_CANDIDATES:
        path = root / cand
        if path.is_dir() and any((path / f).is_dir() for c in classes for f in class_folders(c)):
            return path
    raise format_error(NAME, f"no frames folder with class sub-folders in '{root}' "
                             f"(looked for {list(FRAME_DIR_CANDIDATES)})", LAYOUT,
                       "extract frames there, or set data.frames_dir")


def _read_list(path: Path, frames: Path, class_index: dict[str, int], with_labels: bool
               ) -> tuple[list[str], list[int]]:
    sources, targets, missing = [], [], []
    for n, line in enumerate(read_lines(path), 1):
        parts = line.split()
        rel = Path(parts[0])
        label = class_index.get(rel.parent.name.lower())
        if label is None:
            raise format_error(NAME, f"{path}:{n}: class folder '{rel.parent.name}' not in classInd.txt",
                               LAYOUT, "use split lists and classInd.txt from the same release")
        if with_labels and len(parts) > 1 and (not parts[1].isdigit() or int(parts[1]) - 1 != label):
            raise format_error(NAME, f"{path}:{n}: label {parts[1]} disagrees with classInd.txt "
                                     f"({rel.parent.name} is {label + 1})", LAYOUT,
                               "use split lists and classInd.txt from the same release")
        stem = rel.with_suffix("").name
        folders = [frames / f for f in class_folders(rel.parent.name)]
        source = next((c for folder in folders
                       for c in (folder / f"{stem}.jpg", folder / f"{stem}.png", folder / stem)
                       if c.exists()), None)
        if source is None:
            missing.append(str(folders[0] / stem))
            continue
        sources.append(str(source))
        targets.append(label)
    if missing:
        raise format_error(NAME, f"{len(missing)} videos of {path.name} have no frames under '{frames}', "
                                 f"e.g. {missing[:3]} (.jpg or a folder)", LAYOUT,
                           "extract frames for every video of the split")
    return sources, targets


def load_ucf101(root: Optional[str], train_transform: Optional[Callable] = None,
                test_transform: Optional[Callable] = None, frames_dir: Optional[str] = None,
                split: int = 1) -> tuple[VideoFrameDataset, VideoFrameDataset]:
    path = require_root(root, NAME, LAYOUT)
    lists = path / "ucfTrainTestlist"
    needed = ["classInd.txt", f"trainlist0{split}.txt", f"testlist0{split}.txt"]
    missing = [f for f in needed if not (lists / f).is_file()]
    if missing:
        raise format_error(NAME, f"'{lists}' lacks {missing}", LAYOUT,
                           "extract UCF101TrainTestSplits-RecognitionTask.zip into data.root")
    classes = _classes(lists)
    class_index = {c.lower(): i for i, c in enumerate(classes)}
    frames = _frames_dir(path, classes, frames_dir)
    class_names = [class_name(c) for c in classes]
    train = _read_list(lists / needed[1], frames, class_index, with_labels=True)
    test = _read_list(lists / needed[2], frames, class_index, with_labels=False)
    return (VideoFrameDataset(*train, class_names, train_transform),
            VideoFrameDataset(*test, class_names, test_transform))
