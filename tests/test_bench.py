"""The layer benchmark runs end to end on tiny shapes and reports what it timed."""

from __future__ import annotations

import json

from fullsparse.bench import ConvShape, bench_layers, format_layers
from fullsparse.cli import main

TINY = [ConvShape("tiny 3x3 8-8 @8", 8, 8, 3, 1, 8, 2), ConvShape("tiny 3x3/2", 4, 8, 3, 2, 9, 2)]


def test_bench_layers_reports_every_role_with_dense_first():
    result = bench_layers(TINY, ["fst", "tsm"], warmup=0, repeats=1)
    rows = result["layers"]
    assert [(r["shape"], r["recipe"]) for r in rows] == [
        (s.name, name) for s in TINY for name in ("dense", "fst", "tsm")
    ]
    for r in rows:
        for role in ("forward", "grad_input", "grad_weight", "total"):
            assert r[f"{role}_ms"] > 0
            assert r["ratios"][role] > 0
        if r["recipe"] == "dense":
            assert all(v == 1.0 for v in r["ratios"].values())
    assert [o["shape"] for o in result["mask_overhead"]] == [s.name for s in TINY]
    assert result["machine"]["torch"]
    table = format_layers(result)
    assert table.count("\n| tiny 3x3 8-8 @8 |") == 3 + 1 and "overhead %" in table


def test_bench_cli_writes_json_and_markdown(tmp_path, capsys):
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    code = main(
        [
            "bench",
            "layers",
            "--inputs",
            "cifar",
            "--recipes",
            "fst",
            "--cifar-batch",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--json",
            str(out),
            "--markdown",
            str(md),
            "--quiet",
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert {r["recipe"] for r in data["layers"]} == {"dense", "fst"}
    assert "| layer | recipe |" in md.read_text()
    assert "saved" in capsys.readouterr().out


def test_bench_cli_rejects_unknown_recipe(capsys):
    assert main(["bench", "layers", "--recipes", "fast"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown recipe(s) fast") and err.count("\n") == 1
