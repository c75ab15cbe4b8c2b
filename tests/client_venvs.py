"""Separate venvs with the bifusion-client distribution installed as a user would (from client/,
not editable), on the oldest supported Python with the floor versions and on the newest Python
with the newest releases.

Venvs with the dependencies are cached under ~/.cache/bifusion/client-venvs (the newest one is
rebuilt weekly so that it follows new releases); the client itself is reinstalled into them on
every use, so they always run the code of this checkout.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIENT_DIR = ROOT / "client"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bifusion" / "client-venvs"


@dataclass(frozen=True)
class ClientRuntime:
    name: str
    python: str  # "3.9"
    requirements: tuple[str, ...]  # pins; empty = whatever is newest
    refresh: str = ""  # part of the cache key: a new value rebuilds the venv


# The floor of client/pyproject.toml, exactly.
FLOOR = ClientRuntime(
    "floor",
    "3.9",
    ("protobuf==3.20.3", "grpcio==1.51.1", "numpy==1.21.6", "pillow==8.4.0", "tqdm==4.62.3"),
)
_year, _week = datetime.date.today().isocalendar()[:2]
NEWEST = ClientRuntime("newest", "3.13", (), refresh=f"week-{_year}-{_week:02d}")


def find_python(version: str) -> str | None:
    """A working CPython ``version`` with venv support, or None.

    Tried in order: $BIFUSION_PYTHON<major><minor> (e.g. BIFUSION_PYTHON39), pythonX.Y on PATH,
    pyenv's versions, the usual install prefixes. Each candidate is run, since pyenv shims and
    distro pythons without the venv module exist but cannot be used.
    """
    digits = version.replace(".", "")
    pyenv_root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates = [
        os.environ.get(f"BIFUSION_PYTHON{digits}"),
        shutil.which(f"python{version}"),
        *sorted(glob.glob(f"{pyenv_root}/versions/{version}.*/bin/python{version}"), reverse=True),
        *sorted(glob.glob(f"/root/.pyenv/versions/{version}.*/bin/python{version}"), reverse=True),
        f"/usr/local/bin/python{version}",
        f"/usr/bin/python{version}",
        f"/opt/python/{version}/bin/python{version}",
    ]
    wanted = tuple(int(part) for part in version.split("."))
    probe = f"import sys, venv, ensurepip; sys.exit(sys.version_info[:2] != {wanted})"
    for candidate in dict.fromkeys(c for c in candidates if c):
        try:
            if subprocess.run([candidate, "-c", probe], capture_output=True, timeout=60).returncode == 0:
                return candidate
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


def client_venv(runtime: ClientRuntime, python: str) -> Path:
    """The venv's bin/ folder, with the dependencies cached and this checkout's client installed."""
    identity = "\n".join([python, *runtime.requirements, runtime.refresh])
    key = hashlib.sha256(identity.encode()).hexdigest()[:12]
    venv = CACHE / f"{runtime.name}-py{runtime.python}-{key}"
    bin_dir = venv / "bin"
    pip = [str(bin_dir / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    if not (venv / ".complete").exists():
        shutil.rmtree(venv, ignore_errors=True)
        _run([python, "-m", "venv", str(venv)])
        _run([*pip, "install", "--upgrade", "pip", "setuptools>=64", "wheel"])
        # The client's own requirements, resolved against the pins (or the newest releases).
        requirements = _client_requirements()
        constraints = venv / "constraints.txt"
        constraints.write_text("".join(f"{pin}\n" for pin in runtime.requirements))
        _run([*pip, "install", "-c", str(constraints), *requirements])
        (venv / ".complete").write_text(f"{python}\n")
    # A copy, so that building the wheel leaves nothing in the checkout.
    with tempfile.TemporaryDirectory(prefix="bifusion-client-src-") as tmp:
        source = Path(tmp) / "client"
        skip = shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
        shutil.copytree(CLIENT_DIR, source, ignore=skip)
        _run([*pip, "install", "--no-deps", "--no-build-isolation", "--force-reinstall", str(source)])
    return bin_dir


def _client_requirements() -> list[str]:
    """``project.dependencies`` of client/pyproject.toml (tomllib: this runs in the dev venv)."""
    import tomllib

    return tomllib.loads((CLIENT_DIR / "pyproject.toml").read_text())["project"]["dependencies"]


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


if __name__ == "__main__":  # build both venvs ahead of the tests, e.g. in CI's setup step
    for runtime in (FLOOR, NEWEST):
        found = find_python(runtime.python)
        print(f"{runtime.name}: {client_venv(runtime, found) if found else 'no Python ' + runtime.python}")
    sys.exit(0)
