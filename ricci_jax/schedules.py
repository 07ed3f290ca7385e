"""Schedules for estimator hyperparameters, in optax's style: ``step -> value``.

Each function returns a schedule ``f(step)`` that works on a traced step
count and returns a float32 array, so calling it inside a jitted train step
never recompiles. The official codes change these values once per epoch; pass
``steps_per_epoch`` to reproduce that staircase exactly (1, the default,
changes them every step).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax


def _epoch(step, steps_per_epoch: int):
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
  return jnp.floor_divide(jnp.asarray(step, jnp.int32), steps_per_epoch).astype(jnp.float32)


def reste_o(num_epochs: int, steps_per_epoch: int = 1, o_end: float = 3.0, o_start: float = 1.0) -> optax.Schedule:
  r"""ReSTE's ``o``: :math:`o = o_0 + (o_{end} - o_0)(1 - \cos(\tfrac{\pi}{2}\, e/E))`.

  Exactly the official code (``o_0 = 1``, ``o_end = 3``, ``e`` the epoch
  0 ... E-1, ``E = num_epochs``). Wu et al., ICCV 2023.
  """
  if num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
  if o_start < 1 or o_end < 1:
    raise ValueError(f"ReSTE needs o >= 1, got o_start={o_start}, o_end={o_end}")

  def schedule(step):
    e = _epoch(step, steps_per_epoch)
    return o_start + (o_end - o_start) * (1.0 - jnp.cos(math.pi / 2.0 * e / num_epochs))

  return schedule


def ede_t(num_epochs: int, steps_per_epoch: int = 1, t_min: float = 0.1, t_max: float = 10.0) -> optax.Schedule:
  r"""IR-Net's EDE ``t``: :math:`t = T_{min} 10^{(e/E)\log_{10}(T_{max}/T_{min})}`.

  ``T_max = 10``. The paper's ``T_min`` is 0.1 (the default); the released
  CIFAR code starts near 1e-3: pass ``t_min=1e-3`` for it. EDE's ``k`` is
  derived as ``max(1/t, 1)``. Qin et al., CVPR 2020.
  """
  if num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
  if not 0 < t_min <= t_max:
    raise ValueError(f"EDE needs 0 < t_min <= t_max, got t_min={t_min}, t_max={t_max}")
  log_ratio = math.log10(t_max / t_min)

  def schedule(step):
    e = _epoch(step, steps_per_epoch)
    return t_min * jnp.power(10.0, e / num_epochs * log_ratio)

  return schedule


def md_tanh_beta(beta0: float = 1.0, factor: float = 1.01, every: int = 100) -> optax.Schedule:
  r"""MD-tanh's ``beta``: :math:`\beta = \beta_0 \cdot \mathrm{factor}^{\lfloor k/\mathrm{every} \rfloor}`.

  The official md-bnn code multiplies beta by 1.01 every 100 iterations.
  Ajanthan et al. 2021.
  """
  if beta0 <= 0 or factor <= 0 or every < 1:
    raise ValueError(f"need beta0 > 0, factor > 0, every >= 1; got {beta0}, {factor}, {every}")

  def schedule(step):
    k = jnp.floor_divide(jnp.asarray(step, jnp.int32), every).astype(jnp.float32)
    return beta0 * jnp.power(jnp.float32(factor), k)

  return schedule
