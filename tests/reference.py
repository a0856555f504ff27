"""An independent float64 reference for the spec's math, written as plainly as it reads.

Nothing here calls fullsparse, ``F.conv2d``, ``F.unfold`` or autograd: im2col is explicit
slicing, col2im its explicit adjoint, masks are Python loops over groups of 4 with an
explicit sort, transposable masks a brute force over all 4×4 patterns, and the FST weight
gradient the paper's masked product ``(dY + α·dY·T)·F(Xᵀ)`` with T and F built as matrices.
The random MVUE weight gradient reads the same uniforms as fullsparse (a key from torch's
default generator and a counter-based hash, one per group of 4 in fullsparse's order, drawn
by the caller) and computes its keep probabilities by a water-filling bisection, group by
group.
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


def ref_soft_threshold_rows(m: Tensor) -> Tensor:
    """S-STE's soft threshold along dim 1 of a 2-D matrix: per row, per group of 4
    (zero-padded), t = the 3rd-largest |value| of the group, every entry becomes
    sign(v)·max(|v| − t, 0)."""
    rows, cols = m.shape
    out = torch.zeros(rows, cols, dtype=torch.float64)
    values = m.double().tolist()
    for r in range(rows):
        for start in range(0, cols, 4):
            group = values[r][start : min(start + 4, cols)]
            mags = sorted([abs(v) for v in group] + [0.0] * (4 - len(group)), reverse=True)
            t = mags[2]
            for i, v in enumerate(group):
                shrunk = max(abs(v) - t, 0.0)
                out[r, start + i] = shrunk if v > 0 else -shrunk
    return out


def ref_soft_scale(m: Tensor) -> float:
    """S-STE's β for a weight matrix ``[Co, K]``: the least-squares scale ⟨W, s⟩ / ⟨s, s⟩."""
    s = ref_soft_threshold_rows(m)
    return float((m.double() * s).sum() / (s * s).sum())


# --------------------------------------------------------------------------- MVUE


def ref_mvue_probabilities(group: list[float]) -> list[float]:
    """Water-filling by bisection: p_i = min(1, c·|a_i|) with Σp = min(2, nonzeros)."""
    a = [abs(x) for x in group]
    target = min(2, sum(1 for x in a if x > 0))
    if target == 0:
        return [0.0] * 4
    lo, hi = 0.0, 1.0
    while sum(min(1.0, hi * x) for x in a) < target:
        hi *= 2
    for _ in range(200):
        c = (lo + hi) / 2
        if sum(min(1.0, c * x) for x in a) < target:
            lo = c
        else:
            hi = c
    return [min(1.0, hi * x) for x in a]


