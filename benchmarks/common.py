"""What every benchmark script shares: saving its result."""

from __future__ import annotations

import json
import pathlib
from typing import Any


def save_json(result: Any, path: str | pathlib.Path) -> pathlib.Path:
  """Writes ``result`` as indented JSON to ``path`` (creating its folder) and says so."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=2) + "\n")
  print(f"saved {path}")
  return path
