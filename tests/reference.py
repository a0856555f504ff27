"""An independent float64 reference for the spec's math, written as plainly as it reads.

Nothing here calls fullsparse, ``F.conv2d``, ``F.unfold`` or autograd: im2col is explicit
slicing, col2im its explicit adjoint, masks are Python loops over groups of 4 with an
explicit sort, transposable masks a brute force over all 4×4 patterns, and the FST weight
gradient the paper's masked product ``(dY + α·dY·T)·F(Xᵀ)`` with T and F built as matrices.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

# --------------------------------------------------------------------------- masks


def ref_mask_rows(m: Tensor) -> Tensor:
    """2:4 along dim 1 of a 2-D matrix: per row, per group of 4 (zero-padded), keep the two
    largest |value| (ties to the lower index)."""
    rows, cols = m.shape
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    values = m.abs().tolist()
    for r in range(rows):
        for start in range(0, cols, 4):
            group = [(values[r][c], c) for c in range(start, min(start + 4, cols))]
            group += [(0.0, cols + i) for i in range(4 - len(group))]  # zero padding
            best = sorted(group, key=lambda vc: (-vc[0], vc[1]))[:2]
            for _, c in best:
                if c < cols:
                    keep[r, c] = True
    return keep


def ref_mask_cols(m: Tensor) -> Tensor:
    """2:4 along dim 0 of a 2-D matrix."""
    return ref_mask_rows(m.t()).t()


def ref_topk_rows(m: Tensor, keep: float = 0.5) -> Tensor:
    """meProp's top-k along dim 1 of a 2-D matrix: per row, keep the round(keep·cols)
    (at least 1) largest |value| (ties to the lower index), zero the rest."""
    rows, cols = m.shape
    k = max(1, round(keep * cols))
    out = torch.zeros_like(m)
    values = m.abs().tolist()
    for r in range(rows):
        best = sorted(range(cols), key=lambda c: (-values[r][c], c))[:k]
        for c in best:
            out[r, c] = m[r, c]
    return out


def valid_4x4_patterns() -> list[list[list[int]]]:
    out = []
    for bits in itertools.product((0, 1), repeat=16):
        p = [list(bits[i * 4 : i * 4 + 4]) for i in range(4)]
        if all(sum(r) == 2 for r in p) and all(
            sum(p[i][j] for i in range(4)) == 2 for j in range(4)
        ):
            out.append(p)
    return out


def ref_transposable_mask(m: Tensor) -> Tensor:
    """Brute force: for each 4×4 block pick the valid pattern of largest kept Σ|w|."""
    pats = valid_4x4_patterns()
    rows, cols = m.shape
    pr, pc = (-rows) % 4, (-cols) % 4
    a = torch.zeros(rows + pr, cols + pc, dtype=torch.float64)
    a[:rows, :cols] = m.abs().double()
    keep = torch.zeros_like(a, dtype=torch.bool)
    for bi in range(0, rows + pr, 4):
        for bj in range(0, cols + pc, 4):
            block = a[bi : bi + 4, bj : bj + 4].tolist()
            scores = [sum(block[i][j] * p[i][j] for i in range(4) for j in range(4)) for p in pats]
            best = pats[max(range(len(pats)), key=lambda k: scores[k])]
            keep[bi : bi + 4, bj : bj + 4] = torch.tensor(best, dtype=torch.bool)
    return keep[:rows, :cols]


# --------------------------------------------------------------------------- im2col


@dataclass
class Geo:
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1


def out_size(h: int, w: int, kh: int, kw: int, g: Geo) -> tuple[int, int]:
    ho = (h + 2 * g.padding[0] - g.dilation[0] * (kh - 1) - 1) // g.stride[0] + 1
    wo = (w + 2 * g.padding[1] - g.dilation[1] * (kw - 1) - 1) // g.stride[1] + 1
    return ho, wo


def im2col(x: Tensor, kh: int, kw: int, g: Geo) -> Tensor:
    """``[N, Ci, H, W]`` -> ``[Ci·kh·kw, N·Ho·Wo]``: rows channel-major then kh then kw,
    columns in (n, ho, wo) order."""
    n, c, h, w = x.shape
    ho, wo = out_size(h, w, kh, kw, g)
    xp = torch.zeros(n, c, h + 2 * g.padding[0], w + 2 * g.padding[1], dtype=x.dtype)
    xp[:, :, g.padding[0] : g.padding[0] + h, g.padding[1] : g.padding[1] + w] = x
    taps = []
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * g.dilation[0], j * g.dilation[1]
            taps.append(
                xp[
                    :,
                    :,
                    r0 : r0 + g.stride[0] * (ho - 1) + 1 : g.stride[0],
                    c0 : c0 + g.stride[1] * (wo - 1) + 1 : g.stride[1],
                ]
            )
    cols = torch.stack(taps, dim=2)  # [N, C, kh·kw, Ho, Wo]
    return cols.permute(1, 2, 0, 3, 4).reshape(c * kh * kw, n * ho * wo)


def col2im(cols: Tensor, shape: tuple[int, ...], kh: int, kw: int, g: Geo) -> Tensor:
    """The adjoint of :func:`im2col`: scatter-add columns back onto the input grid."""
    n, c, h, w = shape
    ho, wo = out_size(h, w, kh, kw, g)
    t = cols.reshape(c, kh * kw, n, ho, wo).permute(2, 0, 1, 3, 4)  # [N, C, kh·kw, Ho, Wo]
    xp = torch.zeros(n, c, h + 2 * g.padding[0], w + 2 * g.padding[1], dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * g.dilation[0], j * g.dilation[1]
            xp[
                :,
                :,
                r0 : r0 + g.stride[0] * (ho - 1) + 1 : g.stride[0],
                c0 : c0 + g.stride[1] * (wo - 1) + 1 : g.stride[1],
            ] += t[:, :, i * kw + j]
    return xp[:, :, g.padding[0] : g.padding[0] + h, g.padding[1] : g.padding[1] + w]


def ir_matrices(n: int, ho: int, wo: int) -> tuple[Tensor, Tensor]:
    """The paper's T (shift of dY by one column, within a row) and F (keep even columns) for
    the spatial axis P = N·Ho·Wo in (n, ho, wo) order. ``(dY·T)[:, p] = dY[:, p+1]`` when p is
    an even column with a right neighbour in the same row."""
    p_total = n * ho * wo
    t = torch.zeros(p_total, p_total, dtype=torch.float64)
    keep = torch.zeros(p_total, dtype=torch.float64)
    for p in range(p_total):
        col = p % wo
        if col % 2 == 0:
            keep[p] = 1.0
            if col + 1 < wo:
                t[p + 1, p] = 1.0
    return t, keep


# --------------------------------------------------------------------------- recipes

_RECIPES = {
    # name: (output, grad_input, grad_input_grad_output, grad_weight, alpha, decay)
    "dense": ("dense", "dense", "dense", "dense", 0.0, 0.0),
    "srste": ("2:4", "forward", "dense", "dense", 0.0, 2e-4),
    "tsm": ("tsm", "forward", "dense", "dense", 0.0, 0.0),
    "fst2": ("2:4", "co", "dense", "dense", 0.0, 2e-4),
    "fst_noir": ("2:4", "co", "dense", "ir", 0.0, 2e-4),
    "fst": ("2:4", "co", "dense", "ir", 1.0, 2e-4),
    "wg": ("2:4", "co", "dense", "wg", 0.0, 2e-4),
    "wx": ("2:4", "co", "dense", "wx", 0.0, 2e-4),
    "gg": ("2:4", "forward", "co", "wg", 0.0, 2e-4),
    "gx": ("2:4", "forward", "co", "wx", 0.0, 2e-4),
    "asp": ("2:4", "forward", "dense", "dense", 0.0, 0.0),
    "meprop": ("dense", "dense", "topk", "topk", 0.0, 0.0),
}


def ref_weight_operands(
    w2: Tensor, name: str, source: str = "dense", alpha: float | None = None
) -> tuple[Tensor, Tensor, tuple]:
    """(W_out, W_gi, recipe row) for one group's ``W2 [Co_g, K]``."""
    row = list(_RECIPES[name])
    if alpha is not None:
        row[4] = alpha
    out_kind, gi_kind = row[0], row[1]
    if out_kind == "dense":
        w_out = w2.clone()
    elif out_kind == "2:4":
        w_out = w2 * ref_mask_rows(w2)
    else:
        w_out = w2 * ref_transposable_mask(w2)
    if gi_kind == "dense":
        w_gi = w2.clone()
    elif gi_kind == "forward":
        w_gi = w_out
    else:
        src = w2 if source == "dense" else w_out
        w_gi = src * ref_mask_cols(src)  # 2:4 along Co
    return w_out, w_gi, tuple(row)


