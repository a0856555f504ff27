"""scripts/frontier.py joins the quality study with the step benchmark (fake inputs here):
the gaps against the goals, the sparse fraction, the speed-ups and the verdicts."""

from __future__ import annotations

import json

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def frontier():
    return load_script("frontier")


def _row(task: str, variant: str, delta: float, seeds: int, total: float) -> dict:
    metric = "val_loss" if task == "gpt-stdlib" else "top1"
    return {"task": task, "variant": variant, "metric": metric, "seeds": list(range(seeds)),
            "delta_vs_dense": delta, "sparse_gemm_fraction": {"total": total}}  # fmt: skip


def _bench(speedups: dict[str, list[float]], sampling: dict[str, float]) -> dict:
    steps = [{"case": f"c{i}", "recipe": r, "speedup_vs_dense": v}
             for r, vs in speedups.items() for i, v in enumerate(vs)]  # fmt: skip
    side = [{"case": "c0", "recipe": r, "sampling_percent_of_dense_step": p}
            for r, p in sampling.items()]  # fmt: skip
    return {"steps": steps, "weight_side": side}


def test_verdicts_follow_goals_sparsity_and_speed(tmp_path, frontier, capsys):
    tasks = ("resnet20-fashion-mnist-full", "vit-fashion-mnist", "gpt-stdlib")
    rows = [_row(t, "dense", 0.0, 2, 0.0) for t in tasks]
    # fst_is: within every goal (0.4 pt, 0.9 pt, +2.9 %), fully sparse, and fast
    rows += [_row(t, "fst_is", d, 3, 0.96) for t, d in zip(tasks, (-0.4, -0.9, 0.029), strict=True)]
    # fst_mvue: within the goals and fully sparse, slow
    rows += [
        _row(t, "fst2-mvue", d, 2, 0.96) for t, d in zip(tasks, (-0.45, -0.69, 0.02), strict=True)
    ]
    # fst_adaptive: within the goals but 0.8 sparse; fst_rand: the GPT 0.1 % past its goal
    rows += [_row(t, "fst_adaptive", -0.1, 2, 0.8) for t in tasks]
    rows += [
        _row(t, "fst_rand", d, 2, 0.96) for t, d in zip(tasks, (-0.1, -0.1, 0.031), strict=True)
    ]
    rows += [_row("gpt-stdlib", "fst", 0.3, 2, 0.96)]  # one task only: not within the goals
    (tmp_path / "q.json").write_text(json.dumps({"rows": rows}))
    every = _bench({"dense": [1, 1], "fst_is": [0.99, 1.2], "fst_mvue": [0.7, 0.8],
                    "fst_adaptive": [1.1, 1.2], "fst_rand": [1.1, 1.1], "fst": [1.0, 1.1]},
                   {"fst_is": 4.0, "fst_mvue": 20.0})  # fmt: skip
    every40 = _bench({"fst_is": [1.01, 1.3], "fst_mvue": [0.7, 0.9]}, {})
    (tmp_path / "s.json").write_text(json.dumps(every))
    (tmp_path / "s40.json").write_text(json.dumps(every40))
    out = tmp_path / "frontier"
    argv = ["--quality", str(tmp_path / "q.json"), "--steps", str(tmp_path / "s.json"),
            "--steps40", str(tmp_path / "s40.json"), "--out", str(out), "--no-plot"]  # fmt: skip
    assert frontier.main(argv) == 0
    table = capsys.readouterr().out
    page = (tmp_path / "frontier.md").read_text()
    assert page.startswith("# Quality against cost") and table.rstrip() in page
    result = json.loads((tmp_path / "frontier.json").read_text())
    by = {e["variant"]: e for e in result["entries"]}
    assert by["fst_is"]["within_goals"] and by["fst_is"]["fully_sparse"] and by["fst_is"]["pays"]
    assert by["fst_is"]["seeds_complete"] and not by["fst2-mvue"]["seeds_complete"]
    assert by["fst2-mvue"]["within_goals"] and not by["fst2-mvue"]["pays"]
    assert by["fst_adaptive"]["within_goals"] and not by["fst_adaptive"]["fully_sparse"]
    assert not by["fst_adaptive"]["pays"]  # no masks-every-40 measurement
    assert not by["fst_rand"]["within_goals"] and not by["fst"]["within_goals"]
    assert by["fst_is"]["step_speedup"]["min"] == 0.99
    assert by["fst_is"]["step_speedup"]["sampling_max"] == 4.0
    assert "- all three: `fst_is`\n" in table
    assert (
        "- within the quality goals and fully sparse: `fst_is`, `fst_mvue` (fewer seeds than "
        "the goals ask)\n" in table
    )
    assert "| `fst_is` | -0.40 ✓ (3) | -0.90 ✓ (3) | +2.9 % ✓ (3) | 0.96 |" in table
    assert "| `fst_rand` | -0.10 ✓ (2) | -0.10 ✓ (2) | +3.1 % ✗ (2) |" in table


