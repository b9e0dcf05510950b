"""Training health: a diverging or dead run is said, with its step and the setting to change.

A learning rate a few orders too large does not always give NaN: with gradient clipping and
Adam's normalised steps, LoRA weights can grow to 1e5 while the loss stays finite and the run
"finishes" with useless adapters. :class:`Monitor` watches what a phase logs anyway (loss,
gradient norm, the trainable weights' norm) and:

* stops the run (a one-line :class:`UserError`) when the loss is NaN or infinite;
* warns once when the loss climbs far above where it started, when the trainable weights'
  norm grows far past its initial value, or when the gradient norm has been exactly 0 for
  several log steps in a row (nothing is learning: frozen weights, or a masked-out loss).
"""

from __future__ import annotations

import math

from absl import logging

from ffrag_jax.errors import UserError


class Monitor:
    """Checks one phase's log steps; ``hint`` names the setting to change (``"lower
    train.lr (now 1e+06)"``)."""

    def __init__(self, phase: str, hint: str, *, loss_ratio: float = 3.0,
                 norm_ratio: float = 100.0, zero_grad_checks: int = 3):
        self.phase, self.hint = phase, hint
        self.loss_ratio, self.norm_ratio, self.zero_grad_checks = (loss_ratio, norm_ratio,
                                                                   zero_grad_checks)
        self.first_loss: float | None = None
        self.first_norm: float | None = None
        self.zero_grads = 0
        self.warned: set[str] = set()

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self.warned:
            self.warned.add(kind)
            logging.warning("%s: %s; %s", self.phase, message, self.hint)

    def check(self, step: int, loss: float, grad_norm: float | None = None,
              weight_norm: float | None = None) -> None:
        if not math.isfinite(loss):
            raise UserError(f"{self.phase}: the training loss is {loss} at step {step}: "
                            f"training diverged; {self.hint}")
        if self.first_loss is None:
            self.first_loss = loss
        elif loss > self.loss_ratio * self.first_loss and loss > self.first_loss + 1.0:
            self._warn("loss", f"the loss rose from {self.first_loss:.4g} to {loss:.4g} by "
                               f"step {step} (diverging?)")
        if weight_norm is not None and math.isfinite(weight_norm):
            if self.first_norm is None:
                self.first_norm = weight_norm
            elif weight_norm > self.norm_ratio * max(self.first_norm, 1e-6):
                self._warn("norm", f"the trainable weights' norm grew from "
                                   f"{self.first_norm:.4g} to {weight_norm:.4g} by step {step} "
                                   "(exploding)")
        if grad_norm is not None:
            self.zero_grads = self.zero_grads + 1 if grad_norm == 0.0 else 0
            if self.zero_grads >= self.zero_grad_checks:
                self._warn("zero", f"the gradient norm has been 0 for {self.zero_grads} log "
                                   f"steps (up to step {step}): nothing is learning (frozen "
                                   "weights or no loss tokens?)")
