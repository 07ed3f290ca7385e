"""``rf_sgd`` against the contract optax holds its contributed optimizers to.

The tests of ``optax/contrib/_common_test.py`` (optax 0.2.x), rewritten for ours: the translated gradients
reach ``update`` as an extra argument, the way ``optax.contrib.sophia`` gets its objective. Each test runs
with two routings: the default mask (kernels of ndim >= 2 quantized; on the 1-D test problems the RF-DNN
group is then empty) and every leaf quantized. The ``inject_hyperparams`` tests also cover
``scale_by_ricci_flow`` and ``scale_by_lne``, with no ``static_args`` wherever no size is traced.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ricci_jax as rj

ROUTINGS = {"default": None, "all": lambda p: jax.tree.map(lambda _: True, p)}
# inject_hyperparams takes every callable for a schedule (optax's convention), so the "all" routing's
# function of the params must be named static; None (the default routing) and a tree of bools need nothing
STATIC = ("quantized",)


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


# optax/contrib/_common_test.py's test_optimizers_can_be_wrapped_in_inject_hyperparams: the same kwargs
# directly and through inject_hyperparams with no static_args, every other argument at its default
FACTORIES = {"rf_sgd": (rj.rf_sgd, {"learning_rate": 0.1}), "scale_by_ricci_flow": (rj.scale_by_ricci_flow, {}),
             "scale_by_lne": (rj.scale_by_lne, {})}


def _contract_problem():
  params = [jnp.negative(jnp.ones((2, 3))), jnp.ones((2, 5, 2))]
  grads = [jnp.ones((2, 3)), jnp.negative(jnp.ones((2, 5, 2)))]
  return params, grads


def _extra(factory, grads):
  return {} if factory is rj.scale_by_lne else {"translated_grads": _translated(grads)}


def _assert_injected_equals_direct(factory, kwargs, jit_init, jit_update, steps=1):
  params, grads = _contract_problem()
  opt, injected = factory(**kwargs), optax.inject_hyperparams(factory)(**kwargs)
  update = functools.partial(opt.update, **_extra(factory, grads))
  update_i = functools.partial(injected.update, **_extra(factory, grads))
  update_i = jax.jit(update_i) if jit_update else update_i
  state, state_i = opt.init(params), (jax.jit(injected.init) if jit_init else injected.init)(params)
  for _ in range(steps):
    updates, state = update(grads, state, params)
    updates_i, state_i = update_i(grads, state_i, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4), updates_i, updates)
  assert jax.tree.structure(state_i.inner_state) == jax.tree.structure(state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4), state_i.inner_state, state)


@pytest.mark.parametrize("jit", [True, False], ids=["with_jit", "without_jit"])
@pytest.mark.parametrize("name", FACTORIES)
def test_optimizers_can_be_wrapped_in_inject_hyperparams(name, jit):
  factory, kwargs = FACTORIES[name]
  _assert_injected_equals_direct(factory, kwargs, jit, jit)


@pytest.mark.parametrize("factory, kwargs, jit_init", [
    (rj.rf_sgd, {"learning_rate": 0.1, "metric": "hessian_diagonal", "tau": 0.05}, True),
    (rj.rf_sgd, {"learning_rate": 0.1, "rho": 0.1}, True),
    (rj.rf_sgd, {"learning_rate": 0.1, "control": "random_direction", "control_seed": 3}, True),
    # the window sizes the state: init needs it concrete, update reads it from the state
    (rj.rf_sgd, {"learning_rate": 0.1, "epsilon_relative": 2.0, "median_window": 2}, False),
    (rj.scale_by_ricci_flow, {"state_dtype": "bfloat16", "tau": "std"}, True),
    (rj.scale_by_lne, {"control": "random_direction", "block": "out_channel", "approx": "exact"}, True),
], ids=["hessian_diagonal", "rho", "random_direction", "epsilon_relative", "state_dtype", "lne_out_channel"])
def test_readings_can_be_wrapped_in_inject_hyperparams(factory, kwargs, jit_init):
  _assert_injected_equals_direct(factory, kwargs, jit_init, jit_update=True, steps=2)


def test_an_int_block_is_static_under_jit():
  """An int block sizes the metric's blocks: concrete arrays are read as ints, a traced one needs static_args."""
  params, grads = _contract_problem()
  _assert_injected_equals_direct(rj.scale_by_lne, {"block": 2, "approx": "exact"}, jit_init=False, jit_update=False)
  injected = optax.inject_hyperparams(rj.scale_by_lne)(block=2)
  with pytest.raises(ValueError, match=r"block sizes arrays.*static_args=\('block',\)") as info:
    jax.jit(injected.update)(grads, injected.init(params), params)
  assert "\n" not in str(info.value)
  injected = optax.inject_hyperparams(rj.scale_by_lne, static_args=("block",))(block=2)
  updates, _ = jax.jit(injected.update)(grads, jax.jit(injected.init)(params), params)
  want, _ = rj.scale_by_lne(block=2).update(grads, rj.scale_by_lne(block=2).init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), updates, want)


