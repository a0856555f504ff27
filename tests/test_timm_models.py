"""``timm:<name>`` models: how build_model asks timm for them, the errors, and (with the timm
extra, ``pytest -m vision``) real tiny timm models trained a step with a recipe."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from fullsparse import sparsify_
from fullsparse.errors import UserError
from fullsparse.models import build_model, head_name


class _FakeTimmNet(nn.Module):
    def __init__(self, num_classes: int, in_chans: int, classifier_last: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)
        if not classifier_last:  # a model whose last Linear is not its classifier
            self.aux = nn.Linear(8, 8)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(x).mean((2, 3)))


@pytest.fixture
def fake_timm(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """A stand-in ``timm`` recording how each model was asked for."""
    calls: list[dict] = []
    timm = types.ModuleType("timm")
    names = {"fakenet": False, "fakevit": True, "oddnet": False}  # name -> fixed input size

    def create_model(name: str, **kwargs: object) -> nn.Module:
        calls.append({"name": name, **kwargs})
        if "depth" in kwargs:
            raise TypeError("__init__() got an unexpected keyword argument 'depth'")
        return _FakeTimmNet(kwargs["num_classes"], kwargs["in_chans"], name != "oddnet")  # type: ignore[arg-type]

    timm.create_model = create_model  # type: ignore[attr-defined]
    timm.is_model = lambda name: name in names  # type: ignore[attr-defined]
    timm.list_models = lambda: sorted(names)  # type: ignore[attr-defined]
    models = types.ModuleType("timm.models")
    models.get_pretrained_cfg = lambda name: types.SimpleNamespace(  # type: ignore[attr-defined]
        fixed_input_size=names[name]
    )
    timm.models = models  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "timm.models", models)
    return calls


def test_timm_model_gets_random_weights_classes_channels_and_fixed_size(fake_timm) -> None:
    model = build_model("timm:fakenet", 7, in_channels=1, image_size=28)
    want = {"name": "fakenet", "pretrained": False, "num_classes": 7, "in_chans": 1}
    assert fake_timm == [want]
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7) and head_name(model) == "head"
    build_model("timm:fakevit", 5, image_size=48)  # a fixed-size model is told the size
    assert fake_timm[-1] == {**want, "name": "fakevit", "num_classes": 5, "in_chans": 3,
                             "img_size": 48}  # fmt: skip


def test_timm_errors_are_one_line_user_errors(fake_timm, monkeypatch) -> None:
    with pytest.raises(UserError, match=r"unknown timm model 'fakenat'.*close names: fakenet"):
        build_model("timm:fakenat", 10)
    with pytest.raises(UserError, match="timm model 'fakenet': .*'depth'"):
        build_model("timm:fakenet", 10, depth=3)
    with pytest.raises(UserError, match="classifier is not its last nn.Linear"):
        build_model("timm:oddnet", 10)
    monkeypatch.setitem(sys.modules, "timm", None)  # import now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'fullsparse\[timm\]'") as info:
        build_model("timm:resnet50", 10)
    assert "\n" not in str(info.value)


def test_train_cli_accepts_timm_names(fake_timm, tmp_path) -> None:
    from fullsparse.train import train
    from tinyruns import tiny_classify

    result = train(tiny_classify(tmp_path, model="timm:fakenet", recipe="fst"))
    assert fake_timm[0]["name"] == "fakenet" and result is not None


@pytest.mark.vision
@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_convnext"])
def test_real_tiny_timm_model_trains_a_step_with_fst(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(f"timm:{name}", 10, in_channels=1, image_size=32)
    report = sparsify_(model, "fst")
    assert report.dense_names[-1] == head_name(model) and len(report.sparse_names) > 3
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    first = model.get_submodule(report.sparse_names[0])
    before = first.weight.detach().clone()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 1, 32, 32)), torch.arange(4))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, first.weight)
