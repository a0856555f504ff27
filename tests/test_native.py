"""The native CPU kernels (fullsparse.native) equal the eager reference bit for bit, fall
back to it wherever they do not apply, and a failed build degrades to the eager path."""

from __future__ import annotations

import shutil

import pytest
import torch

from fullsparse import native, recipe
from fullsparse.operands import add_deferred_decay, weight_operands

HAS_COMPILER = any(shutil.which(c) for c in ("cc", "gcc", "clang"))
NAN, INF = float("nan"), float("inf")


def _eager(monkeypatch, *args, **kwargs):
    with monkeypatch.context() as m:
        m.setenv("FULLSPARSE_NATIVE", "off")
        return weight_operands(*args, **kwargs)


def _same(a, b, strides: bool = True) -> None:
    if a is None or b is None:
        assert a is None and b is None
        return
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.stride() == b.stride() or not strides
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    # the sign of zeros too (x * 0 keeps it, as the eager product does)
    assert torch.equal(torch.signbit(a), torch.signbit(b))


def _decay(ops, w):
    """A step's SR-STE decay term: the tensor, or the one the backward adds from W (to −0,
    which leaves every value and the sign of zeros as they are)."""
    if ops.decay_scale is None:
        return ops.decay
    return add_deferred_decay(torch.full_like(w, -0.0), w, ops.decay_scale)


def _weight(shape, seed=0):
    """Random values with ties, zeros of both signs, NaN and ±inf in some groups."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(-3, 4, shape, generator=gen).float()  # many ties
    w += torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) < 0.5)
    flat = w.view(-1)
    flat[:12] = torch.tensor([NAN, 1.0, INF, -INF, -0.0, 0.0, 0.0, -0.0, NAN, NAN, NAN, 2.0])
    return w


@pytest.fixture
def library() -> None:
    """The sampling kernels' tests need the native library: without a C compiler the only
    thing to check is that none runs (every caller then takes the eager path)."""
    if not HAS_COMPILER:
        assert native.draw(torch.ones(1, 4), 2, torch.zeros(1)) is None
        assert native.gather_rows(torch.ones(2, 2), torch.tensor([1])) is None
        pytest.fail("no C compiler here: the native sampling kernels cannot be checked")


def test_available_where_a_compiler_is():
    assert native.available() == HAS_COMPILER


@pytest.mark.parametrize(
    ("name", "shape", "groups"),
    [
        ("fst", (8, 16), 1),
        ("fst", (16, 8, 3, 3), 1),
        ("fst", (16, 4, 3, 3), 2),  # Co/g = 8
        ("fst_is_batch", (12, 20), 1),
        ("fst_mvue", (24, 4, 1, 1), 1),
        ("srste", (8, 12), 1),  # grad_input takes the forward operand
        ("fst2", (8, 12), 1),
    ],
)
@pytest.mark.parametrize("needs", ["both", "no_grad_input", "no_decay"])
def test_weight_side_equals_the_eager_path_bit_for_bit(monkeypatch, name, shape, groups, needs):
    config = recipe(name)
    w = _weight(shape, seed=len(shape) + groups)
    kwargs = {"grad_input": needs != "no_grad_input", "decay": needs != "no_decay"}
    got = weight_operands(w, config, groups, torch.float32, **kwargs)
    want = _eager(monkeypatch, w, config, groups, torch.float32, **kwargs)
    _same(got.output, want.output)
    _same(got.grad_input, want.grad_input)
    _same(_decay(got, w), _decay(want, w))
    if HAS_COMPILER and config.operands.output_weight == "S_K(W)":
        assert got.out_mask is None  # the native kernel made it: no mask materialized
        if kwargs["decay"] and config.operands.decay:  # left to the backward, from W
            assert got.decay is None and got.decay_scale == config.decay


@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last"])
def test_the_deferred_decay_is_the_eager_decay_on_every_path(monkeypatch, grad_layout):
    """``add_deferred_decay``: the kernel, the weight-side kernel's term (a gradient it
    cannot take) and the eager masks (no native library) add the same bits as the eager
    weight side's decay tensor, NaN and infinities included."""
    config = recipe("fst")
    w = _weight((8, 4, 3, 3), seed=3)
    base = torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    if grad_layout == "channels_last":  # a weight gradient the kernel cannot take
        base = base.contiguous(memory_format=torch.channels_last)
    want = base.clone().add_(_eager(monkeypatch, w, config, 1, torch.float32).decay)
    got = add_deferred_decay(base.clone(), w, config.decay)
    _same(got, want, strides=False)
    monkeypatch.setenv("FULLSPARSE_NATIVE", "off")
    _same(add_deferred_decay(base.clone(), w, config.decay), want, strides=False)


