"""Signal augmentation applied to a record before every consumer's view is cut from it.

Because the teacher and the student see the same augmented record, the teacher's input
changes every epoch when augmentation draws afresh: distillation then runs the teacher live.
With ``train.augment.views`` = K the draws are K fixed views per record instead (an
``ECGSplit``'s ``draws``), and the teacher's outputs on each view are cached
(docs/architecture.md, "How a record flows").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SignalAugment:
    """Random amplitude scaling, a circular time shift and additive Gaussian noise.

    Args:
        noise: standard deviation of the added noise, mV (0 = none).
        amplitude: relative amplitude jitter; each record is scaled by a factor drawn
            uniformly from [1 - amplitude, 1 + amplitude] (0 = none).
        shift: largest circular shift in seconds, either direction (0 = none).
    """

    noise: float = 0.0
    amplitude: float = 0.0
    shift: float = 0.0

    def __post_init__(self) -> None:
        for name in ("noise", "amplitude", "shift"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment.{name} must be >= 0, got {getattr(self, name)}")
        if self.amplitude >= 1:
            raise ValueError(f"augment.amplitude must be < 1, got {self.amplitude}")

    @property
    def active(self) -> bool:
        return self.noise > 0 or self.amplitude > 0 or self.shift > 0

    def __call__(self, signal: np.ndarray, fs: float, rng: np.random.Generator) -> np.ndarray:
        """Augment one record.

        Args:
            signal: float [12, T] mV.
            fs: its sampling rate (Hz).
            rng: the draw's random generator.

        Returns:
            float32 [12, T], a new array.
        """
        x = np.array(signal, dtype=np.float32)  # (12, T)
        if self.amplitude > 0:
            x *= np.float32(rng.uniform(1 - self.amplitude, 1 + self.amplitude))
        if self.shift > 0:
            most = int(round(self.shift * fs))
            x = np.roll(x, int(rng.integers(-most, most + 1)), axis=-1)
        if self.noise > 0:
            x += rng.normal(0.0, self.noise, size=x.shape).astype(np.float32)
        return x
