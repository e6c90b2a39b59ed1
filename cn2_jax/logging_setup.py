"""Logging for the command line: our INFO lines, libraries' warnings, nothing that breaks tqdm.

`setup_logging(verbose=False)`:
  * `cn2_jax.*` logs at INFO; absl (which carries orbax, tensorflow_datasets and grain messages),
    orbax, tensorflow_datasets, jax and grain log at WARNING only (their INFO output, e.g. Orbax's
    ~40 lines per checkpoint and jax's TPU probe, is most of a run's output otherwise);
  * tensorflow_datasets' own progress bars are off (our builder shows one per split);
  * one handler on the root logger writes through `tqdm.write`, so a log line printed while a
    progress bar is active ends up above the bar instead of in the middle of it.
`verbose=True` keeps everything at INFO and tfds' bars on.

Calling it again replaces the previous setup (it is idempotent).
"""

from __future__ import annotations

import logging
import sys

from absl import logging as absl_logging
from tqdm import tqdm

__all__ = ["LIBRARY_LOGGERS", "TqdmHandler", "setup_logging"]

LIBRARY_LOGGERS = ("absl", "orbax", "tensorflow_datasets", "jax", "jaxlib", "grain", "array_record")

# tfds warns for every builder config that is not predeclared (ours are built from the config),
# and for the empty folder it creates itself before preparing a dataset.
_QUIET_MESSAGES = ("Using custom data configuration", "Variant folder")


class TqdmHandler(logging.Handler):
  """Writes records with `tqdm.write` (on the current `sys.stderr`) so progress bars survive."""

  def emit(self, record: logging.LogRecord) -> None:
    try:
      msg = self.format(record)
      tqdm.write(msg, file=sys.stderr)
    except Exception:  # noqa: BLE001 - logging must never raise
      self.handleError(record)


class _DropNoise(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    try:
      msg = str(record.msg)
    except Exception:  # noqa: BLE001
      return True
    return not msg.startswith(_QUIET_MESSAGES)


def _formatter() -> logging.Formatter:
  # absl's layout (level letter, date, file:line) without thread id and microseconds.
  return logging.Formatter(
      "%(levelname).1s%(asctime)s %(filename)s:%(lineno)d] %(message)s", datefmt="%m%d %H:%M:%S"
  )


def setup_logging(verbose: bool = False) -> logging.Handler:
  """Configures the root, `cn2_jax` and library loggers (see the module docstring).

  Returns the installed handler.
  """
  root = logging.getLogger()
  # absl's handler (installed by absl.app.run) and plain stderr handlers would print each record a
  # second time, past tqdm.
  for old_handler in list(root.handlers):
    if isinstance(old_handler, TqdmHandler) or _is_stderr_handler(old_handler):
      root.removeHandler(old_handler)
  handler = TqdmHandler()
  handler.setFormatter(_formatter())
  if not verbose:
    handler.addFilter(_DropNoise())
  root.addHandler(handler)
  root.setLevel(logging.INFO if verbose else logging.WARNING)
  logging.getLogger("cn2_jax").setLevel(logging.INFO)
  for name in LIBRARY_LOGGERS:
    logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
  # absl keeps its own verbosity; keep it consistent with the logger levels above.
  absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
  if not verbose:
    logging.getLogger("absl").setLevel(logging.WARNING)
  _tfds_progress_bars(verbose)
  return handler


def _is_stderr_handler(handler: logging.Handler) -> bool:
  if type(handler).__name__ == "ABSLHandler":
    return True
  return type(handler) is logging.StreamHandler and getattr(handler, "stream", None) in (
      sys.stderr,
      sys.__stderr__,
  )


def _tfds_progress_bars(enable: bool) -> None:
  try:
    # Start-up time: tensorflow_datasets takes ~0.4 s; main.py sets up logging for every command.
    from tensorflow_datasets.core.utils import tqdm_utils
  except ImportError:
    return
  tqdm_utils.display_progress_bar(enable)
