"""ImageNet host-side transforms (numpy + PIL): the crops run on the host, per example.

The images have varied sizes, so they are cropped and resized to a fixed
shape before batching. :class:`ImagenetCrop` is the Grain map transform the
loader applies to each example; its train crop and flip are drawn from a NumPy
generator seeded by ``(seed, epoch, index)`` of that example alone, so a crop
depends neither on the order, nor on which process reads the example, nor on
where a run resumed.
"""

from __future__ import annotations

import dataclasses
import math

import grain
import numpy as np

IMAGENET_SIZE = 224
IMAGENET_RESIZE = 256
IMAGENET_SCALE = (0.08, 1.0)
IMAGENET_RATIO = (3 / 4, 4 / 3)


def imagenet_train_box(
    height: int, width: int, rng: np.random.Generator,
    scale: tuple[float, float] = IMAGENET_SCALE, ratio: tuple[float, float] = IMAGENET_RATIO,
) -> tuple[int, int, int, int]:
  """The random-resized-crop box (Inception / torchvision algorithm).

  Draws an area fraction in ``scale`` and a log-uniform aspect ratio in
  ``ratio`` up to 10 times until the box fits; otherwise takes the largest
  centered box whose ratio is clipped to ``ratio``.

  Returns:
    ``(left, top, right, bottom)`` in pixels, as PIL's ``box``.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = round(math.sqrt(target * aspect))
    h = round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, left + w, top + h
  aspect = width / height
  w, h = width, height
  if aspect < ratio[0]:
    h = round(w / ratio[0])
  elif aspect > ratio[1]:
    w = round(h * ratio[1])
  top, left = (height - h) // 2, (width - w) // 2
  return left, top, left + w, top + h


def imagenet_eval_box(height: int, width: int, resize: int = IMAGENET_RESIZE,
                      crop: int = IMAGENET_SIZE) -> tuple[float, float, float, float]:
  """The box that "resize the shorter side to ``resize``, center crop ``crop``" keeps.

  Returns:
    ``(left, top, right, bottom)`` in the original image's pixels (a centered
    square of side ``crop / resize`` times the shorter side).
  """
  side = min(height, width) * crop / resize
  top, left = (height - side) / 2, (width - side) / 2
  return left, top, left + side, top + side


def imagenet_transform(image: np.ndarray, rng: np.random.Generator | None,
                       size: int = IMAGENET_SIZE) -> np.ndarray:
  """Crops and resizes one decoded ImageNet image to ``size`` x ``size`` (uint8 HWC).

  Args:
    image: uint8 [H, W, 3].
    rng: train: random-resized crop (scale (0.08, 1)) and a horizontal flip
      with probability 1/2, drawn from ``rng``; ``None``: eval, resize 256 and
      center crop 224 (done as one bilinear, antialiased resize of the box).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  h, w = image.shape[:2]
  box = imagenet_eval_box(h, w) if rng is None else imagenet_train_box(h, w, rng)
  out = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR, box=box))
  if rng is not None and rng.random() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


@dataclasses.dataclass(frozen=True)
class ImagenetCrop(grain.transforms.Map):
  """The host crop as a Grain map transform over the loader's examples.

  An example is ``dict(image, label, mask, index, epoch)``; its image is
  replaced by :func:`imagenet_transform`'s crop. Train (``train=True``): the
  random-resized crop and flip from ``numpy.random.default_rng([seed, epoch,
  index])``, a generator of the example itself, never one shared between
  examples or threads (Grain may map examples on several threads). Otherwise
  the deterministic eval crop. Padding examples (``mask`` False) already have
  the output shape and are left alone.
  """

  seed: int
  train: bool

  def map(self, element: dict) -> dict:
    if not element["mask"]:
      return element
    rng = (np.random.default_rng([self.seed, int(element["epoch"]), int(element["index"])])
           if self.train else None)
    return {**element, "image": imagenet_transform(element["image"], rng)}
