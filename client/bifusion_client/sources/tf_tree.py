"""A tf tree from ``/tf`` and ``/tf_static``: T_target_source at any time, through any chain."""

from __future__ import annotations

import numpy as np

from .poses import PoseTrack, invert, pose_matrix


class TfTree:
    """Edges parent -> child, each static (one transform) or dynamic (a :class:`PoseTrack`).

    ``lookup(target, source, t)`` composes the chain through the two frames' common ancestor,
    interpolating every dynamic edge at ``t`` (lerp translation, slerp rotation between the two
    nearest transforms; no extrapolation, like tf2).
    """

    def __init__(self) -> None:
        self._static: dict[str, tuple[str, np.ndarray]] = {}  # child -> (parent, T_parent_child)
        self._samples: dict[str, tuple[str, list, list, list]] = {}  # child -> (parent, stamps, t, q)
        self._dynamic: dict[str, tuple[str, PoseTrack]] = {}

    def add(self, parent: str, child: str, stamp: float, translation, quaternion, static: bool) -> None:
        parent, child = _strip(parent), _strip(child)
        if static:
            self._static[child] = (parent, pose_matrix(translation, quaternion))
            return
        entry = self._samples.setdefault(child, (parent, [], [], []))
        if entry[0] != parent:
            raise ValueError(f"tf frame {child!r} has two parents: {entry[0]!r} and {parent!r}")
        entry[1].append(stamp)
        entry[2].append(translation)
        entry[3].append(quaternion)
        self._dynamic.pop(child, None)  # rebuilt on the next lookup

    @property
    def frames(self) -> set:
        children = set(self._static) | set(self._samples)
        parents = {p for p, _ in self._static.values()} | {e[0] for e in self._samples.values()}
        return children | parents

    def __bool__(self) -> bool:
        return bool(self._static or self._samples)

    def parent(self, child: str) -> str | None:
        if child in self._samples:
            return self._samples[child][0]
        if child in self._static:
            return self._static[child][0]
        return None

    def root(self, frame: str) -> str:
        return self._chain(_strip(frame))[-1]

    def lookup(self, target: str, source: str, t: float) -> np.ndarray:
        """T_target_source (4×4) at time ``t``: maps points in ``source`` to ``target``."""
        target, source = _strip(target), _strip(source)
        for frame in (target, source):
            if frame not in self.frames:
                raise LookupError(f"tf has no frame {frame!r} (frames: {', '.join(sorted(self.frames))})")
        up_source, up_target = self._chain(source), self._chain(target)
        common = next((f for f in up_source if f in set(up_target)), None)
        if common is None:
            raise LookupError(f"tf frames {target!r} and {source!r} are not connected")
        t_common_source = self._compose(up_source[: up_source.index(common) + 1], t)
        t_common_target = self._compose(up_target[: up_target.index(common) + 1], t)
        return invert(t_common_target) @ t_common_source

    def _chain(self, frame: str) -> list:
        chain = [frame]
        while (parent := self.parent(chain[-1])) is not None:
            if parent in chain:
                raise ValueError(f"tf has a loop through {parent!r}")
            chain.append(parent)
        return chain

    def _compose(self, chain: list, t: float) -> np.ndarray:
        """T_chain[-1]_chain[0] (from the first frame up to the last)."""
        out = np.eye(4)
        for child in chain[:-1]:
            out = self._edge(child, t) @ out
        return out

    def _edge(self, child: str, t: float) -> np.ndarray:
        if child in self._samples:
            if child not in self._dynamic:
                parent, stamps, translations, quaternions = self._samples[child]
                self._dynamic[child] = (parent, PoseTrack(stamps, translations, quaternions))
            parent, track = self._dynamic[child]
            try:
                return track.at(t)
            except LookupError as error:
                raise LookupError(f"tf {parent!r} -> {child!r}: {error}") from None
        return self._static[child][1]


def _strip(frame: str) -> str:
    return frame[1:] if frame.startswith("/") else frame  # tf2 frame ids carry no leading slash
