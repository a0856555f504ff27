"""The one spelling of a command's JSON output: ``--json PATH``.

``bench layers|steps|gpu`` save their results to ``--json PATH`` (with a default file
name); ``eval --json`` prints the result as JSON on stdout, ``eval --json PATH`` writes it
to PATH. Older spellings (``bench steps --out PATH``) still work, with a one-line
deprecation warning on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

#: The flag every command writes its JSON result with.
JSON_FLAG = "--json"
#: ``--json`` without a value, or ``--json -``: the JSON goes to stdout (``eval``).
STDOUT = "-"


class _DeprecatedAlias(argparse.Action):
    """An old spelling of an option, hidden from the help: sets the new option's value and
    warns once on stderr."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kw: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kw)

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        print(f"warning: {option} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_json_argument(
    parser: argparse.ArgumentParser,
    default: Path | None = None,
    *,
    stdout: bool = False,
    old: tuple[str, ...] = (),
) -> None:
    """Add ``--json PATH`` (dest ``json``). ``default``: the file written when the flag is
    not given (None: no JSON unless asked); ``stdout``: the value may be left out (or be
    ``-``) to print the JSON on stdout; ``old``: deprecated spellings still accepted."""
    if stdout:
        parser.add_argument(
            JSON_FLAG,
            metavar="PATH",
            nargs="?",
            const=STDOUT,
            default=default,
            help="write the result as JSON to PATH (alone or '-': print it on stdout)",
        )
    else:
        parser.add_argument(
            JSON_FLAG, metavar="PATH", type=Path, default=default, help="where to save the JSON"
        )
    for flag in old:
        parser.add_argument(
            flag, dest="json", metavar="PATH", type=Path, action=_DeprecatedAlias, new=JSON_FLAG
        )


def save_text(path: str | Path, text: str) -> None:
    """Save ``text`` to ``path`` (parents made) and say so on stdout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"saved {path}")
