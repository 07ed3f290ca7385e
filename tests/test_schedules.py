import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ricci_jax import schedules


def test_reste_o_matches_the_official_per_epoch_formula():
  epochs, spe = 10, 7
  sched = schedules.reste_o(epochs, spe, o_end=3.0)
  for step in range(epochs * spe):
    e = step // spe
    want = 1 + (3 - 1) * (1 - np.cos(np.pi / 2 * e / epochs))
    np.testing.assert_allclose(sched(step), want, rtol=1e-6)
  assert float(sched(0)) == 1.0


def test_ede_t_rises_log_linearly_from_t_min_to_t_max():
  sched = schedules.ede_t(100, t_min=0.1, t_max=10.0)
  np.testing.assert_allclose(sched(0), 0.1, rtol=1e-6)
  np.testing.assert_allclose(sched(50), 1.0, rtol=1e-5)
  np.testing.assert_allclose(sched(100), 10.0, rtol=1e-5)
  code = schedules.ede_t(100, t_min=1e-3)
  np.testing.assert_allclose(code(0), 1e-3, rtol=1e-6)


def test_md_tanh_beta_multiplies_every_100_steps():
  sched = schedules.md_tanh_beta()
  np.testing.assert_allclose([sched(0), sched(99), sched(100), sched(1000)],
                             [1.0, 1.0, 1.01, 1.01**10], rtol=1e-6)


def test_schedules_are_traceable():
  sched = schedules.reste_o(4, 3)
  np.testing.assert_allclose(jax.jit(sched)(jnp.int32(6)), sched(6))


@pytest.mark.parametrize("make", [
    lambda: schedules.reste_o(0), lambda: schedules.reste_o(5, o_end=0.5),
    lambda: schedules.ede_t(5, t_min=0.0), lambda: schedules.md_tanh_beta(every=0),
    lambda: schedules.reste_o(5, steps_per_epoch=0)(0),
])
def test_bad_schedule_arguments_raise(make):
  with pytest.raises(ValueError):
    make()
