"""The records every format produces, and the dtype table they share.

A parser (``safetensors``, ``gguf``) turns a file's header into a ``Header`` of immutable
``TensorInfo`` records with absolute byte ranges, so planning, every strategy, the budget and
the report never branch on the format. ``pread_exact`` and ``open_regular`` are the two file
helpers both parsers and the local source read through.
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..errors import FormatError, MissingFileError, WeightliftError

if TYPE_CHECKING:
    from .ggml import GGMLType


@dataclass(frozen=True)
class DType:
    """A dtype: its name in safetensors headers (GGUF's plain types map onto these), its torch
    dtype, and its size in bytes."""

    name: str
    torch: torch.dtype
    itemsize: int
    #: Elements per torch element: 2 for F4, whose torch dtype packs two 4-bit values in a byte.
    pack: int = 1


def _dtype_table() -> dict[str, DType]:
    # name → torch attribute; dtypes this torch build lacks are left out (and reported as such).
    names = {
        "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
        "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32",
        "F32": "float32", "F64": "float64", "I64": "int64", "U64": "uint64",
        "C64": "complex64",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
        "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
        "F8_E8M0": "float8_e8m0fnu", "F4": "float4_e2m1fn_x2",
    }
    packed = {"F4": 2}  # the file's shape counts 4-bit elements; torch's last dim counts pairs
    table = {}
    for name, attr in names.items():
        dt = getattr(torch, attr, None)
        if dt is not None:
            table[name] = DType(name, dt, torch.empty((), dtype=dt).element_size(),
                                packed.get(name, 1))
    return table


#: Every safetensors dtype this torch can represent, by header name.
DTYPES: dict[str, DType] = _dtype_table()
#: torch dtype → safetensors dtype, for writers and for error messages.
DTYPE_OF_TORCH: dict[torch.dtype, DType] = {d.torch: d for d in DTYPES.values()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: absolute byte range ``[start, end)`` in its file.

    GGUF tensors also carry their GGML type and logical shape (``ggml_shape``); a quantized one
    is stored as ``uint8`` of shape ``(*ggml_shape[:-1], row_bytes)``.
    """

    name: str
    dtype: DType
    shape: tuple[int, ...]
    start: int
    end: int
    ggml: GGMLType | None = None
    ggml_shape: tuple[int, ...] | None = None

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """The torch tensor's shape: ``shape``, but packed dtypes (F4) halve the last dim."""
        if self.dtype.pack == 1:
            return self.shape
        return (*self.shape[:-1], self.shape[-1] // self.dtype.pack)


@dataclass(frozen=True)
class Header:
    """A validated header. ``tensors`` is in file order (by start offset, then name)."""

    path: str
    file_size: int
    data_start: int
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str] | None = field(default=None, hash=False)

    @property
    def data_size(self) -> int:
        return self.file_size - self.data_start

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


def pread_exact(fd: int, n: int, offset: int) -> bytes:
    """Read up to ``n`` bytes at ``offset``, retrying short reads; shorter only at end of file."""
    chunks = []
    while n > 0:
        chunk = os.pread(fd, min(n, 1 << 26), offset)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def open_regular(path: str, error: type[WeightliftError] = FormatError,
                 opened: list[int] | None = None) -> int:
    """Open ``path`` read-only, refusing anything but a regular file with ``error``.

    A FIFO would block ``open`` until some writer came along, and a directory or a device has no
    safetensors bytes, so the open does not wait and the type is checked on the descriptor.
    ``opened``: the caller's list the descriptor is appended to as ``open`` returns (by C code:
    a signal's handler raising right after ``open`` cannot lose it), for it to close on an
    interrupt before it stored the number; a refused file's is taken out again, and closed.
    """
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    opened = [] if opened is None else opened
    try:
        opened.extend(map(os.open, (path,), (flags | getattr(os, "O_NONBLOCK", 0),)))
    except FileNotFoundError:
        raise MissingFileError("file not found", path=path) from None
    except OSError as exc:
        raise error(f"cannot open: {exc.strerror}", path=path) from exc
    fd = opened[-1]
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise error(f"is {kind}, not a safetensors file", path=path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except OSError as exc:
        os.close(opened.pop())
        raise error(f"cannot inspect: {exc.strerror}", path=path) from exc
    except BaseException:
        os.close(opened.pop())
        raise
    return fd


__all__ = ["DTYPES", "DTYPE_OF_TORCH", "DType", "Header", "TensorInfo", "open_regular",
           "pread_exact"]
