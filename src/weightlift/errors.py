"""One exception hierarchy, so callers can catch everything weightlift raises with one clause."""

from __future__ import annotations

import os


class WeightliftError(Exception):
    """Base of every error weightlift raises on bad input or failed I/O.

    ``path`` names the file (or checkpoint directory) involved and ``tensor`` the tensor, when
    there is one; the message already contains both, so printing the error is enough.
    """

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None,
                 tensor: str | None = None) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.tensor = tensor
        parts = []
        if self.path is not None:
            parts.append(f"{self.path}:")
        if tensor is not None:
            parts.append(f"tensor {tensor!r}")
        parts.append(message)
        super().__init__(" ".join(parts))


class FormatError(WeightliftError):
    """The file is not a valid safetensors file (header, offsets, dtypes, sizes)."""


class CheckpointError(WeightliftError):
    """The checkpoint layout is wrong: index file, missing or escaping shards, duplicate files."""


class CheckpointWarning(UserWarning):
    """The checkpoint's index and files disagree in a way loaders accept (a tensor the index
    lists that no file stores, a tensor stored twice); the load goes on and its ``LoadReport``
    lists what happened (``missing``, ``notes``)."""


class ReadError(WeightliftError):
    """Reading the data failed: an OS error, a short read, or a file that changed under us."""


class PlacementError(WeightliftError):
    """A tensor could not be placed: unknown device, wrong shape or dtype for a destination."""


class ModelMismatchError(PlacementError, RuntimeError):
    """``weightlift.torch.load_model``: the file's tensors and the model's parameters differ
    (missing or unexpected names). Also a ``RuntimeError``, as torch and safetensors raise."""


class UnsupportedQuantization(PlacementError):
    """A GGML type weightlift cannot dequantize; the tensor still loads packed (without ``dtype=``)."""


class MissingFileError(CheckpointError, FileNotFoundError):
    """A checkpoint file or directory does not exist. Also a ``FileNotFoundError``, so code
    written for ``safetensors`` (``except FileNotFoundError``) keeps working."""

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None,
                 tensor: str | None = None) -> None:
        super().__init__(message, path=path, tensor=tensor)
        self.errno = 2  # ENOENT; strerror stays unset so str() is the message above


class AccessDeniedError(CheckpointError, PermissionError):
    """A checkpoint file exists but may not be read. Also a ``PermissionError``, as safetensors
    raises for it."""

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None,
                 tensor: str | None = None) -> None:
        super().__init__(message, path=path, tensor=tensor)
        self.errno = 13  # EACCES; strerror stays unset so str() is the message above


class SliceError(WeightliftError, IndexError):
    """An index ``get_slice(name)[...]`` cannot serve: out of range, or of a form safetensors'
    slices refuse. Also an ``IndexError``, as numpy and torch raise for such indices; ``tensor``
    names the tensor (messages worded as the reference's may not)."""


class IntegrityError(WeightliftError):
    """A file's SHA-256 is not the expected one: a corrupted or half-downloaded shard.

    ``expected`` and ``actual`` are the hex digests; no tensor of a failed check is returned.
    """

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None,
                 expected: str = "", actual: str = "") -> None:
        super().__init__(message, path=path)
        self.expected = expected
        self.actual = actual
