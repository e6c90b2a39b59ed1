"""A CPU-sized CenterNet2 on the raccoon folder (../shared/data/raccoon), trained from scratch.

  python main.py --config configs/raccoon_small.py --workdir runs/raccoon_small

Same data settings as configs/raccoon.py at smaller images (short side 256-320, max 416), with the
demo's toy-width model (ResNet-18/GN at width 32, 64-channel FPN). About 10 minutes on a 2-core
CPU; without ImageNet weights expect a modest AP — it is a smoke run on real images, not a result.
"""

from configs import demo
from configs import raccoon


def get_config():
  c = raccoon.get_config()
  small = demo.get_config()
  c.model = small.model
  c.model.num_classes = 1
  c.data.min_size_train = (256, 288, 320)
  c.data.max_size_train = 416
  c.data.min_size_test = 320
  c.data.max_size_test = 416
  c.data.pad_hw_train = (416, 416)
  c.data.pad_hw_test = (416, 416)
  c.data.max_boxes = 8
  c.data.num_workers = 0
  c.train.batch_size = 4
  c.train.eval_batch_size = 8
  c.train.log_every = 25
  c.train.checkpoint_every = 250
  # Official lr 0.02 for batch 16: 0.005 at batch 4 by the linear rule (optim.reference_batch_size).
  # Unscaled (issue 9) it made no progress in 300 steps on raccoon (seed 1) and blew up (finite loss
  # 2 -> 2e6) on another small set; at 0.08 it diverges within 30 steps.
  c.optim.base_lr = 0.02
  c.optim.warmup_iters = 50
  c.optim.warmup_factor = 0.001
  c.optim.max_iter = 500
  c.optim.steps = (400, 460)
  return c
