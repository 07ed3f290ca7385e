"""Runs the two-device checks in a fresh process (the device count is fixed at jax import)."""

import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).parent


def test_rf_sgd_on_two_devices_matches_one_device():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, str(HERE / "multidevice_rf_sgd.py")], env=env,
                        capture_output=True, text=True, timeout=600, cwd=HERE.parent)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "two-device rf_sgd checks passed" in proc.stdout
