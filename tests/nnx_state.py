"""Test helpers shared by the NNX export, serving and XOR-popcount tests: random weights for an NNX model, and
a small CNN that is no other test model."""

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


class OtherCNN(nnx.Module):
  """A conv and a head: a model of another class than any the tests pack."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.head = nnx.Linear(4, 10, rngs=rngs)

  def __call__(self, x):
    return self.head(self.conv(x).mean((1, 2)))
