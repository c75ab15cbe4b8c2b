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
    """The sdist the Dockerfile fetches and the hash its ``sha256sum -c`` checks."""
    text = (DOCKER / "Dockerfile").read_text()
    url = re.search(r"^ARG MINKOWSKI_SDIST_URL=(https://\S+/MinkowskiEngine-0\.5\.4\.tar\.gz)$", text, re.M)
    sha256 = re.search(r"^ARG MINKOWSKI_SDIST_SHA256=([0-9a-f]{64})$", text, re.M)
    assert url and sha256, "the Dockerfile no longer pins the MinkowskiEngine sdist by URL and hash"
    assert 'echo "${MINKOWSKI_SDIST_SHA256}  MinkowskiEngine-0.5.4.tar.gz" | sha256sum -c -' in text
    return url.group(1), sha256.group(1)


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


# docker/minkowski/patch_canonical_maps.py: CPU kernel maps in canonical order.
CANONICAL_SCRIPT = DOCKER / "minkowski" / "patch_canonical_maps.py"


def load_patch_script(script: Path):
    sys.path.insert(0, str(script.parent))  # it imports its helpers from the CUDA patch
    try:
        spec = importlib.util.spec_from_file_location(script.stem, script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(script.parent))


def load_canonical_patcher():
    return load_patch_script(CANONICAL_SCRIPT)


def test_canonical_maps_patch_sorts_every_parallel_built_map(source_tree):
    canonical = load_canonical_patcher()
    src = source_tree / "src"
    before = {name: (src / name).read_text() for name in ("coordinate_map_cpu.hpp", "kernel_map.hpp")}
    assert canonical.patch_tree(source_tree) == ["coordinate_map_cpu.hpp", "kernel_map.hpp"]
    cpu = (src / "coordinate_map_cpu.hpp").read_text()
    # kernel_map and stride_map, the field map, the interpolation map (with its weights).
    assert cpu.count("sort_kernel_map(in_maps, out_maps);") == 2
    assert "sort_map_pairs(in_maps[0], out_maps[0], num_used);" in cpu
    assert "sort_map_pairs(in_maps[i], out_maps[i], num_used[i], weights[i]);" in cpu
    kernel_map = (src / "kernel_map.hpp").read_text()
    assert "inline void sort_kernel_map(" in kernel_map
    assert "std::stable_sort(in_out.begin(), in_out.end(), comp);" in kernel_map
    # Only additions, but for origin_map's one sort call (now input-ordered, then stable).
    for name, text in before.items():
        removed = set(text.splitlines()) - set((src / name).read_text().splitlines())
        assert removed <= {"    std::sort(in_out.begin(), in_out.end(), comp);"}, (name, removed)
    # Applies on top of the CUDA patch too, in either order, and twice changes nothing.
    assert patcher.patch_tree(source_tree) != [] and canonical.patch_tree(source_tree) == []


def test_canonical_maps_patch_command_line_is_idempotent(source_tree):
    run = [sys.executable, str(CANONICAL_SCRIPT), str(source_tree)]
    first = subprocess.run(run, capture_output=True, text=True)
    assert first.returncode == 0 and "patched 2 files" in first.stdout, first.stderr
    snapshot = {p: p.read_text() for p in (source_tree / "src").rglob("*") if p.is_file()}
    second = subprocess.run(run, capture_output=True, text=True)
    assert second.returncode == 0 and "already patched" in second.stdout
    assert snapshot == {p: p.read_text() for p in (source_tree / "src").rglob("*") if p.is_file()}


def test_canonical_maps_patch_refuses_a_changed_anchor(source_tree):
    cpu = source_tree / "src" / "coordinate_map_cpu.hpp"
    anchor = "return std::make_pair(move(in_maps), move(out_maps));"
    cpu.write_text(cpu.read_text().replace(anchor, "return cpu_kernel_map(in_maps, out_maps);"))
    result = subprocess.run(
        [sys.executable, str(CANONICAL_SCRIPT), str(source_tree)], capture_output=True, text=True
    )
    assert result.returncode == 1 and "src/coordinate_map_cpu.hpp" in result.stderr


# docker/minkowski/patch_deterministic_convolution.py: every gemm of the CPU convolution on
# one thread, kernel offsets in parallel, sums in offset order.
CONVOLUTION_SCRIPT = DOCKER / "minkowski" / "patch_deterministic_convolution.py"


