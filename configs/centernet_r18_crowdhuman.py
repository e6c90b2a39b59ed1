"""centerX's CrowdHuman recipe: one-stage CenterNet ResNet-18 + DCNv2, 80 epochs
(`yamls/crowd_human/crowd_human_res18.yaml`; docs/onestage.md §1.2, §5.4; docs/datasets.md §3):
31.2 COCO-style AP on the visible-body boxes in centerX.

  python main.py --config configs/centernet_r18_crowdhuman.py --workdir runs/cx_ch \
      --config.data.root=/data/CrowdHuman --config.init_from=resnet18-5c106cde.pth

`data.root` holds annotation_{train,val}.odgt and Images/. SGD 0.02 at batch 64, warm-up 1 epoch,
x0.1 at epochs 50 and 62. Images resized to a long side of 512 (train and test). Evaluation writes
the COCO metrics plus CrowdHuman's AP50, MR^-2 and JI (eval/metrics.json). "mask" regions and
extra.ignore boxes are ignore regions (centerX dropped them; README departures).
"""

from cn2_jax.config import base_config


def get_config():
  c = base_config()
  m = c.model
  m.arch = "onestage"
  m.resnet_depth = 18
  m.num_classes = 1
  m.onestage.max_detections = 100
  m.onestage.tensor_dim = 512  # crowded images: keep every person in the regression targets

  d = c.data
  d.dataset = "crowdhuman"
  d.crowdhuman_box = "vbox"  # as centerX ("fbox" is the official benchmark's box)
  d.min_size_train = (512,)
  d.max_size_train = 512
  d.min_size_test = 512
  d.max_size_test = 512
  d.max_boxes = 512
  d.color_aug = "centerx"

  o = c.optim
  o.optimizer = "sgd"
  o.base_lr = 0.02
  o.reference_batch_size = 64
  o.epochs = 80
  o.warmup_iters = 1  # epochs
  o.schedule = "multistep"
  o.steps = (50, 62)  # epochs
  o.clip_value = 1.0

  t = c.train
  t.batch_size = 64
  t.eval_batch_size = 16
  return c