def test_a_sparse_layer_keeps_no_decay_tensor_and_its_gradient_is_the_eager_one(monkeypatch):
    from fullsparse.functional import sparse_conv2d, sparse_linear

    def grads():
        torch.manual_seed(0)
        x = torch.randn(2, 8, 5, 5)
        w = torch.randn(8, 8, 3, 3, requires_grad=True)
        y = sparse_conv2d(x, w, padding=1, config=recipe("fst"))
        saved = y.grad_fn.saved_tensors  # (x, W_gi, the decay tensor or W)
        kept_w = saved[2].data_ptr() == w.data_ptr()
        assert kept_w == native.available() and saved[2].shape == w.shape
        y.square().sum().backward()
        v = torch.randn(12, 16, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
        sparse_linear(torch.randn(3, 4, 16), v, config=recipe("fst")).square().sum().backward()
        return w.grad, v.grad

    got = grads()
    monkeypatch.setenv("FULLSPARSE_NATIVE", "off")
    want = grads()
    for a, b in zip(got, want, strict=True):
        _same(a, b)


def test_the_kernel_is_what_ran(monkeypatch):
    """Where it applies, weight_operands takes the native kernel (not the eager ops)."""
    calls = []
    real = native.fst_weight_side

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(native, "fst_weight_side", spy)
    weight_operands(_weight((8, 16)), recipe("fst"), 1, torch.float32)
    assert calls == [torch.Size([8, 16])]


@pytest.mark.parametrize(
    ("shape", "groups", "dtype", "layout"),
    [
        ((8, 18), 1, torch.float32, "contiguous"),  # K not a multiple of 4: zero padding
        ((16, 3, 3, 3), 1, torch.float32, "contiguous"),  # K = 27
        ((12, 4, 3, 3), 2, torch.float32, "contiguous"),  # Co/g = 6
        ((8, 16), 1, torch.float64, "contiguous"),
        ((8, 16), 1, torch.bfloat16, "contiguous"),
        ((8, 8, 3, 3), 1, torch.float32, "channels_last"),
    ],
)
def test_where_the_kernel_does_not_apply_the_eager_path_runs(
    monkeypatch, shape, groups, dtype, layout
):
    w = _weight(shape).to(dtype)
    if layout == "channels_last":
        w = w.to(memory_format=torch.channels_last)
    got = weight_operands(w, recipe("fst"), groups, dtype)
    want = _eager(monkeypatch, w, recipe("fst"), groups, dtype)
    assert got.out_mask is not None  # the eager path ran
    _same(got.output, want.output)
    _same(got.grad_input, want.grad_input)
    _same(_decay(got, w), _decay(want, w))


def test_the_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("FULLSPARSE_NATIVE", "off")
    assert not native.available()
    assert native.fst_weight_side(torch.ones(4, 4), 0.1, True, True) is None


def test_a_failed_build_warns_once_and_runs_eagerly(monkeypatch, tmp_path):
    monkeypatch.setenv("FULLSPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_compiler", lambda: shutil.which("false") or "/bin/false")
    w = _weight((8, 16))
    with pytest.warns(RuntimeWarning, match="native CPU kernels could not be built"):
        got = weight_operands(w, recipe("fst"), 1, torch.float32)
    assert not native.available()  # no second warning, no second build
    want = _eager(monkeypatch, w, recipe("fst"), 1, torch.float32)
    _same(got.output, want.output)
    _same(_decay(got, w), _decay(want, w))


# --------------------------------------------------------------------------- sampling
def _ref_kept(p: list[float], u: float, k: int) -> list[int]:
    """Systematic sampling in float64: unit i is kept when one of u, …, u+k−1 falls in its
    interval of the cumulative probabilities."""
    kept, start = [], 0.0
    for i, pi in enumerate(p):
        end = float(k) if i == len(p) - 1 else start + pi
        if any(start <= u + j < end for j in range(k)):
            kept.append(i)
        start = end
    return kept


@pytest.mark.usefixtures("library")
@pytest.mark.parametrize(
    ("groups", "size", "k"),
    [(50, 4, 2), (40, 4, 1), (30, 4, 3), (6, 64, 38), (1, 4096, 2417), (1, 4096, 9)],
)
def test_the_native_draw_matches_the_float64_reference(groups, size, k):
    from reference import ref_keep_probabilities

    gen = torch.Generator().manual_seed(size + k)
    scores = torch.rand(groups, size, generator=gen) ** 6
    scores[::5, : size // 2] = 0.0  # groups with zeros
    scores[1::5, 0] *= 1e4  # one far ahead: capped at 1
    u = torch.rand(groups, generator=gen)
    drawn = native.draw(scores, k, u)
    assert drawn is not None
    index, weight = drawn
    assert index.shape == weight.shape == (groups * k,)
    for q in range(groups):
        p = ref_keep_probabilities(scores[q].double().tolist(), k)
        want = _ref_kept(p, float(u[q]), k)
        got = (index[q * k : (q + 1) * k] - q * size).tolist()
        assert got == want
        torch.testing.assert_close(
            weight[q * k : (q + 1) * k].double(),
            torch.tensor([1 / p[i] for i in want], dtype=torch.float64),
            rtol=2e-6, atol=0,
        )  # fmt: skip


@pytest.mark.usefixtures("library")
@pytest.mark.parametrize(("m", "group", "k", "width"),
                         [(23, 4, 2, 7), (24, 8, 3, 7), (3, 2, 1, 7), (16, 16, 9, 7),
                          (131, 128, 76, 700), (7, 4, 3, 7)])  # fmt: skip
def test_draw_rows_equals_the_separate_calls(m, group, k, width):
    """Scores, draw and copies in one pass: the bits of row_norm_products, draw and
    gather_rows, on rows with a stride (views of wider matrices) and a partial last group;
    one whole group (fst_is_batch's draw) with rows wide enough for the threads to share."""
    gen = torch.Generator().manual_seed(m)
    x2 = torch.randn(m, width + 2, generator=gen)[:, :width]  # rows width + 2 floats apart
    dy2 = torch.randn(m, 5, generator=gen)
    x2[1] = 0.0  # a zero score
    u = torch.rand(m // group, generator=gen)
    index, weight, dy_kept, x_kept = native.draw_rows(x2, dy2, group, k, u)
    full = m // group * group
    scores = native.row_norm_products(x2, dy2)
    want_index, want_weight = native.draw(scores[:full].reshape(-1, group).contiguous(), k, u)
    want_index = torch.cat([want_index, torch.arange(full, m)])
    want_weight = torch.cat([want_weight, torch.ones(m - full)])
    assert torch.equal(index, want_index)
    _same(weight, want_weight)
    _same(dy_kept, native.gather_rows(dy2, want_index, want_weight))
    _same(x_kept, native.gather_rows(x2, want_index))


@pytest.mark.usefixtures("library")
def test_whole_samples_draw_in_one_call(monkeypatch):
    """fst_is_batch's convolutions: the samples scored, drawn and copied in one native call,
    the same bits as the separate calls (scores, draw, two gathers)."""
    from fullsparse import sampled_grad
    from fullsparse.geometry import ConvGeometry

    gen = torch.Generator().manual_seed(8)
    x, dy = torch.randn(11, 3, 6, 7, generator=gen), torch.randn(11, 4, 6, 7, generator=gen)
    weight, geo = torch.zeros(4, 3, 3, 3), ConvGeometry.make(1, 1, 1, 1)
    calls = []
    real = native.draw_rows
    monkeypatch.setattr(native, "draw_rows", lambda *a, **k: calls.append(a[2]) or real(*a, **k))

    def grad():
        torch.manual_seed(4)
        return sampled_grad.conv_sampled_grad_weight(
            x, dy, weight, geo, "is_half", group=0, share=0.59, unit="sample"
        )

    got = grad()
    assert calls == [8]  # one group: the 8 samples of the whole groups of 4
    monkeypatch.setattr(sampled_grad, "_FUSED_ONE_GROUP", False)
    monkeypatch.setattr(sampled_grad, "_FUSED_GROUP_FLOATS", 0)
    assert torch.equal(grad(), got)
    assert calls == [8]


@pytest.mark.usefixtures("library")
def test_draw_rows_leaves_non_finite_scores_to_the_eager_draw(monkeypatch):
    """A NaN row: draw_rows declines, and the layer's gradient is the eager path's on the same
    uniforms (the NaN row kept for sure)."""
    from fullsparse import sampled_grad, sampling

    gen = torch.Generator().manual_seed(5)
    x2, dy2 = torch.randn(16, 6, generator=gen), torch.randn(16, 4, generator=gen)
    dy2[5, 2] = NAN
    u = torch.rand(4, generator=gen)
    assert native.draw_rows(x2, dy2, 4, 2, u) is None
    monkeypatch.setattr(sampling, "uniforms", lambda n, device: u[:n].clone())
    got = sampled_grad.linear_sampled_grad_weight(x2, dy2, "is_half", group=4, share=0.5)
    monkeypatch.setenv("FULLSPARSE_NATIVE", "off")
    want = sampled_grad.linear_sampled_grad_weight(x2, dy2, "is_half", group=4, share=0.5)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert bool(got.isnan().any())


@pytest.mark.usefixtures("library")
@pytest.mark.parametrize("path", ["draw_rows", "draw"])
def test_the_native_linear_sampling_is_unbiased(monkeypatch, path):
    """E over every draw (enumerated at the midpoints of the intervals on which the kept rows
    do not change) of the float32 native path equals dYᵀX to float32 rounding; one group of
    12 rows keeping 7, and 2 rows kept whole. ``draw_rows``: scores, draw and copies in one
    pass; ``draw``: the separate calls (groups too large for the one pass)."""
    import itertools

    from fullsparse import sampled_grad, sampling
    from reference import ref_keep_probabilities

    gen = torch.Generator().manual_seed(3)
    x2, dy2 = torch.randn(14, 6, generator=gen), torch.randn(14, 5, generator=gen)
    x2[2] = 0.0
    scores = (dy2.double().norm(dim=1) * x2.double().norm(dim=1))[:12].tolist()
    p = ref_keep_probabilities(scores, 7)
    cuts = sorted({0.0, 1.0} | {float(sum(p[: i + 1])) % 1.0 for i in range(11)})
    calls = []
    real = getattr(native, path)
    monkeypatch.setattr(native, path, lambda *a, **k: calls.append(1) or real(*a, **k))
    if path == "draw":
        monkeypatch.setattr(sampled_grad, "_FUSED_GROUP_FLOATS", 0)
        monkeypatch.setattr(sampled_grad, "_FUSED_ONE_GROUP", False)
    total = torch.zeros(5, 6, dtype=torch.float64)
    for a, b in itertools.pairwise(cuts):
        if b - a < 1e-9:
            continue
        u = torch.tensor([(a + b) / 2], dtype=torch.float32)
        monkeypatch.setattr(sampling, "uniforms", lambda n, device, u=u: u.clone())
        g = sampled_grad.linear_sampled_grad_weight(x2, dy2, "is_half", group=12, share=0.6)
        total += g.double() * (b - a)
    assert calls  # that native path ran
    want = dy2.double().t() @ x2.double()
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-5)


def test_a_non_finite_score_leaves_the_draw_to_the_eager_path(monkeypatch):
    from fullsparse import sampling

    scores = torch.tensor([1.0, float("nan"), 2.0, 3.0, 4.0, 3.0, 2.0, 1.0])
    assert native.draw(scores.view(2, 4), 2, torch.rand(2)) is None
    torch.manual_seed(5)
    got = sampling.sample_units(scores, 0.5)
    monkeypatch.setenv("FULLSPARSE_NATIVE", "off")
    torch.manual_seed(5)
    want = sampling.sample_units(scores, 0.5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert 1 in got[0].tolist()  # the NaN unit is kept for sure


@pytest.mark.usefixtures("library")
def test_row_norm_products_match_float64_norms_with_any_row_stride():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(37, 20, generator=gen)[:, 3:16]  # rows 20 floats apart
    dy = torch.randn(37, 9, generator=gen)
    got = native.row_norm_products(x, dy)
    want = dy.double().norm(dim=1) * x.double().norm(dim=1)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


@pytest.mark.usefixtures("library")
def test_gather_rows_equals_index_select_bit_for_bit():
    gen = torch.Generator().manual_seed(5)
    src = torch.randn(30, 17, generator=gen)
    src[4, 2] = float("inf")
    index = torch.tensor([0, 4, 4, 29, 7])
    scale = torch.rand(5, generator=gen) * 3
    assert torch.equal(native.gather_rows(src, index), src.index_select(0, index))
    want = src.index_select(0, index).mul_(scale[:, None])
    assert torch.equal(native.gather_rows(src, index, scale), want)
    with pytest.raises(IndexError, match="out of range"):
        native.gather_rows(src, torch.tensor([30]))


@pytest.mark.usefixtures("library")
def test_the_per_sample_conv_operands_equal_the_eager_ones(monkeypatch):
    from fullsparse import sampled_grad

    gen = torch.Generator().manual_seed(6)
    x, dy = torch.randn(9, 3, 5, 6, generator=gen), torch.randn(9, 4, 5, 6, generator=gen)
    samples, scale = torch.tensor([1, 2, 5, 8]), torch.rand(4, generator=gen) + 0.5
    got = sampled_grad._sample_operands(x, dy, samples, scale)
    monkeypatch.setenv("FULLSPARSE_NATIVE", "off")
    want = sampled_grad._sample_operands(x, dy, samples, scale)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)


# (x shape, kernel width, stride, padding, dilation): the width's geometry varies
BLOCK_GEOMETRIES = [
    ((5, 3, 6, 8), 3, 1, 1, 1),
    ((4, 2, 5, 9), 3, 2, 1, 1),  # odd width, stride 2: the odd windows start 2 columns in
    ((3, 4, 4, 7), 1, 2, 0, 1),  # pointwise, stride 2 > padding: the shifted input is cropped
    ((3, 2, 3, 11), 3, 1, 2, 2),  # dilation 2, padding 2
    ((2, 3, 4, 5), 5, 1, 0, 1),  # one output column: no odd block
    ((4, 1, 2, 3), 3, 3, 1, 1),
    # widths 4-32: the column sums in registers (4-8, 8-16, 16-32 wide), ResNet-20's 28
    ((2, 2, 3, 4), 3, 1, 1, 1),
    ((3, 5, 6, 17), 3, 1, 1, 1),
    ((2, 16, 28, 28), 3, 1, 1, 1),
    ((2, 4, 3, 32), 3, 2, 1, 1),
]


def _block_case(shape, kw, stride, padding, dilation, seed=7):
    from fullsparse.geometry import ConvGeometry

    gen = torch.Generator().manual_seed(seed)
    n, ci, h, w = shape
    geo = ConvGeometry.make((1, stride), (1, padding), (1, dilation), 1)
    wo = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    x = torch.randn(shape, generator=gen)
    dy = torch.randn(n, 3, h, wo, generator=gen)
    return x, dy, geo


@pytest.mark.usefixtures("library")
@pytest.mark.parametrize("case", BLOCK_GEOMETRIES)
def test_block_scores_match_the_eager_scores(monkeypatch, case):
    from fullsparse import sampled_grad

    x, dy, geo = _block_case(*case)
    kw = case[1]
    got = native.block_scores(x, dy, kw, geo.stride[1], geo.dilation[1], geo.padding[1])
    assert got is not None and got.shape == (2 * x.shape[0],)
    monkeypatch.setenv("FULLSPARSE_NATIVE", "off")
    want = sampled_grad.block_scores(x, dy, kw, geo)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
    if dy.shape[3] == 1:
        assert bool((got[1::2] == 0).all())  # no odd columns: score 0


@pytest.mark.usefixtures("library")
@pytest.mark.parametrize("case", BLOCK_GEOMETRIES)
def test_the_column_block_operands_equal_the_eager_ones(monkeypatch, case):
    from fullsparse import sampled_grad

    x, dy, geo = _block_case(*case)
    n = x.shape[0]
    units = torch.tensor([3, 0, 2 * n - 1, 1, 2 * n - 2])  # each parity's samples in order
    scale = torch.rand(5, generator=torch.Generator().manual_seed(1)) + 0.5
    got = sampled_grad._block_operands(x, dy, geo, units, scale)
    monkeypatch.setenv("FULLSPARSE_NATIVE", "off")
    want = sampled_grad._block_operands(x, dy, geo, units, scale)
    assert len(got) == len(want) == 2
    for part, ref in zip(got, want, strict=True):
        assert part[2] == ref[2]
        for a, b in zip(part[:2], ref[:2], strict=True):
            assert a.shape == b.shape and a.is_contiguous()
            _same(a, b, strides=False)


@pytest.mark.usefixtures("library")
def test_gather_blocks_checks_its_units_and_its_layout():
    x, dy = torch.randn(3, 2, 2, 5), torch.randn(3, 4, 2, 5)
    units, scale = torch.tensor([5, 2, 1]), torch.tensor([2.0, 3.0, 4.0])
    with pytest.raises(IndexError, match="out of range"):
        native.gather_blocks(x, dy, torch.tensor([6]), scale[:1], 0, 5)
    assert native.gather_blocks(x.transpose(2, 3), dy, units, scale, 0, 5) is None
    assert native.gather_blocks(x, dy, units, scale[:2], 0, 5) is None
    x0, dy0, x1, dy1 = native.gather_blocks(x, dy, units, scale, 2, 8)  # padded 2 | 1
    assert torch.equal(x0, x[[1]]) and torch.equal(dy0, dy[[1], ..., 0::2] * 3.0)
    assert torch.equal(x1, torch.nn.functional.pad(x, (2, 1))[[2, 0]])
    assert torch.equal(dy1, dy[[2, 0], ..., 1::2] * torch.tensor([2.0, 4.0])[:, None, None, None])
    x1 = native.gather_blocks(x, dy, units, scale, -1, 3)[2]  # cropped
    assert torch.equal(x1, x[[2, 0], ..., 1:4])
    empty = native.gather_blocks(x, dy, units[:0], scale[:0], 0, 5)
    assert [t.shape[0] for t in empty] == [0, 0, 0, 0]


@pytest.mark.parametrize("name", ["fst", "fst_is_batch", "srste", "fst2"])
@pytest.mark.parametrize("needs", ["both", "no_grad_input", "no_decay"])
def test_cached_masks_give_the_eager_operands_bit_for_bit(monkeypatch, name, needs):
    """mask_interval > 1: the module passes its cached S_K and S_Co masks."""
    from fullsparse.operands import mask_co, mask_k

    config = recipe(name)
    w = _weight((16, 8, 3, 3), seed=9)
    cached = {"forward_mask": mask_k(w), "grad_input_mask": mask_co(w)}
    w = w + 0.25 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))  # moved on
    kwargs = {"grad_input": needs != "no_grad_input", "decay": needs != "no_decay", **cached}
    got = weight_operands(w, config, 1, torch.float32, **kwargs)
    want = _eager(monkeypatch, w, config, 1, torch.float32, **kwargs)
    assert got.out_mask is cached["forward_mask"] and want.out_mask is cached["forward_mask"]
    _same(got.output, want.output)
    _same(got.grad_input, want.grad_input)
    _same(_decay(got, w), _decay(want, w))


