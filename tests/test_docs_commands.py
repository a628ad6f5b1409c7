"""Every `famevil-fast` command line in the README's and docs/' code blocks parses with today's options, and
every recipe (with its `--set` overrides) it trains loads: the documentation cannot drift from the CLI."""

import re
import shlex
from pathlib import Path

import pytest

from famevil_fast.cli.main import _command_modules, build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")  # DIR, CKPT, N, DATA_ROOT, ...


def _code_lines(path: Path) -> list[str]:
    """The lines of fenced code blocks (comments cut) and the inline code spans of the prose."""
    lines, inside = [], False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
        elif inside:
            lines.append(line.split(" #", 1)[0].strip())
        else:
            lines.extend(re.findall(r"`([^`]+)`", line))
    return lines


def _argv(line: str) -> list[str] | None:
    """The arguments after `famevil-fast` (or `-m famevil_fast`), placeholders made concrete; None for a
    line that runs no command."""
    if "famevil-fast " not in line and "-m famevil_fast " not in line:
        return None
    words = shlex.split(line.replace("[", " ").replace("]", " ").replace("$task", "itc"))
    for i, word in enumerate(words):
        if word == "famevil-fast":
            rest = words[i + 1 :]
            break
        if word == "famevil_fast" and i and words[i - 1] == "-m":
            rest = words[i + 1 :]
            break
    else:
        return None
    return ["1" if PLACEHOLDER.match(w) else w for w in rest if w != "..."]


COMMANDS = [(p.name, line) for p in DOCS for line in _code_lines(p) if _argv(line)]


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 15
    assert {name for name, _ in COMMANDS} >= {"README.md", "reproduce.md", "data.md", "training.md"}


@pytest.mark.parametrize("doc, line", COMMANDS)
def test_documented_command_parses(doc, line):
    from famevil_fast.configs import resolve

    from famevil_fast.train.config import load_config

    argv = _argv(line)
    if "COMMAND" in line or len(argv) == 1:  # a mention of a command, not a command line
        assert argv[0] in {m.NAME for m in _command_modules()} or argv[0] == "--traceback", (doc, line)
        return
    try:
        args = build_parser().parse_args(_argv(line))
    except SystemExit as exc:
        pytest.fail(f"{doc}: `{line}` does not parse (exit {exc.code})")
    if getattr(args, "command", None) == "train":
        load_config(resolve(args.config), list(args.overrides or []))
