"""Flax NNX models in ricci-jax: quantize any NNX model in place, train it with RF-DNN.

Example::

    from flax import nnx
    import ricci_jax as rj
    from ricci_jax import nnx as rjn

    model = MyCNN(rngs=nnx.Rngs(0))                      # any NNX model
    rjn.quantize(model, rj.QuantRule(weight=rj.TensorQuant(bits=1)))
    tx = rj.rf_sgd(0.1, quantized=rjn.kernel_mask(model))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    shifted = rjn.translated_grads(model, loss_fn, batch)   # loss_fn(model, batch)
    optimizer.update(model, grads, translated_grads=shifted)
    print(rj.summary(model, nnx.state(model), input_shape=(28, 28, 1)))
    rj.export.save(rj.export.pack(nnx.state(model), model, input_shape=(28, 28, 1)), "cnn.npz")
    logits = rj.inference.Predictor("cnn.npz", model=MyCNN(rngs=nnx.Rngs(0)))(images)

See :mod:`ricci_jax.nnx.quantize` for how a rule selects layers,
:mod:`ricci_jax.nnx.ops` for what a quantized layer computes and
:mod:`ricci_jax.nnx.zoo` for NNX versions of zoo models (a packed zoo model is
served without ``model=``), :mod:`ricci_jax.nnx.describe` for how the summary,
the export and serving read an NNX model, :mod:`ricci_jax.nnx.xnor` for how
serving computes its W1A1 layers with XOR-popcount from the packed bits (as for
a Linen model; on CPU by default) and :mod:`ricci_jax.nnx.trace` for the
abstract forward pass they all trace.
"""

from ricci_jax.nnx.ops import QuantConv, QuantDot, QuantEinsum, QuantHparam, QuantOp
from ricci_jax.nnx.quantize import (
    KNOWN_UNSUPPORTED,
    SUPPORTED,
    contraction_layers,
    is_quantized,
    kernel_mask,
    plan,
    quant_plan,
    quantize,
    set_hparams,
)
from ricci_jax.nnx.training import param_loss, translated_grads

__all__ = [
    "KNOWN_UNSUPPORTED", "QuantConv", "QuantDot", "QuantEinsum", "QuantHparam", "QuantOp", "SUPPORTED",
    "contraction_layers", "is_quantized", "kernel_mask", "param_loss", "plan", "quant_plan",
    "quantize", "set_hparams", "translated_grads",
]
