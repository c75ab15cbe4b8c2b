"""Patch the MinkowskiEngine 0.5.4 sdist so its CPU convolution gives the same bits at any
thread count.

MinkowskiEngine's CPU convolution (and its transpose, which calls the same kernel) runs one
gemm per kernel offset, one offset after another, and leaves the parallelism to OpenBLAS.
OpenBLAS splits a gemm among its threads by its thread count, and a row can round
differently with the block it falls in (measured: 1e-7 apart at 1, 3 and 4 threads against
2, with ``OPENBLAS_CORETYPE=Haswell`` on an AMD host). With the maps already canonical
(patch_canonical_maps.py), that was the last thing a thread count could change.

The patched kernel parallelises with OpenMP over chunks of each offset's rows instead (a
fixed 2,048 rows, so the chunks never depend on the thread count): each chunk's gemm runs on
one OpenBLAS thread into its own slice of one buffer. The products are then added into
their output rows in offset order, as the original did, by threads that each own whole
output rows. Every number is computed by the same single-threaded gemm and summed in the
same order whatever the thread count or timing. OpenBLAS is held at one thread by the
kernel itself, at every call, so nothing the process sets can split a gemm again. The
backward kernels (training) are untouched, but their gemms run on that one thread too.

The CUDA build compiles these CPU sources with nvcc, which left out OpenMP: its CPU code
ran on one thread, and with this kernel its convolutions would too. Its host compiler now
gets ``-fopenmp`` as the CPU build's does.

The extension module says it carries the patch (``_C.deterministic_cpu_convolution``),
which ``bifusion.minkowski.check_cpu_determinism`` requires at start-up.

Idempotent, and fails loudly when an anchor it expects is missing, as the other patches do.

Usage: python patch_deterministic_convolution.py PATH/TO/MinkowskiEngine-0.5.4
"""

from __future__ import annotations

import sys
from pathlib import Path

from patch_cuda_sources import apply_replacements, run_patch_command

ORIGINAL_KERNEL_HEAD = """\
                                 const cpu_out_maps &out_maps) {
  int kernel_volume, n_active_in_volume, row;
  std::vector<Dtype> input_buffer, output_buffer;

  // Number of weights
  kernel_volume = in_maps.size();

  // Iterate through each spatial kernel out of filter_volume spatial kernels
  // for (auto &current_in2out : in2out) {
  for (int k = 0; k < kernel_volume; k++) {
    n_active_in_volume = in_maps[k].size();
    if (n_active_in_volume == 0)
      continue;

    input_buffer.resize(n_active_in_volume * in_nchannel);
    output_buffer.resize(n_active_in_volume * out_nchannel);

    // Gather all features (im2col)
    for (row = 0; row < n_active_in_volume; row++)
      std::memcpy(&input_buffer[row * in_nchannel],
                  p_in_feat + in_maps[k][row] * in_nchannel,
                  sizeof(Dtype) * in_nchannel);

    // C := alpha*op(A)*op(B) + beta*C
    cpu_gemm<Dtype>(CblasColMajor, CblasNoTrans, CblasNoTrans,
                    out_nchannel,                              // M
                    n_active_in_volume,                        // N
                    in_nchannel,                               // K
                    1,                                         // alpha
                    &p_kernel[k * in_nchannel * out_nchannel], // A
                    &input_buffer[0],                          // B
                    0,                                         // beta
                    &output_buffer[0]);                        // C

    // Put it back to the correct index
    for (row = 0; row < n_active_in_volume; row++) {
      Dtype *dst = &p_out_feat[out_maps[k][row] * out_nchannel];
      Dtype *src = &output_buffer[row * out_nchannel];
      cpu_add<Dtype>(out_nchannel, src, dst, dst);
    }
  }
}
"""

