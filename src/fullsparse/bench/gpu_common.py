"""What the GPU suite's sections share: its settings object, tolerances, targets, and the
description of the GPU it ran on."""

from __future__ import annotations

import contextlib
import math
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fullsparse.bench.harness import median_ms
from fullsparse.kernels import platform_for

__all__ = ["LAYER_RECIPES", "TOLERANCE", "TARGETS", "GpuContext", "gpu_info"]

#: Recipes the layer section times (the issue's list): dense, weight-only 2:4, FST ×2, FST ×3.
LAYER_RECIPES = ("dense", "srste", "fst2", "fst")
#: Relative Frobenius error allowed against the float32 reference (one rounding of the
#: inputs and of the result dominates: bf16 has 8 mantissa bits, fp16 11).
#: Compute dtypes of ``bench gpu --dtype``, by name.
GPU_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-5}
#: The issue's targets; reported in the table, not asserted anywhere.
TARGETS = {
    "fst_large_linear_total_speedup": 1.5,
    "fst_vit_b_step_speedup": 1.3,
    "fst_overhead_percent": 3.0,
}


@dataclass
class GpuContext:
    """The suite's settings and clock, handed to every section."""

    device: torch.device
    dtype: torch.dtype
    backend: str  # what sparse recipes run on: "auto" (GPU) or "emulation" (dry run)
    warmup: int
    repeats: int
    steps: int
    deadline: float
    dry_run: bool
    l2_bytes: int
    progress: Callable[[str], None]
    skipped: list[str]

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def amp(self) -> contextlib.AbstractContextManager:
        if self.dtype in (torch.float16, torch.bfloat16):
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def time(
        self, fn: Callable[[int], Any], warmup: int | None = None, repeats: int | None = None
    ) -> float:
        """Median ms of ``fn(i)`` (``i`` picks the rotating input) over ``repeats`` runs."""
        warmup = self.warmup if warmup is None else warmup
        repeats = self.repeats if repeats is None else repeats
        return median_ms(fn, warmup, repeats, self.device)

    def pool_size(self, bytes_per_item: int) -> int:
        """Enough rotating inputs that together they overflow L2 three times (2 to 8)."""
        return max(2, min(8, math.ceil(3 * self.l2_bytes / max(bytes_per_item, 1))))


def gpu_info(device: torch.device) -> dict[str, Any]:
    """Card, driver, torch, CUDA, cuDNN and cuSPARSELt versions, and the 2:4 library used."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cusparselt": None,
        "gpu": None,
        "capability": None,
        "driver": None,
        "sparse_library": None,
    }
    with contextlib.suppress(Exception):
        if torch.backends.cusparselt.is_available():
            info["cusparselt"] = torch.backends.cusparselt.version()
    if device.type != "cuda":
        return info
    platform = platform_for(device)
    info.update(
        gpu=platform.name,
        capability=platform.sm,
        sparse_library=platform.gemm,
        memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1),
    )
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        info["driver"] = out.splitlines()[0] if out else None
    return info
