"""Patch the MinkowskiEngine 0.5.4 sdist so its CUDA extension builds with CUDA 12 and 13.

MinkowskiEngine's last release predates CUDA 12. Newer toolkits broke it in three ways,
all fixed here without changing what the library computes:

1. Thrust (CCCL 2.x/3.x) stopped including its algorithm headers transitively, so
   ``thrust::device``, ``thrust::remove_if``, ``thrust::unique``, ``thrust::count_if``, ...
   are undeclared. We add the explicit ``#include <thrust/...>`` lines (and ``<cstdint>``).
2. The bundled cuDF NVTX header declares ``nvtx3::`` types that collide with the NVTX3
   headers Thrust/CUB now include ("ambiguous domain/category"). It only wraps one
   function in a profiler range, so that range becomes a no-op and the header is dropped.
3. CUDA 13 / CCCL 3:
   - ``thrust::unary_function`` is gone; the one functor deriving from it needs no base
     class (nothing reads its ``argument_type``/``result_type``);
   - ``cudaMemPrefetchAsync`` takes a ``cudaMemLocation`` and flags instead of a device
     ordinal: the cuDF hash map calls a small wrapper that picks the right form;
   - converting the hash map's ``unique_ptr`` to ``shared_ptr`` makes libstdc++'s unqualified
     ``__to_address`` ambiguous with libcu++'s (its type names ``cuda::std::pair``), so the
     map's factory returns the ``shared_ptr`` (same deleter) directly.

Idempotent: running it twice changes nothing more. Fails loudly when a file or an
anchor it expects is missing, so a different MinkowskiEngine version cannot be patched
silently wrong.

Usage: python patch_cuda_sources.py PATH/TO/MinkowskiEngine-0.5.4
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from functools import partial
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
    # ATen/core/Tensor.h: torch 2.14's ATen/cuda/CUDAUtils.h needs at::Tensor complete, and
    # spmm.cu includes it before torch/extension.h.
    "spmm.cu": ["thrust/execution_policy.h", "thrust/reduce.h", "thrust/sort.h", "ATen/core/Tensor.h"],
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
        "3rdparty/concurrent_unordered_map.cuh",
        "    return std::unique_ptr<Self, std::function<void(Self*)>>{\n"
        "      new Self(capacity, unused_element, unused_key, hash_function, equal, allocator, stream),\n"
        "      deleter};\n",
        "    return std::shared_ptr<Self>(\n"
        "      new Self(capacity, unused_element, unused_key, hash_function, equal, allocator, stream),\n"
        "      deleter);\n",
    ),
    (
        "3rdparty/concurrent_unordered_map.cuh",
        "#include <cudf/detail/utilities/device_atomics.cuh>\n",
        "#include <cudf/detail/utilities/device_atomics.cuh>\n"
        "\n"
        "// CUDA 13 prefetches to a cudaMemLocation (with flags) instead of a device ordinal.\n"
        "static inline cudaError_t me_prefetch_to_device(const void* ptr, size_t bytes, int device,\n"
        "                                                cudaStream_t stream) {\n"
        "#if CUDART_VERSION >= 13000\n"
        "  cudaMemLocation location{};\n"
        "  location.type = cudaMemLocationTypeDevice;\n"
        "  location.id = device;\n"
        "  return cudaMemPrefetchAsync(ptr, bytes, location, 0, stream);\n"
        "#else\n"
        "  return cudaMemPrefetchAsync(ptr, bytes, device, stream);\n"
        "#endif\n"
        "}\n",
    ),
    (
        "coordinate_map_functors.cuh",
        "struct find_coordinate\n    : public thrust::unary_function<uint32_t,\n"
        "                                    thrust::pair<uint32_t, uint32_t>> {\n",
        "struct find_coordinate {\n",
    ),
]


# (file, call pattern, replacement, how many calls the release has): every call is
# rewritten. The wrapper's own calls (``return cudaMemPrefetchAsync(``) are not matched.
CALL_RENAMES: list[tuple[str, str, str, int]] = [
    (
        "3rdparty/concurrent_unordered_map.cuh",
        r"(?<!return )\bcudaMemPrefetchAsync\(",
        "me_prefetch_to_device(",
        3,
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
    if new in text:
        return text  # already patched (``new`` may contain ``old`` when it only adds lines)
    if text.count(old) != 1:
        raise PatchError(f"expected exactly one occurrence of {old.splitlines()[0]!r}")
    return text.replace(old, new)


def edit_tree(root: Path, edits: list[tuple[str, Callable[[str], str]]]) -> list[str]:
    """Apply (file under ``root``, text -> text) edits in order. Writes only the files that
    changed, and none if any edit fails; returns the changed files."""
    if not (root / "src").is_dir():
        raise PatchError(f"{root} has no src/ folder: not a MinkowskiEngine source tree")
    new_text: dict[str, str] = {}
    for name, edit in edits:
        if name not in new_text:
            path = root / name
            if not path.is_file():
                raise PatchError(f"missing source file {name}")
            new_text[name] = path.read_text()
        try:
            new_text[name] = edit(new_text[name])
        except PatchError as err:
            raise PatchError(f"{name}: {err}") from None
    changed = [name for name, text in new_text.items() if (root / name).read_text() != text]
    for name in changed:
        (root / name).write_text(new_text[name])
    return sorted(changed)


def apply_replacements(root: Path, replacements: list[tuple[str, str, str]]) -> list[str]:
    """:func:`edit_tree` with (file under ``root``, old, new) replacements, each exactly once."""
    return edit_tree(
        root, [(name, partial(replace_once, old=old, new=new)) for name, old, new in replacements]
    )


def run_patch_command(name: str, doc: str, patch_tree: Callable[[Path], list[str]], argv) -> int:
    """A patch script's command line: patch the tree, say what changed, exit 1 on failure."""
    parser = argparse.ArgumentParser(prog=name, description=doc.split("\n\n")[0])
    parser.add_argument("source_dir", type=Path, help="unpacked MinkowskiEngine sdist")
    args = parser.parse_args(argv)
    try:
        changed = patch_tree(args.source_dir)
    except PatchError as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 1
    print(f"patched {len(changed)} files: {', '.join(changed) or '(already patched)'}")
    return 0


def rename_calls(text: str, pattern: str, new: str, expected: int) -> str:
    found = len(re.findall(pattern, text))
    if found == 0 and new in text:
        return text  # already patched
    if found != expected:
        raise PatchError(f"expected {expected} calls matching {pattern!r}, found {found}")
    return re.sub(pattern, new, text)


def patch_tree(root: Path) -> list[str]:
    """Patch ``root/src`` in place; returns the files that changed (names under src/)."""
    # Renames first: the wrapper inserted below calls the original function itself.
    edits = [
        (f"src/{name}", partial(rename_calls, pattern=pattern, new=new, expected=expected))
        for name, pattern, new, expected in CALL_RENAMES
    ]
    edits += [(f"src/{name}", partial(replace_once, old=old, new=new)) for name, old, new in REPLACEMENTS]
    edits += [
        (f"src/{name}", partial(add_includes, headers=headers)) for name, headers in MISSING_INCLUDES.items()
    ]
    return [name.removeprefix("src/") for name in edit_tree(root, edits)]


def main(argv: list[str] | None = None) -> int:
    return run_patch_command("patch_cuda_sources", __doc__, patch_tree, argv)


if __name__ == "__main__":
    sys.exit(main())
