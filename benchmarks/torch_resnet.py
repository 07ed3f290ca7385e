"""The PyTorch twin of ``rj.models.create("resnet20")``, written plainly, for benchmarks only.

PyTorch is a benchmark-only extra (``pip install -e '.[bench]'``, pinned
``torch==2.13.0``); nothing in ``ricci_jax`` imports it.

The network is the CIFAR ResNet-20 of He et al. (option-A shortcuts), with the
same layer names as the Flax model so weights copy one to one
(:func:`load_flax_variables`): ``conv_init``/``bn_init``, then
``stage{s}_block{b}_conv1``/``_bn1``/``_conv2``/``_bn2``, then ``head``. With
``binary=True`` every block conv (not ``conv_init``, not ``head``) uses
``sign(W)`` (sign(0) = +1) in the forward pass and the clipped STE
``g * 1[|W| <= 1]`` in the backward pass, as ``rj.TensorQuant(bits=1,
estimator="clipped_ste")`` with ``QuantRule(layers="inner")``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

WIDTHS = (16, 32, 64)


class ClippedSTESign(torch.autograd.Function):
  """sign with sign(0) = +1; backward g * 1[|w| <= 1]."""

  @staticmethod
  def forward(ctx, w):  # noqa: D102
    ctx.save_for_backward(w)
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)

  @staticmethod
  def backward(ctx, g):  # noqa: D102
    (w,) = ctx.saved_tensors
    return g * (w.abs() <= 1.0).to(g.dtype)


class BinaryConv2d(nn.Conv2d):
  """A bias-free conv whose weight is binarized by :class:`ClippedSTESign`."""

  def forward(self, x):  # noqa: D102
    return F.conv2d(x, ClippedSTESign.apply(self.weight), None, self.stride, self.padding)


class ResNet20(nn.Module):
  """CIFAR ResNet-20, NCHW, option-A shortcuts; ``binary`` binarizes the block convs."""

  def __init__(self, num_classes: int = 10, binary: bool = True):
    super().__init__()
    conv = BinaryConv2d if binary else nn.Conv2d
    layers: dict[str, nn.Module] = {
        "conv_init": nn.Conv2d(3, WIDTHS[0], 3, 1, 1, bias=False),
        "bn_init": nn.BatchNorm2d(WIDTHS[0]),
    }
    self.plan = []  # (name, in, out, stride)
    cin = WIDTHS[0]
    for s, cout in enumerate(WIDTHS, start=1):
      for b in range(3):
        stride = 2 if (b == 0 and s > 1) else 1
        name = f"stage{s}_block{b}"
        layers[f"{name}_conv1"] = conv(cin, cout, 3, stride, 1, bias=False)
        layers[f"{name}_bn1"] = nn.BatchNorm2d(cout)
        layers[f"{name}_conv2"] = conv(cout, cout, 3, 1, 1, bias=False)
        layers[f"{name}_bn2"] = nn.BatchNorm2d(cout)
        self.plan.append((name, cin, cout, stride))
        cin = cout
    layers["head"] = nn.Linear(WIDTHS[-1], num_classes)
    self.layers = nn.ModuleDict(layers)

  def forward(self, x):  # noqa: D102
    m = self.layers
    x = F.relu(m["bn_init"](m["conv_init"](x)))
    for name, cin, cout, stride in self.plan:
      y = F.relu(m[f"{name}_bn1"](m[f"{name}_conv1"](x)))
      y = m[f"{name}_bn2"](m[f"{name}_conv2"](y))
      sc = x
      if stride != 1 or cin != cout:
        pad = cout - cin
        sc = F.pad(x[:, :, ::stride, ::stride], (0, 0, 0, 0, pad // 2, pad - pad // 2))
      x = F.relu(y + sc)
    return m["head"](x.mean(dim=(2, 3)))


def load_flax_variables(net: ResNet20, params: Mapping[str, Any], batch_stats: Mapping[str, Any]) -> None:
  """Copies a Flax ResNet-20's variables into ``net`` (HWIO -> OIHW, [in, out] -> [out, in])."""
  def t(a):
    return torch.from_numpy(np.array(a)).to(next(net.parameters()).dtype)

  with torch.no_grad():
    for name, module in net.layers.items():
      p = params[name]
      if isinstance(module, nn.Conv2d):
        module.weight.copy_(t(p["kernel"]).permute(3, 2, 0, 1))
      elif isinstance(module, nn.BatchNorm2d):
        module.weight.copy_(t(p["scale"]))
        module.bias.copy_(t(p["bias"]))
        module.running_mean.copy_(t(batch_stats[name]["mean"]))
        module.running_var.copy_(t(batch_stats[name]["var"]))
      elif isinstance(module, nn.Linear):
        module.weight.copy_(t(p["kernel"]).T)
        module.bias.copy_(t(p["bias"]))


def sgd(net: nn.Module, lr: float = 0.1) -> torch.optim.Optimizer:
  """SGD with Nesterov momentum 0.9 and weight decay 5e-4 (the project's ``sgd`` optimizer)."""
  return torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
