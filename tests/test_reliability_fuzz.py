"""The fuzz harness (``tests/fuzzing.py``) over every reader the command line reaches:
seeded mutations of valid files, each read in a child under a wall-clock budget and a
memory cap. Invariant: valid data or a one-line UserError, never another exception, a
crash or a hang. A short run here; the long one is marked slow."""

from __future__ import annotations

import random

import pytest

from fuzzing import TARGETS, fuzz, mutate, summary

CHECKPOINT_TARGETS = [name for name in TARGETS if name.startswith("ckpt-")]
FILE_TARGETS = [name for name in TARGETS if name not in CHECKPOINT_TARGETS]


def _failures(outcomes) -> list[str]:
    return [f"{o.target} case {o.index}: {'; '.join(o.mutations)}: {o.kind}"
            for o in outcomes if o.kind.startswith("FAIL")]  # fmt: skip


def test_mutations_are_seeded_and_change_the_file():
    data = bytes(range(256)) * 4
    first = [mutate(data, random.Random(f"idx/0/{i}"), False) for i in range(20)]
    again = [mutate(data, random.Random(f"idx/0/{i}"), False) for i in range(20)]
    assert first == again  # the same case in every process: a failure can be rerun
    assert sum(out != data for out, _ in first) >= 19
    kinds = {what.split()[0] for _, done in first for what in done}
    assert {"flip", "truncate", "repeat", "insert", "field", "nest"} <= kinds, kinds


def test_a_short_fuzz_run_of_every_reader_reads_or_refuses_in_one_line():
    """2 cases of each file reader and 1 of each checkpoint command (about 4 s)."""
    outcomes = fuzz(FILE_TARGETS, cases=2, seed=0, budget=60.0)
    outcomes += fuzz(CHECKPOINT_TARGETS, cases=1, seed=0, budget=60.0, check_valid=False)
    assert _failures(outcomes) == [], summary(outcomes)
    assert len(outcomes) == 2 * len(FILE_TARGETS) + len(CHECKPOINT_TARGETS) == 22
    assert {o.target for o in outcomes} == set(TARGETS)


@pytest.mark.parametrize(
    "name, index, needle",
    [
        ("config-yaml", 150, "lr must be a finite number >= 0, got a number of 401 digits"),
        ("config-json", 164, "lr must be a finite number >= 0, got a number of 401 digits"),
        ("ckpt-export", 160, "its zip archive is damaged"),
    ],
)
def test_the_cases_the_long_run_found_are_refused_in_one_line(name, index, needle):
    """Seed 1 found these: an OverflowError for a 401-digit lr, and zipfile's
    NotImplementedError for a checkpoint whose zip declares version 25.5."""
    (outcome,) = fuzz([name], cases=1, seed=1, budget=60.0, only=index, check_valid=False)
    assert outcome.kind.startswith("refused") and needle in outcome.kind, outcome.kind


def test_the_harness_reports_a_hang_and_an_unexpected_exception(tmp_path, monkeypatch):
    """The harness can fail: a reader that loops or raises TypeError is reported."""
    import fuzzing

    def hang(folder):
        while True:
            pass

    def wrong(folder):
        raise TypeError("not a UserError")

    target = TARGETS["text"]
    for read, needle in ((hang, "no result within the 1 s budget"), (wrong, "TypeError")):
        monkeypatch.setitem(TARGETS, "text", fuzzing.Target("text", True, target.setup, read))
        (outcome,) = fuzz(["text"], cases=1, seed=0, budget=1.0, check_valid=False)
        assert outcome.kind.startswith("FAIL") and needle in outcome.kind, outcome.kind


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TARGETS))
def test_a_long_fuzz_run_of_every_reader(name):
    """200 cases per reader with seed 1 (minutes; counts in docs/reliability.md)."""
    outcomes = fuzz([name], cases=200, seed=1, budget=60.0)
    assert _failures(outcomes) == [], summary(outcomes)
