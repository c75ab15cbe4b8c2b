"""Colours for looking at features: a PCA of them to RGB, and a heat map for scalars in [0, 1]."""

from __future__ import annotations

import numpy as np

# A perceptually ordered dark-to-bright ramp (matplotlib's "inferno" at 9 stops), so a
# scalar map reads the same in greyscale; interpolated linearly between stops.
_HEAT_STOPS = np.array(
    [
        [0, 0, 4],
        [31, 12, 72],
        [85, 15, 109],
        [136, 34, 106],
        [186, 54, 85],
        [227, 89, 51],
        [249, 140, 10],
        [249, 201, 50],
        [252, 255, 164],
    ],
    dtype=np.float64,
)


def heat_colors(values: np.ndarray) -> np.ndarray:
    """N values in [0, 1] (clipped) -> N×3 uint8."""
    x = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0) * (len(_HEAT_STOPS) - 1)
    lower = np.minimum(np.floor(x).astype(np.int64), len(_HEAT_STOPS) - 2)
    s = (x - lower)[:, None]
    rgb = (1.0 - s) * _HEAT_STOPS[lower] + s * _HEAT_STOPS[lower + 1]
    return np.round(rgb).astype(np.uint8)


FIT_SAMPLE = 4096  # feature vectors of the first frame the PCA is fitted on


class FeaturePCA:
    """Features -> RGB by their three principal components, fitted once and then reused.

    The fit (mean, axes, and the 1st-99th percentile range of each component, mapped to 0..255)
    comes from the first frame with points it sees (an even sample of up to 4096 of its points), so every
    later frame of the run is coloured by the same projection and the colours are comparable
    across frames.
    """

    def __init__(self) -> None:
        self.mean: np.ndarray | None = None
        self.axes: np.ndarray | None = None  # 3×D
        self.low: np.ndarray | None = None
        self.high: np.ndarray | None = None
        self._offset: np.ndarray | None = None  # mean · axes, subtracted after the projection
        self._last: tuple | None = None

    @property
    def fitted(self) -> bool:
        return self.axes is not None

    def fit(self, features: np.ndarray) -> FeaturePCA:
        x = np.asarray(features)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"the PCA needs at least 2 feature vectors, got shape {x.shape}")
        # an even sample of the frame is plenty for three axes, and keeps the fit in milliseconds
        x = x[np.linspace(0, len(x) - 1, min(len(x), FIT_SAMPLE)).astype(np.int64)].astype(np.float64)
        self.mean = x.mean(axis=0)
        centred = x - self.mean
        _, vectors = np.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
        axes = np.zeros((3, x.shape[1]))
        top = vectors[:, ::-1][:, :3].T
        axes[: len(top)] = top
        # an axis' sign is arbitrary: fix it so that its largest loading is positive
        signs = np.sign(axes[np.arange(3), np.argmax(np.abs(axes), axis=1)])
        self.axes = axes * np.where(signs == 0, 1.0, signs)[:, None]
        self._offset = (self.mean @ self.axes.T).astype(np.float32)
        projected = centred @ self.axes.T
        self.low = np.percentile(projected, 1, axis=0)
        self.high = np.percentile(projected, 99, axis=0)
        return self

    def colors(self, features: np.ndarray) -> np.ndarray:
        """N×3 uint8; fits on ``features`` first if nothing was fitted yet. Every output asks for
        the same frame's colours, so the last answer is kept."""
        if self._last is not None and self._last[0] is features:
            return self._last[1]
        if not self.fitted:
            if len(features) < 2:  # a frame without points (facing the sky): fit on a later one
                return np.full((len(features), 3), 128, dtype=np.uint8)
            self.fit(features)
        # float32 projection: a 20 000 × 256 frame is not copied to float64
        projected = np.asarray(features, dtype=np.float32) @ self.axes.T.astype(np.float32) - self._offset
        span = np.where(self.high > self.low, self.high - self.low, 1.0)
        colors = np.round(np.clip((projected - self.low) / span, 0.0, 1.0) * 255.0).astype(np.uint8)
        self._last = (features, colors)
        return colors
