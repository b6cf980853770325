"""A drop-in for ``safetensors.safe_open`` (the read side), so switching costs one import line.

    from weightlift import safe_open          # was: from safetensors import safe_open
    with safe_open("model.safetensors", framework="pt", device="cpu") as f:
        emb = f.get_slice("embed.weight")[:, 128:256]   # reads only those bytes

Whole tensors go through the same path as ``weightlift.load``; a slice is planned by
``slicing.plan_slice`` and only the byte ranges it covers are read, with the chosen strategy.
Beyond the reference: ``framework="np"`` returns bfloat16 and float8 arrays (via ``ml_dtypes``),
and the source may be any checkpoint ``weightlift.load`` accepts (directory, index, hub cache).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar, Union

import numpy as np
import torch

from . import api
from .advanced import has_advanced, split_index
from .budget import resolve_budget
from .errors import AccessDeniedError, CheckpointError, MissingFileError, WeightliftError
from .io import NAMES, Strategy, make_strategy
from .io.auto import choose, gather
from .place import parse_device
from .slicing import Index, plan_slice, reference_numpy_index
from .sources import Source
from .sources.records import Entry, Layout, iter_entries

Array = Union[torch.Tensor, np.ndarray]
F = TypeVar("F", bound=Callable[..., Any])

#: ``safe_open(..., backend=...)`` of safetensors >= 0.8 → the weightlift strategy doing the same:
#: ``pread`` reads into buffers and drops each range from the page cache behind it.
BACKENDS = {"mmap": "mmap", "pread": "stream"}

#: Framework names the reference accepts for the frameworks weightlift serves.
FRAMEWORKS = {"pt": "pt", "torch": "pt", "pytorch": "pt", "np": "np", "numpy": "np"}
#: safetensors dtype → numpy dtype name; names numpy lacks come from ml_dtypes.
NUMPY_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32",
    "F64": "float64", "I64": "int64", "U64": "uint64", "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu",
}


def _reference_error() -> type[Exception] | None:
    """``safetensors.SafetensorError`` when the package is importable; weightlift never needs it."""
    try:
        from safetensors import SafetensorError
    except ImportError:
        return None
    return SafetensorError


@functools.cache
def reference_compatible(cls: type[Exception]) -> type[Exception]:
    """``cls`` made catchable as ``safetensors.SafetensorError`` too (``cls`` itself without it).

    >>> issubclass(reference_compatible(CheckpointError), CheckpointError)
    True
    """
    base = _reference_error()
    if base is None or issubclass(cls, base):
        return cls
    def reduce(self: BaseException) -> tuple[object, ...]:
        return (cls, self.args, dict(self.__dict__))  # pickles as the plain weightlift class

    return type(cls.__name__, (cls, base), {"__module__": cls.__module__,
                                            "__qualname__": cls.__qualname__,
                                            "__reduce__": reduce})


def reference_errors(function: F) -> F:
    """Re-raise weightlift errors of ``function`` as classes also deriving from
    ``SafetensorError``, so code written for safetensors catches them; nothing else changes."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except WeightliftError as exc:
            exc.__class__ = reference_compatible(type(exc))
            raise

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def reference_open_errors(filename: Source) -> Iterator[None]:
    """Opening ``filename`` fails as with the reference when the file itself is the problem:
    ``FileNotFoundError`` saying ``No such file or directory: <filename>``, and
    ``PermissionError`` when it may not be read. Both stay weightlift errors (``path`` set)."""
    try:
        yield
    except MissingFileError as exc:
        if not _is_file(filename, exc.path) or os.path.exists(exc.path or ""):
            raise  # a shard an index names is missing, not the file itself
        name = os.fspath(filename)  # type: ignore[arg-type]
        error = MissingFileError(f"No such file or directory: {name}")
        error.path = exc.path
        raise error from None
    except WeightliftError as exc:
        if not isinstance(exc.__cause__, PermissionError) or not _is_file(filename, exc.path):
            raise
        denied = AccessDeniedError(str(exc))
        denied.path, denied.tensor = exc.path, exc.tensor
        raise denied from exc.__cause__


def _is_file(filename: Source, path: str | None) -> bool:
    """Whether ``path`` (from an error) is the file ``filename`` names."""
    if path is None or not isinstance(filename, (str, os.PathLike)):
        return False
    return Path(path) == Path(os.fspath(filename))


