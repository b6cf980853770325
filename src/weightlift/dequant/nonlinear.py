"""Non-linear 4-bit codebooks: IQ4_NL, IQ4_XS and MXFP4.

A 4-bit index picks a value from a fixed table instead of standing for itself. Each kernel maps
``(n_blocks, type_size)`` uint8 → ``(n_blocks, block_size)`` float32 with the same float32
operations, in the same order, as gguf-py's numpy reference (``gguf/quants.py``), so the results
are bit for bit the same. Layouts (``ggml-common.h``)::

    IQ4_NL  d:f16  qs:16B (nibbles, Q4_0 order)                   x = d·IQ4[q]        32 elements
    IQ4_XS  d:f16  scales_h:u16 (2 bits each)  scales_l:4B (4 bits each)  qs:128B
            x = (d·(scale - 32))·IQ4[q]                            8 sub-blocks of 32
    MXFP4   e:u8 (E8M0 exponent)  qs:16B (E2M1 codes, Q4_0 order)  x = 2^(e-128)·(2·E2M1[q])
"""

from __future__ import annotations

import torch

from .bits import crumbs, f16, field, lookup, nibbles

#: IQ4_NL / IQ4_XS codebook (``kvalues_iq4nl`` in ggml).
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
#: E2M1 values, doubled (``kvalues_mxfp4`` in ggml); the exponent below carries the halving.
MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = f16(blocks, 0)
    q = lookup(IQ4_VALUES, nibbles(field(blocks, 2, 18), 16).reshape(n, 32))
    return d * q


def iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = f16(blocks, 0)
    scales_h = crumbs(field(blocks, 2, 4), 1).reshape(n, 8)      # the u16's 2-bit fields, in order
    scales_l = nibbles(field(blocks, 4, 8), 1).reshape(n, 8)      # low, high nibble of each byte
    scales = (scales_l | (scales_h << 4)).to(torch.int8) - 32
    dl = (d * scales.float()).reshape(n, 8, 1)
    q = lookup(IQ4_VALUES, nibbles(field(blocks, 8, 136), 16).reshape(n, 8, 32))
    return (dl * q).reshape(n, 256)


def e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """An E8M0 exponent byte as float32 2^(e-128), i.e. half its value (``ggml_e8m0_to_fp32_half``):
    exponents 0 and 1 become subnormals."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)
    return bits.view(torch.float32)


def mxfp4(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = e8m0_half(field(blocks, 0, 1))
    q = lookup(MXFP4_VALUES, nibbles(field(blocks, 1, 17), 16).reshape(n, 32))
    return d * q


KERNELS = {"IQ4_NL": iq4_nl, "IQ4_XS": iq4_xs, "MXFP4": mxfp4}
