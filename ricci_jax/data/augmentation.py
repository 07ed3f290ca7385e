"""On-device train-time augmentation and normalisation (jit-compiled JAX).

The host yields ``uint8`` batches; these run on the device, so a CPU training
loop spends almost no host time on input. :func:`augment` is a deterministic
function of its PRNG key.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ricci_jax.data.checks import check_int
from ricci_jax.data.specs import DatasetSpec, get_spec

Array = jax.Array


def _normalize(spec: DatasetSpec, images: Array) -> Array:
  if images.ndim != 4 or images.shape[-1] != len(spec.mean):
    raise ValueError(f"{spec.name} images must be [batch, H, W, {len(spec.mean)}], got {images.shape}")
  mean = jnp.asarray(spec.mean, jnp.float32) * 255.0
  inv_std = 1.0 / (jnp.asarray(spec.std, jnp.float32) * 255.0)
  return (images.astype(jnp.float32) - mean) * inv_std


def _random_crop(key: Array, images: Array, pad: int) -> Array:
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = jax.random.randint(key, (b, 2), 0, 2 * pad + 1)
  crop = lambda img, o: lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def _random_flip(key: Array, images: Array) -> Array:
  flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
  return jnp.where(flip, images[:, :, ::-1, :], images)


@functools.partial(jax.jit, static_argnames=("name", "pad", "flip"))
def augment(name: str, rng: Array, images: Array, *, pad: int | None = None,
            flip: bool | None = None) -> Array:
  """Train-time augmentation and normalisation, on the device (jit-compiled).

  CIFAR: zero-pad by 4, random 32x32 crop, random horizontal flip, then
  per-channel normalisation. MNIST family: normalisation only. ImageNet:
  normalisation only (the random-resized crop and flip run on the host).

  Args:
    name: a name in :data:`DATASETS` (static).
    rng: a PRNG key; the output is a deterministic function of it.
    images: uint8 [batch, H, W, C].
    pad: random-crop padding, default the dataset's (0 turns the crop off).
    flip: random horizontal flip, default the dataset's.

  Returns:
    float32 [batch, H, W, C], ``(x / 255 - mean) / std``.
  """
  spec = get_spec(name)
  pad = spec.pad if pad is None else check_int("pad", pad, 0)
  flip = spec.flip if flip is None else bool(flip)
  images = jnp.asarray(images)
  crop_key, flip_key = jax.random.split(rng)
  if pad:
    images = _random_crop(crop_key, images, pad)
  if flip:
    images = _random_flip(flip_key, images)
  return _normalize(spec, images)


@functools.partial(jax.jit, static_argnames=("name",))
def preprocess(name: str, images: Array) -> Array:
  """Eval-time normalisation (jit-compiled): uint8 [batch, H, W, C] -> float32."""
  return _normalize(get_spec(name), jnp.asarray(images))
