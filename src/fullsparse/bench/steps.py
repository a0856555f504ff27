"""``bench steps``: whole training steps (forward, loss, backward, optimizer step) of dense
and each recipe, in one process.

Per case (:data:`STEP_CASES`) every recipe's model is built from the same seed, sparsified
(``sparsify_``'s default selection and backend), and one step of each is timed in turn,
the order rotated every round (:func:`~fullsparse.bench.harness.interleaved_ms`); the
result is the median over ``repeats`` rounds after ``max(1, warmup)`` warm-up rounds.
Reported per case and recipe:

- ``step_ms`` and ``speedup_vs_dense`` = dense step time / recipe step time (above 1 =
  faster than dense), each the median over the rounds;
- ``speedup_paired``: the same ratio round by round (a dense step and the recipe's step of
  one round run seconds apart, so a machine whose speed drifts moves both alike): its
  ``median`` and a distribution-free confidence interval of that median, ``low`` to
  ``high``, holding it with probability ``coverage`` (≥ 0.95 from 9 rounds on;
  :func:`~fullsparse.bench.harness.median_interval`);
- ``peak_memory_mb``: one more, untimed step's peak memory above what was live before it
  (:func:`~fullsparse.bench.harness.peak_memory_bytes` says what that counts);
- ``weight_side``: the per-step work sparse layers do on their weights alone (the 2:4
  masks S_K(W) and S_Co(W) or the TSM mask, the ``grad_input`` weight operand, the SR-STE
  decay term — or 2by4's masked decay, under ``decay_kind='masked_grad'`` —;
  :func:`~fullsparse.bench.ops.weight_side_work`), summed over every sparse
  layer, as a percentage of the dense step; and for recipes whose weight gradient samples
  (``fst_mvue``'s MVUE, the sampled recipes) the sampling alone on one step's operands
  (``sampling_ms``, ``sampling_percent_of_dense_step``). Each is timed in the same rotated
  rounds as a dense step (``dense_step_ms``), the denominator of its percentage. The
  sampling is also clocked inside the timed steps themselves (``sampling_in_step_ms``,
  ``sampling_in_step_percent_of_dense_step``, :mod:`fullsparse.clock`): what a training
  step pays for it, X as the forward left it and dY just made (on the project's CPU it came
  out higher than the replay: ``docs/benchmarks/cpu-steps.md``).

Plus ``grad_weight``: the ``fst`` weight gradient alone against the dense one at a 56×56
conv shape (batch 32, 64→64 channels, 3×3 by default), the half-FLOP product on its own.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fullsparse.bench.cases import ConvShape
from fullsparse.bench.harness import (
    interleaved_ms,
    interleaved_times,
    machine_info,
    paired_speedup,
    peak_memory_bytes,
    ratio,
)
from fullsparse.bench.layers import role_fns
from fullsparse.bench.ops import recipe, weight_side_work
from fullsparse.clock import SamplingClock, running
from fullsparse.sampling import SAMPLED_MODES

__all__ = [
    "StepCase",
    "STEP_CASES",
    "DEFAULT_CASES",
    "DEFAULT_RECIPES",
    "GRAD_WEIGHT_SHAPE",
    "STEP_TARGETS",
    "bench_steps",
]


@dataclass(frozen=True)
class StepCase:
    """One model, batch and optimizer as a training run would use them."""

    name: str
    model: str  # a fullsparse.models name (build_model, or build_lm_model for "lm")
    batch: int
    task: str = "classify"  # "classify": images -> classes; "lm": bytes -> next byte
    image_size: int = 0
    channels: int = 3
    classes: int = 10
    context: int = 0  # lm: sequence length
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "sgd"  # "sgd": momentum 0.9, wd 7e-5; "adamw"
    lr: float = 0.05
    clip: float | None = None  # gradient-norm clipping, as the lm runs do
    note: str = ""


def _cases() -> dict[str, StepCase]:
    vit_kw = {"depth": 4, "patch_size": 7}
    cases = [
        StepCase("resnet20", "resnet20", 128, image_size=28, channels=1,
                 note="Fashion-MNIST shape, the results' ResNet-20 (docs/results.md)"),
        StepCase("resnet18-b8", "resnet18", 8, image_size=160, classes=1000,
                 note="ImageNet ResNet-18 at 160x160"),
        StepCase("resnet18-b32", "resnet18", 32, image_size=160, classes=1000,
                 note="ImageNet ResNet-18 at 160x160"),
        StepCase("vit", "vit_tiny", 128, image_size=28, channels=1, model_kwargs=vit_kw,
                 optimizer="adamw", lr=1e-3,
                 note="ViT-tiny width, 4 blocks, 7x7 patches (docs/results.md)"),
        StepCase("gpt", "gpt_tiny", 32, task="lm", context=128, optimizer="adamw", lr=3e-3,
                 clip=1.0, note="gpt_tiny, 32 x 128 bytes (docs/language-model.md)"),
        # not in DEFAULT_CASES: the same GPT four times as wide (a sampled weight gradient
        # saves FLOPs that grow with the width squared, for copies that grow with the width)
        StepCase("gpt-wide", "gpt_tiny", 8, task="lm", context=128, optimizer="adamw",
                 lr=3e-3, clip=1.0, model_kwargs={"embed_dim": 512, "num_heads": 8},
                 note="gpt_tiny at width 512 (8 heads), 8 x 128 bytes"),
        # small stand-ins: the whole command in seconds, for tests and a first try
        StepCase("tiny-resnet20", "resnet20", 4, image_size=8, channels=1, note="test size"),
        StepCase("tiny-vit", "vit_tiny", 4, image_size=8, channels=1, optimizer="adamw",
                 lr=1e-3, model_kwargs={"depth": 1, "embed_dim": 16, "num_heads": 2,
                                        "patch_size": 4}, note="test size"),
        StepCase("tiny-gpt", "gpt_tiny", 2, task="lm", context=8, optimizer="adamw", lr=3e-3,
                 clip=1.0, model_kwargs={"depth": 1, "embed_dim": 16, "num_heads": 2},
                 note="test size"),
    ]  # fmt: skip
    return {c.name: c for c in cases}


STEP_CASES: dict[str, StepCase] = _cases()
DEFAULT_CASES = ("resnet20", "resnet18-b8", "resnet18-b32", "vit", "gpt")
#: The paper's recipe, the two fully sparse candidates of the quality study (``fst_mvue``, the
#: README's recommendation for dense quality, and ``fst_is_batch``, the cheapest on a CPU)
#: and the other sampled (reduced-size) weight gradients.
DEFAULT_RECIPES = ("dense", "fst", "fst_mvue", "fst_rand", "fst_is", "fst_adaptive", "fst_is_batch")
#: Where ``bench steps`` runs.
STEP_DEVICES = ("cpu", "cuda")
GRAD_WEIGHT_SHAPE = ConvShape("layer1 3x3 64-64 @56", 64, 64, 3, 1, 56, 32)
#: What the step benchmark is meant to show; reported with each result, never asserted.
STEP_TARGETS = {
    "fst_step_speedup_min": 1.0,  # fst step >= 1.0x dense in every case (aim: 1.1x)
    "best_step_speedup_min": 1.0,  # some recipe >= 1.0x dense in every case
    "weight_side_percent_max": 5.0,  # weight-side work < 5 % of a dense step
    "sampling_percent_max": 5.0,  # weight-gradient sampling (MVUE, sampled units) < 5 %
    "fst_grad_weight_speedup": 1.8,  # fst grad_weight alone >= 1.8x dense at 56x56
}


# --------------------------------------------------------------------------- one case
def _config(
    name: str,
    mask_interval: int,
    sampling: dict[str, Any] | None = None,
    decay: dict[str, Any] | None = None,
) -> Any:
    """Recipe ``name`` with the masks recomputed every ``mask_interval`` steps (recipes with
    an S_K forward; the others ignore the interval), ``sampling``'s ``sample_group`` /
    ``sample_share`` / ``conv_sample_unit`` (recipes whose weight gradient they steer; the
    others ignore them) and ``decay``'s ``decay_kind`` / ``decay`` (recipes with a sparse
    forward and a decay)."""
    base = recipe(name)
    fields: dict[str, Any] = {}
    if mask_interval > 1 and base.operands.output_weight == "S_K(W)":
        fields["mask_interval"] = mask_interval
    if base.operands.output_weight != "W" and base.decay:
        fields.update({k: v for k, v in (decay or {}).items() if v is not None})
    modes = {base.grad_weight_mode, base.grad_weight_mode_linear}
    for key, value in (sampling or {}).items():
        steered = {"is_half"} if key == "sample_share" else {"is_half", "is_adaptive"}
        kinds = {base.grad_weight_mode} if key == "conv_sample_unit" else modes
        if value is not None and kinds & steered:
            fields[key] = value
    return recipe(name, **fields) if fields else base


def _build(
    case: StepCase,
    name: str,
    device: torch.device,
    mask_interval: int = 1,
    sampling: dict[str, Any] | None = None,
    decay: dict[str, Any] | None = None,
    backend: str = "auto",
) -> nn.Module:
    from fullsparse.models import build_lm_model, build_model
    from fullsparse.nn import sparsify_

    torch.manual_seed(0)
    if case.task == "lm":
        model = build_lm_model(case.model, context=case.context, **case.model_kwargs)
    else:
        model = build_model(
            case.model, case.classes, case.channels, case.image_size, **case.model_kwargs
        )
    model = model.to(device)
    if name != "dense":
        sparsify_(model, _config(name, mask_interval, sampling, decay), backend=backend)
    return model


def _batch(case: StepCase, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    if case.task == "lm":
        tokens = torch.randint(0, 256, (case.batch, case.context + 1), generator=gen)
        return tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    shape = (case.batch, case.channels, case.image_size, case.image_size)
    x = torch.randn(shape, generator=gen)
    return x.to(device), torch.randint(0, case.classes, (case.batch,), generator=gen).to(device)


def _step_fn(case: StepCase, model: nn.Module, device: torch.device) -> Callable[[int], None]:
    """One training step of ``model`` on a fixed batch (with 2by4's masked decay just before
    the optimizer where a layer's config asks for it, as the trainer adds it)."""
    from fullsparse.nn import masked_grad_decay_, sparse_modules

    x, y = _batch(case, device)
    masked = any(m.config.decay_kind == "masked_grad" for _, m in sparse_modules(model))  # type: ignore[attr-defined]
    if case.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=case.lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=case.lr, momentum=0.9, weight_decay=7e-5)
    model.train()

    def step(_: int) -> None:
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, -2), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if case.clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), case.clip)
        if masked:
            masked_grad_decay_(model)
        opt.step()

    return step