def test_a_traced_median_window_fails_in_init_only_when_it_is_needed():
  params, _ = _contract_problem()
  injected = optax.inject_hyperparams(rj.rf_sgd)(learning_rate=0.1, epsilon_relative=2.0)
  with pytest.raises(ValueError, match=r"median_window sizes arrays.*static_args=\('median_window',\)") as info:
    jax.jit(injected.init)(params)
  assert "\n" not in str(info.value)
  state = jax.jit(optax.inject_hyperparams(rj.rf_sgd, static_args=("median_window",))(
      learning_rate=0.1, epsilon_relative=2.0, median_window=7).init)(params)
  assert {h.shape for h in jax.tree.leaves(state.inner_state.inner_states["ricci"].inner_state[0].history)} == {(7,)}


def test_bad_sizes_and_a_dtype_taken_for_a_schedule_are_refused():
  params, _ = _contract_problem()
  for bad in (0, 2.0, True, jnp.asarray(0), jnp.asarray(2.0)):
    with pytest.raises(ValueError, match="median_window must be a positive int"):
      rj.scale_by_ricci_flow(epsilon_relative=2.0, median_window=bad)
  for bad in (jnp.asarray(0), jnp.asarray(2.0), jnp.asarray([2])):
    with pytest.raises(ValueError, match="unknown block"):
      rj.scale_by_lne(block=bad)
  for bad in ("int32", "bool", "no_such_dtype", object()):
    with pytest.raises(ValueError, match="state_dtype must be a floating dtype or its name"):
      rj.scale_by_ricci_flow(state_dtype=bad)
  with pytest.raises(ValueError, match=r"pass its name \('bfloat16'\) or static_args=\('state_dtype',\)"):
    optax.inject_hyperparams(rj.scale_by_ricci_flow)(state_dtype=jnp.bfloat16).init(params)
  state = rj.scale_by_ricci_flow(epsilon_relative=2.0, median_window=np.int64(3), block=jnp.asarray(2)).init(params)
  assert {h.shape for h in jax.tree.leaves(state.history)} == {(3,)}
  assert {p.dtype for p in jax.tree.leaves(state.previous)} == {jnp.dtype(jnp.float32)}


def test_an_injected_learning_rate_changes_without_recompiling():
  """-lr * grad for the SGD group (no momentum, no decay); the Ricci group's update is linear in lr once the
  tentative step (flow_step, which defaults to the learning rate) is fixed."""
  params = {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "bias": jnp.ones((4,))}
  grads = {"kernel": jnp.linspace(0.5, -0.5, 12).reshape(3, 4), "bias": jnp.array([1.0, -2.0, 0.5, 3.0])}
  injected = optax.inject_hyperparams(rj.rf_sgd)(learning_rate=0.1, momentum=None, weight_decay=0.0,
                                                 flow_step=0.05)
  traces = []

  @jax.jit
  def step(state):
    traces.append(None)
    return injected.update(grads, state, params, translated_grads=_translated(grads))

  state = injected.init(params)
  u_a, _ = step(state)
  state.hyperparams["learning_rate"] = jnp.asarray(0.3, jnp.float32)  # the dtype the state holds: no retrace
  u_b, _ = step(state)
  assert len(traces) == 1
  np.testing.assert_allclose(u_a["bias"], -0.1 * grads["bias"], rtol=1e-6)
  np.testing.assert_allclose(u_b["bias"], -0.3 * grads["bias"], rtol=1e-6)
  assert np.all(u_a["kernel"] != 0)
  np.testing.assert_allclose(u_b["kernel"], 3.0 * u_a["kernel"], rtol=1e-5)


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
