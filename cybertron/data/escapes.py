"""Backslash escapes typed on a command line or in a config value (`--stop "\n"`, `align.stop`), decoded the
same way by every command. A shell passes `\n` through as two characters, so without this a stop string of
`"\n\n"` would wait for a backslash and never match."""

from __future__ import annotations

import warnings

from cybertron.errors import ConfigError


def decode_escapes(text: str, option: str) -> str:
    """`\\n`, `\\t`, `\\\\`, `\\x41`, `\\u00e9` as the characters they name; other text (non-ASCII included) is
    kept, and so is an unknown escape such as `\\q`. `option` names the flag or key in the error for an
    incomplete escape (`\\x4`)."""
    if "\\" not in text:
        return text
    try:
        with warnings.catch_warnings():  # an unknown escape is kept as typed, not worth a warning
            warnings.simplefilter("ignore", DeprecationWarning)
            return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as err:
        raise ConfigError(f'{option} "{text}" has an incomplete escape ({err.reason}); write a backslash '
                          "itself as \\\\") from err
