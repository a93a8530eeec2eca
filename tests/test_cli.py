"""The `supmae` command: every listed subcommand imports and answers --help; errors are one line."""

from __future__ import annotations

import pytest

from supmae.cli import SUBCOMMANDS, main


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert f"  {name} " in out


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_each_subcommand_has_working_help(name, capsys):
    # In this process: a subprocess per subcommand spent 5-20 s importing torch (and ffcv) again, about
    # two minutes of the suite; the code path from main() is the same. The console script itself is run
    # as written by tests/test_readme.py.
    try:
        rc = main([name, "--help"])
    except SystemExit as done:
        rc = done.code or 0
    assert rc == 0, capsys.readouterr().err
    assert "usage" in capsys.readouterr().out.lower()


def test_unknown_command_is_one_line_error(capsys):
    assert main(["pretrian"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'pretrain'" in err
