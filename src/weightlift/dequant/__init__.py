"""Dequantization of GGML tensors in torch: packed blocks → floats, on the CPU or on a device.

    from weightlift.dequant import dequantize
    weight = dequantize(packed, "Q4_K", dtype=torch.bfloat16)   # packed: uint8 (..., row_bytes)

One kernel per GGML type, grouped by family (``legacy``: 32-element blocks, ``kquants``: 256-element
super-blocks, ``nonlinear``: codebook types), each a pure tensor function from ``(n_blocks,
type_size)`` bytes to ``(n_blocks, block_size)`` float32. They compute in float32 exactly as
gguf-py's reference does (bit for bit), then cast once to the requested dtype. They use only torch
ops, so the same code runs on CUDA tensors: move the packed bytes, dequantize there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import PlacementError, UnsupportedQuantization
from ..formats.ggml import GGML_TYPES, GGML_TYPES_BY_NAME, GGMLType
from . import kquants, legacy, nonlinear

Kernel = Callable[[torch.Tensor], torch.Tensor]

#: Elements dequantized per batch: bounds the float32 intermediates (a few MiB). Each batch costs
#: ~15 torch calls of fixed overhead: 2**18 made a bf16 load of a 500 MB Q4_K_M file 2.2-2.6×
#: faster than 2**15 (1.4-1.7 s vs 3.7 s, idle 2-core VM; 1.9 vs 3.8 s on one thread). (On a host
#: oversubscribed several times over, OpenMP regions waiting for descheduled workers made batches
#: above torch's grain size, 32 768, slower; ``OMP_NUM_THREADS=1`` avoids that there.)
BATCH_ELEMENTS = 1 << 18


def _plain(dtype: torch.dtype) -> Kernel:
    def kernel(blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(dtype).float()
    return kernel


#: GGML type name → kernel. Types not listed load packed only.
KERNELS: dict[str, Kernel] = {
    "F32": _plain(torch.float32),
    "F16": _plain(torch.float16),
    "BF16": _plain(torch.bfloat16),
    **legacy.KERNELS,
    **kquants.KERNELS,
    **nonlinear.KERNELS,
}


def ggml_type(kind: GGMLType | int | str) -> GGMLType:
    """The ``GGMLType`` for a type, its id in files, or its name (``"Q4_K"``)."""
    if isinstance(kind, GGMLType):
        return kind
    found = GGML_TYPES.get(kind) if isinstance(kind, int) else GGML_TYPES_BY_NAME.get(kind.upper())
    if found is None:
        raise UnsupportedQuantization(f"unknown GGML type {kind!r}; known: "
                                      f"{', '.join(GGML_TYPES_BY_NAME)}")
    return found


def supports(kind: GGMLType | int | str) -> bool:
    """Whether ``dequantize`` handles this GGML type."""
    return ggml_type(kind).name in KERNELS


def check_supported(kind: GGMLType | int | str, tensor: str | None = None) -> GGMLType:
    """The type, or an ``UnsupportedQuantization`` naming it and what to do instead."""
    found = ggml_type(kind)
    if found.name not in KERNELS:
        raise UnsupportedQuantization(
            f"cannot dequantize GGML type {found.name}; weightlift dequantizes "
            f"{', '.join(KERNELS)}. Load it packed (no dtype=) and dequantize it with a library "
            "that supports it", tensor=tensor)
    return found


def packed_type(info: object) -> GGMLType | None:
    """The GGML type of a tensor record stored packed (quantized), None for any other tensor.

    Reads the record's ``ggml`` field (set by the GGUF parser; absent on safetensors records).
    """
    kind = getattr(info, "ggml", None)
    return kind if isinstance(kind, GGMLType) and kind.quantized else None


def unpacked_shape(shape: tuple[int, ...], kind: GGMLType) -> tuple[int, ...]:
    """The logical shape of packed bytes of shape ``(..., row_bytes)``: ``(..., elements)``."""
    return (*shape[:-1], shape[-1] // kind.type_size * kind.block_size)


def dequantize(packed: torch.Tensor, kind: GGMLType | int | str,
               dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Dequantize ``packed`` (uint8, shape ``(..., row_bytes)``) of GGML type ``kind`` into ``dtype``.

        w = dequantize(state["blk.0.attn_q.weight"], "Q4_K", torch.float16)   # (..., elements)

    Any whole number of blocks works, so a tensor can be dequantized piece by piece: the pieces'
    results, concatenated, equal the whole tensor's. Runs on ``packed``'s device. ``out`` (of
    ``dtype``, contiguous, with as many elements as the result) receives the result instead of a
    new tensor. Values equal ``gguf.quants.dequantize(...).astype(dtype)``.
    """
    found = check_supported(kind)
    if packed.dtype != torch.uint8:
        raise PlacementError(f"dequantize takes the packed bytes as uint8, not {packed.dtype}")
    row_bytes = packed.shape[-1] if packed.dim() else 0
    if packed.dim() == 0 or row_bytes % found.type_size:
        raise PlacementError(f"{found.name} packs {found.block_size} elements in "
                             f"{found.type_size} bytes; a last dimension of {row_bytes} bytes is "
                             "not a whole number of blocks")
    shape = unpacked_shape(tuple(packed.shape), found)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    elif out.numel() != packed.numel() // found.type_size * found.block_size or (
            out.dtype != dtype or not out.is_contiguous()):
        raise PlacementError(f"out= must be a contiguous {dtype} tensor of {shape} elements; got "
                             f"{out.dtype} {tuple(out.shape)}")
    blocks = packed.reshape(-1, found.type_size)
    flat = out.view(-1, found.block_size)
    kernel = KERNELS[found.name]
    step = max(1, BATCH_ELEMENTS // found.block_size)
    for first in range(0, blocks.shape[0], step):
        # Casting float32 → dtype in copy_ rounds exactly like .to(dtype).
        flat[first:first + step].copy_(kernel(blocks[first:first + step]))
    return out.view(shape)


__all__ = ["KERNELS", "check_supported", "dequantize", "ggml_type", "packed_type", "supports",
           "unpacked_shape"]
