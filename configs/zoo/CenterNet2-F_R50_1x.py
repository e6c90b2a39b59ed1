"""CenterNet2-F_R50_1x (official configs/CenterNet2-F_R50_1x.yaml, base Base-CenterNet2.yaml):
CenterNet2_R50_1x with one Faster R-CNN second stage instead of the cascade.

  python main.py --config configs/zoo/CenterNet2-F_R50_1x.py --workdir runs/cn2f --mode=eval \
      --config.weights=CenterNet2-F_R50_1x.pth --config.data.root=/data/coco
"""

from cn2_jax.config import base_config


def get_config():
  c = base_config()  # Base-CenterNet2.yaml: R50-FPN, CenterNet proposals, 1x COCO recipe
  r = c.model.roi_heads
  r.name = "CustomROIHeads"  # ROI_HEADS.NAME (StandardROIHeads + probabilistic score)
  r.iou_thresholds = (0.6,)  # ROI_HEADS.IOU_THRESHOLDS: [0.6] (Base-CenterNet2.yaml)
  r.box_weights = ((10.0, 10.0, 5.0, 5.0),)  # ROI_BOX_HEAD.BBOX_REG_WEIGHTS (detectron2 default)
  c.data.dataset = "coco/2017"
  c.data.root = "data/coco"
  return c
