"""A first-use check of every 2:4 kernel that ``backend="auto"`` picks.

No test in CI can run the CUDA sparse kernels, and 2:4 libraries have given wrong results on
some GPUs (pytorch/ao#1617: cuSPARSELt on H100). So ``auto`` does not trust a kernel on its
word: the first time a layer of a given key — (layer kind, input shape, weight shape, conv
geometry, compute dtype, device, backend, kernel) — runs a role on a 2:4 kernel
(``output`` at the first forward, ``grad_input`` at the first backward), that call also runs
the reference path (:mod:`fullsparse.kernels.reference`) on the same operands and compares:

- agreement within the compute dtype's tolerance (:data:`TOLERANCE`, relative Frobenius
  error over the finite entries, and non-finite entries in the same places): the kernel's
  result is used; once every 2:4 role of the key passed, ``auto`` hands out the kernel
  itself, with no check left on the path;
- a larger error, a wrong shape, or an exception: the reference result is used for that
  call, :class:`KernelSelfCheckWarning` is issued once, naming the layer and the reason,
  and every later call of that key runs on the reference path.

The verdicts live for the process (:func:`clear_selfcheck_cache` forgets them). Inside a
``torch.compile`` trace nothing is compared (a comparison is a data-dependent branch): a
key already checked in eager mode gets its verdict, an unchecked one gets the kernel. An
explicit ``backend="semi_structured"`` is never checked: it is what was asked for.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fullsparse.kernels.reference import REFERENCE_CONV, REFERENCE_LINEAR
from fullsparse.kernels.tracing import is_compiling

__all__ = [
    "TOLERANCE",
    "KernelSelfCheckWarning",
    "checked_kernel",
    "self_checked",
    "selfcheck_verdict",
    "clear_selfcheck_cache",
]

#: Relative error allowed against the reference in the same compute dtype: the two differ
#: only in summation order, i.e. a few roundings of the result (bf16 has 8 mantissa bits,
#: fp16 11).
TOLERANCE = {
    torch.bfloat16: 2e-2,
    torch.float16: 5e-3,
    torch.float32: 1e-5,
    torch.float64: 1e-12,
}

_ROLES = ("output", "grad_input")


class KernelSelfCheckWarning(UserWarning):
    """A 2:4 kernel disagreed with the reference path (or raised) on its first call; the
    layer runs on the reference path from then on."""


@dataclass
class _Verdict:
    passed: set[str] = field(default_factory=set)
    failure: str | None = None


_VERDICTS: dict[tuple, _Verdict] = {}


def clear_selfcheck_cache() -> None:
    """Forget every verdict: the next call of each key is checked again."""
    _VERDICTS.clear()


def selfcheck_verdict(key: tuple) -> str:
    """``"unchecked"``, ``"checking"`` (some 2:4 role not yet compared), ``"passed"`` or
    ``"failed: <reason>"`` for a key (the tuple :func:`checked_kernel` builds)."""
    verdict = _VERDICTS.get(key)
    if verdict is None:
        return "unchecked"
    if verdict.failure:
        return f"failed: {verdict.failure}"
    return "checking" if verdict.passed != set(_sparse_roles_of_key(key)) else "passed"


def _sparse_roles(kernel: Any) -> list[str]:
    flags = (kernel.output_sparse, kernel.grad_input_sparse)
    return [role for role, on in zip(_ROLES, flags, strict=True) if on]


def _sparse_roles_of_key(key: tuple) -> list[str]:
    return list(key[-1])


def self_checked(
    backend: str,
    kernel: Any,
    kind: str,
    config: Any,
    input: Tensor,
    weight: Tensor,
    geo: Any,
    compute_dtype: torch.dtype,
) -> Any:
    """The dispatch hook: under ``auto``, a 2:4 kernel goes through :func:`checked_kernel`;
    the reference kernel, and every kernel of another backend, is returned as is."""
    if backend != "auto" or kernel.name == "reference":
        return kernel
    reference = REFERENCE_LINEAR if kind == "linear" else REFERENCE_CONV
    return checked_kernel(
        kernel,
        reference,
        kind=kind,
        input=input,
        weight=weight,
        geo=geo,
        compute_dtype=compute_dtype,
        backend=backend,
        recipe=config.name,
    )


def checked_kernel(
    kernel: Any,
    reference: Any,
    *,
    kind: str,
    input: Tensor,
    weight: Tensor,
    geo: Any,
    compute_dtype: torch.dtype,
    backend: str,
    recipe: str,
) -> Any:
    """What ``auto`` hands the autograd function instead of ``kernel``: the kernel itself
    once its key passed, ``reference`` once it failed, else a wrapper that checks the roles
    not yet compared on this call's data. ``kind`` is ``"linear"`` or ``"conv"``."""
    roles = tuple(_sparse_roles(kernel))
    if not roles:
        return kernel
    key = (
        kind,
        tuple(input.shape),
        tuple(weight.shape),
        geo,
        compute_dtype,
        str(input.device),
        backend,
        repr(kernel),
        roles,
    )
    verdict = _VERDICTS.get(key)
    if verdict is not None and verdict.failure:
        return reference
    if (verdict is not None and verdict.passed == set(roles)) or is_compiling():
        return kernel
    dims = "x".join(map(str, weight.shape))
    layer = f"{kind} layer with weight {dims} (recipe {recipe!r}, input {tuple(input.shape)})"
    return _CheckingKernel(kernel, reference, key, layer, compute_dtype)


