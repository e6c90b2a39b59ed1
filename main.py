"""cn2_jax command line.

  python main.py --config configs/demo.py --workdir runs/demo                  # train + eval
  python main.py --config configs/cn2_r50.py --workdir DIR --mode=eval --config.weights=W.pkl
  python main.py --config configs/demo.py --workdir runs/demo --mode=predict --images=a.jpg,dir/
  python main.py --config configs/demo.py --workdir runs/demo --mode=pseudo_label --images=dir/
  python main.py --helpconfig                     # every config field, its default and meaning

Any config field can be overridden with --config.<field>=<value>; unknown fields are errors.
In --mode=eval|predict|pseudo_label the run's DIR/config.json is the config: only fields given on the command
line (--config.FIELD=...) replace its values, so training overrides need not be repeated.
Errors the user can fix (config, data, weights, missing files; see cn2_jax/errors.py) print one
line `error: ...` and exit with status 1 (2 for command-line errors); --verbose shows library logs
and full tracebacks.
"""

import difflib
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Python config file (get_config()).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, results).")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "predict", "pseudo_label"], "What to run."
)
_IMAGES = flags.DEFINE_list(
    "images",
    [],
    "--mode=predict: image files and/or folders; --mode=pseudo_label: one folder (its images "
    "and those of its subfolders).",
)
_VERBOSE = flags.DEFINE_bool(
    "verbose",
    False,
    "Show library logs (absl, orbax, tfds, jax, grain) " "and full tracebacks of errors.",
)
flags.DEFINE_bool(
    "helpconfig",
    False,
    "Print every config field with its default and meaning " "(from cn2_jax/config.py), then exit.",
)
flags.mark_flags_as_required(["config", "workdir"])


# ------------------------------------------------------------------------------------- errors
def _verbose_in(argv) -> bool:
  """--verbose as given on the command line (usable before / when flag parsing fails)."""
  on = False
  for a in argv[1:]:
    a = a.lstrip("-").lower()
    if a in ("verbose", "verbose=true", "verbose=1"):
      on = True
    elif a in ("noverbose", "verbose=false", "verbose=0"):
      on = False
  return on


def _config_arg(argv) -> str:
  """The --config file name from the command line ('' if absent)."""
  for i, a in enumerate(argv[1:], start=1):
    body = a.lstrip("-")
    if body.startswith("config="):
      return body[len("config=") :].split(":", 1)[0]
    if body == "config" and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
  return ""


def _fail(message: str, status: int = 1):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)


def _schema_paths():
  from cn2_jax.config import base_config

  out = []

  def walk(c, prefix):
    for k in c.keys():
      v = c[k]
      if hasattr(v, "keys"):
        walk(v, f"{prefix}{k}.")
      out.append(f"{prefix}{k}")

  walk(base_config(), "")
  return out


def _unknown_override(argv) -> str:
  """The first --config.FIELD override whose FIELD is not in the schema, with a suggestion."""
  known = _schema_paths()
  for a in argv[1:]:
    body = a.lstrip("-")
    for prefix in ("config.", "noconfig."):
      if body.startswith(prefix):
        path = body[len(prefix) :].split("=", 1)[0]
        if path not in known:
          close = difflib.get_close_matches(path, known, n=1)
          hint = f" (did you mean '{close[0]}'?)" if close else ""
          return (
              f"unknown config field '{path}'{hint}; `python main.py --helpconfig` lists "
              f"the fields"
          )
  return ""


def _parse_flags(argv):
  """absl's flag parsing, with its errors (and ml_collections' override errors) as one line."""
  from cn2_jax import errors

  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if _verbose_in(argv):
      raise
    _fail(f"{errors.one_line(e)} (python main.py --help)", 2)
  except Exception as e:  # noqa: BLE001 - config file / override errors surface here
    if _verbose_in(argv):
      raise
    filename = _config_arg(argv)
    if filename and not os.path.isfile(filename):
      _fail(f"config file not found: {filename}", 2)
    msg = _unknown_override(argv) if isinstance(e, (AttributeError, KeyError)) else ""
    if not msg:
      msg = f"cannot load --config: {type(e).__name__}: {errors.one_line(e)}"
    _fail(msg, 2)


def _config_or_fail():
  """The loaded config; a missing or broken config file is one `error:` line."""
  from cn2_jax import errors
  from cn2_jax.config import validate_config

  filename = config_flags.get_config_filename(flags.FLAGS["config"]).split(":", 1)[0]
  if not os.path.isfile(filename):
    raise errors.InputFileError(f"config file not found: {filename}")
  try:
    cfg = _CONFIG.value
    return validate_config(cfg)
  except (KeyError, ValueError, OSError) as e:
    raise errors.ConfigError(f"{filename}: {errors.one_line(e)}") from e


# ------------------------------------------------------------------------------------- help
def config_help() -> str:
  """Every config field with its default and help: the data of the schema's groups."""
  from cn2_jax import config as config_lib

  return config_lib.help_text()


def _helpconfig_requested(argv) -> bool:
  return any(a.lstrip("-") in ("helpconfig", "helpconfig=true", "helpconfig=1") for a in argv[1:])


# ------------------------------------------------------------------------------------- main
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from cn2_jax import errors
  from cn2_jax.engine import distributed
  from cn2_jax.logging_setup import setup_logging

  if distributed.should_supervise():
    # One process of several (JAX_COORDINATOR_ADDRESS / Slurm / MPI): the job runs in a child
    # that this process watches, so that a peer's death ends it with one `error:` line.
    return distributed.supervise(verbose=_VERBOSE.value)
  setup_logging(verbose=_VERBOSE.value)
  try:
    distributed.initialize(quiet_others=not _VERBOSE.value)  # before any other JAX call
    cfg = _config_or_fail()
    from cn2_jax import app as cn2_app

    if _MODE.value != "train":
      # Eval / predict / pseudo_label use the run's saved config.json; only the fields given on the command line
      # replace its values (cn2_jax.app.run_config).
      cfg = cn2_app.run_config(
          cfg, _WORKDIR.value, config_flags.get_override_values(flags.FLAGS["config"])
      )
    if _MODE.value == "train":
      cn2_app.train(cfg, _WORKDIR.value)
    elif _MODE.value == "eval":
      cn2_app.evaluate(cfg, _WORKDIR.value)
    elif _MODE.value == "pseudo_label":
      cn2_app.pseudo_label(cfg, _WORKDIR.value, list(_IMAGES.value))
    else:
      images = list(_IMAGES.value) or [p for p in cfg.predict.images.split(",") if p]
      cn2_app.predict(cfg, _WORKDIR.value, images)
  except Exception as e:  # noqa: BLE001 - user errors become one line, the rest re-raises
    if distributed.launch() is not None:
      distributed.exit_after_error(e, verbose=_VERBOSE.value)  # ends the process at once
    if _VERBOSE.value or not errors.is_user_error(e):
      raise
    _fail(errors.one_line(e))


if __name__ == "__main__":
  if _helpconfig_requested(sys.argv):
    print(config_help())
    sys.exit(0)
  app.run(main, flags_parser=_parse_flags)
