"""Define-by-run search spaces, one function each, looked up by name.

A space is `space(trial) -> dict | None`: it calls `trial.suggest_*` (Optuna) and may return
constants. It does no I/O: Ray runs it on the driver for every new trial.
"""

from __future__ import annotations

from collections.abc import Callable

from spaces.extended import extended
from spaces.paper import PAPER_POINTS, paper

SPACES: dict[str, Callable] = {"paper": paper, "extended": extended}


def get_space(name: str) -> Callable:
    """The space registered under `name`; a KeyError lists the valid names."""
    try:
        return SPACES[name]
    except KeyError:
        raise KeyError(f"unknown space {name!r}; valid spaces: {', '.join(SPACES)}") from None


def sample(space: Callable, trial) -> dict:
    """The config a space gives for one trial: its suggestions plus the constants it returns."""
    constants = space(trial) or {}
    return {**trial.params, **constants}


__all__ = ["PAPER_POINTS", "SPACES", "get_space", "sample"]
