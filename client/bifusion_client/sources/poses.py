"""Rigid transforms from translation + quaternion (x, y, z, w), and their interpolation in time."""

from __future__ import annotations

import numpy as np


def quaternion_to_matrix(q) -> np.ndarray:
    """Unit quaternion(s) (..., 4) as x, y, z, w (Hamilton, scalar last) -> rotation(s) (..., 3, 3)."""
    q = np.asarray(q, dtype=np.float64)
    norm = np.linalg.norm(q, axis=-1, keepdims=True)
    if np.any(~np.isfinite(norm)) or np.any(norm < 1e-9):
        raise ValueError("a rotation quaternion is zero or not finite")
    x, y, z, w = np.moveaxis(q / norm, -1, 0)
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def pose_matrix(translation, quaternion) -> np.ndarray:
    """4×4 (or ...×4×4) rigid transform from translation (..., 3) and quaternion (..., 4) xyzw."""
    translation = np.asarray(translation, dtype=np.float64)
    rotation = quaternion_to_matrix(quaternion)
    out = np.zeros((*rotation.shape[:-2], 4, 4))
    out[..., :3, :3] = rotation
    out[..., :3, 3] = translation
    out[..., 3, 3] = 1.0
    return out


def invert(transform: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4×4 transform."""
    out = np.eye(4)
    rotation_t = transform[:3, :3].T
    out[:3, :3] = rotation_t
    out[:3, 3] = -rotation_t @ transform[:3, 3]
    return out


def slerp(q0, q1, s) -> np.ndarray:
    """Spherical linear interpolation of unit quaternions (..., 4) at fractions ``s`` (...)."""
    q0 = np.asarray(q0, dtype=np.float64)
    q1 = np.asarray(q1, dtype=np.float64)
    q0 = q0 / np.linalg.norm(q0, axis=-1, keepdims=True)
    q1 = q1 / np.linalg.norm(q1, axis=-1, keepdims=True)
    s = np.asarray(s, dtype=np.float64)[..., None]
    dot = np.sum(q0 * q1, axis=-1, keepdims=True)
    q1 = np.where(dot < 0, -q1, q1)  # the shorter arc
    dot = np.abs(dot)
    theta = np.arccos(np.clip(dot, -1.0, 1.0))
    sin_theta = np.sin(theta)
    near = sin_theta < 1e-9  # (almost) the same rotation: plain lerp is exact enough
    safe = np.where(near, 1.0, sin_theta)
    w0 = np.where(near, 1.0 - s, np.sin((1.0 - s) * theta) / safe)
    w1 = np.where(near, s, np.sin(s * theta) / safe)
    out = w0 * q0 + w1 * q1
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


class PoseTrack:
    """Time-stamped poses (translation + quaternion xyzw); looked up between the two nearest
    stamps with lerp (translation) and slerp (rotation)."""

    def __init__(self, stamps, translations, quaternions):
        stamps = np.asarray(stamps, dtype=np.float64)
        order = np.argsort(stamps, kind="stable")
        self.stamps = stamps[order]
        self.translations = np.asarray(translations, dtype=np.float64).reshape(-1, 3)[order]
        self.quaternions = np.asarray(quaternions, dtype=np.float64).reshape(-1, 4)[order]
        if self.stamps.size == 0:
            raise ValueError("a pose track needs at least one pose")

    def covers(self, t: float) -> bool:
        return bool(self.stamps[0] <= t <= self.stamps[-1])

    def at(self, t: float) -> np.ndarray:
        """T at time ``t`` (seconds) as 4×4; ``t`` must lie within the track (no extrapolation)."""
        if not self.covers(t):
            raise LookupError(
                f"time {t:.6f} is outside the poses' span [{self.stamps[0]:.6f}, {self.stamps[-1]:.6f}]"
            )
        upper = int(np.searchsorted(self.stamps, t, side="left"))
        if self.stamps[upper] == t:
            return pose_matrix(self.translations[upper], self.quaternions[upper])
        lower = upper - 1
        span = self.stamps[upper] - self.stamps[lower]
        s = (t - self.stamps[lower]) / span
        translation = (1.0 - s) * self.translations[lower] + s * self.translations[upper]
        rotation = slerp(self.quaternions[lower], self.quaternions[upper], s)
        return pose_matrix(translation, rotation)


def matrix_to_quaternion(rotation) -> np.ndarray:
    """Rotation 3×3 -> unit quaternion x, y, z, w (the inverse of :func:`quaternion_to_matrix`),
    from the largest of the four diagonal combinations, so no branch divides by a small number."""
    m = np.asarray(rotation, dtype=np.float64)
    trace = np.trace(m)
    candidates = [trace, m[0, 0], m[1, 1], m[2, 2]]
    k = int(np.argmax(candidates))
    if k == 0:
        s = 2.0 * np.sqrt(1.0 + trace)
        q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, s / 4]
    elif k == 1:
        s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [s / 4, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s, (m[2, 1] - m[1, 2]) / s]
    elif k == 2:
        s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 1] + m[1, 0]) / s, s / 4, (m[1, 2] + m[2, 1]) / s, (m[0, 2] - m[2, 0]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, s / 4, (m[1, 0] - m[0, 1]) / s]
    q = np.asarray(q)
    return q / np.linalg.norm(q)
