"""One-line messages that name the file and the reason: checkpoints whose identity or
weights do not fit, odd CIFAR batches, images between Pillow's warning level and ours."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from fullsparse.data.cifar import CIFAR10, _load_batch
from fullsparse.data.imagefolder import open_rgb
from fullsparse.errors import UserError
from test_data import py2_cifar_pickle
from test_reliability_files import TINY as TINY_ARGV
from test_reliability_hostile_files import _forged, _png_header_only
from test_reliability_limits import one_line_error
from tinyruns import tiny_classify


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    from fullsparse.train import train

    run = tmp_path_factory.mktemp("messages")
    train(tiny_classify(run))
    return run / "run" / "last.pt"


def test_eval_and_export_name_the_checkpoint_whose_model_kwargs_do_not_build(
    tmp_path, good, capsys
):
    bad = _forged(tmp_path, good, lambda s: s["identity"].update(model_kwargs={"width": 4}))
    for argv in (["eval"], ["export", "--out", str(tmp_path / "w.pt")]):
        line = one_line_error(capsys, [*argv, "--checkpoint", str(bad)], str(bad))
        assert "identity does not build a model" in line
        assert "unexpected keyword argument 'width'" in line
    assert not (tmp_path / "w.pt").exists()


def _renamed_and_shrunk(state: dict) -> None:
    weights = state["model"]
    weights["bogus.weight"] = weights.pop("conv1.weight")
    weights["bn1.weight"] = weights["bn1.weight"][:1]


def test_state_dict_mismatches_list_the_keys_for_eval_export_resume_and_init_from(
    tmp_path, good, capsys
):
    bad = _forged(tmp_path, good, _renamed_and_shrunk)
    keys = ("missing keys: conv1.weight", "unexpected keys: bogus.weight",
            "shape mismatches: bn1.weight [1] != [16]")  # fmt: skip
    lines = [
        one_line_error(capsys, ["eval", "--checkpoint", str(bad)], keys[0]),
        one_line_error(
            capsys, ["export", "--checkpoint", str(bad), "--out", str(tmp_path / "w.pt")], keys[0]
        ),  # fmt: skip
    ]
    run = tmp_path / "resumed"
    run.mkdir()
    torch.save(torch.load(bad, weights_only=True), run / "last.pt")
    lines.append(
        one_line_error(
            capsys,
            ["train", *TINY_ARGV, "--out", str(tmp_path / "r2"), "--resume", str(run / "last.pt")],
            keys[0],
        )  # fmt: skip
    )
    lines.append(
        one_line_error(
            capsys,
            [
                "train",
                *TINY_ARGV,
                "--recipe",
                "asp",
                "--out",
                str(tmp_path / "i"),
                "--init-from",
                str(bad),
            ],
            keys[0],
        )  # fmt: skip
    )
    for line in lines:
        assert all(k in line for k in keys), line
        assert str(bad.name) in line or "last.pt" in line
    assert not (tmp_path / "i").exists() and not (tmp_path / "w.pt").exists()


def test_a_cifar_batch_of_zero_rows_is_refused_as_empty(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(py2_cifar_pickle(torch.zeros(0, 3072, dtype=torch.uint8), [], "labels"))
    with pytest.raises(UserError, match=r"data_batch_1: the batch holds no images \('data' has 0"):
        _load_batch(path, CIFAR10)


def test_cifar_labels_of_bools_are_refused(tmp_path):
    data = torch.zeros(16, 3072, dtype=torch.uint8)
    raw = py2_cifar_pickle(data, [1] * 16, "labels")
    # J<1> -> NEWTRUE (0x88): the same list, as bools
    raw = raw.replace(b"J\x01\x00\x00\x00", b"\x88")
    path = tmp_path / "data_batch_1"
    path.write_bytes(raw)
    with pytest.raises(UserError, match=r"'labels' must be a list of ints, it holds True \(bool\)"):
        _load_batch(path, CIFAR10)
    path.write_bytes(py2_cifar_pickle(data, [1] * 16, "labels"))
    assert _load_batch(path, CIFAR10)[1].tolist() == [1] * 16


def test_an_image_between_pillows_warning_level_and_ours_gives_no_pillow_warning(tmp_path):
    path = tmp_path / "big.png"
    _png_header_only(path, 9500, 9500)  # 90.25 Mpx: over Pillow's 89.5, under our 100
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UserError, match="imagefolder: cannot decode .*big.png"):
            open_rgb(path, "imagefolder")
    assert [str(w.message) for w in caught] == []
