"""The `supmae` command: every listed subcommand imports and answers --help; errors are one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from supmae.cli import SUBCOMMANDS, main


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert f"  {name} " in out


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_each_subcommand_has_working_help(name):
    # A subprocess, so argparse's SystemExit and heavy imports stay out of this process.
    res = subprocess.run([sys.executable, "-m", "supmae.cli", name, "--help"], capture_output=True, text=True,
                         check=False, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "usage" in res.stdout.lower()


def test_unknown_command_is_one_line_error(capsys):
    assert main(["pretrian"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'pretrain'" in err
