"""A test helper shared by the export tests: a packed file's raw header and data, read and written.

The tests use it to build damaged or hand-edited files (a stray byte, a flipped bit, a changed header)
without going through `ricci_jax.export`, whose checks are what they test.
"""

import json
import zlib

import numpy as np


def read_members(path):
  """The packed file's header (the decoded JSON) and its data member (bytes)."""
  with np.load(path) as z:
    return json.loads(zlib.decompress(z["header"].tobytes())), z["data"].tobytes()


def write_members(path, header, data):
  """A packed file with this header (a JSON-able dict) and these data bytes, written as-is."""
  with open(path, "wb") as f:
    np.savez(f, header=np.frombuffer(zlib.compress(json.dumps(header).encode()), np.uint8),
             data=np.frombuffer(data, np.uint8))