@pytest.mark.usefixtures("library")
def test_the_native_ab_script_prints_a_row_per_case(capsys):
    from conftest import load_script

    script = load_script("native_ab")
    assert script.main(["--cases", "tiny-gpt", "--recipes", "fst_is_batch", "--repeats", "1",
                        "--threads", "1"]) == 0  # fmt: skip
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 1 and rows[0].count("×") == 2
    assert native.enabled()  # the script leaves the switch as it found it


def test_random_shapes_and_two_threads_equal_the_eager_path(monkeypatch):
    """Many small shapes (1 thread), and a large weight on 2 OpenMP threads (the kernels
    split their loops above 32,768 elements), every step and from cached masks."""
    from fullsparse.operands import mask_co, mask_k

    gen = torch.Generator().manual_seed(11)
    shapes = [(4 * int(a), 4 * int(b)) for a, b in torch.randint(1, 17, (30, 2), generator=gen)]
    before = torch.get_num_threads()
    try:
        for shape in [*shapes, (256, 512)]:
            torch.set_num_threads(2 if shape == (256, 512) else 1)
            w = _weight(shape, seed=shape[0] * 1000 + shape[1])
            for cached in ({}, {"forward_mask": mask_k(w), "grad_input_mask": mask_co(w)}):
                got = weight_operands(w, recipe("fst"), 1, torch.float32, **cached)
                want = _eager(monkeypatch, w, recipe("fst"), 1, torch.float32, **cached)
                _same(got.output, want.output)
                _same(got.grad_input, want.grad_input)
                _same(_decay(got, w), _decay(want, w))
    finally:
        torch.set_num_threads(before)


