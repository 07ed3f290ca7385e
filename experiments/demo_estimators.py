"""Binarize one dense layer and print every estimator's gradient.

    python -m experiments.demo_estimators

The layer y = x @ sign(W) is fed a random batch; the loss is the squared error
against a random target. For each estimator the gradient with respect to the
latent kernel W is compared with the STE's (identity) gradient: its norm, the
cosine between the two, and the fraction of entries the estimator zeroes.
"""

from __future__ import annotations


import sys

import jax
import jax.numpy as jnp

import ricci_jax as rj

from experiments import cli


def main(argv=None):
  parser = cli.parser(__doc__)
  parser.add_argument("--features-in", type=int, default=64)
  parser.add_argument("--features-out", type=int, default=32)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  kx, kw, ky = jax.random.split(jax.random.key(args.seed), 3)
  x = jax.random.normal(kx, (args.batch, args.features_in))
  # latent weights spread over [-2, 2] so clipping estimators have work to do
  w = jax.random.uniform(kw, (args.features_in, args.features_out), minval=-2.0, maxval=2.0)
  target = jax.random.normal(ky, (args.batch, args.features_out))

  def loss(w, estimator):
    y = x @ rj.binarize(w, estimator) / jnp.sqrt(args.features_in)
    return 0.5 * jnp.mean(jnp.sum((y - target) ** 2, axis=-1))

  reference = jax.grad(loss)(w, "ste")
  print(f"binarized dense layer {args.features_in}x{args.features_out}, batch {args.batch}, "
        f"latent weights uniform on [-2, 2]")
  print(f"{'estimator':<13}{'|grad|':>10}{'cos(ste)':>10}{'zeroed':>9}   grad[0, :4]   (reference)")
  for name, est in rj.ESTIMATORS.items():
    g = jax.grad(loss)(w, name)
    cos = jnp.vdot(g, reference) / (jnp.linalg.norm(g) * jnp.linalg.norm(reference) + 1e-30)
    zeroed = jnp.mean(g == 0)
    head = " ".join(f"{v:+.4f}" for v in g[0, :4])
    print(f"{name:<13}{float(jnp.linalg.norm(g)):>10.4f}{float(cos):>10.4f}{float(zeroed):>9.2%}   "
          f"{head}   ({est.reference})")


if __name__ == "__main__":
  sys.exit(cli.run(main))
