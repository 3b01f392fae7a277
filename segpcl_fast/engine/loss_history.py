"""A task's loss history on the host: each term's mean per epoch (results.json's loss_per_epoch) and the
check that L_cls did not diverge or collapse over the task (divergence_warning, from the per-step losses
Trainer.train_task already read back).
"""
from __future__ import annotations

import math
import statistics
from typing import Optional


def epoch_means(losses: list[dict], epochs: list[int]) -> list[dict]:
    """[{"epoch": e (1-based), "steps": n, term: mean over the epoch's steps that have it, ...}] from
    the per-step loss parts (floats; {} for a step without images on this rank) and the 0-based epoch
    of each step: n counts every step of the epoch. Under DDP the terms are the main rank's own
    batches (each rank's loss terms are over its slice of the global batch)."""
    if len(losses) != len(epochs):
        raise ValueError(f"epoch_means: {len(losses)} steps' losses but {len(epochs)} epochs")
    by_epoch: dict[int, list[dict]] = {}
    for parts, e in zip(losses, epochs):
        by_epoch.setdefault(e, []).append(parts)
    rows = []
    for e, steps in sorted(by_epoch.items()):
        terms = dict.fromkeys(k for parts in steps for k in parts)  # in the order the steps have them
        rows.append({"epoch": e + 1, "steps": len(steps),
                     **{k: statistics.fmean(float(p[k]) for p in steps if k in p) for k in terms}})
    return rows


MIN_STEPS_FOR_DIVERGENCE = 20  # quarters of >= 5 steps: a variance of 2 steps called noise a divergence


COLLAPSE_FRACTION = 0.95  # a rise that ends at >= this fraction of ln(n): the predictions became near-uniform
LEARNED_FRACTION = 0.8  # a task whose last quarter ended under this fraction of ln(n): the model had learned
STILL = 0.98  # a last quarter at >= this fraction of the first quarter's L_cls: the task did not learn
MIN_STEPS_AT_CHANCE = 8  # quarters of >= 2 steps: under it a task at chance is only its first steps on new classes


def cls_chance_fraction(cls_losses: list, n_classes: int) -> Optional[float]:
    """The mean L_cls of a task's last quarter of steps over chance level ln(n_classes) (None: no steps)."""
    values = [float(v) for v in cls_losses if v is not None]
    if not values or n_classes < 2:
        return None
    return statistics.fmean(values[-max(1, len(values) // 4):]) / math.log(n_classes)


def divergence_warning(cls_losses: list, n_classes: int, t: int, lr: float,
                       learned_before: Optional[float] = None) -> Optional[str]:
    """A message when L_cls rose across task t, beyond its batch-to-batch noise, and ended above
    chance level ln(n_classes) (diverged) or within 5 % under it (collapsed to near-uniform
    predictions), or when a model that had learned (`learned_before`: the lowest cls_chance_fraction of
    the tasks before, under LEARNED_FRACTION) spent task t at chance; else None.

    Finite but diverged runs (weights blown up, predictions worse than uniform guessing) pass
    StepOutcome.values' check; this catches them from the per-step losses already on the host. It compares
    the means of the first and last quarter of the steps and flags a rise only when it is over
    10 % and over twice the standard error of that difference (Welch), so a flat but noisy loss
    (a task the model barely learns, a small last batch per epoch) is not called a divergence.
    A rise that ends at COLLAPSE_FRACTION of ln(n) or more is a collapse: a model that knew the
    classes now spreads its probability evenly (equal logits give exactly ln(n)). Under 20 steps
    (quarters of 5) no rise is flagged: with 10 steps, two unlucky batches at the end of a healthy
    task read as one. A task at chance or above that did not learn (its mean and its last quarter at
    COLLAPSE_FRACTION of ln(n) or more, the last quarter not under STILL x the first's) is flagged
    only after a task that learned, from MIN_STEPS_AT_CHANCE steps: a blow-up in a task's first steps (lr=1:
    L_cls 3.6 -> 12.2, then ln(20) for later tasks) has no rise to see. Under that count the steps are a new
    task's first ones, on classes the model has not trained on, where L_cls is at chance in a healthy run too
    (a review's 1-step task warned "collapsed" and then scored 100 %). An untrained model at chance from its
    first task is not flagged, nor a task that starts confidently wrong (over ln(n)) and falls (the
    world-by-colour preset's tasks 4, 5, 7: 1.38 -> 1.07, 1.12 -> 1.06, 1.24 -> 1.05 of ln(10)).
    """
    values = [float(v) for v in cls_losses if v is not None]
    if not values or n_classes < 2:
        return None
    chance = math.log(n_classes)
    fix = f"lower optim.lr (now {lr:g}) or set optim.grad_clip"
    last_fraction = cls_chance_fraction(values, n_classes)
    first_fraction = statistics.fmean(values[:max(1, len(values) // 4)]) / chance
    mean = statistics.fmean(values)
    if (learned_before is not None and learned_before < LEARNED_FRACTION and len(values) >= MIN_STEPS_AT_CHANCE
            and last_fraction >= COLLAPSE_FRACTION
            and mean >= COLLAPSE_FRACTION * chance and last_fraction >= STILL * first_fraction):
        return (f"task {t + 1}: L_CLS stayed at chance level ln({n_classes}) = {chance:.3f} or above (mean "
                f"{mean:.3f}, last quarter of its steps {last_fraction * chance:.3f}, not under its "
                f"first's) after an earlier task ended at {learned_before:.0%} of its chance level: training "
                f"collapsed (near-uniform predictions) or diverged; {fix}")
    if len(values) < MIN_STEPS_FOR_DIVERGENCE:
        return None
    k = len(values) // 4
    head, tail = values[:k], values[-k:]
    first, last = statistics.fmean(head), statistics.fmean(tail)
    noise = math.sqrt((statistics.variance(head) + statistics.variance(tail)) / k)
    if last <= 1.1 * first or last < COLLAPSE_FRACTION * chance or last - first <= 2.0 * noise:
        return None
    rise = f"task {t + 1}: L_CLS rose from {first:.3f} to {last:.3f} over the task (first and last quarter of its steps)"
    if last <= chance:
        return (f"{rise}, to chance level ln({n_classes}) = {chance:.3f}: training collapsed (near-uniform "
                f"predictions); {fix}")
    return f"{rise}, above chance level ln({n_classes}) = {chance:.3f}: training diverged; {fix}"
