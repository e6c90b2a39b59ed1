"""The built-in dataset kinds (cn2_jax/data/catalog.py), one file each. A new kind is a new file
here that calls `catalog.register(...)`, plus its import below."""

from cn2_jax.data.datasets import coco  # noqa: F401  (coco/2017, coco_json)
from cn2_jax.data.datasets import synthetic  # noqa: F401
from cn2_jax.data.datasets import crowdhuman  # noqa: F401
from cn2_jax.data.datasets import wider_face  # noqa: F401
from cn2_jax.data.datasets import voc  # noqa: F401
from cn2_jax.data.datasets import image_folder  # noqa: F401
from cn2_jax.data.datasets import lvis  # noqa: F401  (lvis_v1)
from cn2_jax.data.datasets import objects365  # noqa: F401
