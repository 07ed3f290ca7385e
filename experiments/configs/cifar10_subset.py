"""Binarized ResNet-20 on the real CIFAR-10 subset, the paper's protocol shortened; the method is the argument.

    python -m experiments.train --config experiments/configs/cifar10_subset.py:rfdnn
"""

from experiments.configs import presets


def get_config(method: str = "rfdnn"):
  return presets.cifar10_subset(method)
