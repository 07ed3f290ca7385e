"""The export's errors."""

from __future__ import annotations


class ExportError(ValueError):
  """A model, parameter tree or kernel that cannot be packed exactly."""


class PackedFileError(ValueError):
  """A file that is not a complete packed model of this format version."""
