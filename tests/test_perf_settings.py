"""The CPU runtime settings (ricci_jax.runtime): overridable, and results unchanged."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ricci_jax as rj
from ricci_jax import models, runtime


@pytest.fixture
def fresh_state(monkeypatch):
  """Forget what the runtime module applied, so env-var switches are re-read."""
  monkeypatch.setattr(runtime, "_state", {"malloc": None, "validated": None})


def test_user_xla_flags_are_parsed(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false  --xla_force_host_platform_device_count=2")
  assert runtime.user_xla_flags() == {"xla_cpu_enable_fast_math", "xla_force_host_platform_device_count"}
  monkeypatch.delenv("XLA_FLAGS")
  assert runtime.user_xla_flags() == set()


def test_compiler_options_on_cpu(fresh_state, monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.delenv("RICCI_JAX_CPU_TUNING", raising=False)
  monkeypatch.delenv("RICCI_JAX_XLA_OPTIONS", raising=False)
  assert runtime.compiler_options("cpu") == dict(runtime.XLA_CPU_OPTIONS)
  assert runtime.compiler_options("gpu") == {}
  # the options compile and run
  f = jax.jit(lambda x: jnp.sum(x * 2.0), compiler_options=runtime.compiler_options())
  assert float(f(jnp.ones(3))) == 6.0


def test_user_flags_win(fresh_state, monkeypatch):
  name = next(iter(runtime.XLA_CPU_OPTIONS))
  monkeypatch.setenv("XLA_FLAGS", f"--{name}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
  assert name not in runtime.compiler_options("cpu")


@pytest.mark.parametrize("var", ["RICCI_JAX_CPU_TUNING", "RICCI_JAX_XLA_OPTIONS"])
def test_xla_options_can_be_turned_off(fresh_state, monkeypatch, var):
  monkeypatch.setenv(var, "0")
  assert runtime.compiler_options("cpu") == {}


@pytest.mark.parametrize("var", ["RICCI_JAX_CPU_TUNING", "RICCI_JAX_MALLOC_TUNING"])
def test_malloc_tuning_can_be_turned_off(fresh_state, monkeypatch, var):
  monkeypatch.setenv(var, "off")
  assert runtime.tune_malloc() is False


def test_rejected_options_are_dropped(fresh_state, monkeypatch):
  monkeypatch.setattr(runtime, "XLA_CPU_OPTIONS", {"xla_cpu_no_such_option_exists": True})
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  with pytest.warns(UserWarning, match="rejects the XLA CPU options"):
    assert runtime.compiler_options("cpu") == {}


def test_configure_cpu_reports(fresh_state, monkeypatch):
  monkeypatch.setenv("RICCI_JAX_CPU_TUNING", "0")
  out = runtime.configure_cpu()
  assert out["malloc"] is False and out["xla_options"] == {}


def _binarized_steps(options: dict | None, steps: int, dtype) -> list[float]:
  """Losses of ``steps`` SGD steps of a small binarized CIFAR ResNet-20 (width 8, 16x16 images)."""
  rule = models.QuantRule(layers="inner", weight=rj.TensorQuant(bits=1, estimator="clipped_ste"))
  model = models.create("resnet20", num_classes=10, quant=rule, width=8, dtype=dtype)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3), dtype), train=False)
  variables = jax.tree.map(lambda a: a.astype(dtype), variables)
  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.trace(0.9, nesterov=True), optax.scale(-0.1))

  def step(params, opt_state, stats, x, y):
    def loss_fn(p):
      logits, new = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new["batch_stats"]

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, stats, loss

  f = jax.jit(step, compiler_options=options)
  state = (variables["params"], tx.init(variables["params"]), variables["batch_stats"])
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(steps):
    x = jnp.asarray(rng.standard_normal((8, 16, 16, 3)), dtype)
    y = jnp.asarray(rng.integers(0, 10, 8))
    *state, loss = f(*state, x, y)
    losses.append(float(loss))
  return losses


def test_tuned_step_gives_the_same_losses_float64(fresh_state, monkeypatch):
  """20 steps in float64: the runtime's XLA options change nothing beyond rounding."""
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.delenv("RICCI_JAX_CPU_TUNING", raising=False)
  monkeypatch.delenv("RICCI_JAX_XLA_OPTIONS", raising=False)
  with jax.enable_x64(True):
    tuned = _binarized_steps(runtime.compiler_options("cpu"), 20, jnp.float64)
    stock = _binarized_steps({}, 20, jnp.float64)
  np.testing.assert_allclose(tuned, stock, rtol=0, atol=1e-10)


def test_tuned_step_gives_the_same_first_losses_float32(fresh_state, monkeypatch):
  """float32: the first steps agree to rounding (later, sign flips make binarized runs part)."""
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.delenv("RICCI_JAX_CPU_TUNING", raising=False)
  monkeypatch.delenv("RICCI_JAX_XLA_OPTIONS", raising=False)
  tuned = _binarized_steps(runtime.compiler_options("cpu"), 3, jnp.float32)
  stock = _binarized_steps({}, 3, jnp.float32)
  np.testing.assert_allclose(tuned, stock, rtol=1e-5)


def test_float64_surrogate_keeps_float64():
  """The estimator backward runs in float64 for float64 inputs (float32 for bfloat16 and float32)."""
  with jax.enable_x64(True):
    w = jnp.asarray([0.3, -0.7, 1.5], jnp.float64)
    g = jax.grad(lambda w: jnp.sum(rj.binarize(w, "clipped_ste") * jnp.asarray([1 / 3, 1.0, 1.0])))(w)
    assert g.dtype == jnp.float64
    assert float(g[0]) == 1 / 3  # exact in float64, not rounded to float32
  wb = jnp.asarray([0.3, -0.7], jnp.bfloat16)
  assert jax.grad(lambda w: jnp.sum(rj.binarize(w, "clipped_ste")).astype(jnp.float32))(wb).dtype == jnp.bfloat16


def test_training_program_jits_with_the_options(monkeypatch):
  """The training program's jitted steps receive the runtime's compiler options."""
  from ricci_jax.train import placement as placement_lib  # noqa: PLC0415

  seen = {}
  real_jit = jax.jit

  def spy(fun, **kwargs):
    seen.update(kwargs)
    return real_jit(fun, **kwargs)

  monkeypatch.setattr(placement_lib.jax, "jit", spy)
  placement_lib.DataParallel().train_fn(functools.partial(lambda *a: None))
  assert seen["compiler_options"] == runtime.compiler_options()
  assert seen["donate_argnums"] == (0,)
