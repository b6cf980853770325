"""The K-quants: 256-element super-blocks of 16 or 8 sub-blocks with their own scales.

Each kernel maps ``(n_blocks, type_size)`` uint8 → ``(n_blocks, 256)`` float32 with the same float32
operations, in the same order, as gguf-py's numpy reference (``gguf/quants.py``), so the results
are bit for bit the same (``a + -b`` is IEEE's definition of ``a - b``; torch's broadcasting ``sub``
is ~3× slower than ``add`` on the CPU). Layouts (``ggml-common.h``, ``QK_K = 256``)::

    Q2_K  scales:16B (lo 4 bits: scale, hi 4: min)  qs:64B (2-bit)  d:f16  dmin:f16
          x = (d·scale)·q - dmin·min                 16 sub-blocks of 16
    Q3_K  hmask:32B (3rd bit, inverted)  qs:64B (2-bit)  scales:12B (6-bit)  d:f16
          x = (d·(scale - 32))·(q - 4·!hbit)         16 sub-blocks of 16
    Q4_K  d:f16  dmin:f16  scales:12B (6-bit scales and mins)  qs:128B (4-bit)
          x = (d·scale)·q - dmin·min                 8 sub-blocks of 32
    Q5_K  like Q4_K, then qh:32B (5th bit) before qs
    Q6_K  ql:128B (4-bit)  qh:64B (2-bit)  scales:16×i8  d:f16
          x = (d·scale)·(q - 32)                     16 sub-blocks of 16
"""

from __future__ import annotations

import torch

from .bits import bitplanes, crumbs, f16, field, nibbles


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes → 8 six-bit scales and 8 six-bit mins, ``(n, 8)`` uint8 each.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top bits of scales 4-7; bytes 4-7 the same
    for mins; bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high nibble).
    """
    n = scales.shape[0]
    parts = scales.reshape(n, 3, 4)
    d, m, m_d = parts[:, 0], parts[:, 1], parts[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = field(blocks, 0, 16)
    d, dmin = f16(blocks, 80), f16(blocks, 82)
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = crumbs(field(blocks, 16, 80), 32).reshape(n, 16, 16).float()
    return (dl * q + -ml).reshape(n, 256)


def q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    hmask, qs, packed = field(blocks, 0, 32), field(blocks, 32, 96), field(blocks, 96, 108)
    d = f16(blocks, 108)
    low = nibbles(packed[:, :8], 8).reshape(n, 16)
    high = crumbs(packed[:, 8:], 4).reshape(n, 16)
    scales = (low | (high << 4)).to(torch.int8) - 32
    dl = (d * scales.float()).reshape(n, 16, 1)
    ql = crumbs(qs, 32).reshape(n, 16, 16)
    qh = bitplanes(hmask, 32).reshape(n, 16, 16) ^ 1  # the offset applies where the bit is 0
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, 256)


def _k4(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K's ``(d·scale)·q - dmin·min`` over 8 sub-blocks, given the quants ``(n, 8, 32)``."""
    n = blocks.shape[0]
    d, dmin = f16(blocks, 0), f16(blocks, 2)
    sc, mn = _scale_min_k4(field(blocks, 4, 16))
    dl = (d * sc.float()).reshape(n, 8, 1)
    ml = (dmin * mn.float()).reshape(n, 8, 1)
    return (dl * q.float() + -ml).reshape(n, 256)


def q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    return _k4(blocks, nibbles(field(blocks, 16, 144), 32).reshape(n, 8, 32))


def q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql = nibbles(field(blocks, 48, 176), 32).reshape(n, 8, 32)
    qh = bitplanes(field(blocks, 16, 48), 32).reshape(n, 8, 32)
    return _k4(blocks, ql | (qh << 4))


def q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = field(blocks, 192, 208).contiguous().view(torch.int8)
    d = f16(blocks, 208)
    dl = (d * scales.float()).reshape(n, 16, 1)
    ql = nibbles(field(blocks, 0, 128), 64).reshape(n, 8, 32)
    qh = crumbs(field(blocks, 128, 192), 32).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (dl * q).reshape(n, 256)


KERNELS = {"Q2_K": q2_k, "Q3_K": q3_k, "Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k}
