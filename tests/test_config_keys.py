"""Every config key has its range checked at the door (property-based).

For every key of the table that `gazetune train --help` prints, values are drawn in range, at
the edges, just outside, NaN, infinities, of the wrong type and as command-line strings. Each
is either accepted with a value inside the declared range, or refused with a one-line
`ConfigError` naming the key: never another exception, never a silent out-of-range value.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from search.cli import main
from trainable.config import ConfigError, TrialConfig

FIELDS = {f.name: f for f in dataclasses.fields(TrialConfig)}


def inside(value, meta) -> bool:
    if value is None:
        return True
    if meta["choices"]:
        return value in meta["choices"]
    if meta["pattern"]:
        return re.fullmatch(meta["pattern"], value) is not None
    if meta["bounds"]:
        low, high = meta["bounds"]
        return (math.isfinite(value) and (low < value if meta["open_low"] else low <= value)
                and (value < high if meta["open_high"] else value <= high))
    return True


def candidates(meta) -> st.SearchStrategy:
    odd = st.sampled_from([None, "", "x", "nan", "inf", "-inf", "1e400", [], {}, True, -1,
                           0, 1, 2**40, -0.0, "None", " 3 "])
    numbers = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-2**63, 2**63)
    strategies = [odd, numbers, numbers.map(str), st.text(max_size=12)]
    if meta["bounds"]:
        low, high = meta["bounds"]
        edges = [low, high, low - 1, high + 1, low - 1e-9, high + 1e-9, (low + high) / 2]
        strategies.append(st.sampled_from(edges + [str(e) for e in edges]))
    if meta["choices"]:
        strategies.append(st.sampled_from(list(meta["choices"]) + [c.upper() for c in
                                                                    meta["choices"]]))
    return st.one_of(*strategies)


@pytest.mark.parametrize("key", sorted(FIELDS))
def test_every_value_is_accepted_in_range_or_refused_in_one_line_naming_the_key(key):
    meta = FIELDS[key].metadata

    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(candidates(meta))
    def check(value):
        try:
            cfg = TrialConfig.from_dict({key: value})
        except ConfigError as err:
            message = str(err)
            assert f"'{key}'" in message and "\n" not in message, message
            return
        assert inside(getattr(cfg, key), meta), (key, value, getattr(cfg, key))

    check()


@pytest.mark.parametrize("argument", ["grad_clip=-1", "weight_decay=nan", "threads=-2",
                                      "n_boot=-1", "figures=-3", "cyclic_step=0", "device=tpu",
                                      "lr=inf", "loss_weight=nan", "batch_size=1", "seed=-1"])
def test_the_command_line_refuses_before_any_work(argument, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", argument]) == 2
    err = capsys.readouterr().err.strip()
    key = argument.split("=")[0]
    assert err.startswith(f"gazetune train: config key '{key}'") and "\n" not in err, err
    assert list(tmp_path.iterdir()) == []  # no MLflow store, no run
