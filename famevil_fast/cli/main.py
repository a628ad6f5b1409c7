"""The ``famevil-fast`` command: collects the subcommands in ``famevil_fast.cli.commands``.

Each module there defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``; adding
a command means adding a module, nothing here changes.

Errors in what the user gave (a missing file, a bad value, an unreadable image) end the command with one
line on stderr that names the problem and exit status 2, those the parser finds (an unknown option, a value
out of range) included; ``--traceback`` (or ``FAMEVIL_FAST_TRACEBACK=1``) shows the full Python traceback
instead.

Output into a pipe whose reader stopped reading (``famevil-fast caption CKPT DIR | head -5``) ends the command
quietly with exit status 141, as a command killed by SIGPIPE would end in a shell.

Warnings are printed as one line on stderr, ``famevil-fast: warning: MESSAGE`` (``famevil-fast: warning:
CATEGORY: MESSAGE`` for a category other than UserWarning), without the file, line and source line that
Python prints: the package's warnings point at the first frame outside it, which under the command is its
entry script. Only while ``main`` runs (in every process of a torchrun launch, each of which runs
``main``): a program that calls the package from Python keeps Python's format and its own file and line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import select
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

from famevil_fast.cli import commands
from famevil_fast.eval.caption_tokenize import CaptionMetricsUnavailable, JavaNotFoundError


def _command_modules() -> list:
    names = sorted(m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_"))
    return [importlib.import_module(f"{commands.__name__}.{name}") for name in names]


PROG = "famevil-fast"


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr, ``PROG: error: MESSAGE (see PROG --help)``,
    with exit status 2, in place of the usage block that argparse prints before them."""

    def error(self, message: str) -> NoReturn:
        flat = " ".join(message.splitlines())
        self.exit(2, f"{self.prog}: error: {flat} (see {self.prog} --help)\n")


class CommandParser(OneLineErrorParser):
    """The ``famevil-fast`` parser: arguments that no option takes are reported by the parser of the command
    they were given to, as that command's error."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}

    def parse_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            owner = self.commands.get(getattr(parsed, "command", None), self)
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless there is none to show (None, an empty list, a flag) or the help
    text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        nothing = action.default is None or action.default is False or action.default == []
        quiet = nothing or "default" in (action.help or "")
        return action.help if quiet else super()._get_help_string(action)


def build_parser() -> CommandParser:
    parser = CommandParser(
        prog=PROG,
        description="FAME-ViL for fashion: train, evaluate and use the multi-task vision-language model.",
    )
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="on an error, show the full Python traceback instead of a one-line message "
        "(also FAMEVIL_FAST_TRACEBACK=1)",
    )
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=OneLineErrorParser
    )
    for module in _command_modules():
        cmd = sub.add_parser(
            module.NAME,
            help=module.HELP,
            description=module.HELP,
            formatter_class=HelpFormatter,
        )
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
        parser.commands[module.NAME] = cmd
    return parser


# What a command raises for bad input: a path that does not exist or cannot be read, a value out of range,
# a file that is not what it should be, an optional dependency the command needs and this machine lacks.
# Anything else is a bug and keeps its traceback.
USER_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    ValueError,
    JavaNotFoundError,
    CaptionMetricsUnavailable,
)


# The exit status of a command whose stdout reader went away: 128 + SIGPIPE, what a shell reports for a
# program that SIGPIPE killed (Python ignores SIGPIPE and raises BrokenPipeError instead), so that
# `set -o pipefail` scripts see the same status as with other command-line tools.
CLOSED_STDOUT_STATUS = 141


def _stdout_closed() -> bool:
    """Whether stdout's reader has gone. A pipe or terminal whose reader is still there is not (a
    BrokenPipeError then came from another pipe, a worker process's, and is a failure), nor is a stdout
    without a file descriptor to ask (a notebook's, a redirection to a buffer): it cannot be told apart."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        events = poller.poll(0)
    except (AttributeError, OSError, ValueError):
        return False
    return any(flags & (select.POLLERR | select.POLLHUP) for _, flags in events)


def _silence_stdout() -> None:
    """Send whatever is still written to stdout (the interpreter's flush at exit) to /dev/null, so that it
    raises no second BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        sys.stdout = open(os.devnull, "w")  # stdout until the process ends
    finally:
        os.close(devnull)


def warning_line(message: Warning | str, category: type[Warning]) -> str:
    """A warning as the command prints it: ``famevil-fast: warning: MESSAGE`` on one line, the category
    named before the message when it is not UserWarning."""
    text = " ".join(str(message).splitlines())
    named = "" if category is UserWarning else f"{category.__name__}: "
    return f"{PROG}: warning: {named}{text}\n"


@contextmanager
def one_line_warnings() -> Iterator[None]:
    """Warnings shown in the command's one-line format (``warning_line``) inside the block; Python's format
    is restored after it. Only ``warnings.formatwarning`` is replaced, so a ``showwarning`` or a recorder
    installed by the caller (``warnings.catch_warnings(record=True)``, ``pytest.warns``) still gets every
    warning, with its file and line."""
    previous = warnings.formatwarning

    def formatwarning(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        line: str | None = None,
    ) -> str:
        return warning_line(message, category)

    warnings.formatwarning = formatwarning
    try:
        yield
    finally:
        warnings.formatwarning = previous


# torch loggers whose notes concern building extensions, not a command's work: importing torch's extension
# builder (torch.compile does, for its CPU kernels) logs that a CUDA toolkit was found without a GPU
QUIET_TORCH_LOGGERS = ("torch.utils.cpp_extension",)


@contextmanager
def quiet_torch_build_notes() -> Iterator[None]:
    """Within it, ``QUIET_TORCH_LOGGERS`` log errors only; their levels are restored after it."""
    loggers = [logging.getLogger(name) for name in QUIET_TORCH_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    with one_line_warnings(), quiet_torch_build_notes():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = int(args._run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows now, not in the interpreter's flush at exit
        return status
    except USER_ERRORS as exc:
        if args.traceback or os.environ.get("FAMEVIL_FAST_TRACEBACK", "") == "1":
            raise
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        _silence_stdout()
        return CLOSED_STDOUT_STATUS


if __name__ == "__main__":
    sys.exit(main())
