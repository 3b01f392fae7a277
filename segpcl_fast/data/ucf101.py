"""UCF101 as still images: one frame per video, official split (ucfTrainTestlist/ or MMAction2's
annotations/, split 1).

Frame layouts accepted, per video (<frames dir> = `frames_dir` relative to the root if given, else
the first of FRAME_DIR_CANDIDATES that holds the class folders):
  (a) one middle-frame image per video: <frames dir>/<ClassName>/<video>.jpg, or CoOp's
      UCF-101-midframes/<Class_Name>/<video>.jpg (class folders renamed 'Apply_Eye_Makeup');
  (b) a folder of extracted frames per video: <frames dir>/<ClassName>/<video>/*.jpg; the
      middle RGB frame (index n // 2 in natural name order), chosen for every video when the dataset
      is built (all of them: per-class caps apply afterwards; a broken folder fails then). Optical-flow
      images kept beside them (MMAction2 rawframes: img_00001.jpg, flow_x_00001.jpg, flow_y_00001.jpg)
      are skipped: see `middle_frame`;
  (c) either of the above without class folders: <frames dir>/<video>.jpg or <frames dir>/<video>/
      (the two-stream release jpegs_256/v_ApplyEyeMakeup_g08_c01/frame000001.jpg; set frames_dir).
Split: the official lists (ucfTrainTestlist/ or annotations/); without them, CoOp's
split_zhou_UCF101.json beside UCF-101-midframes/ (CoOp / Tip-Adapter's copy): its train + val entries
train and its test entries test, which are the official split 1's trainlist01 / testlist01 (CoOp cut
its val out of trainlist01); labels as written there (classInd.txt id - 1, the same indices).
Video names match exactly, else case-insensitively (the release spells 'v_HandStandPushups' in the
lists where some frame dumps write 'v_HandstandPushups'). Class names: CamelCase split
('ApplyEyeMakeup' -> 'Apply Eye Makeup'); class index = classInd.txt id - 1.

A pre-split copy (torchvision ImageFolder's layout, as PROOF and other CLIP continual-learning repos ship it:
`ucf/train/<Class>/` beside `ucf/test/<Class>/`, each holding frames as images or per-video frame folders) is
read where the official lists, or the frames they name, are not there (and data.frames_dir is not set): its
split as given, the classes in classInd.txt's order when that file is there, else its train/ folders' sorted
order (ImageFolder's); names from the folder names as above.
"""
from __future__ import annotations

import itertools
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence

from PIL import Image

from .base import ClassDataset, DatasetFormatError, read_rgb
from .files import (IMAGE_EXTENSIONS, class_folder_names, find_presplit, format_error, found_nearby, is_image_name,
                    list_images, numbered_lines, read_presplit, require_root)

log = logging.getLogger(__name__)

NAME = "ucf101"
LIST_DIR_CANDIDATES = ("ucfTrainTestlist", "annotations")  # the release's zip; MMAction2's data/ucf101/annotations
# last, "videos": MMAction2's raw .avi folder, found only to say how to extract frames from it
FRAME_DIR_CANDIDATES = ("UCF-101-midframes", "UCF-101-frames", "frames", "rawframes", "UCF-101", "UCF101", "videos")
LAYOUT = """  <root>/ucfTrainTestlist/classInd.txt      ('1 ApplyEyeMakeup')
  <root>/ucfTrainTestlist/trainlist01.txt   ('ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1')
  <root>/ucfTrainTestlist/testlist01.txt    ('ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi')
  (or the same three files in <root>/annotations/, MMAction2's layout;
   or CoOp's <root>/split_zhou_UCF101.json: {"train"|"val"|"test": [["<Class_Name>/<video>.jpg", label, "<Class_Name>"], ...]})
  and frames, either
  <root>/UCF-101-midframes/<Class_Name>/<video>.jpg       (one middle frame per video, CoOp), or
  <root>/<frames dir>/<ClassName>/<video>/<frame>.jpg     (all frames; the middle RGB one is used)
  <root>/<frames dir>/<video>/<frame>.jpg or <video>.jpg   (no class folders, e.g. jpegs_256)
  (<frames dir>: data.frames_dir, or one of """ + ", ".join(FRAME_DIR_CANDIDATES) + """)
  or pre-split (ImageFolder, PROOF): <root>/train/<Class>/ + <root>/test/<Class>/ (or val/; also in <root>/ucf/),
  frames as images or per-video folders"""


