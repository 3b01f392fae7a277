"""The offline synthetic world: 100 compositional classes ("red triangle", "blue ring", ...).

Every image is drawn procedurally from a seed (numpy Generator seeded by a SeedSequence,
never the global RNG), 32x32 RGB uint8, anti-aliased by 2x supersampling.

Classes are colour x shape (10 x 10). Every shape appears in ten colours and every colour on
ten shapes, so classes of different tasks share attributes and the text tower can share
structure across names. Measured (RESULTS.md): this sharing makes later tasks *help* earlier
ones within their own label space; the Forgetting that runs report on this world is the growth
of the label space, not interference (`Forgetting_own` is about 0).

Three domains (styles) of the same classes:
  - "source":  solid shapes on muted, faintly textured backgrounds. Used ONLY to pretrain the tiny CLIP
               (`build_pretraining_dataset`, captions from `CAPTION_TEMPLATES`).
  - "shifted": striped / dotted shapes with a dark rim on cluttered colourful backgrounds,
               tinted light, stronger noise (how much: data.synthetic_shift, default
               SHIFT_STRENGTH). The continual-learning domain (`build_synthetic_datasets`:
               disjoint train/test draws). The pretrained model is
               only partly right on it zero-shot, like CLIP on ImageNet-R.
  - "sketch":  outlines with hatching on paper. Never trained on (`build_heldout_dataset`),
               for retention tests across scenarios.

Generation is vectorised over rounds of 100 images; the whole default world renders in a few
seconds on one core and is cached in memory per (seed, domain, split, count).
"""
from __future__ import annotations

import functools
import hashlib
from typing import Callable, Optional

import numpy as np

from ..config import DataConfig
from .base import ArrayDataset

IMAGE_SIZE = 32
_SUPERSAMPLE = 2

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "crescent", "heart", "hexagon", "arrow")
COLOURS = {
    "red": (215, 35, 35),
    "orange": (240, 135, 25),
    "yellow": (235, 215, 40),
    "green": (45, 160, 60),
    "cyan": (40, 195, 205),
    "blue": (35, 70, 215),
    "purple": (125, 45, 185),
    "pink": (240, 125, 185),
    "brown": (120, 75, 35),
    "black": (20, 20, 20),
}
COLOUR_NAMES = tuple(COLOURS)
NUM_CLASSES = len(SHAPES) * len(COLOUR_NAMES)  # one class per (shape, colour)
_COLOUR_RGB = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)
DOMAINS = ("source", "shifted", "sketch")

# Default images per class (chosen so the default 10-task run fits in minutes on 2 CPU cores).
DEFAULT_TRAIN_PER_CLASS = 40
DEFAULT_TEST_PER_CLASS = 20
DEFAULT_HELDOUT_PER_CLASS = 20
DEFAULT_PRETRAIN_PER_CLASS = 300

# Captions of the source domain used for contrastive pretraining.
CAPTION_TEMPLATES = (
    "a good photo of a {}.",
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
    "a rendering of a {}.",
    "a {}.",
    "the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
    "a close-up photo of a {}.",
    "there is a {} in the picture.",
)


def class_names() -> list[str]:
    """The 100 class names; index = colour_index * 10 + shape_index ("red circle" is 0)."""
    return [f"{colour} {shape}" for colour in COLOUR_NAMES for shape in SHAPES]


def _rng(seed: int, domain: str, split: str, round_index: int = 0) -> np.random.Generator:
    """An independent stream per (seed, domain, split, round); stable across Python runs."""
    tag = int.from_bytes(hashlib.sha256(f"{domain}/{split}".encode()).digest()[:4], "little")
    return np.random.default_rng(np.random.SeedSequence([int(seed), tag, int(round_index)]))


# ----------------------------------------------------------------------------- shapes

def _regular_polygon(u, v, n: int, radius: float, phase: float):
    inside = np.ones(u.shape, dtype=bool)
    apothem = radius * np.cos(np.pi / n)
    for k in range(n):
        a = phase + 2 * np.pi * k / n
        inside &= (u * np.cos(a) + v * np.sin(a)) <= apothem
    return inside


def _star(u, v):
    r = np.hypot(u, v)
    phi = np.arctan2(v, u) + np.pi / 2  # a tip points up
    sector = 2 * np.pi / 5
    t = np.mod(phi, sector) / sector
    return r <= 0.42 + 0.58 * np.abs(1 - 2 * t)


def _heart(u, v):
    x = u * 1.25
    y = -v * 1.25 + 0.15
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0


def _arrow(u, v):
    shaft = (np.abs(v) <= 0.22) & (u >= -0.9) & (u <= 0.15)
    head = (u >= 0.05) & (u <= 0.95) & (np.abs(v) <= (0.95 - u) * 0.85)
    return shaft | head


