"""centerX's COCO recipe for the one-stage CenterNet, ResNet-50 + DCNv2 neck, 70 epochs
(`centernet_res50_coco_0.5.yaml`; docs/onestage.md §1.1, §5.2): 33.2 AP in centerX.

  python main.py --config configs/centernet_r50_coco.py --workdir runs/cx_r50 \
      --config.data.root=/data/coco --config.init_from=resnet50-19c8e357.pth

As configs/centernet_r18_coco.py, with ResNet-50 C5 (2048 channels into the neck), SGD 0.01 and
the cosine from 60% of training, gradient clip 1.0 (element-wise).
"""

from configs import centernet_r18_coco


def get_config():
  c = centernet_r18_coco.get_config()
  c.model.resnet_depth = 50
  c.optim.base_lr = 0.01
  c.optim.cosine_decay_iter = 0.6
  c.optim.clip_value = 1.0
  return c
