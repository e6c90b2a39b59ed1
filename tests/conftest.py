"""Shared pytest fixtures."""

import jax
import pytest


@pytest.fixture(scope="module")
def fast_compile():
  """XLA compile time dominates tests of tiny models (flax's imagenet train_test does the same):
  turn most XLA optimisations off for the module, restore afterwards."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)
