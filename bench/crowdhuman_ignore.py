"""The ignore-region fix measured on a small CrowdHuman-format run (issue 25 item 1): what training
the `extra.ignore` objects as background (before the fix) costs against leaving them out of the
heatmap negatives (now).

  JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python bench/crowdhuman_ignore.py --workdir W \
      [--steps 800] [--seed 0] [--ignore-fraction 0.4] [--source ../shared/data/bccd]

There is no CrowdHuman data here, so the script writes a CrowdHuman-format copy of a real COCO
dataset (default: BCCD, blood-cell images, MIT; every object becomes a `person`, `vbox` = `fbox` =
`hbox` = its box) in two variants of the training split, both read by `data.dataset=crowdhuman`:

  ignore   a fixed random `--ignore-fraction` of the training objects (the same ones in both
           variants, drawn with `--seed`) carry `extra.ignore = 1`: the loader makes them crowd
           boxes, and the one-stage heatmap loss gives their cells no negative term (the fix);
  dropped  those objects are not in the file at all: they are background, as every ignore region
           was before the fix (the targets had no ignore mask, so a crowd box's cells were
           negatives like any unlabelled pixel).

The validation split (the same file in both) has every object as a `person`. Each variant trains
the same one-stage model (configs/centernet_demo.py's 16-wide ResNet-18 and neck, one class, the
BCCD images at 320 px, Adam with a cosine schedule and a 0.999 weight EMA, the whole canvas
counted (`mask_canvas=False`, as the demo), `--steps` at batch 8, the same seed) and is evaluated at its last
step with the default (official) protocol: COCO AP / AP50 and the CrowdHuman toolkit's AP50 and
MR^-2. The `ignore` run is then evaluated again with `eval.protocol=centerx`. Prints a markdown
table and writes W/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SOURCE = os.path.join(os.path.dirname(ROOT), "shared", "data", "bccd")
METRICS = ("AP", "AP50", "crowdhuman_AP50", "crowdhuman_MR-2")


def odgt_records(coco: dict, ignored: set, drop_ignored: bool) -> list:
  """CrowdHuman records of a COCO dict: one per image (ID = file stem), every annotation a
  `person` with `extra.ignore` 1 when its id is in `ignored` (or left out, `drop_ignored`)."""
  by_image = {img["id"]: [] for img in coco["images"]}
  for ann in coco["annotations"]:
    by_image[ann["image_id"]].append(ann)
  records = []
  for img in coco["images"]:
    boxes = []
    for ann in by_image[img["id"]]:
      if ann["id"] in ignored and drop_ignored:
        continue
      box = [float(v) for v in ann["bbox"]]
      boxes.append(
          dict(
              tag="person",
              fbox=box,
              vbox=box,
              hbox=box,
              extra=dict(ignore=int(ann["id"] in ignored), box_id=int(ann["id"])),
              head_attr=dict(ignore=0),
          )
      )
    records.append(dict(ID=os.path.splitext(os.path.basename(img["file_name"]))[0], gtboxes=boxes))
  return records


def write_dataset(source: str, root: str, ignored: set, drop_ignored: bool) -> None:
  """`root/annotation_{train,val}.odgt` and `root/Images/<ID>.jpg` (links to the source images)."""
  os.makedirs(os.path.join(root, "Images"), exist_ok=True)
  for split in ("train", "val"):
    with open(os.path.join(source, f"instances_{split}.json")) as f:
      coco = json.load(f)
    records = odgt_records(coco, ignored if split == "train" else set(), drop_ignored)
    with open(os.path.join(root, f"annotation_{split}.odgt"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
    for img in coco["images"]:
      link = os.path.join(root, "Images", os.path.basename(img["file_name"]))
      if not os.path.lexists(link):
        os.symlink(os.path.abspath(os.path.join(source, img["file_name"])), link)


def pick_ignored(source: str, fraction: float, seed: int) -> set:
  """The training annotation ids flagged `extra.ignore` (a fixed random fraction)."""
  with open(os.path.join(source, "instances_train.json")) as f:
    ids = sorted(a["id"] for a in json.load(f)["annotations"])
  rng = np.random.default_rng(seed)
  return set(int(i) for i in rng.choice(ids, size=int(round(fraction * len(ids))), replace=False))


def overrides(root: str, steps: int, seed: int) -> list:
  """main.py flags: configs/centernet_demo.py's model and optimiser on the CrowdHuman-format copy."""
  return [
      "--config.data.dataset=crowdhuman",
      f"--config.data.root={root}",
      "--config.data.name=",
      "--config.data.crowdhuman_box=vbox",
      "--config.data.crowdhuman_ignore_as=ignore",
      "--config.model.num_classes=1",
      "--config.model.onestage.max_detections=100",
      "--config.data.min_size_train=(256,288,320)",
      "--config.data.max_size_train=427",
      "--config.data.min_size_test=320",
      "--config.data.max_size_test=427",
      "--config.data.pad_hw_train=(320,448)",
      "--config.data.pad_hw_test=(320,448)",
      "--config.data.max_boxes=64",
      f"--config.optim.max_iter={steps}",
      "--config.optim.schedule=cosine",
      "--config.ema.decay=0.999",
      "--config.model.onestage.mask_canvas=False",
      f"--config.seed={seed}",
  ]


