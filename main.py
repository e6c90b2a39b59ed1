"""cn2_jax command line.

  python main.py --config configs/demo.py --workdir runs/demo                  # train + eval
  python main.py --config configs/cn2_r50.py --workdir DIR --mode=eval --config.weights=W.pkl
  python main.py --config configs/demo.py --workdir runs/demo --mode=predict --images=a.jpg,b.png

Any config field can be overridden with --config.<field>=<value>; unknown fields are errors.
"""
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, results).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "predict"], "What to run.")
_IMAGES = flags.DEFINE_list("images", [], "--mode=predict: image paths.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from cn2_jax.engine import loop
  loop.maybe_initialize_distributed()
  from cn2_jax import app as cn2_app
  from cn2_jax.config import validate_config
  logging.set_verbosity(logging.INFO)
  cfg = validate_config(_CONFIG.value)
  if _MODE.value == "train":
    cn2_app.train(cfg, _WORKDIR.value)
  elif _MODE.value == "eval":
    cn2_app.evaluate(cfg, _WORKDIR.value)
  else:
    images = list(_IMAGES.value) or [p for p in cfg.predict.images.split(",") if p]
    cn2_app.predict(cfg, _WORKDIR.value, images)


if __name__ == "__main__":
  app.run(main)
