"""Building blocks of the config files: methods, datasets and the paper's protocols.

A config file calls these and returns the result from ``get_config``::

    from experiments.configs import presets
    def get_config():
      return presets.cifar_paper("cifar10", "resnet20", method="rfdnn", weight_bits=1)
"""

from __future__ import annotations

import os
import pathlib

import ml_collections

from ricci_jax.train.schema import default_config

REPO = pathlib.Path(__file__).resolve().parents[2]


def cifar10_subset_dir() -> str:
  """The real CIFAR-10 subset (4,660 train / 932 test images in the official format), where it lies.

  ``$RICCI_JAX_CIFAR10_SUBSET`` if set, else ``<checkout>/../shared/data/cifar10-subset`` (a clone elsewhere
  sets the variable; ``.ci/run`` does). Returned even when absent: the data pipeline then names it.
  """
  for candidate in (os.environ.get("RICCI_JAX_CIFAR10_SUBSET"), REPO.parent / "shared/data/cifar10-subset"):
    if candidate and (pathlib.Path(candidate) / "test_batch").is_file():
      return str(candidate)
  return str(REPO.parent / "shared/data/cifar10-subset")  # the data pipeline reports it missing

METHODS = {
    # name: (description, overrides of the default config)
    "float": ("full precision", {"quant.layers": "none"}),
    "ste": ("STE (identity)", {"quant.estimator": "ste"}),
    "clipped_ste": ("clipped STE, |w| <= 1", {"quant.estimator": "clipped_ste"}),
    "dorefa": ("DoReFa: tanh(w)/max|tanh(w)|, gradient through the tanh",
               {"quant.weight_method": "dorefa", "quant.estimator": "ste"}),
    "md_tanh": ("mirror descent, tanh mirror map", {"quant.estimator": "md_tanh"}),
    "approx_sign": ("ApproxSign (Bi-Real Net)", {"quant.estimator": "approx_sign"}),
    "swish_sign": ("SwishSign (BNN+)", {"quant.estimator": "swish_sign"}),
    "ede": ("EDE (IR-Net)", {"quant.estimator": "ede"}),
    "reste": ("ReSTE, per-tensor mean|W| scale", {"quant.estimator": "reste", "quant.scale": "tensor"}),
    "rfdnn": ("RF-DNN, weak inverse (the paper's)",
              {"optimizer.name": "rf_sgd", "rfdnn.approx": "weak", "quant.estimator": "clipped_ste"}),
    "rfdnn_exact": ("RF-DNN, exact (Sherman-Morrison) inverse",
                    {"optimizer.name": "rf_sgd", "rfdnn.approx": "exact", "quant.estimator": "clipped_ste"}),
    # Readings of the paper that change the update (docs/method.md, "Readings"); the regulariser at 1% of |d|.
    "rfdnn_tau1": ("RF-DNN, the paper's constant tau = 1, rank-1 metric, weak inverse, rho 0.01",
                   {"optimizer.name": "rf_sgd", "rfdnn.tau": "1.0", "rfdnn.approx": "weak", "rfdnn.rho": 0.01,
                    "quant.estimator": "clipped_ste"}),
    "rfdnn_hessian": ("RF-DNN, Eq. 14's Hessian metric diag(1 - t^2), weak inverse, tau = 1/std(w), rho 0.01",
                      {"optimizer.name": "rf_sgd", "rfdnn.metric": "hessian_diagonal", "rfdnn.approx": "weak",
                       "rfdnn.tau": "std", "rfdnn.tau_scale": 1.0, "rfdnn.rho": 0.01,
                       "quant.estimator": "clipped_ste"}),
    "rfdnn_hessian_matched": ("rfdnn_hessian with each layer's update rescaled to the STE gradient's norm",
                              {"optimizer.name": "rf_sgd", "rfdnn.metric": "hessian_diagonal",
                               "rfdnn.approx": "weak", "rfdnn.tau": "std", "rfdnn.tau_scale": 1.0,
                               "rfdnn.rho": 0.01, "rfdnn.control": "match_norm",
                               "quant.estimator": "clipped_ste"}),
    "random_null": ("null control: clipped STE plus a random direction of rfdnn_hessian's correction size",
                    {"optimizer.name": "rf_sgd", "rfdnn.metric": "hessian_diagonal", "rfdnn.approx": "weak",
                     "rfdnn.tau": "std", "rfdnn.tau_scale": 1.0, "rfdnn.rho": 0.01,
                     "rfdnn.control": "random_direction", "quant.estimator": "clipped_ste"}),
    "ridge": ("ridge-regression denoising dequantization",
              {"quant.weight_method": "ridge", "quant.estimator": "ste"}),
}


