"""Extra time FST spends per training iteration (paper Table 6), against the sorting-based
activation masks it avoids (paper Table 2).

Per iteration of a model, summed over its sparse layers, each operator alone:

- ``S(W)``   — the forward mask, 2:4 along K, applied: ``W ⊙ S_K(W)`` (once per forward);
- ``S(Wᵀ)``  — the separate backward mask, 2:4 along Co, applied: ``W ⊙ S_Co(W)``;
- ``shift``  — information restoration: ``dY[..., 2j] + α·dY[..., 2j+1]`` (the IR "shift"
  of Table 6, here a strided add that also halves ``dY``);

and, for comparison (what the WX/WG/GG/GX rows of Table 1 would have to pay, Table 2):

- ``S(Xᵀ) im2col`` — magnitude 2:4 along the spatial axis of the im2col matrix of the
  layer input (``[Ci·kh·kw, N·Ho·Wo]``, the actual operand of Eq. 3 in WX/GX);
- ``S(X)``    — the same on the feature map itself (``[C, N·H·W]``), k·k times smaller;
- ``S(dY)``   — 2:4 along the spatial axis of the output gradient (``[Co, N·Ho·Wo]``; WG/GG).

The masks use :func:`fullsparse.masks.mask_2to4` — a data-dependent magnitude selection
in each group of 4 (six comparisons per group rather than a sort; the paper's "sorting-
based" means this kind of selection). The iteration is one forward + backward + SGD step
of the model under ``recipe`` (default ``fst``) and, for scale, under ``dense``. Times are
medians over ``repeats``; on CUDA every timed region is synchronised.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fullsparse.functional import ir_grad_output, mask_co, mask_k
from fullsparse.masks import mask_2to4
from fullsparse.nn import densify_, sparse_modules, sparsify_
from fullsparse.recipes import recipe as make_recipe

__all__ = [
    "OPERATORS",
    "PAPER_TABLE6",
    "OperatorTime",
    "OverheadResult",
    "measure_overhead",
    "format_overhead",
]

#: Operators timed, in table order: (key, label, part of FST's overhead?).
OPERATORS = (
    ("s_w", "S(W)", True),
    ("s_wt", "S(Wᵀ)", True),
    ("shift", "shift(dY) (IR)", True),
    ("s_xt_im2col", "S(Xᵀ) im2col (sorting-based)", False),
    ("s_x", "S(X) feature map (sorting-based)", False),
    ("s_dy", "S(dY) (sorting-based)", False),
)

#: Paper Table 6 (A100, PyTorch 1.7, ResNet-18, batch 256) and Table 2, in seconds.
PAPER_TABLE6 = {
    "iteration": 0.184,
    "s_w": 0.0017,
    "s_wt": 0.0017,
    "shift": 0.0008,
    "fst_total": 0.0042,
    "s_dy_table2": 0.29,
    "s_xt_table2": 0.48,
}


@dataclass
class OperatorTime:
    key: str
    label: str
    fst: bool
    ms: float
    #: Share of the ``recipe`` training iteration, in percent.
    percent: float
    #: Elements the operator touches per iteration (all layers).
    elements: int


@dataclass
class OverheadResult:
    model: str
    recipe: str
    batch_size: int
    image_size: int
    device: str
    iteration_ms: float
    dense_iteration_ms: float
    operators: list[OperatorTime] = field(default_factory=list)
    layers: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def fst_total_ms(self) -> float:
        return sum(o.ms for o in self.operators if o.fst)

    def to_dict(self) -> dict[str, Any]:
        return dict(
            asdict(self),
            fst_total_ms=self.fst_total_ms,
            fst_total_percent=100.0 * self.fst_total_ms / self.iteration_ms,
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


@dataclass
class _Layer:
    name: str
    module: nn.Module
    input: Tensor
    grad_output: Tensor


def _collect_layers(model: nn.Module, x: Tensor) -> list[_Layer]:
    """Each sparse layer with a real input and a random stand-in ``dY`` of its output's
    shape (mask costs depend on sizes, not values)."""
    found: dict[str, tuple[Tensor, Tensor]] = {}
    modules = dict(sparse_modules(model))

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            found[name] = (args[0].detach(), torch.randn_like(output.detach()))

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return [_Layer(n, modules[n], *found[n]) for n in modules if n in found]


def _spatial_rows(t: Tensor) -> Tensor:
    """``[N, C, H, W]`` → ``[C, N·H·W]`` (per channel, (n, h, w) order); ``[..., d]`` →
    ``[d, rows]`` for linear activations."""
    if t.ndim == 4:
        return t.transpose(0, 1).reshape(t.shape[1], -1)
    return t.reshape(-1, t.shape[-1]).t()


def _im2col_rows(layer: _Layer) -> Tensor:
    m = layer.module
    if isinstance(m, nn.Conv2d):
        cols = F.unfold(layer.input, m.kernel_size, m.dilation, m.padding, m.stride)
        return cols.transpose(0, 1).reshape(cols.shape[1], -1)  # [K, N·L]
    return _spatial_rows(layer.input)  # a linear layer's input is its own im2col


def measure_overhead(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    recipe: str = "fst",
    ir_alpha: float = 1.0,
    warmup: int = 2,
    repeats: int = 10,
    model_name: str = "model",
    progress: Callable[[str], None] | None = None,
) -> OverheadResult:
    """Time one training iteration and each mask operator (see the module docstring).

    Args:
        model: the network (left untouched: copies are sparsified); on the device to
            measure (``x``/``y`` are moved there).
        x, y: one batch ``[B, C, H, W]`` and labels ``[B]``.
        recipe: the recipe whose iteration is the reference (``fst``: Table 6).
        ir_alpha: α of the timed shift.
        warmup, repeats: untimed runs, then timed runs (median).
        model_name: a label for the table.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x, y = x.to(device), y.to(device)
    times: dict[str, float] = {}
    for name in ("dense", recipe) if recipe != "dense" else ("dense",):
        if progress:
            progress(f"iteration: {name}")
        m = copy.deepcopy(model)
        densify_(m)
        sparsify_(m, make_recipe(name))
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

        def step(m: nn.Module = m, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.step()

        times[name] = _median_ms(step, device, warmup, repeats)
    iteration_ms = times[recipe]
    probe = copy.deepcopy(model)
    densify_(probe)
    sparsify_(probe, make_recipe("fst"))  # the layers FST makes sparse
    probe.eval()
    layers = _collect_layers(probe, x)

    def per_layer(op: Callable[[_Layer], Any]) -> Callable[[], None]:
        def run() -> None:
            for layer in layers:
                op(layer)

        return run

    def groups(layer: _Layer) -> int:
        return int(getattr(layer.module, "groups", 1))

    def shift(layer: _Layer) -> Tensor:
        dim = 3 if layer.grad_output.ndim == 4 else -2
        return ir_grad_output(layer.grad_output, ir_alpha, dim=dim)

    im2col = {}
    ops: dict[str, tuple[Callable[[_Layer], Any], Callable[[_Layer], int]]] = {
        "s_w": (
            lambda l: l.module.weight * mask_k(l.module.weight),
            lambda l: l.module.weight.numel(),
        ),
        "s_wt": (
            lambda l: l.module.weight * mask_co(l.module.weight, groups(l)),
            lambda l: l.module.weight.numel(),
        ),
        "shift": (shift, lambda l: l.grad_output.numel()),
        "s_xt_im2col": (
            lambda l: im2col[l.name] * mask_2to4(im2col[l.name], dim=1),
            lambda l: im2col[l.name].numel(),
        ),
        "s_x": (
            lambda l: (r := _spatial_rows(l.input)) * mask_2to4(r, dim=1),
            lambda l: l.input.numel(),
        ),
        "s_dy": (
            lambda l: (r := _spatial_rows(l.grad_output)) * mask_2to4(r, dim=1),
            lambda l: l.grad_output.numel(),
        ),
    }
    result = OverheadResult(
        model=model_name,
        recipe=recipe,
        batch_size=int(x.shape[0]),
        image_size=int(x.shape[-1]),
        device=str(device),
        iteration_ms=iteration_ms,
        dense_iteration_ms=times["dense"],
        layers=len(layers),
        settings={"warmup": warmup, "repeats": repeats, "ir_alpha": ir_alpha},
    )
    with torch.no_grad():
        for key, label, is_fst in OPERATORS:
            if progress:
                progress(f"operator: {label}")
            op, count = ops[key]
            if key == "s_xt_im2col":
                # the unfold itself is not the mask's cost: build the matrices once, untimed
                im2col.update({layer.name: _im2col_rows(layer) for layer in layers})
            ms = _median_ms(per_layer(op), device, warmup, repeats)
            elements = sum(count(layer) for layer in layers)
            if key == "s_xt_im2col":
                im2col.clear()
            result.operators.append(
                OperatorTime(key, label, is_fst, ms, 100.0 * ms / iteration_ms, elements)
            )
    return result


def format_overhead(result: OverheadResult) -> str:
    """Markdown in the layout of paper Table 6, with Table 2's operators below it."""
    it = result.iteration_ms
    lines = [
        f"{result.model}, batch {result.batch_size} at {result.image_size}×{result.image_size}, "
        f"{result.layers} sparse layers, on {result.device}. Iteration = forward + backward + "
        f"SGD step under `{result.recipe}` ({it:.1f} ms; `dense`: "
        f"{result.dense_iteration_ms:.1f} ms).",
        "",
        "| operator | ms / iteration | % of iteration | elements / iteration | paper (A100, ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    paper = {
        "s_w": PAPER_TABLE6["s_w"],
        "s_wt": PAPER_TABLE6["s_wt"],
        "shift": PAPER_TABLE6["shift"],
        "s_xt_im2col": PAPER_TABLE6["s_xt_table2"],
        "s_dy": PAPER_TABLE6["s_dy_table2"],
    }
    for o in result.operators:
        if o.key == "s_xt_im2col":
            lines.append(
                f"| **FST total** | **{result.fst_total_ms:.2f}** | "
                f"**{100 * result.fst_total_ms / it:.2f}** | | "
                f"{1e3 * PAPER_TABLE6['fst_total']:.1f} |"
            )
        ref = f"{1e3 * paper[o.key]:.1f}" if o.key in paper else "-"
        lines.append(f"| {o.label} | {o.ms:.2f} | {o.percent:.2f} | {o.elements:,} | {ref} |")
    lines.append(
        f"| iteration (`{result.recipe}`) | {it:.1f} | 100 | | "
        f"{1e3 * PAPER_TABLE6['iteration']:.0f} |"
    )
    return "\n".join(lines)
