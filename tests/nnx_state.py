"""A test helper shared by the NNX export and XOR-popcount tests: random weights for an NNX model."""

import jax
import jax.numpy as jnp
from flax import nnx


def randomize(model, seed):
  """Every Param and BatchStat drawn at random (batch statistics away from their 0 / 1 start)."""
  state = nnx.state(model, (nnx.Param, nnx.BatchStat))
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [jax.random.normal(k, v.shape, v.dtype) * 0.3
                                                 for k, v in zip(keys, leaves)]))
  for _, m in nnx.iter_modules(model):
    if isinstance(m, nnx.BatchNorm):
      m.var[...] = jnp.abs(m.var[...]) + 0.5
  return model
