"""CenterNet2_R50_1x: the official COCO recipe (configs/Base-CenterNet2.yaml; docs/training.md §1,
model: docs/centernet2.md §2-§6).

  python main.py --config configs/cn2_r50.py --workdir runs/cn2_r50 --config.data.root=/data/coco
  python main.py --config configs/cn2_r50.py --workdir runs/cn2_r50 --mode=eval \
      --config.weights=CenterNet2_R50_1x.pth --config.data.root=/data/coco

ResNet-50 (MSRA, FrozenBN, FREEZE_AT=2) + FPN P3-P7, CenterNet proposals (4000/2000 train,
1000/256 test, NMS 0.9), 3-stage cascade at IoU 0.6/0.7/0.8, 90k iterations at batch 16,
SGD lr 0.02 momentum 0.9 wd 1e-4, warm-up 4000, steps 60k/80k, element-wise grad clip 1.0,
short side 640-800 (max 1333), flip; test 800/1333. Initialise from the ImageNet R-50.pkl
(`--config.init_from=R-50.pkl`) as the official recipe does.
"""

from cn2_jax.config import base_config


def get_config():
  c = base_config()
  c.data.dataset = "coco/2017"
  c.data.root = "data/coco"
  c.data.train_split = "train"
  c.data.eval_split = "val"
  return c
