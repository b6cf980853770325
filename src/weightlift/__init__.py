"""weightlift: load model checkpoints into tensors fast, with bounded host memory.

    import weightlift
    state = weightlift.load("path/to/checkpoint", device="cuda")
"""

from .api import Checkpoint, TensorDescription, load, open, stream
from .errors import CheckpointError, FormatError, PlacementError, ReadError, WeightliftError
from .report import LoadReport

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "FormatError",
    "LoadReport",
    "PlacementError",
    "ReadError",
    "TensorDescription",
    "WeightliftError",
    "load",
    "open",
    "stream",
]
