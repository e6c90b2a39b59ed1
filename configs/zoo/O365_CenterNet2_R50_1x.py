"""O365_CenterNet2_R50_1x (official configs/O365_CenterNet2_R50_1x.yaml, base
Base-CenterNet2.yaml): CenterNet2_R50_1x (R50-FPN P3-P7, CenterNet proposals, 3-stage cascade)
on Objects365 v1, 365 classes, class-aware sampling, 300 detections per image; BGR input,
800/1333 test size.

  python main.py --config configs/zoo/O365_CenterNet2_R50_1x.py --workdir runs/o365 --mode=eval \
      --config.weights=O365_CenterNet2_R50_1x.pth --config.data.root=/data/objects365
  python -m cn2_jax.convert --src O365_CenterNet2_R50_1x.pth --out /ckpt/o365 \
      --config configs/zoo/O365_CenterNet2_R50_1x.py
"""

from cn2_jax.config import base_config


def get_config():
  c = base_config()  # Base-CenterNet2.yaml: R50-FPN, CenterNet proposals, 1x recipe
  m = c.model
  m.num_classes = 365  # MODEL.ROI_HEADS.NUM_CLASSES (CENTERNET.NUM_CLASSES 365: unused by the
  # proposal-only CenterNet head, which has one agnostic heatmap)
  m.roi_heads.detections_per_image = 300  # TEST.DETECTIONS_PER_IMAGE
  d = c.data
  d.dataset = "objects365"  # DATASETS.TRAIN objects365_train, DATASETS.TEST objects365_val
  d.root = "datasets/objects365"  # annotations/objects365_{split}.json and {split}/ images
  d.sampler_train = "ClassAwareSampler"  # DATALOADER.SAMPLER_TRAIN
  return c
