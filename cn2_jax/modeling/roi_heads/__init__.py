"""Second stages, one registry: `build.py` (`model.roi_heads.name`).

Importing the package registers the built-in heads; new heads are a new file here with one
`@ROI_HEADS.register(...)` builder, plus its import below.
"""

from cn2_jax.modeling.roi_heads import cascade  # noqa: F401  (Custom[Cascade]ROIHeads)