def _weight_side_fn(
    model: nn.Module, cached_masks: bool = False
) -> tuple[int, Callable[[int], None]]:
    """(sparse layers, a callable doing every sparse layer's weight-side work once).

    ``cached_masks``: the work of a step between two mask recomputations (``mask_interval >
    1``): the module's cached S_K and S_Co masks are applied, not recomputed."""
    from fullsparse.masked_decay import module_masked_decay_
    from fullsparse.nn import sparse_modules

    layers = []
    for _, m in sparse_modules(model):
        cfg = m.config  # type: ignore[attr-defined]
        cached = m.tsm_mask if cfg.uses_transposable_mask or cached_masks else None  # type: ignore
        gi = m.gi_mask if cached_masks else None  # type: ignore[attr-defined]
        w = m.weight.detach()
        # the weight gradient a backward adds a deferred decay to (it exists by then)
        # 2by4's masked decay, once per optimizer step, as the trainer adds it
        masked = m if cfg.decay_kind == "masked_grad" else None
        layers.append(
            (w, cfg, int(getattr(m, "groups", 1)), cached, gi, torch.zeros_like(w), masked)
        )

    def work(_: int) -> None:
        with torch.no_grad():
            for w, cfg, groups, cached, gi, grad, masked in layers:
                weight_side_work(w, cfg, groups, cached, gi, grad=grad)
                if masked is not None:
                    module_masked_decay_(masked, grad)

    return len(layers), work


