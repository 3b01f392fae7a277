"""Small helpers shared by the on-disk readers: locating folders, reading metadata files,
class-name mappings. Every failure is a `DatasetFormatError` that names the missing thing
and the expected layout."""
from __future__ import annotations

import itertools
import json
import logging
import os
import pkgutil
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

from .base import DatasetFormatError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
WNID_RE = re.compile(r"^n\d{8}$")


def format_error(dataset: str, problem: str, layout: str, fix: str = "") -> DatasetFormatError:
    """One error message: what is wrong, the layout we expect, what to do."""
    msg = f"{dataset}: {problem}\nExpected layout:\n{layout.rstrip()}"
    if fix:
        msg += f"\nFix: {fix}"
    return DatasetFormatError(msg)


def require_root(root: Optional[str], dataset: str, layout: str) -> Path:
    if root is None or str(root) == "":
        raise format_error(dataset, "no data root given (data.root is not set)", layout,
                           f"pass --set data.root=/path/to/{dataset} (the folder holding the layout above)")
    path = Path(root).expanduser()
    if path.is_file():  # the downloaded archive (cifar-100-python.tar.gz, imagenet-r.tar, ...) or a file of the layout
        name = path.name.lower()
        extract = (f"tar xf {path} -C {path.parent}" if name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2",
                                                                      ".tar.xz", ".txz"))
                   else f"unzip {path} -d {path.parent}" if name.endswith(".zip") else None)
        fix = (f"extract it first ({extract}), then point data.root at the folder holding the layout above" if extract
               else f"point data.root at the folder holding the layout above, not at a file (this one lies in {path.parent})")
        raise format_error(dataset, f"data root '{path}' is a file, not a folder", layout, fix)
    if not path.is_dir():
        raise format_error(dataset, f"data root '{path}' does not exist or is not a folder", layout,
                           "point data.root at the folder holding the layout above")
    return path


def user_data_file(value: str, root: Optional[Path], what: str, key: str, dataset: str, layout: str,
                   or_else: str = "") -> Path:
    """A data.* file option (class_list, names_file, split_file) as an existing file. Absolute: as
    written. Relative: in data.root, else in the working directory. Missing: one error naming where it
    was looked for, the fix, and `or_else` (another way out)."""
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() or root is None else [root / path, Path.cwd() / path]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        looked = " or ".join(f"'{c}'" for c in candidates)
        raise format_error(dataset, f"{what} {looked} ({key}) not found", layout,
                           "fix the path (absolute, or relative to data.root or the working directory)" + or_else)
    return found


NEARBY_HITS = 5000  # glob matches read when looking for the layout below a root (a class list's folders: ~1000 a copy)


def found_nearby(root: Path, pattern: str, prefer: Optional[Callable[[Path], bool]] = None) -> str:
    """Fix text 'the layout was found one level further down: set data.root=...' when `pattern` (a
    glob relative to a data root, e.g. 'CUB_200_2011/images.txt') matches one or two folder levels below
    `root`, or '... one level up: set data.root=...' when it matches from a folder above `root` (a
    root that points into the dataset); '' otherwise. `prefer(candidate)`: candidates it holds true for are
    named first (another dataset of the same layout may lie beside the one asked for)."""
    levels_up = len(Path(pattern).parts)  # a match lies this many folders below its data root
    for depth in ("*", "*/*"):
        hits = itertools.islice(root.glob(f"{depth}/{pattern}"), NEARBY_HITS)  # a glob may match thousands
        roots = sorted({hit.parents[levels_up - 1] for hit in hits}, key=lambda r: (prefer is not None and not prefer(r), r))
        if roots:
            others = f" (also found in: {', '.join(map(str, roots[1:4]))}{', ...' if len(roots) > 4 else ''})" \
                if len(roots) > 1 else ""
            return (f"the layout was found {'one level' if depth == '*' else 'two levels'} further down: set "
                    f"data.root={roots[0]}{others}")
    for n, above in enumerate(list(root.absolute().parents)[:2], 1):  # as the user wrote it, not resolved
        if next(iter(above.glob(pattern)), None) is not None:
            return f"the layout was found {'one level' if n == 1 else 'two levels'} up: set data.root={above}"
    return ""


