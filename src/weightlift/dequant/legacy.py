"""The legacy 32-element blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Each kernel maps ``(n_blocks, type_size)`` uint8 → ``(n_blocks, 32)`` float32 with the same float32
operations, in the same order, as gguf-py's numpy reference (``gguf/quants.py``), so the results
are bit for bit the same. Layouts (``ggml-common.h``)::

    Q4_0  d:f16  qs:16B (low nibbles = elements 0-15, high nibbles = 16-31)     x = d·(q - 8)
    Q4_1  d:f16  m:f16  qs:16B                                                   x = d·q + m
    Q5_0  d:f16  qh:u32 (bit j = 5th bit of element j)  qs:16B                   x = d·(q - 16)
    Q5_1  d:f16  m:f16  qh:u32  qs:16B                                           x = d·q + m
    Q8_0  d:f16  qs:32×i8                                                        x = d·q
"""

from __future__ import annotations

import torch

from .bits import bitplanes, f16, field, nibbles



def _low4(qs: torch.Tensor) -> torch.Tensor:
    return nibbles(qs, 16).reshape(qs.shape[0], 32)


def _high1(qh: torch.Tensor) -> torch.Tensor:
    return bitplanes(qh, 1).reshape(qh.shape[0], 32)


def q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = f16(blocks, 0)
    q = _low4(field(blocks, 2, 18)).to(torch.int8) - 8
    return d * q.float()


def q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = f16(blocks, 0), f16(blocks, 2)
    q = _low4(field(blocks, 4, 20)).float()
    return d * q + m


def q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = f16(blocks, 0)
    q = _low4(field(blocks, 6, 22)) | (_high1(field(blocks, 2, 6)) << 4)
    return d * (q.to(torch.int8) - 16).float()


def q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = f16(blocks, 0), f16(blocks, 2)
    q = _low4(field(blocks, 8, 24)) | (_high1(field(blocks, 4, 8)) << 4)
    return d * q.float() + m


def q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = f16(blocks, 0)
    q = field(blocks, 2, 34).contiguous().view(torch.int8)
    return q.float() * d


KERNELS = {"Q4_0": q4_0, "Q4_1": q4_1, "Q5_0": q5_0, "Q5_1": q5_1, "Q8_0": q8_0}
