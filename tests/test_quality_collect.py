"""scripts/quality_collect.py turns the quality study's run folders (fake ones here) into
docs/results/quality.json rows and tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def collect():
    return load_script("quality_collect")


def _account(total: float, fully: bool) -> dict:
    return {"output": total, "grad_input": total, "grad_weight": total, "total": total,
            "fully_sparse": fully}  # fmt: skip


def _run(root: Path, task: str, name: str, key: str, values: list[float], config: dict,
         account: dict, status: str = "completed") -> None:  # fmt: skip
    run = root / task / name
    run.mkdir(parents=True)
    metric = "test_top1" if key == "final_top1" else "val_loss"
    history = [{"epoch": i + 1, metric: v} for i, v in enumerate(values)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    summary = {"status": status, key: values[-1], "recipe": config["recipe"],
               "config": config, "sparse_gemm_fraction": account}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "last.pt").write_bytes(b"checkpoint")  # must not be copied


def test_rows_hold_every_field_with_means_deltas_and_goals(tmp_path, collect, capsys, monkeypatch):
    monkeypatch.setattr(collect, "EARLIER", {})
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    dense, mvue = {"recipe": "dense"}, {"recipe": "fst2", "grad_weight_mode": "mvue"}
    _run(runs, "gpt", "dense-seed0", "final_val_loss", [2.0, 1.0], dense, _account(0.0, False))
    _run(runs, "gpt", "dense-seed1", "final_val_loss", [2.0, 1.2], dense, _account(0.0, False))
    _run(runs, "gpt", "fst2-mvue-seed0", "final_val_loss", [1.02], mvue, _account(0.96, True))
    _run(runs, "gpt", "fst2-mvue-seed1", "final_val_loss", [1.16], mvue, _account(0.96, True))
    _run(runs, "vit", "dense-seed0", "final_top1", [80.0], dense, _account(0.0, False))
    _run(runs, "vit", "fst2-mvue-seed0", "final_top1", [78.5], mvue, _account(1.0, True))
    _run(runs, "vit", "fst-seed0", "final_top1", [70.0], {"recipe": "fst"}, {}, "running")
    monkeypatch.setattr("sys.argv", ["x", "--runs", str(runs), "--docs", str(docs)])
    assert collect.main() == 0
    rows = {
        (r["task"], r["variant"]): r
        for r in json.loads((docs / "quality.json").read_text())["rows"]
    }
    tasks = ("gpt-stdlib", "vit-fashion-mnist")
    assert set(rows) == {(t, v) for t in tasks for v in ("dense", "fst2-mvue")}
    gpt = rows[("gpt-stdlib", "fst2-mvue")]
    assert gpt["recipe"] == "fst2" and gpt["overrides"] == {"grad_weight_mode": "mvue"}
    assert gpt["seeds"] == [0, 1] and gpt["values"] == [1.02, 1.16] and gpt["metric"] == "val_loss"
    assert gpt["mean"] == pytest.approx(1.09) and gpt["std"] == pytest.approx(0.099, abs=1e-3)
    assert gpt["dense_mean"] == pytest.approx(1.1)
    assert gpt["delta_vs_dense"] == pytest.approx(1.09 / 1.1 - 1, abs=1e-4)
    assert gpt["sparse_gemm_fraction"]["fully_sparse"] is True
    assert gpt["runs"] == [str(docs / "quality/gpt/fst2-mvue-seed0/summary.json"),
                           str(docs / "quality/gpt/fst2-mvue-seed1/summary.json")]  # fmt: skip
    vit = rows[("vit-fashion-mnist", "fst2-mvue")]
    assert vit["std"] is None and vit["delta_vs_dense"] == pytest.approx(-1.5)
    copied = docs / "quality/vit/fst2-mvue-seed0"
    assert (copied / "summary.json").exists() and not (copied / "last.pt").exists()
    out = capsys.readouterr().out
    assert "| `fst2-mvue` | 2 | 1.0900 ± 0.0990 (1.0200 / 1.1600) | -0.9 % |" in out
    assert "| met |" in out  # GPT: within 3 % of dense over two seeds
    assert "missed (1 seed)" in out  # ViT: 1.5 points under dense, one seed


def test_no_study_folder_is_an_error(tmp_path, collect, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["x", "--runs", str(tmp_path / "none")])
    assert collect.main() == 2
    assert "no study folder" in capsys.readouterr().err


def test_update_tables_replaces_each_tasks_table_under_its_heading(collect):
    page = "\n".join([
        "# Study", "", "intro | not a table line start", "",
        "### ResNet-20 (`resnet20-fashion-mnist-full`)", "", "| old | table |", "|---|---|",
        "| `dense` | 1 |", "", "text after", "",
        "### ViT (`vit-fashion-mnist`)", "", "no table here", "", "### Other", "",
        "| keep | me |",
    ])  # fmt: skip
    new = {
        "resnet20-fashion-mnist-full": "| variant | seeds |\n|---|---:|\n| `fst` | 3 |",
        "vit-fashion-mnist": "| vit | table |",
        "gpt-stdlib": "| gpt | table |",
    }
    out = collect.update_tables(page, new).split("\n")
    i = out.index("### ResNet-20 (`resnet20-fashion-mnist-full`)")
    assert out[i + 2 : i + 6] == ["| variant | seeds |", "|---|---:|", "| `fst` | 3 |", ""]
    assert "text after" in out and "| keep | me |" in out  # other tables stay
    assert "| vit | table |" not in out and "| gpt | table |" not in out


def test_the_gap_is_against_dense_on_the_same_seeds(collect):
    """A variant run on a subset of dense's seeds is compared with dense's mean over those
    seeds (the same initialisations and data orders); one with a seed dense lacks, with
    dense's mean over all of its seeds."""
    dense = {"task": "gpt-stdlib", "variant": "dense", "seeds": [0, 1, 2, 3],
             "values": [1.0, 1.2, 1.4, 1.6], "metric": "val_loss"}  # fmt: skip
    two = {"task": "gpt-stdlib", "variant": "a", "seeds": [0, 1], "metric": "val_loss"}
    other = {"task": "gpt-stdlib", "variant": "b", "seeds": [0, 7], "metric": "val_loss"}
    assert collect._dense_mean(two, dense) == pytest.approx(1.1)
    assert two["dense_seeds"] == [0, 1]
    assert collect._dense_mean(other, dense) == pytest.approx(1.3)
    assert other["dense_seeds"] == [0, 1, 2, 3]
    assert collect._dense_mean(dict(dense), dense) == pytest.approx(1.3)
