"""What one training step did, read back once: its loss parts, the finiteness of its loss and LoRA-B
gradients (StepOutcome), fp16 dynamic loss scaling (make_grad_scaler, ScalerSkips), and the errors of a
non-finite step, each naming the term and the settings to change (Trainer.train_step makes the outcomes,
Trainer.train_task reads them).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..config import Config, config_value


class StepOutcome:
    """A training step's loss parts and finiteness, read back once, by `values`.

    values(cfg): {term: float}, or FloatingPointError naming the step and the term (a non-finite
    loss term: `_raise_nonfinite_loss`'s message; finite terms but non-finite gradients: one term's backward
    overflowed).

    On a GPU with `copy_ahead` the parts, the loss and the gradient norm are copied into pinned host
    memory behind the step's kernels (non_blocking) and an event is recorded after them: `values`
    then waits for that event only, i.e. for this step's kernels, not for those queued since. (A
    plain `.item()` would copy in stream order and so wait for the next step too.)"""

    def __init__(self, step: int, t: int, parts: dict, loss: Optional[torch.Tensor], grad_norm: torch.Tensor,
                 copy_ahead: bool = False, scaled: bool = False, any_loss_bad: Optional[torch.Tensor] = None):
        self.step, self.t = step, t
        self.scaled = scaled  # fp16 loss scaling: non-finite gradients under a finite loss are an overflow
        self.overflowed = False  # set by values(): the scaled step overflowed and was skipped
        self.loss = None if loss is None else loss.detach()  # the total loss, on the device (a scalar)
        self._names = list(parts)
        self._grad_norm = grad_norm.detach()
        # torchrun under a scaler: 1.0 where some rank's loss was not finite (ddp.any_rank); None otherwise
        self._any_loss_bad = None if any_loss_bad is None else any_loss_bad.detach().float().reshape(())
        scalars = [v.detach().float().reshape(()) for v in parts.values()]
        if self.loss is not None:
            scalars.append(self.loss.float().reshape(()))
        device = scalars[0].device if scalars else self._grad_norm.device
        if self._any_loss_bad is not None:
            scalars.append(self._any_loss_bad.to(device))
        scalars.append(self._grad_norm.float().reshape(()).to(device))
        packed = torch.stack(scalars)
        self._event = None
        if copy_ahead and packed.is_cuda:
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(packed.device))  # the copy's stream (run.device=cuda:1)
        else:
            self._host = packed
        self._values: Optional[dict] = None
        self.grad_norm_read: Optional[float] = None  # set by values(): a non-finite step's error quotes the one before
        self.skips_in = None  # the fused optimizer whose sticky skip flag this step set (Trainer.train_step)

    def nonfinite(self, gradients: bool = True) -> torch.Tensor:
        """1.0 (fp32 scalar, on the gradients' device) when the loss, or (`gradients`) the gradient norm, is not
        finite."""
        finite = torch.isfinite(self._grad_norm) if gradients else torch.ones((), dtype=torch.bool,
                                                                               device=self._grad_norm.device)
        if self.loss is not None:
            finite = finite & torch.isfinite(self.loss.to(finite.device))
        bad = (~finite).float()
        return bad if self._any_loss_bad is None else torch.maximum(bad, self._any_loss_bad.to(bad.device))

    def overflow(self) -> torch.Tensor:
        """1.0 (fp32 scalar, on the gradients' device) when the gradient norm is not finite."""
        return (~torch.isfinite(self._grad_norm)).float()

    def values(self, cfg: Config) -> dict:
        if self._values is None:
            if self._event is not None:
                self._event.synchronize()  # this step's kernels, and its copy, are done
            read = self._host.tolist()
            values = dict(zip(self._names, read))
            self.grad_norm_read = read[-1]
            loss_ok = self.loss is None or math.isfinite(read[len(self._names)])
            others_ok = self._any_loss_bad is None or read[-2] == 0.0  # every rank's loss finite (torchrun, scaled)
            # (a scaled overflow is skipped, not raised)
            raises = not loss_ok or not others_ok or (not math.isfinite(read[-1]) and not self.scaled)
            if raises and self.skips_in is not None:
                # the error is out: the steps queued after this one were skipped; later ones run again
                self.skips_in.__dict__.pop("_segpcl_nonfinite", None)
            if not loss_ok:
                _raise_nonfinite_loss(read[len(self._names)], values, self.step, self.t, cfg)
            if not others_ok:
                raise _at_step(FloatingPointError(
                    f"another rank's loss was not finite at task {self.t + 1}, step {self.step} (see that rank's "
                    f"error; this rank's terms: {_terms_text(values) or 'none, it had no samples'}); "
                    f"{nonfinite_fixes(list(values), cfg)}"), self.step)
            if not math.isfinite(read[-1]):
                if not self.scaled:
                    _raise_nonfinite_grad(values, self.step, self.t, cfg)
                self.overflowed = True
            self._values = values
            self._host = self._event = self._grad_norm = self.skips_in = None  # nothing kept past the read
        return self._values


# fp16: steps in a row the loss scaler may skip before the run stops. From GradScaler's 2^16 that many halvings
# take the scale to 2^-8: gradients still overflowing there are non-finite, not too large for fp16
MAX_OVERFLOWS_IN_A_ROW = 24
SKIPPED_FRACTION_WARNING = 0.25  # a task whose skipped fp16 steps pass this fraction of its steps is warned about


class ScalerSkips:
    """fp16: the steps of a task whose scaled gradients overflowed, so the loss scaler skipped their update
    and halved its scale: all of them (`total`) and the latest run of them, MAX_OVERFLOWS_IN_A_ROW of which stop
    the run."""

    def __init__(self):
        self.total = self.in_a_row = 0

    def note(self, outcome, parts: dict, step: int, t: int, cfg: Config, scaler: torch.amp.GradScaler) -> None:
        """Count a step whose outcome was read (parts = outcome.values(cfg))."""
        if not (isinstance(outcome, StepOutcome) and outcome.overflowed):
            self.in_a_row = 0
            return
        self.total, self.in_a_row = self.total + 1, self.in_a_row + 1
        if self.in_a_row >= MAX_OVERFLOWS_IN_A_ROW:
            raise_scaled_overflows(parts, step, t, cfg, scaler.get_scale())

    def warning(self, t: int, steps: int) -> Optional[str]:
        """What to say when over SKIPPED_FRACTION_WARNING of the task's `steps` were skipped, else None."""
        if self.total <= SKIPPED_FRACTION_WARNING * steps:
            return None
        return (f"task {t + 1}: {self.total} of its {steps} steps overflowed under fp16 loss scaling and were skipped "
                f"(the scale starts at 65536 each task and halves at each); its update was that much shorter: use "
                f"run.precision=bf16 where the GPU has it, or more steps a task")


def make_grad_scaler(device: torch.device, *precisions: str) -> Optional[torch.amp.GradScaler]:
    """Dynamic loss scaling (torch.amp.GradScaler, its defaults) where a tower trains under fp16 autocast
    (`precisions`: run.precision, run.text_precision; fp16 gradients would underflow its range unscaled); None
    otherwise (fp32, bf16: bf16 has fp32's exponent range). A new one per task, like the optimizer, so a run
    resumed at a task boundary trains as the uninterrupted one (nothing of it is checkpointed); the first steps of
    a task may overflow and be skipped while the scale comes down (results.json: timings.tasks[t].fp16_skipped_steps)."""
    if "fp16" not in precisions:
        return None
    scaler = torch.amp.GradScaler(device.type)
    # its scale made now, on the run's device (GradScaler makes it at the first scale() call): under torchrun a
    # rank whose first batch is empty scales no loss, yet unscales the all-reduced gradients
    scaler.scale(torch.zeros((), device=device))
    return scaler


def loss_nonfinite(loss: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """1.0 (fp32 scalar on `device`) when `loss` is not finite; 0.0 for None (a rank without samples)."""
    if loss is None:
        return torch.zeros((), device=device)
    return (~torch.isfinite(loss.detach().to(device))).float()


def raise_scaled_overflows(values: dict, step: int, t: int, cfg: Config, scale: float) -> None:
    raise _at_step(FloatingPointError(
        f"the LoRA B gradients were not finite in {MAX_OVERFLOWS_IN_A_ROW} steps in a row at task {t + 1}, up to step "
        f"{step}, under fp16 loss scaling (each skipped and the scale halved, to {scale:g} now) while the loss terms "
        f"were finite ({_terms_text(values)}): not an fp16 overflow that scaling fixes; "
        f"{nonfinite_fixes(list(values), cfg)}"), step)


def skips_nonfinite_on_device(optimizer) -> bool:
    """torch's fused SGD: its kernel reads the optimizer's found_inf flag and skips the update itself."""
    return isinstance(optimizer, torch.optim.SGD) and bool(optimizer.defaults.get("fused"))


def total_grad_norm(params: list) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads)
    return torch.nn.utils.clip_grad_norm_(params, float("inf"))


# the settings a loss term's size depends on (besides optim.lr), by the term's key in Learner.loss's parts
TERM_SETTINGS = {"acgd": ("acgd.tau", "acgd.weight"), "gr": ("tsgr.tau", "tsgr.weight")}


def nonfinite_fixes(terms: list, cfg: Config) -> str:
    """'check acgd.tau (now 0.001), acgd.weight (now 5.0); lower optim.lr (now 0.1); ...' for the terms."""
    def now(key):
        return f"{key} (now {config_value(cfg, key):g})"
    settings = [now(key) for term in terms for key in TERM_SETTINGS.get(term, ())]
    fixes = ([f"check {', '.join(settings)}"] if settings else []) + [f"lower {now('optim.lr')}"]
    for key in ("run.precision", "run.text_precision"):
        if config_value(cfg, key) == "fp16":  # bf16 has fp32's range; V100 / T4 have no bf16
            fixes.append(f"use {key}=bf16 (where the GPU has it) or fp32")
        elif config_value(cfg, key) != "fp32":
            fixes.append(f"use {key}=fp32")
    return "; ".join(fixes)


def _raise_nonfinite_grad(values: dict, step: int, t: int, cfg: Config) -> None:
    """Finite loss terms, non-finite LoRA-B gradients: one term's backward overflowed. Without this
    check the NaN weights surface one step later as a NaN L_cls, blaming the wrong term."""
    terms = _terms_text(values) or "no terms on this rank, which had no samples"
    # under torchrun the gradients are all-reduced: another rank's non-finite loss (its own error names
    # the term) reaches this rank's gradients too, and is the likelier cause
    ranks = (torch.distributed.is_available() and torch.distributed.is_initialized()
             and torch.distributed.get_world_size() > 1)
    cause = ("another rank's loss was not finite (see that rank's error), or a term's backward overflowed (very "
             "small temperatures overflow it)" if ranks else
             "a term's backward overflowed (very small temperatures overflow it)")
    raise _at_step(FloatingPointError(f"the LoRA B gradients are not finite at task {t + 1}, step {step} while every "
                                      f"loss term {'on this rank ' if ranks else ''}is ({terms}): {cause}; "
                                      f"{nonfinite_fixes(list(values), cfg)}"), step)


def _raise_nonfinite_loss(loss: float, values: dict, step: int, t: int, cfg: Config) -> None:
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    raise _at_step(FloatingPointError(f"loss is {loss} at task {t + 1}, step {step} (non-finite term(s): "
                                      f"{', '.join('L_' + b.upper() for b in bad) or 'total'}); "
                                      f"{nonfinite_fixes(bad, cfg)}; or check the data for NaN pixels"), step)


def _at_step(error: FloatingPointError, step: int) -> FloatingPointError:
    error.step = step  # Trainer.train_task adds what the step before it read (with_step_before)
    return error


def _terms_text(values: dict) -> str:
    return ", ".join(f"L_{k.upper()}={v:.4g}" for k, v in values.items())


def with_step_before(error: FloatingPointError, candidates: list, cfg: Config) -> FloatingPointError:
    """A non-finite step's error, with the loss terms and gradient norm of the step before it, taken from the
    (step, outcome) `candidates` (None, or an outcome not read yet, is passed over): a finite but huge
    gradient (tsgr.tau=1e-20: L_GR 4.9e15, norm 1.4e18) passes the check and breaks the weights, and the
    next step's terms are all NaN, so the step before is where the cause shows."""
    step = getattr(error, "step", None)
    for candidate in candidates:
        if step is None or candidate is None or candidate[0] != step - 1:
            continue
        outcome = candidate[1]
        # (an fp16 step skipped for an overflow says nothing of the cause: its gradient norm is inf / nan)
        if (isinstance(outcome, StepOutcome) and outcome.grad_norm_read is not None and not outcome.overflowed
                and outcome.values(cfg)):
            error.args = (f"{error.args[0]}; the step before (step {step - 1}): {_terms_text(outcome.values(cfg))}, "
                          f"gradient norm {outcome.grad_norm_read:.3g}",) + error.args[1:]
        break
    return error