def test_convolution_patch_replaces_the_forward_kernel_and_marks_both_modules(source_tree):
    convolution = load_patch_script(CONVOLUTION_SCRIPT)
    kernel = source_tree / "src" / "convolution_kernel.hpp"
    before = kernel.read_text()
    assert convolution.patch_tree(source_tree) == [
        "pybind/minkowski.cpp",
        "pybind/minkowski.cu",
        "setup.py",
        "src/convolution_kernel.hpp",
    ]
    # nvcc compiles the CPU sources of the CUDA build: with OpenMP, as g++ does for the CPU one.
    assert 'NVCC_FLAGS += ["-Xcompiler", "-fopenmp"]' in (source_tree / "setup.py").read_text()
    after = kernel.read_text()
    forward = after[
        after.index("void ConvolutionForwardKernelCPU") : after.index("void ConvolutionBackwardKernelCPU")
    ]
    assert "hold_blas_to_one_thread();" in forward and "#pragma omp parallel for" in forward
    assert "openblas_set_num_threads(1);" in after
    # The backward kernel is as it was.
    backward = before[before.index("void ConvolutionBackwardKernelCPU") :]
    assert after.endswith(backward)
    for module in ("minkowski.cpp", "minkowski.cu"):
        text = (source_tree / "pybind" / module).read_text()
        assert text.count('m.attr("deterministic_cpu_convolution") = true;') == 1, module
    # With the other two patches, in any order; a second run changes nothing.
    assert load_canonical_patcher().patch_tree(source_tree) != []
    assert patcher.patch_tree(source_tree) != []
    assert convolution.patch_tree(source_tree) == []


def test_convolution_patch_command_line_is_idempotent_and_refuses_a_changed_kernel(source_tree):
    run = [sys.executable, str(CONVOLUTION_SCRIPT), str(source_tree)]
    kernel = source_tree / "src" / "convolution_kernel.hpp"
    original = kernel.read_text()
    kernel.write_text(
        original.replace("cpu_add<Dtype>(out_nchannel, src, dst, dst);", "dst[0] += src[0];", 1)
    )
    refused = subprocess.run(run, capture_output=True, text=True)
    assert refused.returncode == 1 and "src/convolution_kernel.hpp" in refused.stderr
    assert "bifusion" not in (source_tree / "pybind" / "minkowski.cpp").read_text()  # nothing written
    kernel.write_text(original)
    first = subprocess.run(run, capture_output=True, text=True)
    assert first.returncode == 0 and "patched 4 files" in first.stdout, first.stderr
    second = subprocess.run(run, capture_output=True, text=True)
    assert second.returncode == 0 and "already patched" in second.stdout


# The helper compiled on its own against stand-ins for MinkowskiEngine's types: the linear
# placement (unique outputs) and the sort it falls back to (repeated outputs, a range far
# wider than the map) must give the very order a plain sort by (out, in) gives.
PLACEMENT_CHECK = r"""
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <utility>
#include <vector>
struct default_types { using index_type = uint32_t; };
using cpu_in_map = std::vector<uint32_t>;
using cpu_out_map = std::vector<uint32_t>;
using cpu_in_maps = std::vector<cpu_in_map>;
using cpu_out_maps = std::vector<cpu_out_map>;
HELPER
int main() {
  std::mt19937 rng(7);
  int placed_paths[3] = {0, 0, 0};
  for (int t = 0; t < 3000; ++t) {
    int const kind = t % 3;  // 0: unique outputs, 1: repeated outputs, 2: unique but sparse
    uint32_t const span = kind == 2 ? 10000000 : 1 + rng() % 700;
    size_t const want = rng() % 400;
    std::vector<uint32_t> outs;
    std::vector<char> used(kind == 0 ? span : 0, 0);
    for (size_t i = 0; i < want; ++i) {
      uint32_t o = rng() % span;
      if (kind == 0) { if (used[o]) continue; used[o] = 1; }
      outs.push_back(o);
    }
    if (kind == 2) {
      std::sort(outs.begin(), outs.end());
      outs.erase(std::unique(outs.begin(), outs.end()), outs.end());
      std::shuffle(outs.begin(), outs.end(), rng);
    }
    cpu_out_map out(outs);
    cpu_in_map in(out.size());
    for (auto &x : in) x = rng() % 50000;
    std::vector<std::pair<uint32_t, uint32_t>> expected;
    for (size_t i = 0; i < out.size(); ++i) expected.push_back({out[i], in[i]});
    std::sort(expected.begin(), expected.end());
    sort_map_pairs(in, out, out.size());
    for (size_t i = 0; i < out.size(); ++i)
      if (expected[i].first != out[i] || expected[i].second != in[i]) {
        std::printf("case %d (kind %d): pair %zu differs\n", t, kind, i);
        return 1;
      }
    placed_paths[kind] += out.size() > 1;
  }
  std::printf("%d %d %d\n", placed_paths[0], placed_paths[1], placed_paths[2]);
  return 0;
}
"""


def test_canonical_order_helper_places_and_sorts_alike(tmp_path):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++ here (scripts/setup.sh installs build-essential for MinkowskiEngine)")
    helper = load_canonical_patcher().SORT_HELPER.replace(
        "using cpu_kernel_map_reference = std::pair<cpu_in_maps &, cpu_out_maps &>;\n", ""
    )
    source = tmp_path / "placement.cpp"
    source.write_text(PLACEMENT_CHECK.replace("HELPER", helper))
    built = subprocess.run(
        [
            compiler,
            "-std=c++17",
            "-O1",
            "-Wall",
            "-Werror",
            "-Wno-unknown-pragmas",
            str(source),
            "-o",
            str(tmp_path / "check"),
        ],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    ran = subprocess.run([str(tmp_path / "check")], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert all(int(count) > 500 for count in ran.stdout.split())  # every kind of map was tried
