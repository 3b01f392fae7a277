"""Small helpers shared by the on-disk readers: locating folders, reading metadata files,
class-name mappings. Every failure is a `DatasetFormatError` that names the missing thing
and the expected layout."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .base import DatasetFormatError

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
    if not path.is_dir():
        raise format_error(dataset, f"data root '{path}' does not exist or is not a folder", layout,
                           "point data.root at the folder holding the layout above")
    return path


def first_existing(candidates: Iterable[Path]) -> Optional[Path]:
    for c in candidates:
        if c.exists():
            return c
    return None


def read_lines(path: Path) -> list[str]:
    """Non-empty, stripped lines; '#' comment lines skipped."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name (deterministic)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def wnid_folders(folder: Path) -> list[str]:
    """Sorted names of the ImageNet-style wnid sub-folders (n01440764, ...) of `folder`."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and WNID_RE.match(p.name))


def clean_name(name: str) -> str:
    """'great_white_shark' -> 'great white shark' (underscores to spaces, collapse blanks)."""
    return " ".join(name.replace("_", " ").split())


def parse_wnid_mapping(path: Path) -> dict[str, str]:
    """Read a wnid -> class name file.

    Text formats (one class a line): "n01443537 goldfish" (ImageNet-R README.txt),
    "n01440764 tench, Tinca tinca" (LOC_synset_mapping.txt: the first name is kept).
    Lines that do not start with a wnid are skipped, so a README's prose is fine.
    JSON formats: {"n01440764": "tench"} or torchvision/Keras' {"0": ["n01440764", "tench"]}.
    """
    mapping: dict[str, str] = {}
    if path.suffix.lower() == ".json":
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            return {}
        for key, val in data.items():
            if WNID_RE.match(str(key)):
                name = val[0] if isinstance(val, (list, tuple)) else val
                mapping[str(key)] = clean_name(str(name).split(",")[0])
            elif isinstance(val, (list, tuple)) and len(val) >= 2 and WNID_RE.match(str(val[0])):
                mapping[str(val[0])] = clean_name(str(val[1]).split(",")[0])
        return mapping
    for line in read_lines(path):
        parts = line.split(None, 1)
        if len(parts) == 2 and WNID_RE.match(parts[0]):
            mapping[parts[0]] = clean_name(parts[1].split(",")[0])
    return mapping


def names_for_wnids(wnids: Sequence[str], mapping_files: Sequence[Path], dataset: str,
                    layout: str, user_file: Optional[str]) -> list[str]:
    """Class names for `wnids` from the user's mapping file (if given) or the first of
    `mapping_files` that exists; a missing file or missing wnids is one clear error."""
    if user_file:
        path = Path(user_file).expanduser()
        if not path.is_file():
            raise format_error(dataset, f"class-name mapping file '{path}' (data.names_file) not found",
                               layout, "fix the path, or unset it to use the mapping shipped with the data")
    else:
        path = first_existing(mapping_files)
        if path is None:
            tried = ", ".join(str(p) for p in mapping_files)
            raise format_error(dataset, f"no class-name mapping found (looked for: {tried})", layout,
                               "put the mapping file there, or set data.names_file to a file with lines "
                               "'<wnid> <class name>'")
    mapping = parse_wnid_mapping(path)
    missing = [w for w in wnids if w not in mapping]
    if missing:
        raise format_error(dataset, f"class-name mapping '{path}' lacks {len(missing)} of the "
                                    f"{len(wnids)} wnids, e.g. {missing[:5]}", layout,
                           "use a complete mapping (lines '<wnid> <class name>') via data.names_file")
    return [mapping[w] for w in wnids]


def stratified_split(targets: Sequence[int], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded per-class split of sample indices into (train, test), each sorted.

    For every class, its samples are shuffled with numpy RandomState(seed + label) and the first
    round(test_fraction * n) (at least 1 when n >= 2) go to test. The split of one class does not
    depend on which other classes exist.
    """
    import numpy as np

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    train, test = [], []
    for label, idx in by_class.items():
        perm = np.random.RandomState(seed + label).permutation(len(idx))
        n_test = int(round(test_fraction * len(idx)))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        else:
            n_test = 0
        test += [idx[j] for j in perm[:n_test]]
        train += [idx[j] for j in perm[n_test:]]
    return sorted(train), sorted(test)


def relative_to_any(path_text: str, bases: Sequence[Path]) -> Optional[Path]:
    """Resolve a path written in a split file against the first base where it exists."""
    p = Path(path_text)
    if p.is_absolute():
        return p if p.exists() else None
    for b in bases:
        if (b / p).exists():
            return b / p
    return None
