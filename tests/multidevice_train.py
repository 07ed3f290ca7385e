"""Runs a tiny RF-DNN training on however many devices XLA_FLAGS forces (see tests/test_train.py).

    python tests/multidevice_train.py WORKDIR
"""

import sys

import jax

from experiments.configs import presets
from ricci_jax import train

workdir = sys.argv[1]
config = presets.fashion_mnist("rfdnn", model="mlp", epochs=1)
train.schema.apply_overrides(config, [
    "dataset.train_limit=512", "dataset.test_limit=256", "batch_size=64", "progress=False",
    "plots=False", "log_every_steps=4", "rfdnn.fraction=0.5"])
train.train(config, workdir)
print(f"devices={jax.device_count()}")
