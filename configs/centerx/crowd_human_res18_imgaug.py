"""centerX `yamls/crowd_human/crowd_human_res18_imgaug.yaml` (CPFLAME/centerX): CrowdHuman ablation:
resdcn18 with imgaug: 29.6 AP (README 'crowd human' table). **Departure**: centerX's imgaug
(MODEL.CENTERNET.IMGAUG_PROB 0.5: up to 5 of superpixels, blurs, sharpen, emboss, add, multiply,
contrast, greyscale and a perspective transform, on the image only, so its perspective misaligns
the boxes) is replaced by this project's box-correct perspective warp (`data.perspective`); the
pixel-only ops are not implemented.

  python main.py --config configs/centerx/crowd_human_res18_imgaug.py \
      --workdir runs/crowd_human_res18_imgaug --config.data.root=/data/CrowdHuman \
      --config.init_from=resnet18-5c106cde.pth

As the yaml (`_BASE_: crowd_human_res18.yaml`), this starts from
configs/centerx/crowd_human_res18.py and changes only what the yaml sets. Every field below names
the yaml key it comes from (or the centerX / detectron2 default the yaml leaves in place);
docs/onestage.md §7 lists all recipes and the departures.
"""

from configs.centerx import load


def get_config():
  c = load("crowd_human_res18")  # _BASE_: "crowd_human_res18.yaml"
  # crowd_human_res18_imgaug.yaml MODEL.CENTERNET.IMGAUG_PROB 0.5 (imgaug PerspectiveTransform scale
  # up to 0.1); departure: box-correct warp on every image, no other imgaug op
  c.data.perspective = 0.1
  return c
