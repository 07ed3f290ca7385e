"""The jitted steps: evaluation does not depend on the estimator hyperparameters (they shape only the
backward pass), while the training step does."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import presets
from ricci_jax import layers, train
from ricci_jax.models import inspect


def _setup():
  config = presets.fashion_mnist("reste", model="mlp", epochs=3)  # ReSTE: o scheduled over epochs
  model = train.build_model(config, 10)
  x = jnp.zeros((1, 28, 28, 1))
  variables = model.init(jax.random.key(0), x, train=False)
  mask = layers.quantized_kernel_mask(variables["params"], inspect.quantized_kernels(model, x, train=False))
  program, state = train.build_program(config, model, variables, mask, steps_per_epoch=10)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (32, 28, 28, 1), dtype=np.uint8),
           "label": rng.integers(0, 10, 32).astype(np.int32), "mask": np.ones(32, bool)}
  return program, state, batch


def test_evaluation_ignores_the_estimator_hyperparameters_and_training_does_not():
  program, state, batch = _setup()
  assert program.hparam_schedules and jax.tree.leaves(state.quant)
  other = state.replace(quant=layers.set_quant_hparams(state.quant, o=37.0))
  a, b = train.eval_step(program, state, batch), train.eval_step(program, other, batch)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
  # the training step reads them through the schedule at the state's step; changing the step changes o
  later = state.replace(step=jnp.asarray(25, jnp.int32))  # epoch 3 of 3 (10 steps each)
  _, m0 = train.train_step(program, state, batch)
  _, m9 = train.train_step(program, later, batch)
  assert float(m0["hparam/o"]) != float(m9["hparam/o"])
