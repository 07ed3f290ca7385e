"""The export's errors."""

from __future__ import annotations


class ExportError(ValueError):
  """A model, parameter tree or kernel that cannot be packed exactly."""


class PackedFileError(ValueError):
  """A file that is not a complete packed model of this format version."""


def one_line(e: BaseException) -> str:
  """An exception's name and message on one line, to quote in an error (NumPy's and zipfile's can span several).

  The name is qualified by its module unless it is a builtin (``zipfile.BadZipFile``, ``zlib.error``).
  """
  module = type(e).__module__
  name = type(e).__qualname__ if module == "builtins" else f"{module}.{type(e).__qualname__}"
  return f"{name}: {' '.join(str(e).split())}"
