"""The examples of docs/integrations.md run as written: Accelerate (the ``hf`` marker: the
hf extra brings accelerate) and Lightning (its own ``lightning`` marker)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_the_page_has_an_accelerate_and_a_lightning_example() -> None:
    assert len(BLOCKS) == 2
    assert "from accelerate import Accelerator" in BLOCKS[0]
    assert "import lightning as L" in BLOCKS[1]


def _run(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    exec(compile(BLOCKS[index], f"{DOC}:block{index}", "exec"), namespace)


@pytest.mark.hf
def test_the_accelerate_example_trains(tmp_path, monkeypatch) -> None:
    _run(0, tmp_path, monkeypatch)


@pytest.mark.lightning
def test_the_lightning_example_trains(tmp_path, monkeypatch) -> None:
    _run(1, tmp_path, monkeypatch)
