"""ImageNet-Subset (ImageNet-100): ImageNet train/val folders restricted to a class list.

Class list: the file `class_list` (absolute, or relative to the root, else to the working
directory); without it the first of `<root>/imagenet100.txt`, `<root>/train_100.txt` that exists; without either, a root whose
train/ holds exactly 100 wnid folders (an already cut ImageNet-100 copy, as PyCIL uses) takes
those. Two class-list formats:
  - wnid list: one wnid per line (extra words on a line ignored, '#' comments skipped);
  - split list (continuum / PODNet's train_100.txt, as RAPF uses): lines
    'train/n01440764/n01440764_10026.JPEG 0', an image path relative to the ImageNet root and
    an integer label. The wnid is the image's folder; wnids and labels must match one to one.
    Train is exactly the listed files. Val is exactly the files of the sibling list named with
    'train' replaced by 'val' (train_100.txt -> val_100.txt next to it) when that file exists
    (its paths may also be flat 'val/<file> <label>': the label names the class); otherwise
    the val folders / CSV below, restricted to the list's classes.
Class index = position in the SORTED wnids of the class list, whatever the list's line order or
labels (the ImageFolder convention, so a pre-cut train/ and a list file give the same indices and
RAPF's class_orders/imagenet100.yaml = RandomState(1993).permutation(100) applies); to use
another order, set data.class_order.
Validation images: val/<wnid>/ folders, or a flat val/ plus LOC_val_solution.csv (Kaggle), or a flat val/
as ILSVRC2012_img_val.tar extracts it plus the devkit (ILSVRC2012_devkit_t12/data/: the ground truth's
ILSVRC2012_ID per image, in file-name order, mapped to wnids by its meta.mat, read with scipy as torchvision's
ImageNet does).
Kaggle layout: when <root>/ILSVRC/Data/CLS-LOC/train exists, images are read from
ILSVRC/Data/CLS-LOC/{train,val} and the metadata files (CSV, mapping, class list) from <root>.
Kaggle's "imagenet100" copy (no train/): train images in <root>/train.X1 ... train.X4/<wnid>/ (each
wnid in one of them), val images in <root>/val.X/<wnid>/, names in <root>/Labels.json; the classes
are its wnid folders (or data.class_list's wnids).
Class names: data.names_file, else <root>/LOC_synset_mapping.txt, else torchvision's
<root>/meta.bin, else Labels.json; when that file covers the 1000 ILSVRC-2012 wnids (or, Labels.json,
only ILSVRC-2012 wnids), CLIP's curated ImageNet names (open_clip) are used instead. Without any of
these files (ILSVRC-2012 extracted from its train/val tars has none), ILSVRC-2012 wnids get CLIP's
curated names too (timm's wnid list and open_clip's names, both installed with open_clip). Names that
collide case-insensitively are an error.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Callable, Optional

from .base import FileListDataset
from .files import (WNID_RE, format_error, found_nearby, images_in_both, list_images, names_for_wnids, numbered_lines,
                    read_lines, relative_to_any, require_root, user_data_file, wnid_folders)

log = logging.getLogger(__name__)

NAME = "imagenet-subset"
DEFAULT_CLASS_LISTS = ("imagenet100.txt", "train_100.txt")
KAGGLE_IMAGES = Path("ILSVRC") / "Data" / "CLS-LOC"
VAL_CSV = "LOC_val_solution.csv"
DEVKIT_DATA = "ILSVRC2012_devkit_t12/data"  # ILSVRC2012_devkit_t12.tar.gz extracted in the root
DEVKIT_TRUTH = "ILSVRC2012_validation_ground_truth.txt"  # one ILSVRC2012_ID a line, val images in name order
VAL_CSV_COLUMNS = ("ImageId", "PredictionString")
KAGGLE100_TRAIN, KAGGLE100_VAL, KAGGLE100_NAMES = "train.X*", "val.X", "Labels.json"  # Kaggle's "imagenet100"
NAMES_ORIGIN = ("LOC_synset_mapping.txt comes with Kaggle's ImageNet download, meta.bin from torchvision's "
                "ImageNet, Labels.json with Kaggle's imagenet100")
LAYOUT = f"""  <root>/train/<wnid>/*.JPEG
  <root>/val/<wnid>/*.JPEG          (or flat val/*.JPEG + <root>/{VAL_CSV}, or + the devkit's
                                    <root>/ILSVRC2012_devkit_t12/data/{{ILSVRC2012_validation_ground_truth.txt,meta.mat}})
  (Kaggle: images in <root>/{KAGGLE_IMAGES}/{{train,val}}, the files below in <root>)
  <root>/LOC_synset_mapping.txt     (lines 'n01440764 tench, Tinca tinca'; or torchvision's meta.bin;
                                    without either, ILSVRC-2012 wnids get CLIP's names)
  <root>/imagenet100.txt            (the subset: one wnid a line; or set data.class_list)
  or <root>/train_100.txt + val_100.txt (continuum/PODNet lists: 'train/<wnid>/<file> <label>')
  (Kaggle's imagenet100: <root>/train.X1..X4/<wnid>/, <root>/val.X/<wnid>/, <root>/Labels.json)"""

Split = tuple[list[str], list[int]]


class ClassList:
    """The subset's sorted wnids; for a split list also its train files and val-list path."""

    def __init__(self, wnids: list[str], path: Optional[Path] = None,
                 train_files: Optional[list[tuple[str, str]]] = None, label_to_wnid: Optional[dict] = None):
        self.wnids = sorted(wnids)
        self.path = path
        self.train_files = train_files  # (relative path, wnid) per listed image, or None
        self.label_to_wnid = label_to_wnid or {}


def _is_split_line(line: str) -> bool:
    parts = line.split()
    return len(parts) == 2 and "/" in parts[0]


def _parse_split_list(path: Path, lines: list[str], label_to_wnid: Optional[dict] = None) -> tuple[list, dict]:
    """(relative path, wnid) per line and the label -> wnid map of a split list; the wnid is the
    folder of the path, or (flat val list) the class of its label in `label_to_wnid`."""
    files, pairs = [], {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise format_error(NAME, f"split list '{path}': line '{line}' is not '<split>/<wnid>/<file> <label>'",
                               LAYOUT, "one image path (relative to the ImageNet root) and an integer label a line")
        rel, label = parts[0], int(parts[1])
        folder = Path(rel).parent.name
        if WNID_RE.match(folder):
            wnid = folder
        elif label_to_wnid is not None and label in label_to_wnid:
            wnid = label_to_wnid[label]
        else:
            raise format_error(NAME, f"split list '{path}': the folder of '{rel}' is not a wnid", LAYOUT,
                               "list paths as '<split>/<wnid>/<file>'")
        pairs.setdefault((wnid, label), 0)
        files.append((rel, wnid))
    by_wnid, by_label = {}, {}
    for wnid, label in pairs:
        by_wnid.setdefault(wnid, []).append(label)
        by_label.setdefault(label, []).append(wnid)
    clashes = [f"{w} has labels {sorted(ls)}" for w, ls in by_wnid.items() if len(ls) > 1]
    clashes += [f"label {lb} has wnids {sorted(ws)}" for lb, ws in by_label.items() if len(ws) > 1]
    if clashes:
        raise format_error(NAME, f"split list '{path}': wnids and labels do not match one to one: "
                                 f"{'; '.join(sorted(clashes)[:5])}", LAYOUT,
                           "give every image of one wnid folder the same label, and each wnid its own label")
    return files, {lb: ws[0] for lb, ws in by_label.items()}


def _read_class_list(path: Path) -> ClassList:
    lines = read_lines(path)
    if not lines:
        raise format_error(NAME, f"class list '{path}' is empty", LAYOUT, "one wnid (n########) a line")
    if _is_split_line(lines[0]):
        files, label_to_wnid = _parse_split_list(path, lines)
        labels = sorted(label_to_wnid)
        wnids = sorted(label_to_wnid.values())
        if [label_to_wnid[lb] for lb in labels] != wnids:
            order = [wnids.index(label_to_wnid[lb]) for lb in labels]  # the list's label order, as class indices
            log.warning("split list %s: its labels are not in sorted-wnid order; class index = sorted wnid "
                        "order (to take the classes in the list's label order: --set data.class_order=[%s])",
                        path, ",".join(map(str, order)))
        return ClassList(wnids, path, files, label_to_wnid)
    wnids = [ln.split()[0] for ln in lines]
    bad = [w for w in wnids if not WNID_RE.match(w)]
    if bad:
        raise format_error(NAME, f"class list '{path}' has {len(bad)} entries that are not wnids, "
                                 f"e.g. {bad[:3]}", LAYOUT,
                           "one wnid (n########) a line, or a split list of '<split>/<wnid>/<file> <label>' lines")
    dupes = sorted({w for w in wnids if wnids.count(w) > 1})
    if dupes:
        raise format_error(NAME, f"class list '{path}' repeats wnids {dupes[:5]}", LAYOUT, "list each wnid once")
    return ClassList(wnids, path)


def _class_list(root: Path, image_root: Path, class_list: Optional[str], n_classes: int = 100) -> ClassList:
    if class_list:
        return _read_class_list(user_data_file(class_list, root, "class list", "data.class_list", NAME, LAYOUT))
    for name in DEFAULT_CLASS_LISTS:
        if (root / name).is_file():
            return _read_class_list(root / name)
    train_wnids = wnid_folders(image_root / "train")
    if len(train_wnids) == n_classes:  # a copy cut to the subset (n_classes: data.expected_classes, 100 by default)
        return ClassList(train_wnids)
    fix = (f"write the {n_classes} wnids to {root / DEFAULT_CLASS_LISTS[0]} or set data.class_list (ImageNet-100 as "
           f"PODNet and DER cut it: PODNet's imagenet_split/train_100.txt and val_100.txt, put in data.root; or a "
           f"copy cut to its {n_classes} class folders)")
    if 0 < len(train_wnids) < n_classes:  # a copy of some classes, kept on purpose: its count is the key to set
        fix += (f"; or, to run on the {len(train_wnids)} classes of train/ on purpose, set "
                f"data.expected_classes={len(train_wnids)} (null means {n_classes})")
    if root.parts[-3:] == Path(KAGGLE_IMAGES).parts:  # data.root points inside Kaggle's ILSVRC/Data/CLS-LOC
        fix = f"point data.root at {root.parents[2]} (Kaggle's layout: the folder with LOC_*.csv), or " + fix
    raise format_error(NAME, f"no class list: none of {', '.join(DEFAULT_CLASS_LISTS)} in '{root}' and "
                             f"train/ holds {len(train_wnids)} wnid folders, not {n_classes}", LAYOUT, fix)


def _split_from_folders(folder: Path, wnids: list[str], split: str) -> Split:
    missing = [w for w in wnids if not (folder / w).is_dir()]
    if missing:
        raise format_error(NAME, f"{len(missing)} classes of the class list have no folder in "
                                 f"'{folder}', e.g. {missing[:5]}", LAYOUT,
                           f"extract the full ImageNet {split} set there, or fix the class list")
    return _images_of_classes([folder / w for w in wnids])


def _images_of_classes(class_folders: list[Path]) -> Split:
    """Every image of each class folder, labelled with the folder's position in the list."""
    paths, targets = [], []
    for label, folder in enumerate(class_folders):
        files = list_images(folder)
        paths += [str(f) for f in files]
        targets += [label] * len(files)
    return paths, targets


def _split_from_list(files: list[tuple[str, str]], wnids: list[str], list_path: Path,
                     bases: list[Path], flat_val: Optional[Path] = None, val_csv: Optional[Path] = None) -> Split:
    """The listed images. flat_val: Kaggle's flat val/ folder, where a list written for val/<wnid>/
    folders (PODNet's val_100.txt) finds its images by file name; their wnids are then checked
    against val_csv (LOC_val_solution.csv) where it exists."""
    index = {w: i for i, w in enumerate(wnids)}
    paths, targets, missing, flat = [], [], [], {}
    for rel, wnid in files:
        found = relative_to_any(rel, bases)
        if found is None and flat_val is not None and (flat_val / Path(rel).name).is_file():
            found = flat_val / Path(rel).name
            flat[found.stem] = wnid
        if found is None:
            missing.append(rel)
            continue
        paths.append(str(found))
        targets.append(index[wnid])
    if missing:
        raise format_error(NAME, f"{len(missing)} images listed in '{list_path}' are missing under "
                                 f"{' or '.join(str(b) for b in bases)}, e.g. {missing[:3]}", LAYOUT,
                           "point data.root at the ImageNet root that holds train/ and val/ (a list's paths "
                           "may start with train/ or val/, or with the wnid folder)")
    if flat and val_csv is not None:
        solution = _val_solution(val_csv)
        wrong = [f"{i} ({w} in the list, {solution.get(i)} in {VAL_CSV})" for i, w in sorted(flat.items())
                 if solution.get(i) != w]
        if wrong:
            raise format_error(NAME, f"{len(wrong)} images of '{list_path}' found in the flat '{flat_val}' belong "
                                     f"to other classes by {val_csv}, e.g. {wrong[:3]}", LAYOUT,
                               "use the val list made for ImageNet's own val set, or sort val/ into val/<wnid>/ "
                               "folders")
    return paths, targets


def _val_solution(csv_path: Path) -> dict[str, str]:
    """Kaggle's LOC_val_solution.csv: image id -> wnid (the first of its PredictionString)."""
    solution = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        absent = [c for c in VAL_CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if absent:
            raise format_error(NAME, f"'{csv_path}' lacks the column(s) {absent} (header: {reader.fieldnames})",
                               LAYOUT, f"use Kaggle's {VAL_CSV} (header 'ImageId,PredictionString'), "
                                       "or sort val/ into val/<wnid>/ folders")
        for row in reader:
            wnid = (row["PredictionString"] or "").split()[:1]
            if wnid:
                solution[row["ImageId"]] = wnid[0]
    return solution


def _val_from_csv(csv_path: Path, folder: Path, wnids: list[str]) -> Split:
    index = {w: i for i, w in enumerate(wnids)}
    pairs = [(image_id, index[wnid]) for image_id, wnid in _val_solution(csv_path).items() if wnid in index]
    if not pairs:
        raise format_error(NAME, f"'{csv_path}' lists no val image of the {len(wnids)} classes, e.g. "
                                 f"{wnids[:3]}", LAYOUT, "use the full ILSVRC-2012 val solution file")
    paths, targets = [], []
    for image_id, label in sorted(pairs):
        path = folder / f"{image_id}.JPEG"
        if not path.is_file():
            raise format_error(NAME, f"val image '{path}' listed in {VAL_CSV} is missing",
                               LAYOUT, "extract the full ImageNet val set")
        paths.append(str(path))
        targets.append(label)
    return paths, targets


def _val_from_devkit(data_dir: Path, folder: Path, wnids: list[str]) -> Split:
    """Flat val/ + the devkit: line n of the ground truth is ILSVRC2012_val_<n, 8 digits>.JPEG's ILSVRC2012_ID,
    which meta.mat's synsets map to wnids (torchvision.datasets.ImageNet reads them so: scipy.io.loadmat)."""
    meta = data_dir / "meta.mat"
    if not meta.is_file():
        raise format_error(NAME, f"'{data_dir / DEVKIT_TRUTH}' is there but its '{meta}' is not (it maps the "
                                 f"ground truth's ILSVRC2012_IDs to wnids)", LAYOUT,
                           "extract the whole ILSVRC2012_devkit_t12.tar.gz into data.root")
    try:
        from scipy.io import loadmat
    except ImportError:
        raise format_error(NAME, f"reading the devkit's {meta} needs scipy, which is not installed", LAYOUT,
                           "pip install scipy (or sort val/ into val/<wnid>/ folders)") from None
    try:
        synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
        id_to_wnid = {int(i): str(w) for i, w in zip(synsets["ILSVRC2012_ID"], synsets["WNID"])}
    except (KeyError, ValueError, TypeError, OSError) as err:
        raise format_error(NAME, f"'{meta}' is not the devkit's meta.mat ({type(err).__name__}: {err})", LAYOUT,
                           "extract ILSVRC2012_devkit_t12.tar.gz again") from err
    index = {w: i for i, w in enumerate(wnids)}
    paths, targets = [], []
    for n, line in numbered_lines(data_dir / DEVKIT_TRUTH):
        if not line.isdigit() or int(line) not in id_to_wnid:
            raise format_error(NAME, f"{data_dir / DEVKIT_TRUTH}:{n}: {line!r} is not an ILSVRC2012_ID of {meta}",
                               LAYOUT, "extract ILSVRC2012_devkit_t12.tar.gz again")
        label = index.get(id_to_wnid[int(line)])
        if label is None:
            continue
        path = folder / f"ILSVRC2012_val_{n:08d}.JPEG"
        if not path.is_file():
            raise format_error(NAME, f"val image '{path}' (line {n} of {DEVKIT_TRUTH}) is missing", LAYOUT,
                               "extract the full ILSVRC2012_img_val.tar into val/")
        paths.append(str(path))
        targets.append(label)
    if not paths:
        raise format_error(NAME, f"'{data_dir / DEVKIT_TRUTH}' lists no val image of the {len(wnids)} classes, e.g. "
                                 f"{wnids[:3]}", LAYOUT, "use the devkit of ILSVRC-2012")
    log.info("%s: val labels from the devkit's %s and %s", NAME, DEVKIT_TRUTH, meta)
    return paths, targets


def _val_list_path(classes: ClassList) -> Optional[Path]:
    """The val list next to a split list: its file name with 'train' replaced by 'val'."""
    if classes.train_files is None or "train" not in classes.path.name:
        return None
    path = classes.path.with_name(classes.path.name.replace("train", "val", 1))
    return path if path.is_file() else None


def _val_split(root: Path, image_root: Path, classes: ClassList, bases: list[Path]) -> Split:
    val_list = _val_list_path(classes)
    if val_list is not None:
        files, label_to_wnid = _parse_split_list(val_list, read_lines(val_list), classes.label_to_wnid)
        wrong = sorted(lb for lb, w in label_to_wnid.items() if classes.label_to_wnid.get(lb) != w)
        if wrong or sorted(label_to_wnid.values()) != classes.wnids:
            raise format_error(NAME, f"val list '{val_list}' does not match '{classes.path}': its labels "
                                     f"{wrong[:5]} name other wnids, or its classes differ", LAYOUT,
                               "use the val list made with the train list (same wnids, same labels)")
        val_dir = image_root / "val"
        flat = val_dir if val_dir.is_dir() and not wnid_folders(val_dir) else None
        csv_path = root / VAL_CSV if flat is not None and (root / VAL_CSV).is_file() else None
        return _split_from_list(files, classes.wnids, val_list, bases + [val_dir], flat, csv_path)
    val_dir = image_root / "val"
    if wnid_folders(val_dir):
        return _split_from_folders(val_dir, classes.wnids, "val")
    if val_dir.is_dir() and (root / VAL_CSV).is_file():
        return _val_from_csv(root / VAL_CSV, val_dir, classes.wnids)
    if val_dir.is_dir() and (root / DEVKIT_DATA / DEVKIT_TRUTH).is_file():
        return _val_from_devkit(root / DEVKIT_DATA, val_dir, classes.wnids)
    raise format_error(NAME, f"no val/<wnid>/ folders in '{image_root}' (and no flat val/ with "
                             f"{root / VAL_CSV} or the devkit's {root / DEVKIT_DATA / DEVKIT_TRUTH})", LAYOUT,
                       "sort the validation images into val/<wnid>/ folders (e.g. with valprep.sh of PyTorch's "
                       f"ImageNet example), put Kaggle's {VAL_CSV} in {root}, or extract "
                       f"ILSVRC2012_devkit_t12.tar.gz there")


def load_imagenet_subset(root: Optional[str], train_transform: Optional[Callable] = None,
                         test_transform: Optional[Callable] = None, class_list: Optional[str] = None,
                         names_file: Optional[str] = None, n_classes: int = 100) -> tuple[FileListDataset, FileListDataset]:
    """(train, val) over the class list (class index = sorted wnid order); names from
    `names_file`, LOC_synset_mapping.txt or meta.bin (see the module docstring). Without a class
    list, a train/ holding exactly `n_classes` wnid folders (data.expected_classes; 100, the
    benchmark's count, by default) is taken as the subset."""
    path = require_root(root, NAME, LAYOUT)
    image_root = path / KAGGLE_IMAGES if (path / KAGGLE_IMAGES / "train").is_dir() else path
    if not (image_root / "train").is_dir() and (parts := sorted(p for p in path.glob(KAGGLE100_TRAIN) if p.is_dir())):
        return _load_kaggle100(path, parts, train_transform, test_transform, class_list, names_file)
    if not (image_root / "train").is_dir():
        raise format_error(NAME, f"no train/ folder in '{path}' (nor in '{path / KAGGLE_IMAGES}')", LAYOUT,
                           found_nearby(path, "train/n[0-9]*", prefer=lambda r: _looks_like_the_subset(r, n_classes))
                           or "point data.root at the ImageNet folder")
    classes = _class_list(path, image_root, class_list, n_classes)
    class_names = names_for_wnids(classes.wnids, [path / "LOC_synset_mapping.txt", path / "meta.bin"],
                                  NAME, LAYOUT, names_file, unique=True, root=path, origin=NAMES_ORIGIN,
                                  clip_without_file=True)
    bases = [image_root] if image_root == path else [image_root, path]
    if classes.train_files is not None:
        # lists write 'train/n01440764/x.JPEG' (PODNet) or 'n01440764/x.JPEG', relative to train/
        train = _split_from_list(classes.train_files, classes.wnids, classes.path, bases + [image_root / "train"])
    else:
        train = _split_from_folders(image_root / "train", classes.wnids, "train")
    val = _val_split(path, image_root, classes, bases)
    _check_disjoint(train, val, classes.train_files is not None)
    return (FileListDataset(*train, class_names, train_transform, classes.wnids),
            FileListDataset(*val, class_names, test_transform, classes.wnids))


def _looks_like_the_subset(root: Path, n_classes: int) -> bool:
    """A class list beside train/, or train/ cut to n_classes wnid folders: ImageNet-Subset rather than another
    dataset of wnid folders (an imagenet-r/ with train/ beside it in a shared data root)."""
    return any((root / name).is_file() for name in DEFAULT_CLASS_LISTS) or len(wnid_folders(root / "train")) == n_classes


def _check_disjoint(train: tuple[list[str], list[int]], val: tuple[list[str], list[int]], from_list: bool) -> None:
    """No image in both train and test (the same wnid and file name: files.images_in_both); `from_list`: the train
    images came from a split list (data.class_list), whose likeliest slip is the val list given for the train one."""
    both = images_in_both(train, val)
    if both:
        fix = ("data.class_list must be the train list (PODNet's train_100.txt), not the val one (val_100.txt)"
               if from_list else "keep each image in one of train/ and val/")
        raise format_error(NAME, f"{len(both)} images are in both train and test (the same <wnid>/<file name>), e.g. "
                                 f"'{both[0]}': the accuracy would be measured on training images", LAYOUT, fix)


def _load_kaggle100(path: Path, parts: list[Path], train_transform: Optional[Callable],
                    test_transform: Optional[Callable], class_list: Optional[str],
                    names_file: Optional[str]) -> tuple[FileListDataset, FileListDataset]:
    """Kaggle's "imagenet100": train.X1..X4/<wnid>/ (a wnid's images in one of them), val.X/<wnid>/."""
    folder_of: dict[str, Path] = {}
    for part in parts:
        for wnid in wnid_folders(part):
            if wnid in folder_of:
                raise format_error(NAME, f"class {wnid} has train folders in both '{folder_of[wnid].parent}' and "
                                         f"'{part}'", LAYOUT, "keep one train folder per class")
            folder_of[wnid] = part / wnid
    if class_list:
        classes = _read_class_list(user_data_file(class_list, path, "class list", "data.class_list", NAME, LAYOUT))
        if classes.train_files is not None:
            raise format_error(NAME, f"class list '{classes.path}' lists train/ images, but this copy is Kaggle's "
                                     f"imagenet100 ({', '.join(p.name for p in parts)}, no train/)", LAYOUT,
                               "give data.class_list as one wnid a line, or unset it to take the copy's classes")
        wnids = classes.wnids
    else:
        wnids = sorted(folder_of)
    missing = [w for w in wnids if w not in folder_of]
    where = ", ".join(str(p) for p in parts)
    if missing or not wnids:
        problem = f"{len(missing)} classes have no folder in {where}, e.g. {missing[:5]}" if missing else \
            f"no wnid folders in {where}"
        raise format_error(NAME, problem, LAYOUT,
                           "extract the whole Kaggle imagenet100 archive into data.root, or fix data.class_list")
    train = _images_of_classes([folder_of[w] for w in wnids])
    val_dir = path / KAGGLE100_VAL
    if not val_dir.is_dir():
        raise format_error(NAME, f"'{parts[0]}' is there but its val folder '{val_dir}' is not", LAYOUT,
                           "extract the whole Kaggle imagenet100 archive into data.root")
    val = _split_from_folders(val_dir, wnids, "val")
    _check_disjoint(train, val, False)
    class_names = names_for_wnids(wnids, [path / "LOC_synset_mapping.txt", path / "meta.bin", path / KAGGLE100_NAMES],
                                  NAME, LAYOUT, names_file, unique=True, root=path, clip_subsets=True,
                                  origin=NAMES_ORIGIN)
    return (FileListDataset(*train, class_names, train_transform, wnids),
            FileListDataset(*val, class_names, test_transform, wnids))
