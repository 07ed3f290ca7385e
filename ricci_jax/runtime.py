"""CPU runtime settings for training: XLA CPU options and the allocator.

Two settings make the binarized CIFAR ResNet-20 train step faster on the
CPU and change nothing in the model or its results beyond the last bits (the
measured times, profiles and page-fault counts: ``benchmarks/README.md``):

* **XLA CPU options** (:data:`XLA_CPU_OPTIONS`), passed per compilation
  (``jax.jit(..., compiler_options=compiler_options())``). They route
  convolutions to XLA's Eigen kernels instead of YNNPACK (YNNPACK computes a
  3x3 weight gradient through a 9x im2col buffer, the largest item of the
  stock profile) and give the elementwise ops to YNNPACK, which stops XLA from
  recomputing whole BatchNorm/ReLU/residual chains inside the strided
  transposes that feed the weight gradients.
* **glibc malloc** (:func:`tune_malloc`): one arena, no ``mmap`` for large
  blocks and no trimming of the heap top, so the temporaries that XLA
  allocates and frees every step are reused instead of being mapped afresh
  (the page faults and system time of mapping them go away), at the cost of
  keeping the peak heap resident.

Nothing here runs at import. The training program calls :func:`configure_cpu`
first thing and jits its steps with :func:`compiler_options`; other programs
may do the same. Everything is overridable:

* ``RICCI_JAX_CPU_TUNING=0`` turns both settings off;
  ``RICCI_JAX_XLA_OPTIONS=0`` or ``RICCI_JAX_MALLOC_TUNING=0`` one of them;
* a flag the user sets in ``XLA_FLAGS`` always wins over ours (we never pass
  an option whose name appears there);
* on a backend other than the CPU, :func:`compiler_options` returns ``{}``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import warnings
from collections.abc import Mapping
from typing import Any

XLA_CPU_OPTIONS: Mapping[str, Any] = {
    # Default in jaxlib 0.10: INDIVIDUAL_DOT, INDIVIDUAL_CONVOLUTION, REDUCE.
    "xla_cpu_experimental_ynn_fusion_type": (
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_ELTWISE"),
}
"""XLA CPU debug options applied by :func:`compiler_options` (names as in ``XLA_FLAGS``)."""

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
MALLOC_TRIM_THRESHOLD = -1
"""glibc's trim threshold: -1 never returns the free top of the heap to the system."""

_state: dict[str, Any] = {"malloc": None, "validated": None}


def _enabled(name: str) -> bool:
  """False if the environment turns the setting ``name`` (or all tuning) off."""
  off = ("0", "false", "no", "off")
  if os.environ.get("RICCI_JAX_CPU_TUNING", "1").strip().lower() in off:
    return False
  return os.environ.get(name, "1").strip().lower() not in off


def user_xla_flags() -> set[str]:
  """The option names the user set in ``XLA_FLAGS`` (without the leading dashes)."""
  names = set()
  for token in os.environ.get("XLA_FLAGS", "").split():
    if token.startswith("--"):
      names.add(token[2:].split("=", 1)[0])
  return names


def _backend_is_cpu(backend: str | None) -> bool:
  import jax  # noqa: PLC0415 - keep this module importable before jax is configured

  return (backend or jax.default_backend()) == "cpu"


def _validated(options: dict[str, Any]) -> dict[str, Any]:
  """``options`` if this jaxlib accepts them (checked once on a tiny program), else ``{}``."""
  if not options:
    return options
  key = tuple(sorted(options.items()))
  if _state["validated"] is not None and _state["validated"][0] == key:
    return dict(_state["validated"][1])
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  try:
    jax.jit(lambda x: x + 1).lower(jnp.zeros((), jnp.float32)).compile(options)
    good = dict(options)
  except Exception as err:  # noqa: BLE001 - any rejection means: do not use them
    warnings.warn(f"ricci_jax.runtime: this jaxlib rejects the XLA CPU options {sorted(options)} "
                  f"({type(err).__name__}: {str(err)[:200]}); compiling without them", stacklevel=3)
    good = {}
  _state["validated"] = (key, good)
  return dict(good)


def compiler_options(backend: str | None = None) -> dict[str, Any]:
  """XLA options for ``jax.jit(..., compiler_options=...)`` on the CPU.

  Returns :data:`XLA_CPU_OPTIONS` minus every option the user set in
  ``XLA_FLAGS``; ``{}`` on other backends, when ``RICCI_JAX_XLA_OPTIONS=0`` or
  ``RICCI_JAX_CPU_TUNING=0``, or when this jaxlib does not know the options
  (with a warning).

  Args:
    backend: the backend the function will run on (default: JAX's default).
  """
  if not _enabled("RICCI_JAX_XLA_OPTIONS") or not _backend_is_cpu(backend):
    return {}
  mine = {k: v for k, v in XLA_CPU_OPTIONS.items() if k not in user_xla_flags()}
  return _validated(mine)


def tune_malloc() -> bool:
  """Makes glibc malloc reuse large blocks instead of mapping them afresh.

  Sets one arena (so XLA's worker threads allocate from the main heap), no
  ``mmap`` for large blocks, and no trimming of the heap top
  (:data:`MALLOC_TRIM_THRESHOLD`). Call it before JAX
  starts its backend: threads created earlier keep their own arena, whose
  large blocks are still mapped per allocation. Does nothing (returns False)
  off glibc, when ``RICCI_JAX_MALLOC_TUNING=0`` or ``RICCI_JAX_CPU_TUNING=0``,
  or if glibc refuses a setting. Idempotent.

  Returns:
    Whether the settings are in effect.
  """
  if _state["malloc"] is not None:
    return _state["malloc"]
  ok = False
  if _enabled("RICCI_JAX_MALLOC_TUNING") and platform.system() == "Linux" and \
      platform.libc_ver()[0] == "glibc":
    try:
      libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
      ok = all(libc.mallopt(param, value) == 1 for param, value in (
          (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)))
    except (OSError, AttributeError):
      ok = False
  _state["malloc"] = ok
  return ok


def configure_cpu() -> dict[str, Any]:
  """Applies the process-wide CPU settings of this module; call it first in a training program.

  Tunes malloc (:func:`tune_malloc`); warns if JAX's backend has already
  started, since its worker threads then keep their own malloc arenas. The XLA
  options are per compilation: pass :func:`compiler_options` to ``jax.jit``
  (they are not put in ``XLA_FLAGS``, where an option unknown to a later
  jaxlib would abort the process). Idempotent.

  Returns:
    ``{"malloc": bool, "xla_options": dict, "backend_was_initialized": bool}``.
  """
  from jax._src import xla_bridge  # noqa: PLC0415

  was_initialized = xla_bridge.backends_are_initialized()
  if was_initialized and _state["malloc"] is None and _enabled("RICCI_JAX_MALLOC_TUNING"):
    warnings.warn("ricci_jax.runtime.configure_cpu() called after JAX started its backend: XLA's "
                  "threads keep their malloc arenas and large temporaries may still be mapped "
                  "afresh every step; call it before the first JAX computation", stacklevel=2)
  malloc = tune_malloc()
  return {"malloc": malloc, "xla_options": compiler_options(),
          "backend_was_initialized": was_initialized}
