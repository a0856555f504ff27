"""Benchmarks: every suite times recipes against dense in the same process.

- :mod:`~fullsparse.bench.harness` — the one timing harness (interleaving, warm-up,
  medians, peak memory) and the machine description every result carries;
- :mod:`~fullsparse.bench.cases` — the layer shapes; :mod:`~fullsparse.bench.ops` — what
  the suites use of the layers below;
- the suites: :mod:`~fullsparse.bench.layers` (``fullsparse bench layers``, CPU, per GEMM
  role), :mod:`~fullsparse.bench.steps` (``fullsparse bench steps``, whole training steps),
  :mod:`~fullsparse.bench.gpu` (``fullsparse bench gpu``, CUDA);
- :mod:`~fullsparse.bench.report` — the tables.

Suites return JSON-ready dicts; printing and saving is the CLI's job.
"""

from fullsparse.bench.cases import RESNET18_SHAPES, ConvShape, resnet18_shapes
from fullsparse.bench.harness import interleaved_ms, machine_info, median_ms, peak_memory_bytes
from fullsparse.bench.layers import bench_layers
from fullsparse.bench.report import format_gpu, format_layers, format_steps
from fullsparse.bench.steps import STEP_CASES, bench_steps

__all__ = [
    "ConvShape",
    "RESNET18_SHAPES",
    "resnet18_shapes",
    "interleaved_ms",
    "machine_info",
    "median_ms",
    "peak_memory_bytes",
    "bench_layers",
    "bench_steps",
    "STEP_CASES",
    "format_layers",
    "format_gpu",
    "format_steps",
]
