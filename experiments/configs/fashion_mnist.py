"""Binarized LeNet-5 on real Fashion-MNIST; the method is the argument.

    python -m experiments.train --config experiments/configs/fashion_mnist.py:rfdnn
    python -m experiments.train --config experiments/configs/fashion_mnist.py:clipped_ste

Methods: see experiments/configs/presets.py (METHODS).
"""

from experiments.configs import presets


def get_config(method: str = "rfdnn"):
  return presets.fashion_mnist(method)
