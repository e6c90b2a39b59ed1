"""CenterNet2_R50_1x (official configs/CenterNet2_R50_1x.yaml = Base-CenterNet2.yaml, nothing
overridden): ResNet-50 (MSRA, FrozenBN, FREEZE_AT 2) + FPN P3-P7, CenterNet proposals, 3-stage
cascade; BGR input, 800/1333 test size. The project's reference recipe, configs/cn2_r50.py,
reused unchanged (its docstring lists every setting).

  python main.py --config configs/zoo/CenterNet2_R50_1x.py --workdir runs/cn2 --mode=eval \
      --config.weights=CenterNet2_R50_1x.pth --config.data.root=/data/coco
  python -m cn2_jax.convert --src CenterNet2_R50_1x.pth --out /ckpt/cn2_r50 \
      --config configs/zoo/CenterNet2_R50_1x.py
"""

from configs import cn2_r50


def get_config():
  # Base-CenterNet2.yaml: MODEL.BACKBONE.NAME build_p67_resnet_fpn_backbone, RESNETS.DEPTH 50,
  # ROI_HEADS.NAME CustomCascadeROIHeads (IOUS 0.6/0.7/0.8), CENTERNET 1000/256 test top-k,
  # SOLVER 0.02 at 16 images, steps 60k/80k of 90k, warm-up 4000, clipping on: all base_config()
  # defaults; DATASETS coco_2017_train / coco_2017_val.
  return cn2_r50.get_config()
