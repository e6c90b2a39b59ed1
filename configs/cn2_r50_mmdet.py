"""CenterNet2_R50_1x with the first-stage targets of the MMDetection reproduction
(docs/centernet2.md §3.1, §3.7; docs/training.md §3).

huimlight/mmdet-centernetv2 (on yyz561/mmdetection's `CenterNet2Head`) changed how CenterNet's
positives and heatmap are built, and reports two variants (batch 20, one V100, 90k iterations):

* "original" (default) — 42.8 AP (README), 43.2 AP in a later run with the same config
  (log 20210814_232645):
  - positives deduplicated (one per cell, not one per GT x level): `dedup_positives=True`;
  - FCOS-style non-overlapping level ranges on the same half-diagonal criterion,
    (0, 64), (64, 128), (128, 256), (256, 512), (512, 1e8), instead of the official overlapping
    [0, 80], [64, 160], [128, 320], [256, 640], [512, inf): `soi`.
* "revised" — 42.7 AP: the same plus the port's `original_dis_map=False`: a GT's heatmap peak is
  forced to 1 (an ignored cell) only on the levels where it is assigned; on the other levels the
  peak cell is a down-weighted negative: `all_level_peaks=False`.

  python main.py --config configs/cn2_r50_mmdet.py --workdir runs/cn2_r50_mmdet \\
      --config.data.root=/data/coco --config.init_from=R-50.pkl
  python main.py --config configs/cn2_r50_mmdet.py:revised ...      # the "revised" variant

Everything else is the official recipe (configs/cn2_r50.py). The port's other departures are
NOT reproduced (README table): torchvision R-50 with trainable BN affine, cascade loss weights
1/0.5/0.25 without the 1/3 gradient scale, SmoothL1 (beta 1), re-sampling with GT at every
stage, GIoU on pixel boxes without the +1, a 500-iteration warm-up. Two of its switches ARE
reproduced: proposals clipped to the image (`clip_proposals=True`) and one global gradient L2 norm
clipped at 35 (`optim.clip_norm=35`, no value clip). Its batch of 20 at lr 0.02 (not scaled) is
`--config.train.batch_size=20 --config.optim.reference_batch_size=20`.
"""

from configs import cn2_r50

# FCOS ranges of the port's config (`regress_ranges`), both bounds inclusive as there.
MMDET_SOI = ((0, 64), (64, 128), (128, 256), (256, 512), (512, 100000000))


def get_config(variant: str = "original"):
  variant = variant or "original"
  if variant not in ("original", "revised"):
    raise ValueError(f"cn2_r50_mmdet variant must be 'original' or 'revised', got {variant!r}")
  c = cn2_r50.get_config()
  cn = c.model.centernet
  cn.dedup_positives = True
  cn.soi = MMDET_SOI
  cn.all_level_peaks = variant == "original"
  cn.clip_proposals = True  # the port clips decoded proposals to the image
  c.optim.clip_value = 0.0  # the port clips the global gradient norm instead
  c.optim.clip_norm = 35.0
  return c
