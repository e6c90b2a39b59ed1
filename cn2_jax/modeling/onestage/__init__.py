"""centerX's one-stage CenterNet family (ResNet C5 + DCNv2 deconv neck + cls/wh/reg heads).

Modules: `neck` (DeconvLayers, torch ConvTranspose2d), `head`, `targets`, `losses`, `decode`,
`model` (the meta-architecture). The backbone is the shared ResNet (`modeling/backbone/resnet.py`,
torchvision settings) with trainable BatchNorm (`modeling/layers.py` `BatchNorm`).
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
