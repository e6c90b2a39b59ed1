"""centerX's COCO recipe for the one-stage CenterNet, ResNet-18 + DCNv2 neck, 70 epochs
(`yamls/coco/centernet_res18_coco_0.5.yaml`; docs/onestage.md §1.1, §5.1-§5.4): 27.9 AP in
centerX.

  python main.py --config configs/centernet_r18_coco.py --workdir runs/cx_r18 \
      --config.data.root=/data/coco --config.init_from=resnet18-5c106cde.pth

`init_from` is torchvision's ImageNet ResNet-18 (`resnet18-*.pth`, read without torch). The
schedule is in epochs (iterations = epochs x images // batch), SGD 0.02 at batch 64 with a 1-epoch
warm-up, constant, then cosine from 50% of training; train images: RandomCrop relative_range 0.6,
short side {384, 448, 512} with the long side <= 512, flip, centerX colour jitter. Evaluation at
the original resolution (min_size_test 0), each image padded to a multiple of 32.
"""

from cn2_jax.config import base_config


def get_config():
  c = base_config()
  m = c.model
  m.arch = "onestage"
  m.resnet_depth = 18
  m.num_classes = 80
  # model.onestage: the schema defaults are centerX's R18 settings (DCNv2, (256, 128, 64) neck).

  d = c.data
  d.dataset = "coco/2017"
  d.min_size_train = (384, 448, 512)
  d.max_size_train = 512
  d.min_size_test = 0  # original resolution
  d.max_size_test = 100000
  d.crop_relative_range = (0.6, 0.6)
  d.color_aug = "centerx"
  d.max_boxes = 128  # model.onestage.tensor_dim

  o = c.optim
  o.optimizer = "sgd"
  o.base_lr = 0.02
  o.reference_batch_size = 64  # centerX: 4 GPUs x 16
  o.epochs = 70
  o.warmup_iters = 1  # epochs (optim.epochs > 0)
  o.schedule = "warmup_cosine_annealing"
  o.cosine_decay_iter = 0.5
  o.min_lr = 1e-8
  o.steps = ()  # unused by the cosine schedule
  o.clip_value = 1.0

  t = c.train
  t.batch_size = 64
  t.eval_batch_size = 16
  t.checkpoint_every = 5000
  return c
