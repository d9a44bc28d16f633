"""Every command's `--help` says what it does in a sentence or two and shows an example, and the
example is a command line the parser accepts (nothing is run)."""

from __future__ import annotations

import shlex
from unittest import mock

import pytest

from ft_assets.cli import main as cli


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_each_commands_help_says_what_it_does_and_shows_an_example_that_parses(name, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([name, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    line, description, example = cli.COMMANDS[name]
    assert " ".join(description.split()) in " ".join(text.split())
    assert text.rstrip().endswith(f"example:\n  {example}")
    argv = shlex.split(example)
    assert argv[:4] == ["python", "-m", "ft_assets", name]
    ran = {}
    with mock.patch.dict(cli.__dict__, {f"cmd_{name}": lambda args: ran.setdefault("args", args) and 0}):
        cli.main(argv[3:])  # parsed as the user would type it; the command itself is not run
    assert ran["args"].cmd == name
