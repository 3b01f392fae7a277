"""The synthetic world: what tests/test_synthetic_world.py leaves open.

Checks, against synthetic.py's docstrings: every round is its own draw and the world is the same
in a fresh Python process (sha256 tags, not hash()); bad arguments are clear errors; the cached
arrays are read-only; the default counts and the transforms reach the right split; pretraining,
source test and held-out images are disjoint draws; captions use every template and follow the
seed; the held-out set is the sketch style by default; objects are placed around the centre; the
shape masks are the documented geometry and pairwise distinct; `_finish` averages 2x2 blocks
(supersampling), adds noise and clips to 0..255 instead of wrapping around.
A third audit added: the triangle, hexagon, star and heart areas and orientation; dots among the background
patterns; the shifted style's dark rim; the sketch style's hatching; the reference images' own stream.
"""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segpcl_fast.config import DataConfig
from segpcl_fast.data import synthetic as S

ROOT = Path(__file__).resolve().parents[2]


def _digest(images) -> str:
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


def _mean_abs_diff(a, b) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _tag(name):
    return lambda img: (name, img.size)


# ----------------------------------------------------------------------------- draws and determinism

def test_each_round_is_its_own_draw():
    images, targets = S.render_split(0, "source", "test", 2)
    np.testing.assert_array_equal(targets[:100], targets[100:])
    # the same class in round 0 and round 1: a different placement/background, not a copy
    per_class = [_mean_abs_diff(images[c], images[100 + c]) for c in range(100)]
    assert min(per_class) > 3


