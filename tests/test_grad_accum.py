"""Gradient accumulation: N micro-batches make the same optimizer step as one batch.

The sparse layers count optimizer steps, not forward passes (``count_optimizer_steps``):
the mask clock advances once per step and the SR-STE decay is added once per step. Checked
in float64 against one whole batch, for every recipe whose operands are a function of the
batch's examples (all but the MVUE ones, whose random draws differ with the split), in a
plain loop, in a loop shaped like the Hugging Face Trainer's, and through the ``Trainer``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fullsparse
from fullsparse.errors import ConfigError
from fullsparse.nn import masked_grad_decay_, sparse_modules
from fullsparse.sampling import SAMPLED_MODES
from fullsparse.train import TrainConfig, train
from fullsparse.train import asp as asp_mod
from tinyruns import tiny_classify

#: Recipes whose micro-batches give the whole batch's step to float64 rounding. The
#: random weight gradients (``fst_mvue``'s 2:4 of dY, the sampled tokens of ``fst_rand``,
#: ``fst_is``, ``fst_adaptive``) draw per backward: not bit-equal by design.
RANDOM = ("mvue", *SAMPLED_MODES)
EXACT = [r for r in fullsparse.RECIPES if fullsparse.recipe(r).grad_weight_mode not in RANDOM]
STEPS = 3
#: Overrides that bring in per-step state: cached masks on a clock, S-STE's β, masked
#: decay; and the clock they end with (only cached masks tick it).
VARIANTS = [
    ("tsm", {"tsm_interval": 2}, STEPS),
    ("fst", {"mask_interval": 2}, STEPS),
    ("srste", {"mask_interval": 3}, STEPS),
    ("fst2", {"output_weight": "soft_2:4", "decay": 0.0}, 0),
    ("fst", {"decay_kind": "masked_grad", "decay": 0.05}, 0),
]


class TokenNet(nn.Module):
    """Two convs on 4x4 images, a Linear over the 16 positions as tokens, a dense head: no
    batch norm, every S_T / IR group inside one example."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.tok = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c2(F.relu(self.c1(x))))
        tokens = F.relu(self.tok(h.flatten(2).transpose(1, 2)))  # [B, 16, 8]
        return self.head(tokens.mean(1))


def _model(recipe: str, overrides: dict) -> nn.Module:
    torch.manual_seed(0)
    model = TokenNet().double()
    fullsparse.sparsify_(model, fullsparse.recipe(recipe, **overrides))
    if recipe == "asp":  # ASP's fixed mask: pruned once, before training
        asp_mod.prune_once_(model)
    return model


def _batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [_batch(8, g) for _ in range(steps)]


def _batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 4, 4, 4, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 4, (n,), generator=g)


def train_loop(recipe: str, micro: int, *, count: bool, overrides: dict | None = None) -> nn.Module:
    """``STEPS`` SGD steps of batches of 8, each as ``micro`` micro-batches whose losses are
    divided by ``micro``; ``count``: the model counts optimizer steps."""
    model = _model(recipe, overrides or {})
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    if recipe == "asp":
        asp_mod.keep_pruned_zero(model, opt)
    if count:
        fullsparse.count_optimizer_steps(model, opt)
    for x, y in _batches():
        opt.zero_grad()
        for xm, ym in zip(x.chunk(micro), y.chunk(micro), strict=True):
            (F.cross_entropy(model(xm), ym) / micro).backward()
        masked_grad_decay_(model)  # once per optimizer step (decay_kind masked_grad only)
        opt.step()
    return model


def max_difference(a: nn.Module, b: nn.Module) -> float:
    return max(
        (p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def clocks(model: nn.Module) -> set[int]:
    return {int(m.tsm_step) for _, m in sparse_modules(model)}


@pytest.mark.parametrize("recipe", EXACT)
def test_four_micro_batches_give_the_weights_of_one_batch(recipe: str) -> None:
    whole = train_loop(recipe, 1, count=False)
    micro = train_loop(recipe, 4, count=True)
    assert max_difference(whole, micro) < 1e-12
    assert clocks(micro) == clocks(whole)  # ticks (cached masks only) per optimizer step


@pytest.mark.parametrize(("recipe", "overrides", "ticks"), VARIANTS, ids=lambda v: str(v))
def test_per_step_state_follows_optimizer_steps(recipe: str, overrides: dict, ticks: int) -> None:
    whole = train_loop(recipe, 1, count=False, overrides=overrides)
    micro = train_loop(recipe, 4, count=True, overrides=overrides)
    assert max_difference(whole, micro) < 1e-12
    assert clocks(micro) == clocks(whole) == {ticks}


def test_without_counting_optimizer_steps_the_decay_is_added_per_micro_batch() -> None:
    """The control: a model that counts forwards adds SR-STE's decay 4 times per step and
    ticks its clock 4 times: visibly another result."""
    cached = {"mask_interval": 2}
    whole = train_loop("srste", 1, count=False, overrides=cached)
    naive = train_loop("srste", 4, count=False, overrides=cached)
    assert max_difference(whole, naive) > 1e-4
    assert clocks(naive) == {4 * STEPS}


def test_mvue_counts_optimizer_steps_but_draws_per_micro_batch() -> None:
    overrides = {"mask_interval": 2}
    whole = train_loop("fst_mvue", 1, count=False, overrides=overrides)
    micro = train_loop("fst_mvue", 4, count=True, overrides=overrides)
    assert clocks(micro) == {STEPS}
    assert 0 < max_difference(whole, micro) < 0.1  # another random draw: close, not equal


class _WrappedOptimizer:
    """An optimizer wrapper as accelerate's: ``step`` calls the wrapped optimizer's."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()


def test_a_framework_loop_with_a_later_optimizer_and_a_short_last_window() -> None:
    """The Hugging Face Trainer's shape: the model is told to count optimizer steps before
    the framework builds (and wraps) its optimizer; gradient_accumulation_steps=2 over 5
    micro-batches of 2 makes windows of 2, 2 and 1, with clipping before each step. Equal to
    three steps on the windows' whole batches; an unrelated optimizer ends no step."""
    g = torch.Generator().manual_seed(3)
    micro = [_batch(2, g) for _ in range(5)]
    windows = [micro[0:2], micro[2:4], micro[4:5]]

    def run(accumulate: bool) -> nn.Module:
        model = _model("srste", {"mask_interval": 2})
        handle = fullsparse.count_optimizer_steps(model) if accumulate else None
        opt = _WrappedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01))
        other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
        for window in windows:
            opt.zero_grad()
            if accumulate:
                for x, y in window:
                    (F.cross_entropy(model(x), y) / len(window)).backward()
                    other.step()  # steps no weight of the model: the step stays open
            else:
                x = torch.cat([x for x, _ in window])
                y = torch.cat([y for _, y in window])
                F.cross_entropy(model(x), y).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
        if handle is not None:
            handle.remove()
        return model

    whole, accumulated = run(False), run(True)
    assert max_difference(whole, accumulated) < 1e-12
    assert clocks(accumulated) == {3}
    assert not any(m.counts_optimizer_steps for _, m in sparse_modules(accumulated))


