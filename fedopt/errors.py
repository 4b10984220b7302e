"""The one exception type for bad user input.

Anything a user can get wrong (a config key, a value, a file, a CLI argument, a dataset that is
not installed) raises :class:`ConfigError` with one line naming what is wrong and what is allowed.
The CLI prints that line and exits with code 2; no traceback reaches the user.
"""

from __future__ import annotations

__all__ = ["ConfigError", "check"]


class ConfigError(ValueError):
    """Bad input: the message is one line naming the problem and the allowed values."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)
