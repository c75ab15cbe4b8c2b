"""Pairing two streams of time stamps, as TUM's ``associate.py`` does."""

from __future__ import annotations

import numpy as np

# TUM's associate.py default: colour and depth more than 20 ms apart are not a pair.
DEFAULT_MAX_DIFFERENCE_S = 0.02


def associate(first, second, max_difference: float = DEFAULT_MAX_DIFFERENCE_S) -> list:
    """Pairs ``(i, j)`` of indices into two stamp sequences (seconds), each index used at most
    once, closest pairs first, no pair further apart than ``max_difference``; sorted by ``i``.

    Candidates come from a sorted search (only stamps within ``max_difference`` of each other);
    the greedy one-to-one choice over them is the same as associate.py's.
    """
    if max_difference < 0 or not np.isfinite(max_difference):
        raise ValueError(f"max difference must be a finite number >= 0 seconds, got {max_difference}")
    a = np.asarray(first, dtype=np.float64)
    b = np.asarray(second, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        return []
    order = np.argsort(b, kind="stable")
    b_sorted = b[order]
    lo = np.searchsorted(b_sorted, a - max_difference, side="left")
    hi = np.searchsorted(b_sorted, a + max_difference, side="right")
    counts = hi - lo
    i = np.repeat(np.arange(a.size), counts)
    # the k-th candidate of row i sits at lo[i] + k
    k = np.arange(i.size) - np.repeat(np.cumsum(counts) - counts, counts)
    j = order[lo[i] + k]
    difference = np.abs(a[i] - b[j])
    used_a = np.zeros(a.size, dtype=bool)
    used_b = np.zeros(b.size, dtype=bool)
    pairs = []
    for index in np.argsort(difference, kind="stable"):  # loops over candidate stamps, not pixels
        ia, jb = int(i[index]), int(j[index])
        if not used_a[ia] and not used_b[jb]:
            used_a[ia] = used_b[jb] = True
            pairs.append((ia, jb))
    return sorted(pairs)


def unpaired_warning(colors: int, depths: int, pairs: int, max_difference: float) -> str | None:
    """What pairing left out and why; None when every image found its partner."""
    left = [
        f"{count - pairs} of {count} {kind} images"
        for count, kind in ((colors, "colour"), (depths, "depth"))
        if count > pairs
    ]
    if not left:
        return None
    return (
        f"{' and '.join(left)} left out: no partner within {max_difference:g} s "
        "(--max-time-difference; TUM's associate.py pairs the same way)"
    )
