"""A warning when a depth image's scale looks wrong: the service cannot tell, and a wrong
scale silently puts every point at the wrong distance (TUM depth, 5000 units per metre, read
at the common 1000 puts a 1.2 m scene at 5.9 m)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .request import BYTES_LIKE

# Where the median of an RGB-D camera's valid readings falls indoors (structured light, ToF, active stereo).
PLAUSIBLE_MEDIAN_M = (0.2, 4.5)
KNOWN_SCALES = {1000.0: "millimetres", 5000.0: "TUM RGB-D", 1.0: "metres"}


def median_depth_m(depth: np.ndarray | bytes, depth_scale: float) -> float | None:
    """Median of the valid (non-zero, finite) depths in metres; None when there are none.
    ``depth`` is H×W uint16 (with ``depth_scale``), H×W float32 metres, or 16-bit PNG bytes."""
    if isinstance(depth, BYTES_LIKE):
        depth = np.asarray(Image.open(io.BytesIO(depth)))
    depth = np.asarray(depth)
    metres = depth if depth.dtype.kind == "f" else depth.astype(np.float32) / np.float32(depth_scale)
    valid = metres[np.isfinite(metres) & (metres > 0)]
    return float(np.median(valid)) if valid.size else None


def depth_scale_warning(depth: np.ndarray | bytes, depth_scale: float, where: str) -> str | None:
    """A one-line warning naming ``where`` (a frame or file) when the median depth is implausible."""
    median = median_depth_m(depth, depth_scale)
    low, high = PLAUSIBLE_MEDIAN_M
    if median is None or low <= median <= high:
        return None
    is_float = not isinstance(depth, BYTES_LIKE) and np.asarray(depth).dtype.kind == "f"
    unit = "float metres" if is_float else f"depth scale {depth_scale:g} ({median * depth_scale:.0f} units)"
    hint = "" if is_float else " " + _scale_hint(median * depth_scale)
    return (
        f"{where}: median depth is {median:.2f} m with {unit}, outside the {low}–{high} m an RGB-D "
        f"camera usually sees; is the scale right?{hint}"
    )


def _scale_hint(median_units: float) -> str:
    fits = [
        f"a depth scale of {scale:g} ({name}): {median_units / scale:.2f} m"
        for scale, name in KNOWN_SCALES.items()
        if PLAUSIBLE_MEDIAN_M[0] <= median_units / scale <= PLAUSIBLE_MEDIAN_M[1]
    ]
    return ("Try " + "; ".join(fits) + ".") if fits else ""
