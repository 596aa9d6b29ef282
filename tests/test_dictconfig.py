"""Typed configs from mappings: conversion, unknown keys, nested paths in errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from trainables.dictconfig import ConfigError, from_dict, to_dict


@dataclass(frozen=True)
class Inner:
    betas: tuple[float, float] = (0.9, 0.95)
    name: str | None = None


@dataclass(frozen=True)
class Outer:
    steps: int = 1
    inner: Inner = field(default_factory=Inner)
    flag: bool = False

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps={self.steps}: must be >= 1")


def test_round_trip_and_conversion():
    cfg = from_dict(Outer, {"steps": 3.0, "inner": {"betas": [0.8, 0.9]}})
    assert cfg == Outer(steps=3, inner=Inner(betas=(0.8, 0.9)))
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"stpes": 1}, "stpes: unknown key; allowed keys: flag, inner, steps"),
        ({"inner": {"betas": [0.9]}}, "inner.betas: expected a list of 2 items"),
        ({"inner": {"betas": [0.9, "x"]}}, "inner.betas[1]: expected a number"),
        ({"steps": 1.5}, "steps: expected an integer"),
        ({"steps": True}, "steps: expected an integer"),
        ({"flag": "yes"}, "flag: expected true or false"),
        ({"steps": 0}, "steps=0: must be >= 1"),
        ({"inner": 3}, "inner: expected a mapping"),
    ],
)
def test_errors_name_the_path(data, message):
    with pytest.raises(ConfigError, match=None) as err:
        from_dict(Outer, data, "")
    assert message in str(err.value)
