"""`fastgraph COMMAND --help` says what the command does in a whole sentence, in plain text."""

from __future__ import annotations

import pytest

from fastgraph.cli.main import COMMANDS, build_parser, main


def _subparsers():
    parser = build_parser()
    (action,) = [a for a in parser._actions if a.dest == "command"]
    return action.choices


def test_every_description_is_a_complete_plain_sentence():
    subparsers = _subparsers()
    assert set(subparsers) == set(COMMANDS)
    for name, sub in subparsers.items():
        text = sub.description
        assert text[0].isupper() and text.endswith("."), (name, text)
        assert "``" not in text and ":func:" not in text and "`fastgraph" not in text, (name, text)


@pytest.mark.parametrize("command", ["profile", "optimize", "export"])
def test_help_shows_it(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert out.split(" positional arguments:")[0].endswith(".") and "``" not in out
