"""The study runner: planning, skip/resume behaviour, the results table, the CLI."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from fullsparse.analysis.study import (
    StudySpec,
    child_command,
    load_study_spec,
    plan_study,
    run_status,
    run_study,
    study_table,
)
from fullsparse.cli import main
from fullsparse.errors import ConfigError, UserError

TINY = {
    "model": "resnet20",
    "dataset": "synthetic",
    "image_size": 8,
    "synthetic_train": 32,
    "synthetic_test": 16,
    "batch_size": 16,
    "epochs": 2,
    "train_subset": None,
    "plot": False,
    "quiet": True,
}


def _spec(tmp_path: Path, **kw) -> StudySpec:
    fields = {"recipes": ("dense", "fst"), "seeds": (0, 1), "base": dict(TINY)}
    fields.update(kw)
    return StudySpec(out=str(tmp_path / "study"), **fields)


def _fake_run(run, best=(80.0, 90.0), seconds=2.0, status="completed", fraction=None) -> None:
    """What a finished `fullsparse train` leaves behind, for the table's purposes."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    history = [
        {"epoch": 1, "test_top1": best[0], "epoch_seconds": seconds},
        {"epoch": 2, "test_top1": best[1], "epoch_seconds": seconds},
    ]
    (run.run_dir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    summary = {
        "status": status,
        "best_top1": max(best),
        "final_top1": best[-1],
        "seconds_per_epoch": seconds,
        "sparse_gemm_fraction": fraction,
    }
    (run.run_dir / "summary.json").write_text(json.dumps(summary))
    (run.run_dir / "config.json").write_text(json.dumps(run.config.to_dict()))


# ------------------------------------------------------------------------- planning
def test_plan_names_are_deterministic_and_inapplicable_overrides_are_noted(tmp_path):
    spec = _spec(tmp_path, grid={"ir_alpha": (1.0, 0.03)}, seeds=(0,))
    runs, notes = plan_study(spec)
    assert [r.name for r in runs] == [
        "dense-seed0",
        "fst-ir_alpha1-seed0",
        "fst-ir_alpha0.03-seed0",
    ]
    assert notes == [
        "ir_alpha=1.0 does not apply to dense (kept its default)",
        "ir_alpha=0.03 does not apply to dense (kept its default)",
    ]
    fst = runs[2]
    assert fst.config.sparsity().ir_alpha == 0.03
    assert fst.run_dir == tmp_path / "study" / "fst-ir_alpha0.03-seed0"
    assert fst.variant == "fst-ir_alpha0.03" and fst.seed == 0
    assert [r.name for r in plan_study(spec)[0]] == [r.name for r in runs]


def test_an_ir_alpha_grid_leaves_fst_noir_at_zero_with_a_note(tmp_path):
    spec = _spec(tmp_path, recipes=("fst_noir", "fst"), grid={"ir_alpha": (0.03,)}, seeds=(0,))
    runs, notes = plan_study(spec)
    assert [r.name for r in runs] == ["fst_noir-seed0", "fst-ir_alpha0.03-seed0"]
    assert runs[0].config.sparsity().ir_alpha == 0.0
    assert notes == ["ir_alpha=0.03 does not apply to fst_noir (kept its default)"]


def test_a_grid_gives_the_masked_decay_and_its_lambda_together(tmp_path):
    """decay_kind=masked_grad is valid for tsm (own decay 0) only beside the grid's decay:
    both apply; dense takes neither, with a note for each."""
    grid = {"decay_kind": ("masked_grad",), "decay": (6e-5,)}
    runs, notes = plan_study(_spec(tmp_path, recipes=("dense", "tsm"), grid=grid, seeds=(0,)))
    assert [r.name for r in runs] == ["dense-seed0", "tsm-decay_kindmasked_grad-decay6e-05-seed0"]
    tsm = runs[1].config.sparsity()
    assert (tsm.decay_kind, tsm.decay) == ("masked_grad", 6e-5)
    assert notes == [
        "decay_kind=masked_grad does not apply to dense (kept its default)",
        "decay=6e-05 does not apply to dense (kept its default)",
    ]


def test_compare_ir_alpha_leaves_fst_noir_at_zero_with_a_note(tmp_path):
    from fullsparse.train.compare import recipe_configs
    from fullsparse.train.config import TrainConfig

    base = TrainConfig.from_dict({**TINY, "ir_alpha": 0.03}, source="test")
    configs, notes = recipe_configs(base, ["fst_noir", "fst"], tmp_path)
    assert [c.sparsity().ir_alpha for c in configs] == [0.0, 0.03]
    assert notes == ["ir_alpha=0.03 does not apply to fst_noir (kept its default)"]


def test_plan_crosses_several_grid_keys_and_seeds(tmp_path):
    spec = _spec(
        tmp_path,
        recipes=("fst",),
        seeds=(0, 1),
        grid={"grad_input_source": ("dense", "pruned"), "lr": (0.1,)},
    )
    names = [r.name for r in plan_study(spec)[0]]
    assert names == [
        "fst-grad_input_sourcedense-lr0.1-seed0",
        "fst-grad_input_sourcedense-lr0.1-seed1",
        "fst-grad_input_sourcepruned-lr0.1-seed0",
        "fst-grad_input_sourcepruned-lr0.1-seed1",
    ]


def test_spec_rejects_bad_fields_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="set per run by the study"):
        _spec(tmp_path, base={"seed": 3})
    with pytest.raises(ConfigError, match="unknown recipe 'fsst'"):
        plan_study(_spec(tmp_path, recipes=("fsst",)))
    with pytest.raises(ConfigError, match="did you mean 'ir_alpha'"):
        plan_study(_spec(tmp_path, grid={"ir_alfa": (1.0,)}))
    with pytest.raises(ConfigError, match="seeds are listed twice"):
        _spec(tmp_path, seeds=(1, 1))