def _set(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return config


def with_method(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
  return _set(config, METHODS[method][1])


def cifar_paper(dataset: str, model: str, method: str, weight_bits: int = 1, act_bits: int = 32,
                layers: str = "all") -> ml_collections.ConfigDict:
  """RF-DNN §7.1's CIFAR protocol: 45k/5k split, batch 128, SGD Nesterov 0.9, lr 0.1 / 10
  at epochs 80, 150, 190 of 200, weight decay 5e-4, pad-4 crop and flip; all layers
  quantized, as in the tables (MetaQuant's setting)."""
  c = default_config()
  c.name = f"{dataset}_{model}_w{weight_bits}a{act_bits}_{method}"
  c.dataset.name = dataset
  c.dataset.holdout_validation = True
  c.model.name = model
  c.quant.layers = layers
  c.quant.weight_bits = weight_bits
  c.quant.act_bits = act_bits
  c.epochs = 200
  c.batch_size = 128
  c.optimizer.learning_rate = 0.1
  c.optimizer.schedule = "multistep"
  c.optimizer.boundaries = (80 / 200, 150 / 200, 190 / 200)
  c.optimizer.weight_decay = 5e-4
  c.last_epochs = 10
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  return with_method(c, method)


def imagenet_paper(model: str, method: str, weight_bits: int = 1, act_bits: int = 32,
                   layers: str = "inner") -> ml_collections.ConfigDict:
  """RF-DNN §7.1's ImageNet protocol: batch 128, SGD Nesterov 0.9, 100 epochs, cosine learning
  rate, weight decay 1e-4, the statistic over the last 5 epochs. The initial learning rate is not
  given: 0.05 here, the usual 0.1 at batch 256 scaled linearly to batch 128."""
  c = default_config()
  c.name = f"imagenet_{model}_w{weight_bits}a{act_bits}_{method}"
  c.dataset.name = "imagenet2012"
  c.model.name = model
  c.quant.layers = layers
  c.quant.weight_bits = weight_bits
  c.quant.act_bits = act_bits
  c.epochs = 100
  c.batch_size = 128
  c.optimizer.learning_rate = 0.05
  c.optimizer.schedule = "cosine"
  c.optimizer.weight_decay = 1e-4
  c.last_epochs = 5
  c.log_every_steps = 200
  c.checkpoint_every_steps = 2000
  return with_method(c, method)


def fashion_mnist(method: str, model: str = "lenet5", weight_bits: int = 1, epochs: int = 8,
                  layers: str = "inner") -> ml_collections.ConfigDict:
  """A binarized network on real Fashion-MNIST that trains in minutes on 2 CPU cores.

  Budget per run: ``epochs`` epochs of 469 steps at batch 128; SGD Nesterov 0.9, lr 0.05 with a
  cosine decay, weight decay 5e-4; the statistic over the last 3 epochs."""
  c = default_config()
  c.name = f"fashion_mnist_{model}_w{weight_bits}a32_{method}"
  c.dataset.name = "fashion_mnist"
  c.model.name = model
  c.quant.layers = layers
  c.quant.weight_bits = weight_bits
  c.epochs = epochs
  c.batch_size = 128
  c.optimizer.learning_rate = 0.05
  c.optimizer.schedule = "cosine"
  c.optimizer.weight_decay = 5e-4
  c.last_epochs = 3
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  return with_method(c, method)


def cifar10_subset(method: str, model: str = "resnet20", weight_bits: int = 1, epochs: int = 30,
                   layers: str = "all") -> ml_collections.ConfigDict:
  """The paper's CIFAR protocol shortened to fit a CPU, on the real CIFAR-10 subset.

  The subset holds 4,660 training and 932 test images (the first 932 of each official file), so an
  epoch is 36 steps at batch 128. The protocol is the paper's (SGD Nesterov 0.9, lr 0.1 divided by 10
  at 40%, 75% and 95% of training, weight decay 5e-4, pad-4 crop and flip, all layers binarized), with
  ``epochs`` instead of 200 and no validation hold-out (the subset is too small); the statistic is over
  the last 5 epochs. Accuracies are comparable only with other runs on the same subset."""
  c = cifar_paper("cifar10", model, method, weight_bits=weight_bits, layers=layers)
  c.name = f"cifar10subset_{model}_w{weight_bits}a32_{method}"
  c.dataset.source = "files"
  c.dataset.data_dir = cifar10_subset_dir()
  c.dataset.holdout_validation = False
  c.epochs = epochs
  c.last_epochs = 5
  c.log_every_steps = 12
  c.checkpoint_every_steps = 360
  return c
