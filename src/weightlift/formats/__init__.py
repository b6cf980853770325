"""Checkpoint file formats: each parser turns a file's header into the same ``Header`` of
``TensorInfo`` records (absolute byte ranges), so planning and reading never branch on format.

    header = read_any_header("model.gguf", fd)   # by magic bytes: GGUF, else safetensors

Safetensors lives in ``weightlift.format`` (many modules import it from there); GGUF in
``weightlift.formats.gguf``.
"""

from __future__ import annotations

from ..errors import FormatError
from ..format import Header, _pread_exact, read_header
from .gguf import MAGIC, read_gguf


def read_any_header(path: str, fd: int) -> Header:
    """The validated header of the open file ``fd``: GGUF if it starts with ``GGUF`` or is named
    ``*.gguf``, else safetensors."""
    try:
        magic = _pread_exact(fd, 4, 0)
    except OSError as exc:
        raise FormatError(f"cannot read the first bytes: {exc.strerror}", path=path) from exc
    if magic == MAGIC or path.endswith(".gguf"):
        return read_gguf(path, fd)
    return read_header(path, fd=fd)


__all__ = ["read_any_header"]
