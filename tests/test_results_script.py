"""scripts/results.py rebuilds docs/results tables from run folders (fake ones here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def results():
    return load_script("results")


def _run(
    root: Path, study: str, name: str, finals: list[float], seconds: float, status="completed"
):
    run = root / study / name
    run.mkdir(parents=True)
    history = [
        {"epoch": i + 1, "test_top1": v, "epoch_seconds": seconds, "eval_seconds": 1.0}
        for i, v in enumerate(finals)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    summary = {
        "status": status,
        "final_top1": finals[-1],
        "best_top1": max(finals),
        "seconds_per_epoch": seconds,
        "images_per_second": 100.0,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "last.pt").write_bytes(b"checkpoint")  # must not be collected


def test_tables_are_mean_std_over_seeds_with_deltas_and_paper_rows(tmp_path, results):
    src = tmp_path / "live"
    _run(src, "table5", "dense-seed0", [80.0, 90.0], 10.0)
    _run(src, "table5", "dense-seed1", [80.0, 92.0], 12.0)
    _run(src, "table5", "fst-seed0", [70.0, 89.0], 11.0)
    _run(src, "table5", "fst-seed1", [70.0, 90.0], 11.0)
    _run(src, "table5", "srste-seed0", [70.0, 75.0], 11.0, status="running")  # not counted
    _run(src, "table1", "gg-seed0", [10.0, 10.0], 11.0)
    _run(src, "fst-choices", "fst-ir_alpha0.03-seed0", [50.0, 88.0], 11.0)
    _run(src, "full", "dense-seed0", [90.0, 93.0], 120.0)  # not in the 5,000-image times
    _run(src, "full", "fst-seed0", [90.0, 92.5], 118.0)
    dst = tmp_path / "docs"
    assert results.main(["--runs", str(dst), "--collect", str(src)]) == 0
    assert (dst / "table5" / "fst-seed1" / "summary.json").is_file()
    assert not (dst / "table5" / "fst-seed1" / "last.pt").exists()
    assert not (dst / "table5" / "srste-seed0").exists()
    text = (dst / "tables.md").read_text()
    sections = text.split("### ")
    table5, table1 = sections[1], sections[2]
    rows = {}
    for section in (table1, table5):
        for line in section.splitlines():
            if line.startswith("| `"):
                rows[line.split("|")[1].strip()] = line
    dense = [c.strip() for c in rows["`dense`"].split("|")]
    assert dense[2:6] == ["2", "91.00 ± 1.41", "91.00 ± 1.41", "+0.00"]
    fst = [c.strip() for c in rows["`fst`"].split("|")]
    assert fst[3] == "89.50 ± 0.71" and fst[5] == "-1.50" and fst[6] == "71.0"
    gg = [c.strip() for c in rows["`gg`"].split("|")]
    assert gg[3] == "10.00" and gg[5] == "-81.00" and gg[7] == "-71.1"
    assert "| ir_alpha = 0.03 | 88.00 | 88.00 | 1 |" in text
    assert "| `fst` | 2 | 11.0 ± 0.0 | 1.00× |" in text  # 11 s vs dense's mean 11 s
    assert "| `fst` | 1 | 92.50 | 92.50 | -0.50 | -1.50 | 118.0 |" in text  # full data


def test_no_runs_is_an_error_not_an_empty_table(tmp_path, results, capsys):
    assert results.main(["--runs", str(tmp_path)]) == 1
    assert "no completed runs" in capsys.readouterr().err


def test_table3_counts_asp_pretraining_and_each_recipes_sparse_gemms(tmp_path, results):
    assert [results.step_units(n) for n in ("dense", "fst", "asp", "meprop", "tsm")] == [
        3.0,
        1.5,
        2.5,
        2.0,
        2.0,
    ]
    src = tmp_path / "live"
    _run(src, "table5", "dense-seed0", [80.0, 90.0], 10.0)
    _run(src, "table3", "asp10+5-seed0", [85.0, 88.0], 10.0)
    summary_path = src / "table3" / "asp10+5-seed0" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["pretraining"] = {"epochs": 2, "recipe": "dense"}
    summary_path.write_text(json.dumps(summary))
    dst = tmp_path / "docs"
    assert results.main(["--runs", str(dst), "--collect", str(src)]) == 0
    text = (dst / "tables.md").read_text()
    asp = next(line for line in text.splitlines() if line.startswith("| `asp10+5`"))
    cells = [c.strip() for c in asp.split("|")]
    # 2 dense epochs (3 units) + 2 fine-tuning epochs (2.5 units) against 2 dense epochs
    assert cells[3] == "2 + 2" and cells[4] == "88.00" and cells[5] == "-2.00"
    assert cells[7] == f"{(2 * 3 + 2 * 2.5) / (2 * 3):.2f}×" and cells[9] == "70.7"
