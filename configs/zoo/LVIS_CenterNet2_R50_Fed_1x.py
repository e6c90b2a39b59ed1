"""LVIS_CenterNet2_R50_Fed_1x (official configs/LVIS_CenterNet2_R50_Fed_1x.yaml, base
Base-CenterNet2.yaml): LVIS_CenterNet2_R50_1x with sigmoid cross-entropy cascade classifiers and
the federated loss (each stage's loss on the batch's classes + 50 classes drawn by image_count **
0.5; centernet/modeling/roi_heads/fed_loss.py); repeat-factor sampling, 300 detections per image
at a 0.02 score threshold with NMS 0.5; BGR input, 800/1333 test size.

  python main.py --config configs/zoo/LVIS_CenterNet2_R50_Fed_1x.py --workdir runs/lvis_fed \
      --mode=eval --config.weights=LVIS_CenterNet2_R50_Fed_1x.pth \
      --config.data.root=/data/datasets
  python -m cn2_jax.convert --src LVIS_CenterNet2_R50_Fed_1x.pth --out /ckpt/lvis_fed \
      --config configs/zoo/LVIS_CenterNet2_R50_Fed_1x.py

The official checkpoint also holds `roi_heads.box_predictor.{0,1,2}.freq_weight` (the [1203]
image_count ** 0.5 buffer of CustomFastRCNNOutputLayers); this model reads those frequencies
from roi_heads.cat_freq_path instead (tests/test_zoo_configs.py says what the converter does).
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
  r.use_sigmoid_ce = True  # MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE (PRIOR_PROB 0.01: the default)
  r.use_fed_loss = True  # MODEL.ROI_BOX_HEAD.USE_FED_LOSS
  # MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH (centernet/config.py default, relative to the working
  # directory as officially); FED_LOSS_NUM_CAT 50 and FED_LOSS_FREQ_WEIGHT 0.5: the defaults
  r.cat_freq_path = "datasets/lvis/lvis_v1_train_cat_info.json"
  d = c.data
  d.dataset = "lvis_v1"  # DATASETS.TRAIN lvis_v1_train, DATASETS.TEST lvis_v1_val
  d.root = "datasets"  # detectron2's datasets/ folder: lvis/lvis_v1_{split}.json and coco/
  d.sampler_train = "RepeatFactorTrainingSampler"  # DATALOADER.SAMPLER_TRAIN
  d.repeat_threshold = 0.001  # DATALOADER.REPEAT_THRESHOLD
  return c
