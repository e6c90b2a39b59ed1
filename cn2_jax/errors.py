"""Errors a user can fix without reading the code, and how `main.py` reports them.

Hierarchy (each class also derives from the builtin that callers and tests already catch, so
raising the new class instead of the builtin changes no `except` clause):

  UserError(Exception)                          base; `str(e)` is the plain message
    ConfigError(UserError, KeyError, ValueError)  unknown / misspelled config field, bad value,
                                                  unloadable config file
    DataError(UserError, ValueError)              annotation file, image file, prepared dataset
    WeightsError(UserError, ValueError)           checkpoint / weights file that cannot be used
    InputFileError(UserError, FileNotFoundError)  a file or folder named by the user is missing

Classification (`is_user_error`): instances of `UserError`, the builtin `FileNotFoundError` (every
missing path the code reports is one the user named) and, when `cn2_jax.convert` is loaded, its
`ConversionError` (unreadable or mismatching weights). Plain `KeyError` / `ValueError` are *not*
user errors: they are as often bugs, which keep their traceback. Code that knows a builtin error
is the user's (e.g. config validation) wraps it with `ConfigError(...) from e`.

`main.py` prints a user error as one line `error: <message>` on stderr and exits with status 1;
`--verbose` shows the full traceback instead.
"""

from __future__ import annotations

__all__ = [
    "UserError",
    "ConfigError",
    "DataError",
    "WeightsError",
    "InputFileError",
    "is_user_error",
    "one_line",
]


class UserError(Exception):
  """Base of the errors printed without a traceback."""

  def __str__(self) -> str:
    # KeyError's str() is repr() of the message (quotes, escaped newlines): use the text itself.
    if len(self.args) == 1:
      return str(self.args[0])
    return super().__str__()


class ConfigError(UserError, KeyError, ValueError):
  """A config field, value or file the schema (cn2_jax/config.py) rejects."""


class DataError(UserError, ValueError):
  """A dataset source (annotation json, image file) or prepared dataset that cannot be used."""


class WeightsError(UserError, ValueError):
  """A weights or checkpoint file that cannot be read or does not fit the model."""


class InputFileError(UserError, FileNotFoundError):
  """A file or folder the user named does not exist."""


def is_user_error(exc: BaseException) -> bool:
  """True for errors `main.py` reports as one line (see the module docstring)."""
  return isinstance(exc, (UserError, FileNotFoundError))


def one_line(exc: BaseException) -> str:
  """The message of `exc` on one line (multi-line messages joined with ' | ')."""
  if isinstance(exc, KeyError) and not isinstance(exc, UserError) and len(exc.args) == 1:
    text = str(exc.args[0])  # not repr()
  else:
    text = str(exc)
  parts = [p.strip() for p in text.splitlines() if p.strip()]
  return " | ".join(parts) if parts else type(exc).__name__


class ConversionError(WeightsError):
  """Raised for unreadable files and for any incomplete / inconsistent conversion (a user error:
  main.py prints it as one line).

  `report` is the `ConversionReport` when the failure happened during the mapping.
  """

  def __init__(self, message: str, report=None):
    super().__init__(message)
    self.report = report