def test_spec_file_yaml(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(
        "out: somewhere\nrecipes: [fst]\nseeds: [0, 2]\ngrid:\n  ir-alpha: [0.5]\n"
        "base:\n  epochs: 3\n  dataset: synthetic\n"
    )
    spec = load_study_spec(path)
    assert spec.recipes == ("fst",) and spec.seeds == (0, 2)
    assert spec.grid == {"ir_alpha": (0.5,)} and spec.base == {"epochs": 3, "dataset": "synthetic"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipes: [fst]\nepochs: 3\n")
    with pytest.raises(ConfigError, match="unknown key.*epochs.*go under 'base'"):
        load_study_spec(bad)


# ------------------------------------------------------------------------- skip / resume
def test_killed_study_reruns_only_what_is_left(tmp_path):
    spec = _spec(tmp_path)
    calls: list[tuple[str, bool]] = []

    def killed_after_one(run, resume, threads):
        if calls:
            raise KeyboardInterrupt  # the study is killed while starting its second run
        calls.append((run.name, resume))
        _fake_run(run)

    with pytest.raises(KeyboardInterrupt):
        run_study(spec, run_one=killed_after_one, log=None, plot=False)
    assert calls == [("dense-seed0", False)]

    rerun: list[tuple[str, bool]] = []

    def record(run, resume, threads):
        rerun.append((run.name, resume))
        _fake_run(run)

    report = run_study(spec, run_one=record, log=None, plot=False)
    assert rerun == [("dense-seed1", False), ("fst-seed0", False), ("fst-seed1", False)]
    actions = {o.name: o.action for o in report.outcomes}
    assert actions == {
        "dense-seed0": "skipped",
        "dense-seed1": "trained",
        "fst-seed0": "trained",
        "fst-seed1": "trained",
    }
    again: list[str] = []
    run_study(spec, run_one=lambda r, *_: again.append(r.name), log=None, plot=False)
    assert again == []  # everything complete: nothing runs


def test_interrupted_runs_resume_and_failed_runs_do_not_stop_the_study(tmp_path):
    spec = _spec(tmp_path, recipes=("fst",))
    runs, _ = plan_study(spec)
    runs[0].run_dir.mkdir(parents=True)
    (runs[0].run_dir / "last.pt").write_bytes(b"checkpoint")  # killed after an epoch
    seen = []

    def run_one(run, resume, threads):
        seen.append((run.name, resume, threads))
        if run.seed == 1:
            raise UserError("data went missing")
        _fake_run(run)

    report = run_study(spec, run_one=run_one, threads=3, log=None, plot=False)
    assert seen == [("fst-seed0", True, 3), ("fst-seed1", False, 3)]
    assert [(o.name, o.action) for o in report.failed] == [("fst-seed1", "failed")]
    assert report.failed[0].error == "data went missing"
    assert run_status(runs[0]) == "complete" and run_status(runs[1]) == "new"


def test_a_stopped_run_with_a_summary_is_resumed_not_skipped(tmp_path):
    spec = _spec(tmp_path, recipes=("dense",), seeds=(0,))
    (run,) = plan_study(spec)[0]
    _fake_run(run, status="stopped after epoch 1 of 2 (stop_after)")
    assert run_status(run) == "new"
    (run.run_dir / "last.pt").write_bytes(b"x")
    assert run_status(run) == "partial"


def test_a_folder_holding_another_config_is_refused(tmp_path):
    spec = _spec(tmp_path, recipes=("dense",), seeds=(0,))
    (run,) = plan_study(spec)[0]
    _fake_run(run)
    changed = _spec(tmp_path, recipes=("dense",), seeds=(0,), base={**TINY, "epochs": 5})
    with pytest.raises(UserError, match=r"another config \(epochs: 2 -> 5\)"):
        run_study(changed, run_one=lambda *a: None, log=None, plot=False)


def test_threads_are_split_between_parallel_runs(tmp_path):
    spec = _spec(tmp_path)
    got = []

    def run_one(run, resume, threads):
        got.append(threads)
        _fake_run(run)

    run_study(spec, parallel=2, threads=5, run_one=run_one, log=None, plot=False)
    assert got == [2, 2, 2, 2]


# ------------------------------------------------------------------------- the table
def test_table_numbers_for_stored_runs(tmp_path):
    spec = _spec(tmp_path, seeds=(0, 1, 2))
    runs, _ = plan_study(spec)
    stored = {
        "dense-seed0": ((70.0, 80.0), 2.0),
        "dense-seed1": ((75.0, 82.0), 4.0),
        "dense-seed2": ((90.0, 84.0), 3.0),
        "fst-seed0": ((60.0, 70.0), 1.0),
        "fst-seed1": ((66.0, 72.0), 1.5),
    }  # fst-seed2 never ran
    roles = ("output", "grad_input", "grad_weight")
    fractions = {  # the FLOP account: dense none, fst's seeds 0.94 and 0.92 (fully sparse)
        "fst-seed0": {**dict.fromkeys(roles, 0.95), "total": 0.94, "fully_sparse": True},
        "fst-seed1": {**dict.fromkeys(roles, 0.93), "total": 0.92, "fully_sparse": True},
    }
    for run in runs:
        if run.name in stored:
            best, seconds = stored[run.name]
            _fake_run(run, best=best, seconds=seconds, fraction=fractions.get(run.name))
    table, payload = study_table(runs)
    dense, fst = payload["rows"]
    assert dense["n"] == 3 and fst["n"] == 2 and fst["seeds_done"] == [0, 1]
    assert dense["best_top1_mean"] == pytest.approx(statistics.fmean([80, 82, 90]))
    assert dense["best_top1_std"] == pytest.approx(statistics.stdev([80, 82, 90]))
    assert dense["final_top1_mean"] == pytest.approx(82.0)
    assert dense["final_top1_std"] == pytest.approx(2.0)
    assert fst["best_top1_mean"] == pytest.approx(71.0)
    assert fst["seconds_per_epoch_mean"] == pytest.approx(1.25)
    assert fst["sparse_gemm_fraction"]["total"] == pytest.approx(0.93)
    assert fst["sparse_gemm_fraction"]["grad_input"] == pytest.approx(0.94)
    assert dense["sparse_gemm_fraction"] is None
    assert "| dense | 84.00 ± 5.29 | 82.00 ± 2.00 | 3.0 ± 1.0 | 3/3 | - |" in table
    row = "| fst | 71.00 ± 1.41 | 71.00 ± 1.41 | 1.2 ± 0.4 | 2/3 | 0.93 (fully sparse) |"
    assert row in table


def test_study_writes_table_json_plan_and_curves(tmp_path):
    pytest.importorskip("matplotlib")  # the curves need the plot extra
    spec = _spec(tmp_path, seeds=(0,))
    report = run_study(spec, run_one=lambda r, *_: _fake_run(r), log=None)
    out = tmp_path / "study"
    assert (out / "study.md").read_text().startswith("| variant | best top-1 (%) |")
    data = json.loads((out / "study.json").read_text())
    assert [r["variant"] for r in data["rows"]] == ["dense", "fst"]
    plan = json.loads((out / "plan.json").read_text())
    assert [r["name"] for r in plan["runs"]] == ["dense-seed0", "fst-seed0"]
    assert report.curves == out / "curves.png" and report.curves.stat().st_size > 1000


def test_study_without_matplotlib_says_the_curves_were_skipped(tmp_path, monkeypatch):
    import fullsparse.analysis.plots as plots

    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    report = run_study(_spec(tmp_path, seeds=(0,)), run_one=lambda r, *_: _fake_run(r), log=None)
    assert report.curves is None
    assert any("curves.png skipped" in n for n in report.notes)


# ------------------------------------------------------------------------- real runs
def test_real_training_study_resumes_a_stopped_run(tmp_path):
    base = {**TINY, "epochs": 2}
    spec = _spec(tmp_path, recipes=("fst",), seeds=(0,), base={**base, "stop_after": 1})
    report = run_study(spec, log=None, plot=False)  # in process; stops after epoch 1
    assert [o.action for o in report.outcomes] == ["stopped"]
    (run,) = report.runs
    assert run_status(run) == "partial"
    report = run_study(_spec(tmp_path, recipes=("fst",), seeds=(0,), base=base), log=None)
    assert [(o.before, o.action) for o in report.outcomes] == [("partial", "resumed")]
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_done"] == 2
    assert [m["epoch"] for m in report_history(run.run_dir)] == [1, 2]


def report_history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_parallel_study_trains_in_subprocesses(tmp_path):
    spec = _spec(tmp_path, recipes=("dense",), seeds=(0, 1), base={**TINY, "epochs": 1})
    report = run_study(spec, parallel=2, threads=2, log=None, plot=False)
    assert [o.action for o in report.outcomes] == ["trained", "trained"], report.outcomes
    for run in report.runs:
        assert run_status(run) == "complete"
        assert (run.run_dir / "study-run.json").is_file()
    assert "| dense | " in report.table and "| 2/2 |" in report.table


def test_child_command_reads_back_as_the_same_config(tmp_path):
    from fullsparse.train.config import config_from_sources

    (run,) = plan_study(_spec(tmp_path, recipes=("fst",), seeds=(3,)))[0]
    cmd, path = child_command(run, resume=False)
    assert cmd[1:5] == ["-m", "fullsparse", "train", "--config"] and cmd[5] == str(path)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(run.config.replace(quiet=True).to_dict()))
    assert config_from_sources(path).seed == 3


# ------------------------------------------------------------------------- CLI
def test_cli_dry_run_lists_the_plan(tmp_path, capsys):
    code = main(
        [
            "study",
            "--recipes",
            "dense,fst",
            "--seeds",
            "0,1",
            "--grid",
            "ir_alpha=1,0.5",
            "--dataset",
            "synthetic",
            "--out",
            str(tmp_path / "s"),
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "6 runs" in out and "fst-ir_alpha0.5-seed1" in out and "new" in out
    assert "note: ir_alpha=1 does not apply to dense" in out


def test_cli_table_only_and_errors(tmp_path, capsys):
    spec = _spec(tmp_path, seeds=(0,))
    for run in plan_study(spec)[0]:
        _fake_run(run)
    args = [
        "study",
        "--dataset",
        "synthetic",
        "--image-size",
        "8",
        "--out",
        str(tmp_path / "study"),
    ]
    args += ["--synthetic-train", "32", "--synthetic-test", "16", "--batch-size", "16"]
    args += ["--train-subset", "all", "--no-plot", "--quiet"]
    assert main([*args, "--table-only"]) == 0
    assert "| dense | 90.00 | 90.00 | 2.0 | 1/1 |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:  # a flag the study sets per run
        main([*args, "--seed", "3"])
    assert info.value.code == 2
    assert "--seed is not taken by this command; the study sets it" in capsys.readouterr().err
    assert main([*args, "--grid", "lr"]) == 2
    assert "--grid expects KEY=V1,V2" in capsys.readouterr().err