@pytest.mark.usefixtures("library")
@pytest.mark.parametrize("group", [4, 64, 0])
def test_the_native_sampling_draws_what_the_eager_path_draws(monkeypatch, group):
    """The same uniforms, the same kept rows (2 threads: the draw splits its groups, the
    norms and gathers their rows); the weights and the product equal to float32 rounding."""
    from fullsparse import sampled_grad, sampling

    gen = torch.Generator().manual_seed(12)
    x2 = torch.randn(4096, 64, generator=gen) * torch.rand(4096, 1, generator=gen) ** 3
    dy2 = torch.randn(4096, 48, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = {}
        for switch in ("auto", "off"):
            monkeypatch.setenv("FULLSPARSE_NATIVE", switch)
            torch.manual_seed(3)
            scores = sampled_grad.token_scores(x2, dy2)
            index, weight = sampling.sample_units(scores, 0.59, group)
            torch.manual_seed(3)
            grad = sampled_grad.linear_sampled_grad_weight(x2, dy2, "is_half", group=group,
                                                           share=0.59)  # fmt: skip
            runs[switch] = scores, index, weight, grad
    finally:
        torch.set_num_threads(before)
    (s_n, i_n, w_n, g_n), (s_e, i_e, w_e, g_e) = runs["auto"], runs["off"]
    torch.testing.assert_close(s_n, s_e, rtol=1e-5, atol=0)
    assert torch.equal(i_n, i_e)
    torch.testing.assert_close(w_n, w_e, rtol=1e-4, atol=0)
    torch.testing.assert_close(g_n, g_e, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    ("shape", "dim", "dtype"),
    [
        ((64, 12), 0, torch.float32),  # a Linear layer's dY along its tokens
        ((62, 12), 0, torch.float32),  # a partial last group
        ((5, 3, 18), 2, torch.float32),  # S_T rows (post = 1), partial groups
        ((9, 7, 5), 1, torch.float32),
        ((64, 12), 0, torch.bfloat16),  # computed in float32, returned in bf16
    ],
)
def test_the_native_mvue_equals_the_eager_one_bit_for_bit(monkeypatch, shape, dim, dtype):
    from fullsparse.estimators import mvue_2to4

    gen = torch.Generator().manual_seed(sum(shape))
    t = torch.randint(-2, 3, shape, generator=gen).float()  # zeros and ties
    t += torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) < 0.5)
    t.view(-1)[:4] = torch.tensor([50.0, 0.1, 0.0, 0.0])  # a capped entry
    t = t.to(dtype)
    calls = []
    real = native.mvue
    monkeypatch.setattr(native, "mvue", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(4)
    got = mvue_2to4(t, dim)
    monkeypatch.setenv("FULLSPARSE_NATIVE", "off")
    torch.manual_seed(4)
    want = mvue_2to4(t, dim)
    assert calls and got.dtype == want.dtype == dtype
    _same(got, want, strides=False)  # the eager result of a partial group is a strided view


@pytest.mark.parametrize("post", [8, 1])  # groups down rows, and of adjacent entries
@pytest.mark.parametrize("bad", ["inf", "nan", "overflow"])
def test_the_native_mvue_leaves_non_finite_values_to_the_eager_path(monkeypatch, bad, post):
    """A NaN or an infinity (or a group whose |t| sum overflows: 2·3e38) sends the whole
    call to the eager path, which defines the result."""
    from fullsparse.estimators import mvue_2to4

    t = torch.randn(16, post)
    if bad == "overflow":
        t[4, 0], t[5, 0] = 3e38, -3e38  # one group (rows 4–7), all finite
    else:
        t[3, 0] = float(bad)
    assert native.mvue(t.view(1, 1, 16, post), (5, 7)) is None
    torch.manual_seed(2)
    got = mvue_2to4(t, 0)
    monkeypatch.setenv("FULLSPARSE_NATIVE", "off")
    torch.manual_seed(2)
    _same(got, mvue_2to4(t, 0))


@pytest.mark.parametrize(
    "shape",
    [
        (6, 8, 4, 4),  # H·W a multiple of 4: the kernel reads NCHW in place
        (3, 5, 4, 6),
        (4, 3, 3, 3),  # H·W = 9: groups straddle samples, the transposed rows
        (2, 1, 1, 2),  # fewer entries than a group
    ],
)
def test_the_per_channel_mvue_equals_the_transposed_rows(monkeypatch, shape):
    """``mvue_2to4_channels`` (S_T's layout, NCHW in place) gives the same bits as the MVUE
    of the transposed ``[C, N·H·W]`` rows, with and without the kernel."""
    from fullsparse.estimators import mvue_2to4, mvue_2to4_channels

    n, c, h, w = shape
    t = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    t.view(-1)[:4] = torch.tensor([50.0, 0.1, 0.0, -0.0])
    torch.manual_seed(3)
    want = mvue_2to4(t.transpose(0, 1).reshape(c, -1), 1).reshape(c, n, h, w).transpose(0, 1)
    torch.manual_seed(3)
    got = mvue_2to4_channels(t)
    _same(got, want, strides=False)
    assert (got != 0).any()
    monkeypatch.setenv("FULLSPARSE_NATIVE", "off")
    torch.manual_seed(3)
    _same(mvue_2to4_channels(t), want, strides=False)


def test_the_native_mvue_draws_the_reference_uniforms():
    """The kernel's in-place uniforms are ``mvue_uniforms``'s: with entries whose keep
    decision is a threshold of u, the kept pattern reads u back."""
    from fullsparse.estimators import mvue_uniforms

    pre, size, post, key = 3, 8, 5, (123456789, 4000000000)
    # a group [1, 1, 1, 1] has p = 1/2 each: entry 0 is kept exactly when u < 1/2
    t = torch.ones(1, pre, size, post)
    out = native.mvue(t, key)
    u = mvue_uniforms(key, pre, post, size // 4)
    first_kept = out[0].view(pre, size // 4, 4, post)[:, :, 0] != 0
    assert torch.equal(first_kept, u < 0.5)
    assert 0.3 < float(first_kept.float().mean()) < 0.7


def test_the_native_mvue_on_two_threads(monkeypatch):
    from fullsparse.estimators import mvue_2to4

    t = torch.randn(4096, 40, generator=torch.Generator().manual_seed(8))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(6)
        got = mvue_2to4(t, 0)
        monkeypatch.setenv("FULLSPARSE_NATIVE", "off")
        torch.manual_seed(6)
        want = mvue_2to4(t, 0)
    finally:
        torch.set_num_threads(before)
    _same(got, want)


@pytest.mark.usefixtures("library")
def test_the_draw_takes_scores_of_any_layout(monkeypatch):
    """``sample_units`` is public: a strided score vector draws what a contiguous one does."""
    from fullsparse import sampling

    scores = torch.rand(64, generator=torch.Generator().manual_seed(13))
    strided = torch.stack([scores, scores], 1)[:, 0]
    assert not strided.is_contiguous()
    torch.manual_seed(1)
    want = sampling.sample_units(scores, 0.5, 8)
    torch.manual_seed(1)
    got = sampling.sample_units(strided, 0.5, 8)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


IR_CASES = [((3, 4, 5, 8), 3), ((3, 4, 5, 7), 3), ((2, 9, 6), -2), ((2, 8, 6), 1), ((5, 7), 0),
            ((12, 1, 1, 1), 3)]  # fmt: skip


@pytest.mark.usefixtures("library")
@pytest.mark.parametrize(("shape", "dim"), IR_CASES)
@pytest.mark.parametrize("alpha", [1.0, 0.0, 0.37])
def test_information_restoration_matches_the_eager_path(monkeypatch, shape, dim, alpha):
    """One pass over dY: the eager clone-and-add's bits for α 1 and 0 (one rounding either
    way; NaN, ±inf and −0 included), within a rounding for any α (torch adds with an FMA
    where the CPU has one), and the float64 restoration."""
    from fullsparse.operands import ir_grad_output

    t = _weight(shape, seed=len(shape) + dim)
    got = native.ir_half(t, alpha, dim)
    monkeypatch.setenv("FULLSPARSE_NATIVE", "off")
    want = ir_grad_output(t, alpha, dim)
    assert got.shape == want.shape and got.is_contiguous()
    if alpha in (0.0, 1.0):
        _same(got, want, strides=False)
    finite = t.isfinite().all(dim=dim, keepdim=True).expand_as(t)
    ref = ir_grad_output(torch.where(finite, t, 0.0).double(), alpha, dim)
    mask = ir_grad_output(finite.float(), 0.0, dim) > 0  # positions with finite inputs
    torch.testing.assert_close(got.double()[mask], ref[mask], rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("library")
@pytest.mark.parametrize("shape", [(3, 4, 5, 8), (3, 4, 5, 7), (4, 3, 2, 1), (64, 16, 9, 13)])
@pytest.mark.parametrize("phase", [0, 1])
def test_half_columns_copies_one_phase_and_flags_the_others_non_finite(shape, phase):
    """rand_half's dY operand: ``t[..., phase::2]`` bit for bit (NaN, ±inf and −0 included),
    and a flag that is set exactly when a column of the other phase is not finite (the
    largest shape splits its rows among the threads)."""
    t = torch.randn(shape)
    t.view(-1)[:6] = torch.tensor([-0.0, 0.0, 3e38, -3e38, 1e-45, 2.0])  # finite extremes
    got, bad = native.half_columns(t, phase)
    _same(got, t[..., phase::2], strides=False)
    assert got.is_contiguous() and bad is False  # x − x of ±3e38 is 0: no overflow
    width = shape[-1]
    for value in (float("nan"), float("inf"), float("-inf")):
        for column in range(width):
            u = t.clone()
            u[-1, 0, -1, column] = value
            got, bad = native.half_columns(u, phase)
            _same(got, u[..., phase::2], strides=False)
            assert bad is (column % 2 != phase)
    assert native.half_columns(t.double(), phase) is None
    assert native.half_columns(t.transpose(0, 1), phase) is None  # not contiguous


@pytest.mark.usefixtures("library")
def test_count_adds_as_index_add_does():
    """AdaptiveState.count in one native call: the same float64 bits as the torch update,
    and the torch update wherever the call does not apply."""
    from fullsparse.sampling import AdaptiveState

    state = AdaptiveState.new()
    state[4], state[5] = 0.1, 2.0**52 + 1  # not exact sums in float64
    want = state.clone()
    want.index_add_(0, torch.tensor([1, 4, 5]), torch.tensor([1.0, 7, 13], dtype=torch.float64))
    assert native.count(state, 7, 13)
    assert torch.equal(state, want)
    for other in (state.float(), state[::2].clone()[:3], torch.zeros(14, dtype=torch.float64)[::2]):
        assert not native.count(other, 1, 2)  # float32, too short, not contiguous
    strided = torch.zeros(14, dtype=torch.float64)[::2]
    AdaptiveState.count(strided, 7, 13)  # the torch path
    assert strided.tolist() == [0, 1, 0, 0, 7, 13, 0]


@pytest.mark.usefixtures("library")
@pytest.mark.parametrize("m", [8, 14])
def test_draw_rows_takes_samples_as_rows_and_may_skip_the_indices(m):
    """Rows of a contiguous 4-D tensor along its first dimension, kept rows in its shape,
    and without index and weight (the C code keeps its own): the bits of the 2-D call."""
    gen = torch.Generator().manual_seed(m)
    x, dy = torch.randn(m, 3, 2, 5, generator=gen), torch.randn(m, 4, 2, 2, generator=gen)
    u = torch.rand(m // 4, generator=gen)
    want = native.draw_rows(x.view(m, -1), dy.view(m, -1), 4, 3, u)
    got = native.draw_rows(x, dy, 4, 3, u, indices=False)
    assert got[0] is None and got[1] is None
    assert got[3].shape == (want[3].shape[0], 3, 2, 5) and got[2].shape[1:] == (4, 2, 2)
    assert torch.equal(got[3].view(want[3].shape), want[3])
    assert torch.equal(got[2].view(want[2].shape), want[2])
    assert native.draw_rows(x.transpose(1, 2), dy, 4, 3, u) is None  # not contiguous


@pytest.mark.usefixtures("library")
def test_the_weight_side_reads_a_convolution_weight_in_place():
    """A contiguous [Co, Ci, kh, kw] weight is read as [Co, Ci·kh·kw] with no reshape: the
    operands in its shape and the decay added to its gradient, the bits of the 2-D calls."""
    w = _weight((8, 4, 3, 3), seed=3)
    want = native.fst_weight_side(w.view(8, -1), 0.25, True, True)
    got = native.fst_weight_side(w, 0.25, True, True)
    for a, b in zip(got, want, strict=True):
        assert a.shape == w.shape
        _same(a.view(b.shape), b)
    grad = torch.randn(8, 4, 3, 3)
    grad2 = grad.clone().view(8, -1)
    assert native.add_fst_decay(grad, w, 0.25) and native.add_fst_decay(grad2, w.view(8, -1), 0.25)
    _same(grad.view(8, -1), grad2)
    assert native.fst_weight_side(_weight((8, 3, 1, 1)), 0.25, True, True) is None  # k = 3
