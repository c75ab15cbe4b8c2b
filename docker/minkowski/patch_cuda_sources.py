"""Patch the MinkowskiEngine 0.5.4 sdist so its CUDA extension builds with CUDA 12 and 13.

MinkowskiEngine's last release predates CUDA 12. Newer toolkits broke it in three ways,
all fixed here without changing what the library computes:

1. Thrust (CCCL 2.x/3.x) stopped including its algorithm headers transitively, so
   ``thrust::device``, ``thrust::remove_if``, ``thrust::unique``, ``thrust::count_if``, ...
   are undeclared. We add the explicit ``#include <thrust/...>`` lines (and ``<cstdint>``).
2. The bundled cuDF NVTX header declares ``nvtx3::`` types that collide with the NVTX3
   headers Thrust/CUB now include ("ambiguous domain/category"). It only wraps one
   function in a profiler range, so that range becomes a no-op and the header is dropped.
3. CCCL 3 (CUDA 13) removed ``thrust::unary_function``; the one functor deriving from it
   needs no base class (nothing reads its ``argument_type``/``result_type``).

Idempotent: running it twice changes nothing more. Fails loudly when a file or an
anchor it expects is missing, so a different MinkowskiEngine version cannot be patched
silently wrong.

Usage: python patch_cuda_sources.py PATH/TO/MinkowskiEngine-0.5.4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MARKER = "// bifusion: CUDA 12+ build patch"

# File (relative to src/) -> headers it uses but no longer gets transitively.
MISSING_INCLUDES: dict[str, list[str]] = {
    "3rdparty/concurrent_unordered_map.cuh": ["thrust/execution_policy.h", "thrust/count.h"],
    "convolution_kernel.cuh": ["thrust/execution_policy.h"],
    "coordinate_map_gpu.cu": [
        "thrust/execution_policy.h",
        "thrust/remove.h",
        "thrust/unique.h",
        "thrust/sort.h",
        "thrust/copy.h",
        "thrust/sequence.h",
        "thrust/transform.h",
        "thrust/reduce.h",
    ],
    "kernel_map.cuh": ["thrust/execution_policy.h", "thrust/sort.h", "thrust/copy.h"],
    "storage.cuh": ["thrust/execution_policy.h", "thrust/fill.h"],
    "spmm.cu": ["thrust/execution_policy.h", "thrust/reduce.h", "thrust/sort.h"],
    "broadcast_kernel.cu": ["thrust/execution_policy.h", "thrust/fill.h"],
    "pooling_avg_kernel.cu": ["thrust/execution_policy.h", "thrust/reduce.h", "thrust/sort.h"],
    "pooling_max_kernel.cu": ["thrust/execution_policy.h", "thrust/reduce.h", "thrust/sort.h"],
    "coordinate_map_functors.cuh": ["thrust/pair.h"],
    "gpu.cuh": ["cstdint"],
}

# (file, exact old text, new text): the NVTX collision and the removed base class.
REPLACEMENTS: list[tuple[str, str, str]] = [
    (
        "3rdparty/concurrent_unordered_map.cuh",
        "#include <cudf/detail/nvtx/ranges.hpp>\n",
        "// The bundled cuDF NVTX header clashes with CCCL's NVTX3; its only use is a\n"
        "// profiler range, so it becomes a no-op.\n"
        "#ifndef CUDF_FUNC_RANGE\n#define CUDF_FUNC_RANGE()\n#endif\n",
    ),
    (
        "coordinate_map_functors.cuh",
        "struct find_coordinate\n    : public thrust::unary_function<uint32_t,\n"
        "                                    thrust::pair<uint32_t, uint32_t>> {\n",
        "struct find_coordinate {\n",
    ),
]


class PatchError(RuntimeError):
    pass


def add_includes(text: str, headers: list[str]) -> str:
    """Insert the missing ``#include`` lines right after the file's first include.

    After the first include keeps them inside any include guard that precedes it.
    """
    wanted = [h for h in headers if f"#include <{h}>" not in text]
    if not wanted:
        return text
    lines = text.splitlines(keepends=True)
    first = next((i for i, line in enumerate(lines) if line.lstrip().startswith("#include")), None)
    if first is None:
        raise PatchError("no #include line to anchor on")
    block = [f"{MARKER}\n", *(f"#include <{h}>\n" for h in wanted)]
    return "".join(lines[: first + 1] + block + lines[first + 1 :])


def replace_once(text: str, old: str, new: str) -> str:
    if new in text and old not in text:
        return text  # already patched
    if text.count(old) != 1:
        raise PatchError(f"expected exactly one occurrence of {old.splitlines()[0]!r}")
    return text.replace(old, new)


def patch_tree(root: Path) -> list[str]:
    """Patch ``root/src`` in place; returns the files that changed."""
    src = root / "src"
    if not src.is_dir():
        raise PatchError(f"{root} has no src/ folder: not a MinkowskiEngine source tree")
    new_text: dict[str, str] = {}

    def current(name: str) -> str:
        if name not in new_text:
            path = src / name
            if not path.is_file():
                raise PatchError(f"missing source file src/{name}")
            new_text[name] = path.read_text()
        return new_text[name]

    for name, old, new in REPLACEMENTS:
        try:
            new_text[name] = replace_once(current(name), old, new)
        except PatchError as err:
            raise PatchError(f"src/{name}: {err}") from None
    for name, headers in MISSING_INCLUDES.items():
        try:
            new_text[name] = add_includes(current(name), headers)
        except PatchError as err:
            raise PatchError(f"src/{name}: {err}") from None

    changed = []
    for name, text in new_text.items():
        path = src / name
        if path.read_text() != text:
            path.write_text(text)
            changed.append(name)
    return sorted(changed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source_dir", type=Path, help="unpacked MinkowskiEngine sdist")
    args = parser.parse_args(argv)
    try:
        changed = patch_tree(args.source_dir)
    except PatchError as err:
        print(f"patch_cuda_sources: {err}", file=sys.stderr)
        return 1
    print(f"patched {len(changed)} files: {', '.join(changed) or '(already patched)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
