"""Shared test settings.

Tests run torch on one thread: their tensors are small, and on a 2-core machine shared with
other work two OpenMP threads make small ops up to 10x slower. Set FULLSPARSE_TEST_THREADS
to change it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

torch.set_num_threads(int(os.environ.get("FULLSPARSE_TEST_THREADS", "1")))
# Fused (compiled) kernels compile for tens of seconds at their first call: tests run the
# eager reference, and tests/test_fused_kernels.py turns the fused path on where it checks
# it against the reference.
os.environ.setdefault("FULLSPARSE_FUSED", "off")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny tensors, whatever FULLSPARSE_TEST_THREADS says.

    They gain nothing from 2 OpenMP threads, and when the 2 cores are busy (parallel test
    runs) spinning OpenMP barriers made each op ~10x slower. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as a module (the scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"script_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
