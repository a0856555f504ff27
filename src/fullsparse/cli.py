"""The ``fullsparse`` command line: a thin front end over the library.

Each subcommand lives in its own module under :mod:`fullsparse.commands` and provides
``add_parser(subparsers)`` (which sets ``func``) — parse, build a config, call a library
function. Errors the user can fix (:class:`fullsparse.errors.UserError`) print one line and
exit with status 2, with no traceback. SIGTERM (``kill``, a batch scheduler's stop) is taken
like Ctrl-C: a training run says what it saved and how to continue, and the command exits
with status 143 (130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any, NoReturn

from fullsparse.errors import UserError
from fullsparse.limits import MESSAGE_CHARS, one_line, worker_message

#: Subcommand modules, in the order ``fullsparse --help`` lists them.
COMMANDS = ("train", "compare", "eval", "export", "convert", "bench", "analyze", "study")


class HelpFormatter(argparse.HelpFormatter):
    """The one way every command's help shows a default: ``(default: VALUE)`` at the end,
    appended here from the option's own default (so it cannot drift from the code) unless
    the help already says what the default is. On/off flags and options without a default
    (None) show none. An option with ``choices`` and a metavar gets its values listed after
    (``; one of: a, b``), read from its canonical tuple."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shows_default = action.default is not None and action.default is not argparse.SUPPRESS
        if action.option_strings and "default" not in text and action.nargs != 0 and shows_default:
            text = f"{text} (default: %(default)s)"
        if action.choices is not None and action.metavar is not None:
            text = f"{text}; {one_of(action.choices)}"
        return text


def one_of(choices: Iterable[str]) -> str:
    """The values a name option takes, as every help writes them."""
    return "one of: " + ", ".join(choices)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one ``error:`` line and exit status 2, like every
    other error of the command line (argparse prints the whole usage first). Subparsers are
    made with the parent's class, so every subcommand inherits this (and the one
    :class:`HelpFormatter`); ``--help`` still prints the usage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        suffix = f" (see `{self.prog} --help`)"
        # argparse wraps long choice lists; a huge value (a 5 MB --recipe) is cut in the middle
        message = one_line(" ".join(message.split()), MESSAGE_CHARS - len(suffix))
        self.exit(2, f"error: {message}{suffix}\n")


def build_parser() -> argparse.ArgumentParser:
    from fullsparse import __version__

    parser = _Parser(
        prog="fullsparse",
        description="Fully sparse (2:4 forward, grad_input and grad_weight) training.",
    )
    parser.add_argument("--version", action="version", version=f"fullsparse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"fullsparse.commands.{name}")
        except ModuleNotFoundError as exc:  # a subcommand not written yet
            if exc.name == f"fullsparse.commands.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be, so that the same clean-up
    and messages run."""


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in this process (not in forked
    DataLoader workers, which keep the default: the loader stops them with SIGTERM)."""
    try:
        previous = signal.getsignal(signal.SIGTERM)
        if previous is signal.SIG_IGN:  # whoever started us asked for SIGTERM to be ignored
            yield
            return
        pid = os.getpid()

        def handler(signum: int, frame: FrameType | None) -> None:
            if os.getpid() != pid:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            raise Terminated

        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with _sigterm_as_interrupt():
            return int(args.func(args) or 0)
    except UserError as exc:
        # Escaped, one line, at most ~300 characters; a DataLoader worker's error is shown
        # as its original message, not the traceback text the loader wraps it in.
        message = worker_message(str(exc), type(exc).__name__)
        print(f"error: {one_line(message)}", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
