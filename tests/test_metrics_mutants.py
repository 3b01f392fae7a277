"""Metrics: the input checks and edge cases that tests/test_metrics.py leaves open.

Checks, against metrics.py's docstrings and method.md ("Metrics"): the module docstring's worked
example; one task from counts; that a percent outside 0..100 (negative, just above 100, off the
diagonal, in acc_t, in FWT's 'before'), a negative or non-finite count, an empty or non-square
input, and per-task counts or acc_t of the wrong length are each one MetricsError instead of a
silently wrong number; that `summarize` takes a numpy `fwt_before`.
A third audit added: fwt_before longer than T is refused; matrix_to_list writes +-inf as null too.
"""
import numpy as np
import pytest

from segpcl_fast import metrics as M

NAN = float("nan")
MATRIX = [[80, NAN, NAN], [85, 90, NAN], [60, 92, 95]]
ACC = [80.0, 87.5, 85.5]  # count-weighted with test counts [100, 100, 200]
TOTAL = [100, 100, 200]


def _raises(fn, *args, match=None, **kwargs):
    with pytest.raises(M.MetricsError, match=match):
        fn(*args, **kwargs)


# ----------------------------------------------------------------------------- worked examples

def test_module_docstring_example():
    # correct = [[90, -], [80, 70]], 100 images per task:
    # acc = [90, (80 + 70) / 2] = [90, 75]; Avg = 82.5; Last = 75;
    # Forgetting = max(90) - 80 = 10; BWT = 80 - 90 = -10
    correct, total = [[90, NAN], [80, 70]], [100, 100]
    a = M.accuracy_matrix(correct, total)
    np.testing.assert_allclose(a, [[90, NAN], [80, 70]], equal_nan=True)
    acc = M.acc_per_task(correct, total)
    np.testing.assert_allclose(acc, [90.0, 75.0])
    s = M.summarize(a, acc)
    assert s == {"Avg": 82.5, "Last": 75.0, "Forgetting": 10.0, "BWT": -10.0, "FWT": None}


def test_one_task_from_counts():
    a = M.accuracy_matrix([[37]], [50])
    np.testing.assert_allclose(a, [[74.0]])
    np.testing.assert_allclose(M.acc_per_task([[37]], [50]), [74.0])
    np.testing.assert_allclose(M.acc_per_task_from_matrix(a, [50]), [74.0])
    assert M.summarize(a, [74.0]) == {"Avg": 74.0, "Last": 74.0, "Forgetting": None, "BWT": None, "FWT": None}


# ----------------------------------------------------------------------------- percent range

@pytest.mark.parametrize("bad", [
    [[80, NAN], [-5.0, 90]],       # negative
    [[80, NAN], [100.5, 90]],      # just above 100
    [[80, NAN], [150.0, 90]],      # off the diagonal (not only the diagonal is checked)
])
def test_matrix_outside_percent_is_refused(bad):
    _raises(M.summarize, bad, [80.0, 80.0], match="percent")


def test_exactly_0_and_100_are_accepted():
    s = M.summarize([[100.0, NAN], [0.0, 100.0]], [100.0, 50.0])
    assert s["Forgetting"] == 100.0 and s["BWT"] == -100.0


@pytest.mark.parametrize("acc", [[80.0, 150.0], [-1.0, 80.0]])
def test_acc_outside_percent_is_refused(acc):
    _raises(M.summarize, [[80, NAN], [70, 90]], acc, match="percent")


@pytest.mark.parametrize("before", [[None, 150.0], [None, -3.0]])
def test_fwt_before_outside_percent_is_refused(before):
    _raises(M.forward_transfer, before, match="percent")


# ----------------------------------------------------------------------------- counts

def test_negative_count_is_refused():
    _raises(M.accuracy_matrix, [[-1]], [100], match=r"\[0, total")
    _raises(M.acc_per_task, [[10, NAN], [-3, 20]], [100, 100], match=r"\[0, total")


@pytest.mark.parametrize("total", [[100, NAN], [100, np.inf]])
def test_non_finite_task_size_is_refused(total):
    _raises(M.accuracy_matrix, [[10, NAN], [20, 30]], total, match="positive")
    _raises(M.acc_per_task_from_matrix, [[10, NAN], [20, 30]], total, match="positive")


def test_task_sizes_longer_than_T_are_refused():
    _raises(M.acc_per_task_from_matrix, MATRIX, TOTAL + [50], match="length T=3")
    _raises(M.accuracy_matrix, [[80, NAN, NAN], [85, 90, NAN], [60, 92, 190]], TOTAL + [50], match="length T=3")


@pytest.mark.parametrize("correct", [
    [80, 90],                        # 1-D: must not be broadcast into a T x T matrix
    [[80, 1, 2], [85, 90, 3]],       # 2 x 3
])
def test_counts_that_are_not_square_are_refused(correct):
    _raises(M.accuracy_matrix, correct, [100, 100], match="T x T")


# ----------------------------------------------------------------------------- shapes and emptiness

def test_empty_matrix_is_refused_everywhere():
    empty = np.empty((0, 0))
    _raises(M.forgetting, empty, match="non-empty")
    _raises(M.backward_transfer, empty, match="non-empty")
    _raises(M.acc_per_task_from_matrix, empty, [], match="non-empty")
    _raises(M.summarize, empty, [], match="non-empty")


def test_empty_or_non_finite_acc_is_refused():
    _raises(M.last, [])
    _raises(M.average, [])
    _raises(M.average, [80.0, NAN], match="finite")


def test_acc_longer_than_T_is_refused():
    # Last must be acc after the final task of *this* matrix, not an extra trailing entry
    _raises(M.summarize, MATRIX, ACC + [10.0], match="length T=3")


# ----------------------------------------------------------------------------- fwt_before types

def test_summarize_accepts_fwt_before_as_numpy_array():
    s = M.summarize(MATRIX, ACC, fwt_before=np.array([NAN, 30.0, 50.0]))
    assert s["FWT"] == pytest.approx(40.0)


# ----------------------------------------------------------------------------- third audit (data + metrics)

def test_fwt_before_longer_than_T_is_refused():
    """fwt_before has one entry per task: an extra trailing 'before' accuracy (a task this matrix does not have) is
    refused, not averaged into FWT (mean(30, 50, 70) = 50 instead of the run's 40)."""
    _raises(M.summarize, MATRIX, ACC, fwt_before=[NAN, 30.0, 50.0, 70.0], match="fwt_before must have length T=3")


def test_matrix_to_list_writes_every_non_finite_entry_as_null():
    """matrix_to_list is the JSON form: NaN and +-inf both become None (null), so json.dumps never has to write a
    non-standard NaN / Infinity; finite entries stay as floats."""
    import json
    rows = M.matrix_to_list([[50.0, np.inf], [-np.inf, NAN]])
    assert rows == [[50.0, None], [None, None]]
    assert json.dumps(rows, allow_nan=False) == "[[50.0, null], [null, null]]"
