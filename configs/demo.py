"""Demo: a small CenterNet2 trained from scratch on the generated synthetic shapes dataset.

  python main.py --config configs/demo.py --workdir runs/demo

The dataset (4 shape classes, 128-192 px images, written in COCO format under
<workdir>/synthetic) is generated deterministically on first use, so no download is needed.
Same architecture as CenterNet2 (CenterNet proposals + 3-stage cascade + probabilistic
scores) at toy width: ResNet-18 with GroupNorm (no ImageNet weights to freeze), 64-channel FPN,
2-conv CenterNet tower, 256-d box heads, fewer proposals/ROIs. Sized to train and evaluate in a
few minutes on a 2-core CPU.
"""

from cn2_jax.config import base_config


def get_config():
  c = base_config()
  m = c.model
  m.num_classes = 4
  m.resnet_depth = 18
  m.resnet_width = 32
  m.resnet_norm = "GN"
  m.freeze_at = 0
  m.input_format = "RGB"
  m.pixel_mean = (123.675, 116.28, 103.53)
  m.pixel_std = (58.395, 57.12, 57.375)
  m.fpn_channels = 64
  m.centernet.num_convs = 2
  m.centernet.pre_nms_topk_train = 256
  m.centernet.post_nms_topk_train = 128
  m.centernet.pre_nms_topk_test = 256
  m.centernet.post_nms_topk_test = 64
  m.roi_heads.batch_size_per_image = 64
  m.roi_heads.fc_dim = 256
  m.roi_heads.detections_per_image = 20
  # Fixed 2x2 ROIAlign sampling: a toy trained from scratch on the CPU, no official weights
  # involved; the official adaptive mode (0) costs more compile and step time here.
  m.roi_heads.sampling_ratio = 2

  d = c.data
  d.dataset = "synthetic"
  d.name = "synthetic_shapes"
  d.root = ""  # default: <workdir>/synthetic
  d.min_size_train = (128, 144, 160, 176, 192)
  d.max_size_train = 192
  d.min_size_test = 160
  d.max_size_test = 192
  d.pad_hw_train = (192, 192)
  d.pad_hw_test = (192, 192)
  d.max_boxes = 8
  d.num_workers = 0
  d.synthetic_num_train = 256
  d.synthetic_num_val = 64

  o = c.optim
  o.base_lr = 0.02
  o.reference_batch_size = 8  # tuned at its own batch of 8 (the LR scales if you change it)
  o.warmup_iters = 100
  o.warmup_factor = 0.001
  o.max_iter = 600
  o.steps = (450, 540)

  t = c.train
  t.batch_size = 8
  t.eval_batch_size = 16
  t.log_every = 50
  t.checkpoint_every = 500
  t.keep_checkpoints = 2
  return c
