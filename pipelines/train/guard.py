"""The divergence guard: a non-finite loss or gradient, or a loss spike, stops a run before its optimizer steps."""

from __future__ import annotations

import math
import statistics
from collections import deque

from pipelines.errors import Diverged

WINDOW = 100  # the recent steps whose median loss a spike is measured against
MIN_STEPS = 10  # steps of history before a spike is judged


class Guard:
    """Checks each step's loss and gradient norm before the optimizer applies it.

    Args:
        max_loss_ratio: a loss above this many times the median of the recent steps is a spike (None: not checked;
            non-finite values always are).
    """

    def __init__(self, max_loss_ratio: float | None) -> None:
        self.ratio = max_loss_ratio
        self.recent: deque[float] = deque(maxlen=WINDOW)

    def seen(self, losses: list[float]) -> None:
        """The losses of the steps before (a resumed run's), oldest first."""
        self.recent.extend(x for x in losses if math.isfinite(x))

    def check(self, step: int, loss: float, grad_norm: float) -> None:
        """Raise Diverged naming the step and the value when the step must not be applied."""
        if not math.isfinite(loss):
            raise Diverged(step, f"loss {loss}", "a non-finite loss")
        if not math.isfinite(grad_norm):
            raise Diverged(step, f"gradient norm {grad_norm}", "a non-finite gradient")
        if self.ratio and len(self.recent) >= MIN_STEPS:
            median = statistics.median(self.recent)
            if loss > self.ratio * median:
                raise Diverged(
                    step, f"loss {loss:.4g}", f"more than train.max_loss_ratio {self.ratio:g} x the median {median:.4g}"
                )
        self.recent.append(loss)
