"""Stopping a run cleanly on SIGINT or SIGTERM: the step finishes, a checkpoint is written, the run says how
to resume.

Slurm, Kubernetes and preemptible cloud machines send SIGTERM some time before they kill a job, and Ctrl-C
is SIGINT. Left alone, either stops Python wherever it is, an Orbax save included. Inside
:func:`stop_on_signals` they only *ask* the run to stop: :func:`ricci_jax.train.train` reads the request
(:func:`requested`) after every step, saves the state of that step and raises :class:`Interrupted`; the same
command then resumes exactly where it stopped. A second Ctrl-C stops at once (``KeyboardInterrupt``), for
the case where the step itself hangs.

Signal handlers are process-wide, so the library never installs them itself: a program does, for as long
as its ``with stop_on_signals():`` block runs (the training programs in ``experiments/`` do; so can a
notebook). Without it a run behaves as any Python code does.

In a run of several processes each process's request is shared at the steps where logs are written
(:func:`agreed`), so that every process stops after the same step and their checkpoint is one.
"""

from __future__ import annotations

import contextlib
import contextvars
import signal
import threading
from collections.abc import Iterator, Sequence

import jax
import numpy as np

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
  """A run stopped on a signal after saving the checkpoint of its last step.

  Attributes:
    step: the step the checkpoint holds (the same command resumes from it).
    signum: the signal's number; ``exit_code`` is the shell's convention, 128 + signum (130, 143).
  """

  def __init__(self, step: int, signum: int):
    super().__init__(f"interrupted at step {step}; the same command resumes")
    self.step, self.signum = step, signum

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


class StopRequest:
  """The signal that asked for a stop (``signum``), None until one arrives."""

  def __init__(self):
    self.signum: int | None = None


_REQUEST: contextvars.ContextVar[StopRequest | None] = contextvars.ContextVar("ricci_jax_stop", default=None)


@contextlib.contextmanager
def stop_on_signals(signals: Sequence[int] = SIGNALS) -> Iterator[StopRequest]:
  """Within the block, ``signals`` ask the running training to stop after its step instead of killing it.

  Installs process-wide handlers (from the main thread only, as Python requires) and restores the
  previous ones on exit. A second SIGINT while a stop is pending raises ``KeyboardInterrupt`` at once.
  """
  if threading.current_thread() is not threading.main_thread():
    raise RuntimeError("stop_on_signals() installs signal handlers, which only the main thread can do")
  request = StopRequest()

  def handler(signum, frame):
    del frame
    if request.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    request.signum = signum

  previous = {s: signal.signal(s, handler) for s in signals}
  token = _REQUEST.set(request)
  try:
    yield request
  finally:
    _REQUEST.reset(token)
    for s, h in previous.items():
      signal.signal(s, h)


def requested() -> int | None:
  """The signal that asked the current training to stop (within :func:`stop_on_signals`), else None."""
  request = _REQUEST.get()
  return None if request is None else request.signum


def agreed(local: int | None) -> int | None:
  """A stop request shared by every process (the largest signal number any asked with), else None.

  A collective: every process must call it at the same step. With one process it is ``local``.
  """
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # noqa: PLC0415

  return int(np.max(multihost_utils.process_allgather(np.int32(local or 0)))) or None
