"""The commands README.md and docs/ name exist: every `make <target>` in a code span or block is a
Makefile target, every `python -m ft_assets <command>` a subcommand."""

from __future__ import annotations

import re

from ft_assets.cli.main import main
from ft_assets_tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _code(text: str) -> str:
    """The text inside code blocks and inline code spans, where commands are written."""
    blocks = re.findall(r"```.*?```", text, flags=re.S)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return "\n".join(blocks + spans)


def test_every_make_target_the_docs_name_exists():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", makefile, flags=re.M))
    command = r"(?:^|&&|;|\$ )\s*(?:\w+=\S+\s+)*make ([a-z][\w-]*)"  # as typed, after any VAR=value
    named = {t for doc in DOCS for t in re.findall(command, _code(doc.read_text()), flags=re.M)}
    assert named, "no make command found: the pattern is wrong"
    assert named <= targets, f"documented but not in the Makefile: {sorted(named - targets)}"


def test_every_cli_command_the_docs_name_exists(capsys):
    try:
        main(["--help"])
    except SystemExit:
        pass
    usage = capsys.readouterr().out
    commands = set(re.search(r"\{([\w,]+)\}", usage).group(1).split(","))
    named = {c for doc in DOCS for c in re.findall(r"python -m ft_assets ([a-z]\w*)", _code(doc.read_text()))}
    assert {"validate", "reference", "init"} <= named
    assert named <= commands, f"documented but not a command: {sorted(named - commands)}"