def _sampling_fn(
    case: StepCase, model: nn.Module, device: torch.device
) -> tuple[int, Callable[[int], None]]:
    """(layers, a callable doing every sparse layer's weight-gradient *sampling* once: the
    MVUE of dY, or a sampled gradient's scores, draw and operand copies), on the operands of
    one training step of ``model``."""
    from fullsparse.geometry import ConvGeometry
    from fullsparse.nn import sparse_modules
    from fullsparse.operands import mvue_spatial_conv, mvue_tokens
    from fullsparse.sampled_grad import sampling_work

    captured: list[tuple[Any, Any, torch.Tensor, list[torch.Tensor]]] = []
    hooks = []
    for _, m in sparse_modules(model):
        conv = isinstance(m, nn.Conv2d)
        config = m.config.for_kind("conv" if conv else "linear")  # type: ignore[operator]
        if config.grad_weight_mode not in (*SAMPLED_MODES, "mvue"):
            continue

        def keep(mod: nn.Module, args: Any, out: torch.Tensor, config: Any = config) -> None:
            grads: list[torch.Tensor] = []
            out.register_hook(lambda g: grads.append(g.detach()))
            captured.append((config, mod, args[0].detach(), grads))

        hooks.append(m.register_forward_hook(keep))
    _step_fn(case, model, device)(0)
    for h in hooks:
        h.remove()
    layers = []
    for config, mod, x, grads in captured:
        if not grads:
            continue
        dy, w = grads[0], mod.weight.detach()
        if isinstance(mod, nn.Conv2d):
            geo = ConvGeometry.make(mod.stride, mod.padding, mod.dilation, mod.groups)
            layers.append((config, x, dy, w, geo))
        else:
            x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
            layers.append((config, x2, dy2, w, None))

    def work(_: int) -> None:
        with torch.no_grad():
            for config, x, dy, w, geo in layers:
                mode = config.grad_weight_mode
                if mode == "mvue":
                    mvue_tokens(dy) if geo is None else mvue_spatial_conv(dy)
                else:
                    share = config.sample_share if mode == "is_half" else 0.5
                    unit = config.conv_sample_unit
                    sampling_work(mode, x, dy, w, geo, config.sample_group, share, unit)

    return len(layers), work


