"""Checkpoint file formats: each parser turns a file's header into the same ``Header`` of
``TensorInfo`` records (absolute byte ranges), so planning and reading never branch on format.

    header = read_any_header("model.gguf", fd)   # by magic bytes: GGUF, else safetensors

One module per format (``safetensors``, ``gguf``, with GGML's type table in ``ggml``), all
producing the records of ``records`` (``Header``, ``TensorInfo``, the dtype table). A new format
is a new module here plus a line in ``read_any_header``.
"""

from __future__ import annotations

from ..errors import FormatError
from .gguf import MAGIC, read_gguf
from .records import Header, pread_exact
from .safetensors import read_header


def read_any_header(path: str, fd: int) -> Header:
    """The validated header of the open file ``fd``: GGUF if it starts with ``GGUF`` or is named
    ``*.gguf``, else safetensors."""
    try:
        magic = pread_exact(fd, 4, 0)
    except OSError as exc:
        raise FormatError(f"cannot read the first bytes: {exc.strerror}", path=path) from exc
    if magic == MAGIC or path.endswith(".gguf"):
        return read_gguf(path, fd)
    return read_header(path, fd=fd)


__all__ = ["read_any_header"]
