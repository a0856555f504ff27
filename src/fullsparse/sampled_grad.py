"""The sampled weight gradients of :mod:`fullsparse.sampling` as products.

- Linear: units are the rows of the flattened ``X [M, d_in]`` / ``dY [M, d_out]`` (batch ×
  tokens); ``dW = dY_Sᵀ·diag(1/p)·X_S`` over the kept rows S.
- Conv2d: ``rand_half`` keeps every second output column from a random phase: a
  convolution of stride ``(sh, 2·sw)``, as the FST half-size product. The importance-sampled
  modes sample *blocks* (``unit="block"``, the default): unit ``2n + q`` is sample n's output
  columns of parity q (q = 0: even, 1: odd), and each kept unit goes into one of two such
  strided half-size products (the even blocks of their samples, the odd blocks of theirs) —
  any 2 or 3 of every 4 units, at the kept share of the dense product's FLOPs, with no
  gather along the width. ``unit="sample"``: unit n is sample n, scored ``‖dY_n‖·‖X_n‖``,
  and the kept samples go into one full-width product (one call, no padding copy: on a CPU
  about half the block products' time at the same share, ``docs/benchmarks/cpu-steps.md``).

``state``: a layer's :class:`~fullsparse.sampling.AdaptiveState` tensor, or None (a functional
call: nothing is counted, and ``is_adaptive`` keeps 2 of 4 like ``is_half``).

Both products are registered as custom operators (``fullsparse::linear_sampled_grad_weight``,
``fullsparse::conv_sampled_grad_weight``): their draws, data-dependent sizes and the state
they update are opaque to ``torch.compile``, which sees one op of a known output shape.
Eager calls run the same implementation directly (the op's dispatch costs tens of µs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fullsparse import native, sampling
from fullsparse.clock import sampling_part
from fullsparse.geometry import ConvGeometry
from fullsparse.kernels.reference import conv_backward
from fullsparse.sampling import (
    AdaptiveState,
    draw_plan,
    half_count,
    random_phase,
    sample_units,
)

__all__ = [
    "linear_sampled_grad_weight",
    "conv_sampled_grad_weight",
    "token_scores",
    "block_scores",
    "sample_scores",
    "sampling_work",
]


def _work_dtype(t: Tensor) -> torch.dtype:
    """Scores and probabilities in float32 at least (float64 stays float64)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@sampling_part
def token_scores(x2: Tensor, dy2: Tensor) -> Tensor:
    """``‖dY_t‖·‖X_t‖`` per row ``[M]``: the Frobenius norm of row t's term ``dY_tᵀ X_t``."""
    fast = native.row_norm_products(x2, dy2)  # float32 on a CPU: one native pass
    if fast is not None:
        return fast
    dtype = _work_dtype(x2)
    dy_norm = torch.linalg.vector_norm(dy2, dim=1, dtype=dtype)
    return dy_norm * torch.linalg.vector_norm(x2, dim=1, dtype=dtype)


def _window_index(cols: Tensor, kw: int, geo: ConvGeometry) -> Tensor:
    """Padded-input column of each tap of each output column ``[len(cols)·kw]``."""
    taps = torch.arange(kw, device=cols.device) * geo.dilation[1]
    return (cols[:, None] * geo.stride[1] + taps[None, :]).reshape(-1)


@sampling_part
def block_scores(x: Tensor, dy: Tensor, kw: int, geo: ConvGeometry) -> Tensor:
    """One score per unit ``2n + q`` ``[2N]``: ``‖dY[n, :, :, q::2]‖`` times the norm of the
    (zero-padded) input columns those output columns' windows read — an upper bound of the
    norm of the block's term (Cauchy-Schwarz)."""
    fast = native.block_scores(x, dy, kw, geo.stride[1], geo.dilation[1], geo.padding[1])
    if fast is not None:  # float32 NCHW on a CPU: one native pass over each
        return fast
    dtype = _work_dtype(x)
    n, pw, wo = x.shape[0], geo.padding[1], dy.shape[3]
    col2 = F.pad(_column_sq_sums(x, dtype), (pw, pw))  # [N, W + 2·pw]
    window = col2[:, _window_index(torch.arange(wo, device=x.device), kw, geo)]
    window = window.view(n, wo, kw).sum(2)  # [N, Wo]
    dy2 = _column_sq_sums(dy, dtype)  # [N, Wo]
    parts = [(dy2[:, q::2].sum(1) * window[:, q::2].sum(1)).sqrt() for q in (0, 1)]
    return torch.stack(parts, 1).reshape(-1)


