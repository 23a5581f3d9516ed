"""Importing a user's Python file named in the config (reward functions, environments): one place for the
one-line errors a missing, unimportable or failing file gets."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from cybertron.errors import UserError


def import_file(path: Path, key: str, prefix: str) -> ModuleType:
    """Execute the file at `path` as a fresh module named prefix_<stem>; `key` (e.g. align.reward) starts every
    error line. User code may raise anything: it is reported in one line, not as a traceback."""
    if not path.is_file():
        raise UserError(f"{key}: {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"{prefix}_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"{key}: cannot import {path} as Python")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - user code: one line, not a traceback
        raise UserError(f"{key}: importing {path} failed: {type(err).__name__}: {err}") from err
    return module
