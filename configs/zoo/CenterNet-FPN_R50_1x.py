"""CenterNet-FPN_R50_1x (official configs/CenterNet-FPN_R50_1x.yaml, base Base-CenterNet-FPN.yaml):
the one-stage CenterNet on R50-FPN P3-P7 with class heatmaps (4-conv towers), 800/1333 test size.

  python main.py --config configs/zoo/CenterNet-FPN_R50_1x.py --workdir runs/cnfpn --mode=eval \
      --config.weights=CenterNet-FPN_R50_1x.pth --config.data.root=/data/coco
"""

from cn2_jax.config import base_config


def get_config():
  c = base_config()  # R50 (MSRA, FrozenBN, FREEZE_AT 2) + FPN P3-P7, the 1x COCO schedule
  c.model.arch = "centernet"  # MODEL.META_ARCHITECTURE: CenterNetDetector
  c.model.backbone = "build_p67_resnet_fpn_backbone"  # MODEL.BACKBONE.NAME
  # MODEL.CENTERNET: the official defaults (4 cls + 4 bbox tower convs, GN, INFERENCE_TH 0.05,
  # NMS 0.6, top 100), and:
  c.model.centernet_detector.more_pos = True  # MODEL.CENTERNET.MORE_POS
  c.data.dataset = "coco/2017"
  c.data.root = "data/coco"
  c.optim.base_lr = 0.01  # SOLVER.BASE_LR (IMS_PER_BATCH 16)
  return c
