"""A custom COCO-format folder: ../shared/data/raccoon (200 images, 1 class), CenterNet2 R50.

Any folder with `instances_train.json`, `instances_val.json` (file_name relative to the folder)
works the same way: set data.root, data.train_json, data.val_json and model.num_classes.

  python main.py --config configs/raccoon.py --workdir runs/raccoon \
      --config.init_from=R-50.pkl            # ImageNet backbone, as the official recipe
"""

from cn2_jax.config import base_config


def get_config():
  c = base_config()
  c.model.num_classes = 1
  c.data.dataset = "coco_json"
  c.data.name = "raccoon"
  c.data.root = "../shared/data/raccoon"
  c.data.train_json = "instances_train.json"
  c.data.val_json = "instances_val.json"
  # Smaller images than COCO: short side 480-640, max 800, one padded shape.
  c.data.min_size_train = (480, 512, 544, 576, 608, 640)
  c.data.max_size_train = 800
  c.data.min_size_test = 640
  c.data.max_size_test = 800
  c.data.pad_hw_train = (800, 800)
  c.data.pad_hw_test = (800, 800)
  c.data.max_boxes = 16
  c.train.batch_size = 8
  c.train.eval_batch_size = 4
  c.train.checkpoint_every = 500
  # Official lr 0.02 for batch 16 (optim.reference_batch_size): the linear rule gives 0.01 at
  # batch 8 (docs/training.md §2); it follows --config.train.batch_size automatically.
  c.optim.base_lr = 0.02
  c.optim.warmup_iters = 200
  c.optim.max_iter = 3000
  c.optim.steps = (2000, 2600)
  return c
