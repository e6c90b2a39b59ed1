"""centerX's ignore_unlabel baseline for a person + face detector over two partially labelled
datasets (`yamls/person_face/person_face_res18_ignore_unlabel.yaml`; docs/onestage.md §4.5; row 5
of docs/onestage.md §1.3): CrowdHuman (persons only) and WIDER Face (faces only) mixed, one
ResNet-18 + DCNv2 one-stage CenterNet with 2 classes: person = channel 0, face = channel 1. In the
focal loss an (image, class) channel without any box of that class gets no negative terms
(`model.onestage.ignore_unlabel`), so a CrowdHuman image does not teach "no face here" and a
WIDER image does not teach "no person here". centerX: 29.1 AP CrowdHuman / 24.2 AP WIDER, 140 ep.

  python main.py --config configs/person_face_mix_ignore_unlabel.py:/data/CrowdHuman,/data/WIDER \
      --workdir runs/person_face_ignore --config.init_from=resnet18-5c106cde.pth

The config argument (after ':') is "CROWDHUMAN_ROOT,WIDER_ROOT"; without it the roots are the
placeholders /path/to/CrowdHuman and /path/to/WIDER_FACE (`--config.data.root=...` sets the
CrowdHuman one; the WIDER one is in `data.mixture` and `data.extra_eval`). CrowdHuman's root holds
annotation_{train,val}.odgt and Images/; WIDER's wider_face_split/ and WIDER_{train,val}/images.

Data (cn2_jax/data/mixture.py): `data` is CrowdHuman (vbox persons, label 0 -> channel 0);
`data.mixture` adds WIDER Face train (label 0 -> channel 1). Images are drawn per slot with
probability proportional to the weights, here the dataset sizes (15000 : 12880), which is what
centerX's concatenated lists give; one epoch = the images of both. Evaluation: CrowdHuman val on
channel 0 (eval/metrics.json "AP", ... plus CrowdHuman's AP50 / MR^-2 / JI), then WIDER Face val
on channel 1 ("wider_face/AP", ...; COCO-style AP, not the official easy / medium / hard).

Departures / unknowns: the person_face yamls' optimiser and crop are not published; this uses the
140-epoch CrowdHuman KD schedule (SGD 0.02 at batch 64, x0.1 at epochs 90 and 120;
docs/onestage.md §4.2) and the person / face resize (short side 384, long side <= 640;
docs/onestage.md §5.4), wh normalised as centerX's code does (NORM_WH) with weight 10, as the
person/face configs (docs/onestage.md §3.4). centerX's face BOX_MINSIZE 5 is not implemented.
"""

from cn2_jax.config import base_config

PLACEHOLDER_ROOTS = ("/path/to/CrowdHuman", "/path/to/WIDER_FACE")


def roots(arg: str = "") -> tuple:
  """(CrowdHuman root, WIDER Face root) from the config argument "CROWDHUMAN,WIDER"."""
  given = [r.strip() for r in (arg or "").split(",")] if arg else []
  if len(given) > 2:
    raise ValueError(f"expected 'CROWDHUMAN_ROOT,WIDER_ROOT', got {arg!r}")
  return tuple(given[i] if i < len(given) and given[i] else PLACEHOLDER_ROOTS[i] for i in (0, 1))


def person_face_data(c, arg: str = "") -> None:
  """CrowdHuman persons (channel 0) + WIDER faces (channel 1), each evaluated on its channel."""
  crowdhuman, wider = roots(arg)
  d = c.data
  d.dataset = "crowdhuman"
  d.root = crowdhuman
  d.crowdhuman_box = "vbox"  # as centerX
  d.mix_weight = 15000.0  # CrowdHuman train images: weights proportional to the sizes
  d.channel_offset = 0
  wider_face = {"dataset": "wider_face", "root": wider, "channel_offset": 1}
  d.mixture = (dict(wider_face, weight=12880.0),)  # WIDER Face train images
  d.extra_eval = (dict(wider_face, name="wider_face"),)
  d.min_size_train = (384,)
  d.max_size_train = 640
  d.min_size_test = 384
  d.max_size_test = 640
  d.max_boxes = 512
  d.color_aug = "centerx"


def get_config(arg: str = ""):
  c = base_config()
  m = c.model
  m.arch = "onestage"
  m.resnet_depth = 18
  m.num_classes = 2  # person, face
  m.onestage.tensor_dim = 512  # crowded images: keep every person in the regression targets
  m.onestage.norm_wh = "centerx"
  m.onestage.wh_weight = 10.0
  m.onestage.ignore_unlabel = True  # centerX LOSS.IGNORE_UNLABEL (docs/onestage.md §4.5)
  person_face_data(c, arg)

  o = c.optim
  o.optimizer = "sgd"
  o.base_lr = 0.02
  o.reference_batch_size = 64
  o.epochs = 140
  o.warmup_iters = 1  # epochs
  o.schedule = "multistep"
  o.steps = (90, 120)  # epochs
  o.clip_value = 1.0

  t = c.train
  t.batch_size = 64
  t.eval_batch_size = 16
  return c