def class_name(camel: str) -> str:
    """'ApplyEyeMakeup' -> 'Apply Eye Makeup', 'YoYo' -> 'Yo Yo', 'Skijet' -> 'Skijet'."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", camel).replace("_", " ").strip()


def class_folders(camel: str) -> list[str]:
    """Folder spellings of a class: 'ApplyEyeMakeup' and CoOp's 'Apply_Eye_Makeup'; one for a one-word
    class ('Archery': listed twice, its videos were searched and named twice)."""
    return list(dict.fromkeys([camel, "_".join(re.findall(r"[A-Z][^A-Z]*", camel)) or camel]))


def _natural_key(path: Path):
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", path.name)]


RGB_SERIES = ("img", "image", "frame", "images", "frames", "rgb")


def _series(path: Path) -> str:
    """The name of the image series a frame belongs to: 'flow_x_00012.jpg' -> 'flow_x'."""
    return re.sub(r"\d+", "", path.stem).strip("_-. ").lower()


def middle_frame(video_dir: Path) -> Path:
    """The middle frame (natural name order) of the RGB series in a per-video frame folder.

    Files are grouped by name without digits; optical-flow series ('flow*') are dropped; an
    RGB-named series (img, image, frame, ...) is preferred, else the largest remaining one.
    """
    series: dict[str, list[Path]] = {}
    for p in video_dir.iterdir():
        if is_image_name(p):
            series.setdefault(_series(p), []).append(p)
    if not series:
        raise format_error(NAME, f"video frame folder '{video_dir}' holds no images", LAYOUT,
                           "re-extract the frames of this video")
    rgb = {k: v for k, v in series.items() if not k.startswith("flow")}
    if not rgb:
        raise format_error(NAME, f"video frame folder '{video_dir}' holds only optical-flow images "
                                 f"({sorted(series)})", LAYOUT,
                           "extract the RGB frames too (MMAction2: img_00001.jpg ...), or point "
                           "data.frames_dir at a folder of RGB frames")
    named = {k: v for k, v in rgb.items() if k in RGB_SERIES}
    pool = named or rgb
    size = max(len(v) for v in pool.values())
    largest = [k for k, v in pool.items() if len(v) == size]
    if len(largest) > 1:
        counts = {k: len(v) for k, v in sorted(rgb.items())}
        raise format_error(NAME, f"video frame folder '{video_dir}' mixes image series {counts}; "
                                 "cannot tell which holds the RGB frames", LAYOUT,
                           "keep only the RGB frames there, or name them img_00001.jpg, img_00002.jpg, ...")
    frames = sorted(pool[largest[0]], key=_natural_key)
    return frames[len(frames) // 2]


def chosen_frames(sources: Sequence[str]) -> list[Path]:
    """The file each source is read from: an image file itself, a folder's middle frame. Chosen once,
    when the dataset is built in the main process: a cache filled inside DataLoader workers dies
    with them, so every pass would list every folder again. Folders are listed on a few threads (a
    network file system answers each listing slowly, not busily)."""
    def chosen(source: str) -> Path:
        path = Path(source)
        return middle_frame(path) if path.is_dir() else path
    if not sources:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(sources))) as pool:
        return list(pool.map(chosen, sources))


class VideoFrameDataset(ClassDataset):
    """`sources[i]` is an image file (a middle frame) or a folder of frames (its middle one is read)."""

    def __init__(self, sources: Sequence[str], targets: Sequence[int], class_names: Sequence[str],
                 transform: Optional[Callable] = None, class_ids: Optional[Sequence[str]] = None):
        super().__init__(class_names, targets, transform, class_ids)
        self.sources = list(sources)
        self.frame_paths = chosen_frames(self.sources)

    def load_image(self, index: int) -> Image.Image:
        return read_rgb(self.frame_paths[index])


def _classes(lists: Path) -> list[str]:
    entries = {}
    for n, line in numbered_lines(lists / "classInd.txt"):
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
    # frames extracted one folder (or image) per video with no class level, as two-stream code writes them
    # (jpegs_256/v_ApplyEyeMakeup_g01_c01/): name that folder, which data.frames_dir reads
    per_video = sorted(child.name for child in root.iterdir() if child.is_dir() and not child.name.startswith(".")
                       and any(entry.name.startswith("v_") for entry in itertools.islice(child.iterdir(), 50)))
    fix = (f"the frames are in '{root / per_video[0]}' (a folder per video, no class folders): set "
           f"data.frames_dir={per_video[0]}" if per_video else "extract frames there, or set data.frames_dir")
    raise format_error(NAME, f"no frames folder with class sub-folders in '{root}' "
                             f"(looked for {list(FRAME_DIR_CANDIDATES)})", LAYOUT, fix)


FRAME_SUFFIXES = IMAGE_EXTENSIONS + ("",)  # a middle-frame image, or a folder of frames


def _find_video(folders: list[Path], stem: str, listings: dict[Path, dict[str, Path]]) -> Optional[Path]:
    """`<folder>/<stem>.jpg|.jpeg|.png|/` in the first folder that has one; exact name, else any case."""
    for folder in folders:
        for suffix in FRAME_SUFFIXES:
            path = folder / f"{stem}{suffix}"
            if path.is_dir() if suffix == "" else path.is_file():
                return path
    for folder in folders:
        if folder not in listings:
            listings[folder] = {p.name.lower(): p for p in folder.iterdir()} if folder.is_dir() else {}
        for suffix in FRAME_SUFFIXES:
            path = listings[folder].get(f"{stem}{suffix}".lower())
            if path is not None and (path.is_dir() if suffix == "" else path.is_file()):
                return path
    return None


def _missing_error(list_path: Path, frames: Path, missing: list[tuple[list[Path], str]]) -> Exception:
    """Videos without frames; when the frames dir holds the .avi files themselves, say so and how to extract."""
    videos = [f / name for folders, name in missing for f in folders if (f / name).is_file()]
    if videos:
        src = frames.name
        ffmpeg = (f'for v in {src}/*/*.avi; do o=UCF-101-midframes/${{v#{src}/}}; mkdir -p "$(dirname "$o")"; '
                  'ffmpeg -n -loglevel error -ss "$(ffprobe -v error -show_entries format=duration -of csv=p=0 '
                  '"$v" | awk \'{print $1/2}\')" -i "$v" -frames:v 1 "${o%.avi}.jpg"; done')
        return format_error(NAME, f"{len(missing)} videos of {list_path.name} have no frames under '{frames}': "
                                  f"it holds the videos themselves (e.g. {[str(v) for v in videos[:3]]}), "
                                  "not extracted frames", LAYOUT,
                            f"extract one middle frame per video, e.g. in data.root run:  {ffmpeg}  "
                            "(or set data.frames_dir to a folder of extracted frames)")
    examples = [str(folders[0] / Path(name).stem) for folders, name in missing[:3]]
    return format_error(NAME, f"{len(missing)} videos of {list_path.name} have no frames under '{frames}', "
                              f"e.g. {examples} ({', '.join(IMAGE_EXTENSIONS)} or a folder)", LAYOUT,
                        "extract frames for every video of the split")


def _read_list(path: Path, frames: Path, class_index: dict[str, int], with_labels: bool
               ) -> tuple[list[str], list[int]]:
    sources, targets, missing = [], [], []
    listings: dict[Path, dict[str, Path]] = {}
    # class folders matched in any case ('HandStandPushups/' holds the list's 'HandstandPushups')
    class_dirs = {p.name.lower(): p for p in frames.iterdir() if p.is_dir()} if frames.is_dir() else {}
    for n, line in numbered_lines(path):
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
        folders = [class_dirs.get(f.lower(), frames / f) for f in class_folders(rel.parent.name)] + [frames]
        source = _find_video(folders, rel.with_suffix("").name, listings)
        if source is None:
            missing.append((folders, rel.name))
            continue
        sources.append(str(source))
        targets.append(label)
    if missing:
        raise _missing_error(path, frames, missing)
    return sources, targets


COOP_SPLIT = "split_zhou_UCF101.json"
COOP_FRAMES = "UCF-101-midframes"


def _read_coop_split(path: Path, frames: Path) -> tuple[list[str], tuple[list[str], list[int]], tuple[list[str], list[int]]]:
    """(class ids as the file writes them, train, test) from CoOp's split file: train = its "train" + "val" entries."""
    import json

    try:
        split = json.loads(path.read_text(encoding="utf-8-sig"))
        parts = {k: [(str(rel), int(label), str(name)) for rel, label, name in split[k]] for k in ("train", "val", "test")}
    except (ValueError, KeyError, TypeError) as err:
        raise format_error(NAME, f"'{path}' is not CoOp's split file ({type(err).__name__}: {err})", LAYOUT,
                           "use CoOp's split_zhou_UCF101.json as released, or the official ucfTrainTestlist/") from err
    entries = parts["train"] + parts["val"] + parts["test"]
    names: dict[int, set[str]] = {}
    for _, label, name in entries:
        names.setdefault(label, set()).add(name)
    bad = [f"label {lb}: {sorted(ns)}" for lb, ns in sorted(names.items()) if len(ns) > 1]
    if bad or sorted(names) != list(range(len(names))):
        raise format_error(NAME, f"'{path}': labels are not 0..{len(names) - 1}, one class name each"
                                 + (f" ({'; '.join(bad[:3])})" if bad else f" (labels {sorted(names)[:5]}...)"),
                           LAYOUT, "use CoOp's split_zhou_UCF101.json as released")
    missing = [rel for rel, _, _ in entries if not (frames / rel).is_file()]
    if missing:
        raise format_error(NAME, f"{len(missing)} images of {path.name} are missing under '{frames}', e.g. "
                                 f"{missing[:3]}", LAYOUT,
                           f"extract CoOp's UCF-101-midframes.zip into data.root (or set data.frames_dir to the "
                           f"folder the paths in {path.name} are relative to)")
    ids = [next(iter(names[lb])) for lb in range(len(names))]

    def sources(entries):
        return [str(frames / rel) for rel, _, _ in entries], [label for _, label, _ in entries]
    return ids, sources(parts["train"] + parts["val"]), sources(parts["test"])


