"""scripts/setup.sh's decisions, run for real in bash with fake tools on PATH: which Python,
which device, the MinkowskiEngine wheel cache key, and no half-made venv after a failure."""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "scripts" / "setup.sh"
BASE_PYTHON = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
# What the sourced functions call besides python: PATH holds these and the fakes, nothing else,
# so no Python of the machine's own can answer.
TOOLS = ("bash", "cat", "cut", "dirname", "grep", "ls", "mkdir", "mv", "paste", "readlink", "rm", "sort")
TOOLS += ("sed", "sha256sum", "tar", "touch", "tr", "uname", "nproc", "mktemp", "env", "id", "sh")


@functools.cache
def tools_dir() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="setup-tools-"))
    atexit.register(shutil.rmtree, folder, True)
    for name in TOOLS:
        (folder / name).symlink_to(shutil.which(name))
    return folder


def run(script: str, path_dirs=(), **env) -> subprocess.CompletedProcess:
    """Source setup.sh (functions only) in bash and run ``script``, PATH = fakes + the tools."""
    path = os.pathsep.join([*map(str, path_dirs), str(tools_dir())])
    full_env = {"HOME": os.environ.get("HOME", "/tmp"), "PATH": path, **env}
    return subprocess.run(
        [shutil.which("bash"), "-c", f'source "{SETUP}"\n{script}'],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def fake(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    tool = bin_dir / name
    tool.write_text(f"#!/bin/sh\n{body}\n")
    tool.chmod(0o755)


@pytest.fixture
def fakes(tmp_path):
    """python3.13 a shim that fails to run (as pyenv's), python3.12 absent, python3.11 the real one."""
    bin_dir = tmp_path / "bin"
    fake(bin_dir, "python3.13", 'echo "pyenv: python3.13: command not found" >&2; exit 127')
    fake(bin_dir, "python3.11", f'exec "{BASE_PYTHON}" "$@"')
    return bin_dir


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the fakes stand in for this machine's 3.11")
def test_picks_the_newest_python_that_actually_runs(fakes):
    done = run("pick_python", [fakes])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "python3.11"
    fake(fakes, "python3.12", f'exec "{BASE_PYTHON}" "$@"')  # a 3.11 named 3.12 is not 3.12
    assert run("pick_python", [fakes]).stdout.strip() == "python3.11"


def test_says_which_pythons_it_needs_when_none_runs(fakes):
    (fakes / "python3.11").unlink()
    done = run("pick_python", [fakes])
    assert done.returncode != 0
    assert "no Python 3.13 3.12 3.11 found" in done.stderr
    assert "BIFUSION_PYTHON" in done.stderr


def test_bifusion_python_overrides_and_is_checked(fakes):
    done = run("pick_python", [fakes], BIFUSION_PYTHON=str(fakes / "python3.13"))
    assert done.returncode != 0 and "BIFUSION_PYTHON=" in done.stderr
    if sys.version_info[:2] == (3, 11):
        done = run("pick_python", [fakes], BIFUSION_PYTHON=str(fakes / "python3.11"))
        assert done.stdout.strip().endswith("python3.11")


def test_device_follows_the_local_gpu(tmp_path):
    bin_dir = tmp_path / "bin"
    assert run("target_device", [bin_dir]).stdout.strip() == "cpu"
    fake(bin_dir, "nvidia-smi", 'printf "9.0\\n8.6\\n9.0\\n"')
    assert run("gpu_arch_list", [bin_dir]).stdout.strip() == "8.6;9.0"
    assert run("target_device", [bin_dir]).stdout.strip() == "cuda"
    assert run("target_device", [bin_dir], BIFUSION_DEVICE="cpu").stdout.strip() == "cpu"
    done = run("target_device", [bin_dir], BIFUSION_DEVICE="tpu")
    assert done.returncode != 0 and "BIFUSION_DEVICE" in done.stderr
    fake(bin_dir, "nvidia-smi", "echo 'NVIDIA-SMI has failed' >&2; exit 9")  # driver without a GPU
    assert run("target_device", [bin_dir]).stdout.strip() == "cpu"


def test_wheel_cache_key_names_python_cuda_and_arch(tmp_path):
    bin_dir = tmp_path / "bin"
    fake(bin_dir, "python", f'exec "{sys.executable}" "$@"')
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    patches = run("minkowski_patches_hash", [bin_dir]).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{10}", patches)
    cpu = run("minkowski_cache_key cpu ''", [bin_dir])
    assert cpu.stdout.strip() == f"me0.5.4-torch2.14.1-{tag}-x86_64-cpu-p{patches}", cpu.stderr
    import torch

    cuda = run("minkowski_cache_key cuda '8.6;9.0+PTX'", [bin_dir])
    if torch.version.cuda:
        version = torch.version.cuda.replace(".", "")
        assert cuda.stdout.strip() == f"me0.5.4-torch2.14.1-{tag}-x86_64-cu{version}-sm86-90-p{patches}"
    else:
        assert cuda.returncode != 0 and "has no CUDA" in cuda.stderr


def test_a_changed_source_patch_changes_the_wheel_cache_key(tmp_path):
    """A wheel built before a patch changed (or without it) is never reused."""
    patches = tmp_path / "docker" / "minkowski"
    shutil.copytree(ROOT / "docker" / "minkowski", patches)
    before = run(f'ROOT="{tmp_path}"; minkowski_patches_hash').stdout.strip()
    assert before == run("minkowski_patches_hash").stdout.strip()
    with (patches / "patch_canonical_maps.py").open("a") as f:
        f.write("# changed\n")
    after = run(f'ROOT="{tmp_path}"; minkowski_patches_hash').stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{10}", after) and after != before


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the fakes stand in for this machine's 3.11")
def test_a_failed_setup_leaves_no_venv_and_an_interrupted_one_is_redone(fakes, tmp_path):
    venv = tmp_path / "venv"
    done = run('make_venv\necho made; test -x "$VENV/bin/python"; false', [fakes], BIFUSION_VENV=str(venv))
    assert "made" in done.stdout, done.stderr
    assert done.returncode != 0
    assert not venv.exists(), "the failed run left its venv behind"
    assert "removing the unfinished venv" in done.stderr
    # A run killed before its trap ran leaves the marker: the next run starts again.
    venv.mkdir()
    (venv / ".bifusion-setup-incomplete").touch()
    done = run("make_venv\nfinish_venv", [fakes], BIFUSION_VENV=str(venv))
    assert done.returncode == 0, done.stderr
    assert (venv / "bin" / "python").exists() and not (venv / ".bifusion-setup-incomplete").exists()
    # A finished venv is kept as it is.
    done = run("make_venv", [fakes], BIFUSION_VENV=str(venv))
    assert done.returncode == 0 and "using the existing venv" in done.stderr


def test_an_existing_venv_of_another_python_is_refused_not_removed(tmp_path, fakes):
    venv = tmp_path / "venv"
    fake(venv / "bin", "python", "exit 1")
    done = run("make_venv", [fakes], BIFUSION_VENV=str(venv))
    assert done.returncode != 0 and "remove it or set BIFUSION_VENV" in done.stderr
    assert (venv / "bin" / "python").exists()


def test_a_venv_linked_in_is_ignored_like_a_made_one(tmp_path):
    """setup.sh's venv may be a symlink to one made elsewhere; `.venv/` would match only a folder."""
    git = shutil.which("git")
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run([git, "init", "-q", str(repo)], check=True)
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    (tmp_path / "elsewhere").mkdir()
    (repo / ".venv").symlink_to(tmp_path / "elsewhere")
    (repo / ".tools").symlink_to(tmp_path / "elsewhere")
    listed = subprocess.run(
        [git, "status", "--porcelain", "--untracked-files=all"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    assert listed.stdout.split() == ["??", ".gitignore"]


# main() with the venv, torch and MinkowskiEngine steps stubbed: what it installs by mode.
STUBBED_MAIN = """
make_venv() { mkdir -p "$VENV"; }
finish_venv() { :; }
target_device() { echo cpu; }
install_torch() { :; }
install_minkowski_engine() { :; }
main "$@"
"""


@pytest.fixture
def setup_fakes(tmp_path):
    """dpkg says every package is installed; apt-get, pip and npm record their calls."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    fake(bin_dir, "dpkg-query", "printf 'install ok installed'")
    fake(bin_dir, "apt-get", f'echo "apt-get $*" >>"{calls}"; exit 100')
    fake(bin_dir, "pip", f'echo "pip $*" >>"{calls}"')
    fake(bin_dir, "python", 'case "$*" in *version_info*) echo 3.11 ;; *) exit 1 ;; esac')
    return bin_dir, calls


def test_serving_installs_no_test_tools_and_needs_no_npm(setup_fakes, tmp_path):
    bin_dir, calls = setup_fakes  # no npm on PATH, and apt-get cannot install one
    done = run(STUBBED_MAIN.replace('"$@"', "serve"), [bin_dir], BIFUSION_VENV=str(tmp_path / "venv"))
    assert done.returncode == 0, done.stderr
    assert calls.read_text().splitlines() == [f"pip install -q -e {ROOT}/client", f"pip install -q -e {ROOT}"]
    assert "buf" not in done.stderr


def test_a_failing_step_says_what_failed_and_what_to_do(setup_fakes, tmp_path):
    bin_dir, calls = setup_fakes
    # A host without the npm registry: npm fails after the Debian packages were fine.
    fake(bin_dir, "npm", 'echo "npm error network request to https://registry.npmjs.org/ failed" >&2; exit 1')
    venv = tmp_path / "venv"
    done = run(STUBBED_MAIN.replace('"$@"', "test"), [bin_dir], BIFUSION_VENV=str(venv), HOME=str(tmp_path))
    assert done.returncode != 0
    assert "registry.npmjs.org/ failed" in done.stderr  # npm's own words are kept
    assert "error: installing buf 1.75.0 (the proto linter, for the tests) with npm failed" in done.stderr
    assert "what to do: serving does not need it (scripts/serve.sh skips it)" in done.stderr
    assert not calls.exists(), "nothing after the failed step ran"
    # Any step: pip failing in the project install names that step.
    fake(bin_dir, "pip", 'echo "ERROR: No matching distribution found for grpcio" >&2; exit 1')
    done = run(STUBBED_MAIN.replace('"$@"', "serve"), [bin_dir], BIFUSION_VENV=str(venv))
    assert done.returncode != 0
    assert "error: installing the project (serve) failed (exit 1: pip install" in done.stderr
    assert "what to do: pip's message above says which package failed" in done.stderr
