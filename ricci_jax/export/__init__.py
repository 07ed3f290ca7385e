"""Bit-packed export: every quantized kernel stored at its real bit width.

The training model keeps float32 *latent* weights and quantizes them in every
forward pass. What inference needs is only what that forward produces, so
:func:`pack` stores each quantized kernel as the integer level of every entry,
packed into words, plus the few floats that turn levels back into the exact
values the forward used:

=================================  ==========================================
forward (``TensorQuant``)          stored
=================================  ==========================================
``uniform`` / ``dorefa``, 1 bit    one bit per weight (sign, 1 = +1), 8 to a
                                   ``uint8`` (DoReFa's forward is again ±1)
``uniform`` / ``dorefa``, k bits   the level index q in [0, 2^k - 1] of RF-DNN
                                   Eq. 38, value ``2/(2^k-1) q - 1``; 8/k to a
                                   ``uint8`` when k divides 8, else
                                   floor(32/k) to a ``uint32``
``scale="tensor"`` / ``"channel"``  plus mean|W| (one value, or one per output
                                   channel), in the compute dtype
``ridge``, ``ridge_affine=True``   the integer q of every entry (k bits) and,
                                   per block and output channel, the fit's
                                   slope ``Cov(x,q)/(Var(q)+lambda)``, mean q
                                   and mean x (float32)
``ridge``, ``ridge_affine=False``  q + 2^(k-1) - 1/2 (k bits) and the fit's
                                   slope per block and output channel
any of these, with pruned weights  plus a ``mask``, one bit per weight (1 =
(latent weights exactly 0)         kept); the codes above for the kept
                                   weights only (a pruned binary kernel:
                                   mask and signs, a ternary kernel)
=================================  ==========================================

**Ridge cannot be packed exactly, so** :func:`pack` **refuses it** unless
asked for ``exact=False``. Its forward computes the fit's coefficients
(:func:`ricci_jax.quantizers.ridge_fit`: means of x and q, their covariance,
the variance of q) from the latent weights in every pass, and XLA rounds those
reductions differently depending on what it fuses them with: the same
``ridge_dequantize`` compiled alone, inside a larger jit, or run op by op
gives kernels that differ in the last bit (measured), so no stored
coefficients can be *the* training forward's bit for bit. With
``exact=False`` the integers q (k bits) and the coefficients are stored (the
tensor is marked inexact in the file) and the served logits match the
training model's up to float rounding.
(Every other forward is exact: sign, Eq. 38 levels and DoReFa are
rounding-free given max|x|, a max is exact, and the scales mean|W| are
checked bit for bit.) Ridge with ``ridge_affine=False`` *and* N:M
``sparsity`` is refused even then: its pruned entries are 0, which is off the
half-integer grid, so k bits cannot hold them.

A pruned weight (a latent weight that is exactly 0) quantizes to exactly 0
(:func:`ricci_jax.layers.quantize_tensor`) and is rebuilt as 0 from the mask;
a kernel without zeros is stored exactly as before, so files of unpruned
models do not change (:mod:`~ricci_jax.export.tensors` has the sizes).

Everything else (the first and last layers when they are float, biases,
BatchNorm's scale, bias and running statistics) is stored as it is. Nothing is
approximated: :func:`pack` rebuilds every kernel from what it stored and checks
it is *bit for bit* the kernel the training forward computes
(:func:`ricci_jax.layers.quantize_tensor`, jitted), and fails if not, so a
model served from the packed file (:mod:`ricci_jax.inference`) gives the
training model's jitted eval-mode logits bit for bit:
``jax.jit(functools.partial(model.apply, train=False))(variables, x)`` on the
same backend. (Not the eager ``model.apply``: run op by op, XLA rounds some
float arithmetic, BatchNorm's for one, differently from a jitted program.)

Which model, and how it is quantized, is the model passed to :func:`pack`
(a ``flax.linen.Module`` from :mod:`ricci_jax.models`, with its own
``model.quant`` rule). The training program builds its model from its config
with ``ricci_jax.train.build_model(config, num_classes)``; a float model packs
as its quantized twin with ``model.clone(quant=rule)`` (quantized and float
models have the same parameters). A Flax NNX model quantized by
:func:`ricci_jax.nnx.quantize` packs with its state the same way
(:func:`ricci_jax.export.packed.pack_nnx`).

The modules: :mod:`~ricci_jax.export.bits` (integers into words),
:mod:`~ricci_jax.export.tensors` (one kernel packed and rebuilt; the
:class:`Packed` container), :mod:`~ricci_jax.export.packed` (a whole model:
:func:`pack`, :func:`unpack`), :mod:`~ricci_jax.export.file_format`
(:func:`save`, :func:`load`: a versioned, checksummed ``.npz``).

Example::

    model = train.build_model(config, num_classes=10)
    packed = rj.export.pack(train.load_checkpoint(workdir), model)   # params + batch_stats
    print(packed.nbytes, "bytes")
    rj.export.save(packed, "resnet20_w1.npz")
    variables = rj.export.unpack("resnet20_w1.npz")   # the forward's kernels, not the latent weights
"""

from ricci_jax.export.bits import num_words, pack_indices, unpack_indices, word_layout
from ricci_jax.export.errors import ExportError, PackedFileError
from ricci_jax.export.file_format import FORMAT, VERSION, load, save
from ricci_jax.export.packed import pack, unpack
from ricci_jax.export.tensors import (
    KINDS,
    RIDGE_TOLERANCE,
    Packed,
    PackedTensor,
    contraction_axes,
    dequantize,
    float_tensor,
    pack_kernel,
    packed_nbytes,
    ridge_blocks,
)
from ricci_jax.models.inspect import COLLECTIONS

__all__ = [
    "COLLECTIONS",
    "FORMAT",
    "KINDS",
    "RIDGE_TOLERANCE",
    "VERSION",
    "ExportError",
    "Packed",
    "PackedFileError",
    "PackedTensor",
    "contraction_axes",
    "dequantize",
    "float_tensor",
    "load",
    "num_words",
    "pack",
    "pack_indices",
    "pack_kernel",
    "packed_nbytes",
    "ridge_blocks",
    "save",
    "unpack",
    "unpack_indices",
    "word_layout",
]
