"""How a sparse layer's GEMMs are computed: backends, dispatch rules, kernels.

The autograd functions in :mod:`fullsparse.functional` never ask which backend they run
on: :func:`select_linear_kernel` / :func:`select_conv_kernel` pick a kernel object before
the function is applied, and the function calls its ``output`` (Eq. 1) and
``grad_input`` (Eq. 2). ``grad_weight`` (Eq. 3) is the same everywhere: the FST weight
gradient is a half-size dense product that needs no sparse kernel.

Backends: ``reference`` (masked dense PyTorch ops), ``semi_structured`` (2:4 sparse tensor
cores through ``torch.sparse``), ``emulation`` (the semi_structured data path with dense
products, any device) and ``auto``, which checks each 2:4 kernel against the reference on
its first use (:mod:`fullsparse.kernels.selfcheck`). The rules are in
:mod:`fullsparse.kernels.dispatch`; the design and how to benchmark it in ``docs/gpu.md``.
"""

from fullsparse.kernels.autotune import AUTOTUNER, Autotuner, cache_dir
from fullsparse.kernels.dispatch import (
    BACKENDS,
    HALF_DTYPES,
    BackendUnavailableError,
    KernelPlan,
    LayerShape,
    Platform,
    check_backend,
    clear_platform_cache,
    conv_autotune_key,
    kernel_for_plan,
    plan_layer,
    platform_for,
    predict_plan,
    recipe_role_reasons,
    select_conv_kernel,
    select_linear_kernel,
    sparse_limits,
)
from fullsparse.kernels.reference import REFERENCE_CONV, REFERENCE_LINEAR
from fullsparse.kernels.selfcheck import KernelSelfCheckWarning, clear_selfcheck_cache

__all__ = [
    "AUTOTUNER",
    "Autotuner",
    "cache_dir",
    "BACKENDS",
    "HALF_DTYPES",
    "BackendUnavailableError",
    "KernelPlan",
    "LayerShape",
    "Platform",
    "check_backend",
    "clear_platform_cache",
    "conv_autotune_key",
    "kernel_for_plan",
    "plan_layer",
    "platform_for",
    "predict_plan",
    "recipe_role_reasons",
    "select_conv_kernel",
    "select_linear_kernel",
    "sparse_limits",
    "REFERENCE_CONV",
    "REFERENCE_LINEAR",
    "KernelSelfCheckWarning",
    "clear_selfcheck_cache",
]
