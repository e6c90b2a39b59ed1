"""A CPU-sized one-stage CenterNet on the raccoon folder (../shared/data/raccoon), from scratch.

  python main.py --config configs/centernet_raccoon.py --workdir runs/centernet_raccoon

The one-stage counterpart of configs/raccoon_small.py: the same data settings (short side
256-320, max 416), the model of configs/centernet_demo.py with one class. About 10 minutes on a
2-core CPU; without ImageNet weights expect a modest AP: a smoke run on real images.
"""

from configs import centernet_demo
from configs import raccoon_small


def get_config():
  c = raccoon_small.get_config()  # the data and loop settings of the CenterNet2 run
  demo = centernet_demo.get_config()
  c.model = demo.model
  c.model.num_classes = 1
  c.optim = demo.optim
  c.optim.reference_batch_size = 4
  c.optim.warmup_iters = 50
  c.optim.max_iter = 600
  c.optim.steps = (480, 560)
  return c
