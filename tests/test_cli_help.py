"""The command line explains itself: every option has help and its default, `train --help`
lists the config keys, `--version` works, reading commands refuse a folder without a study."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest
from helpers import gazetune

from search.cli import build_parser, main
from trainable.config import TrialConfig, describe_keys


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_option_has_help_and_its_default(command):
    parser = subcommands()[command]
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help and action.help.strip(), f"{command} {name}: no help"
        if not action.option_strings or action.default in (None, False):
            continue  # a positional, a flag, or an option whose help says what None means
        shown = parser._get_formatter()._get_help_string(action) % {
            "default": action.default, "prog": parser.prog}
        assert "(default" in shown, f"{command} {name}: default not shown"
        assert str(action.default) in shown or "default:" in shown, (command, name, shown)
    # No pointer to documents or tickets a reader of the repository does not have.
    assert not re.search(r"\bissue\b|DESIGN\.md|shared/", text), text


def test_options_without_a_value_say_what_the_default_does():
    for command, parser in subcommands().items():
        for action in parser._actions:
            if (action.option_strings and action.default is None and action.nargs != 0
                    and not action.required):
                assert "default" in (action.help or ""), f"{command} {action.option_strings}"


def test_train_help_lists_every_config_key_with_its_default():
    help_text = subcommands()["train"].format_help()
    for name, default, accepted, meaning in describe_keys():
        assert re.search(rf"^\s+{re.escape(name)}={re.escape(default)}\s", help_text, re.MULTILINE), name
        assert meaning in help_text.replace("\n", " ") or meaning[:30] in help_text, name
    assert {row[0] for row in describe_keys()} == {
        f.name for f in dataclasses.fields(TrialConfig)}


def test_version_and_top_level_help(tmp_path):
    done = gazetune("--version", cwd=tmp_path)
    assert re.fullmatch(r"gazetune \d+\.\d+\.\d+\S*\n", done.stdout), done.stdout
    done = gazetune("--help", cwd=tmp_path)
    assert "gazetune demo" in done.stdout
    assert not re.search(r"\bissue\b", done.stdout)


@pytest.mark.parametrize("command", [["export", "demo"], ["evaluate", "demo"]])
def test_reading_commands_refuse_a_folder_without_a_study(tmp_path, command):
    done = gazetune(*command, cwd=tmp_path, check=False)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert f"no MLflow store at {tmp_path / 'mlflow.db'}" in done.stderr
    assert list(tmp_path.iterdir()) == []  # no empty store created


def test_train_refuses_an_unwritable_sqlite_store_at_once(tmp_path, small_cache):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    done = gazetune("train", f"cache={small_cache}", "epochs=1", "--tracking-uri",
                    f"sqlite:///{blocker}/sub/mlflow.db", cwd=tmp_path, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "MLflow store folder" in done.stderr and len(done.stderr.strip().splitlines()) == 1


STUDY_COMMANDS = (["export"], ["evaluate"], ["resume"], ["train", "epochs=1", "--experiment"],
                  ["search", "--name"])


@pytest.mark.parametrize("name", ["/tmp/x/victim", "../../escape", "", ".hidden", "a/b",
                                  "x" * 101])
def test_every_command_that_takes_a_study_name_refuses_a_path(tmp_path, monkeypatch, capsys,
                                                              name):
    (tmp_path / "mlflow.db").write_bytes(b"")  # the reading commands would otherwise stop first
    before = sorted(p.name for p in tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    for command in STUDY_COMMANDS:
        # In this process (a subprocess each would cost 2 s of imports): the test below runs
        # the real command line.
        assert main([*command, name]) == 2, command
        err = capsys.readouterr().err
        assert "use letters, digits" in err and len(err.strip().splitlines()) == 1, (command, err)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_the_command_line_refuses_a_path_as_a_study_name_in_one_line(tmp_path):
    (tmp_path / "mlflow.db").write_bytes(b"")
    for command in STUDY_COMMANDS:
        done = gazetune(*command, "../../escape", cwd=tmp_path, check=False)
        assert done.returncode == 2 and "Traceback" not in done.stderr, (command, done.stderr)
        assert "use letters, digits" in done.stderr, (command, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


def test_a_checkpoint_with_broken_json_is_one_line(tmp_path):
    from trainable.checkpoint import load_best, save_best
    from trainable.errors import GazetuneError

    save_best(tmp_path, {}, {"lr": 1e-3}, {"epoch": 1})
    (tmp_path / "best" / "config.json").write_text("{not json")
    with pytest.raises(GazetuneError, match=r"config\.json: unreadable"):
        load_best(tmp_path)
    (tmp_path / "best" / "config.json").write_text("[1, 2]")
    with pytest.raises(GazetuneError, match="a JSON object is expected"):
        load_best(tmp_path)
    # The downloaded artifact folder (the best files themselves) loads as well.
    save_best(tmp_path, {}, {"lr": 1e-3}, {"epoch": 1})
    assert load_best(tmp_path / "best")[1:] == ({"lr": 1e-3}, {"epoch": 1})
