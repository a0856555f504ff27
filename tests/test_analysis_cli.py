"""``fullsparse analyze ...`` end to end on the synthetic dataset (tiny sizes)."""

from __future__ import annotations

import json

import pytest

from fullsparse.cli import main
from tinyruns import tiny_classify

DATA = ["--dataset", "synthetic", "--image-size", "8", "--quiet"]


def test_analyze_similarity_writes_table_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "a"
    code = main(
        ["analyze", "similarity", *DATA, "--images", "6", "--batch-size", "4", "--out", str(out)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| conv1 | 3×8×8 | 96 |" in printed
    md = (out / "similarity.md").read_text()
    assert md.startswith("# Spatial similarity of conv inputs")
    assert "Command: `fullsparse analyze similarity --dataset synthetic --image-size 8 " in md
    assert "resnet20 at random (seed 0)" in md and "![similarity](similarity.png)" in md
    data = json.loads((out / "similarity.json").read_text())
    assert [r["inputs"] for r in data["results"]] == ["natural", "noise"]
    assert len(data["results"][0]["layers"]) == 21  # every conv of ResNet-20
    assert data["machine"]["torch"] and data["source"]["images"] == 6
    assert (out / "similarity.png").stat().st_size > 1000


def test_analyze_without_matplotlib_writes_tables_and_says_plots_were_skipped(
    tmp_path, capsys, monkeypatch
):
    import fullsparse.analysis.plots as plots

    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    out = tmp_path / "a"
    code = main(["analyze", "neighbors", *DATA, "--images", "4", "--count", "2", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "neighbors.png skipped: matplotlib is not installed" in printed
    assert not (out / "neighbors.png").exists()
    md = (out / "neighbors.md").read_text()
    assert "| conv1 | 3×8×8 |" in md and "| layer3.2.conv2 | 64×2×2 |" in md
    data = json.loads((out / "neighbors.json").read_text())
    assert set(data["errors"]) == {"natural", "noise"}


def test_analyze_fidelity_dense_and_fst(tmp_path, capsys):
    out = tmp_path / "f"
    code = main(
        [
            "analyze",
            "fidelity",
            *DATA,
            "--recipes",
            "dense,fst",
            "--modes",
            "accumulated",
            "--batches",
            "1",
            "--batch-size",
            "4",
            "--out",
            str(out),
            "--no-plot",
        ]
    )
    assert code == 0
    assert "| dense | 1.0000 | 1.0000 | 0.0000 | 1.0000 |" in capsys.readouterr().out
    data = json.loads((out / "fidelity.json").read_text())
    assert data["reference"] == "dense" and data["settings"]["batch_size"] == 4
    assert {r["recipe"] for r in data["rows"]} == {"dense", "fst"}


def test_analyze_overhead(tmp_path, capsys):
    out = tmp_path / "o"
    code = main(
        [
            "analyze",
            "overhead",
            "--model",
            "resnet20",
            "--image-size",
            "8",
            "--batch-size",
            "2",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert "| **FST total** |" in capsys.readouterr().out
    data = json.loads((out / "overhead.json").read_text())
    assert data["layers"] == 21 and data["iteration_ms"] > 0
    assert "--model resnet20" in data["command"]


def test_analyze_from_a_checkpoint(tmp_path, capsys):
    from fullsparse.train import train

    run = tmp_path / "run"
    train(tiny_classify(tmp_path, synthetic_train=16, synthetic_test=8, batch_size=8))
    out = tmp_path / "a"
    code = main(
        [
            "analyze",
            "similarity",
            "--checkpoint",
            str(run / "last.pt"),
            "--images",
            "3",
            "--inputs",
            "natural",
            "--no-plot",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    md = (out / "similarity.md").read_text()
    assert "from checkpoint" in md and "recipe fst, epoch 1" in md
    assert "natural H(X)" in md and "noise H(X)" not in md


@pytest.mark.parametrize(
    "args, message",
    [
        (["similarity", *DATA, "--inputs", "natural,sky"], "--inputs takes natural and/or noise"),
        (["fidelity", *DATA, "--recipes", "dense,nope"], "unknown recipe(s) nope"),
        (["fidelity", *DATA, "--modes", "global"], "unknown mode(s) global"),
        (["neighbors", *DATA, "--image-index", "9", "--images", "2"], "--image-index 9 is outside"),
        (["similarity", *DATA, "--images", "2", "--layers", "conv9"], "no Conv2d named conv9"),
        (["similarity", "--checkpoint", "/nonexistent/last.pt"], "does not exist"),
    ],
)
def test_analyze_user_errors_are_one_line(tmp_path, capsys, args, message):
    assert main(["analyze", *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_analyze_overhead_takes_only_a_known_recipe(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:  # argparse choices, from fullsparse.RECIPES
        main(["analyze", "overhead", "--recipe", "fastest", "--out", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --recipe: invalid choice: 'fastest'")
    assert err.count("\n") == 1 and "fst_mvue" in err
