"""docker/minkowski/patch_cuda_sources.py on the real MinkowskiEngine 0.5.4 sdist (the very
file the Dockerfile ADDs, checked against the Dockerfile's sha256), cached after one download."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import pytest
from deploy_tools import DOCKER

SCRIPT = DOCKER / "minkowski" / "patch_cuda_sources.py"


def load_patcher():
    spec = importlib.util.spec_from_file_location("patch_cuda_sources", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


patcher = load_patcher()


def sdist_url_and_sha256() -> tuple[str, str]:
    text = (DOCKER / "Dockerfile").read_text()
    match = re.search(
        r"ADD --checksum=sha256:([0-9a-f]{64}) \\\s*\n\s*(https://\S+MinkowskiEngine-0\.5\.4\.tar\.gz)", text
    )
    assert match, "the Dockerfile no longer ADDs the pinned MinkowskiEngine sdist"
    return match.group(2), match.group(1)


@pytest.fixture(scope="module")
def sdist() -> Path:
    url, sha256 = sdist_url_and_sha256()
    cache = Path(os.environ.get("BIFUSION_CACHE_DIR", Path.home() / ".cache" / "bifusion")) / "sdists"
    path = cache / "MinkowskiEngine-0.5.4.tar.gz"
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
        cache.mkdir(parents=True, exist_ok=True)
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                data = response.read()
        except OSError as exc:
            pytest.skip(f"cannot download the MinkowskiEngine sdist ({exc}); nothing to patch")
        assert hashlib.sha256(data).hexdigest() == sha256, (
            "downloaded sdist does not match the Dockerfile's hash"
        )
        path.write_bytes(data)
    return path


@pytest.fixture
def source_tree(sdist, tmp_path) -> Path:
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path / "MinkowskiEngine-0.5.4"


def test_patches_the_real_sources(source_tree):
    original = {p: p.read_text() for p in (source_tree / "src").rglob("*.cu*")}
    changed = patcher.patch_tree(source_tree)
    assert "3rdparty/concurrent_unordered_map.cuh" in changed
    assert "coordinate_map_gpu.cu" in changed

    src = source_tree / "src"
    cmap = (src / "3rdparty/concurrent_unordered_map.cuh").read_text()
    assert "#include <cudf/detail/nvtx/ranges.hpp>" not in cmap and "#define CUDF_FUNC_RANGE()" in cmap
    # The includes sit inside the include guard (after its first #include).
    assert cmap.index("#define CONCURRENT_UNORDERED_MAP_CUH") < cmap.index(
        "#include <thrust/execution_policy.h>"
    )
    gpu = (src / "coordinate_map_gpu.cu").read_text()
    for header in ("thrust/remove.h", "thrust/unique.h", "thrust/execution_policy.h"):
        assert f"#include <{header}>" in gpu
    assert "thrust::unary_function" not in (src / "coordinate_map_functors.cuh").read_text()
    assert "cudaMemPrefetchAsync(ptr, bytes, location, 0, stream)" in cmap  # the CUDA 13 form
    assert len(re.findall(r"(?<!return )cudaMemPrefetchAsync\(", cmap)) == 0
    assert "std::unique_ptr<Self" not in cmap
    # Otherwise only additions: no other line of the sources changes.
    allowed = {
        "#include <cudf/detail/nvtx/ranges.hpp>",
        "struct find_coordinate",
        "    : public thrust::unary_function<uint32_t,",
        "                                    thrust::pair<uint32_t, uint32_t>> {",
        "    return std::unique_ptr<Self, std::function<void(Self*)>>{",
        "      deleter};",
    }
    for path, before in original.items():
        after = path.read_text()
        removed = {line for line in set(before.splitlines()) - set(after.splitlines())}
        removed = {line for line in removed if "cudaMemPrefetchAsync(" not in line}
        assert removed <= allowed, (path.name, removed)


def test_is_idempotent_through_its_command_line(source_tree):
    first = subprocess.run([sys.executable, str(SCRIPT), str(source_tree)], capture_output=True, text=True)
    assert first.returncode == 0 and "patched" in first.stdout
    snapshot = {p: p.read_text() for p in (source_tree / "src").rglob("*") if p.is_file()}
    second = subprocess.run([sys.executable, str(SCRIPT), str(source_tree)], capture_output=True, text=True)
    assert second.returncode == 0 and "already patched" in second.stdout
    assert snapshot == {p: p.read_text() for p in (source_tree / "src").rglob("*") if p.is_file()}


def test_refuses_a_tree_it_does_not_recognise(source_tree, tmp_path):
    (source_tree / "src" / "spmm.cu").unlink()
    result = subprocess.run([sys.executable, str(SCRIPT), str(source_tree)], capture_output=True, text=True)
    assert result.returncode == 1 and "src/spmm.cu" in result.stderr
    shutil.rmtree(source_tree / "src")
    result = subprocess.run([sys.executable, str(SCRIPT), str(source_tree)], capture_output=True, text=True)
    assert result.returncode == 1 and "not a MinkowskiEngine source tree" in result.stderr


def test_refuses_a_changed_anchor(source_tree):
    functors = source_tree / "src" / "coordinate_map_functors.cuh"
    functors.write_text(functors.read_text().replace("struct find_coordinate\n", "struct find_coordinates\n"))
    with pytest.raises(patcher.PatchError, match=r"coordinate_map_functors\.cuh"):
        patcher.patch_tree(source_tree)