def test_the_paired_intervals_lowest_end_is_shown_and_judged(frontier):
    tasks = ("resnet20-fashion-mnist-full", "vit-fashion-mnist", "gpt-stdlib")
    qual = frontier.quality([_row(t, v, -0.1, 2, 0.96) for t in tasks for v in ("fst", "fst_is")])
    bench = _bench({"fst": [1.1, 1.2], "fst_is": [1.1, 1.2]}, {})
    for step, low in zip(bench["steps"], (1.02, 1.01, 0.97, 1.05), strict=True):
        step["speedup_paired"] = {"median": 1.1, "low": low, "high": 1.3, "coverage": 0.98}
    steps = frontier.speed(bench)
    assert steps["fst"]["low"] == 1.01 and steps["fst_is"]["low"] == 0.97
    table = frontier.markdown(frontier.frontier(qual, steps, {}), {})
    assert "| 1.10–1.20 (1.15; interval ≥ 1.01) |" in table
    assert (
        "- no slower than dense in every case by the interval's lowest end (masks every "
        "step): `fst` (fewer seeds" in table
    )
    assert "low" not in frontier.speed(_bench({"fst": [1.0]}, {}))["fst"]  # older results


def test_a_task_whose_runs_are_another_variants_is_marked(frontier):
    rows = [_row("gpt-stdlib", "fst_is-g4096-s0.59", 0.028, 2, 0.9),
            _row("vit-fashion-mnist", "fst_is_batch", 0.1, 1, 0.94)]  # fmt: skip
    qual = frontier.quality(rows)
    assert qual["fst_is_batch"]["gpt-stdlib"]["same_runs_as"] == "fst_is-g4096-s0.59"
    assert qual["fst_is_batch"]["gpt-stdlib"]["gap"] == 0.028
    assert "same_runs_as" not in qual["fst_is_batch"]["vit-fashion-mnist"]
    table = frontier.markdown(frontier.frontier(qual, {}, {}), {})
    assert "| +2.8 % ✓ (2) † |" in table
    assert "† `fst_is_batch`: runs of `fst_is-g4096-s0.59` count as its seeds" in table
    own = frontier.quality([*rows, _row("gpt-stdlib", "fst_is_batch", 0.03, 1, 0.9)])
    assert "same_runs_as" not in own["fst_is_batch"]["gpt-stdlib"]  # its own runs win
    # its own row, two of whose seeds are the other variant's runs (quality_collect's EARLIER)
    mixed = _row("gpt-stdlib", "fst_is_batch", 0.0275, 3, 0.9)
    mixed["runs"] = [f"docs/results/quality/gpt/{v}/summary.json"
                     for v in ("fst_is-g4096-s0.59-seed0", "fst_is-g4096-s0.59-seed1",
                               "fst_is_batch-seed2")]  # fmt: skip
    marked = frontier.quality([*rows, mixed])["fst_is_batch"]["gpt-stdlib"]
    assert marked["same_runs_as"] == "fst_is-g4096-s0.59" and marked["seeds"] == 3
    assert "| +2.8 % ✓ (3) † |" in frontier.markdown(frontier.frontier(
        frontier.quality([*rows, mixed]), {}, {}), {})  # fmt: skip


def test_unreadable_input_is_one_line(tmp_path, frontier):
    with pytest.raises(SystemExit, match="frontier: cannot read .*missing.json"):
        frontier.main(["--quality", str(tmp_path / "missing.json"), "--no-plot"])


def test_a_variant_benchmarked_on_its_own_gets_its_own_step_speed(frontier):
    """An option on a named recipe (masked decay) is timed by its own benchmark run: its
    row shows that run's speed-ups, not the plain recipe's."""
    tasks = ("resnet20-fashion-mnist-full", "vit-fashion-mnist", "gpt-stdlib")
    qual = frontier.quality([_row(t, "fst2-mvue-maskeddecay", -0.1, 3, 0.96) for t in tasks])
    plain = frontier.speed(_bench({"fst_mvue": [0.9, 0.95]}, {}))
    own = frontier.speed(_bench({"dense": [1, 1], "fst_mvue": [0.85, 0.92]}, {"fst_mvue": 5.5}))
    result = frontier.frontier(qual, plain, {}, None, {"fst2-mvue-maskeddecay": own["fst_mvue"]})
    entry = result["entries"][0]
    assert entry["step_speedup"]["min"] == 0.85 and entry["step_speedup"]["sampling_max"] == 5.5
    assert not entry["pays"]  # below 1, and no masks-every-40 run
    table = frontier.markdown(result, {})
    assert "| `fst_mvue` + masked decay | -0.10 ✓ (3) | -0.10 ✓ (3) | -10.0 % ✓ (3) |" in table
    assert "| 0.85–0.92 (0.88" in table
    assert frontier.frontier(qual, plain, {})["entries"][0]["step_speedup"] is None
