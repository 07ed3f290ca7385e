"""RF-DNN optax transformations: the update's numbers, routing, and optax's contract."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ricci_jax as rj
from ricci_jax import lne, ricci_flow, transform


def _problem(dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 8)
  params = {
      "conv": {"kernel": jax.random.normal(keys[0], (3, 3, 2, 4)) * 0.3, "bias": jnp.zeros(4)},
      "dense": {"kernel": jax.random.normal(keys[1], (8, 3)) * 0.3},
  }
  grads = jax.tree.map(lambda p, k: jax.random.normal(k, p.shape), params,
                       {"conv": {"kernel": keys[2], "bias": keys[3]}, "dense": {"kernel": keys[4]}})
  shifted = jax.tree.map(lambda p, k: jax.random.normal(k, (4,) + p.shape), params,
                         {"conv": {"kernel": keys[5], "bias": keys[6]}, "dense": {"kernel": keys[7]}})
  cast = lambda t: jax.tree.map(lambda x: x.astype(dtype), t)  # noqa: E731
  return cast(params), cast(grads), cast(shifted)


KERNELS_ONLY = {"conv": {"kernel": True, "bias": False}, "dense": {"kernel": True}}


def _kernels(tree):
  return {"conv": {"kernel": tree["conv"]["kernel"]}, "dense": {"kernel": tree["dense"]["kernel"]}}


# ---------------------------------------------------------------------------
# The update's numbers.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("approx,tau", [("weak", "auto"), ("exact", "auto"), ("diagonal", 2.0), ("none", "auto")])
def test_scale_by_lne_is_the_natural_gradient_per_layer(approx, tau):
  params, grads, _ = _problem()
  params, grads = _kernels(params), _kernels(grads)
  tx = rj.scale_by_lne(tau=tau, approx=approx)
  updates, state = tx.update(grads, tx.init(params), params)
  for key in ("conv", "dense"):
    w, d = params[key]["kernel"], grads[key]["kernel"]
    np.testing.assert_allclose(updates[key]["kernel"], lne.natural_gradient(w, d, tau, approx), rtol=1e-6)
    diag = state.diagnostics[key]["kernel"]
    tau_v = lne.auto_tau(w) if tau == "auto" else tau
    np.testing.assert_allclose(diag.s, np.sum(np.tanh(tau_v * np.asarray(w, np.float64)) ** 2), rtol=1e-5)
  with pytest.raises(ValueError, match="needs the current params"):
    tx.update(grads, tx.init(params))


def _manual_ricci_update(w, d, shifted, prev, alpha, eta, approx="weak"):
  tau = lne.auto_tau(w)
  (n, store), grad_n = jax.value_and_grad(ricci_flow.residual_norm, has_aux=True)(w, shifted, prev, tau, eta, approx)
  return lne.natural_gradient(w, d + alpha * grad_n, tau, approx), n, store


def test_scale_by_ricci_flow_update_matches_algorithm_2_by_hand():
  params, grads, shifted = map(_kernels, _problem())
  alpha, eta = 50.0, 0.3
  tx = rj.scale_by_ricci_flow(alpha=alpha, flow_step=eta)
  state = tx.init(params)
  for step in range(2):  # the second step uses the stored tentative metrics
    updates, new_state = tx.update(grads, state, params, translated_grads=shifted)
    for key in ("conv", "dense"):
      w, d, s4 = params[key]["kernel"], grads[key]["kernel"], shifted[key]["kernel"]
      prev = state.previous[key]["kernel"]
      want, n, store = _manual_ricci_update(w, d, s4, prev, alpha, eta)
      np.testing.assert_allclose(updates[key]["kernel"], want, rtol=2e-5, atol=1e-7)
      diag = new_state.diagnostics[key]["kernel"]
      np.testing.assert_allclose(diag.residual, n, rtol=1e-5)
      assert float(diag.gate) == 1.0 and float(diag.regularizer) > 0
      np.testing.assert_allclose(new_state.previous[key]["kernel"], store, rtol=1e-6)
    assert int(new_state.count) == step + 1
    state = new_state
    params = jax.tree.map(lambda p, u: p - 0.1 * u, params, updates)


def test_initial_state_is_the_initial_condition_of_eq34():
  params, _, _ = map(_kernels, _problem())
  state = rj.scale_by_ricci_flow().init(params)
  w = params["dense"]["kernel"]
  np.testing.assert_allclose(state.previous["dense"]["kernel"],
                             ricci_flow.initial_previous(w, lne.auto_tau(w)), rtol=1e-6)


def test_without_regulariser_and_gate_it_is_scale_by_lne():
  params, grads, shifted = map(_kernels, _problem())
  ricci = rj.scale_by_ricci_flow(alpha=0.0, epsilon=float("inf"))
  u1, _ = ricci.update(grads, ricci.init(params), params, translated_grads=shifted)
  lnet = rj.scale_by_lne()
  u2, _ = lnet.update(grads, lnet.init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u1, u2)


def test_the_gate_closes_a_layer_whose_residual_exceeds_epsilon():
  params, grads, shifted = map(_kernels, _problem())
  probe = rj.scale_by_ricci_flow(alpha=0.0)
  _, st = probe.update(grads, probe.init(params), params, translated_grads=shifted)
  n_conv = float(st.diagnostics["conv"]["kernel"].residual)
  n_dense = float(st.diagnostics["dense"]["kernel"].residual)
  assert n_conv != n_dense
  eps = (n_conv + n_dense) / 2
  tx = rj.scale_by_ricci_flow(alpha=0.0, epsilon=eps)
  updates, state = tx.update(grads, tx.init(params), params, translated_grads=shifted)
  closed, opened = ("conv", "dense") if n_conv > n_dense else ("dense", "conv")
  assert float(jnp.max(jnp.abs(updates[closed]["kernel"]))) == 0.0
  assert float(jnp.max(jnp.abs(updates[opened]["kernel"]))) > 0.0
  assert float(state.diagnostics[closed]["kernel"].gate) == 0.0
  summary = transform.summarize_diagnostics(state)
  assert float(summary["ricci/gate_open_fraction"]) == 0.5


@pytest.mark.parametrize("reading", ["lag", "current", "two_step"])
def test_every_reading_runs_and_reports(reading):
  params, grads, shifted = map(_kernels, _problem())
  tx = rj.scale_by_ricci_flow(reading=reading)
  updates, state = jax.jit(functools.partial(tx.update, translated_grads=shifted))(grads, tx.init(params), params)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
  assert set(transform.layer_diagnostics(state)) == {"conv/kernel", "dense/kernel"}


# ---------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------


def test_bad_input_is_rejected_with_a_message():
  params, grads, shifted = map(_kernels, _problem())
  tx = rj.scale_by_ricci_flow()
  state = tx.init(params)
  with pytest.raises(ValueError, match="needs the translated gradients"):
    tx.update(grads, state, params)
  with pytest.raises(ValueError, match="structure of the updates"):
    tx.update(grads, state, params, translated_grads={"conv": shifted["conv"]})
  with pytest.raises(ValueError, match="expected"):
    tx.update(grads, state, params, translated_grads=jax.tree.map(lambda x: x[:2], shifted))
  with pytest.raises(ValueError, match="needs the current params"):
    tx.update(grads, state, None, translated_grads=shifted)
  with pytest.raises(ValueError, match="not positive definite"):
    rj.scale_by_ricci_flow(tau=5.0, approx="exact").init(params)
  with pytest.raises(ValueError, match="at most 64 weights"):
    rj.scale_by_lne(approx="strong").init(params)
  with pytest.raises(ValueError, match="valid: lag"):
    rj.scale_by_ricci_flow(reading="future")
  with pytest.raises(ValueError, match="valid: weak"):
    rj.scale_by_lne(approx="inverse")
  with pytest.raises(ValueError, match="alpha must be >= 0"):
    rj.scale_by_ricci_flow(alpha=-1.0)
  with pytest.raises(ValueError, match="Shifts"):
    rj.scale_by_ricci_flow(shifts=(1, -1, 1, -1))


# ---------------------------------------------------------------------------
# rf_sgd: routing and the optax contract.
# ---------------------------------------------------------------------------


def _sgd(lr, wd=5e-4, momentum=0.9):
  return optax.chain(optax.add_decayed_weights(wd), optax.trace(momentum, nesterov=True),
                     optax.scale_by_learning_rate(lr))


def test_rf_sgd_routes_quantized_kernels_to_ricci_and_the_rest_to_sgd():
  params, grads, shifted = _problem()
  tx = rj.rf_sgd(0.1, quantized=KERNELS_ONLY, alpha=10.0)
  ricci = optax.chain(rj.scale_by_ricci_flow(alpha=10.0, flow_step=0.1),
                      *transform._sgd_tail(0.1, 0.9, True, 5e-4, None))
  sgd = _sgd(0.1)
  state, r_state, s_state = tx.init(params), ricci.init(_kernels(params)), sgd.init(params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params, translated_grads=shifted)
    r_up, r_state = ricci.update(_kernels(grads), r_state, _kernels(params), translated_grads=_kernels(shifted))
    s_up, s_state = sgd.update(grads, s_state, params)
    np.testing.assert_allclose(updates["conv"]["bias"], s_up["conv"]["bias"], rtol=1e-6)
    for key in ("conv", "dense"):
      np.testing.assert_allclose(updates[key]["kernel"], r_up[key]["kernel"], rtol=1e-6)
      assert not np.allclose(updates[key]["kernel"], s_up[key]["kernel"])
    params = optax.apply_updates(params, updates)
  diags = transform.layer_diagnostics(state)
  assert set(diags) == {"conv/kernel", "dense/kernel"}


def test_rf_sgd_default_mask_and_callable_mask():
  params, grads, shifted = _problem()
  default = rj.rf_sgd(0.1)
  by_fn = rj.rf_sgd(0.1, quantized=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
  u1, _ = default.update(grads, default.init(params), params, translated_grads=shifted)
  u2, _ = by_fn.update(grads, by_fn.init(params), params, translated_grads=shifted)
  jax.tree.map(np.testing.assert_array_equal, u1, u2)


def test_rf_sgd_with_the_identity_metric_and_no_regulariser_is_sgd():
  params, grads, shifted = _problem()
  tx = rj.rf_sgd(0.05, quantized=KERNELS_ONLY, approx="none", alpha=0.0)
  sgd = _sgd(0.05)
  u1, _ = tx.update(grads, tx.init(params), params, translated_grads=shifted)
  u2, _ = sgd.update(grads, sgd.init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u1, u2)


def _jit_step(tx, obj_shifted):
  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params, translated_grads=obj_shifted, unexpected_extra_arg=1)
    return optax.apply_updates(params, updates), state
  return step


def test_contract_jit_extra_args_and_no_recompilation():
  params, grads, shifted = _problem()
  tx = rj.rf_sgd(0.1, quantized=KERNELS_ONLY)
  traces = []

  @jax.jit
  def step(params, state, grads, shifted):
    traces.append(None)
    updates, state = tx.update(grads, state, params, translated_grads=shifted, unexpected_extra_arg=1)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(3):
    params, state = step(params, state, grads, shifted)
  assert len(traces) == 1


def test_contract_inside_chain():
  params, grads, shifted = map(_kernels, _problem())
  tx = optax.chain(optax.clip_by_global_norm(1.0), rj.scale_by_ricci_flow(), optax.scale(-0.1))
  updates, _ = tx.update(grads, tx.init(params), params, translated_grads=shifted)
  clipped, _ = optax.clip_by_global_norm(1.0).update(grads, None)
  ricci = rj.scale_by_ricci_flow()
  want, _ = ricci.update(clipped, ricci.init(params), params, translated_grads=shifted)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, -0.1 * b, rtol=1e-6), updates, want)


def test_contract_inject_hyperparams():
  params, grads, shifted = _problem()
  kwargs = dict(learning_rate=0.1, momentum=0.9, weight_decay=5e-4, alpha=3.0, quantized=KERNELS_ONLY)
  static = ("quantized", "tau", "approx", "shifts", "reading", "nesterov", "normalize", "flow_step",
            "weight_decay_mask", "epsilon", "median_window")
  plain = rj.rf_sgd(**kwargs)
  injected = optax.inject_hyperparams(rj.rf_sgd, static_args=static)(**kwargs)
  s1, s2 = jax.jit(plain.init)(params), jax.jit(injected.init)(params)
  u1, n1 = jax.jit(functools.partial(plain.update, translated_grads=shifted))(grads, s1, params)
  u2, n2 = jax.jit(functools.partial(injected.update, translated_grads=shifted))(grads, s2, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), u1, u2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), n1, n2.inner_state)
  # the injected learning rate can be changed without rebuilding
  n2.hyperparams["learning_rate"] = jnp.asarray(0.01)
  u3, _ = injected.update(grads, n2, params, translated_grads=shifted)
  assert not np.allclose(u3["conv"]["bias"], u2["conv"]["bias"])


def test_contract_multisteps_gradient_accumulation():
  params, grads, shifted = _problem()
  tx = optax.MultiSteps(rj.rf_sgd(0.1, quantized=KERNELS_ONLY), every_k_schedule=2)
  state = tx.init(params)
  u1, state = jax.jit(functools.partial(tx.update, translated_grads=shifted))(grads, state, params)
  jax.tree.map(lambda u: np.testing.assert_array_equal(u, 0), u1)
  u2, state = jax.jit(functools.partial(tx.update, translated_grads=shifted))(grads, state, params)
  ref = rj.rf_sgd(0.1, quantized=KERNELS_ONLY)
  want, _ = ref.update(grads, ref.init(params), params, translated_grads=shifted)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), u2, want)


def test_contract_learning_rate_schedule_drives_the_flow_step():
  params, grads, shifted = _problem()
  sched = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.5)
  tx = rj.rf_sgd(sched, quantized=KERNELS_ONLY, momentum=None, weight_decay=0.0)
  state = tx.init(params)
  norms = []
  for _ in range(3):
    updates, state = tx.update(grads, state, params, translated_grads=shifted)
    norms.append(float(jnp.linalg.norm(updates["conv"]["bias"])))
  np.testing.assert_allclose(np.array(norms[1:]) / np.array(norms[:-1]), 0.5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_contract_dtype_preserved_and_state_stable(dtype):
  params, grads, shifted = _problem(dtype)
  tx = rj.rf_sgd(0.1, quantized=KERNELS_ONLY)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, new_state = tx.update(grads, state, params, translated_grads=shifted)
    # lax.cond requires both branches to agree exactly on shapes and dtypes
    cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
    new_state = jax.lax.cond(cond, lambda: new_state, lambda: state)
    return optax.apply_updates(params, updates), new_state, updates

  new_params, new_state, updates = step(params, state)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.dtype == p.dtype
  assert jax.tree.map(lambda x: (x.shape, x.dtype), new_state) == jax.tree.map(lambda x: (x.shape, x.dtype), state)
  assert jax.tree.map(lambda x: x.dtype, new_params) == jax.tree.map(lambda x: x.dtype, params)


# ---------------------------------------------------------------------------
# End to end: a binarized MLP on real Fashion-MNIST, a hand-written loop.
# ---------------------------------------------------------------------------


@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_binarized_mlp_trains_with_rf_sgd_on_real_fashion_mnist():
  import flax.linen as nn  # noqa: PLC0415

  from ricci_jax import data  # noqa: PLC0415

  w1 = rj.QuantConfig(weight=rj.TensorQuant(bits=1, estimator="clipped_ste"))

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = x.reshape(x.shape[0], -1)
      x = nn.relu(nn.Dense(256, name="first")(x))
      x = nn.relu(nn.LayerNorm()(rj.QuantDense(256, quant=w1, name="hidden")(x)))
      return nn.Dense(10, name="last")(x)

  model = MLP()
  train_ds = data.load("fashion_mnist", "train", batch_size=128, limit=3072, seed=0)
  test_ds = data.load("fashion_mnist", "test", batch_size=1000, limit=1000, shuffle=False)
  x0 = jnp.zeros((1, 28, 28, 1))
  params = model.init(jax.random.key(0), x0)["params"]
  mask = rj.layers.quantized_kernel_mask(params, rj.quantized_kernels(model, x0))
  tx = rj.rf_sgd(0.05, quantized=mask)
  state = tx.init(params)

  def loss_fn(p, batch):
    logits = model.apply({"params": p}, batch["image"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  @jax.jit
  def step(p, s, images, labels):
    batch = {"image": data.preprocess("fashion_mnist", images), "label": labels}
    grads = jax.grad(loss_fn)(p, batch)
    u, s = tx.update(grads, s, p, translated_grads=rj.translated_grads(loss_fn, p, batch))
    return optax.apply_updates(p, u), s

  for epoch in range(2):
    for b in train_ds.epoch(epoch):
      params, state = step(params, state, b["image"], b["label"])
  test = next(iter(test_ds.epoch(0)))
  logits = model.apply({"params": params}, data.preprocess("fashion_mnist", test["image"]))
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == test["label"]))
  assert accuracy > 0.7, accuracy  # chance is 0.1
  diag = transform.layer_diagnostics(state)["hidden/kernel"]
  assert float(diag.residual) > 0 and float(diag.gate) == 1.0 and 0 < float(diag.s) < 1


# ---------------------------------------------------------------------------
# Readings, the regulariser as a ratio, the relative gate, controls.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [0.1, 0.3])
def test_rho_sets_alpha_so_the_regulariser_is_that_share_of_the_gradient(rho):
  params, grads, shifted = map(_kernels, _problem())
  kw = dict(tau="std", tau_scale=1.0, metric="hessian_diagonal", flow_step=0.3)
  tx = rj.scale_by_ricci_flow(rho=rho, **kw)
  updates, state = tx.update(grads, tx.init(params), params, translated_grads=shifted)
  probe = rj.scale_by_ricci_flow(alpha=0.0, **kw)
  st0 = probe.init(params)
  for key in ("conv", "dense"):
    w, d, s4 = params[key]["kernel"], grads[key]["kernel"], shifted[key]["kernel"]
    diag = state.diagnostics[key]["kernel"]
    np.testing.assert_allclose(diag.regularizer, rho, rtol=1e-5)
    tau = lne.std_tau(w, 1.0)
    grad_n = jax.grad(lambda w: ricci_flow.residual_norm(
        w, s4, st0.previous[key]["kernel"], tau, jnp.float32(0.3), metric="hessian_diagonal")[0])(w)
    alpha = rho * np.linalg.norm(d) / np.linalg.norm(grad_n)
    np.testing.assert_allclose(diag.alpha, alpha, rtol=1e-4)
    t = np.tanh(np.asarray(tau) * np.asarray(w, np.float64))
    want = (1 + t**2) * (np.asarray(d, np.float64) + alpha * np.asarray(grad_n, np.float64))
    np.testing.assert_allclose(updates[key]["kernel"], want, rtol=1e-4, atol=1e-6)


def _steps_with_residuals(tx, params, grads, shifted_seq):
  state = tx.init(params)
  out = []
  for shifted in shifted_seq:
    _, state = tx.update(grads, state, params, translated_grads=shifted)
    out.append(state)
  return out


def test_relative_gate_closes_when_n_exceeds_a_multiple_of_its_running_median():
  params, grads, shifted = map(_kernels, _problem())
  # translated gradients of varying size make N vary from step to step; two large ones close the gate
  scales = [1.0, 0.5, 1.5, 1.0, 8.0, 0.7, 1.2, 10.0, 0.9]
  seq = [jax.tree.map(lambda x, f=f: x * f, shifted) for f in scales]
  kw = dict(alpha=0.0, reading="current", flow_step=0.5)
  free = _steps_with_residuals(rj.scale_by_ricci_flow(**kw), params, grads, seq)
  window, mult = 3, 2.0
  gated = _steps_with_residuals(
      rj.scale_by_ricci_flow(epsilon_relative=mult, median_window=window, **kw), params, grads, seq)
  for key in ("conv", "dense"):
    ns = [float(s.diagnostics[key]["kernel"].residual) for s in free]
    want_gate = [1.0] + [float(ns[i] <= mult * np.median(ns[max(0, i - window):i])) for i in range(1, len(ns))]
    got_gate = [float(s.diagnostics[key]["kernel"].gate) for s in gated]
    assert got_gate == want_gate, (key, ns)
    assert 0 < sum(want_gate) < len(want_gate)  # the gate both opened and closed
    np.testing.assert_allclose(float(gated[-1].diagnostics[key]["kernel"].gate_open_fraction),
                               np.mean(want_gate), rtol=1e-6)
    np.testing.assert_allclose(float(gated[-1].diagnostics[key]["kernel"].epsilon),
                               mult * np.median(ns[-1 - window:-1]), rtol=1e-5)


def test_absolute_gate_open_fraction_counts_the_open_steps():
  params, grads, shifted = map(_kernels, _problem())
  probe = _steps_with_residuals(rj.scale_by_ricci_flow(alpha=0.0), params, grads, [shifted])[0]
  n = float(probe.diagnostics["conv"]["kernel"].residual)
  tx = rj.scale_by_ricci_flow(alpha=0.0, epsilon=n * 1.0001, reading="current")
  seq = [shifted, jax.tree.map(lambda x: 5 * x, shifted), shifted]
  states = _steps_with_residuals(tx, params, grads, seq)
  gates = [float(s.diagnostics["conv"]["kernel"].gate) for s in states]
  assert gates == [1.0, 0.0, 1.0]
  np.testing.assert_allclose(float(states[-1].diagnostics["conv"]["kernel"].gate_open_fraction), 2 / 3)


def test_match_norm_keeps_the_direction_and_takes_the_ste_norm():
  params, grads, _ = map(_kernels, _problem())
  kw = dict(tau="std", tau_scale=1.0, metric="hessian_diagonal")
  plain, matched = rj.scale_by_lne(**kw), rj.scale_by_lne(control="match_norm", **kw)
  u, _ = plain.update(grads, plain.init(params), params)
  m, state = matched.update(grads, matched.init(params), params)
  for key in ("conv", "dense"):
    a, b, d = (np.asarray(x[key]["kernel"], np.float64) for x in (u, m, grads))
    np.testing.assert_allclose(np.linalg.norm(b), np.linalg.norm(d), rtol=1e-5)
    np.testing.assert_allclose(b / np.linalg.norm(b), a / np.linalg.norm(a), atol=1e-6)
    assert np.linalg.norm(a) > 1.05 * np.linalg.norm(d)  # the reading's step is longer than STE's


def test_random_direction_null_has_the_readings_correction_size_and_a_fresh_direction():
  params, grads, shifted = map(_kernels, _problem())
  kw = dict(tau="std", tau_scale=1.0, metric="hessian_diagonal", rho=0.01)
  reading = rj.scale_by_ricci_flow(**kw)
  null = rj.scale_by_ricci_flow(control="random_direction", control_seed=3, **kw)
  u, _ = reading.update(grads, reading.init(params), params, translated_grads=shifted)
  st = null.init(params)
  z1, st = null.update(grads, st, params, translated_grads=shifted)
  z2, st = null.update(grads, st, params, translated_grads=shifted)
  again, _ = null.update(grads, null.init(params), params, translated_grads=shifted)
  for key in ("conv", "dense"):
    d = np.asarray(grads[key]["kernel"], np.float64).ravel()
    c_reading = np.asarray(u[key]["kernel"], np.float64).ravel() - d
    c1 = np.asarray(z1[key]["kernel"], np.float64).ravel() - d
    c2 = np.asarray(z2[key]["kernel"], np.float64).ravel() - d
    np.testing.assert_allclose(np.linalg.norm(c1), np.linalg.norm(c_reading), rtol=1e-4)
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
    assert abs(cos(c1, c_reading)) < 0.5 and abs(cos(c1, c2)) < 0.5  # random, and new at every step
    np.testing.assert_array_equal(again[key]["kernel"], z1[key]["kernel"])  # reproducible from the seed and step
    np.testing.assert_allclose(float(st.diagnostics[key]["kernel"].correction),
                               np.linalg.norm(c2) / np.linalg.norm(d), rtol=1e-4)


def test_weak_and_diagonal_readings_accept_any_tau_exact_rank1_refuses_an_indefinite_metric():
  params, grads, shifted = map(_kernels, _problem())
  for kw in (dict(tau=5.0), dict(tau=5.0, metric="hessian_diagonal"), dict(tau=5.0, approx="diagonal"),
             dict(tau=50.0, metric="hessian_diagonal", approx="exact")):
    tx = rj.scale_by_ricci_flow(**kw)
    updates, _ = tx.update(grads, tx.init(params), params, translated_grads=shifted)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(updates))
    rj.scale_by_lne(**{k: v for k, v in kw.items()}).init(params)
    rj.rf_sgd(0.1, **kw).init(params)
  with pytest.raises(ValueError, match=r"\['conv'\]\['kernel'\].*not positive definite"):
    rj.rf_sgd(0.1, tau=5.0, approx="exact").init(params)
  with pytest.raises(ValueError, match="not positive definite"):
    rj.scale_by_lne(tau=5.0, approx="exact", block="out_channel").init(params)


@pytest.mark.parametrize("block", ["out_channel", "kernel"])
def test_blocks_in_the_transform_are_the_per_block_natural_gradient(block):
  params, grads, shifted = map(_kernels, _problem())
  tx = rj.scale_by_ricci_flow(alpha=0.0, approx="exact", tau_scale=0.9, block=block)
  updates, state = tx.update(grads, tx.init(params), params, translated_grads=shifted)
  for key in ("conv", "dense"):
    w, d = params[key]["kernel"], grads[key]["kernel"]
    np.testing.assert_allclose(updates[key]["kernel"],
                               lne.natural_gradient(w, d, "auto", "exact", tau_scale=0.9, block=block), rtol=1e-6)
    assert float(state.diagnostics[key]["kernel"].dominant) == 1.0


def test_rf_sgd_with_no_quantized_leaf_needs_no_translated_gradients():
  params, grads, _ = _problem()
  none = jax.tree.map(lambda _: False, params)
  tx = rj.rf_sgd(0.1, quantized=none)
  u1, _ = tx.update(grads, tx.init(params), params)
  u2, _ = _sgd(0.1).update(grads, _sgd(0.1).init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u1, u2)
  jax.jit(tx.update)(grads, tx.init(params), params)


def test_bad_readings_and_knobs_fail_at_construction():
  with pytest.raises(ValueError, match="unknown metric"):
    rj.scale_by_ricci_flow(metric="fisher")
  with pytest.raises(ValueError, match="unknown block"):
    rj.rf_sgd(0.1, block="rows")
  with pytest.raises(ValueError, match="tau must be a positive number or one of 'auto', 'std'"):
    rj.scale_by_lne(tau="median")
  with pytest.raises(ValueError, match="tau='auto' keeps the rank-1 metric"):
    rj.rf_sgd(0.1, approx="diagonal")
  with pytest.raises(ValueError, match="rho must be >= 0"):
    rj.rf_sgd(0.1, rho=-0.1)
  with pytest.raises(ValueError, match="epsilon_relative must be > 0"):
    rj.scale_by_ricci_flow(epsilon_relative=0.0)
  with pytest.raises(ValueError, match="median_window must be a positive int"):
    rj.scale_by_ricci_flow(epsilon_relative=2.0, median_window=0)
  with pytest.raises(ValueError, match="unknown control 'shuffle'; valid: none, match_norm, random_direction"):
    rj.scale_by_lne(control="shuffle")
  with pytest.raises(ValueError, match="tau_scale must be > 0"):
    rj.scale_by_lne(tau_scale=0.0)
  params, _, _ = map(_kernels, _problem())
  with pytest.raises(ValueError, match=r"\['conv'\]\['kernel'\]: block=5 does not divide"):
    rj.scale_by_ricci_flow(block=5).init(params)
  with pytest.raises(ValueError, match="blocks of at most 64 weights"):
    rj.scale_by_lne(approx="strong", block="out_channel").init({"k": jnp.ones((9, 9, 1, 2))})


def test_the_readings_numbers_are_traced_hyperparameters():
  params, grads, shifted = _problem()
  kwargs = dict(learning_rate=0.1, quantized=KERNELS_ONLY, metric="hessian_diagonal", tau="std", tau_scale=1.0,
                rho=0.1, epsilon_relative=2.0)
  static = ("quantized", "metric", "tau", "median_window", "control")
  plain = rj.rf_sgd(**kwargs)
  injected = optax.inject_hyperparams(rj.rf_sgd, static_args=static)(**kwargs)
  assert {"tau_scale", "rho", "epsilon_relative", "alpha"} <= set(injected.init(params).hyperparams)
  traces = []

  @jax.jit
  def step(state):
    traces.append(None)
    return injected.update(grads, state, params, translated_grads=shifted)

  u1, s1 = step(injected.init(params))
  want, _ = plain.update(grads, plain.init(params), params, translated_grads=shifted)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), u1, want)
  diag = transform.layer_diagnostics(s1)["conv/kernel"]
  np.testing.assert_allclose(diag.regularizer, 0.1, rtol=1e-5)
  s1.hyperparams["rho"] = jnp.asarray(0.3, jnp.float32)  # the dtype the state holds: no retrace
  s1.hyperparams["tau_scale"] = jnp.asarray(2.0, jnp.float32)
  u2, s2 = step(s1)
  assert len(traces) == 1  # new values, no recompilation
  np.testing.assert_allclose(transform.layer_diagnostics(s2)["conv/kernel"].regularizer, 0.3, rtol=1e-5)
  assert not np.allclose(u2["conv"]["kernel"], u1["conv"]["kernel"])


def test_rho_zero_is_no_regulariser():
  """rho = 0 sizes the regulariser at 0 x |d|: the update of alpha = 0."""
  w = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)
  d = jnp.asarray(np.random.default_rng(1).normal(size=(6, 4)), jnp.float32)
  shifted = jnp.asarray(np.random.default_rng(2).normal(size=(4, 6, 4)), jnp.float32)
  out = []
  for kw in ({"rho": 0.0}, {"alpha": 0.0}):
    tx = rj.scale_by_ricci_flow(**kw)
    out.append(tx.update(d, tx.init(w), w, translated_grads=shifted)[0])
  np.testing.assert_array_equal(out[0], out[1])
