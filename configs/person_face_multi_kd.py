"""centerX's multi-teacher distillation without labels (woGT) into one person + face student
(`yamls/person_face/*multi_KD.yaml`; docs/onestage.md §4.2, §4.3, §1.3 row 7): two frozen one-stage
teachers, a person model (CrowdHuman) and a face model (WIDER Face), distilled into one ResNet-18
+ DCNv2 student with 2 classes (person = channel 0 from teacher 0, face = channel 1 from teacher 1,
`kd.cls_index = (1, 2)`) over both image sets, with no GT loss. centerX: 31.3 AP CrowdHuman /
32.1 AP WIDER (140 ep, ImageNet init).

  # 1. the teachers (any one-stage runs with 1 class each and this config's input settings)
  python main.py --config configs/centernet_r18_crowdhuman.py --workdir runs/person_teacher \
      --config.data.root=/data/CrowdHuman --config.init_from=resnet18-5c106cde.pth
  python main.py --config configs/centernet_r18_crowdhuman.py --workdir runs/face_teacher \
      --config.data.dataset=wider_face --config.data.root=/data/WIDER \
      --config.init_from=resnet18-5c106cde.pth
  # 2. the student
  python main.py --config configs/person_face_multi_kd.py:/data/CrowdHuman,/data/WIDER \
      --workdir runs/person_face_kd --config.init_from=resnet18-5c106cde.pth \
      --config.kd.teacher_workdirs="('runs/person_teacher', 'runs/face_teacher')"

The config argument (after ':') is "CROWDHUMAN_ROOT,WIDER_ROOT" (placeholders otherwise, see
configs/person_face_mix_ignore_unlabel.py); `kd.teacher_workdirs` defaults to the two workdirs
above. Data as in that config (CrowdHuman + WIDER Face mixed by size, each evaluated on its channel:
"AP", ... and "wider_face/AP", ...), with woGT's data side (docs/onestage.md §4.3): no image is
dropped as empty and the crop (if `data.crop_relative_range` is set) is placed at random, not around
a box. Unlabelled images of any folder can be added as one more mixture entry, e.g.
`{"dataset": "image_folder", "root": "/data/unlabelled", "weight": 5000.0}` (its channel offset
does not matter: it has no labels).

KD weights (docs/onestage.md §4.2, person_face multi_KD): KD_WEIGHT (1, 1) (1.2 for the person
teacher in one variant), KD_CLS_WEIGHT (1e3, 2e3), KD_WH_WEIGHT (1, 2), KD_REG_WEIGHT (0.1, 0.1),
NORM_WH both. The optimiser is the 140-epoch CrowdHuman multi-KD schedule (SGD 0.02, x0.1 at epochs
90 and 120; the person_face yaml's own is not published).
"""

from configs import person_face_mix_ignore_unlabel as person_face


def get_config(arg: str = ""):
  c = person_face.get_config(arg)
  c.model.onestage.ignore_unlabel = False  # no GT loss at all (woGT)
  k = c.kd
  k.teacher_workdirs = ("runs/person_teacher", "runs/face_teacher")
  k.cls_index = (1, 2)  # person -> channel 0, face -> channel 1
  k.weight = (1.0, 1.0)
  k.cls_weight = (1e3, 2e3)
  k.wh_weight = (1.0, 2.0)
  k.reg_weight = (0.1, 0.1)
  k.norm_wh = (True, True)
  k.without_label = True  # woGT: only the KD terms
  return c
