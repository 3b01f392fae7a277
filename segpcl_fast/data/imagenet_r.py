"""ImageNet-R (200 ImageNet classes as renditions), as extracted from imagenet-r.tar.

ImageNet-R ships no train/test split. The split used is the first of these that applies (the
choice is logged at INFO, naming the file or folders):

1. a pre-split copy: `train/<wnid>/` next to `test/<wnid>/` (or `val/<wnid>/`; test wins when
   both exist), in the root or in imagenet-r/ -- the layout of RAPF's README and ImageFolder
   repos. Those folders are used as given; setting `split_file` as well is an error.
2. `split_file` (data.split_file), when set: a file with section lines `train` and `test`
   (or `val`), each followed by lines "relative/path [label]" -- RAPF's imgr_train_test_split.txt
   ("train", "n02051845/art_0.jpg", ..., "test", "n02051845/tattoo_4.jpg", ...); or CODA-Prompt's
   fixed split, `imagenet-r_train.yaml` (its `imagenet-r_test.yaml` beside it; either may be named):
   YAML lists `data` (paths such as data/imagenet-r/train/<wnid>/<file>.jpg, written where CODA-Prompt
   had moved the images) and `targets`, each image found by its <wnid>/<file> in the wnid folders.
3. `train.txt` + `test.txt` (lines "relative/path [label]") in the root or in imagenet-r/.
4. RAPF's `imgr_train_test_split.txt` (format of 2) in the root, in imagenet-r/ or in
   <root>/imgr_split/: a split file someone put next to the data is meant to be used.
5. otherwise the usual continual-learning protocol: a seeded 80/20 split per class ([choice]: the paper
   gives no split)
   (CODA-Prompt / RAPF style; see files.stratified_split: each class shuffled with seed `split_seed` +
   its label, so a copy holding only some of the classes splits them otherwise than the full copy).

Paths in split files are resolved against the root, imagenet-r/ and imagenet-r/'s parent, so
both "n02051845/art_0.jpg" and "imagenet-r/n02051845/art_0.jpg" work whichever of the two
folders data.root names. Labels always come from the wnid folder in the path (class index =
position of the wnid in the sorted folder list); a label column, if present, is only checked
for consistency. An image listed in both train and test is an error.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

from .base import FileListDataset
from .files import (format_error, found_nearby, images_in_both, list_images, names_for_wnids, numbered_lines,
                    relative_to_any, require_root, stratified_split, timm_synsets, user_data_file, wnid_folders)

log = logging.getLogger(__name__)

NAME = "imagenet-r"
RAPF_SPLIT = "imgr_train_test_split.txt"
TEST_DIRS = ("test", "val")
SECTIONS = {"train": "train", "test": "test", "val": "test"}
LAYOUT = """  <root>/imagenet-r/<wnid>/*.jpg       (200 wnid folders, e.g. n01443537/)
  <root>/imagenet-r/README.txt         (ships in imagenet-r.tar; lines 'n01443537 goldfish')
  optional: <root>/train.txt + <root>/test.txt  (lines 'imagenet-r/<wnid>/<file>.jpg [label]')
  optional: <root>/imgr_train_test_split.txt or data.split_file  (RAPF: a line 'train', then
            lines '<wnid>/<file>.jpg', a line 'test', then lines '<wnid>/<file>.jpg'; or data.split_file
            = CODA-Prompt's imagenet-r_train.yaml, its imagenet-r_test.yaml beside it)
  or pre-split: <root>/train/<wnid>/*.jpg + <root>/test/<wnid>/*.jpg (or val/ instead of test/)
  (<root> may also be the imagenet-r folder itself)"""

Split = tuple[list[str], list[int]]


def _locate(root: Optional[str]) -> tuple[Path, Path, Optional[Path]]:
    """(root_path, folder, test_dir): `folder` holds the wnid folders, or train/ + `test_dir`
    for a pre-split copy (test_dir is None for the flat layout)."""
    path = require_root(root, NAME, LAYOUT)
    candidates = (path / "imagenet-r", path)
    unsplit = next((c for c in candidates if wnid_folders(c)), None)
    # a pre-split copy wins over unsplit wnid folders beside it (a split made by copying, or by moving
    # files out of folders left behind): the user's split is used, not a seeded one. A train/ in the
    # other folder whose classes are not ImageNet-R's (ImageNet's own train/ in a shared data root) is
    # not such a copy: the imagenet-r/ folder is read
    for cand in candidates:
        split_wnids = wnid_folders(cand / "train")
        if not split_wnids:
            continue
        if unsplit is not None and unsplit != cand and not set(split_wnids) <= set(wnid_folders(unsplit)):
            log.info("%s: %s holds classes that %s lacks: not a copy of ImageNet-R, not read",
                     NAME, cand / "train", unsplit)
            continue
        test_dir = next((cand / d for d in TEST_DIRS if wnid_folders(cand / d)), None)
        if test_dir is None:
            raise format_error(NAME, f"'{cand / 'train'}' holds wnid class folders but neither "
                                     f"'{cand / 'test'}' nor '{cand / 'val'}' does", LAYOUT,
                               "add the test/ (or val/) wnid folders of the split, or use the "
                               "unsplit imagenet-r/ folder")
        if unsplit is not None:
            log.info("%s: using the pre-split %s + %s; the unsplit wnid folders in %s are not read",
                     NAME, cand / "train", test_dir, unsplit)
        return path, cand, test_dir
    if unsplit is not None:
        return path, unsplit, None
    raise format_error(NAME, f"no wnid class folders (n########/) in '{path / 'imagenet-r'}' or '{path}' "
                             f"(nor in a train/ folder there)", LAYOUT,
                       found_nearby(path, "imagenet-r/README.txt")
                       or "extract imagenet-r.tar into data.root")


def _parse_entries(path: Path, lines: list[tuple[int, str]], bases: list[Path],
                   wnid_index: dict[str, int], unit: str = "line") -> Split:
    """(paths, labels) of split-file entries (number n, "relative/path [label]"); an error names `path` and the
    entry's line (unit="line": path:n) or its place in a list (unit="entry": CODA-Prompt's YAML)."""
    paths, targets, seen_labels = [], [], {}
    for n, line in lines:
        where = f"{path}:{n}" if unit == "line" else f"{path}, {unit} {n}"
        parts = line.split()
        file = relative_to_any(parts[0], bases)
        if file is None:
            raise format_error(NAME, f"{where}: image '{parts[0]}' not found under "
                                     f"{[str(b) for b in bases]}", LAYOUT,
                               "paths in split files are relative to data.root or to imagenet-r/")
        wnid = file.parent.name
        if wnid not in wnid_index:
            raise format_error(NAME, f"{where}: '{parts[0]}' is not inside a wnid class folder", LAYOUT,
                               "split lines must look like 'imagenet-r/<wnid>/<file>.jpg [label]'")
        if len(parts) > 1 and seen_labels.setdefault(parts[1], wnid) != wnid:
            raise format_error(NAME, f"{where}: label {parts[1]} is used for both "
                                     f"{seen_labels[parts[1]]} and {wnid}", LAYOUT,
                               "fix the split file: one label per wnid folder")
        paths.append(str(file))
        targets.append(wnid_index[wnid])
    return paths, targets


def _read_sectioned(path: Path, bases: list[Path], wnid_index: dict[str, int]) -> tuple[Split, Split]:
    """RAPF format: a line 'train' (or 'test' / 'val') starts a section of image lines."""
    sections: dict[str, list[tuple[int, str]]] = {"train": [], "test": []}
    current = None
    for n, line in numbered_lines(path):
        head = SECTIONS.get(line.lower().rstrip(":"))
        if head is not None:
            current = head
        elif current is None:
            raise format_error(NAME, f"{path}:{n}: '{line}' comes before any 'train' or 'test' line",
                               LAYOUT, "start the split file with a line 'train' (RAPF's "
                                       "imgr_train_test_split.txt format), or use train.txt + test.txt")
        else:
            sections[current].append((n, line))
    empty = [name for name, lines in sections.items() if not lines]
    if empty:
        raise format_error(NAME, f"split file '{path}' has no '{empty[0]}' images", LAYOUT,
                           "list images under both a 'train' line and a 'test' line")
    return (_parse_entries(path, sections["train"], bases, wnid_index),
            _parse_entries(path, sections["test"], bases, wnid_index))


CODA_SUFFIXES = (".yaml", ".yml")


def _coda_pair(path: Path) -> tuple[Path, Path]:
    """(train file, test file) of CODA-Prompt's split, given either: imagenet-r_train.yaml / imagenet-r_test.yaml."""
    stem, suffix = path.stem, path.suffix
    for mine, other in (("_train", "_test"), ("_test", "_train")):
        if stem.endswith(mine):
            sibling = path.with_name(stem[: -len(mine)] + other + suffix)
            pair = (path, sibling) if mine == "_train" else (sibling, path)
            if not sibling.is_file():
                raise format_error(NAME, f"'{path}' is a CODA-Prompt split file but '{sibling}' is not beside it",
                                   LAYOUT, f"put {sibling.name} (from CODA-Prompt's dataloaders/splits/) next to it")
            return pair
    raise format_error(NAME, f"data.split_file '{path}' is YAML but not named like CODA-Prompt's "
                             f"imagenet-r_train.yaml / imagenet-r_test.yaml", LAYOUT,
                       "name the pair <name>_train.yaml and <name>_test.yaml, or use RAPF's sectioned text format")


def _read_coda_yaml(path: Path, bases: list[Path], wnid_index: dict[str, int]) -> Split:
    """One CODA-Prompt split file: YAML {"data": [paths], "targets": [labels]}; an image is its <wnid>/<file>
    (the paths name CODA-Prompt's own train/ and test/ folders), the label only checked (one per wnid)."""
    import yaml
    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        data, targets = [str(p) for p in loaded["data"]], [int(t) for t in loaded["targets"]]
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as err:
        raise format_error(NAME, f"'{path}' is not a CODA-Prompt split file ({type(err).__name__}: {err})", LAYOUT,
                           "use the file as CODA-Prompt ships it: YAML lists 'data' (image paths) and 'targets'") from err
    if len(data) != len(targets):
        raise format_error(NAME, f"'{path}' lists {len(data)} images but {len(targets)} targets", LAYOUT,
                           "use the file as CODA-Prompt ships it")
    lines = [(n, f"{'/'.join(Path(p).parts[-2:])} {t}") for n, (p, t) in enumerate(zip(data, targets), 1)]
    return _parse_entries(path, lines, bases, wnid_index, unit="entry")


def _check_disjoint(train: Split, test: Split, source: str) -> None:
    """No image in both splits, an image known by its class (its wnid folder: every source labels by it) and file
    name (ImageNet-R's names are unique within a class): files.images_in_both."""
    both = images_in_both(train, test)
    if both:
        raise format_error(NAME, f"{len(both)} images are in both train and test of {source} (the same "
                                 f"<wnid>/<file name>), e.g. '{both[0]}'", LAYOUT, "list each image in one split only")


def _split_from_files(root_path: Path, folder: Path, wnid_index: dict[str, int],
                      split_file: Optional[str]) -> Optional[tuple[Split, Split, str]]:
    """(train, test, source) from the split file that applies, or None (seeded split)."""
    bases = list(dict.fromkeys([root_path, folder, folder.parent]))
    if split_file:
        path = user_data_file(split_file, root_path, "split file", "data.split_file", NAME, LAYOUT,
                              ", or unset data.split_file to use the split found in data.root")
        if path.suffix.lower() in CODA_SUFFIXES:
            train_file, test_file = _coda_pair(path)
            return (_read_coda_yaml(train_file, bases, wnid_index), _read_coda_yaml(test_file, bases, wnid_index),
                    f"CODA-Prompt's {train_file} + {test_file}")
        return (*_read_sectioned(path, bases, wnid_index), str(path))
    dirs = list(dict.fromkeys([root_path, folder]))
    for d in dirs:
        train_list, test_list = d / "train.txt", d / "test.txt"
        if train_list.is_file() != test_list.is_file():  # half a split: not silently replaced by the seeded one
            have, lack = (train_list, test_list) if train_list.is_file() else (test_list, train_list)
            raise format_error(NAME, f"'{have}' is there but '{lack}' is not", LAYOUT,
                               f"put {lack.name} next to it, or move {have.name} away to use the seeded split")
        if train_list.is_file() and test_list.is_file():
            return (_parse_entries(train_list, list(numbered_lines(train_list)), bases, wnid_index),
                    _parse_entries(test_list, list(numbered_lines(test_list)), bases, wnid_index),
                    f"{train_list} + {test_list}")
    for d in dirs + [root_path / "imgr_split"]:
        if (d / RAPF_SPLIT).is_file():
            return (*_read_sectioned(d / RAPF_SPLIT, bases, wnid_index), str(d / RAPF_SPLIT))
    return None


def _scan(folder: Path, wnids: list[str]) -> Split:
    paths, targets = [], []
    for label, wnid in enumerate(wnids):
        files = list_images(folder / wnid) if (folder / wnid).is_dir() else []
        paths += [str(f) for f in files]
        targets += [label] * len(files)
    if not paths:
        raise format_error(NAME, f"the wnid folders in '{folder}' hold no images", LAYOUT,
                           "extract imagenet-r.tar again")
    return paths, targets


def _from_split_folders(folder: Path, test_dir: Path) -> tuple[list[str], Split, Split]:
    """(wnids, train, test) of a pre-split copy; classes are the wnid folders of train/."""
    wnids = wnid_folders(folder / "train")
    extra = sorted(set(wnid_folders(test_dir)) - set(wnids))
    if extra:
        raise format_error(NAME, f"'{test_dir}' has {len(extra)} wnid folders that '{folder / 'train'}' "
                                 f"lacks, e.g. {extra[:5]}", LAYOUT,
                           "every test class needs a train/<wnid>/ folder: copy the full split")
    return wnids, _scan(folder / "train", wnids), _scan(test_dir, wnids)


def _check_imagenet_r_classes(wnids: list[str], folder: Path) -> None:
    """Every class folder one of ImageNet-R's fixed 200 wnids (timm's list; not checked without it).
    imagenet-a.tar has the same layout (200 wnid folders and a README.txt of names) and 86 of the same
    wnids, and the two usually sit side by side: a root pointing at ImageNet-A would otherwise train
    under ImageNet-R's name. A subset of ImageNet-R's classes is accepted."""
    known = timm_synsets("imagenet_r")
    foreign = sorted(set(wnids) - known) if known else []
    if not foreign:
        return
    imagenet_a = timm_synsets("imagenet_a")
    hint = (" (they are ImageNet-A classes: imagenet-a.tar has the same layout)"
            if imagenet_a and set(foreign) <= imagenet_a else "")
    raise format_error(NAME, f"{len(foreign)} of the {len(wnids)} class folders in '{folder}' are not "
                             f"ImageNet-R classes, e.g. {foreign[:5]}{hint}", LAYOUT,
                       "point data.root at the folder extracted from imagenet-r.tar (its 200 wnid folders, or "
                       "a subset of them)")


def load_imagenet_r(root: Optional[str], train_transform: Optional[Callable] = None,
                    test_transform: Optional[Callable] = None, names_file: Optional[str] = None,
                    split_seed: int = 0, test_fraction: float = 0.2, split_file: Optional[str] = None
                    ) -> tuple[FileListDataset, FileListDataset]:
    """(train, test) ImageNet-R; names from README.txt (imagenet-r/, root, or a pre-split copy's train/ or
    test/) or `names_file`, else CLIP's curated ImageNet names of the wnids (open_clip; logged).
    Which split is used: see the module docstring ('' or None `split_file` = not set)."""
    root_path, folder, test_dir = _locate(root)
    # README.txt ships in imagenet-r.tar beside the wnid folders; a pre-split copy made next to the
    # extracted imagenet-r/ leaves it there, one made by copying imagenet-r/ to train/ takes it into train/
    name_files = list(dict.fromkeys([folder / "README.txt", root_path / "README.txt",
                                     root_path / "imagenet-r" / "README.txt"]
                                    + ([folder / "train" / "README.txt", test_dir / "README.txt"] if test_dir else [])))
    if test_dir is not None:
        if split_file:
            raise format_error(NAME, f"data.split_file '{split_file}' is set but '{folder}' is already "
                                     f"split into train/ and {test_dir.name}/", LAYOUT,
                               "unset data.split_file, or point data.root at an unsplit imagenet-r/ folder")
        wnids, train, test = _from_split_folders(folder, test_dir)
        source = f"the folders {folder / 'train'} and {test_dir}"
    else:
        wnids = wnid_folders(folder)
        found = _split_from_files(root_path, folder, {w: i for i, w in enumerate(wnids)}, split_file)
        if found is not None:
            train, test, source = found
        else:
            paths, targets = _scan(folder, wnids)
            train_idx, test_idx = stratified_split(targets, test_fraction, split_seed)
            train = ([paths[i] for i in train_idx], [targets[i] for i in train_idx])
            test = ([paths[i] for i in test_idx], [targets[i] for i in test_idx])
            source = f"a seeded per-class split (split_seed={split_seed}, test_fraction={test_fraction})"
    _check_disjoint(train, test, source)
    _check_imagenet_r_classes(wnids, folder if test_dir is None else folder / "train")
    # CLIP's curated names of these ILSVRC-2012 wnids, with README.txt (its WordNet lemmas: 'hammerhead', 'drake',
    # 'hog') or without it (pre-split copies often lack it): one copy or another, the same prompts (what CoOp and
    # CLIP's own ImageNet-R evaluation use); data.names_file=README.txt takes the README's names as written
    class_names = names_for_wnids(wnids, name_files, NAME, LAYOUT, names_file, unique=True, root=root_path,
                                  origin="README.txt is in imagenet-r.tar, beside the class folders",
                                  clip_subsets=True, clip_without_file=True)
    log.info("%s: train/test split from %s: %d train, %d test images", NAME, source, len(train[0]), len(test[0]))
    return (FileListDataset(*train, class_names, train_transform, wnids),
            FileListDataset(*test, class_names, test_transform, wnids))
