"""What an ``encode`` run creates, so that a run that fails before writing anything useful
takes it away again (an empty bag left behind would block the corrected re-run: bags are
never overwritten) while leaving everything that was there before."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path


class NewOutputs:
    """Taken before the outputs are opened: for each output path, the outermost folder or file
    that does not exist yet (all of it will be this run's), or, for an output folder that exists,
    the names already in it (anything else found there later is this run's)."""

    def __init__(self, paths: Iterable[Path]):
        self._created: list[Path] = []
        self._listed: dict[Path, set] = {}
        for path in paths:
            path = Path(os.path.abspath(path))
            if path.is_dir():
                self._listed.setdefault(path, set(os.listdir(path)))
            elif not path.exists():
                top = path
                while not top.parent.exists():
                    top = top.parent
                if top not in self._created:
                    self._created.append(top)

    def remove(self) -> None:
        """Removes what this run created; what existed before is kept."""
        for path, before in self._listed.items():
            for name in set(os.listdir(path)) - before if path.is_dir() else ():
                _remove(path / name)
        for path in self._created:
            _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
