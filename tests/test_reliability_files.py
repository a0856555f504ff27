"""Untrusted and wrong input: files that smuggle code, checkpoints of other runs, malformed
configs and command lines, missing data folders, and results that must not be overwritten.

Every refusal is one ``error:`` line on stderr, exit status 2, no traceback, and leaves the
files that were there as they were. Cases already proven elsewhere are cited in
docs/reliability.md rather than repeated here.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from fullsparse.cli import main
from fullsparse.data import build_datasets, write_idx
from fullsparse.data import fashion_mnist as fm
from fullsparse.errors import DataNotFoundError
from fullsparse.train import TrainConfig, load_checkpoint, train
from test_reliability_limits import one_line_error as _one_line_error

TINY = [
    "--dataset", "synthetic", "--synthetic-train", "64", "--synthetic-test", "32",
    "--image-size", "8", "--batch-size", "16", "--epochs", "1",
    "--no-progress", "--no-plot", "--quiet",
]  # fmt: skip


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("files") / "run"
    train(
        TrainConfig(
            dataset="synthetic", synthetic_train=64, synthetic_test=32, image_size=8,
            batch_size=16, epochs=1, out=str(run), progress=False, quiet=True, plot=False,
        )
    )  # fmt: skip
    return run


# ------------------------------------------------------------------ malicious pickles


class _CreatesFile:
    """Unpickling this calls ``open(path, "w")``: the file appears iff the code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _malicious(kind: str, good: Path, target: Path, marker: Path) -> None:
    if kind == "tampered-checkpoint":  # a real checkpoint with one extra, evil entry
        state = torch.load(good, weights_only=True)
        state["notes"] = _CreatesFile(marker)
        torch.save(state, target)
    else:  # a bare pickle stream, as `pickle.dump` writes it
        payload = {"format": "fullsparse-checkpoint", "x": _CreatesFile(marker)}
        target.write_bytes(pickle.dumps(payload))


@pytest.mark.parametrize("kind", ["tampered-checkpoint", "raw-pickle"])
def test_a_pickle_payload_is_refused_without_running_it(tmp_path, capsys, finished_run, kind):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    _malicious(kind, finished_run / "last.pt", evil, marker)
    # The payload is live: an unsafe load runs it (this is what fullsparse never does).
    if kind == "raw-pickle":
        pickle.loads(evil.read_bytes())
    else:
        torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()

    needle = "weights-only unpickler"
    _one_line_error(capsys, ["eval", "--checkpoint", str(evil)], needle)
    out = tmp_path / "w.pt"
    _one_line_error(capsys, ["export", "--checkpoint", str(evil), "--out", str(out)], needle)
    assert not out.exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(evil.read_bytes())
    _one_line_error(capsys, ["train", *TINY, "--out", str(run), "--resume"], needle)
    _one_line_error(
        capsys, ["train", *TINY, "--out", str(tmp_path / "new"), "--resume", str(evil)], needle
    )
    assert not marker.exists()
    assert sorted(p.name for p in run.iterdir()) == ["last.pt"]  # nothing else written


# ------------------------------------------------------------------ checkpoints of other runs


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--model", "resnet32"], "--model ('resnet20' in the saved run, 'resnet32' now)"),
        (["--recipe", "srste"], "--recipe ('fst' in the saved run, 'srste' now)"),
        (["--recipe", "fst", "--ir-alpha", "0.5"], "--ir-alpha (None in the saved run, 0.5"),
        (["--synthetic-classes", "5"], "--synthetic-classes (10 in the saved run, 5 now)"),
    ],
)
def test_resume_from_another_models_or_recipes_checkpoint_is_one_line(
    tmp_path, capsys, finished_run, flags, needle
):
    before = _snapshot(finished_run)
    line = _one_line_error(
        capsys, ["train", *TINY, "--out", str(finished_run), "--resume", *flags], needle
    )
    assert "would change the run saved in" in line  # checked before the checkpoint is read
    assert _snapshot(finished_run) == before


def test_a_checkpoint_whose_weights_do_not_fit_its_model_is_one_line(
    tmp_path, capsys, finished_run
):
    state = load_checkpoint(finished_run / "last.pt")
    state["identity"]["model"] = "resnet32"  # claims another model; the weights are resnet20's
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    line = _one_line_error(
        capsys, ["eval", "--checkpoint", str(bad)], "weights do not fit its model 'resnet32'"
    )
    assert "missing keys: layer1.3.conv1.weight" in line, line  # resnet32 has 5 blocks
    out = tmp_path / "w.pt"
    _one_line_error(
        capsys, ["export", "--checkpoint", str(bad), "--out", str(out)], "missing keys: layer1.3"
    )
    assert not out.exists()


# ------------------------------------------------------------------ configs and flags


