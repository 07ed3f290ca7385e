r"""Multi-level extension (our own design): the ICLR'19 model with a b-bit staircase ReLU.

The binarized ReLU sigma of Yin et al. (ICLR 2019) is replaced by the b-bit
quantized ReLU :func:`ricci_jax.staircase_relu`,
:math:`q_b(x) = \alpha\,\mathrm{clip}(\lceil x/\alpha\rceil, 0, 2^b-1)` with the
fixed resolutions :data:`ricci_jax.quantizers.STAIRCASE_ALPHA` (0.6511 for
b = 2, 0.1946 for b = 4, Lloyd on half-Gaussian data). Student
:math:`y = v^\top q_b(Zw)`, teacher :math:`y^* = v^{*\top} q_b(Zw^*)` with
:math:`\|w^*\| = 1` (so the teacher's pre-activations are N(0, 1), the
distribution alpha was fitted to), Gaussian Z, squared loss. Unlike b = 1 with
alpha = 1, the output now depends on the scale of w, so the teacher is
recovered only at w = w* itself.

Long, Yin and Xin (2021) study multi-level staircases too, but their setup
could not be retrieved; this construction is ours, built on the ICLR'19 model.

Training is mini-batch SGD on a large fixed training sample (our choice;
fresh Gaussian draws every step cost ~20x more on CPU, the random numbers
dominate): every step takes ``batch`` random rows of ``z_train``; v moves
along the sampled true gradient and w along the sampled coarse gradient of the
chosen STE, both obtained with ``jax.grad`` through ``staircase_relu``. The
step size drops tenfold for the last ``decay_frac`` of the steps. The loss is
reported on a separate held-out sample, an estimate of the population loss.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

import ricci_jax as rj
from experiments.coarse_gradient.model import Teacher, angle

Array = jax.Array


def output(v: Array, w: Array, z: Array, bits: int, estimator: str = "clipped_relu") -> Array:
  """``v^T q_b(z w)`` for a batch ``z`` of shape ``(batch, m, n)``."""
  return rj.staircase_relu(z @ w, bits, estimator=estimator) @ v


def batch_loss(v: Array, w: Array, z: Array, teacher: Teacher, bits: int,
               estimator: str = "clipped_relu") -> Array:
  r"""Mean of :math:`\tfrac12(v^\top q_b(Zw) - v^{*\top}q_b(Zw^*))^2` over the batch."""
  target = output(teacher.v_star, teacher.w_star, z, bits)
  return 0.5 * jnp.mean((output(v, w, z, bits, estimator) - target) ** 2)


class MultiLevelRun(NamedTuple):
  """Records every ``eval_every`` steps (index 0 is the initial point)."""

  loss: Array  # held-out loss estimate
  theta: Array  # angle(w, w*)
  v_err: Array  # ||v - v*||
  w_err: Array  # ||w - w*||
  v: Array
  w: Array


@functools.partial(jax.jit,
                   static_argnames=("bits", "estimator", "steps", "batch", "eval_every"))
def train(v0: Array, w0: Array, teacher: Teacher, z_train: Array, z_eval: Array, key: Array, *,
          bits: int, estimator: str, lr: float, steps: int, batch: int, eval_every: int,
          decay_frac: float = 0.3) -> MultiLevelRun:
  """Mini-batch coarse gradient descent on a fixed Gaussian training sample.

  Args:
    v0, w0: the initial point.
    teacher: (v*, w*), ``||w*|| = 1``.
    z_train: the training sample ``(num, m, n)``; mini-batches are drawn from it
      with replacement.
    z_eval: a held-out sample ``(num_eval, m, n)`` for the loss estimate.
    key: PRNG key of the mini-batch indices.
    bits: staircase bits (a key of ``STAIRCASE_ALPHA``).
    estimator: ``identity``, ``relu`` or ``clipped_relu``.
    lr: step size; ``lr / 10`` for the last ``decay_frac`` of the steps.
    steps: number of steps; a multiple of ``eval_every``.
    batch: mini-batch size.
    eval_every: steps between records.

  Returns:
    A :class:`MultiLevelRun` with ``steps // eval_every + 1`` records.
  """
  if steps % eval_every:
    raise ValueError(f"steps ({steps}) must be a multiple of eval_every ({eval_every})")
  grad = jax.grad(batch_loss, argnums=(0, 1))
  decay_at = int(round((1.0 - decay_frac) * steps))

  def record(v, w):
    return (batch_loss(v, w, z_eval, teacher, bits), angle(w, teacher.w_star),
            jnp.linalg.norm(v - teacher.v_star), jnp.linalg.norm(w - teacher.w_star))

  def step(carry, t):
    v, w = carry
    idx = jax.random.randint(jax.random.fold_in(key, t), (batch,), 0, z_train.shape[0])
    gv, gw = grad(v, w, z_train[idx], teacher, bits, estimator)
    eta = jnp.where(t < decay_at, lr, lr / 10.0)
    return (v - eta * gv, w - eta * gw), None

  def block(carry, ts):
    carry, _ = jax.lax.scan(step, carry, ts)
    return carry, record(*carry)

  ts = jnp.arange(steps).reshape(steps // eval_every, eval_every)
  (v, w), recs = jax.lax.scan(block, (v0, w0), ts)
  first = record(v0, w0)
  recs = [jnp.concatenate([f[None], r]) for f, r in zip(first, recs)]
  return MultiLevelRun(*recs, v=v, w=w)
