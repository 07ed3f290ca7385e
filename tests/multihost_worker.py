"""One process of the multi-host test (tests/test_multihost.py): the training program's command line,
plus a record of the examples this process read and, optionally, a SIGKILL of itself at a step.

    python tests/multihost_worker.py RECORD KILL_AT_STEP -- <experiments.train arguments>

RECORD: a JSONL file that gets, per batch this process takes from a training or test split, the split,
epoch, step and the official-split positions of its rows (padding excluded). KILL_AT_STEP: 0 for none;
otherwise the process kills itself (SIGKILL, no clean-up) when the loop asks for the batch after that
many training steps of this invocation.

The training loop takes its training batches from ``Dataset.iterator`` (a Grain iterator it checkpoints)
and its test batches from ``Dataset.epoch``; both are wrapped here.
"""

import json
import os
import signal
import sys

import grain

from ricci_jax import data

record_path, kill_at = sys.argv[1], int(sys.argv[2])
argv = sys.argv[sys.argv.index("--") + 1:]
original_iterator, original_epoch = data.Dataset.iterator, data.Dataset.epoch
taken = {"train": 0}


def record(ds, epoch, step, batch):
  with open(record_path, "a") as f:
    rows = [int(i) for i in batch["index"][batch["mask"]]]
    f.write(json.dumps({"split": ds.split, "epoch": epoch, "step": step, "rows": rows,
                        "host_rows": len(batch["index"])}) + "\n")


class RecordedIterator:
  """The training iterator, recording each batch taken (and killing the process at KILL_AT_STEP)."""

  def __init__(self, ds, iterator):
    self.ds, self.iterator = ds, iterator

  def __iter__(self):
    return self

  def __next__(self):
    at = grain.experimental.get_next_index(self.iterator)  # the run step of the batch asked for
    if kill_at and taken["train"] == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
    batch = next(self.iterator)
    taken["train"] += 1
    record(self.ds, *divmod(at, self.ds.steps_per_epoch), batch)
    return batch

  def get_state(self):
    return self.iterator.get_state()

  def set_state(self, state):
    self.iterator.set_state(state)


def recorded_iterator(self, step=0, state=None):
  return RecordedIterator(self, original_iterator(self, step, state))


def recorded_epoch(self, epoch, start_step=0):
  for step, batch in enumerate(original_epoch(self, epoch, start_step), start=start_step):
    record(self, epoch, step, batch)
    yield batch


data.Dataset.iterator = recorded_iterator
data.Dataset.epoch = recorded_epoch

from experiments import cli, train  # noqa: E402  (after the patch, as the program's own import would be)

sys.exit(cli.run(train.main, argv))
