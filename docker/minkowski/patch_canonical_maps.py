"""Patch the MinkowskiEngine 0.5.4 sdist so its CPU maps come out in one canonical order.

MinkowskiEngine builds its CPU kernel maps (which input row meets which output row at each
kernel offset) in OpenMP-parallel loops whose threads claim slots through an atomic
counter. Each offset gets the same set of (input, output) pairs every run, but in an order
set by thread timing. The CPU convolution gathers rows in that order and runs one gemm per
offset, and a row's result may round differently with its position in the gemm, so the
same input gave different bits from run to run (by about 1e-7) on some hosts.

The fix puts every offset's pairs in (output, input) order once the parallel loop is done
(in linear time where, as in every kernel offset, no output repeats):
the set of pairs is unchanged, only its order becomes a function of the coordinates
alone, whatever the thread count or timing. It covers every map built that way
(``kernel_map``, ``stride_map``, the field map and the interpolation map with its weights),
and ``origin_map``'s decomposition, whose ``std::sort`` compared outputs only, breaks
ties by input. The GPU code is untouched.

``bifusion.minkowski.check_canonical_maps`` tests the compiled result at start-up.

Idempotent, and fails loudly when an anchor it expects is missing, as the CUDA patch does.

Usage: python patch_canonical_maps.py PATH/TO/MinkowskiEngine-0.5.4
"""

from __future__ import annotations

import sys
from pathlib import Path

from patch_cuda_sources import apply_replacements, run_patch_command

# One order for every map, (output, input): placed by output in linear time where outputs
# are unique (every kernel offset), otherwise the pairs packed as (output << 32 | input)
# and sorted as integers, carrying the weights where a map has them.
SORT_HELPER = """\
// bifusion: canonical CPU map order. OpenMP threads fill each kernel offset's pairs in an
// order set by thread timing; the convolution's gemm rounds a row by its position, so the
// pairs are sorted by (out, in) to make every result independent of thread timing.
inline uint64_t map_pair_key(cpu_in_map const &in_map, cpu_out_map const &out_map, size_t i) {
  return (uint64_t(out_map[i]) << 32) | uint64_t(in_map[i]);
}

// Within one kernel offset every output row meets at most one input row, so the pairs
// are placed by output in linear time; a map whose outputs repeat (the stride and field
// maps) or span a range far wider than its size is sorted instead. Either way the result
// is the pairs in (out, in) order.
inline void sort_map_pairs(cpu_in_map &in_map, cpu_out_map &out_map, size_t const size) {
  using index_type = default_types::index_type;
  if (size < 2)
    return;
  index_type max_out = 0;
  for (size_t i = 0; i < size; ++i)
    max_out = std::max(max_out, out_map[i]);
  size_t const range = size_t(max_out) + 1;
  if (range <= 64 * size + 4096) {
    index_type const none = ~index_type(0); // indices are unsigned
    std::vector<index_type> in_at(range, none);
    bool unique = true;
    for (size_t i = 0; i < size && unique; ++i) {
      unique = in_at[out_map[i]] == none;
      in_at[out_map[i]] = in_map[i];
    }
    if (unique) {
      size_t j = 0;
      for (size_t out = 0; out < range; ++out)
        if (in_at[out] != none) {
          out_map[j] = static_cast<index_type>(out);
          in_map[j++] = in_at[out];
        }
      return;
    }
  }
  std::vector<uint64_t> keys(size);
  for (size_t i = 0; i < size; ++i)
    keys[i] = map_pair_key(in_map, out_map, i);
  std::sort(keys.begin(), keys.end());
  for (size_t i = 0; i < size; ++i) {
    out_map[i] = static_cast<index_type>(keys[i] >> 32);
    in_map[i] = static_cast<index_type>(keys[i] & 0xffffffffu);
  }
}

// The same order for a map that carries a weight per pair.
template <typename Dtype>
inline void sort_map_pairs(cpu_in_map &in_map, cpu_out_map &out_map, size_t const size,
                           std::vector<Dtype> &weights) {
  std::vector<std::pair<uint64_t, Dtype>> keyed(size);
  for (size_t i = 0; i < size; ++i)
    keyed[i] = {map_pair_key(in_map, out_map, i), weights[i]};
  std::sort(keyed.begin(), keyed.end(),
            [](auto const &l, auto const &r) { return l.first < r.first; });
  for (size_t i = 0; i < size; ++i) {
    out_map[i] = static_cast<default_types::index_type>(keyed[i].first >> 32);
    in_map[i] = static_cast<default_types::index_type>(keyed[i].first & 0xffffffffu);
    weights[i] = keyed[i].second;
  }
}

// Every offset's pairs sorted; offsets are independent, so they sort in parallel.
inline void sort_kernel_map(cpu_in_maps &in_maps, cpu_out_maps &out_maps) {
#pragma omp parallel for schedule(dynamic)
  for (int64_t k = 0; k < int64_t(in_maps.size()); ++k)
    sort_map_pairs(in_maps[k], out_maps[k], in_maps[k].size());
}

using cpu_kernel_map_reference = std::pair<cpu_in_maps &, cpu_out_maps &>;
"""

