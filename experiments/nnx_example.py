"""A user's own Flax NNX CNN, binarized with one call and trained with RF-DNN on Fashion-MNIST.

    python -m experiments.nnx_example                  # a few minutes on CPU
    python -m experiments.nnx_example --small          # a few steps (the test suite runs this)

The model below is plain NNX, written without ricci-jax in mind.
``ricci_jax.nnx.quantize`` binarizes its inner layers in place (sign
forward, clipped STE backward; the first conv and the classifier stay float,
the usual BNN practice), ``ricci_jax.nnx.kernel_mask`` tells ``rf_sgd``
which kernels are quantized, and every step feeds ``rf_sgd`` the four
translated gradients of RF-DNN (``ricci_jax.nnx.translated_grads``). Then
the trained model is summarised (``ricci_jax.summary``), packed at its bit
width (``ricci_jax.export.pack``, ``save``) and served from the file
(``ricci_jax.inference.Predictor``, given a fresh ``SmallCNN``: a file cannot
rebuild a user's own class), and the served logits are checked to be the
model's eval-mode logits bit for bit. The
data are read straight from the IDX files (``--data-dir``, default
``$RICCI_JAX_DATA_DIR/fashion-mnist`` or ``/usr/share/datasets/fashion-mnist``).
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import ricci_jax as rj
from ricci_jax import export, inference
from ricci_jax import nnx as rjn
from ricci_jax.data.sources import read_idx

from experiments import cli

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST pixel mean and std on [0, 1]


class SmallCNN(nnx.Module):
  """conv 3x3 16 - BN - ReLU - pool, conv 3x3 32 - BN - ReLU - pool, dense 128 - BN - ReLU, dense 10."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
    self.fc = nnx.Linear(7 * 7 * 32, 128, use_bias=False, rngs=rngs)
    self.bn3 = nnx.BatchNorm(128, momentum=0.9, rngs=rngs)
    self.out = nnx.Linear(128, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.max_pool(nnx.relu(self.bn1(self.conv1(x))), (2, 2), strides=(2, 2))
    x = nnx.max_pool(nnx.relu(self.bn2(self.conv2(x))), (2, 2), strides=(2, 2))
    x = nnx.relu(self.bn3(self.fc(x.reshape(x.shape[0], -1))))
    return self.out(x)


def load(data_dir: pathlib.Path, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Normalised NHWC float32 images and int32 labels of ``split`` ("train" or "t10k")."""
  images = read_idx(data_dir / f"{split}-images-idx3-ubyte.gz")[:limit]
  labels = read_idx(data_dir / f"{split}-labels-idx1-ubyte.gz")[:limit]
  x = (images.astype(np.float32)[..., None] / 255.0 - MEAN) / STD
  return x, labels.astype(np.int32)


def loss_fn(model, batch):
  logits = model(batch["image"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), logits


def ce(model, batch):
  return loss_fn(model, batch)[0]


@nnx.jit
def train_step(model, optimizer, batch):
  (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
  shifted = rjn.translated_grads(model, ce, batch)  # (k1, k2, j1, j2) gradients, tentative only
  optimizer.update(model, grads, translated_grads=shifted)
  return loss, jnp.mean(jnp.argmax(logits, -1) == batch["label"])


@nnx.jit
def predict(model, images):
  return jnp.argmax(model(images), -1)


def evaluate(model, x, y, batch_size=1000) -> float:
  model.eval()
  correct = sum(int(jnp.sum(predict(model, x[i:i + batch_size]) == y[i:i + batch_size]))
                for i in range(0, len(x), batch_size))
  model.train()
  return correct / len(x)


def main(argv=None):
  parser = cli.parser(__doc__)
  default_dir = pathlib.Path(os.environ.get("RICCI_JAX_DATA_DIR", "/usr/share/datasets")) / "fashion-mnist"
  parser.add_argument("--data-dir", type=pathlib.Path, default=default_dir)
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--learning-rate", type=float, default=0.05)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--small", action="store_true", help="a few steps on a few examples (a smoke test)")
  args = parser.parse_args(argv)

  limit = 512 if args.small else None
  x_train, y_train = load(args.data_dir, "train", limit)
  x_test, y_test = load(args.data_dir, "t10k", limit)
  steps_per_epoch = len(x_train) // args.batch_size
  epochs = 1 if args.small else args.epochs
  steps = min(steps_per_epoch, 4) if args.small else steps_per_epoch

  model = SmallCNN(rngs=nnx.Rngs(args.seed))
  rule = rj.QuantRule(layers="inner", weight=rj.TensorQuant(bits=1, estimator="clipped_ste"))
  rjn.quantize(model, rule, jnp.zeros((1, 28, 28, 1)))  # the one call; the input fixes the layer order
  print("layers:", {p: "1-bit" if c else "float" for p, c in rjn.quant_plan(model).items()})

  schedule = optax.cosine_decay_schedule(args.learning_rate, epochs * steps)
  tx = rj.rf_sgd(schedule, quantized=rjn.kernel_mask(model))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  model.train()

  rng = np.random.default_rng(args.seed)
  for epoch in range(epochs):
    order = rng.permutation(len(x_train))
    start, losses, accs = time.perf_counter(), [], []
    for i in range(steps):
      idx = order[i * args.batch_size:(i + 1) * args.batch_size]
      loss, acc = train_step(model, optimizer, {"image": jnp.asarray(x_train[idx]), "label": jnp.asarray(y_train[idx])})
      losses.append(float(loss))
      accs.append(float(acc))
    test_acc = evaluate(model, x_test, y_test)
    print(f"epoch {epoch + 1}/{epochs}: train loss {np.mean(losses):.4f}, train acc {np.mean(accs):.4f}, "
          f"test acc {test_acc:.4f} ({time.perf_counter() - start:.1f} s)")
  model.eval()
  table = rj.summary(model, nnx.state(model), input_shape=(28, 28, 1))
  print(f"summary: {table.params:,} parameters, {table.quantized_params:,} in 1-bit kernels; "
        f"{table.float32_bytes:,} B as float32, {table.packed_bytes:,} B packed")
  images = jnp.asarray(x_test[:256])
  want = np.asarray(nnx.jit(lambda m, v: m(v))(model, images))
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "small_cnn.npz"
    size = export.save(export.pack(nnx.state(model), model, input_shape=(28, 28, 1)), path)
    served = np.asarray(inference.Predictor(path, model=SmallCNN(rngs=nnx.Rngs(0)))(images))
  exact = bool(np.array_equal(served, want))
  print(f"packed file: {size:,} B; served logits equal the model's bit for bit: {exact}")
  return {"loss": float(np.mean(losses)), "test_accuracy": test_acc, "served_exactly": exact}


if __name__ == "__main__":
  sys.exit(cli.run(main))