def first_existing(candidates: Iterable[Path]) -> Optional[Path]:
    for c in candidates:
        if c.exists():
            return c
    return None


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, stripped line) of the non-empty, non-'#' lines of `path`."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:  # -sig: a byte-order mark is not text
        for n, line in enumerate(f, 1):
            text = line.strip()
            if text and not text.startswith("#"):
                yield n, text


def read_lines(path: Path) -> list[str]:
    """Non-empty, stripped lines; '#' comment lines skipped."""
    return [text for _, text in numbered_lines(path)]


def is_image_name(path: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> bool:
    """An image file name: one of `extensions` (any case), not hidden. Hidden names include macOS's
    AppleDouble '._<name>.jpg' metadata files that copies from a Mac leave beside every image."""
    return path.suffix.lower() in extensions and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name (deterministic). Read with os.scandir, whose entries
    know their type from the directory listing: Path.iterdir() + is_file() made one stat per file (strace on
    a flat folder of 50,000 images: 50,000 stats then, none now), which a network file system answers
    slowly."""
    with os.scandir(folder) as entries:
        return sorted(folder / e.name for e in entries if is_image_name(Path(e.name)) and e.is_file())


def wnid_folders(folder: Path) -> list[str]:
    """Sorted names of the ImageNet-style wnid sub-folders (n01440764, ...) of `folder` (os.scandir: no
    stat per entry, see list_images)."""
    if not folder.is_dir():
        return []
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if WNID_RE.match(e.name) and e.is_dir())


def clean_name(name: str) -> str:
    """'great_white_shark' -> 'great white shark' (underscores to spaces, collapse blanks)."""
    return " ".join(name.replace("_", " ").split())


def _mapping_from_meta_bin(path: Path) -> dict[str, str]:
    """torchvision ImageNet's meta.bin: torch.save((wnid_to_classes, val_wnids)), where
    wnid_to_classes maps a wnid to a tuple of names; the first name is kept."""
    import pickle

    from ..fileio import DamagedFileError, UnsafeFileError, load_torch_file

    try:  # weights_only, after each record's CRC check, as every torch file the package reads
        data = load_torch_file(path)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, DamagedFileError, UnsafeFileError) as err:
        raise ValueError(f"'{path}' is not a torchvision meta.bin ({type(err).__name__}: {err})") from err
    wnid_to_classes = data[0] if isinstance(data, (tuple, list)) and data else data
    if not isinstance(wnid_to_classes, dict):
        raise ValueError(f"'{path}' does not hold torchvision's (wnid_to_classes, val_wnids)")
    mapping = {}
    for wnid, names in wnid_to_classes.items():
        name = names[0] if isinstance(names, (list, tuple)) and names else names
        if WNID_RE.match(str(wnid)) and isinstance(name, str):
            mapping[str(wnid)] = clean_name(name.split(",")[0])
    return mapping


def _mapping_from_json(path: Path) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"'{path}' is not valid JSON ({err})") from err
    mapping: dict[str, str] = {}
    if not isinstance(data, dict):
        return mapping
    for key, val in data.items():
        if WNID_RE.match(str(key)):
            name = val[0] if isinstance(val, (list, tuple)) else val
            mapping[str(key)] = clean_name(str(name).split(",")[0])
        elif isinstance(val, (list, tuple)) and len(val) >= 2 and WNID_RE.match(str(val[0])):
            mapping[str(val[0])] = clean_name(str(val[1]).split(",")[0])
    return mapping


def parse_wnid_mapping(path: Path) -> dict[str, str]:
    """Read a wnid -> class name file.

    Text formats (one class a line): "n01443537 goldfish" (ImageNet-R README.txt),
    "n01440764 tench, Tinca tinca" (LOC_synset_mapping.txt: the first name is kept), and either after
    an index column: "0 n01443537 goldfish" (RAPF's imagenet_R_classes.txt).
    Lines that do not start with a wnid are skipped, so a README's prose is fine.
    JSON formats: {"n01440764": "tench"} or torchvision/Keras' {"0": ["n01440764", "tench"]}.
    Binary: torchvision ImageNet's meta.bin (suffix .bin). A file that cannot be parsed
    (invalid JSON, not a meta.bin) raises ValueError naming the file.
    """
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _mapping_from_json(path)
    if suffix == ".bin":
        return _mapping_from_meta_bin(path)
    mapping: dict[str, str] = {}
    for line in read_lines(path):
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0].isdigit():  # "<index> <wnid> <name>" (RAPF's imagenet_R_classes.txt)
            parts = parts[1].split(None, 1)
        if len(parts) == 2 and WNID_RE.match(parts[0]):
            mapping[parts[0]] = clean_name(parts[1].split(",")[0])
    return mapping


ILSVRC2012_FIRST_LAST = ("n01440764", "n15075141")  # smallest and largest of the 1000 ILSVRC-2012 wnids


def ilsvrc2012_wnids() -> Optional[list[str]]:
    """The 1000 ILSVRC-2012 wnids, sorted (timm's list, timm_synsets; open_clip depends on timm); None without timm."""
    wnids = sorted(timm_synsets("imagenet") or ())
    return wnids if len(wnids) == 1000 and (wnids[0], wnids[-1]) == ILSVRC2012_FIRST_LAST else None


def timm_synsets(subset: str) -> Optional[frozenset[str]]:
    """The wnids of an ImageNet variant as timm lists them (timm/data/_info/<subset>_synsets.txt:
    "imagenet" (ILSVRC-2012), "imagenet_r", "imagenet_a"); None without timm or without that file (an old timm)."""
    try:
        data = pkgutil.get_data("timm.data", f"_info/{subset}_synsets.txt")
    except Exception:  # noqa: BLE001  (timm missing, or a timm without the file)
        return None
    wnids = frozenset(line.strip() for line in data.decode("utf-8").splitlines() if line.strip()) if data else None
    return wnids or None


def clip_imagenet_names(mapping: dict[str, str], subsets: bool = False) -> Optional[dict[str, str]]:
    """CLIP's curated ImageNet names (open_clip's IMAGENET_CLASSNAMES, indexed by sorted wnid)
    for a mapping that covers exactly the 1000 ILSVRC-2012 wnids, or (subsets=True) only ILSVRC-2012
    wnids (Kaggle's ImageNet-100 Labels.json: its 100); None otherwise (another wnid set, or
    open_clip not installed)."""
    wnids = sorted(mapping)
    if len(wnids) == 1000 and (wnids[0], wnids[-1]) == ILSVRC2012_FIRST_LAST:
        all_wnids = wnids
    elif subsets and wnids:
        all_wnids = ilsvrc2012_wnids()
        if all_wnids is None or not set(wnids) <= set(all_wnids):
            return None
    else:
        return None
    try:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    except ImportError:
        return None
    if len(IMAGENET_CLASSNAMES) != 1000:
        return None
    names = dict(zip(all_wnids, IMAGENET_CLASSNAMES))
    return {w: names[w] for w in wnids}


def check_unique_names(wnids: Sequence[str], names: Sequence[str], source: str, dataset: str,
                       layout: str) -> None:
    """Two classes whose names match case-insensitively (CLIP's tokenizer lowercases) would
    get identical prompts: one error listing every collision."""
    by_name: dict[str, list[str]] = {}
    for wnid, name in zip(wnids, names):
        by_name.setdefault(name.lower(), []).append(wnid)
    clashes = [f"'{n}' ({', '.join(ws)})" for n, ws in by_name.items() if len(ws) > 1]
    if clashes:
        raise format_error(dataset, f"class names from {source} collide (case-insensitively): "
                                    f"{'; '.join(clashes)}", layout,
                           "set data.names_file to a mapping ('<wnid> <class name>' lines or JSON) "
                           "that gives these classes distinct names")


def check_folder_names(folders: Sequence[str], names: Sequence[str], where: str, dataset: str, layout: str,
                       fix: str) -> None:
    """Class folders whose names match case-insensitively (CLIP's tokenizer lowercases: equal names are
    equal prompts): one error naming the folders (at most 6)."""
    lowered = [n.lower() for n in names]
    clashes = sorted({f for f, n in zip(folders, lowered) if lowered.count(n) > 1})
    if clashes:
        raise format_error(dataset, f"class folders of '{where}' give the same class name: {clashes[:6]}", layout, fix)


def names_for_wnids(wnids: Sequence[str], mapping_files: Sequence[Path], dataset: str,
                    layout: str, user_file: Optional[str], unique: bool = False,
                    root: Optional[Path] = None, clip_subsets: bool = False, origin: str = "",
                    clip_without_file: bool = False) -> list[str]:
    """Class names for `wnids` from the user's mapping file (if given) or the first of
    `mapping_files` that exists; a missing or unreadable file or missing wnids is one clear error.
    A relative user_file is looked for in `root` (data.root), then the working directory.

    Names from a shipped file that lists exactly the 1000 ILSVRC-2012 wnids (LOC_synset_mapping.txt,
    meta.bin) are replaced by CLIP's curated names when open_clip is installed; a user's
    data.names_file is always taken as written. clip_subsets=True: also for a shipped file that lists
    only ILSVRC-2012 wnids (Kaggle's ImageNet-100 Labels.json). origin: where the shipped files come
    from, said when none is there. clip_without_file=True: with none of `mapping_files` there and no user
    file, ILSVRC-2012 wnids get CLIP's curated names all the same (what a shipped 1000-wnid file would have
    given them: ILSVRC-2012 extracted from its train/val tars has no mapping file). unique=True (for
    class-incremental datasets, whose
    classes must get distinct prompts): names colliding case-insensitively are an error (see
    check_unique_names). Off by default for zero-shot evaluation sets, where CLIP's own 1000 ImageNet
    names repeat 'missile' and 'sunglasses'.
    """
    if user_file:
        path = user_data_file(user_file, root, "class-name mapping file", "data.names_file", dataset, layout,
                              ", or unset it to use the mapping shipped with the data")
    else:
        path = first_existing(mapping_files)
        if path is None:
            tried = ", ".join(str(p) for p in mapping_files)
            clip_names = clip_imagenet_names({w: w for w in wnids}, subsets=True) if clip_without_file else None
            if clip_names is None:
                raise format_error(dataset, f"no class-name mapping found (looked for: {tried})", layout,
                                   f"put the mapping file there{f' ({origin})' if origin else ''}, or set "
                                   "data.names_file to a file with lines '<wnid> <class name>'")
            log.info("%s: no class-name mapping file (looked for: %s): CLIP's ImageNet names (open_clip) for the "
                     "%d ILSVRC-2012 wnids", dataset, tried, len(wnids))
            return _names_of(wnids, clip_names, "CLIP's ImageNet names (open_clip)", unique, dataset, layout)
    try:
        mapping = parse_wnid_mapping(path)
    except ValueError as err:
        raise format_error(dataset, f"class-name mapping {err}", layout,
                           "fix the file, or set data.names_file to a file with lines '<wnid> <class name>' "
                           "or JSON {\"<wnid>\": \"<class name>\"}") from err
    source = f"'{path}'"
    if not user_file:
        clip_names = clip_imagenet_names(mapping, subsets=clip_subsets)
        if clip_names is not None:
            mapping, source = clip_names, f"CLIP's ImageNet names (open_clip; wnids from '{path}')"
    if not mapping:
        raise format_error(dataset, f"class-name mapping '{path}' has no line '<wnid> <class name>' (nor "
                                    f"'<index> <wnid> <class name>')", layout,
                           "use a mapping with lines '<wnid> <class name>' via data.names_file")
    missing = [w for w in wnids if w not in mapping]
    if missing:
        raise format_error(dataset, f"class-name mapping '{path}' lacks {len(missing)} of the "
                                    f"{len(wnids)} wnids, e.g. {missing[:5]}", layout,
                           "use a complete mapping (lines '<wnid> <class name>') via data.names_file")
    return _names_of(wnids, mapping, source, unique, dataset, layout)


def _names_of(wnids: Sequence[str], mapping: dict[str, str], source: str, unique: bool, dataset: str,
              layout: str) -> list[str]:
    """The names of `wnids` in `mapping`, distinct case-insensitively where `unique` (check_unique_names)."""
    names = [mapping[w] for w in wnids]
    if unique:
        check_unique_names(wnids, names, source, dataset, layout)
    return names


def stratified_split(targets: Sequence[int], test_fraction: float, seed: int,
                     class_key: Optional[Callable[[int], int]] = None, sample_keys: Optional[Sequence] = None
                     ) -> tuple[list[int], list[int]]:
    """Seeded per-class split of sample indices into (train, test), each sorted.

    For every class, its samples are shuffled with numpy RandomState((seed + label) mod 2^32) and the first
    round(test_fraction * n) (at least 1 when n >= 2) go to test. A class's split depends on its label, so on
    its place among the classes present: a copy holding some of a dataset's classes splits them otherwise
    than the full copy does. (Kept so for ImageNet-R: the runs made with this split check it on --resume and
    evaluate, checkpoint.check_split; seeding by the class's name would have changed every existing run's
    split.) `class_key(label)` replaces the label in the seed (imagefolder: its folder name's crc32), and
    `sample_keys` orders each class's samples before the shuffle (default: their order in `targets`).
    """
    import numpy as np

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    train, test = [], []
    for label, idx in by_class.items():
        if sample_keys is not None:
            idx = sorted(idx, key=lambda i: sample_keys[i])
        key = label if class_key is None else class_key(label)
        # mod 2^32: data.split_seed may be any numpy seed, and seed + label passed numpy's range (an error at load)
        perm = np.random.RandomState((seed + key) % 2 ** 32).permutation(len(idx))
        n_test = int(round(test_fraction * len(idx)))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        else:
            n_test = 0
        test += [idx[j] for j in perm[:n_test]]
        train += [idx[j] for j in perm[n_test:]]
    return sorted(train), sorted(test)


PRESPLIT_TEST_DIRS = ("test", "val")  # beside train/: test wins when both hold class folders


def class_folder_names(folder: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of `folder` (torchvision ImageFolder's classes and order);
    [] when `folder` is not a folder."""
    if not folder.is_dir():
        return []
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


def find_presplit(candidates: Sequence[Path]) -> Optional[tuple[Path, Path]]:
    """(train_dir, test_dir) of the first candidate folder holding train/<class>/ beside test/<class>/ (or
    val/), torchvision ImageFolder's layout, as PROOF's and other CLIP continual-learning repos ship
    CUB-200 and UCF101 (`data/cub/{train,test}/<class>/*.jpg`); None when no candidate does. Folders named
    as ImageNet's wnids are not such a copy (ImageNet's own train/ + val/ in a data root shared with cub/)."""
    for cand in candidates:
        train_classes = class_folder_names(cand / "train")
        if not train_classes or all(WNID_RE.match(c) for c in train_classes):
            continue
        test_dir = next((cand / d for d in PRESPLIT_TEST_DIRS if class_folder_names(cand / d)), None)
        if test_dir is not None:
            return cand / "train", test_dir
    return None


def read_presplit(train_dir: Path, test_dir: Path, classes: Sequence[str], dataset: str, layout: str,
                  entries: Callable[[Path], list[Path]] = list_images,
                  spellings: Callable[[str], Sequence[str]] = lambda c: [c], classes_from: str = "train/'s classes",
                  in_both: Optional[Callable] = None) -> tuple[tuple[list[str], list[int]], tuple[list[str], list[int]]]:
    """((train paths, labels), (test paths, labels)) of a pre-split copy: class c's samples are `entries` of its
    folder in train_dir and in test_dir, label = c's index in `classes`. A class's folder is the first of
    `spellings(c)` present, in any case (UCF101's 'ApplyEyeMakeup' / 'Apply_Eye_Makeup'). A folder that is no
    class's (in train/ or test/; `classes_from` says where the classes come from), a class without a train/
    folder or without training images, and a sample in both splits (the same class and file name: a copy made
    by copying the same files twice; `in_both` may test otherwise) are errors."""
    def folders(split_dir: Path) -> tuple[dict[int, Path], list[str]]:
        present = {name.lower(): name for name in class_folder_names(split_dir)}
        found = {}
        for label, c in enumerate(classes):
            name = next((present[s.lower()] for s in spellings(c) if s.lower() in present), None)
            if name is not None:
                found[label] = split_dir / name
        unmatched = sorted(set(present.values()) - {p.name for p in found.values()})
        return found, unmatched

    split, found_in = [], {}
    for split_dir in (train_dir, test_dir):
        found, unmatched = folders(split_dir)
        if unmatched:
            raise format_error(dataset, f"'{split_dir}' has {len(unmatched)} class folders that are not among "
                                        f"{classes_from}, e.g. {unmatched[:5]}", layout,
                               "keep only the dataset's class folders in train/ and test/ (every test class needs "
                               "its train/<class>/ folder: copy the full split)")
        found_in[split_dir] = found
        paths, targets = [], []
        for label in range(len(classes)):
            samples = entries(found[label]) if label in found else []
            paths += [str(f) for f in samples]
            targets += [label] * len(samples)
        split.append((paths, targets))
    missing = [c for label, c in enumerate(classes) if label not in found_in[train_dir]]
    if missing:
        raise format_error(dataset, f"'{train_dir}' has no folder for {len(missing)} of the {len(classes)} classes, "
                                    f"e.g. {missing[:5]}", layout, "copy the folders of every class")
    have = set(split[0][1])
    empty = [c for label, c in enumerate(classes) if label not in have]
    if empty:
        raise format_error(dataset, f"{len(empty)} class folders of '{train_dir}' hold no images, e.g. {empty[:5]}",
                           layout, "copy the images of every class (or remove the empty folders)")
    both = (in_both or images_in_both)(split[0], split[1])
    if both:
        raise format_error(dataset, f"{len(both)} images are in both '{train_dir}' and '{test_dir}' (the same "
                                    f"{'file' if in_both else '<class>/<file name>'}), e.g. '{both[0]}'", layout,
                           "put each image in one split only")
    return split[0], split[1]


def images_in_both(train: tuple[list[str], list[int]], test: tuple[list[str], list[int]]) -> list[str]:
    """The train paths (sorted) of images that are in test too: the same class (label) and file name, wherever the
    files lie (a split made by copying the same files into train/ and test/ shares no path; class folders may be
    spelled apart)."""
    test_keys = {(label, Path(p).name) for p, label in zip(*test)}
    return sorted(p for p, label in zip(*train) if (label, Path(p).name) in test_keys)


def relative_to_any(path_text: str, bases: Sequence[Path]) -> Optional[Path]:
    """Resolve a path written in a split file against the first base where it exists."""
    p = Path(path_text)
    if p.is_absolute():
        return p if p.exists() else None
    for b in bases:
        if (b / p).exists():
            return b / p
    return None
