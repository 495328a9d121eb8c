"""Study names are names, never paths.

A study's name is the MLflow experiment's name and a folder in Tune's storage and in the
reports folder, so every command that takes one checks it here first: a name with a separator,
`..` or a leading dot would write outside those folders.
"""

from __future__ import annotations

import re

from trainable.config import ConfigError

RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 100"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_name(name: str, option: str = "study name",
               names: str = "a folder and the MLflow experiment") -> str:
    """`name` if it follows the rule; otherwise a one-line `ConfigError` naming `option` and
    what the name `names`. (A registered model's name follows the same rule.)"""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{option} {name!r}: use {RULE} characters (it names {names})")
    return name