def ref_conv(
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    gy: Tensor,
    g: Geo,
    name: str,
    source: str = "dense",
    alpha: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(output, grad_input, grad_weight, grad_bias) of recipe ``name``, in float64."""
    x, w, gy = x.double(), w.double(), gy.double()
    n, ci, h, wd = x.shape
    co, cig, kh, kw = w.shape
    ho, wo = out_size(h, wd, kh, kw, g)
    k = cig * kh * kw
    cog = co // g.groups
    xmat = im2col(x, kh, kw, g)  # [Ci·kh·kw, P]
    dy2 = gy.permute(1, 0, 2, 3).reshape(co, -1)  # [Co, P]
    # meProp: top-k over all Co at each position (column), before splitting into groups
    dy_top = ref_topk_rows(dy2.t()).t()
    y_parts, dx_parts, dw_parts = [], [], []
    for gi in range(g.groups):
        w2 = w[gi * cog : (gi + 1) * cog].reshape(cog, k)
        xg = xmat[gi * k : (gi + 1) * k]
        dyg = dy2[gi * cog : (gi + 1) * cog]
        dyg_top = dy_top[gi * cog : (gi + 1) * cog]
        w_out, w_gi, row = ref_weight_operands(w2, name, source, alpha)
        _, _, gio, gw, a, decay = row
        y_parts.append(w_out @ xg)
        dy_gi = {"co": dyg * ref_mask_cols(dyg), "topk": dyg_top}.get(gio, dyg)
        dx_parts.append(w_gi.t() @ dy_gi)
        if gw == "dense":
            dwg = dyg @ xg.t()
        elif gw == "ir":
            t, keep = ir_matrices(n, ho, wo)
            dwg = (dyg + a * dyg @ t) @ (keep[:, None] * xg.t())
        elif gw == "wg":
            dwg = (dyg * ref_mask_rows(dyg)) @ xg.t()
        elif gw == "topk":
            dwg = dyg_top @ xg.t()
        else:  # wx
            dwg = dyg @ (xg * ref_mask_rows(xg)).t()
        dwg = dwg + decay * (w2 - w_out)
        dw_parts.append(dwg)
    y = torch.cat(y_parts).reshape(co, n, ho, wo).permute(1, 0, 2, 3)
    if b is not None:
        y = y + b.double()[None, :, None, None]
    dx = col2im(torch.cat(dx_parts), tuple(x.shape), kh, kw, g)
    dw = torch.cat(dw_parts).reshape(w.shape)
    db = gy.sum((0, 2, 3)) if b is not None else None
    return y, dx, dw, db


def ref_linear(
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    gy: Tensor,
    name: str,
    source: str = "dense",
    alpha: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(output, grad_input, grad_weight, grad_bias) of recipe ``name`` for a linear layer."""
    x, w, gy = x.double(), w.double(), gy.double()
    d_out, d_in = w.shape
    lead = x.shape[:-1]
    x2, dy2 = x.reshape(-1, d_in), gy.reshape(-1, d_out)
    w_out, w_gi, row = ref_weight_operands(w, name, source, alpha)
    _, _, gio, gw, a, decay = row
    y = x2 @ w_out.t()
    if b is not None:
        y = y + b.double()
    dy_top = ref_topk_rows(dy2)  # meProp: top-k along d_out per token
    dy_gi = {"co": dy2 * ref_mask_rows(dy2), "topk": dy_top}.get(gio, dy2)  # along d_out
    dx = dy_gi @ w_gi
    if gw == "dense" or (gw == "ir" and x.ndim < 3):
        dw = dy2.t() @ x2
    elif gw == "ir":
        tokens = x.shape[-2]
        m = x2.shape[0]
        t = torch.zeros(m, m, dtype=torch.float64)
        keep = torch.zeros(m, dtype=torch.float64)
        for r in range(m):
            if (r % tokens) % 2 == 0:
                keep[r] = 1.0
                if (r % tokens) + 1 < tokens:
                    t[r + 1, r] = 1.0
        dw = (dy2.t() + a * dy2.t() @ t) @ (keep[:, None] * x2)
    elif gw == "wg":
        dw = (dy2 * ref_mask_cols(dy2)).t() @ x2
    elif gw == "topk":
        dw = dy_top.t() @ x2
    else:
        dw = dy2.t() @ (x2 * ref_mask_cols(x2))
    dw = dw + decay * (w - w_out)
    db = dy2.sum(0) if b is not None else None
    return y.reshape(*lead, d_out), dx.reshape(x.shape), dw, db
