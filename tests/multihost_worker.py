"""One process of the multi-host test (tests/test_multihost.py): the training program's command line,
plus a record of the examples this process read and, optionally, a SIGKILL of itself at a step.

    python tests/multihost_worker.py RECORD KILL_AT_STEP -- <experiments.train arguments>

RECORD: a JSONL file that gets, per batch this process takes from a training or test split, the split,
epoch, step and the official-split positions of its rows (padding excluded). KILL_AT_STEP: 0 for none;
otherwise the process kills itself (SIGKILL, no clean-up) when the loop asks for the batch after that
many training steps of this invocation.
"""

import json
import os
import signal
import sys

from ricci_jax import data

record_path, kill_at = sys.argv[1], int(sys.argv[2])
argv = sys.argv[sys.argv.index("--") + 1:]
original_epoch = data.Dataset.epoch
taken = {"train": 0}


def recorded_epoch(self, epoch, start_step=0):
  for step, batch in enumerate(original_epoch(self, epoch, start_step), start=start_step):
    if self.shuffle:  # the training split
      if kill_at and taken["train"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
      taken["train"] += 1
    with open(record_path, "a") as f:
      rows = [int(i) for i in batch["index"][batch["mask"]]]
      f.write(json.dumps({"split": self.split, "epoch": epoch, "step": step, "rows": rows,
                          "host_rows": len(batch["index"])}) + "\n")
    yield batch


data.Dataset.epoch = recorded_epoch

from experiments import train  # noqa: E402  (after the patch, as the program's own import would be)

sys.exit(train.main(argv))