def ref_mvue_rows(m: Tensor, u: Tensor) -> Tensor:
    """MVUE 2:4 along each row of ``m [R, P]`` with the uniforms ``u [R, ceil(P/4)]``: in
    each group the entries whose cumulative-probability interval holds ``u`` or ``u + 1``
    survive, divided by their keep probability."""
    rows, size = m.shape
    out = torch.zeros_like(m)
    for r in range(rows):
        for g in range(0, size, 4):
            vals = [float(m[r, i]) if i < size else 0.0 for i in range(g, g + 4)]
            p = ref_mvue_probabilities(vals)
            start, draw = 0.0, float(u[r, g // 4])
            for j, pj in enumerate(p):
                end = start + pj
                kept = start <= draw < end or start <= draw + 1 < end
                if kept and g + j < size:
                    out[r, g + j] = vals[j] / pj
                start = end
    return out


def _mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x21F0AAAD) % 2**32
    x ^= x >> 15
    x = (x * 0x735A2D97) % 2**32
    return x ^ (x >> 15)


def ref_mvue_uniform(counter: int, key: tuple[int, int]) -> float:
    """fullsparse's counter-based MVUE uniform of group ``counter`` under ``key``, with
    Python integers: the top 24 bits of two keyed rounds of a 32-bit hash, over 2²⁴."""
    return (_mix32(_mix32((counter % 2**32) ^ key[0]) ^ key[1]) >> 8) / 2**24


def draw_mvue_uniforms(rows: int, size: int) -> Tensor:
    """The uniforms fullsparse draws on a CPU for an MVUE of ``rows`` rows of ``size``
    entries along the sparsified axis: a key of two 32-bit integers from torch's default
    generator, then one uniform per group of 4 (:func:`ref_mvue_uniform` of the counter
    ``row·groups + group``), in float64."""
    k0, k1 = (int(v) for v in torch.randint(0, 2**32, (2,), dtype=torch.int64))
    groups = (size + 3) // 4
    values = [
        [ref_mvue_uniform(r * groups + g, (k0, k1)) for g in range(groups)] for r in range(rows)
    ]
    return torch.tensor(values, dtype=torch.float64).reshape(rows, groups)


# --------------------------------------------------------------------------- sampled units


def ref_keep_probabilities(scores: list[float], k: int) -> list[float]:
    """Water-filling by bisection: p_i = min(1, c·s'_i) with Σp = k, where every score is
    first raised by 1e-6 of its group's mean plus the smallest normal float64."""
    mean = sum(scores) / len(scores)
    s = [x + mean * 1e-6 + 2.2250738585072014e-308 for x in scores]
    lo, hi = 0.0, 1.0
    while sum(min(1.0, hi * x) for x in s) < k:
        hi *= 2
    for _ in range(300):
        c = (lo + hi) / 2
        if sum(min(1.0, c * x) for x in s) < k:
            lo = c
        else:
            hi = c
    return [min(1.0, hi * x) for x in s]


#: ``fst_is_batch``'s share of its one group per call
BATCH_SHARE = 0.59


def ref_sampled_weights(scores: list[float], mode: str, k: int = 2) -> list[float]:
    """The weight (0 = dropped, else 1/p) of each unit, drawing from torch's default
    generator as fullsparse does: ``rand``: one uniform, phase = [u >= 1/2], every second
    unit from the phase ×2; ``is``: one uniform per full group of 4, the units whose
    cumulative-probability interval holds u, u+1, …, u+k−1; a partial group kept ×1;
    ``isb``: the same over one group of all the whole groups of 4, keeping
    ``round(0.59 · size)``."""
    n = len(scores)
    if mode == "rand":
        phase = int(float(torch.rand(1, dtype=torch.float32)[0]) >= 0.5)
        return [2.0 if i % 2 == phase else 0.0 for i in range(n)]
    full = n // 4 * 4
    size = full if mode == "isb" else 4
    if mode == "isb":
        k = max(1, round(BATCH_SHARE * full))
    weights = [1.0] * n
    if full == 0 or k >= size:
        return weights
    u = torch.rand(full // size, dtype=torch.float32).double().tolist()
    for g in range(full // size):
        p = ref_keep_probabilities(scores[size * g : size * (g + 1)], k)
        start = 0.0
        for j in range(size):
            end = start + p[j] if j < size - 1 else float(k)
            kept = any(start <= u[g] + i < end for i in range(k))
            weights[size * g + j] = 1.0 / p[j] if kept else 0.0
            start = end
    return weights


def ref_sample_scores(x: Tensor, gy: Tensor) -> list[float]:
    """Per sample n: ‖dY_n‖·‖X_n‖, entry by entry in float64."""
    return [
        float(sum(v * v for v in gy[i].flatten().tolist()) ** 0.5)
        * float(sum(v * v for v in x[i].flatten().tolist()) ** 0.5)
        for i in range(x.shape[0])
    ]


def ref_block_scores(x: Tensor, gy: Tensor, kw: int, g: Geo) -> list[float]:
    """Per unit 2n + q (sample n's output columns of parity q): the norm of dY over those
    columns times the norm of the (zero-padded) input columns their windows read, each
    window counted once per output column."""
    n, c, h, w = x.shape
    xp = torch.zeros(n, c, h, w + 2 * g.padding[1], dtype=torch.float64)
    xp[..., g.padding[1] : g.padding[1] + w] = x
    scores = []
    for i in range(n):
        for q in (0, 1):
            dy_sq = x_sq = 0.0
            for wo in range(q, gy.shape[3], 2):
                dy_sq += float(gy[i, :, :, wo].square().sum())
                for t in range(kw):
                    x_sq += float(xp[i, :, :, wo * g.stride[1] + t * g.dilation[1]].square().sum())
            scores.append((dy_sq * x_sq) ** 0.5)
    return scores


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
    # S-STE's soft-threshold forward (not a named recipe: output_weight='soft_2:4')
    "fst2_soft": ("soft", "co", "dense", "dense", 0.0, 0.0),
    "srste_soft": ("soft", "forward", "dense", "dense", 0.0, 0.0),
    # without the in-backward decay (decay_kind='masked_grad' applies it in the step)
    "srste_nodecay": ("2:4", "forward", "dense", "dense", 0.0, 0.0),
    "fst_nodecay": ("2:4", "co", "dense", "ir", 1.0, 0.0),
    # configs beside the named recipes: fst2's operands with the MVUE weight gradient
    "fst_mvue": ("2:4", "co", "dense", "mvue", 0.0, 2e-4),
    "asp": ("2:4", "forward", "dense", "dense", 0.0, 0.0),
    "meprop": ("dense", "dense", "topk", "topk", 0.0, 0.0),
    # sampled units (tokens / output columns); without a module's state the adaptive mode
    # keeps 2 of 4 like is_half
    "fst_rand": ("2:4", "co", "dense", "rand", 0.0, 2e-4),
    "fst_is": ("2:4", "co", "dense", "is", 0.0, 2e-4),
    "fst_adaptive": ("2:4", "co", "dense", "is", 0.0, 2e-4),
    # one group per call keeping 0.59 (isb), a convolution's units its samples
    "fst_is_batch": ("2:4", "co", "dense", "isb", 0.0, 2e-4),
    # a module's first is_adaptive call measures: its weight gradient is the exact product
    "fst_adaptive_measuring": ("2:4", "co", "dense", "dense", 0.0, 2e-4),
}


def module_reference_name(name: str) -> str:
    """The reference row of a sparse *module*'s first training step under recipe ``name``
    (a functional call has no state; a module's first ``is_adaptive`` call is exact)."""
    return "fst_adaptive_measuring" if name == "fst_adaptive" else name


def ref_weight_operands(
    w2: Tensor,
    name: str,
    source: str = "dense",
    alpha: float | None = None,
    beta: float | None = None,
) -> tuple[Tensor, Tensor, tuple]:
    """(W_out, W_gi, recipe row) for one group's ``W2 [Co_g, K]``; ``beta``: the soft
    forward's per-tensor scale (computed from ``w2`` when None)."""
    row = list(_RECIPES[name])
    if alpha is not None:
        row[4] = alpha
    out_kind, gi_kind = row[0], row[1]
    if out_kind == "dense":
        w_out = w2.clone()
    elif out_kind == "2:4":
        w_out = w2 * ref_mask_rows(w2)
    elif out_kind == "soft":
        w_out = (ref_soft_scale(w2) if beta is None else beta) * ref_soft_threshold_rows(w2)
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
    beta: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(output, grad_input, grad_weight, grad_bias) of recipe ``name``, in float64
    (``beta``: the soft forward's fixed scale; computed from ``w`` when None)."""
    x, w, gy = x.double(), w.double(), gy.double()
    n, ci, h, wd = x.shape
    co, cig, kh, kw = w.shape
    ho, wo = out_size(h, wd, kh, kw, g)
    k = cig * kh * kw
    cog = co // g.groups
    xmat = im2col(x, kh, kw, g)  # [Ci·kh·kw, P]
    dy2 = gy.permute(1, 0, 2, 3).reshape(co, -1)  # [Co, P]
    if beta is None:  # per tensor (used by the soft forward only)
        beta = ref_soft_scale(w.reshape(co, k))
    # meProp: top-k over all Co at each position (column), before splitting into groups
    dy_top = ref_topk_rows(dy2.t()).t()
    y_parts, dx_parts, dw_parts = [], [], []
    # drawn before the loop, for all Co rows at once, as fullsparse draws them
    u = draw_mvue_uniforms(co, dy2.shape[1]) if _RECIPES[name][3] == "mvue" else None
    # sampled output columns, the same for every channel: rand = one phase for the layer;
    # is = units 2n + q, sample n's columns of parity q
    if _RECIPES[name][3] == "rand":
        col_w = ref_sampled_weights([0.0] * wo, "rand")
        pos_w = torch.tensor([col_w[p % wo] for p in range(n * ho * wo)], dtype=torch.float64)
    elif _RECIPES[name][3] == "is":
        unit_w = ref_sampled_weights(ref_block_scores(x, gy, kw, g), "is")
        pos_w = torch.tensor(
            [unit_w[2 * (p // (ho * wo)) + (p % wo) % 2] for p in range(n * ho * wo)],
            dtype=torch.float64,
        )
    elif _RECIPES[name][3] == "isb":  # units: whole samples
        unit_w = ref_sampled_weights(ref_sample_scores(x, gy), "isb")
        pos_w = torch.tensor(
            [unit_w[p // (ho * wo)] for p in range(n * ho * wo)], dtype=torch.float64
        )
    for gi in range(g.groups):
        w2 = w[gi * cog : (gi + 1) * cog].reshape(cog, k)
        xg = xmat[gi * k : (gi + 1) * k]
        dyg = dy2[gi * cog : (gi + 1) * cog]
        dyg_top = dy_top[gi * cog : (gi + 1) * cog]
        w_out, w_gi, row = ref_weight_operands(w2, name, source, alpha, beta)
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
        elif gw == "mvue":
            assert u is not None
            dwg = ref_mvue_rows(dyg, u[gi * cog : (gi + 1) * cog]) @ xg.t()
        elif gw == "topk":
            dwg = dyg_top @ xg.t()
        elif gw in ("rand", "is", "isb"):
            dwg = dyg @ (pos_w[:, None] * xg.t())
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
    beta: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(output, grad_input, grad_weight, grad_bias) of recipe ``name`` for a linear layer."""
    x, w, gy = x.double(), w.double(), gy.double()
    d_out, d_in = w.shape
    lead = x.shape[:-1]
    x2, dy2 = x.reshape(-1, d_in), gy.reshape(-1, d_out)
    w_out, w_gi, row = ref_weight_operands(w, name, source, alpha, beta)
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
    elif gw == "mvue":  # along the flattened leading axes, per output feature
        dw = ref_mvue_rows(dy2.t(), draw_mvue_uniforms(d_out, dy2.shape[0])) @ x2
    elif gw == "topk":
        dw = dy_top.t() @ x2
    elif gw in ("rand", "is", "isb"):  # rows of the flattened leading axes
        scores = [float(dy2[r].norm() * x2[r].norm()) for r in range(x2.shape[0])]
        weights = torch.tensor(ref_sampled_weights(scores, gw), dtype=torch.float64)
        dw = dy2.t() @ (weights[:, None] * x2)
    else:
        dw = dy2.t() @ (x2 * ref_mask_cols(x2))
    dw = dw + decay * (w - w_out)
    db = dy2.sum(0) if b is not None else None
    return y.reshape(*lead, d_out), dx.reshape(x.shape), dw, db


#: The seed a test sets before each of two computations that must draw the same random
#: numbers (the MVUE weight gradient of ``fst_mvue`` draws from torch's default generator).
DRAW_SEED = 11


def same_draws(fn):
    """``fn`` that first seeds torch's default generator with :data:`DRAW_SEED`."""

    def seeded(*args, **kwargs):
        torch.manual_seed(DRAW_SEED)
        return fn(*args, **kwargs)

    return seeded