def _bench_case(
    case: StepCase,
    names: Sequence[str],
    warmup: int,
    repeats: int,
    device: torch.device,
    mask_interval: int = 1,
    sampling: dict[str, Any] | None = None,
    decay: dict[str, Any] | None = None,
    backend: str = "auto",
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    models = {
        name: _build(case, name, device, mask_interval, sampling, decay, backend) for name in names
    }
    steps = {name: _step_fn(case, models[name], device) for name in names}
    # the sampling inside each timed step, on its own operands (X as the forward left it,
    # dY just made): a clock over the marked functions (fullsparse.clock)
    clock, in_step = SamplingClock(), {name: [] for name in names}

    def clocked(name: str) -> Callable[[int], None]:
        def step(i: int) -> None:
            clock.reset()
            steps[name](i)
            in_step[name].append(clock.seconds * 1e3)

        return step

    with running(clock):
        times = interleaved_times({n: clocked(n) for n in names}, warmup, repeats, device)
    ms = {name: statistics.median(t) for name, t in times.items()}
    work = {name: _weight_side_fn(models[name]) for name in names}
    rows = [
        {
            "case": case.name,
            "recipe": name,
            "batch": case.batch,
            "step_ms": ms[name],
            "speedup_vs_dense": ratio(ms["dense"], ms[name]),
            "speedup_paired": paired_speedup(times["dense"], times[name]),
            "peak_memory_mb": peak_memory_bytes(lambda s=steps[name]: s(0), device) / 2**20,
            "sparse_layers": work[name][0],
        }
        for name in names
    ]
    side = []
    for name in names:
        layers, fn = work[name]
        if not layers:
            continue
        # the work is timed in the same rounds as a dense step: its share of that step
        # holds even where the machine's speed drifts between one measurement and the next
        fns = {"dense": steps["dense"], "work": fn}
        if _config(name, mask_interval).mask_interval > 1:
            # one step in mask_interval recomputes the masks; the others apply cached ones
            fns["cached"] = _weight_side_fn(models[name], cached_masks=True)[1]
        sampled, sample_fn = _sampling_fn(case, models[name], device)
        if sampled:
            fns["sampling"] = sample_fn
        t = interleaved_ms(fns, warmup, repeats, device)
        work_ms = t["work"]
        if "cached" in t:
            work_ms = t["cached"] + (work_ms - t["cached"]) / mask_interval
        row = {
            "case": case.name,
            "recipe": name,
            "layers": layers,
            "ms": work_ms,
            "dense_step_ms": t["dense"],
            "percent_of_dense_step": 100.0 * work_ms / t["dense"],
        }
        if sampled:
            row["sampling_layers"] = sampled
            row["sampling_ms"] = t["sampling"]
            row["sampling_percent_of_dense_step"] = 100.0 * t["sampling"] / t["dense"]
            inside = statistics.median(in_step[name][-repeats:])
            row["sampling_in_step_ms"] = inside
            row["sampling_in_step_percent_of_dense_step"] = 100.0 * inside / ms["dense"]
        side.append(row)
    return rows, side


def _grad_weight(
    shape: ConvShape,
    warmup: int,
    repeats: int,
    device: torch.device,
    sampled: Sequence[str] = (),
) -> dict[str, Any]:
    """The fst weight gradient alone vs the dense one (as ``bench layers`` times it), and
    that of every recipe in ``sampled`` (its sampling included)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape.batch, shape.cin, shape.size, shape.size, generator=gen)
    w = torch.randn(shape.cout, shape.cin, shape.kernel, shape.kernel, generator=gen)
    dy = torch.randn(shape.batch, shape.cout, shape.out_size, shape.out_size, generator=gen)
    x, w, dy = x.to(device), w.to(device), dy.to(device)
    names = ("dense", "fst", *(n for n in sampled if n not in ("dense", "fst")))
    fns = {n: role_fns(shape, n, x, w, dy)["grad_weight"] for n in names}
    ms = interleaved_ms(fns, warmup, repeats, device)
    return {
        "shape": asdict(shape),
        "dense_ms": ms["dense"],
        "fst_ms": ms["fst"],
        "speedup": ratio(ms["dense"], ms["fst"]),
        # every recipe with a reduced-size weight gradient (its sampling included)
        "recipes": {n: {"ms": ms[n], "speedup": ratio(ms["dense"], ms[n])} for n in names[1:]},
    }


# --------------------------------------------------------------------------- the suite
def bench_steps(
    cases: Sequence[str] = DEFAULT_CASES,
    recipes: Sequence[str] = DEFAULT_RECIPES,
    *,
    warmup: int = 2,
    repeats: int = 10,
    threads: int | None = None,
    device: str | torch.device = "cpu",
    grad_weight_shape: ConvShape | None = GRAD_WEIGHT_SHAPE,
    progress: Callable[[str], None] | None = None,
    mask_interval: int = 1,
    sampling: dict[str, Any] | None = None,
    decay: dict[str, Any] | None = None,
    backend: str = "auto",
) -> dict[str, Any]:
    """Time whole training steps of every recipe (``dense`` always included, first) for
    every case of :data:`STEP_CASES` named in ``cases``.

    Returns a JSON-ready dict: ``machine``, ``settings``, ``steps`` (one row per case ×
    recipe), ``weight_side`` (one row per case × sparse recipe), ``grad_weight`` (None
    when ``grad_weight_shape`` is None) and ``targets`` (:data:`STEP_TARGETS`, judged).
    ``mask_interval``: every recipe with an S_K forward recomputes its weight masks every
    this-many steps (its weight-side work is then the amortized cost per step).
    ``sampling``: ``sample_group`` / ``sample_share`` for the recipes whose weight gradient
    they steer (``fst_is``; the group also ``fst_adaptive``). ``backend``: the sparse layers'
    (``sparsify_``'s ``backend``; ``cpu_sparse`` runs the Linear layers' 2:4 products on the
    CPU's vector units).

    Raises:
        ValueError: an unknown case or recipe name.
    """
    unknown = [c for c in cases if c not in STEP_CASES]
    if unknown:
        raise ValueError(
            f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(STEP_CASES)}"
        )
    for name in recipes:
        recipe(name)  # unknown names fail before any timing
    names = ["dense", *dict.fromkeys(r for r in recipes if r != "dense")]
    warmup = max(1, warmup)
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    report = progress or (lambda msg: None)
    steps: list[dict[str, Any]] = []
    side: list[dict[str, Any]] = []
    for case_name in cases:
        report(f"steps {case_name}: {', '.join(names)}")
        rows, work = _bench_case(
            STEP_CASES[case_name], names, warmup, repeats, device, mask_interval, sampling, decay,
            backend,
        )  # fmt: skip
        steps += rows
        side += work
    grad_weight = None
    if grad_weight_shape is not None:
        sampled = [n for n in names if recipe(n).grad_weight_mode in SAMPLED_MODES]
        report(f"grad_weight {grad_weight_shape.name}: dense, fst, {', '.join(sampled)}")
        grad_weight = _grad_weight(grad_weight_shape, warmup, repeats, device, sampled)
    result = {
        "machine": machine_info(),
        "settings": {
            "cases": [asdict(STEP_CASES[c]) for c in cases],
            "recipes": names,
            "warmup": warmup,
            "repeats": repeats,
            "mask_interval": mask_interval,
            "sampling": {k: v for k, v in (sampling or {}).items() if v is not None},
            "decay": {k: v for k, v in (decay or {}).items() if v is not None},
            "backend": backend,
            "device": str(device),
            "peak_memory": "bytes held at once above what was live before the step "
            + ("(torch.cuda.max_memory_allocated)" if device.type == "cuda" else
               "(CPU allocator events recorded by torch.profiler)"),
        },
        "steps": steps,
        "weight_side": side,
        "grad_weight": grad_weight,
    }  # fmt: skip
    result["targets"] = _targets(result)
    return result


def _worst_case_per_recipe(
    steps: list[dict[str, Any]], value: Callable[[dict[str, Any]], float]
) -> dict[str, float]:
    """Per sparse recipe, the smallest ``value`` of its rows over the cases."""
    worst: dict[str, float] = {}
    for r in steps:
        if r["recipe"] != "dense":
            v = value(r)
            worst[r["recipe"]] = min(worst.get(r["recipe"], v), v)
    return worst


def _targets(result: dict[str, Any]) -> dict[str, Any]:
    fst = [r["speedup_vs_dense"] for r in result["steps"] if r["recipe"] == "fst"]
    side = [r["percent_of_dense_step"] for r in result["weight_side"]]
    sampling = [  # replayed alone or timed inside the steps: the larger
        max(r["sampling_percent_of_dense_step"], r.get("sampling_in_step_percent_of_dense_step", 0))
        for r in result["weight_side"]
        if "sampling_percent_of_dense_step" in r
    ]
    gw = result["grad_weight"]

    def judge(value: float | None, target: float, higher: bool) -> dict[str, Any]:
        met = None if value is None else (value >= target if higher else value < target)
        return {"value": value, "target": target, "met": met}

    t = STEP_TARGETS
    per_recipe = _worst_case_per_recipe(result["steps"], lambda r: r["speedup_vs_dense"])
    best = max(per_recipe, key=per_recipe.__getitem__) if per_recipe else None
    # the same question asked of the paired intervals' low ends: which recipe is no slower
    # than dense in every case with the interval's confidence (results from before the
    # paired ratio have none)
    per_recipe_low = _worst_case_per_recipe(
        [r for r in result["steps"] if "speedup_paired" in r], lambda r: r["speedup_paired"]["low"]
    )
    best_low = max(per_recipe_low, key=per_recipe_low.__getitem__) if per_recipe_low else None
    return {
        "fst_step_speedup_min": judge(min(fst) if fst else None, t["fst_step_speedup_min"], True),
        "best_step_speedup_min": {
            **judge(per_recipe.get(best) if best else None, t["best_step_speedup_min"], True),
            "recipe": best,
            "per_recipe": per_recipe,
        },
        "best_step_speedup_low": {
            **judge(
                per_recipe_low.get(best_low) if best_low else None,
                t["best_step_speedup_min"],
                True,
            ),
            "recipe": best_low,
            "per_recipe": per_recipe_low,
        },
        "weight_side_percent_max": judge(
            max(side) if side else None, t["weight_side_percent_max"], False
        ),
        "sampling_percent_max": judge(
            max(sampling) if sampling else None, t["sampling_percent_max"], False
        ),
        "fst_grad_weight_speedup": judge(
            gw["speedup"] if gw else None, t["fst_grad_weight_speedup"], True
        ),
    }
