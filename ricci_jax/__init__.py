"""ricci-jax: training discretized neural networks in JAX.

The public API is what this module exports; everything else lives in clearly
named modules (``ricci_jax.quantizers``, ``ricci_jax.estimators``, ...).
"""

from ricci_jax import estimators, layers, models, quantizers, schedules
from ricci_jax.config import QuantConfig, TensorQuant
from ricci_jax.estimators import ESTIMATORS
from ricci_jax.layers import (
    QuantConv,
    QuantConvGeneralDilated,
    QuantDense,
    QuantDotGeneral,
    quantized_kernels,
    set_quant_hparams,
)
from ricci_jax.quantizers import (
    binarize,
    binary_scale,
    dorefa_weights,
    ridge_dequantize,
    staircase_relu,
    uniform,
)

__version__ = "0.1.0"

__all__ = [
    "ESTIMATORS",
    "QuantConfig",
    "QuantConv",
    "QuantConvGeneralDilated",
    "QuantDense",
    "QuantDotGeneral",
    "TensorQuant",
    "binarize",
    "binary_scale",
    "dorefa_weights",
    "estimators",
    "layers",
    "models",
    "quantized_kernels",
    "quantizers",
    "ridge_dequantize",
    "schedules",
    "set_quant_hparams",
    "staircase_relu",
    "uniform",
]
