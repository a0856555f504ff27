"""Which kernel runs a layer's GEMMs: the backend names, the rules, and the choice.

Backends (the ``backend=`` argument of :func:`fullsparse.functional.sparse_linear`,
:func:`~fullsparse.functional.sparse_conv2d`, the sparse modules and ``sparsify_``):

- ``"reference"`` — dense PyTorch ops on masked operands (any device, any float dtype).
- ``"semi_structured"`` — the recipe's 2:4 GEMMs on sparse tensor cores through
  ``torch.sparse`` semi-structured tensors. Raises :class:`BackendUnavailableError`, saying
  why and what to do, where it cannot run.
- ``"emulation"`` — the semi_structured data path (operand layout, im2col/col2im, 2:4 check
  of every packed operand) with dense products: runs anywhere, for CI and debugging.
- ``"auto"`` (default) — semi_structured where the rules below allow it, else reference;
  k×k convs are decided by one measurement per shape (:mod:`fullsparse.kernels.autotune`).
- ``"cpu_sparse"`` — the recipe's 2:4 products of Linear layers on a CPU's vector units
  (:mod:`fullsparse.kernels.cpu_sparse`: float32, AVX2 and FMA): ``output`` and
  ``grad_input`` where the recipe has a 2:4 weight operand along the reduction axis (rule 1),
  and a weight gradient from a dY that is 2:4 along the tokens (``mvue``,
  ``2:4_grad_output``). Convolutions, and a role without such an operand, run the
  reference path. Raises :class:`BackendUnavailableError` off a CPU, outside float32, or
  where the kernels cannot be built.

Rules, checked in this order (the first that fails is the reason in the report):

1. the recipe has a 2:4 *weight* operand along the GEMM's reduction axis: ``output`` when
   ``output`` is ``2:4``/``transposable`` (for a k×k conv, only in the ``im2col``
   ``conv_layout``); ``grad_input`` when its weight is ``S_Co(W_src)``
   or the transposable mask, and dY is dense. (``srste``'s grad_input weight ``S_K(W)ᵀ`` is
   2:4 along K, not Co: that role stays dense.)
2. the layer is a GEMM: Linear, or an ungrouped conv (1×1 stride-1 unpadded → a GEMM over
   ``[N·H·W, Ci]``; anything else → im2col).
3. a CUDA device with sparse tensor cores and a library PyTorch can call: sm_80+ with
   cuSPARSELt, or sm_8x with PyTorch's CUTLASS kernels (no cuSPARSELt on Hopper → none).
4. compute dtype float16 or bfloat16 (the autocast dtype under autocast).
5. the 2:4 operand's shape is a multiple of the library's minimum tile
   (``torch.sparse``'s ``_DTYPE_SHAPE_CONSTRAINTS``: cuSPARSELt 16×16, CUTLASS 32×64 for
   fp16/bf16): ``output`` operand ``[Co, K]``, ``grad_input`` operand ``[K, Co]``. The dense
   operand is padded by PyTorch and has no rule.
6. ``auto`` only: a 1×1 conv runs as a GEMM only on channels-last input (NCHW would need a
   copy of the activation each way); a k×k conv is measured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from fullsparse.config import SPARSE_ALONG, SparsityConfig
from fullsparse.errors import UserError
from fullsparse.geometry import ConvGeometry
from fullsparse.kernels.autotune import AUTOTUNER, Autotuner
from fullsparse.kernels.cpu_sparse import CpuSparseGemm, unavailable_reason
from fullsparse.kernels.reference import REFERENCE_CONV, REFERENCE_LINEAR
from fullsparse.kernels.selfcheck import self_checked
from fullsparse.kernels.semi_structured import (
    EmulatedGemm,
    Gemm1x1ConvKernel,
    GemmLinearKernel,
    Im2colConvKernel,
    SemiStructuredGemm,
)
from fullsparse.kernels.tracing import cache_outside_compile, is_compiling
from fullsparse.operands import weight_operands

__all__ = [
    "BACKENDS",
    "HALF_DTYPES",
    "BackendUnavailableError",
    "Platform",
    "LayerShape",
    "KernelPlan",
    "check_backend",
    "platform_for",
    "clear_platform_cache",
    "sparse_limits",
    "recipe_role_reasons",
    "plan_layer",
    "predict_plan",
    "kernel_for_plan",
    "select_linear_kernel",
    "select_conv_kernel",
    "conv_autotune_key",
]

BACKENDS: tuple[str, ...] = ("auto", "reference", "semi_structured", "emulation", "cpu_sparse")
HALF_DTYPES = (torch.float16, torch.bfloat16)
#: torch.sparse's minimum 2:4 operand tile (rows, cols) for fp16/bf16, used if a torch
#: version lacks the table this module reads.
_FALLBACK_LIMITS = {"cusparselt": (16, 16), "cutlass": (32, 64)}

_HOW = (
    "use backend='auto' to fall back to the reference path where the kernel cannot run, or "
    "backend='emulation' to run the same GEMM layout with dense products on any device"
)


class BackendUnavailableError(UserError, ValueError):
    """``backend='semi_structured'`` was asked for where it cannot run; the message says why
    and how to get it."""


def check_backend(backend: object) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


# --------------------------------------------------------------------------- the platform
@dataclass(frozen=True)
class Platform:
    """What a device offers the 2:4 kernels."""

    device_type: str  # "cpu", "cuda", ...
    name: str = ""
    capability: tuple[int, int] | None = None
    cusparselt: bool = False

    @property
    def sm(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}" if self.capability else "?"

    @property
    def gemm(self) -> str | None:
        """The library the semi_structured backend uses here, or None."""
        if self.device_type != "cuda" or self.capability is None or self.capability < (8, 0):
            return None
        if self.cusparselt:
            return "cusparselt"
        return "cutlass" if self.capability[0] == 8 else None

    def why_not(self) -> str | None:
        """Short reason the 2:4 kernels cannot run here (None if they can)."""
        if self.device_type != "cuda":
            return self.device_type.upper()
        if self.capability is None:
            return "CUDA not available"
        if self.capability < (8, 0):
            return f"{self.name} ({self.sm}) has no 2:4 sparse tensor cores (needs sm_80+)"
        if self.gemm is None:
            return (
                f"no cuSPARSELt in this PyTorch, and its CUTLASS 2:4 kernels run on sm_8x only "
                f"({self.name} is {self.sm})"
            )
        return None

    def how_to_get(self) -> str:
        """What to do so that semi_structured can run (for error messages)."""
        if self.device_type != "cuda":
            extra = "" if torch.cuda.is_available() else " (this PyTorch sees no CUDA device)"
            return (
                f"move the model and inputs to a CUDA GPU with sparse tensor cores (Ampere "
                f"sm_80 or newer){extra}"
            )
        if self.capability is not None and self.capability < (8, 0):
            return "run on an Ampere (sm_80) or newer GPU"
        return (
            "install a PyTorch CUDA build that ships cuSPARSELt (the official pip and conda "
            "CUDA wheels do; check torch.backends.cusparselt.is_available())"
        )


@cache_outside_compile(maxsize=64)
def _cuda_platform(index: int) -> Platform:
    if not torch.cuda.is_available():
        return Platform("cuda", "(no CUDA device)")
    return Platform(
        "cuda",
        torch.cuda.get_device_name(index),
        tuple(torch.cuda.get_device_capability(index)),  # type: ignore[arg-type]
        bool(torch.backends.cusparselt.is_available()),
    )


def platform_for(device: torch.device | str) -> Platform:
    """The :class:`Platform` of ``device`` (CUDA properties are looked up once per GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return Platform(device.type)
    if not torch.cuda.is_available():
        return Platform("cuda", "(no CUDA device)")
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_platform(index)


def clear_platform_cache() -> None:
    """Forget looked-up GPU properties (tests that mock ``torch.cuda`` call this)."""
    _cuda_platform.cache_clear()
    plan_layer.cache_clear()


def sparse_limits(gemm: str, dtype: torch.dtype) -> tuple[int, int]:
    """Minimum (rows, cols) tile of the 2:4 operand for ``gemm`` in ``dtype``, from torch."""
    if gemm == "emulation":
        return (1, 1)
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cls = (
        SparseSemiStructuredTensorCUSPARSELT
        if gemm == "cusparselt"
        else SparseSemiStructuredTensorCUTLASS
    )
    entry = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", {}).get(dtype)
    if entry is None:
        return _FALLBACK_LIMITS[gemm]
    return (int(entry.sparse_min_rows), int(entry.sparse_min_cols))


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class LayerShape:
    """The static facts about a layer that the rules read."""

    kind: str  # "linear" | "conv"
    weight_shape: tuple[int, ...]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @classmethod
    def conv(cls, weight_shape: tuple[int, ...], geo: ConvGeometry) -> LayerShape:
        return cls(
            "conv",
            tuple(weight_shape),
            tuple(geo.stride),
            tuple(geo.padding),
            tuple(geo.dilation),
            int(geo.groups),
        )

    @property
    def gemm_dims(self) -> tuple[int, int, str, str]:
        """(rows, cols, rows name, cols name) of the ``output`` operand ``[Co, K]``."""
        if self.kind == "linear":
            return self.weight_shape[0], self.weight_shape[1], "d_out", "d_in"
        co = self.weight_shape[0]
        k = 1
        for s in self.weight_shape[1:]:
            k *= s
        return co, k, "Co", "K"

    @property
    def is_1x1_gemm(self) -> bool:
        return (
            self.kind == "conv"
            and tuple(self.weight_shape[2:]) == (1, 1)
            and self.stride == (1, 1)
            and self.padding == (0, 0)
            and self.groups == 1
        )


@dataclass(frozen=True)
class KernelPlan:
    """How one layer's GEMMs run.

    ``backend`` is the resolved backend (``auto`` only while a k×k conv awaits its one-time
    measurement, ``measure=True``); ``path`` the data path (``linear``, ``conv``, ``conv1x1``
    or ``im2col``); ``output``/``grad_input`` whether that role runs on the 2:4 GEMM;
    ``gemm`` the library (``cusparselt``, ``cutlass``, ``emulation``); ``reason`` why.
    """

    backend: str
    path: str
    output: bool = False
    grad_input: bool = False
    gemm: str | None = None
    measure: bool = False
    reason: str = ""

    @property
    def summary(self) -> str:
        return f"{self.backend}: {self.reason}" if self.reason else self.backend


def recipe_role_reasons(config: SparsityConfig) -> tuple[str | None, str | None]:
    """Why the recipe's ``output`` / ``grad_input`` GEMM has no 2:4 weight operand along its
    reduction axis (None where it has one), read from the operand table."""
    ops = config.operands
    along_k = "K" in SPARSE_ALONG[ops.output_weight].split(",")
    out_why = None if along_k else "output weight is dense"
    gi_along = SPARSE_ALONG[ops.grad_input_weight].split(",")
    if ops.grad_input_dy != "dY":
        gi_why: str | None = f"grad_input prunes dY ({ops.grad_input_dy}), not its weight"
    elif "Co" in gi_along:
        gi_why = None
    elif "K" in gi_along:
        gi_why = f"grad_input weight {ops.grad_input_weight}ᵀ is 2:4 along K, not along Co"
    else:
        gi_why = "grad_input weight is dense"
    return out_why, gi_why


def _shape_why(rows: int, cols: int, limits: tuple[int, int], names: tuple[str, str]) -> str | None:
    problems = [
        f"{name}={size} not a multiple of {m}"
        for size, m, name in ((rows, limits[0], names[0]), (cols, limits[1], names[1]))
        if size % m or size < m
    ]
    return ", ".join(problems) or None


def _reference(layer: LayerShape, reason: str) -> KernelPlan:
    return KernelPlan("reference", layer.kind, reason=reason)


def _unavailable(
    layer: LayerShape, config: SparsityConfig, why: str, how: str, backend: str = "semi_structured"
) -> BackendUnavailableError:
    what = f"{layer.kind} layer with weight {'x'.join(map(str, layer.weight_shape))}"
    return BackendUnavailableError(
        f"backend={backend!r} cannot run this {what} (recipe {config.name!r}): {why}; {how}"
    )


def _cpu_sparse_plan(
    layer: LayerShape, config: SparsityConfig, platform: Platform, compute_dtype: torch.dtype
) -> KernelPlan:
    """The ``cpu_sparse`` backend's plan (module docstring)."""
    why = None
    if platform.device_type != "cpu":
        why = f"the layer is on {platform.device_type.upper()}, not the CPU"
    elif compute_dtype != torch.float32:
        why = f"compute dtype {str(compute_dtype).replace('torch.', '')}; the kernels are float32"
    else:
        why = unavailable_reason()
    if why:
        how = "use backend='reference' or 'auto'"
        raise _unavailable(layer, config, why, how, backend="cpu_sparse")
    if layer.kind != "linear":
        return _reference(layer, "cpu_sparse runs Linear layers; convolutions run the reference")
    out_why, gi_why = recipe_role_reasons(config)
    rows, cols, rn, cn = layer.gemm_dims
    out_why = out_why or (f"{cn}={cols} not a multiple of 4" if cols % 4 else None)
    gi_why = gi_why or (f"{rn}={rows} not a multiple of 4" if rows % 4 else None)
    roles = (("output", out_why), ("grad_input", gi_why))
    notes = [f"{role} on reference: {why}" for role, why in roles if why]
    return KernelPlan(
        "cpu_sparse", "linear", not out_why, not gi_why, "cpu_sparse", reason="; ".join(notes)
    )


@cache_outside_compile(maxsize=4096)
def plan_layer(
    layer: LayerShape,
    config: SparsityConfig,
    backend: str,
    platform: Platform,
    compute_dtype: torch.dtype,
    channels_last: bool | None = None,
) -> KernelPlan:
    """Apply the rules (module docstring) to one layer. Explicit ``semi_structured`` raises
    :class:`BackendUnavailableError` where a rule fails; ``auto`` falls back with a reason.

    ``channels_last``: whether a conv's input is channels-last (None: unknown, e.g. for a
    report made before any forward).
    """
    check_backend(backend)
    explicit = backend == "semi_structured"
    if backend == "reference":
        return _reference(layer, "requested")
    if backend == "cpu_sparse":
        return _cpu_sparse_plan(layer, config, platform, compute_dtype)
    out_why, gi_why = recipe_role_reasons(config)
    if (
        out_why is None
        and config.conv_layout == "channel"
        and layer.kind == "conv"
        and layer.weight_shape[2] * layer.weight_shape[3] > 1
    ):
        # the im2col GEMM reads W2's rows (ci, kh, kw); S_K in the channel layout is 2:4
        # along ci at each tap, which those rows are not
        out_why = "conv_layout='channel': S_K(W) is 2:4 along Ci per tap, not along im2col rows"
    if out_why and gi_why:
        if explicit:
            raise _unavailable(
                layer,
                config,
                f"the recipe has no 2:4 weight operand ({out_why}; {gi_why})",
                "use backend='reference' or 'auto'",
            )
        return _reference(layer, f"recipe {config.name!r} has no 2:4 weight operand")
    if layer.kind == "conv" and layer.groups != 1:
        if explicit:
            raise _unavailable(
                layer,
                config,
                f"grouped conv (groups={layer.groups}) is one GEMM per group",
                "use backend='auto' or exclude the layer with sparsify_(filter_fn=...)",
            )
        return _reference(layer, f"grouped conv, groups={layer.groups}")
    path = "linear" if layer.kind == "linear" else "conv1x1" if layer.is_1x1_gemm else "im2col"
    role_notes = [f"grad_input on reference: {gi_why}"] if gi_why else []
    if out_why:
        role_notes.insert(0, f"output on reference: {out_why}")
    if backend == "emulation":
        return KernelPlan(
            "emulation", path, not out_why, not gi_why, "emulation", reason="; ".join(role_notes)
        )

    hw_why = platform.why_not()
    if hw_why:
        if explicit:
            raise _unavailable(layer, config, hw_why, f"{platform.how_to_get()}; or {_HOW}")
        return _reference(layer, hw_why)
    if compute_dtype not in HALF_DTYPES:
        dtype_name = str(compute_dtype).replace("torch.", "")
        why = f"compute dtype {dtype_name}; 2:4 kernels need float16 or bfloat16"
        if explicit:
            raise _unavailable(
                layer,
                config,
                why,
                "train under torch.autocast('cuda', dtype=torch.bfloat16) or cast the layer to "
                f"bfloat16/float16; or {_HOW}",
            )
        return _reference(layer, why)
    gemm = platform.gemm
    assert gemm is not None
    limits = sparse_limits(gemm, compute_dtype)
    rows, cols, rn, cn = layer.gemm_dims
    out_shape = None if out_why else _shape_why(rows, cols, limits, (rn, cn))
    gi_shape = None if gi_why else _shape_why(cols, rows, limits, (cn, rn))
    if explicit and (out_shape or gi_shape):
        broken = "; ".join(
            f"{role} operand {shape} breaks {gemm}'s {limits[0]}x{limits[1]} tile rule: {why}"
            for role, shape, why in (
                ("output", f"[{rn}={rows}, {cn}={cols}]", out_shape),
                ("grad_input", f"[{cn}={cols}, {rn}={rows}]", gi_shape),
            )
            if why
        )
        raise _unavailable(
            layer, config, broken, "use backend='auto' or exclude it with sparsify_(filter_fn=...)"
        )
    out_ok, gi_ok = not out_why and not out_shape, not gi_why and not gi_shape
    if out_shape:
        role_notes.insert(0, f"output on reference: {out_shape}")
    if gi_shape:
        role_notes.append(f"grad_input on reference: {gi_shape}")
    if not (out_ok or gi_ok):
        # both operands are the same matrix transposed: say each broken size once
        problems = [p for w in (out_shape, gi_shape) if w for p in w.split(", ")]
        return _reference(layer, ", ".join(dict.fromkeys(problems)) or "; ".join(role_notes))
    if backend == "auto" and path == "conv1x1" and channels_last is False:
        return _reference(
            layer, "input is not channels_last (a 1x1 conv is a copy-free GEMM only then)"
        )
    if backend == "auto" and path == "im2col":
        return KernelPlan(
            "auto",
            path,
            out_ok,
            gi_ok,
            gemm,
            measure=True,
            reason="k x k conv: im2col + 2:4 GEMM or reference conv, measured once per shape",
        )
    return KernelPlan("semi_structured", path, out_ok, gi_ok, gemm, reason="; ".join(role_notes))


#: What the report assumes about a CUDA machine it cannot see (the model is on CPU now):
#: cuSPARSELt, which PyTorch's official CUDA wheels ship and Hopper needs.
_HYPOTHETICAL_GPU = Platform("cuda", "a CUDA GPU", (8, 0), cusparselt=True)


def predict_plan(
    layer: LayerShape,
    config: SparsityConfig,
    backend: str,
    device: torch.device | str,
    weight_dtype: torch.dtype,
    compute_dtype: torch.dtype | None = None,
) -> tuple[str, str]:
    """(backend, why) for the ``sparsify_`` report, judged before any forward.

    The device is the weight's; the compute dtype ``compute_dtype``, else the weight's if it
    is fp16/bf16, else bf16 autocast is assumed (and said). On a CPU the answer is
    "reference: CPU" plus what the layer would get on a cuSPARSELt GPU. Explicit
    ``semi_structured`` raises for what can already be known (recipe, grouping, shapes).
    """
    check_backend(backend)
    if backend in ("reference", "emulation"):
        return backend, plan_layer(layer, config, backend, _HYPOTHETICAL_GPU, torch.bfloat16).reason
    platform = platform_for(device)
    if backend == "cpu_sparse":
        plan = plan_layer(layer, config, backend, platform, compute_dtype or weight_dtype)
        return plan.backend, plan.reason
    assumed = compute_dtype is None and weight_dtype not in HALF_DTYPES
    dtype = compute_dtype or (weight_dtype if weight_dtype in HALF_DTYPES else torch.bfloat16)
    if platform.device_type != "cuda":
        on_gpu = plan_layer(layer, config, backend, _HYPOTHETICAL_GPU, dtype)
        label = "semi_structured" if backend == "semi_structured" else "reference"
        then = f"{on_gpu.backend} ({on_gpu.reason})" if on_gpu.reason else on_gpu.backend
        return label, f"{platform.why_not()} now; on a cuSPARSELt GPU in fp16/bf16: {then}"
    plan = plan_layer(layer, config, backend, platform, dtype)
    why = plan.reason
    if plan.path == "conv1x1" and backend == "auto" and plan.backend == "semi_structured":
        why = "; ".join(w for w in (why, "on channels_last input") if w)
    if assumed and plan.backend != "reference":
        why = "; ".join(w for w in (why, "under fp16/bf16 autocast (float32 runs reference)") if w)
    return plan.backend, why


# --------------------------------------------------------------------------- the kernels
@cache_outside_compile(maxsize=256)
def _kernel(kind: str, path: str, gemm: str, output: bool, grad_input: bool) -> Any:
    engine: Any
    if gemm == "emulation":
        engine = EmulatedGemm()
    elif gemm == "cpu_sparse":
        engine = CpuSparseGemm()
    else:
        engine = SemiStructuredGemm(gemm)
    if kind == "linear":
        return GemmLinearKernel(engine, output, grad_input)
    cls = Gemm1x1ConvKernel if path == "conv1x1" else Im2colConvKernel
    return cls(engine, output, grad_input)


def kernel_for_plan(plan: KernelPlan, kind: str) -> Any:
    """The kernel object a resolved plan names (stateless; shared between layers)."""
    if plan.backend == "reference":
        return REFERENCE_LINEAR if kind == "linear" else REFERENCE_CONV
    if plan.measure:
        raise ValueError("a plan awaiting measurement has no kernel yet (see select_conv_kernel)")
    assert plan.gemm is not None
    return _kernel(kind, plan.path, plan.gemm, plan.output, plan.grad_input)


def select_linear_kernel(
    backend: str, config: SparsityConfig, input: Tensor, weight: Tensor, compute_dtype: torch.dtype
) -> Any:
    """The kernel for one ``sparse_linear`` call (chosen before its autograd function runs)."""
    if backend == "reference":
        return REFERENCE_LINEAR
    platform = platform_for(input.device)
    plan = plan_layer(
        LayerShape("linear", tuple(weight.shape)), config, backend, platform, compute_dtype
    )
    if plan.backend == "cpu_sparse" and is_compiling():
        # the 2:4 CPU kernels are C calls a compile trace cannot see into: inside one the
        # reference products run (the same values to float32 rounding)
        return REFERENCE_LINEAR
    kernel = kernel_for_plan(plan, "linear")
    return self_checked(backend, kernel, "linear", config, input, weight, None, compute_dtype)


def conv_autotune_key(
    platform: Platform,
    compute_dtype: torch.dtype,
    input_shape: tuple[int, ...],
    layer: LayerShape,
    plan: KernelPlan,
    channels_last: bool,
) -> str:
    """Everything that changes the im2col-vs-conv race: device, library, versions, sizes."""
    dims = lambda t: "x".join(map(str, t))  # noqa: E731
    return "|".join(
        [
            platform.name,
            platform.sm,
            str(plan.gemm),
            f"torch {torch.__version__}",
            f"cuda {torch.version.cuda}",
            str(compute_dtype).replace("torch.", ""),
            f"x {dims(input_shape)}",
            f"w {dims(layer.weight_shape)}",
            f"s {dims(layer.stride)} p {dims(layer.padding)} d {dims(layer.dilation)}",
            "roles " + ("o" if plan.output else "-") + ("g" if plan.grad_input else "-"),
            "channels_last" if channels_last else "nchw",
        ]
    )


def _conv_candidates(
    plan: KernelPlan,
    config: SparsityConfig,
    input: Tensor,
    weight: Tensor,
    geo: ConvGeometry,
    compute_dtype: torch.dtype,
) -> dict[str, Callable[[], Any]]:
    """Thunks running output + grad_input of each candidate on stand-in operands (the
    recipe's own weight operands; random activations of the call's shapes)."""
    im2col = kernel_for_plan(replace(plan, backend="semi_structured", measure=False), "conv")
    with torch.no_grad():
        x = torch.randn(input.shape, device=input.device, dtype=compute_dtype)
        if input.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        ops = weight_operands(weight, config, geo.groups, compute_dtype, decay=False)
        w_out, w_gi = ops.output, ops.grad_input
        out_hw = geo.output_size(tuple(input.shape[2:]), tuple(weight.shape[2:]))
        dy = torch.randn(
            input.shape[0], weight.shape[0], *out_hw, device=x.device, dtype=compute_dtype
        )
        if input.is_contiguous(memory_format=torch.channels_last):
            dy = dy.contiguous(memory_format=torch.channels_last)

    def run(kernel: Any) -> Callable[[], Any]:
        def thunk() -> Any:
            with torch.no_grad(), torch.autocast(input.device.type, enabled=False):
                kernel.output(x, w_out, None, geo)
                return kernel.grad_input(dy, x, w_gi, geo)

        return thunk

    return {"reference": run(REFERENCE_CONV), "im2col": run(im2col)}


def select_conv_kernel(
    backend: str,
    config: SparsityConfig,
    input: Tensor,
    weight: Tensor,
    geo: ConvGeometry,
    compute_dtype: torch.dtype,
    *,
    autotuner: Autotuner | None = None,
) -> Any:
    """The kernel for one ``sparse_conv2d`` call. Under ``auto`` a k×k conv is timed once per
    shape (im2col + 2:4 GEMM vs the reference conv) and the winner cached on disk."""
    if backend == "reference":
        return REFERENCE_CONV
    platform = platform_for(input.device)
    layer = LayerShape.conv(tuple(weight.shape), geo)
    channels_last = input.is_contiguous(memory_format=torch.channels_last)
    plan = plan_layer(layer, config, backend, platform, compute_dtype, channels_last)
    if not plan.measure:
        kernel = kernel_for_plan(plan, "conv")
        return self_checked(backend, kernel, "conv", config, input, weight, geo, compute_dtype)
    tuner = autotuner or AUTOTUNER
    key = conv_autotune_key(platform, compute_dtype, tuple(input.shape), layer, plan, channels_last)
    record = tuner.lookup(key)
    if record is None or record.get("choice") not in ("reference", "im2col"):
        candidates = _conv_candidates(plan, config, input, weight, geo, compute_dtype)
        choice = tuner.choose(key, candidates)
    else:
        choice = record["choice"]
    if choice == "reference":
        return REFERENCE_CONV
    kernel = kernel_for_plan(replace(plan, backend="semi_structured", measure=False), "conv")
    return self_checked(backend, kernel, "conv", config, input, weight, geo, compute_dtype)