def test_world_is_the_same_in_a_fresh_process_with_another_hash_seed():
    code = ("import hashlib; from segpcl_fast.data import synthetic as S; "
            "print(hashlib.sha256(S.render_split(0, 'source', 'test', 1)[0].tobytes()).hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.split()[-1]
    assert out == _digest(S.render_split(0, "source", "test", 1)[0])


# ----------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("per_class", [0, -1])
def test_non_positive_per_class_is_refused(per_class):
    with pytest.raises(ValueError, match="per_class"):
        S.render_split(0, "source", "test", per_class)


def test_unknown_domain_is_refused():
    with pytest.raises(ValueError, match="unknown synthetic domain"):
        S.render_split(0, "cartoon", "test", 1)


def test_negative_test_cap_is_refused():
    with pytest.raises(ValueError, match=">= 0"):
        S.build_synthetic_datasets(DataConfig(max_train_per_class=1, max_test_per_class=-1), None, None)


def test_cached_arrays_are_read_only():
    images, targets = S.render_split(0, "source", "test", 1)
    assert not images.flags.writeable and not targets.flags.writeable
    with pytest.raises(ValueError):
        images[0, 0, 0, 0] = 0
    with pytest.raises(ValueError):
        targets[0] = 5


# ----------------------------------------------------------------------------- the builders

def test_default_counts_per_split(monkeypatch):
    # 0 = the default count of *that* split (small stand-ins so nothing big renders)
    monkeypatch.setattr(S, "DEFAULT_TRAIN_PER_CLASS", 2)
    monkeypatch.setattr(S, "DEFAULT_TEST_PER_CLASS", 1)
    train, test = S.build_synthetic_datasets(DataConfig(max_train_per_class=0, max_test_per_class=0), None, None)
    assert (len(train), len(test)) == (200, 100)


def test_transforms_reach_their_split():
    train, test = S.build_synthetic_datasets(DataConfig(max_train_per_class=1, max_test_per_class=1),
                                             _tag("train"), _tag("test"))
    assert train[0][0] == ("train", (32, 32)) and test[0][0] == ("test", (32, 32))
    assert S.build_pretraining_dataset(per_class=1, transform=_tag("pre"))[3][0] == ("pre", (32, 32))
    assert S.build_source_test_dataset(per_class=1, transform=_tag("src"))[3][0] == ("src", (32, 32))
    assert S.build_heldout_dataset(per_class=1, transform=_tag("held"))[3][0] == ("held", (32, 32))


def test_pretraining_test_and_heldout_are_disjoint_draws():
    pre = S.build_pretraining_dataset(per_class=1).images
    src_test = S.build_source_test_dataset(per_class=1).images
    src_held = S.build_heldout_dataset(per_class=1, domain="source").images
    # image i is class i in each: compare the same class across the three sets
    assert _mean_abs_diff(pre, src_test) > 10
    assert _mean_abs_diff(pre, src_held) > 10
    assert _mean_abs_diff(src_test, src_held) > 10


def test_heldout_is_sketch_by_default():
    np.testing.assert_array_equal(S.build_heldout_dataset(seed=0, per_class=1).images,
                                  S.render_split(0, "sketch", "heldout", 1)[0])


def test_captions_use_every_template_and_follow_the_seed():
    def templates(seed):
        ds = S.build_pretraining_dataset(seed=seed, per_class=1)
        out = []
        for cap, t in zip(ds.captions, ds.targets):
            hits = [i for i, tpl in enumerate(S.CAPTION_TEMPLATES) if tpl.format(ds.class_names[t]) == cap]
            assert hits, cap
            out.append(hits[0])
        return out
    seed0 = templates(0)
    assert set(seed0) == set(range(len(S.CAPTION_TEMPLATES)))
    assert seed0 != templates(1)


# ----------------------------------------------------------------------------- rendering

def test_objects_are_placed_around_the_centre():
    images = S.render_split(0, "sketch", "heldout", 2)[0].astype(np.float32).mean(-1)
    paper = np.median(images.reshape(len(images), -1), axis=1)
    ink = images < paper[:, None, None] - 40
    keep = ink.sum((1, 2)) > 20
    ys, xs = np.mgrid[0:S.IMAGE_SIZE, 0:S.IMAGE_SIZE]
    cx = (ink * xs).sum((1, 2))[keep] / ink.sum((1, 2))[keep]
    cy = (ink * ys).sum((1, 2))[keep] / ink.sum((1, 2))[keep]
    centre = (S.IMAGE_SIZE - 1) / 2
    assert keep.sum() > 150
    assert abs(cx.mean() - centre) < 1.2 and abs(cy.mean() - centre) < 1.2
    assert 0.3 < (cx < centre).mean() < 0.7 and 0.3 < (cy < centre).mean() < 0.7


def _masks(size=128):
    x, y = S._grid(size)
    return {name: S._shape_masks(np.full((1,), s), x[None], y[None])[0] for s, name in enumerate(S.SHAPES)}


def test_shape_masks_have_the_documented_geometry():
    m = _masks()
    # fraction of the [-1, 1]^2 square covered, from each shape's definition
    expected = {"circle": np.pi * 0.85 ** 2 / 4, "square": 0.72 ** 2,
                "ring": np.pi * (0.92 ** 2 - 0.52 ** 2) / 4, "cross": (2 * 0.56 * 1.84 - 0.56 ** 2) / 4}
    for name, area in expected.items():
        assert m[name].mean() == pytest.approx(area, abs=0.01), name
    half = m["triangle"].shape[0] // 2
    assert m["triangle"][:half].sum() < m["triangle"][half:].sum()  # tip up (rows run downward)


def test_shape_masks_are_pairwise_distinct():
    m = _masks()
    for i, a in enumerate(S.SHAPES):
        for b in S.SHAPES[i + 1:]:
            iou = (m[a] & m[b]).sum() / (m[a] | m[b]).sum()
            assert iou < 0.95, (a, b, iou)


def test_finish_averages_blocks_adds_noise_and_clips():
    rng = np.random.default_rng(0)
    size = S.IMAGE_SIZE * 2
    checker = ((np.indices((size, size)).sum(0) % 2) * 255.0)[None, ..., None].repeat(3, -1)
    out = S._finish(rng, checker.astype(np.float32), 0.0)
    assert out.shape == (1, S.IMAGE_SIZE, S.IMAGE_SIZE, 3) and out.dtype == np.uint8
    assert np.all(out == 128)  # each 2x2 block is two 0s and two 255s: mean 127.5
    assert np.all(S._finish(rng, np.full((1, size, size, 3), 300.0, np.float32), 0.0) == 255)
    assert np.all(S._finish(rng, np.full((1, size, size, 3), -20.0, np.float32), 0.0) == 0)
    noisy = S._finish(rng, np.full((4, size, size, 3), 128.0, np.float32), 5.0).astype(np.float32)
    assert noisy.std() == pytest.approx(5.0, rel=0.1) and abs(noisy.mean() - 128) < 0.5


# ----------------------------------------------------------------------------- third audit (data + metrics)

def test_polygon_star_and_heart_masks_have_their_areas_and_orientation():
    """The shapes that test_shape_masks_have_the_documented_geometry leaves out, as fractions of [-1, 1]^2:
    a regular n-gon of circumradius R covers (n / 2) R^2 sin(2 pi / n) (triangle R = 1, hexagon R = 0.9); the star
    r <= 0.42 + 0.58 |1 - 2t| covers pi * (0.42^2 + 0.42 * 0.58 + 0.58^2 / 3); the heart (x^2 + y^2 - 1)^3 <= x^2 y^3
    covers 3.662 (integrated in polar coordinates) / 1.25^2 (its scale). The star's tip points up (its top row is the
    grid's first, its lower tips end at v = sin 54 deg), the heart's lobes are up (more of it in the top half)."""
    m = _masks()
    n = m["star"].shape[0]
    expected = {"triangle": 1.5 * np.sin(2 * np.pi / 3) / 4, "hexagon": 3 * 0.9 ** 2 * np.sin(np.pi / 3) / 4,
                "star": np.pi * (0.42 ** 2 + 0.42 * 0.58 + 0.58 ** 2 / 3) / 4, "heart": 3.662 / 1.25 ** 2 / 4}
    for name, area in expected.items():
        assert m[name].mean() == pytest.approx(area, abs=0.01), name
    rows = np.flatnonzero(m["star"].any(1))
    assert rows[0] <= 1 and rows[-1] / n == pytest.approx((1 + np.sin(np.radians(54))) / 2, abs=0.02)
    assert m["heart"][:n // 2].sum() > 1.3 * m["heart"][n // 2:].sum()


def test_background_patterns_include_dots_beside_stripes_and_checkers():
    """_random_pattern draws each of its three kinds: dots (radius 0.3 per unit cell: pi * 0.09 = 28% on) as well as
    stripes and checkers (half on), about a third of the images each."""
    on = S._random_pattern(np.random.default_rng(0), 300, 64, (0.25, 0.7)).mean((1, 2))
    dots = on < 0.38
    assert np.abs(on[dots] - np.pi * 0.09).max() < 0.07 and np.abs(on[~dots] - 0.5).max() < 0.1
    assert 0.2 < dots.mean() < 0.47


def _fixed_placement(monkeypatch):
    """Each object at one seeded place, scale 0.7, unrotated; returns the patched _object_coords (to recompute u, v)."""
    orig = S._object_coords

    def fixed(rng, n, size, scale_range, max_rot):
        return orig(np.random.default_rng(1), n, size, (0.7, 0.7), 0.0)
    monkeypatch.setattr(S, "_object_coords", fixed)
    return fixed


def _regions(fixed, shape_ids, shrink):
    """(rim, core) pixel masks at 32x32: 2x2 blocks wholly in the outline band / wholly inside the shape scaled by
    `shrink`, as the renderers draw them."""
    n, size = len(shape_ids), S.IMAGE_SIZE * 2
    u, v = fixed(None, n, size, None, None)
    mask, inner = S._shape_masks(shape_ids, u, v), S._shape_masks(shape_ids, u / shrink, v / shrink)
    down = lambda m: m.reshape(n, S.IMAGE_SIZE, 2, S.IMAGE_SIZE, 2).all((2, 4))  # noqa: E731
    return down(mask & ~inner), down(inner)


def test_shifted_objects_have_a_dark_rim_around_their_coloured_inside(monkeypatch):
    """The shifted style draws each shape with a dark rim (rim colour 0..60 mixed in by the shift strength) around
    its patterned colour: at full shift, yellow circles are dark on the band outside 0.78 of the shape and bright
    inside it."""
    fixed = _fixed_placement(monkeypatch)
    ids, yellow = np.zeros(20, int), np.full(20, S.COLOUR_NAMES.index("yellow"))
    img = S._render_shifted(np.random.default_rng(0), ids, yellow, strength=1.0).astype(np.float32).mean(-1)
    rim, core = _regions(fixed, ids, 0.78)
    assert img[rim].mean() < 60 and img[core].mean() > img[rim].mean() + 60


def test_sketches_are_hatched_inside_their_outline(monkeypatch):
    """The sketch style fills the inside of the outline with hatching (ink mixed half and half with the paper):
    with black ink, the inside has paper-white and mid-grey pixels, not blank paper."""
    fixed = _fixed_placement(monkeypatch)
    ids, black = np.zeros(20, int), np.full(20, S.COLOUR_NAMES.index("black"))
    img = S._render_sketch(np.random.default_rng(0), ids, black).astype(np.float32).mean(-1)
    rim, core = _regions(fixed, ids, 0.72)
    assert img[rim].mean() < 60  # the outline is ink
    grey = (img[core] > 90) & (img[core] < 170)
    assert 0.15 < grey.mean() < 0.85 and (img[core] > 200).mean() > 0.1


def test_reference_images_are_their_own_draw():
    """build_reference_dataset is the source domain's 'reference' stream: not the held-out source images that
    retention scores (nor pretraining's or the source test set's)."""
    ref = S.build_reference_dataset(seed=0, per_class=1).images
    assert ref.shape == (100, S.IMAGE_SIZE, S.IMAGE_SIZE, 3)
    for other in (S.build_heldout_dataset(seed=0, per_class=1, domain="source"),
                  S.build_source_test_dataset(seed=0, per_class=1), S.build_pretraining_dataset(seed=0, per_class=1)):
        assert _mean_abs_diff(ref, other.images[:100]) > 20
