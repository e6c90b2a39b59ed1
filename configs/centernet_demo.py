"""Demo: a small one-stage CenterNet (centerX family) trained from scratch on the synthetic shapes.

  python main.py --config configs/centernet_demo.py --workdir runs/centernet_demo

The synthetic shapes of configs/demo.py (4 shape classes, 128-192 px images, generated
deterministically under <workdir>/synthetic on first use, no download), with 1024 training images
instead of 256. centerX's architecture (ResNet-18 C5 -> 3
DeconvLayers -> cls / wh / reg heads, trainable BatchNorm) at toy width: a 16-wide ResNet-18 and a
(64, 32, 32) neck, 2600 steps at batch 8 (cheap steps: many of them learn the shapes' classes
better than fewer steps of a wider model; more images beat more epochs: 256 images gave AP 0.466
at 1900 steps and 0.505 at 2600; 1024 images 0.512 at 2400, 0.548 at 2600, 0.557 at 2800 and
0.563 at 3000, the latter in 4m44s, too close to the 5-minute budget on a machine whose speed
varies by 10%). Two departures from centerX's recipe, both because there are no ImageNet
weights here: the neck uses plain 3x3 convs (DCN with its non-zero offset init, trained from
scratch, stalled: AP 0.011 after 900 steps against 0.256 without), and Adam (SGD 0.02 collapsed
the heatmap; 0.005 learned slowly). Sized to train and evaluate in a few minutes on a 2-core CPU.
"""

from cn2_jax.config import base_config
from configs import demo


def get_config():
  c = base_config()
  m = c.model
  m.arch = "onestage"
  m.num_classes = 4
  m.resnet_depth = 18
  m.resnet_width = 16
  o = m.onestage
  o.deconv_channels = (64, 32, 32)
  o.use_deform = False
  o.max_detections = 20

  c.data = demo.get_config().data  # the synthetic shapes, sizes and canvas of configs/demo.py,
  c.data.synthetic_num_train = 1024  # 4x its training images (AP: 256 -> 0.505 at 2600 steps)

  s = c.optim
  s.optimizer = "adam"
  s.base_lr = 0.003
  s.weight_decay = 0.0
  s.reference_batch_size = 8  # tuned at its own batch of 8 (the LR scales if you change it)
  s.warmup_iters = 100
  s.warmup_factor = 0.001
  s.max_iter = 2600
  s.steps = (2130, 2470)
  # The whole 192x192 batch canvas counts (padding included in BatchNorm statistics and heatmap
  # negatives), not the batch's official canvas (centerX's per-batch padding, the family's
  # default): with this recipe's aspect-grouped, one-scale-per-batch batches the official canvas
  # holds almost no padding, and training on it ended far lower (seed 1, cosine + EMA: AP 0.358
  # against 0.604; seed 0: 0.476 against 0.510; bench/RESULTS.md "One-stage canvas").
  o.mask_canvas = False

  c.train = demo.get_config().train

  return c
