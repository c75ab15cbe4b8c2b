"""The CLIP tower's two patchwise convolutions (16×16 stride-16 patch embedding, 1×1
projection to 256 channels) as torch's convolution (oneDNN on a CPU) and as the matmul
over patches the encoder now uses (``bifusion.clip_tower.PatchwiseConv2d``): time on the
CPU, in one process, alternating, and the largest difference between the two results.

    python bench/patchwise_conv.py [--batch-size 4] [--rounds 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# bifusion first: it sets the thread environment before torch loads.
from bench.machine import describe  # noqa: E402
from bifusion import configure_threads  # noqa: E402
from bifusion.clip_tower import PatchwiseConv2d  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    import torch
    from torch import nn

    configure_threads()
    torch.manual_seed(0)
    b = args.batch_size
    cases = {
        "patch_embedding_16x16_stride_16": (nn.Conv2d(3, 768, 16, stride=16, bias=False), (b, 3, 224, 224)),
        "projection_1x1": (nn.Conv2d(768, 256, 1), (b, 768, 14, 14)),
    }
    rows = {}
    with torch.inference_mode():
        for name, (conv, shape) in cases.items():
            patchwise = PatchwiseConv2d.like(conv)
            x = torch.randn(shape)
            ms: dict[str, list[float]] = {"convolution": [], "patchwise_matmul": []}
            for _ in range(5):
                conv(x), patchwise(x)
            for r in range(args.rounds):
                pair = (("convolution", conv), ("patchwise_matmul", patchwise))
                for label, module in pair if r % 2 else pair[::-1]:
                    started = time.perf_counter()
                    module(x)
                    ms[label].append((time.perf_counter() - started) * 1000)
            rows[name] = {
                "input": list(shape),
                "median_ms": {k: round(statistics.median(v), 3) for k, v in ms.items()},
                "max_abs_difference": float((conv(x) - patchwise(x)).abs().max()),
            }
    print(json.dumps({"benchmark": "patchwise_conv", "machine": describe("cpu"), "cases": rows}, indent=2))


if __name__ == "__main__":
    main()