def _video_entries(folder: Path) -> list[Path]:
    """A pre-split class folder's samples: its images (frames) and its sub-folders (a video's frames each: the
    middle one is read), sorted by name."""
    return sorted([*list_images(folder), *(folder / name for name in class_folder_names(folder))])


def _load_presplit(train_dir: Path, test_dir: Path, classes: Optional[list[str]], split: int,
                   train_transform: Optional[Callable], test_transform: Optional[Callable]
                   ) -> tuple[VideoFrameDataset, VideoFrameDataset]:
    """A pre-split ImageFolder copy; `classes`: classInd.txt's (CamelCase), matched to the folders in any of their
    spellings (class_folders, any case), else None (the folders' sorted order)."""
    if split != 1:
        raise format_error(NAME, f"data.official_split={split}, but '{train_dir.parent}' is a pre-split copy (train/ "
                                 f"+ {test_dir.name}/): it holds one split", LAYOUT,
                           "unset data.official_split, or use the official ucfTrainTestlist/ with frames of every video")
    if classes is None:  # the folders, sorted as ImageFolder sorts them
        classes, classes_from = class_folder_names(train_dir), f"the classes of '{train_dir}'"
    else:
        classes_from = "classInd.txt's classes (in any of their spellings: 'ApplyEyeMakeup', 'Apply_Eye_Makeup')"
    names = [class_name(c) for c in classes]
    train, test = read_presplit(train_dir, test_dir, classes, NAME, LAYOUT, entries=_video_entries,
                                spellings=class_folders, classes_from=classes_from)
    log.info("%s: the pre-split folders %s + %s (%d classes, %s): %d train, %d test samples", NAME, train_dir,
             test_dir, len(classes), classes_from, len(train[0]), len(test[0]))
    return (VideoFrameDataset(*train, names, train_transform, classes),
            VideoFrameDataset(*test, names, test_transform, classes))