# (file, exact old text, new text). Each ``new`` contains its ``old``-side anchor changed,
# so replace_once sees an already patched file as done.
REPLACEMENTS: list[tuple[str, str, str]] = [
    (
        "src/kernel_map.hpp",
        "using cpu_kernel_map_reference = std::pair<cpu_in_maps &, cpu_out_maps &>;\n",
        SORT_HELPER,
    ),
    (
        # origin_map's decomposition: ties (one batch's rows) ordered by input too.
        "src/kernel_map.hpp",
        "      return l.second < r.second;\n    };\n    std::sort(in_out.begin(), in_out.end(), comp);\n",
        "      return l.second < r.second;\n    };\n"
        "    std::sort(in_out.begin(), in_out.end()); // bifusion: by (in, out), then stable\n"
        "    std::stable_sort(in_out.begin(), in_out.end(), comp);\n",
    ),
    (
        # field_map_kernel: one map, filled by racing threads.
        "src/coordinate_map_cpu.hpp",
        "  auto final_in_map = torch::empty(\n      {num_used},\n",
        "  sort_map_pairs(in_maps[0], out_maps[0], num_used); // bifusion: canonical order\n"
        "  auto final_in_map = torch::empty(\n      {num_used},\n",
    ),
    (
        # interpolation_map_weight_kernel: one map per neighbour, with weights.
        "src/coordinate_map_cpu.hpp",
        "  auto const total_num_used =\n",
        "  for (uint32_t i = 0; i < neighbor_volume; ++i) // bifusion: canonical order\n"
        "    sort_map_pairs(in_maps[i], out_maps[i], num_used[i], weights[i]);\n"
        "\n"
        "  auto const total_num_used =\n",
    ),
    (
        # kernel_map: one map per kernel offset.
        "src/coordinate_map_cpu.hpp",
        "      in_maps[i].resize(max_num);\n      out_maps[i].resize(max_num);\n    }\n\n"
        "    return std::make_pair(in_maps, out_maps);\n",
        "      in_maps[i].resize(max_num);\n      out_maps[i].resize(max_num);\n    }\n"
        "    sort_kernel_map(in_maps, out_maps); // bifusion: canonical order\n\n"
        "    return std::make_pair(in_maps, out_maps);\n",
    ),
    (
        # stride_map: one map, every input row once.
        "src/coordinate_map_cpu.hpp",
        "    return std::make_pair(move(in_maps), move(out_maps));\n",
        "    sort_kernel_map(in_maps, out_maps); // bifusion: canonical order\n"
        "    return std::make_pair(move(in_maps), move(out_maps));\n",
    ),
]


def patch_tree(root: Path) -> list[str]:
    """Patch ``root/src`` in place; returns the files that changed (names under src/)."""
    return [name.removeprefix("src/") for name in apply_replacements(root, REPLACEMENTS)]


def main(argv: list[str] | None = None) -> int:
    return run_patch_command("patch_canonical_maps", __doc__, patch_tree, argv)


if __name__ == "__main__":
    sys.exit(main())
