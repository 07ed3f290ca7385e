"""Preset cifar10_resnet20_w1a32_dorefa (see experiments/configs/presets.py for the protocol)."""

from experiments.configs import presets


def get_config():
  return presets.cifar_paper("cifar10", "resnet20", method="dorefa")
