"""``rf_sgd`` against the contract optax holds its contributed optimizers to.

The tests of ``optax/contrib/_common_test.py`` (optax 0.2.x), rewritten for ours: the translated gradients
reach ``update`` as an extra argument, the way ``optax.contrib.sophia`` gets its objective. Each test runs
with two routings: the default mask (kernels of ndim >= 2 quantized; on the 1-D test problems the RF-DNN
group is then empty) and every leaf quantized.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ricci_jax as rj

ROUTINGS = {"default": None, "all": lambda p: jax.tree.map(lambda _: True, p)}
STATIC = ("quantized", "median_window")  # shapes the state: cannot be a traced hyperparameter


def _parabola(dtype):
  final = jnp.array([1.0, -1.0, 1.0], dtype)
  return jnp.array([-1.0, 10.0, 1.0], dtype), final, lambda p: jnp.sum(jnp.square(p - final))


def _rosenbrock(dtype):
  return (jnp.array([0.0, 0.0], dtype), jnp.array([1.0, 1.0], dtype),
          lambda p: jnp.square(1.0 - p[0]) + 100.0 * jnp.square(p[1] - p[0] ** 2))


def _matrix_parabola(dtype):
  final = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype)
  return jnp.zeros((2, 2), dtype), final, lambda p: jnp.sum(jnp.square(p - final))


def _mixed(dtype):
  f1, f2 = jnp.array([1.0, -1.0, 2.0], dtype), jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype)
  return ((jnp.zeros(3, dtype), jnp.zeros((2, 2), dtype)), (f1, f2),
          lambda p: jnp.sum(jnp.square(p[0] - f1)) + jnp.sum(jnp.square(p[1] - f2)))


def _translated(grads):
  """Four 'translated' gradients: the problems have no images, so each is the gradient itself."""
  return jax.tree.map(lambda g: jnp.stack([g] * 4), grads)


def _opt(routing, **kw):
  return rj.rf_sgd(**{"learning_rate": 1e-3, "weight_decay": 0.0, "quantized": ROUTINGS[routing], **kw})


@pytest.mark.parametrize("routing", ROUTINGS)
def test_accepts_extra_args_and_does_not_recompile(routing):
  opt = _opt(routing)
  params, _, objective = _rosenbrock(jnp.float32)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(None)  # runs once per trace, i.e. per compilation
    grads = jax.grad(objective)(params)
    updates, state = opt.update(grads, state, params, translated_grads=_translated(grads),
                                unexpected_extra_args_your_optimizer_doesnt_expect=1)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  for _ in range(3):
    params, state = step(params, state)
  assert len(traces) == 1 and np.all(np.isfinite(params))


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("target", [_parabola, _rosenbrock, _matrix_parabola, _mixed])
def test_converges_and_map_params_works(routing, target):
  opt = _opt(routing)
  params, final, objective = target(jnp.float32)

  @jax.jit
  def step(params, state):
    grads = jax.grad(objective)(params)
    updates, state = opt.update(grads, state, params, translated_grads=_translated(grads))
    return optax.apply_updates(params, updates), state

  state = optax.tree.map_params(opt, lambda v: v, opt.init(params))
  (params, state), _ = jax.lax.scan(lambda c, _: (step(*c), None), (params, state), length=30_000)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=3e-2, atol=3e-2), params, final)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_can_be_wrapped_in_inject_hyperparams(routing):
  kwargs = {"learning_rate": 1e-2, "quantized": ROUTINGS[routing]}
  opt = rj.rf_sgd(**kwargs)
  injected = optax.inject_hyperparams(rj.rf_sgd, static_args=STATIC)(**kwargs)
  params = [jnp.negative(jnp.ones((2, 3))), jnp.ones((2, 5, 2))]
  grads = [jnp.ones((2, 3)), jnp.negative(jnp.ones((2, 5, 2)))]
  update = functools.partial(opt.update, translated_grads=_translated(grads))
  update_injected = functools.partial(injected.update, translated_grads=_translated(grads))
  updates, state = jax.jit(update)(grads, jax.jit(opt.init)(params), params)
  updates_i, state_i = jax.jit(update_injected)(grads, jax.jit(injected.init)(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), updates_i, updates)
  assert jax.tree.structure(state_i.inner_state) == jax.tree.structure(state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), state_i.inner_state, state)


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_preserves_dtype(routing, dtype):
  opt = _opt(routing)
  params = jnp.array([1.0, 2.0], dtype)
  grads = jax.grad(lambda x: jnp.sum(x**2))(params)
  updates, _ = jax.jit(functools.partial(opt.update, translated_grads=_translated(grads)))(
      grads, jax.jit(opt.init)(params), params)
  assert updates.dtype == params.dtype


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gradient_accumulation_with_multisteps(routing, dtype):
  params = jnp.array([1.0, 2.0], dtype)
  grads = jax.grad(lambda x: jnp.sum(x**2))(params)
  inner = _opt(routing)
  opt = optax.MultiSteps(
      optax.GradientTransformationExtraArgs(inner.init, functools.partial(inner.update,
                                                                          translated_grads=_translated(grads))),
      every_k_schedule=4)
  updates, _ = jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)
  np.testing.assert_array_equal(updates, jnp.zeros_like(grads))


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_state_shape_and_dtype_are_stable(routing, dtype):
  opt = _opt(routing)
  params, _, objective = _parabola(dtype)

  @jax.jit
  def step(params, state):
    grads = jax.grad(objective)(params)
    cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
    updates, state = jax.lax.cond(
        cond, lambda: opt.update(grads, state, params, translated_grads=_translated(grads)),
        lambda: (params, state))
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  for _ in range(2):
    params, new_state = step(params, state)
    assert params.dtype == dtype
    cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
    state = jax.lax.cond(cond, lambda: state, lambda: new_state)  # noqa: B023


@pytest.mark.parametrize("routing", ROUTINGS)
def test_a_learning_rate_schedule_equals_the_constant_rate(routing):
  params0, _, objective = _parabola(jnp.float32)
  results = []
  for lr in (optax.constant_schedule(1e-3), 1e-3):
    opt = _opt(routing, learning_rate=lr)
    params, state = params0, opt.init(params0)
    for _ in range(10):
      grads = jax.grad(objective)(params)
      updates, state = opt.update(grads, state, params, translated_grads=_translated(grads))
      params = optax.apply_updates(params, updates)
    results.append(params)
  np.testing.assert_allclose(results[0], results[1], rtol=1e-6)
