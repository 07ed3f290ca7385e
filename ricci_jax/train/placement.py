"""Data parallelism through ``jax.jit`` and shardings, on one host or many.

One mesh axis, ``"data"``, over every device of every process: the batch is split along it, the training
state is replicated. Each process holds only its own rows of a batch (``batch_size // process_count``,
as the data pipeline yields them) and :func:`jax.make_array_from_process_local_data` assembles the global
array; the compiler then reduces losses, gradients and batch statistics over the global batch. No axis
name reaches the model or the optimizer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ricci_jax import runtime
from ricci_jax.train import steps


class DataParallel:
  """Puts the state and the batches on the mesh and compiles the steps for it."""

  def __init__(self, devices: Any = None):
    self.mesh = jax.sharding.Mesh(np.array(jax.devices() if devices is None else devices), ("data",))
    self.replicated = NamedSharding(self.mesh, P())
    self.sharded = NamedSharding(self.mesh, P("data"))

  def state(self, state: steps.TrainState) -> steps.TrainState:
    """``state`` (host arrays, the same in every process) replicated over the mesh, in fresh buffers."""
    # Fresh buffers per leaf: optax and flax may share one array between leaves, and a donated argument
    # must not hold the same buffer twice. Built from the local copy, without device_put's cross-process
    # equality check, which reads NaN (an empty slot of the gate's history) as a mismatch.
    state = jax.tree.map(lambda x: np.array(x, copy=True), state)
    return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, self.replicated, lambda i: x[i]), state)

  @staticmethod
  def unstate(state: steps.TrainState) -> steps.TrainState:
    """A host copy of the (replicated) state."""
    return jax.device_get(state)

  def batch(self, batch: dict) -> dict:
    """This process's rows of a batch as the global, sharded batch."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.sharded, x), batch)

  @staticmethod
  def train_fn(program: steps.Program) -> Callable:
    """The compiled training step; it donates (consumes) the state it is given."""
    return jax.jit(functools.partial(steps.train_step, program), donate_argnums=(0,),
                   compiler_options=runtime.compiler_options())

  @staticmethod
  def eval_fn(program: steps.Program) -> Callable:
    return jax.jit(functools.partial(steps.eval_step, program), compiler_options=runtime.compiler_options())
