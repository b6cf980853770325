"""GGML tensor types: the one table the GGUF parser, the planner and dequantization share.

Values as in ggml (``ggml.h``'s ``enum ggml_type``) and gguf-py (``GGML_QUANT_SIZES``): a type
stores ``block_size`` elements in ``type_size`` bytes. Plain types (block size 1) have a torch
dtype and load as themselves; quantized ones load packed as ``uint8`` rows, or dequantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GGMLType:
    """One GGML tensor type: its id in files, its name, and how elements pack into bytes."""

    id: int
    name: str
    block_size: int        # elements per block
    type_size: int         # bytes per block
    torch: torch.dtype | None = None  # the dtype of a plain (unquantized) type

    @property
    def quantized(self) -> bool:
        return self.torch is None

    def row_bytes(self, elements: int) -> int:
        """Bytes of a row of ``elements`` (a multiple of ``block_size``)."""
        return elements // self.block_size * self.type_size


def _table() -> dict[int, GGMLType]:
    rows = [
        # id, name, block size, type size, torch dtype (plain types only)
        (0, "F32", 1, 4, torch.float32),
        (1, "F16", 1, 2, torch.float16),
        (2, "Q4_0", 32, 18, None),
        (3, "Q4_1", 32, 20, None),
        (6, "Q5_0", 32, 22, None),
        (7, "Q5_1", 32, 24, None),
        (8, "Q8_0", 32, 34, None),
        (9, "Q8_1", 32, 40, None),
        (10, "Q2_K", 256, 84, None),
        (11, "Q3_K", 256, 110, None),
        (12, "Q4_K", 256, 144, None),
        (13, "Q5_K", 256, 176, None),
        (14, "Q6_K", 256, 210, None),
        (15, "Q8_K", 256, 292, None),
        (16, "IQ2_XXS", 256, 66, None),
        (17, "IQ2_XS", 256, 74, None),
        (18, "IQ3_XXS", 256, 98, None),
        (19, "IQ1_S", 256, 50, None),
        (20, "IQ4_NL", 32, 18, None),
        (21, "IQ3_S", 256, 110, None),
        (22, "IQ2_S", 256, 82, None),
        (23, "IQ4_XS", 256, 136, None),
        (24, "I8", 1, 1, torch.int8),
        (25, "I16", 1, 2, torch.int16),
        (26, "I32", 1, 4, torch.int32),
        (27, "I64", 1, 8, torch.int64),
        (28, "F64", 1, 8, torch.float64),
        (29, "IQ1_M", 256, 56, None),
        (30, "BF16", 1, 2, torch.bfloat16),
        (34, "TQ1_0", 256, 54, None),
        (35, "TQ2_0", 256, 66, None),
        (39, "MXFP4", 32, 17, None),
    ]
    return {row[0]: GGMLType(*row) for row in rows}


#: Every GGML type weightlift knows, by id (ids 4, 5 and 31–33 were removed from ggml).
GGML_TYPES: dict[int, GGMLType] = _table()
#: The same, by name.
GGML_TYPES_BY_NAME: dict[str, GGMLType] = {t.name: t for t in GGML_TYPES.values()}

__all__ = ["GGMLType", "GGML_TYPES", "GGML_TYPES_BY_NAME"]