@sampling_part
def sample_scores(x: Tensor, dy: Tensor) -> Tensor:
    """One score per sample ``[N]``: ``‖dY_n‖·‖X_n‖``, proportional to an upper bound of
    the norm of sample n's term of the weight gradient (each input entry is read by at
    most ``kh·kw`` windows; Cauchy-Schwarz): a Linear layer's token scores, with each
    sample flattened to one row."""
    n = x.shape[0]
    return token_scores(x.reshape(n, -1), dy.reshape(n, -1))


def _column_sq_sums(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``Σ t²`` per sample and column ``[N, W]`` of ``[N, C, H, W]`` (summed over one
    flattened axis: on a CPU about 3× faster than over two)."""
    return t.reshape(t.shape[0], -1, t.shape[3]).square().sum(1, dtype=dtype)


def _measured(
    state: Tensor,
    halves: tuple[Tensor, Tensor],
    estimate: Callable[[float], tuple[Tensor, int]],
    budget: float,
    units: int,
) -> Tensor:
    """A measuring call of ``is_adaptive``: returns the exact gradient ``G = G_A + G_B`` of
    the two half batches. Their difference estimates the minibatch noise
    ``V_b = ‖G_A − G_B‖²``; one draw of the estimator per keep count k ∈ {2, 3} (of 4),
    ``‖Ĝ_k − G‖²``, its variance ``V_s(k)`` (the sampler's own, covariances included)."""
    g_a, g_b = halves
    noise = float(torch.linalg.vector_norm(g_a - g_b, dtype=torch.float64).square())
    grad = g_a.add_(g_b)
    variances, kept = {}, units
    for k in (2, 3):
        g_k, kept_k = estimate(k / 4)
        variances[k] = float(torch.linalg.vector_norm(g_k - grad, dtype=torch.float64).square())
        kept += kept_k
    AdaptiveState.measure(state, variances, noise, budget)
    AdaptiveState.count(state, kept, units)
    return grad


@sampling_part
def _carrying_non_finite(grad: Tensor, *dropped: Tensor, known_bad: bool = False) -> Tensor:
    """``grad``, made NaN wherever it would otherwise hide a NaN or infinity of the units
    ``rand_half`` dropped (an overflow must reach the weight gradient, where the trainer and
    AMP's scaler look for it): one sum per dropped operand, added times 0 — 0 when finite;
    NaN at once where the caller found one (``known_bad``)."""
    if known_bad:
        return grad.add_(float("nan"))
    total = sum(t.sum(dtype=_work_dtype(t)) for t in dropped)
    return grad.add_(total * 0)


@sampling_part
def _kept_columns(dy: Tensor, phase: int) -> tuple[Tensor, bool | None]:
    """``(dY[..., phase::2], whether the other columns hold a NaN or an infinity)``: one
    native pass over a contiguous float32 dY; elsewhere the strided view and None (the
    caller checks the dropped columns itself)."""
    fast = native.half_columns(dy, phase)
    if fast is not None:
        return fast
    return dy[..., phase::2], None


@functools.lru_cache(maxsize=1024)
def _reads_all_of(
    hw: tuple[int, ...], khw: tuple[int, ...], geo: ConvGeometry, phase: int, wo: int
) -> bool:
    """Whether the output columns ``phase, phase + 2, …`` of ``wo``, over every output row,
    read every entry of an ``hw`` input through their ``khw`` windows: then a NaN or an
    infinity anywhere in X reaches the half-size product, and X needs no check of its own."""
    ho = geo.output_size(hw, khw)[0]
    rows = {r * geo.stride[0] - geo.padding[0] + t * geo.dilation[0]
            for r in range(ho) for t in range(khw[0])}  # fmt: skip
    cols = {c * geo.stride[1] - geo.padding[1] + t * geo.dilation[1]
            for c in range(phase, wo, 2) for t in range(khw[1])}  # fmt: skip
    return rows.issuperset(range(hw[0])) and cols.issuperset(range(hw[1]))


# --------------------------------------------------------------------------- Linear
#: a group's rows (X's and dY's, floats) up to which the draw and the copies of its kept
#: rows run in one pass with its scores (:func:`fullsparse.native.draw_rows`)
_FUSED_GROUP_FLOATS = 1 << 16
#: a single group of any size (``fst_is_batch``'s draw) is scored, drawn and copied in one
#: call too (its passes split among the threads)
_FUSED_ONE_GROUP = True


@sampling_part
def _kept_rows(x2: Tensor, dy2: Tensor, share: float, group: int) -> tuple[Tensor, Tensor]:
    """The product's operands: the kept rows of ``dY`` (divided by p) and of ``X``. Small
    groups, and a single group (``fst_is_batch``), draw and copy in the call that scores
    them. Rows are along the first dimension: a contiguous ``x2`` / ``dy2`` of more
    dimensions (a convolution's samples) goes to that call as it is, and its kept rows
    keep its shape; the separate calls take 2-D rows."""
    m = x2.shape[0]
    plan = draw_plan(m, share, group)
    if plan is None:
        return dy2, x2
    g, kept = plan
    u = sampling.uniforms(m // g, x2.device)  # (tests replace it)
    one_group = _FUSED_ONE_GROUP and m // g == 1
    if g * (x2.numel() + dy2.numel()) <= _FUSED_GROUP_FLOATS * m or one_group:
        fused = native.draw_rows(x2, dy2, g, kept, u, indices=False)
        if fused is not None:
            return fused[2], fused[3]
    x2, dy2 = x2.reshape(m, -1), dy2.reshape(m, -1)
    index, weight = sample_units(token_scores(x2, dy2), share, group, u)
    dy_kept = native.gather_rows(dy2, index, weight)
    x_kept = native.gather_rows(x2, index, index_checked=dy_kept is not None)  # same rows
    if dy_kept is None or x_kept is None:
        dy_kept = dy2.index_select(0, index).mul_(weight.to(dy2.dtype)[:, None])
        x_kept = x2.index_select(0, index)
    return dy_kept, x_kept


def _linear_impl(
    x2: Tensor,
    dy2: Tensor,
    mode: str,
    state: Tensor | None,
    budget: float,
    interval: int,
    group: int = 4,
    share: float = 0.5,
) -> Tensor:
    m = x2.shape[0]
    if mode == "rand_half":
        phase = random_phase(x2.device)
        AdaptiveState.count(state, half_count(m, phase), m)
        grad = dy2[phase::2].t().mm(x2[phase::2]).mul_(2)
        return _carrying_non_finite(grad, dy2[1 - phase :: 2], x2[1 - phase :: 2])

    def estimate(keep: float) -> tuple[Tensor, int]:
        dy_kept, x_kept = _kept_rows(x2, dy2, keep, group)
        return dy_kept.t().mm(x_kept), x_kept.shape[0]

    keep = share if mode == "is_half" else 0.5
    if mode == "is_adaptive" and state is not None:
        if AdaptiveState.due(state, interval) and m >= 2:
            h = m // 2
            halves = dy2[:h].t().mm(x2[:h]), dy2[h:].t().mm(x2[h:])
            return _measured(state, halves, estimate, budget, m)
        keep = AdaptiveState.keep(state) / 4
    grad, kept = estimate(keep)
    AdaptiveState.count(state, kept, m)
    return grad


_LINEAR_SCHEMA = (
    "(Tensor x2, Tensor dy2, str estimator, Tensor(a!)? state, float budget, int interval, "
    "int group, float share) -> Tensor"
)


@torch.library.custom_op(
    "fullsparse::linear_sampled_grad_weight", mutates_args=("state",), schema=_LINEAR_SCHEMA
)
def _linear_op(
    x2: Tensor,
    dy2: Tensor,
    estimator: str,
    state: Tensor | None,
    budget: float,
    interval: int,
    group: int,
    share: float,
) -> Tensor:
    return _linear_impl(x2, dy2, estimator, state, budget, interval, group, share)


@_linear_op.register_fake
def _(x2, dy2, estimator, state, budget, interval, group, share):  # type: ignore[no-untyped-def]
    return dy2.new_empty(dy2.shape[1], x2.shape[1])


def linear_sampled_grad_weight(
    x2: Tensor,
    dy2: Tensor,
    mode: str,
    state: Tensor | None = None,
    budget: float = 0.2,
    interval: int = 50,
    group: int = 4,
    share: float = 0.5,
) -> Tensor:
    """``dW [d_out, d_in]`` of a Linear layer from ``X [M, d_in]``, ``dY [M, d_out]``.
    ``group`` / ``share``: the sampling groups' size and the share ``is_half`` keeps."""
    args = (float(budget), int(interval), int(group), float(share))
    if not torch.compiler.is_compiling():  # eager: the same function, without the op dispatch
        return _linear_impl(x2, dy2, mode, state, *args)
    return _linear_op(x2, dy2, mode, state, *args)


# --------------------------------------------------------------------------- Conv2d
def _channels_like(t: Tensor, like: Tensor) -> Tensor:
    if like.is_contiguous(memory_format=torch.channels_last):
        return t.contiguous(memory_format=torch.channels_last)
    return t


def _half_geometry(
    geo: ConvGeometry, phase: int, cols: int
) -> tuple[ConvGeometry, tuple[int, int] | None]:
    """The geometry of the strided half-size product over the output columns ``phase,
    phase+2, …`` (``cols`` of them), and the width padding ``(left, right)`` its input needs
    (None: the input as it is). Column 1's window starts sw columns into the padded input:
    the odd phase pads the width by hand by ``(pw − sw, pw)`` (a crop where negative), then
    has no width padding in the product."""
    half = geo.with_stride((geo.stride[0], 2 * geo.stride[1]))
    if phase == 0 or cols == 0:  # (no column of this phase: a product of 0)
        return half, None
    sw, pw = geo.stride[1], geo.padding[1]
    odd = ConvGeometry(half.stride, (geo.padding[0], 0), geo.dilation, geo.groups)
    return odd, (pw - sw, pw)


@sampling_part
def _half_operands(
    x: Tensor, dy_half: Tensor, geo: ConvGeometry, phase: int
) -> tuple[Tensor, Tensor, ConvGeometry]:
    """``(input, dY, geometry)`` of the strided half-size product over the output columns
    ``phase, phase+2, …``, given ``dy_half = dY[..., phase::2]`` (any scaling applied)."""
    dy_half = _channels_like(dy_half.contiguous(), x)
    part, pad = _half_geometry(geo, phase, dy_half.shape[3])
    if pad is None:
        return x, dy_half, part
    return _channels_like(F.pad(x, pad), x), dy_half, part


@sampling_part
def _block_operands(
    x: Tensor, dy: Tensor, geo: ConvGeometry, units: Tensor, scale: Tensor
) -> list[tuple[Tensor, Tensor, ConvGeometry]]:
    """The strided half-size products of the kept units ``2n + q`` (one per parity, over
    that parity's samples in the units' order, their dY columns divided by p)."""
    odd = _half_geometry(geo, 1, dy.shape[3] // 2)
    if x.is_contiguous() and dy.is_contiguous():  # channels-last: the eager path
        left, right = odd[1] or (0, 0)
        fast = native.gather_blocks(x, dy, units, scale, left, x.shape[3] + left + right,
                                    index_checked=True)  # fmt: skip
        if fast is not None:
            x0, dy0, x1, dy1 = fast
            even = _half_geometry(geo, 0, dy0.shape[3])[0]
            return [p for p in ((x0, dy0, even), (x1, dy1, odd[0])) if p[0].shape[0]]
    parts = []
    for parity in (0, 1):
        chosen = (units % 2) == parity
        if not bool(chosen.any()):
            continue
        samples = units[chosen] // 2
        dy_q = dy[..., parity::2].index_select(0, samples)  # one half-size copy
        dy_q.mul_(scale[chosen].to(dy.dtype)[:, None, None, None])
        parts.append(_half_operands(x.index_select(0, samples), dy_q, geo, parity))
    return parts


@sampling_part
def _sample_operands(
    x: Tensor, dy: Tensor, samples: Tensor, scale: Tensor
) -> tuple[Tensor, Tensor]:
    """``(input, dY)`` of the full-width product over the kept ``samples`` (dY ÷ p)."""
    if x.is_contiguous() and dy.is_contiguous():  # whole samples are rows: native gathers
        n, m = x.shape[0], samples.numel()
        x_kept = native.gather_rows(x.view(n, -1), samples)
        dy_kept = native.gather_rows(dy.view(n, -1), samples, scale,
                                     index_checked=x_kept is not None)  # fmt: skip
        if x_kept is not None and dy_kept is not None:
            return x_kept.view(m, *x.shape[1:]), dy_kept.view(m, *dy.shape[1:])
    dy_kept = dy.index_select(0, samples).mul_(scale.to(dy.dtype)[:, None, None, None])
    return x.index_select(0, samples), _channels_like(dy_kept, x)


def _samples_as_rows(mode: str, unit: str, x: Tensor, dy: Tensor) -> bool:
    """Whether a convolution's draw takes its whole samples as rows (:func:`_sample_rows`):
    ``is_half`` over samples, ``x`` and ``dy`` contiguous. ``is_adaptive`` keeps the separate
    scores, which its measuring calls draw from twice."""
    return unit == "sample" and mode == "is_half" and x.is_contiguous() and dy.is_contiguous()


def _sample_rows(x: Tensor, dy: Tensor, share: float, group: int) -> tuple[Tensor, Tensor]:
    """``(input, dY)`` of the full-width product over the kept samples of contiguous ``x``
    and ``dy`` (dY ÷ p): each sample one row, scored, drawn and copied as a Linear layer's
    tokens are (:func:`_kept_rows`: one native call where it applies)."""
    dy_kept, x_kept = _kept_rows(x, dy, share, group)  # the native call takes them as rows
    m = x_kept.shape[0]
    if x_kept.shape[1:] != x.shape[1:]:  # the separate calls' 2-D rows
        x_kept, dy_kept = x_kept.view(m, *x.shape[1:]), dy_kept.view(m, *dy.shape[1:])
    return x_kept, dy_kept


def _products(weight: Tensor, parts: list[tuple[Tensor, Tensor, ConvGeometry]]) -> Tensor:
    """``Σ`` of the weight gradients of ``parts`` (``(input, dY, geometry)`` each)."""
    grad = None
    for x_p, dy_p, geo_p in parts:
        if dy_p.shape[3] == 0:  # no column of this parity
            continue
        part = conv_backward(dy_p, x_p, weight, geo_p, "weight")
        grad = part if grad is None else grad.add_(part)
    return torch.zeros_like(weight) if grad is None else grad


def conv_sampled_grad_weight(
    x: Tensor,
    dy: Tensor,
    weight: Tensor,
    geo: ConvGeometry,
    mode: str,
    state: Tensor | None = None,
    budget: float = 0.2,
    interval: int = 50,
    group: int = 4,
    share: float = 0.5,
    unit: str = "block",
) -> Tensor:
    """``dW`` (``weight``'s shape; its values are not read) of a convolution from
    ``X [N, Ci, H, W]`` and ``dY [N, Co, Ho, Wo]``. ``group`` / ``share``: the sampling
    groups' size (in units) and the share ``is_half`` keeps; ``unit``: ``block`` (units
    ``2n + q``) or ``sample`` (units n)."""
    if not torch.compiler.is_compiling():  # eager: the same function, without the op dispatch
        return _conv_impl(x, dy, weight, geo, mode, state, float(budget), int(interval),
                          int(group), float(share), unit)  # fmt: skip
    return _conv_op(
        x, dy, weight, list(geo.stride), list(geo.padding), list(geo.dilation), geo.groups,
        mode, state, float(budget), int(interval), int(group), float(share), unit,
    )  # fmt: skip


_CONV_SCHEMA = (
    "(Tensor x, Tensor dy, Tensor weight, int[] stride, int[] padding, int[] dilation, "
    "int groups, str estimator, Tensor(a!)? state, float budget, int interval, "
    "int group, float share, str unit) -> Tensor"
)


@torch.library.custom_op(
    "fullsparse::conv_sampled_grad_weight", mutates_args=("state",), schema=_CONV_SCHEMA
)
def _conv_op(
    x: Tensor,
    dy: Tensor,
    weight: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    estimator: str,
    state: Tensor | None,
    budget: float,
    interval: int,
    group: int,
    share: float,
    unit: str,
) -> Tensor:
    geo = ConvGeometry.make(tuple(stride), tuple(padding), tuple(dilation), groups)
    return _conv_impl(x, dy, weight, geo, estimator, state, budget, interval, group, share, unit)


@_conv_op.register_fake
def _(x, dy, weight, stride, padding, dilation, groups, estimator, state, budget, interval,  # type: ignore[no-untyped-def]
      group, share, unit):  # fmt: skip
    return torch.empty_like(weight)


def _conv_impl(
    x: Tensor,
    dy: Tensor,
    weight: Tensor,
    geo: ConvGeometry,
    mode: str,
    state: Tensor | None,
    budget: float,
    interval: int,
    group: int = 4,
    share: float = 0.5,
    unit: str = "block",
) -> Tensor:
    wo = dy.shape[3]
    if mode == "rand_half":
        phase = random_phase(x.device)
        AdaptiveState.count(state, half_count(wo, phase), wo)
        dy_half, dropped_bad = _kept_columns(dy, phase)
        grad = _products(weight, [_half_operands(x, dy_half, geo, phase)]).mul_(2)
        unread = [] if dropped_bad is not None else [dy[..., 1 - phase :: 2]]
        if not _reads_all_of(tuple(x.shape[2:]), tuple(weight.shape[2:]), geo, phase, wo):
            unread.append(x)  # some input the kept columns' windows skip: all of X checked
        return _carrying_non_finite(grad, *unread, known_bad=bool(dropped_bad))
    n = x.shape[0]
    per_sample = unit == "sample"
    if _samples_as_rows(mode, unit, x, dy):
        x_kept, dy_kept = _sample_rows(x, dy, share, group)
        AdaptiveState.count(state, x_kept.shape[0] * wo, n * wo)
        return conv_backward(dy_kept, x_kept, weight, geo, "weight")
    scores = sample_scores(x, dy) if per_sample else block_scores(x, dy, weight.shape[3], geo)

    def estimate(keep: float) -> tuple[Tensor, int]:
        units, scale = sample_units(scores, keep, group)
        if units.numel() == scores.numel():
            return conv_backward(_channels_like(dy, x), x, weight, geo, "weight"), n * wo
        if per_sample:
            x_kept, dy_kept = _sample_operands(x, dy, units, scale)
            return conv_backward(dy_kept, x_kept, weight, geo, "weight"), units.numel() * wo
        parts = _block_operands(x, dy, geo, units, scale)
        return _products(weight, parts), sum(d.shape[0] * d.shape[3] for _, d, _ in parts)

    keep = share if mode == "is_half" else 0.5
    if mode == "is_adaptive" and state is not None:
        if AdaptiveState.due(state, interval) and n >= 2:
            h = n // 2
            halves = (
                conv_backward(dy[:h], x[:h], weight, geo, "weight"),
                conv_backward(dy[h:], x[h:], weight, geo, "weight"),
            )
            return _measured(state, halves, estimate, budget, n * wo)
        keep = AdaptiveState.keep(state) / 4
    grad, kept = estimate(keep)
    AdaptiveState.count(state, kept, n * wo)
    return grad


# --------------------------------------------------------------------------- benchmarks
def sampling_work(
    mode: str,
    x: Tensor,
    dy: Tensor,
    weight: Tensor,
    geo: ConvGeometry | None = None,
    group: int = 4,
    share: float = 0.5,
    unit: str = "block",
) -> object:
    """What a sampled weight gradient does besides its product, as one call makes it: the
    scores, the draw and the operands (copies) of the product. ``geo`` None: a Linear layer
    (``x [M, d_in]``, ``dy [M, d_out]``); else a convolution. For the benchmark of the
    per-step overhead (:mod:`fullsparse.bench.steps`)."""
    if geo is None:
        if mode == "rand_half":
            phase = random_phase(x.device)
            return dy[phase::2], x[phase::2]
        return _kept_rows(x, dy, share, group)
    if mode == "rand_half":
        phase = random_phase(x.device)
        return _half_operands(x, _kept_columns(dy, phase)[0], geo, phase)
    if _samples_as_rows(mode, unit, x, dy):
        return _sample_rows(x, dy, share, group)
    if unit == "sample":
        samples, scale = sample_units(sample_scores(x, dy), share, group)
        return _sample_operands(x, dy, samples, scale)
    units, scale = sample_units(block_scores(x, dy, weight.shape[3], geo), share, group)
    return _block_operands(x, dy, geo, units, scale)