def run(args: list, log_path: str) -> float:
  t0 = time.time()
  with open(log_path, "w") as log:
    rc = subprocess.call(
        [
            sys.executable,
            os.path.join(ROOT, "main.py"),
            "--config",
            os.path.join(ROOT, "configs", "centernet_demo.py"),
        ]
        + args,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
  if rc:
    raise SystemExit(f"error: main.py failed (exit {rc}); see {log_path}")
  return time.time() - t0


def read_metrics(workdir: str) -> dict:
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    return json.load(f)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument(
      "--source", default=DEFAULT_SOURCE, help="a COCO dataset: instances_{train,val}.json"
  )
  ap.add_argument("--steps", type=int, default=800)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--ignore-fraction", type=float, default=0.4)
  args = ap.parse_args()
  ignored = pick_ignored(args.source, args.ignore_fraction, args.seed)
  results = dict(settings=vars(args), ignored_objects=len(ignored), runs={})
  for variant in ("dropped", "ignore"):
    root = os.path.join(args.workdir, "data", variant)
    write_dataset(args.source, root, ignored, drop_ignored=variant == "dropped")
    wd = os.path.join(args.workdir, "runs", variant)
    flags = ["--workdir", wd] + overrides(root, args.steps, args.seed)
    seconds = run(flags, os.path.join(args.workdir, f"{variant}.log"))
    results["runs"][variant] = dict(official=read_metrics(wd), seconds=round(seconds))
    if variant == "ignore":
      run(
          flags + ["--mode=eval", "--config.eval.protocol=centerx"],
          os.path.join(args.workdir, "ignore_centerx_eval.log"),
      )
      results["runs"][variant]["centerx"] = read_metrics(wd)
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  print(
      f"{len(ignored)} of the training objects flagged extra.ignore; {args.steps} steps, seed {args.seed}"
  )
  print("| training set | protocol | " + " | ".join(METRICS) + " | train + eval s |")
  print("|---|---|" + "---|" * (len(METRICS) + 1))
  rows = [
      ("dropped (before the fix)", "official", "dropped"),
      ("ignore (the fix)", "official", "ignore"),
      ("ignore (the fix)", "centerx", "ignore"),
  ]
  for label, protocol, variant in rows:
    m = results["runs"][variant][protocol]
    cells = " | ".join(f"{m.get(k, float('nan')):.3f}" for k in METRICS)
    secs = results["runs"][variant]["seconds"] if protocol == "official" else ""
    print(f"| {label} | {protocol} | {cells} | {secs} |")


if __name__ == "__main__":
  main()
