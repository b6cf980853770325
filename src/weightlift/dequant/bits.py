"""Bit-field helpers the dequantization kernels share: fields of packed blocks, as torch tensors.

Every helper takes ``blocks``, a ``uint8`` tensor of shape ``(n_blocks, type_size)`` on any device,
and works on all blocks at once. Fields are copied out as contiguous bytes before being viewed as
wider types, because a block's fields sit at offsets a wider dtype cannot be viewed at.
"""

from __future__ import annotations

from functools import lru_cache

import torch


def field(blocks: torch.Tensor, begin: int, end: int) -> torch.Tensor:
    """Bytes ``[begin, end)`` of every block: ``(n_blocks, end - begin)`` uint8, copied to be
    contiguous so the ops after it run on plain dense tensors."""
    return blocks[:, begin:end].contiguous()


def f16(blocks: torch.Tensor, begin: int) -> torch.Tensor:
    """The little-endian float16 at byte ``begin`` of every block, as float32 ``(n_blocks, 1)``."""
    return blocks[:, begin:begin + 2].contiguous().view(torch.float16).float()


@lru_cache(maxsize=256)
def constant(values: tuple[int | float, ...], dtype: torch.dtype, device: torch.device
             ) -> torch.Tensor:
    """A small constant tensor (a codebook), made once per dtype and device.

    Shared between calls: never write to it."""
    return torch.tensor(values, dtype=dtype, device=device)


def split_bits(data: torch.Tensor, group: int, width: int) -> torch.Tensor:
    """``width``-bit fields of runs of ``group`` bytes, lowest bits first: ``(n, bytes)`` →
    ``(n, bytes // group, 8 // width, group)`` uint8, where ``[:, r, k, j]`` is field ``k`` of byte
    ``j`` of run ``r``. (One shift per field, stacked: ~5× faster on the CPU than a broadcast
    shift by a tensor of amounts.)"""
    runs = data.reshape(data.shape[0], -1, group)
    mask = (1 << width) - 1
    fields = [runs & mask] + [(runs >> shift) & mask for shift in range(width, 8 - width, width)]
    fields.append(runs >> (8 - width))  # the top field needs no mask
    return torch.stack(fields, dim=2)


def nibbles(data: torch.Tensor, group: int) -> torch.Tensor:
    """ggml's 4-bit layout: each run of ``group`` bytes gives ``group`` low nibbles, then
    ``group`` high ones. ``(n, bytes)`` → ``(n, bytes // group, 2, group)`` uint8 in 0..15."""
    return split_bits(data, group, 4)


def crumbs(data: torch.Tensor, group: int) -> torch.Tensor:
    """2-bit fields: each run of ``group`` bytes gives its bits 0-1, 2-3, 4-5, 6-7 in turn.
    ``(n, bytes)`` → ``(n, bytes // group, 4, group)`` uint8 in 0..3."""
    return split_bits(data, group, 2)


def bitplanes(data: torch.Tensor, group: int) -> torch.Tensor:
    """1-bit fields: each run of ``group`` bytes gives bit 0, then bit 1, … bit 7.
    ``(n, bytes)`` → ``(n, bytes // group, 8, group)`` uint8 in 0..1."""
    return split_bits(data, group, 1)


def lookup(table: tuple[int, ...] | tuple[float, ...], index: torch.Tensor,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``table[index]`` elementwise, with the table on ``index``'s device."""
    # index_select, not advanced indexing: the latter goes parallel on tiny inputs and was 100×
    # slower on a busy CPU.
    flat = index.reshape(-1).to(torch.int32)
    return constant(table, dtype, index.device).index_select(0, flat).view(index.shape)
