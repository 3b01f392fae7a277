"""JSD and the boundary/core split: hand-checkable cases and a peer (scipy)."""
import math

import numpy as np
import pytest
import torch

from segpcl_fast.analysis.fragility import boundary_scores, jensen_shannon, resolve_threshold, split_boundary_core
from segpcl_fast.config import ConfigError


def _random_dists(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(n, k, generator=g), dim=-1)


def test_jsd_of_identical_distributions_is_zero():
    p = _random_dists(16, 7, 0)
    assert torch.allclose(jensen_shannon(p, p), torch.zeros(16), atol=1e-7)


def test_jsd_is_symmetric_and_bounded_by_ln2():
    p, q = _random_dists(64, 5, 1), _random_dists(64, 5, 2)
    a, b = jensen_shannon(p, q), jensen_shannon(q, p)
    assert torch.allclose(a, b, atol=1e-7)
    assert bool((a > 0).all()) and bool((a <= math.log(2) + 1e-7).all())
    # disjoint supports reach the bound exactly
    onehot_p, onehot_q = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.5, 0.5]])
    assert jensen_shannon(onehot_p, onehot_q).item() == pytest.approx(math.log(2), abs=1e-6)


def test_jsd_hand_computed_value():
    # p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4)
    # KL(p||m) = ln(4/3); KL(q||m) = 1/2 ln(2/3) + 1/2 ln(2) ; JS = mean of the two
    expected = 0.5 * (math.log(4 / 3) + 0.5 * math.log(2 / 3) + 0.5 * math.log(2))
    got = jensen_shannon(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])).item()
    assert got == pytest.approx(expected, abs=1e-6)


def test_jsd_matches_scipy():
    from scipy.spatial.distance import jensenshannon
    p, q = _random_dists(32, 9, 3), _random_dists(32, 9, 4)
    ref = np.array([jensenshannon(a, b) ** 2 for a, b in zip(p.numpy(), q.numpy())])  # distance^2 = divergence
    assert np.allclose(jensen_shannon(p, q).numpy(), ref, atol=1e-6)


def test_jsd_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        jensen_shannon(torch.ones(2, 3) / 3, torch.ones(2, 4) / 4)


def test_boundary_core_split_on_a_constructed_case():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.6])
    mask, thr = split_boundary_core(scores)  # median of 6 values = (0.5 + 0.6) / 2
    assert thr == pytest.approx(0.55)
    assert mask.tolist() == [False, True, False, True, False, True]
    mask, thr = split_boundary_core(scores, "quantile:0.8")
    assert thr == pytest.approx(np.quantile(scores.numpy(), 0.8)) and mask.tolist() == [False, True] + [False] * 4
    mask, thr = split_boundary_core(scores, 0.5)  # ties go to core
    assert thr == 0.5 and mask.tolist() == [False, True, False, True, False, True]
    mask, _ = split_boundary_core(scores, "0.65")
    assert mask.tolist() == [False, True, False, True, False, False]


@pytest.mark.parametrize("bad", ["mean", "quantile:1.5", "quantile:x", True])
def test_bad_threshold_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="threshold"):
        resolve_threshold(torch.tensor([0.1, 0.2]), bad)


def test_boundary_scores_pick_the_nearest_new_class():
    # 2 old classes (rows 0, 1), 2 new classes (rows 2, 3) in 3-D
    text = torch.eye(4)[:, :3].clone()
    text[3] = torch.tensor([0.0, 0.6, 0.8])
    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0]]), dim=-1)
    s = boundary_scores(img, text, n_old=2, kind="text_sim")
    expected = (img @ text[2:].T).max(dim=1).values
    assert torch.allclose(s, expected)
    # image 0 sits on old class 0 (far from new), image 1 on new class 2: the split puts image 1 at the boundary
    assert s[1] > s[0]
    m = boundary_scores(img, text, n_old=2, kind="margin")
    assert torch.allclose(m, expected - (img @ text[:2].T).max(dim=1).values)
    with pytest.raises(ConfigError, match="unknown fragility score"):
        boundary_scores(img, text, 2, "entropy")
