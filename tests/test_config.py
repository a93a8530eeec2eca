"""Strict dotted overrides: types, unknown keys with close matches, round trips."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from supmae.config import apply_overrides, from_dict, leaf_keys, to_dict
from supmae.errors import UserError


@dataclass
class Optim:
    blr: float = 1.5e-4
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: int = 20


@dataclass
class Train:
    epochs: int = 400
    compile: bool = True
    precision: str = "auto"
    resume: str | None = None


@dataclass
class Run:
    optim: Optim = field(default_factory=Optim)
    train: Train = field(default_factory=Train)
    seed: int = 0


def test_overrides_convert_types():
    cfg = apply_overrides(
        Run(),
        ["--optim.blr", "1e-3", "--optim.betas=0.8,0.99", "--train.compile", "off", "--train.epochs", "2",
         "--seed", "7", "--train.resume", "none"],
    )
    assert cfg.optim.blr == pytest.approx(1e-3)
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.train.compile is False
    assert cfg.train.epochs == 2 and cfg.seed == 7
    assert cfg.train.resume is None
    apply_overrides(cfg, ["--train.resume", "auto"])
    assert cfg.train.resume == "auto"


def test_unknown_key_names_close_match():
    with pytest.raises(UserError, match=r"unknown config key --optim\.bl.*did you mean --optim\.blr"):
        apply_overrides(Run(), ["--optim.bl", "1"])


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--train.epochs", "two"], r"bad value for --train\.epochs"),
        (["--train.epochs", "2.5"], r"bad value for --train\.epochs"),
        (["--train.compile", "maybe"], r"bad value for --train\.compile"),
        (["--optim.betas", "0.9"], r"bad value for --optim\.betas"),
        (["--optim.blr"], r"--optim\.blr needs a value"),
        (["optim.blr", "1"], r"unexpected argument"),
    ],
)
def test_bad_values_are_user_errors(argv, pattern):
    with pytest.raises(UserError, match=pattern):
        apply_overrides(Run(), argv)


def test_round_trip_through_dict():
    cfg = apply_overrides(Run(), ["--optim.blr", "2e-4", "--train.resume", "x.pth"])
    again = from_dict(Run, to_dict(cfg))
    assert again == cfg
    assert set(leaf_keys(cfg)) == {"optim.blr", "optim.betas", "optim.warmup_epochs", "train.epochs",
                                   "train.compile", "train.precision", "train.resume", "seed"}


def test_from_dict_rejects_unknown_keys():
    data = to_dict(Run())
    data["optim"]["lr_typo"] = 1.0
    with pytest.raises(UserError, match="unknown config key optim.lr_typo"):
        from_dict(Run, data)
