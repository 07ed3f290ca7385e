"""Quantization configs serialise themselves: TensorQuant, QuantConfig and QuantRule to and from JSON."""

import json

import ricci_jax as rj


def test_tensor_quant_to_json_by_hand_and_back():
  spec = rj.TensorQuant(bits=2, estimator="reste", hparams={"o": 3.0}, scale="tensor")
  data = spec.to_json()
  assert data == {"bits": 2, "method": "uniform", "estimator": "reste", "hparams": [["o", 3.0]],
                  "scale": "tensor", "ridge_lambda": 0.01, "ridge_block_size": 128, "ridge_affine": True,
                  "sparsity": None, "alpha": None}
  assert rj.TensorQuant.from_json(json.loads(json.dumps(data))) == spec


def test_quant_config_and_rule_round_trip_through_json_text():
  w1 = rj.TensorQuant(bits=1, estimator="clipped_ste")
  a2 = rj.TensorQuant(bits=2, method="staircase", estimator="clipped_relu")
  config = rj.QuantConfig(weight=w1, act=a2)
  assert rj.QuantConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
  assert rj.QuantConfig.from_json(rj.QuantConfig(weight=w1).to_json()) == rj.QuantConfig(weight=w1)
  rule = rj.QuantRule(layers="all", weight=w1, act=a2, first=rj.QuantConfig(weight=w1),
                      overrides=(("dense.*", rj.QuantConfig(weight=rj.TensorQuant(bits=4))),))
  again = rj.QuantRule.from_json(json.loads(json.dumps(rule.to_json())))
  assert again == rule and again.config_for("dense1", "inner") == rule.config_for("dense1", "inner")
