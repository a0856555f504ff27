"""sparsify_ / densify_ on the whole model zoo, and the TSM mask cache under torch.compile.

For every ``build_model`` name and the byte-level GPT, under several recipes: the report has
one row per Conv2d/Linear of the model (checked against ``named_modules``), the forward and
backward run and are finite, and ``densify_`` gives back the original module types with the
same Parameters and an unchanged ``state_dict``. Sizes are tiny (batch 2, 16x16 images).

Every ``torchvision.models`` classifier is checked the same way by a ``vision``-marked test
(``pytest -m vision``, needs the ``vision`` extra): see docs/reliability.md.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fullsparse import SparseConv2d, SparseLinear, densify_, recipe, sparsify_
from fullsparse.models import MODELS, build_model, head_name
from fullsparse.models.gpt import GPT
from fullsparse.models.tv import AUX_CLASSIFIER_MODELS

RECIPES_CHECKED = ("dense", "srste", "tsm", "fst", "gx")
SMALL = {
    "vit_tiny": {"depth": 1, "embed_dim": 32, "num_heads": 2},
    "gpt": {"context": 8, "depth": 1, "embed_dim": 32, "num_heads": 2},
}
GEMM_TYPES = (nn.Conv2d, nn.Linear)


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "gpt":
        return GPT(**SMALL["gpt"]), torch.randint(0, 256, (2, 8))
    # ResNet-18/50 reach 1x1 after their 5 stride-2 stages at 32x32; 16x16 still runs.
    size = 32 if name in ("resnet18", "resnet50") else 16
    model = build_model(name, 5, in_channels=3, image_size=size, **SMALL.get(name, {}))
    return model, torch.randn(2, 3, size, size)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)  # same keys in the same order
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _check_round_trip(model: nn.Module, x: torch.Tensor, recipe_name: str, head: str):
    """sparsify_ -> forward/backward -> densify_ on ``model``, checking every promise;
    returns the sparsify report."""
    types = {n: type(m) for n, m in model.named_modules()}
    gemms = [n for n, m in model.named_modules() if isinstance(m, GEMM_TYPES)]
    params = list(model.parameters())
    before = _state(model)

    report = sparsify_(model, recipe_name)

    # The report: one row per Conv2d/Linear, in named_modules order, each with a reason
    # when it stays dense; the head stays dense.
    rows = [r for r in report if issubclass(types[r.name], GEMM_TYPES)]
    assert [r.name for r in rows] == gemms
    assert head not in report.sparse_names and "head (last " in report[head].reason
    for row in rows:
        module = model.get_submodule(row.name)
        expected = SparseConv2d if issubclass(types[row.name], nn.Conv2d) else SparseLinear
        assert isinstance(module, expected) if row.sparse else type(module) is types[row.name]
        assert row.sparse or row.reason, row.name
        assert row.shape == tuple(module.weight.shape)
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    _assert_same_state(before, _state(model))  # sparsify_ changes no value and no key

    # Forward and backward run and are finite. GoogLeNet and Inception v3 return their
    # auxiliary classifiers' logits too in train mode: they join the loss, as in training.
    out = model(x)
    outs = [out] if isinstance(out, torch.Tensor) else [o for o in out if o is not None]
    for o in outs:
        assert o.shape[0] == x.shape[0] and torch.isfinite(o).all()
    sum(o.float().square().mean() for o in outs).backward()
    for pname, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), pname
    for name in report.sparse_names:
        assert model.get_submodule(name).weight.grad is not None, name
    trained = _state(model)  # BatchNorm statistics moved in the training forward

    restored = densify_(model)
    assert sorted({r.name for r in restored}) == sorted(report.sparse_names)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    _assert_same_state(trained, _state(model))
    return report


@pytest.mark.parametrize("recipe_name", RECIPES_CHECKED)
@pytest.mark.parametrize("name", [*MODELS, "gpt"])
def test_sparsify_runs_reports_every_layer_and_densify_restores_the_model(name, recipe_name):
    model, x = _build(name)
    head = "lm_head" if name == "gpt" else head_name(model)
    gemms = [n for n, m in model.named_modules() if isinstance(m, GEMM_TYPES)]
    report = _check_round_trip(model, x, recipe_name, head)
    assert report.sparse_names == [n for n in gemms if n != head]  # in the zoo all but the head


def _torchvision_classifiers() -> list[str]:
    """Every classifier in ``torchvision.models`` (one test each, so ``-k`` selects them);
    without torchvision a single name whose test fails saying so."""
    try:
        import torchvision.models as tvm
    except ImportError:
        return ["torchvision-not-installed"]
    return sorted(tvm.list_models(module=tvm))


#: Input side of the zoo test: 64 unless a model needs more (or another multiple).
TV_INPUT_SIZE = {
    # the train-mode auxiliary classifier pools Mixed_6e 5x5/3 and then runs a 5x5 conv:
    # it needs torchvision's 299x299 (280 is still too small)
    "inception_v3": 299,
    # 7x7 attention windows in every stage: the side must be a multiple of 32*7
    "maxvit_t": 224,
    # the patch (14) must divide the side
    "vit_h_14": 56,
}


@pytest.mark.vision
@pytest.mark.parametrize("name", _torchvision_classifiers())
def test_every_torchvision_classifier_sparsifies_runs_and_densifies(name):
    # Random weights, batch 2, one training step's forward/backward under fst.
    if name == "torchvision-not-installed":
        pytest.fail("pytest -m vision needs torchvision: pip install -e '.[vision]'")
    size = TV_INPUT_SIZE.get(name, 64)
    torch.manual_seed(0)
    # tv: leaves auxiliary classifiers out by default; here they are built and trained
    aux = {"aux_logits": True} if name in AUX_CLASSIFIER_MODELS else {}
    model = build_model(f"tv:{name}", 5, image_size=size, **aux).train()
    _check_round_trip(model, torch.randn(2, 3, size, size), "fst", head_name(model))


@pytest.mark.parametrize("name", ["resnet20", "vit_tiny", "gpt"])
def test_dense_recipe_gives_the_torch_models_outputs_and_gradients(name):
    model, x = _build(name)
    twin = copy.deepcopy(model)
    sparsify_(twin, "dense")
    for m in (model, twin):
        m.eval()  # no BatchNorm update between the two forwards
    a, b = model(x), twin(x)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    a.square().mean().backward()
    b.square().mean().backward()
    for (pname, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=pname)


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_tsm_mask_cache_compiles_without_graph_breaks_and_matches_eager():
    # Formerly `int(tsm_step)` in the mask cache either broke the graph inside every sparse
    # layer's forward (each layer's forward was then compiled alone, once per weight shape,
    # and past the recompile limit of 8 the rest ran eagerly) or, under fullgraph, guarded
    # on the step counter's value and recompiled as it advanced. Now: one graph, a single
    # recompile once the masks exist (tsm_mask None -> tensor), then none.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(2),  # [B, 8, 16]: Linear layers see tokens
        nn.Linear(16, 12),
        nn.ReLU(),
        nn.Linear(12, 20),
        nn.ReLU(),
        nn.Linear(20, 3),
    )
    sparsify_(model, recipe("tsm", tsm_interval=2))
    twin = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(twin, backend="eager", fullgraph=True)
    sparse = [m for m in model.modules() if isinstance(m, (SparseConv2d, SparseLinear))]
    twins = [m for m in twin.modules() if isinstance(m, (SparseConv2d, SparseLinear))]
    history = []
    for step in range(5):  # masks recomputed at steps 0, 2, 4 and reused in between
        x = torch.randn(2, 4, 4, 4)
        a = model(x)
        with torch._dynamo.config.patch(error_on_recompile=step >= 2):
            b = compiled(x)
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        a.sum().backward()
        b.sum().backward()
        with torch.no_grad():
            for p, q in zip(model.parameters(), twin.parameters(), strict=True):
                # a noisy step: a recomputed mask differs from the cached one
                noise = torch.randn_like(p)
                p.sub_(0.01 * p.grad + noise)
                q.sub_(0.01 * q.grad + noise)
                p.grad = q.grad = None
        for m, t in zip(sparse, twins, strict=True):
            assert torch.equal(m.tsm_mask, t.tsm_mask) and int(m.tsm_step) == int(t.tsm_step)
            assert int(t.tsm_step) == step + 1
        history.append(twins[1].tsm_mask.clone())
    assert torch.equal(history[0], history[1]) and not torch.equal(history[1], history[2])
    compiled.eval()  # eval forwards use the cached mask and do not advance the clock
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model.eval()(x), rtol=0, atol=0)
    assert int(twins[0].tsm_step) == 5
    torch._dynamo.reset()
