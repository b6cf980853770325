"""weightlift: load model checkpoints into tensors fast, with bounded host memory.

    import weightlift
    state = weightlift.load("path/to/checkpoint", device="cuda")

Drop-ins: ``weightlift.safe_open`` (like ``safetensors.safe_open``),
``weightlift.torch.load_file``/``load_model`` and ``weightlift.numpy.load_file``.
Tensor-parallel loading: ``weightlift.distributed``.
"""

from .api import Checkpoint, TensorDescription, load, open, stream
from .compat import safe_open
from .errors import (CheckpointError, CheckpointWarning, FormatError, IntegrityError,
                     MissingFileError, PlacementError, ReadError, WeightliftError)
from .load_into import LoadIntoResult, load_into
from .remote import RemoteSource
from .report import LoadReport

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointWarning",
    "FormatError",
    "IntegrityError",
    "LoadIntoResult",
    "LoadReport",
    "MissingFileError",
    "PlacementError",
    "ReadError",
    "RemoteSource",
    "TensorDescription",
    "WeightliftError",
    "load",
    "load_into",
    "open",
    "safe_open",
    "stream",
]
