"""Metrics against method.md's definitions: hand-computed 3x3 case, a literal 1-based reference
on random matrices, and the edge cases (T = 1, bad input)."""
import math

import numpy as np
import pytest

from segpcl_fast import metrics as M

NAN = float("nan")

# Hand-computed example, T = 3, test counts n = [100, 100, 200] (1-based tasks in comments).
#   a = [[80,  -,  -],
#        [85, 90,  -],      task 1 *improves* after task 2 (so max_t a[t][1] = 85, not a[1][1])
#        [60, 92, 95]]      task 2 improves after task 3 (negative forgetting for j = 2)
# acc_1 = 80
# acc_2 = (85 + 90) / 200 * 100 = 87.5
# acc_3 = (60 + 92 + 190) / 400 * 100 = 85.5        (row mean would be 82.33: weighting matters)
# Avg = (80 + 87.5 + 85.5) / 3 = 84.333...
# Forgetting = mean(max(80, 85) - 60, max(90) - 92) = mean(25, -2) = 11.5
#              (a max that wrongly includes t = T would give mean(25, 0) = 12.5)
# BWT = mean(60 - 80, 92 - 90) = mean(-20, 2) = -9
# FWT with before = [-, 30, 50]: mean(30, 50) = 40
CORRECT = [[80, NAN, NAN], [85, 90, NAN], [60, 92, 190]]
TOTAL = [100, 100, 200]
MATRIX = [[80, NAN, NAN], [85, 90, NAN], [60, 92, 95]]


def test_matrix_and_acc_from_counts():
    a = M.accuracy_matrix(CORRECT, TOTAL)
    np.testing.assert_allclose(a, MATRIX, equal_nan=True)
    assert np.isnan(a[0, 1]) and np.isnan(a[0, 2]) and np.isnan(a[1, 2])
    np.testing.assert_allclose(M.acc_per_task(CORRECT, TOTAL), [80.0, 87.5, 85.5])
    np.testing.assert_allclose(M.acc_per_task_from_matrix(MATRIX, TOTAL), [80.0, 87.5, 85.5])


def test_upper_triangle_of_counts_is_ignored():
    junk = [[80, 5, 7], [85, 90, 3], [60, 92, 190]]
    np.testing.assert_allclose(M.accuracy_matrix(junk, TOTAL), MATRIX, equal_nan=True)
    np.testing.assert_allclose(M.acc_per_task(junk, TOTAL), [80.0, 87.5, 85.5])


def test_hand_computed_summary():
    s = M.summarize(MATRIX, [80.0, 87.5, 85.5], fwt_before=[NAN, 30.0, 50.0])
    assert s["Avg"] == pytest.approx(253.0 / 3)
    assert s["Last"] == pytest.approx(85.5)
    assert s["Forgetting"] == pytest.approx(11.5)
    assert s["BWT"] == pytest.approx(-9.0)
    assert s["FWT"] == pytest.approx(40.0)
    assert list(s) == list(M.METRIC_NAMES)
    assert all(isinstance(v, float) for v in s.values())


def test_forgetting_own_space_hand_computed():
    # own[t][j]: task j among C_<=j. Diagonal as MATRIX; task 1 among its own classes 80 -> 85 -> 78,
    # task 2 among C_<=2: 90 -> 94. Forgetting_own = mean(max(80, 85) - 78, 90 - 94) = mean(7, -4) = 1.5
    own = [[80, NAN, NAN], [85, 90, NAN], [78, 94, 95]]
    assert M.forgetting_own_space(own) == pytest.approx(1.5)
    s = M.summarize(MATRIX, [80.0, 87.5, 85.5], matrix_own=own)
    assert s["Forgetting"] == pytest.approx(11.5) and s["Forgetting_own"] == pytest.approx(1.5)
    assert "Forgetting_own" not in M.summarize(MATRIX, [80.0, 87.5, 85.5])
    assert M.forgetting_own_space([[50.0]]) is None


def _reference(a, n, before):
    """method.md written literally with 1-based indices."""
    T = len(a)
    A = lambda t, j: a[t - 1][j - 1]  # noqa: E731
    acc = [sum(A(t, j) * n[j - 1] for j in range(1, t + 1)) / sum(n[:t]) for t in range(1, T + 1)]
    f = sum(max(A(t, j) for t in range(j, T)) - A(T, j) for j in range(1, T)) / (T - 1)
    bwt = sum(A(T, j) - A(j, j) for j in range(1, T)) / (T - 1)
    fwt = sum(before[j - 1] for j in range(2, T + 1)) / (T - 1)
    return dict(Avg=sum(acc) / T, Last=acc[-1], Forgetting=f, BWT=bwt, FWT=fwt), acc