def _usage_error(message: str) -> Exception:
    """A ``ValueError`` (catchable as ``SafetensorError`` where the reference raises that)."""
    return reference_compatible(ValueError)(message)


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of safetensors dtype ``name``; bfloat16 and float8 need ``ml_dtypes``."""
    if name not in NUMPY_DTYPES:
        raise WeightliftError(f"dtype {name} has no numpy equivalent: use framework='pt'")
    numpy_name = NUMPY_DTYPES[name]
    if hasattr(np, numpy_name):
        return np.dtype(numpy_name)
    try:
        import ml_dtypes
    except ImportError:
        raise WeightliftError(f"dtype {name} has no numpy equivalent without the ml_dtypes "
                              "package: pip install ml_dtypes, or use framework='pt'") from None
    return np.dtype(getattr(ml_dtypes, numpy_name))


def to_numpy(tensor: torch.Tensor, dtype_name: str) -> np.ndarray:
    """A CPU tensor as a numpy array sharing its memory (bf16/f8 through their bytes)."""
    tensor = tensor.contiguous()
    raw = tensor.reshape(-1).view(torch.uint8).numpy()
    return raw.view(numpy_dtype(dtype_name)).reshape(tuple(tensor.shape))


class safe_open:  # noqa: N801 - the name safetensors users already import
    """Open a checkpoint lazily; tensors are read when asked for.

    ``framework``: ``"pt"`` (torch tensors) or ``"np"`` (numpy arrays, CPU only). ``device``: a
    torch device, a device string, or a CUDA index like the reference's ``device=0``.
    ``strategy``: how bytes are read (``"auto"``, ``"mmap"``, ``"direct"``, ``"stream"``);
    ``backend`` (the reference's ``"mmap"`` or ``"pread"``) picks ``mmap`` or ``stream`` when no
    strategy is named. Errors are catchable as ``safetensors.SafetensorError`` when that package
    is installed; a missing file raises ``FileNotFoundError`` and an unreadable one
    ``PermissionError``, as with the reference. With ``framework="np"`` slices are checked as the
    reference checks them (strict bounds, its messages); with ``"pt"`` they follow torch.

    Slices are read with one strategy prepared on first use and kept until ``close``. Unlike the
    reference, a handle refuses use after its ``with`` block, slices included.
    """

    @reference_errors
    def __init__(self, filename: Source, framework: str = "pt",
                 device: str | int | torch.device = "cpu", *, strategy: str | None = None,
                 backend: str | None = None) -> None:
        if framework not in FRAMEWORKS:
            raise _usage_error(f"framework {framework!r} is not supported; weightlift serves "
                               f"{', '.join(sorted(FRAMEWORKS))}")
        strategy = strategy_for(strategy, backend)
        self.framework = FRAMEWORKS[framework]
        self.device = parse_device(f"cuda:{device}" if isinstance(device, int) else device)
        if self.framework == "np" and self.device.type != "cpu":
            raise ValueError(f"framework='np' returns host arrays; device {device!r} is not 'cpu'")
        self.strategy = strategy
        with reference_open_errors(filename):
            self._checkpoint: api.Checkpoint | None = api.open(filename)
        self._reader: Strategy | None = None

    # -- the reference's methods -----------------------------------------------------------

    @reference_errors
    def keys(self) -> list[str]:
        """Tensor names, sorted."""
        return sorted(self._layout().entries)

    @reference_errors
    def offset_keys(self) -> list[str]:
        """Tensor names in the order their bytes appear (file by file)."""
        return [entry.name for entry in iter_entries(self._layout())]

    @reference_errors
    def metadata(self) -> dict[str, str] | None:
        """The header's ``__metadata__`` (an index's ``metadata`` for a sharded checkpoint)."""
        return self._layout().metadata

    @reference_errors
    def get_tensor(self, name: str) -> Array:
        """The whole tensor ``name``."""
        checkpoint = self._open_checkpoint()
        tensor = checkpoint.get_tensor(name, device=self.device, strategy=self.strategy)
        return self._convert(tensor, checkpoint.layout.entries[name])

    @reference_errors
    def get_tensors(self) -> dict[str, Array]:
        """Every tensor, in file order, read as one load."""
        layout = self._layout()
        tensors = api.run_load(layout, keys=None, device=self.device, strategy=self.strategy,
                           dtype=None, streaming=False)
        return {name: self._convert(tensor, layout.entries[name]) for name, tensor in tensors}

    @reference_errors
    def get_slice(self, name: str) -> TensorSlice:
        """A handle that reads only what an index selects: ``f.get_slice("w")[:, 128:256]``."""
        return TensorSlice(self, next(iter_entries(self._layout(), [name])))

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._checkpoint is not None:
            self._checkpoint.close()
            self._checkpoint = None

    def __enter__(self) -> safe_open:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------

    def _open_checkpoint(self) -> api.Checkpoint:
        if self._checkpoint is None:
            raise CheckpointError("file is closed: use the handle inside its `with` block")
        return self._checkpoint

    def _layout(self) -> Layout:
        return self._open_checkpoint().layout

    def _convert(self, tensor: torch.Tensor, entry: Entry) -> Array:
        if self.framework == "np":
            return to_numpy(tensor, entry.info.dtype.name)
        return tensor

    def _slice_reader(self) -> Strategy:
        """One strategy for all slices of this handle, prepared on first use."""
        if self._reader is None:
            layout = self._layout()
            name = self.strategy
            if name == "auto":
                facts = gather(layout.shards, total_bytes=layout.total_bytes,
                               device=self.device.type, copying=False)
                name = choose(facts).strategy
            # prepare_strategy falls back to stream where O_DIRECT is refused, as loads do.
            self._reader = api.prepare_strategy(make_strategy(name), layout,
                                        SimpleNamespace(strategy=name, fallbacks=[]))
        return self._reader

    def _read_slice(self, entry: Entry, index: Index) -> Array:
        from .distributed.direct import read_direct

        layout = self._layout()
        rest = None
        if self.framework == "np":  # the reference's numpy slices: strict bounds, its messages
            index = reference_numpy_index(entry.info.shape, index, entry.name)
        elif has_advanced(index):  # lists and tensors: read the block holding them, then index it
            index, rest = split_index(entry.info.shape, index, entry.name)
        plan_slice(entry.info, index)  # raise IndexError & co. before preparing anything
        out: dict[str, torch.Tensor] = {}
        read_direct(layout, {entry.name: index}, self._slice_reader(),
                    budget=resolve_budget(None), max_gap=None, device=self.device, local=out)
        tensor = out[entry.name]
        if rest is not None:
            tensor = _index(tensor, rest)
        return self._convert(tensor, entry)


def _index(tensor: torch.Tensor, rest: tuple[Any, ...]) -> torch.Tensor:
    """``tensor[rest]`` for any dtype: dtypes without indexing kernels (float8) go as bytes."""
    rest = tuple(r.to(tensor.device) if isinstance(r, torch.Tensor) else r for r in rest)
    try:
        return tensor[rest].contiguous()
    except (RuntimeError, NotImplementedError):
        width = tensor.element_size()
        raw = tensor.contiguous().view(torch.uint8).reshape(*tensor.shape, width)
        return raw[rest].contiguous().view(tensor.dtype).squeeze(-1)


class TensorSlice:
    """``safe_open(...).get_slice(name)``: shape and dtype now, bytes when indexed."""

    def __init__(self, handle: safe_open, entry: Entry) -> None:
        self._handle = handle
        self._entry = entry

    def get_shape(self) -> list[int]:
        return list(self._entry.info.shape)

    def get_dtype(self) -> str:
        """The safetensors dtype name, e.g. ``"BF16"``."""
        return self._entry.info.dtype.name

    @reference_errors
    def __getitem__(self, index: Any) -> Array:
        return self._handle._read_slice(self._entry, index)

    def __repr__(self) -> str:
        return (f"TensorSlice({self._entry.name!r}, dtype={self.get_dtype()}, "
                f"shape={self.get_shape()})")


def strategy_for(strategy: str | None, backend: str | None) -> str:
    """The strategy to read with: ``strategy`` if named, else the one doing what the reference's
    ``backend`` does, else ``"auto"``."""
    if backend is not None and backend not in BACKENDS:
        raise _usage_error(f"backend {backend!r} is invalid (expected one of: "
                           f"{', '.join(map(repr, BACKENDS))})")
    if strategy is None:
        return BACKENDS[backend] if backend is not None else "auto"
    if strategy not in NAMES:
        raise _usage_error(f"unknown strategy {strategy!r}; choose one of {', '.join(NAMES)}")
    return strategy


__all__ = ["BACKENDS", "FRAMEWORKS", "NUMPY_DTYPES", "TensorSlice", "numpy_dtype", "reference_compatible",
           "reference_errors", "reference_open_errors", "safe_open", "strategy_for", "to_numpy"]
