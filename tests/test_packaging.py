"""What the package declares matches what it ships and uses: the version in one place,
``py.typed``, the core dependencies (torch only: NumPy is never imported by the core), the
``yaml`` extra, the specification the code cites, and a versioned CHANGELOG."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import fullsparse

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "fullsparse"
PYPROJECT = (ROOT / "pyproject.toml").read_text()


def _project_value(key: str) -> str:
    match = re.search(rf"^{key} = (.+)$", PYPROJECT, re.MULTILINE)
    assert match, key
    return match.group(1)


def test_the_version_is_the_same_in_pyproject_and_the_package():
    assert _project_value("version") == f'"{fullsparse.__version__}"'
    assert fullsparse.__version__ == "0.2.0.dev0"


def test_py_typed_and_the_native_sources_are_declared_as_package_data():
    from fullsparse.native import _SOURCES

    assert _SOURCES == ("native.c", "spmm24.c")
    files = ["py.typed", *_SOURCES]
    assert all((SRC / name).is_file() for name in files)
    listed = ", ".join(f'"{name}"' for name in files)
    assert f"[tool.setuptools.package-data]\nfullsparse = [{listed}]" in PYPROJECT


def test_the_core_depends_on_torch_2_4_or_newer_and_nothing_else():
    assert _project_value("dependencies") == '["torch>=2.4"]'
    assert re.search(r'^yaml = \["pyyaml>=6"\]$', PYPROJECT, re.MULTILINE)
    for extra in ("vision", "plot"):  # the extras whose packages (and plots) use NumPy
        assert '"numpy"' in _project_value(extra), extra


def _numpy_imports(path: Path) -> list[str]:
    """``import numpy`` statements in ``path`` outside a ``_numpy()`` helper."""
    tree = ast.parse(path.read_text())
    helpers = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_numpy"]
    allowed = {id(n) for h in helpers for n in ast.walk(h)}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        if any(n.split(".")[0] == "numpy" for n in names) and id(node) not in allowed:
            found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    return found


def test_no_module_imports_numpy_but_the_guarded_checkpoint_helper():
    found = [hit for path in sorted(SRC.rglob("*.py")) for hit in _numpy_imports(path)]
    assert found == []
    helper = [p for p in SRC.rglob("*.py") if "def _numpy()" in p.read_text()]
    assert [p.relative_to(SRC).as_posix() for p in helper] == ["train/checkpoint.py"]


def test_a_training_run_and_a_resume_work_without_numpy(tmp_path):
    """The whole CLI path of a run (parse, build, train, checkpoint, resume) in a process
    where ``import numpy`` fails."""
    out = tmp_path / "run"
    argv = [
        "train", "--dataset", "synthetic", "--synthetic-train", "32", "--synthetic-test",
        "16", "--image-size", "8", "--batch-size", "16", "--epochs", "2", "--stop-after",
        "1", "--no-progress", "--no-plot", "--quiet", "--out", str(out),
    ]  # fmt: skip
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "from fullsparse.cli import main\n"
        f"assert main({argv!r}) == 0\n"
        f"assert main({[*argv[:-2], '--out', str(out), '--resume']!r}) == 0\n"
        "assert sys.modules['numpy'] is None\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "last.pt").is_file() and (out / "summary.json").is_file()


def test_every_citation_of_the_spec_points_to_docs_spec_md():
    texts = {p: p.read_text() for p in [*SRC.rglob("*.py"), *ROOT.glob("docs/**/*.md")]}
    texts[ROOT / "README.md"] = (ROOT / "README.md").read_text()
    assert [p for p, t in texts.items() if "fst-spec" in t] == []
    spec = (ROOT / "docs" / "spec.md").read_text()
    for section in ("## Operators", "## FST, step by step", "## Recipes", "## Conventions"):
        assert section in spec
    for name in fullsparse.RECIPES:  # the recipe table lists every recipe
        assert f"| `{name}` |" in spec, name
    cited = [p for p, t in texts.items() if "docs/spec.md" in t or "(spec.md)" in t]
    assert len(cited) >= 9


def test_the_changelog_has_a_section_per_version():
    log = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## (.+)$", log, re.MULTILINE)
    assert headings[:2] == ["Unreleased: 0.2.0 (now 0.2.0.dev0)", "0.1.0 (2026-12-06)"]
    assert fullsparse.__version__.startswith("0.2.0")