@pytest.mark.parametrize("T", [2, 4, 7, 10])
def test_random_against_literal_reference(T):
    rng = np.random.default_rng(T)
    n = rng.integers(1, 60, size=T)
    correct = np.full((T, T), np.nan)
    for t in range(T):
        for j in range(t + 1):
            correct[t, j] = rng.integers(0, n[j] + 1)
    before = list(rng.uniform(0, 100, size=T))
    a = M.accuracy_matrix(correct, n)
    acc = M.acc_per_task(correct, n)
    want, want_acc = _reference(a.tolist(), n.tolist(), before)
    np.testing.assert_allclose(acc, want_acc)
    got = M.summarize(a, acc, fwt_before=before)
    for k in M.METRIC_NAMES:
        assert got[k] == pytest.approx(want[k]), k


def test_single_task_undefined_metrics_are_none():
    s = M.summarize([[70.0]], [70.0], fwt_before=[NAN])
    assert s == {"Avg": 70.0, "Last": 70.0, "Forgetting": None, "BWT": None, "FWT": None}
    assert M.forgetting([[70.0]]) is None and M.backward_transfer([[70.0]]) is None
    assert M.forward_transfer([None]) is None


def test_fwt_none_when_not_measured_and_first_entry_ignored():
    assert M.summarize(MATRIX, [80.0, 87.5, 85.5])["FWT"] is None
    assert M.forward_transfer([99.0, 30.0, 50.0]) == pytest.approx(40.0)
    assert M.forward_transfer([None, 30.0, 50.0]) == pytest.approx(40.0)


def test_no_forgetting_when_accuracy_is_kept():
    a = [[50, NAN], [50, 70]]
    assert M.forgetting(a) == 0.0 and M.backward_transfer(a) == 0.0


@pytest.mark.parametrize("bad, msg", [
    ([[80, NAN], [NAN, 90]], "non-finite"),
    ([[80, NAN, NAN], [70, 90, NAN]], "T x T"),
    ([[0.8, NAN], [0.7, 1.5e2]], "percent"),
])
def test_bad_matrix_is_one_clear_error(bad, msg):
    with pytest.raises(M.MetricsError, match=msg):
        M.summarize(bad, [80.0, 80.0])


def test_bad_counts_and_lengths():
    with pytest.raises(M.MetricsError, match="length T=3"):
        M.accuracy_matrix(CORRECT, [100, 100])
    with pytest.raises(M.MetricsError, match="positive"):
        M.accuracy_matrix(CORRECT, [100, 0, 200])
    with pytest.raises(M.MetricsError, match=r"\[0, total"):
        M.accuracy_matrix([[101]], [100])
    with pytest.raises(M.MetricsError, match="length T=3"):
        M.summarize(MATRIX, [80.0, 87.5])
    with pytest.raises(M.MetricsError, match="fwt_before"):
        M.summarize(MATRIX, [80.0, 87.5, 85.5], fwt_before=[30.0, 50.0])
    with pytest.raises(M.MetricsError, match="finite"):
        M.forward_transfer([None, None, 50.0])
    with pytest.raises(M.MetricsError):
        M.percent(3, 0)


def test_matrix_list_round_trip():
    rows = M.matrix_to_list(MATRIX)
    assert rows[0][1] is None and rows[2][2] == 95.0
    np.testing.assert_array_equal(M.matrix_from_list(rows), np.array(MATRIX))
    assert math.isclose(M.percent(1, 4), 25.0)


def test_acc_per_task_must_lie_within_its_matrix_row():
    """acc_t is the image-weighted mean of a[t][0..t]: a value outside the row is another quantity
    (fractions against percent, another run's curve), refused instead of averaged."""
    a = np.array([[90.0, np.nan], [70.0, 80.0]])
    assert M.summarize(a, [90.0, 76.0])["Avg"] == pytest.approx(83.0)
    with pytest.raises(M.MetricsError, match=r"acc per task \[1\] = 10 lies outside row 1 of the accuracy matrix \(\[70, 80\]\)"):
        M.summarize(a, [90.0, 10.0])
    with pytest.raises(M.MetricsError, match="outside row 0"):
        M.summarize(a / 100, [90.0, 76.0])
