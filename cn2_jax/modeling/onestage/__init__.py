"""centerX's one-stage CenterNet family (ResNet C5 + DCNv2 deconv neck + cls/wh/reg heads).

Modules: `norm` (torch BatchNorm), `backbone` (torchvision ResNet, C5), `neck` (DeconvLayers,
torch ConvTranspose2d), `head`, `targets`, `losses`, `decode`, `model` (the meta-architecture).
Weights: `cn2_jax/weights/onestage.py`. Parity: `cn2_jax/testing/centerx_oracle.py`.
"""

from cn2_jax.modeling.onestage.model import (  # noqa: F401
    CenterNetOneStage,
    abstract_variables,
    build_onestage_model,
    dummy_batch,
    init_fn,
    init_variables,
)
