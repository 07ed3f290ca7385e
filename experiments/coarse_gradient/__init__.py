"""The coarse-gradient two-layer experiment (Yin et al., ICLR 2019) and our extensions.

Modules:

* :mod:`~experiments.coarse_gradient.model`: the binarized-ReLU two-linear-layer
  model, its closed forms (population loss, gradients, expected coarse
  gradients, correlations, the spurious minimum), Monte-Carlo estimates and
  Algorithm 1 (full-batch coarse gradient descent).
* :mod:`~experiments.coarse_gradient.multilevel`: the same model with a b-bit
  staircase ReLU (our extension).
* :mod:`~experiments.coarse_gradient.multiclass`: a two-linear-layer quantized
  ReLU classifier on teacher-labelled data (our extension).
* :mod:`~experiments.coarse_gradient.claims`: one function per reproduced claim.
* :mod:`~experiments.coarse_gradient.plots`: the figures.
* :mod:`~experiments.coarse_gradient.run`: the CLI,
  ``python -m experiments.coarse_gradient.run [--quick] [--out DIR]``.
"""
