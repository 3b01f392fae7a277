"""Stage 3: class means, drift transfer, dual-path logits, prototype memory (method.md)."""
import math

import pytest
import torch
import torch.nn.functional as F

from segpcl_fast.method import prototypes as P


def test_class_means_hand_example():
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([5, 5, 7, 5])
    means = P.class_means(feats, labels, [7, 5])
    torch.testing.assert_close(means, torch.tensor([[10.0, 0.0], [4 / 3, 2.0]]))
    with pytest.raises(ValueError, match=r"\[9\]"):
        P.class_means(feats, labels, [5, 9])


def test_drift_transfer_moves_prototype_by_weighted_mean_drift():
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    teacher_raw = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    student_raw = torch.tensor([[3.0, 0.0], [1.0, 3.0]])  # drifts d_1 = (1, 0), d_2 = (0, 2)
    moved = P.transfer_prototypes(protos, teacher_raw, student_raw)
    r = 1 / math.sqrt(2)
    # class 0: w = (1, r) -> (1, 0) + (1 * (1, 0) + r * (0, 2)) / (1 + r)
    expected0 = torch.tensor([1 + 1 / (1 + r), 2 * r / (1 + r)])
    # class 1: w = (0, r) -> (0, 1) + (0, 2)
    expected1 = torch.tensor([0.0, 3.0])
    # class 2: cosines -1, -r -> all weights 0 -> unchanged
    torch.testing.assert_close(moved, torch.stack([expected0, expected1, protos[2]]))


def test_uniform_weight_rule_and_unknown_rule():
    protos = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    t, s = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 2.0], [2.0, 1.0]])
    moved = P.transfer_prototypes(protos, t, s, weight_rule="uniform")
    torch.testing.assert_close(moved, protos + torch.tensor([1.0, 1.0]))  # mean drift ((0,2)+(2,0))/2
    with pytest.raises(ValueError, match="relu_cos"):
        P.transfer_prototypes(protos, t, s, weight_rule="softmax")


def test_dual_path_logits_equal_formula():
    g = torch.Generator().manual_seed(0)
    emb, raw = torch.randn(3, 4, generator=g), torch.randn(3, 6, generator=g)
    text, protos = F.normalize(torch.randn(5, 4, generator=g), dim=-1), torch.randn(5, 6, generator=g)
    s, beta = 100.0, 0.5
    got = P.dual_path_logits(emb, raw, text, protos, s, beta)
    for i in range(3):
        for c in range(5):
            want = s * F.cosine_similarity(emb[i], text[c], dim=0) + beta * s * F.cosine_similarity(raw[i], protos[c], dim=0)
            assert math.isclose(float(got[i, c]), float(want), rel_tol=1e-5, abs_tol=1e-4)
    clip_only = P.dual_path_logits(emb, raw, text, protos, s, 0.0)
    torch.testing.assert_close(clip_only, s * F.normalize(emb, dim=-1) @ text.T)


def test_prototype_memory_add_transfer_state():
    mem = P.PrototypeMemory()
    assert len(mem) == 0 and mem.tensor[:0].shape[0] == 0
    mem.add(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    mem.add(torch.tensor([[-1.0, 0.0]]))
    assert len(mem) == 3
    shift = mem.transfer(2, torch.tensor([[2.0, 0.0]]), torch.tensor([[2.0, 1.0]]))
    torch.testing.assert_close(mem.tensor, torch.tensor([[1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]]))
    torch.testing.assert_close(shift, torch.tensor([1.0, 0.0]))  # class 1: weight 0, unchanged
    other = P.PrototypeMemory()
    other.load_state_dict(mem.state_dict())
    assert torch.equal(other.tensor, mem.tensor)
    with pytest.raises(ValueError, match="width"):
        mem.add(torch.zeros(1, 3))


def test_anchors_with_negative_cosine_get_zero_weight():
    """w = max(0, cos): an anchor pointing away from p_c does not pull it (neither way)."""
    protos = torch.tensor([[1.0, 0.0]])
    teacher_raw = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # cos = 1 and -1/sqrt(2)
    drift = torch.tensor([[0.0, 1.0], [5.0, 0.0]])
    torch.testing.assert_close(P.transfer_weights(teacher_raw, protos), torch.tensor([[1.0], [0.0]]))
    moved = P.transfer_prototypes(protos, teacher_raw, teacher_raw + drift)
    torch.testing.assert_close(moved, protos + drift[0])  # the first anchor's drift only
