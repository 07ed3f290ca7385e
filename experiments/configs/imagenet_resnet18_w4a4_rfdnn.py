"""Preset imagenet_resnet18_w4a4_rfdnn (see experiments/configs/presets.py for the protocol)."""

from experiments.configs import presets


def get_config():
  return presets.imagenet_paper("resnet18", method="rfdnn", weight_bits=4, act_bits=4)
