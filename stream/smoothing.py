"""Causal One-Euro filter (Casiez et al. 2012) for live signals.

A webcam track needs a filter that is calm when the head is still (low cutoff kills landmark jitter) and
quick when it moves (cutoff rises with speed, so lag stays small). One-Euro does that with two knobs:
`min_cutoff` (Hz, jitter at rest) and `beta` (cutoff gain per unit/s of speed, lag in motion).
Works element-wise on arrays of any fixed shape.
"""
import math

import numpy as np


def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
    """Smoothing factor of a first-order low-pass with this cutoff (Hz) at step dt (s)."""
    return 1.0 / (1.0 + 1.0 / (2.0 * math.pi * cutoff * dt))


class OneEuro:
    """Element-wise One-Euro filter; `rate` (Hz) is the step used when no timestamp is given."""

    def __init__(self, min_cutoff: float = 1.0, beta: float = 0.05, d_cutoff: float = 1.0, rate: float = 30.0):
        self.min_cutoff, self.beta, self.d_cutoff, self.rate = min_cutoff, beta, d_cutoff, rate
        self.reset()

    def reset(self) -> None:
        """Forget the history, so the next sample passes through unchanged."""
        self.x: np.ndarray | None = None
        self.dx: np.ndarray | None = None
        self.t: float | None = None

    def __call__(self, x: np.ndarray, t: float | None = None) -> np.ndarray:
        """Filter one sample `x`, taken at time `t` seconds (default: one step of 1/rate after the last)."""
        x = np.asarray(x, np.float64)
        if self.x is None:
            self.x, self.dx, self.t = x.copy(), np.zeros_like(x), t
            return x.copy()
        dt = t - self.t if t is not None and self.t is not None and t > self.t else 1.0 / self.rate
        self.t = t
        self.dx = self.dx + _alpha(self.d_cutoff, dt) * ((x - self.x) / dt - self.dx)
        a = _alpha(self.min_cutoff + self.beta * np.abs(self.dx), dt)
        self.x = self.x + a * (x - self.x)
        return self.x.copy()
