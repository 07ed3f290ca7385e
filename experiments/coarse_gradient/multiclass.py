r"""Multi-class extension (our own design): a two-linear-layer quantized-ReLU classifier.

Long, Yin and Xin (2021) train "a two-linear-layer network with quantized
activation functions for non-linear multi-category classification" with
monotone STEs and prove convergence to perfect classification; their data
model, STE class and hyperparameters could not be retrieved. What follows is
our construction on top of the ICLR'19 setting, not theirs:

* Network: logits :math:`V q_b(W x)`, :math:`x \in \mathbb{R}^d`,
  :math:`W \in \mathbb{R}^{h \times d}`, :math:`V \in \mathbb{R}^{K \times h}`,
  no biases, :math:`q_b` = :func:`ricci_jax.staircase_relu` with its fixed
  resolution (b = 1: alpha = 1.2221, b = 2: 0.6511).
* Data: :math:`x \sim N(0, I_d)`, labels :math:`\arg\max_k (V^* q_b(W^* x))_k`
  from a teacher of the same form (rows of :math:`W^*` unit norm so its
  pre-activations are N(0, 1); :math:`V^* \sim N(0, 1)`), keeping only samples
  whose teacher top-1 minus top-2 logit gap is at least ``margin`` (this removes
  near-ties, e.g. all hidden units off, so a perfect classifier exists in the
  student's class with a margin). The classes are not linearly separable in
  general (the teacher is non-linear).
* Training: full-batch cross-entropy, heavy-ball momentum gradient descent;
  V moves along its true gradient, W along the coarse gradient of the STE
  (``jax.grad`` through ``staircase_relu``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ricci_jax as rj

Array = jax.Array


class Net(NamedTuple):
  """Two-linear-layer network parameters."""

  w: Array  # (h, d)
  v: Array  # (k, h)


def logits(params: Net, x: Array, bits: int, estimator: str = "clipped_relu") -> Array:
  """``q_b(x W^T) V^T`` for a batch ``x`` of shape ``(num, d)``."""
  return rj.staircase_relu(x @ params.w.T, bits, estimator=estimator) @ params.v.T


def make_teacher(rng: np.random.Generator, d: int, h: int, k: int) -> Net:
  """A random teacher: unit-norm rows of W*, V* ~ N(0, 1) (NumPy draws)."""
  w = rng.standard_normal((h, d))
  w /= np.linalg.norm(w, axis=1, keepdims=True)
  return Net(jnp.asarray(w, jnp.float32), jnp.asarray(rng.standard_normal((k, h)), jnp.float32))


def make_data(rng: np.random.Generator, teacher: Net, num: int, bits: int, margin: float,
              oversample: int = 4) -> tuple[np.ndarray, np.ndarray, float]:
  """``num`` inputs with teacher labels whose teacher logit margin is >= ``margin``.

  Draws ``oversample * num`` Gaussian candidates and keeps the first ``num``
  whose top-1 minus top-2 teacher logit is at least ``margin``.

  Returns:
    ``(x, y, kept_fraction)``, ``kept_fraction`` the share of candidates that
    passed.

  Raises:
    ValueError: if fewer than ``num`` candidates pass (lower the margin).
  """
  d = teacher.w.shape[1]
  x = rng.standard_normal((oversample * num, d)).astype(np.float32)
  z = np.asarray(logits(teacher, jnp.asarray(x), bits))
  top2 = np.sort(z, axis=1)[:, -2:]
  ok = top2[:, 1] - top2[:, 0] >= margin
  if ok.sum() < num:
    raise ValueError(f"only {ok.mean():.1%} of {oversample * num} candidates pass the margin "
                     f"{margin}; need {num}: lower the margin")
  idx = np.flatnonzero(ok)[:num]
  return x[idx], np.argmax(z[idx], axis=1).astype(np.int32), float(ok.mean())


def init_student(rng: np.random.Generator, d: int, h: int, k: int) -> Net:
  """W ~ N(0, 1/d) (pre-activations ~ N(0, 1)), V ~ N(0, 1/h) (NumPy draws)."""
  return Net(jnp.asarray(rng.standard_normal((h, d)) / np.sqrt(d), jnp.float32),
             jnp.asarray(rng.standard_normal((k, h)) / np.sqrt(h), jnp.float32))


def loss_and_accuracy(params: Net, x: Array, y: Array, bits: int, estimator: str):
  """Mean cross-entropy and (as aux) the classification accuracy."""
  z = logits(params, x, bits, estimator)
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, y))
  return loss, jnp.mean(jnp.argmax(z, axis=1) == y)


class ClassifierRun(NamedTuple):
  """Per-step training loss and accuracy (index t: before step t+1), final test accuracy."""

  loss: Array
  train_acc: Array
  test_acc: Array
  params: Net


@functools.partial(jax.jit, static_argnames=("bits", "estimator", "steps"))
def train(params: Net, x: Array, y: Array, x_test: Array, y_test: Array, *, bits: int,
          estimator: str, lr: float, momentum: float, steps: int) -> ClassifierRun:
  """Full-batch coarse gradient descent with heavy-ball momentum on the cross-entropy.

  Args:
    params: the initial student.
    x, y: the training set.
    x_test, y_test: a held-out set from the same teacher.
    bits: staircase bits (1 or 2 in our runs).
    estimator: ``identity``, ``relu`` or ``clipped_relu``.
    lr, momentum: SGD hyperparameters (optax.sgd).
    steps: number of full-batch steps.
  """
  opt = optax.sgd(lr, momentum=momentum)
  grad = jax.value_and_grad(loss_and_accuracy, has_aux=True)

  def step(carry, _):
    p, s = carry
    (loss, acc), g = grad(p, x, y, bits, estimator)
    updates, s = opt.update(g, s, p)
    return (optax.apply_updates(p, updates), s), (loss, acc)

  (p, _), (loss, acc) = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
  last_loss, last_acc = loss_and_accuracy(p, x, y, bits, estimator)
  _, test_acc = loss_and_accuracy(p, x_test, y_test, bits, estimator)
  return ClassifierRun(jnp.append(loss, last_loss), jnp.append(acc, last_acc), test_acc, p)


def steps_to_perfect(train_acc) -> int | None:
  """The first step index at which the training accuracy is 100%, or None."""
  hits = np.flatnonzero(np.asarray(train_acc) >= 1.0)
  return int(hits[0]) if hits.size else None
