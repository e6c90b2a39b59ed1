"""Test helpers shared by the test-suite (oracle weights, naming-rule target trees)."""

from cn2_jax.testing.oracle import (  # noqa: F401
    OracleMismatch,
    build_target_tree,
    cn2_r50_state_dict_spec,
    expected_flax_entries,
    oracle_dir,
    oracle_expected_flax_paths,
    oracle_json_path,
    regenerate_oracle_state_dict,
)
