"""The errors that mean "bad input": each message names the field and the fix.

The ``rpsft`` app turns an :class:`InputError` raised by any command into a red message and exit status 2
(:class:`rpsft.core.cli_errors.InputErrorGroup`); any other exception is a bug or a resource failure (an out-of-memory
error, a dead service) and keeps its traceback.
"""

from __future__ import annotations


class InputError(Exception):
    """Input the user can fix: a config field, a path, a data row, a model source."""


class ConfigError(InputError, ValueError):
    """A configuration that cannot run; the message names the field and the fix."""


class DataError(InputError, ValueError):
    """A data source or row that cannot be read as chat examples."""


class ModelSourceError(InputError, FileNotFoundError):
    """A model that cannot be found or loaded from what was given (path, embedded name, hub id)."""