class _CheckingKernel:
    """A kernel that compares each 2:4 role with the reference on its first call."""

    def __init__(
        self, kernel: Any, reference: Any, key: tuple, layer: str, dtype: torch.dtype
    ) -> None:
        self.kernel, self.reference, self.key, self.layer = kernel, reference, key, layer
        self.tolerance = TOLERANCE.get(dtype, 2e-2)
        self.dtype = dtype
        self.name = kernel.name
        self.output_sparse = kernel.output_sparse
        self.grad_input_sparse = kernel.grad_input_sparse

    def output(self, *args: Any) -> Tensor:
        return self._run("output", args)

    def grad_input(self, *args: Any) -> Tensor:
        return self._run("grad_input", args)

    def _run(self, role: str, args: tuple) -> Tensor:
        verdict = _VERDICTS.setdefault(self.key, _Verdict())
        if verdict.failure:
            return getattr(self.reference, role)(*args)
        if role in verdict.passed or role not in self.key[-1]:
            return getattr(self.kernel, role)(*args)
        want = getattr(self.reference, role)(*args)
        try:
            got = getattr(self.kernel, role)(*args)
        except Exception as exc:  # any failure of the kernel means: use the reference
            first_line = (str(exc).strip().splitlines() or [""])[0][:200]
            reason = f"{role} raised {type(exc).__name__}: {first_line}"
        else:
            reason = _disagreement(role, got, want, self.tolerance)
        if reason is None:
            verdict.passed.add(role)
            return got
        verdict.failure = reason
        dtype = str(self.dtype).replace("torch.", "")
        warnings.warn(
            f"fullsparse: the 2:4 kernel {self.kernel!r} for the {self.layer} in {dtype} "
            f"disagrees with the reference path on its first call ({reason}); this layer "
            "runs on the reference path from now on (see docs/gpu.md, 'Self-check')",
            KernelSelfCheckWarning,
            stacklevel=3,
        )
        return want

    def __repr__(self) -> str:
        return f"SelfChecked({self.kernel!r})"


def _disagreement(role: str, got: Any, want: Tensor, tolerance: float) -> str | None:
    """Why ``got`` is not ``want`` within ``tolerance``, or None."""
    if not isinstance(got, Tensor) or got.shape != want.shape:
        shape = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
        return f"{role} has shape {shape}, the reference {tuple(want.shape)}"
    g, w = got.detach().double(), want.detach().double()
    finite = torch.isfinite(w)
    if not torch.equal(torch.isfinite(g), finite):
        return f"{role} has non-finite values where the reference has finite ones, or the reverse"
    err = float((g - w)[finite].norm() / w[finite].norm().clamp_min(1e-30))
    if err > tolerance:
        return f"{role} relative error {err:.1e} > tolerance {tolerance:.0e}"
    return None