PATCHED_KERNEL_HEAD = """\
                                 const cpu_out_maps &out_maps) {
  // bifusion: the same bits at any thread count. Each kernel offset's rows go in chunks of
  // a fixed size; each chunk's gemm runs on one OpenBLAS thread into its own slice, chunks
  // in parallel. Then every output row adds its products in offset order, as before.
  hold_blas_to_one_thread();
  int const kernel_volume = in_maps.size();
  size_t const chunk_rows = 2048; // fixed, so a chunk never depends on the thread count
  std::vector<size_t> first_row(kernel_volume + 1, 0);
  std::vector<std::pair<int, size_t>> chunks; // (offset, its first row in the chunk)
  for (int k = 0; k < kernel_volume; k++) {
    first_row[k + 1] = first_row[k] + in_maps[k].size();
    for (size_t row = 0; row < in_maps[k].size(); row += chunk_rows)
      chunks.emplace_back(k, row);
  }
  std::unique_ptr<Dtype[]> products(new Dtype[first_row[kernel_volume] * out_nchannel]);

#pragma omp parallel for schedule(dynamic)
  for (int64_t c = 0; c < int64_t(chunks.size()); c++) {
    int const k = chunks[c].first;
    size_t const begin = chunks[c].second;
    int const rows = std::min(chunk_rows, in_maps[k].size() - begin);
    // Gather the chunk's features (im2col)
    std::vector<Dtype> input_buffer(size_t(rows) * in_nchannel);
    for (int row = 0; row < rows; row++)
      std::memcpy(&input_buffer[size_t(row) * in_nchannel],
                  p_in_feat + size_t(in_maps[k][begin + row]) * in_nchannel,
                  sizeof(Dtype) * in_nchannel);
    cpu_gemm<Dtype>(CblasColMajor, CblasNoTrans, CblasNoTrans, out_nchannel, rows,
                    in_nchannel, 1, &p_kernel[size_t(k) * in_nchannel * out_nchannel],
                    &input_buffer[0], 0,
                    &products[(first_row[k] + begin) * out_nchannel]);
  }

  // Put it back to the correct index. Each thread owns every output row of some blocks of
  // 64 rows, so no row has two writers, and each row's sum runs in offset order.
#pragma omp parallel
  {
#ifdef _OPENMP
    size_t const owners = omp_get_num_threads(), owner = omp_get_thread_num();
#else
    size_t const owners = 1, owner = 0;
#endif
    for (int k = 0; k < kernel_volume; k++)
      for (size_t row = 0; row < in_maps[k].size(); row++) {
        size_t const out_row = out_maps[k][row];
        if ((out_row / 64) % owners != owner)
          continue;
        Dtype *dst = &p_out_feat[out_row * out_nchannel];
        cpu_add<Dtype>(out_nchannel, &products[(first_row[k] + row) * out_nchannel], dst,
                       dst);
      }
  }
}
"""

HOLD_HELPER = """\
#ifdef _OPENMP
#include <omp.h>
#endif

namespace minkowski {

// bifusion: OpenBLAS splits a gemm by its thread count, and a row can round differently
// with its block: every gemm here runs on one thread (the offsets supply the parallelism).
inline void hold_blas_to_one_thread() {
#ifdef OPENBLAS_VERSION
  openblas_set_num_threads(1);
#endif
}
"""

MARKER_ANCHOR = '  m.def("is_cuda_available", &is_cuda_available);\n'
MARKER = (
    "  // bifusion: the CPU convolution gives the same bits at any thread count\n"
    '  m.attr("deterministic_cpu_convolution") = true;\n' + MARKER_ANCHOR
)

NVCC_ANCHOR = 'NVCC_FLAGS += ["--expt-relaxed-constexpr", "--expt-extended-lambda"]\n'
NVCC_OPENMP = (
    NVCC_ANCHOR + "# bifusion: the CPU sources nvcc compiles use OpenMP, as in the CPU build\n"
    'NVCC_FLAGS += ["-Xcompiler", "-fopenmp"]\n'
)

# (file under the source tree, exact old text, new text).
REPLACEMENTS: list[tuple[str, str, str]] = [
    ("src/convolution_kernel.hpp", "namespace minkowski {\n", HOLD_HELPER),
    ("src/convolution_kernel.hpp", ORIGINAL_KERNEL_HEAD, PATCHED_KERNEL_HEAD),
    # The CPU-only build's module and the CUDA build's.
    ("pybind/minkowski.cpp", MARKER_ANCHOR, MARKER),
    ("pybind/minkowski.cu", MARKER_ANCHOR, MARKER),
    ("setup.py", NVCC_ANCHOR, NVCC_OPENMP),
]


def patch_tree(root: Path) -> list[str]:
    """Patch ``root`` in place; returns the files that changed."""
    return apply_replacements(root, REPLACEMENTS)


def main(argv: list[str] | None = None) -> int:
    return run_patch_command("patch_deterministic_convolution", __doc__, patch_tree, argv)


if __name__ == "__main__":
    sys.exit(main())
