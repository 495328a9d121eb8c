"""Every numeric option of every subcommand, drawn at and past its edges: each call is refused
in one line (or by argparse's usage error) before any work, never a traceback.

Each command gets inputs that make a valid value stop at a one-line refusal too (a cache or a
study that does not exist, a demo folder that holds a demo), so no draw starts real work.
"""

from __future__ import annotations

import argparse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from search.cli import build_parser, main

EDGES = ["-1", "0", "1", "-0.5", "0.5", "1e9", "-1e9", "nan", "inf", "-inf", "x", "", "1e400",
         "2", "7", "100", "4097", "-3"]


def numeric_options() -> list[tuple[str, str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = []
    for command, p in sub.choices.items():
        for action in p._actions:
            if action.option_strings and action.type in (int, float):
                found.append((command, action.option_strings[-1]))
    return found


def invocation(command: str, option: str, value: str, tmp_path) -> list[str]:
    missing = str(tmp_path / "missing")
    base = {
        "synth": ["synth", str(tmp_path / "file")],  # a file: refused even when valid
        "prepare": ["prepare", "--egd-root", missing, "--mimic-root", missing,
                    "--cache", str(tmp_path / "cache")],
        "search": ["search", "--name", "s", "--cache", missing],
        "export": ["export", "nostudy"],
        "evaluate": ["evaluate", "nostudy"],
        "repeat": ["repeat", "nostudy"],
        "demo": ["demo", "--workdir", str(tmp_path)],
        "bench": ["bench", "--device", "tpu"],
    }[command]
    return [*base, f"{option}={value}"]


@pytest.mark.parametrize("command, option", numeric_options())
def test_every_numeric_option_is_refused_or_stops_in_one_line(command, option, tmp_path,
                                                              capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    (tmp_path / "reports" / "demo").mkdir(parents=True)  # the demo refuses to run again

    @settings(max_examples=len(EDGES), deadline=None, derandomize=True)
    @given(st.sampled_from(EDGES))
    def check(value):
        capsys.readouterr()
        try:
            code = main(invocation(command, option, value, tmp_path))
        except SystemExit as exit:  # argparse: a value of the wrong type
            code = exit.code
        err = capsys.readouterr().err
        assert code == 2, (command, option, value, code, err)
        assert "Traceback" not in err
        lines = [line for line in err.strip().splitlines() if line]
        usage_error = lines[0].startswith("usage:") and lines[-1].startswith(
            f"gazetune {command}: error: argument {option}")
        assert len(lines) == 1 or usage_error, err

    check()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "reports"]
