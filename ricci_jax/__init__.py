"""ricci-jax: training discretized neural networks in JAX.

The public API is what this module exports; everything else lives in clearly
named modules (``ricci_jax.quantizers``, ``ricci_jax.estimators``, ...).
"""

from ricci_jax import (
    data,
    dead_neurons,
    estimators,
    export,
    inference,
    layers,
    lne,
    models,
    nnx,
    pruning,
    quantizers,
    ricci_flow,
    schedules,
    statistics,
    transform,
)
from ricci_jax.quant_config import QuantConfig, TensorQuant
from ricci_jax.estimators import ESTIMATORS
from ricci_jax.models import QuantRule
from ricci_jax.layers import (
    QuantConv,
    QuantConvGeneralDilated,
    QuantDense,
    QuantDotGeneral,
    set_quant_hparams,
)
from ricci_jax.models.inspect import quantized_kernels
from ricci_jax.ricci_flow import Shifts, translated_grads
from ricci_jax.summary import summary
from ricci_jax.transform import rf_sgd, scale_by_lne, scale_by_ricci_flow
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
    "QuantRule",
    "Shifts",
    "TensorQuant",
    "binarize",
    "binary_scale",
    "data",
    "dead_neurons",
    "dorefa_weights",
    "estimators",
    "export",
    "inference",
    "layers",
    "lne",
    "models",
    "nnx",
    "pruning",
    "quantized_kernels",
    "quantizers",
    "rf_sgd",
    "ricci_flow",
    "ridge_dequantize",
    "scale_by_lne",
    "scale_by_ricci_flow",
    "schedules",
    "set_quant_hparams",
    "staircase_relu",
    "statistics",
    "summary",
    "transform",
    "translated_grads",
    "uniform",
]
