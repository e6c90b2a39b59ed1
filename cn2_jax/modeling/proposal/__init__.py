"""First stages and dense heads. The two-stage detector's proposal generators have one registry:
`build.py` (`model.proposal_generator`); the one-stage families own their dense heads.

Importing the package registers the built-in proposal generators; a new one is a new file here
with one `@PROPOSAL_GENERATORS.register(...)` builder, plus its import below.
"""

from cn2_jax.modeling.proposal import centernet  # noqa: F401  (CenterNet, ONLY_PROPOSAL)
