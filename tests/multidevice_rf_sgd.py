"""Two-device checks for rf_sgd, run by tests/test_multidevice.py in a subprocess.

XLA_FLAGS=--xla_force_host_platform_device_count=2 must be set before jax is
imported, so this file runs as its own process and exits non-zero on failure.
"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import ricci_jax as rj  # noqa: E402

assert jax.device_count() == 2, jax.devices()

W1 = rj.QuantConfig(weight=rj.TensorQuant(bits=1))


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), name="first")(x))
    x = nn.relu(rj.QuantConv(6, (3, 3), quant=W1, name="mid")(x))
    x = rj.QuantDense(8, quant=W1, name="hidden")(x.reshape(x.shape[0], -1))
    return nn.Dense(3, name="last")(nn.relu(x))


model = Net()
x = jax.random.normal(jax.random.key(0), (16, 8, 8, 2))
y = jax.random.randint(jax.random.key(1), (16,), 0, 3)
batch = {"image": x, "label": y}
params = model.init(jax.random.key(2), x)["params"]
mask = rj.layers.quantized_kernel_mask(params, rj.quantized_kernels(model, x))


def loss_fn(p, b):
  logits = model.apply({"params": p}, b["image"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, b["label"]).mean()


def make_step(tx):
  def step(p, state, b):
    grads = jax.grad(loss_fn)(p, b)
    shifted = rj.translated_grads(loss_fn, p, b, fraction=0.5)
    updates, state = tx.update(grads, state, p, translated_grads=shifted)
    return optax.apply_updates(p, updates), state
  return step


def run(step, p, state, batches):
  for b in batches:
    p, state = step(p, state, b)
  return p, state


def assert_close(a, b, what, atol=2e-6):
  for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(la), np.asarray(lb), rtol=2e-5, atol=atol, err_msg=what)


def check(reading: dict, state_atol: float = 2e-6):
  """One reading: one device against jit with a NamedSharding mesh over two.

  ``state_atol``: the stored tentative vectors tanh(tau (W - eta g^-1 g_s)) carry the translated gradients'
  reduction-order differences (sharded sums) multiplied by tau.
  """
  tx = rj.rf_sgd(0.1, quantized=mask, **reading)
  batches = [batch, jax.tree.map(lambda v: v[::-1], batch)]

  # One device, global batch.
  ref_params, ref_state = run(jax.jit(make_step(tx)), params, tx.init(params), batches)

  # Data parallel with jit and a NamedSharding mesh: same update, state shardings unchanged.
  mesh = Mesh(np.array(jax.devices()), ("data",))
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))
  state0 = jax.device_put(tx.init(params), replicated)
  p0 = jax.device_put(params, replicated)
  sharded_batches = [jax.device_put(b, data) for b in batches]
  step = jax.jit(make_step(tx), in_shardings=(replicated, replicated, data), out_shardings=(replicated, replicated))
  p_sh, s_sh = run(step, p0, state0, sharded_batches)
  assert_close(p_sh, ref_params, f"jit+NamedSharding params {reading}")
  assert_close(s_sh, ref_state, f"jit+NamedSharding state {reading}", state_atol)
  before = jax.tree.map(lambda v: (v.shape, v.dtype, v.sharding), state0)
  after = jax.tree.map(lambda v: (v.shape, v.dtype, v.sharding), s_sh)
  assert before == after, "optimizer state shapes, dtypes or shardings changed"

  diag = rj.transform.summarize_diagnostics(s_sh)
  assert float(diag["ricci/residual_mean"]) > 0


check({"alpha": 100.0})  # the paper's rank-1 metric, one per layer, tau auto
check({"metric": "hessian_diagonal", "tau": "std", "tau_scale": 1.0, "block": "out_channel", "rho": 0.3,
       "epsilon_relative": 2.0, "control": "random_direction"}, state_atol=1e-4)  # tau = 1/std(w), about 20

print("two-device rf_sgd checks passed")
sys.exit(0)
