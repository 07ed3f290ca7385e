"""Shared test settings: float64 is not enabled; tests run on CPU."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
