"""LVIS_CenterNet2_R50_1x (official configs/LVIS_CenterNet2_R50_1x.yaml, base
Base-CenterNet2.yaml): CenterNet2_R50_1x (R50-FPN P3-P7, CenterNet proposals, 3-stage cascade)
on LVIS v1, 1203 classes (softmax cascade classifiers), repeat-factor sampling, 300 detections
per image at a 0.02 score threshold with NMS 0.5; BGR input, 800/1333 test size.

  python main.py --config configs/zoo/LVIS_CenterNet2_R50_1x.py --workdir runs/lvis --mode=eval \
      --config.weights=LVIS_CenterNet2_R50_1x.pth --config.data.root=/data/datasets
  python -m cn2_jax.convert --src LVIS_CenterNet2_R50_1x.pth --out /ckpt/lvis \
      --config configs/zoo/LVIS_CenterNet2_R50_1x.py
"""

from cn2_jax.config import base_config


def get_config():
  c = base_config()  # Base-CenterNet2.yaml: R50-FPN, CenterNet proposals, 1x recipe
  m = c.model
  m.num_classes = 1203  # MODEL.ROI_HEADS.NUM_CLASSES (CENTERNET.NUM_CLASSES 1203: unused by the
  # proposal-only CenterNet head, which has one agnostic heatmap)
  r = m.roi_heads
  r.score_thresh_test = 0.02  # MODEL.ROI_HEADS.SCORE_THRESH_TEST
  r.nms_thresh_test = 0.5  # MODEL.ROI_HEADS.NMS_THRESH_TEST
  r.detections_per_image = 300  # TEST.DETECTIONS_PER_IMAGE
  d = c.data
  d.dataset = "lvis_v1"  # DATASETS.TRAIN lvis_v1_train, DATASETS.TEST lvis_v1_val
  d.root = "datasets"  # detectron2's datasets/ folder: lvis/lvis_v1_{split}.json and coco/
  d.sampler_train = "RepeatFactorTrainingSampler"  # DATALOADER.SAMPLER_TRAIN
  d.repeat_threshold = 0.001  # DATALOADER.REPEAT_THRESHOLD
  return c