def load_ucf101(root: Optional[str], train_transform: Optional[Callable] = None,
                test_transform: Optional[Callable] = None, frames_dir: Optional[str] = None,
                split: int = 1) -> tuple[VideoFrameDataset, VideoFrameDataset]:
    path = require_root(root, NAME, LAYOUT)
    lists = next((path / d for d in LIST_DIR_CANDIDATES if (path / d / "classInd.txt").is_file()),
                 path / LIST_DIR_CANDIDATES[0])
    needed = ["classInd.txt", f"trainlist0{split}.txt", f"testlist0{split}.txt"]
    missing = [f for f in needed if not (lists / f).is_file()]
    presplit = None if frames_dir else find_presplit([path / "ucf", path / "ucf101", path])  # a shared root: its own first
    if missing and presplit is not None and not (path / COOP_SPLIT).is_file():
        ordered = _classes(lists) if (lists / "classInd.txt").is_file() else None
        return _load_presplit(*presplit, ordered, split, train_transform, test_transform)
    if missing and split == 1 and (path / COOP_SPLIT).is_file():  # CoOp's copy: its split is split 1's
        frames = path / (frames_dir or COOP_FRAMES)
        if not frames.is_dir():
            raise format_error(NAME, f"'{path / COOP_SPLIT}' is there but its image folder '{frames}' is not",
                               LAYOUT, "extract CoOp's UCF-101-midframes.zip into data.root, or set data.frames_dir")
        ids, train, test = _read_coop_split(path / COOP_SPLIT, frames)
        class_names = [class_name(c) for c in ids]
        return (VideoFrameDataset(*train, class_names, train_transform, ids),
                VideoFrameDataset(*test, class_names, test_transform, ids))
    if missing:
        # the official lists, or (split 1) CoOp's split file, one or two levels off data.root
        patterns = [f"{d}/classInd.txt" for d in LIST_DIR_CANDIDATES] + ([COOP_SPLIT] if split == 1 else [])
        nearby = next((hint for pattern in patterns if (hint := found_nearby(path, pattern))), "")
        raise format_error(NAME, f"'{lists}' lacks {missing}", LAYOUT,
                           nearby or "extract UCF101TrainTestSplits-RecognitionTask.zip into data.root"
                           + (f" (or, for split 1, put CoOp's {COOP_SPLIT} there)" if split == 1 else ""))
    classes = _classes(lists)
    class_index = {c.lower(): i for i, c in enumerate(classes)}
    try:
        frames = _frames_dir(path, classes, frames_dir)
    except DatasetFormatError:
        if presplit is None:
            raise
        return _load_presplit(*presplit, classes, split, train_transform, test_transform)  # the lists' frames: not here
    class_names = [class_name(c) for c in classes]
    train = _read_list(lists / needed[1], frames, class_index, with_labels=True)
    test = _read_list(lists / needed[2], frames, class_index, with_labels=False)
    return (VideoFrameDataset(*train, class_names, train_transform, classes),
            VideoFrameDataset(*test, class_names, test_transform, classes))