_SHAPE_MASKS: dict[str, Callable] = {
    "circle": lambda u, v: u * u + v * v <= 0.85 ** 2,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.72,
    "triangle": lambda u, v: _regular_polygon(u, v, 3, 1.0, np.pi / 2),
    "star": _star,
    "cross": lambda u, v: ((np.abs(u) <= 0.28) & (np.abs(v) <= 0.92)) | ((np.abs(v) <= 0.28) & (np.abs(u) <= 0.92)),
    "ring": lambda u, v: (u * u + v * v <= 0.92 ** 2) & (u * u + v * v >= 0.52 ** 2),
    "crescent": lambda u, v: (u * u + v * v <= 0.9 ** 2) & ((u - 0.45) ** 2 + (v + 0.1) ** 2 >= 0.68 ** 2),
    "heart": _heart,
    "hexagon": lambda u, v: _regular_polygon(u, v, 6, 0.9, 0.0),
    "arrow": _arrow,
}


def _shape_masks(shape_ids: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    out = np.zeros(u.shape, dtype=bool)
    for s, name in enumerate(SHAPES):
        sel = shape_ids == s
        if sel.any():
            out[sel] = _SHAPE_MASKS[name](u[sel], v[sel])
    return out


# ----------------------------------------------------------------------------- rendering

def _grid(size: int):
    lin = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return np.meshgrid(lin, lin, indexing="xy")  # x (columns), y (rows, downward)


def _object_coords(rng, n: int, size: int, scale_range, max_rot: float):
    """Per-image affine placement -> object coordinates (u, v) of shape (n, size, size)."""
    x, y = _grid(size)
    scale = rng.uniform(*scale_range, size=n).astype(np.float32)
    margin = 0.95 - scale
    cx = (rng.uniform(-1, 1, size=n) * margin).astype(np.float32)
    cy = (rng.uniform(-1, 1, size=n) * margin).astype(np.float32)
    rot = rng.uniform(-max_rot, max_rot, size=n).astype(np.float32)
    c, s = np.cos(rot)[:, None, None], np.sin(rot)[:, None, None]
    dx = x[None] - cx[:, None, None]
    dy = y[None] - cy[:, None, None]
    sc = scale[:, None, None]
    return (dx * c + dy * s) / sc, (-dx * s + dy * c) / sc


def _jittered_colours(rng, colour_ids: np.ndarray, jitter: float) -> np.ndarray:
    base = _COLOUR_RGB[colour_ids]
    return np.clip(base + rng.normal(0, jitter, size=base.shape), 0, 255).astype(np.float32)


def _pattern(kind: str, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
    if kind == "stripes":
        return np.mod(fx, 1.0) < 0.5
    if kind == "checker":
        return (np.floor(fx) + np.floor(fy)) % 2 == 0
    return (np.mod(fx, 1.0) - 0.5) ** 2 + (np.mod(fy, 1.0) - 0.5) ** 2 < 0.09  # dots


def _random_pattern(rng, n: int, size: int, period_range, kinds=("stripes", "checker", "dots")):
    """A {0,1} pattern per image: stripes at a random angle, a checkerboard, or dots."""
    x, y = _grid(size)
    kind = rng.integers(0, len(kinds), size=n)
    period = rng.uniform(*period_range, size=n).astype(np.float32)[:, None, None]
    angle = rng.uniform(0, np.pi, size=n).astype(np.float32)[:, None, None]
    offset = rng.uniform(0, 1, size=(n, 2)).astype(np.float32)
    cos, sin = np.cos(angle), np.sin(angle)
    out = np.empty((n, size, size), dtype=bool)
    for k, name in enumerate(kinds):
        sel = kind == k
        fx = (x[None] * cos[sel] + y[None] * sin[sel]) / period[sel] + offset[sel, 0, None, None]
        fy = (-x[None] * sin[sel] + y[None] * cos[sel]) / period[sel] + offset[sel, 1, None, None]
        out[sel] = _pattern(name, fx, fy)
    return out


def _downsample(img: np.ndarray) -> np.ndarray:
    n, h, w, c = img.shape
    f = _SUPERSAMPLE
    return img.reshape(n, h // f, f, w // f, f, c).mean(axis=(2, 4))


def _finish(rng, img: np.ndarray, noise: float) -> np.ndarray:
    img = _downsample(img)
    img += noise * rng.standard_normal(size=img.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _muted_background(rng, n: int, size: int, saturation: float, texture_contrast: float, period_range):
    """Two colours between a grey level and random RGB (by `saturation`), in a random pattern."""
    grey = rng.uniform(70, 190, size=(n, 1, 1, 1)).astype(np.float32)
    bg_a = grey + saturation * (rng.uniform(0, 255, size=(n, 1, 1, 3)).astype(np.float32) - grey)
    bg_b = grey + saturation * (rng.uniform(0, 255, size=(n, 1, 1, 3)).astype(np.float32) - grey)
    bg_b = bg_a + texture_contrast * (bg_b - bg_a)
    pattern = _random_pattern(rng, n, size, period_range)[..., None]
    return np.where(pattern, bg_a, bg_b)


def _render_source(rng, shape_ids, colour_ids):
    """Solid shapes on muted, faintly textured backgrounds."""
    n, size = len(shape_ids), IMAGE_SIZE * _SUPERSAMPLE
    u, v = _object_coords(rng, n, size, (0.45, 0.75), 0.35)
    mask = _shape_masks(shape_ids, u, v)[..., None]
    fg = _jittered_colours(rng, colour_ids, 14)[:, None, None, :]
    background = _muted_background(rng, n, size, 0.3, 0.25, (0.25, 0.7))
    return _finish(rng, np.where(mask, fg, background), 5.0)


# How far the continual-learning domain is from the source (0 = source-like, 1 = full shift):
# data.synthetic_shift's default, which config.py holds (0.35, tuned so that the pretrained tiny
# CLIP is partly right zero-shot; see RESULTS.md).
SHIFT_STRENGTH = DataConfig().synthetic_shift


def _render_shifted(rng, shape_ids, colour_ids, strength: float = None):
    """Patterned shapes with a dark rim on colourful cluttered backgrounds, tinted, noisier."""
    strength = SHIFT_STRENGTH if strength is None else float(strength)
    n, size = len(shape_ids), IMAGE_SIZE * _SUPERSAMPLE
    u, v = _object_coords(rng, n, size, (0.4, 0.72), 0.6)
    mask = _shape_masks(shape_ids, u, v)[..., None]
    inner = _shape_masks(shape_ids, u / 0.78, v / 0.78)[..., None]
    # background: two colours in a pattern (clutter that can share the object's colour)
    background = _muted_background(rng, n, size, 0.3 + 0.7 * strength, 0.25 + 0.75 * strength, (0.25, 0.7))
    # object: its colour and a lighter/darker variant in a fine pattern, with a dark rim
    fg = _jittered_colours(rng, colour_ids, 14 + 10 * strength)[:, None, None, :]
    shade = 1 - strength * rng.uniform(0.2, 0.55, size=(n, 1, 1, 1)).astype(np.float32)
    lighten = rng.random(size=(n, 1, 1, 1)) < 0.5
    fg_alt = np.where(lighten, fg + (255 - fg) * (1 - shade), fg * shade)
    obj = np.where(_random_pattern(rng, n, size, (0.12, 0.3))[..., None], fg, fg_alt)
    rim_colour = rng.uniform(0, 60, size=(n, 1, 1, 1)).astype(np.float32)
    obj = np.where(inner, obj, obj + strength * (rim_colour - obj))
    img = np.where(mask, obj, background)
    # global tint (a different "camera")
    img = img * (1 + strength * rng.uniform(-0.25, 0.25, size=(n, 1, 1, 3)).astype(np.float32))
    return _finish(rng, img, 5.0 + 9.0 * strength)


def _render_sketch(rng, shape_ids, colour_ids):
    n, size = len(shape_ids), IMAGE_SIZE * _SUPERSAMPLE
    u, v = _object_coords(rng, n, size, (0.45, 0.75), 0.5)
    mask = _shape_masks(shape_ids, u, v)
    inner = _shape_masks(shape_ids, u / 0.72, v / 0.72)
    outline = (mask & ~inner)[..., None]
    hatch = (_random_pattern(rng, n, size, (0.1, 0.2), kinds=("stripes",)) & inner)[..., None]
    paper = rng.uniform(215, 250, size=(n, 1, 1, 1)).astype(np.float32) + np.zeros((1, 1, 1, 3), np.float32)
    ink = _jittered_colours(rng, colour_ids, 18)[:, None, None, :]
    img = np.where(outline, ink, np.where(hatch, 0.5 * ink + 0.5 * paper, paper))
    return _finish(rng, img, 8.0)


_RENDERERS = {"source": _render_source, "shifted": _render_shifted, "sketch": _render_sketch}


@functools.lru_cache(maxsize=16)
def render_split(seed: int, domain: str, split: str, per_class: int, shift: Optional[float] = None):
    """Render `per_class` images of each of the 100 classes -> (images uint8 (N,32,32,3), targets int64 (N,)).

    Rendered in rounds of one image per class (class 0..99), each round from its own seeded
    stream, so a smaller `per_class` gives exactly the first rounds of a larger one.
    `shift` (shifted domain only; None = SHIFT_STRENGTH) is the style distance from the source.
    Cached in memory; the returned arrays are read-only.
    """
    if domain not in _RENDERERS:
        raise ValueError(f"unknown synthetic domain '{domain}'; choose one of {DOMAINS}")
    if per_class <= 0:
        raise ValueError(f"per_class must be a positive number of images, got {per_class}")
    if shift is not None and domain != "shifted":
        raise ValueError(f"shift applies to the 'shifted' domain only, not '{domain}'")
    if shift is not None and not 0.0 <= float(shift) <= 1.0:
        raise ValueError(f"data.synthetic_shift must be in [0, 1] (0 = source-like style), got {shift}")
    render = _RENDERERS[domain]
    if shift is not None:
        render = functools.partial(_render_shifted, strength=float(shift))
    one_round = np.arange(NUM_CLASSES)
    shape_ids, colour_ids = one_round % len(SHAPES), one_round // len(SHAPES)
    targets = np.tile(one_round, per_class)
    images = np.empty((len(targets), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for r in range(per_class):
        rng = _rng(seed, domain, split, r)
        images[r * NUM_CLASSES:(r + 1) * NUM_CLASSES] = render(rng, shape_ids, colour_ids)
    images.setflags(write=False)
    targets.setflags(write=False)
    return images, targets


def _dataset(seed, domain, split, per_class, transform, shift=None) -> ArrayDataset:
    images, targets = render_split(int(seed), domain, split, int(per_class), shift)
    return ArrayDataset(images, targets.tolist(), class_names(), transform)


def build_synthetic_datasets(data_cfg, train_transform: Optional[Callable] = None,
                             test_transform: Optional[Callable] = None):
    """The continual-learning splits (shifted domain) -> (train_ds, test_ds), both ArrayDataset.

    Honours data_cfg.synthetic_seed, synthetic_shift, max_train_per_class and max_test_per_class (0 = default
    counts: DEFAULT_TRAIN_PER_CLASS / DEFAULT_TEST_PER_CLASS). A count k gives the first k
    images per class of any larger count (a value above the default renders more).
    """
    seed = int(getattr(data_cfg, "synthetic_seed", 0))
    shift = float(getattr(data_cfg, "synthetic_shift", SHIFT_STRENGTH))
    shift = None if shift == SHIFT_STRENGTH else shift  # one cache entry for the default world
    n_train = int(getattr(data_cfg, "max_train_per_class", 0) or 0)
    n_test = int(getattr(data_cfg, "max_test_per_class", 0) or 0)
    if n_train < 0 or n_test < 0:
        raise ValueError("data.max_train_per_class / data.max_test_per_class must be >= 0 (0 = default count)")
    train = _dataset(seed, "shifted", "train", n_train or DEFAULT_TRAIN_PER_CLASS, train_transform, shift)
    test = _dataset(seed, "shifted", "test", n_test or DEFAULT_TEST_PER_CLASS, test_transform, shift)
    return train, test


def build_pretraining_dataset(seed: int = 0, per_class: int = DEFAULT_PRETRAIN_PER_CLASS,
                              transform: Optional[Callable] = None) -> ArrayDataset:
    """The source domain with one caption per image (`.captions`), for pretraining the tiny CLIP."""
    ds = _dataset(seed, "source", "pretrain", per_class, transform)
    rng = _rng(seed, "source", "captions")
    which = rng.integers(0, len(CAPTION_TEMPLATES), size=len(ds))
    ds.captions = [CAPTION_TEMPLATES[w].format(ds.class_names[t]) for w, t in zip(which, ds.targets)]
    return ds


def build_source_test_dataset(seed: int = 0, per_class: int = DEFAULT_TEST_PER_CLASS,
                              transform: Optional[Callable] = None) -> ArrayDataset:
    """Fresh source-domain images (disjoint draw from pretraining), to measure in-domain accuracy."""
    return _dataset(seed, "source", "test", per_class, transform)


def build_heldout_dataset(seed: int = 0, per_class: int = DEFAULT_HELDOUT_PER_CLASS,
                          transform: Optional[Callable] = None, domain: str = "sketch") -> ArrayDataset:
    """Images never used for training (sketch style by default), for retention tests across scenarios."""
    if domain == "shifted":
        raise ValueError("the held-out set must not be the continual-learning domain; use 'sketch' or 'source'")
    return _dataset(seed, domain, "heldout", per_class, transform)


def build_reference_dataset(seed: int = 0, per_class: int = 5, transform: Optional[Callable] = None) -> ArrayDataset:
    """Source-domain images of their own stream (split "reference"): the offline stand-in for a
    ZSCL-style reference folder. Not the held-out set, which retention scores: distilling on the
    images a retention score is measured on would flatter it."""
    return _dataset(seed, "source", "reference", per_class, transform)
