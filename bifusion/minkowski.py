"""The one place MinkowskiEngine is imported.

MinkowskiEngine 0.5.4 still uses ``collections.Sequence``, removed in Python 3.10;
restore the alias before importing it. Everything in the project imports ``ME`` from
here.
"""

import collections
import collections.abc
import warnings

if not hasattr(collections, "Sequence"):
    collections.Sequence = collections.abc.Sequence

# MinkowskiEngine warns about OMP_NUM_THREADS on every import when it is unset: bifusion's
# import has set it already (threads.prepare_environment, for the process's CPU budget).

# Known, harmless warnings of MinkowskiEngine 0.5.4 on current PyTorch: the CPU-only
# notice on every import and a deprecated sparse constructor it calls internally.
warnings.filterwarnings("ignore", message="The MinkowskiEngine was compiled with CPU_ONLY flag")
warnings.filterwarnings("ignore", message=r"torch.sparse.SparseTensor\(indices, values, shape")

import MinkowskiEngine as ME  # noqa: E402

__all__ = ["ME"]