def test_end_optimizer_step_closes_a_step_without_an_optimizer() -> None:
    model = _model("srste", {"mask_interval": 2})
    with fullsparse.count_optimizer_steps(model, torch.optim.SGD(model.parameters(), lr=0.1)):
        x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
        model(x)
        model(x)  # the same step
        assert clocks(model) == {1}
        fullsparse.end_optimizer_step(model)  # e.g. a step skipped without optimizer.step()
        model(x)
        assert clocks(model) == {2}
    model(x)  # the with block ended: each forward is a step again
    model(x)
    assert clocks(model) == {4}


# --------------------------------------------------------------------------- the Trainer
def _last_state(run_dir) -> dict:
    return torch.load(run_dir / "last.pt", weights_only=True)


def test_trainer_grad_accum_steps_equals_the_whole_batch(tmp_path) -> None:
    """``grad_accum_steps=4`` through the Trainer (a ViT: no batch norm), fst with cached
    masks: the same weights as batches of 16 to float32 rounding, the clocks at the
    optimizer steps, the same loss in metrics.jsonl. The large lr and decay make a decay
    added per micro-batch visible (0.6 apart when the layers count forwards)."""
    common = dict(
        model="vit_tiny",
        model_kwargs={"depth": 1},
        recipe="fst",
        mask_interval=2,
        lr=0.5,
        decay=0.02,
    )
    for n in (1, 4):
        train(tiny_classify(tmp_path, f"n{n}", grad_accum_steps=n, **common))
    whole, micro = _last_state(tmp_path / "n1"), _last_state(tmp_path / "n4")
    for key, value in whole["model"].items():
        torch.testing.assert_close(micro["model"][key], value, rtol=1e-5, atol=1e-6)
    steps = {k: int(v) for k, v in micro["sparse_state"].items() if k.endswith("tsm_step")}
    assert set(steps.values()) == {4}  # 64 images in batches of 16: 4 optimizer steps
    metrics = {n: json.loads((tmp_path / f"n{n}" / "metrics.jsonl").read_text()) for n in (1, 4)}
    assert metrics[4]["train_images"] == 64
    assert metrics[4]["train_loss"] == pytest.approx(metrics[1]["train_loss"], rel=1e-5)


def test_batch_that_does_not_split_is_refused_in_one_line(tmp_path) -> None:
    with pytest.raises(ConfigError, match="batch_size=16 clashes with grad_accum_steps=3"):
        TrainConfig(batch_size=16, grad_accum_steps=3, out=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_detection_refuses_grad_accum_steps() -> None:
    with pytest.raises(ConfigError, match="grad_accum_steps=2 clashes with task='detection'"):
        TrainConfig(task="detection", grad_accum_steps=2, batch_size=4)


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_counting_optimizer_steps_compiles_in_one_graph_and_matches_eager() -> None:
    """fullgraph torch.compile of a model counting optimizer steps, 2 micro-batches a step:
    outputs and gradients equal eager bit for bit, no recompile after the second step (the
    first and the later micro-batches of a step are one graph each), clocks at the steps."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(2),  # [B, 8, 16]: tokens
        nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3),
    )  # fmt: skip
    fullsparse.sparsify_(model, fullsparse.recipe("srste", mask_interval=2))
    twin = copy.deepcopy(model)
    fullsparse.count_optimizer_steps(model)
    fullsparse.count_optimizer_steps(twin)
    torch._dynamo.reset()
    compiled = torch.compile(twin, backend="eager", fullgraph=True)
    for step in range(4):
        for _ in range(2):
            x = torch.randn(2, 4, 4, 4)
            a = model(x)
            with torch._dynamo.config.patch(error_on_recompile=step >= 2):
                b = compiled(x)
            torch.testing.assert_close(b, a, rtol=0, atol=0)
            a.sum().backward()
            b.sum().backward()
        with torch.no_grad():
            for p, q in zip(model.parameters(), twin.parameters(), strict=True):
                torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0)
                noise = torch.randn_like(p)  # a noisy step: recomputed masks change
                p.sub_(0.01 * p.grad + noise)
                q.sub_(0.01 * q.grad + noise)
                p.grad = q.grad = None
        fullsparse.end_optimizer_step(model)
        fullsparse.end_optimizer_step(twin)
    assert clocks(model) == clocks(twin) == {4}
    torch._dynamo.reset()
