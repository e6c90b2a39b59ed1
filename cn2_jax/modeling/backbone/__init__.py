"""Backbones (bottom-up network + neck), one registry: `build.py` (`model.backbone`).

Importing the package registers the built-in backbones; a new backbone is a new file here with
one `@register(...)` builder, plus its import below.
"""

from cn2_jax.modeling.backbone import fpn  # noqa: F401  (build_p67_resnet_fpn_backbone)
from cn2_jax.modeling.backbone import bifpn  # noqa: F401  (build_p37_dla_bifpn_backbone)
from cn2_jax.modeling.backbone import dla_up  # noqa: F401  (build_dla_backbone)
from cn2_jax.modeling.backbone import bifpn_fcos  # noqa: F401  (build_p3[57]_fcos_*_backbone)