@pytest.mark.parametrize(
    "name, content, needle",
    [
        ("list.yaml", b"- epochs\n- 2\n", "must hold a mapping"),
        ("tabs.yaml", b"epochs:\t2\n  seed: 1\n", "not valid YAML"),
        ("binary.json", b"\xff\xfe\x00garbage", "cannot read config file"),
        ("run.toml", b"epochs = 2\n", "must end in .json, .yaml or .yml"),
        ("kwargs.json", b'{"model_kwargs": 3}', "model_kwargs must be a mapping"),
        ("null.yaml", b"epochs: null\n", "epochs must be set"),
        ("bool.json", b'{"batch_size": true}', "batch_size must be an integer"),
        ("nan.json", b'{"lr": NaN}', "lr must be a finite number"),
        ("typo.yaml", b"epoch: 3\n", "did you mean 'epochs'?"),
    ],
)
def test_more_malformed_configs_are_one_line(tmp_path, capsys, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content)
    _one_line_error(capsys, ["train", "--config", str(path), "--out", str(tmp_path / "r")], needle)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["nope"], "invalid choice: 'nope'"),
        (["train", "--out"], "argument --out: expected one argument"),
        (["train", "--epochs", "1", "--bogus", "x"], "unrecognized arguments: --bogus x"),
        (["eval", "--checkpoint"], "argument --checkpoint: expected one argument"),
        (["bench"], "the following arguments are required"),
        (["export", "--force=yes"], "ignored explicit argument"),
        (["train", "--recipe", "fast"], "argument --recipe: invalid choice: 'fast'"),
        (["train", "--amp", "fp8"], "argument --amp: invalid choice: 'fp8'"),
        (["train", "--task", "lm", "--optimizer", "adam"], "--optimizer: invalid choice: 'adam'"),
        (["train", "--grad-input-source", "sideways"], "--grad-input-source: invalid choice"),
        (["eval"], "the following arguments are required: --checkpoint"),
        (["export", "--checkpoint", "x.pt"], "the following arguments are required: --out"),
        (["compare", "--recipe", "fst"], "--recipe is not taken by this command"),
        (["study", "--seed", "3"], "--seed is not taken by this command; the study sets it"),
    ],
)
def test_command_line_mistakes_are_one_line_and_exit_2(capsys, argv, needle):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert needle in lines[0] and "usage:" not in captured.err and captured.out == ""
    assert lines[0].endswith("--help`)")  # says where the usage is


def test_help_still_prints_the_usage(capsys):
    for argv in (["--help"], ["train", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        assert capsys.readouterr().out.startswith("usage: fullsparse")


# ------------------------------------------------------------------ data folders


def _fake_fashion_mnist(folder: Path) -> None:
    folder.mkdir(parents=True)
    for stem, n in (("train", 8), ("t10k", 4)):
        write_idx(folder / f"{stem}-images-idx3-ubyte", torch.zeros(n, 28, 28, dtype=torch.uint8))
        write_idx(folder / f"{stem}-labels-idx1-ubyte", torch.zeros(n, dtype=torch.uint8))


def test_a_missing_explicit_data_dir_is_an_error_not_a_fallback(tmp_path, monkeypatch, capsys):
    # A copy of the data is visible through $FULLSPARSE_DATA and the Debian folder ...
    _fake_fashion_mnist(tmp_path / "env")
    _fake_fashion_mnist(tmp_path / "debian")
    monkeypatch.setenv("FULLSPARSE_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "debian")
    assert len(build_datasets("fashion-mnist").train) == 8
    # ... but a --data-dir that does not exist (a typo) is not silently replaced by it.
    missing = tmp_path / "my-data"
    with pytest.raises(DataNotFoundError, match=f"--data-dir {missing} does not exist"):
        build_datasets("fashion-mnist", missing)
    with pytest.raises(DataNotFoundError, match=f"CIFAR-10 not found: --data-dir {missing}"):
        build_datasets("cifar10", missing)
    argv = ["train", "--dataset", "fashion-mnist", "--data-dir", str(missing)]
    _one_line_error(capsys, [*argv, "--out", str(tmp_path / "r")], f"{missing} does not exist")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ nothing overwritten


def test_compare_into_a_folder_holding_a_comparison_needs_resume_or_force(tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "compare.json").write_text('{"rows": []}\n')
    before = _snapshot(out)
    argv = ["compare", *TINY, "--recipes", "srste", "--out", str(out)]
    _one_line_error(capsys, argv, "already holds a comparison (compare.json; cat compare.md")
    assert _snapshot(out) == before and not (out / "srste").exists()


def test_export_never_overwrites_the_weights_or_their_build_arguments(
    tmp_path, capsys, finished_run
):
    out = tmp_path / "w.pt"
    meta = tmp_path / "w.pt.json"
    meta.write_text("keep me")
    argv = ["export", "--checkpoint", str(finished_run / "last.pt"), "--out", str(out)]
    _one_line_error(capsys, argv, f"{meta} already exists; pass --force")
    assert meta.read_text() == "keep me" and not out.exists()
    assert main([*argv, "--force"]) == 0
    assert json.loads(meta.read_text())["model"] == "resnet20" and out.is_file()
