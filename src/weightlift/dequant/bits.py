"""Bit-field helpers the dequantization kernels share: fields of packed blocks, as torch tensors.

Every helper takes ``blocks``, a ``uint8`` tensor of shape ``(n_blocks, type_size)`` on any device,
and works on all blocks at once. Fields are copied out as contiguous bytes before being viewed as
wider types, because a block's fields sit at offsets a wider dtype cannot be viewed at.
"""

from __future__ import annotations

import torch


def field(blocks: torch.Tensor, begin: int, end: int) -> torch.Tensor:
    """Bytes ``[begin, end)`` of every block: ``(n_blocks, end - begin)`` uint8."""
    return blocks[:, begin:end]


def f16(blocks: torch.Tensor, begin: int) -> torch.Tensor:
    """The little-endian float16 at byte ``begin`` of every block, as float32 ``(n_blocks, 1)``."""
    return blocks[:, begin:begin + 2].contiguous().view(torch.float16).float()


def u16(blocks: torch.Tensor, begin: int) -> torch.Tensor:
    """The little-endian uint16 at byte ``begin`` of every block, as int32 ``(n_blocks, 1)``."""
    pair = blocks[:, begin:begin + 2].to(torch.int32)
    return pair[:, :1] | (pair[:, 1:] << 8)


def shifts(values: range | tuple[int, ...], like: torch.Tensor, shape: tuple[int, ...]
           ) -> torch.Tensor:
    """Shift amounts as a tensor of ``like``'s dtype and device, shaped to broadcast."""
    return torch.tensor(list(values), dtype=like.dtype, device=like.device).view(shape)


def nibbles(data: torch.Tensor, group: int) -> torch.Tensor:
    """ggml's 4-bit layout: each run of ``group`` bytes gives ``group`` low nibbles, then
    ``group`` high ones. ``(n, bytes)`` → ``(n, bytes // group, 2, group)`` uint8 in 0..15."""
    n = data.shape[0]
    split = data.reshape(n, -1, 1, group) >> shifts((0, 4), data, (1, 1, 2, 1))
    return split & 0x0F


def crumbs(data: torch.Tensor, group: int) -> torch.Tensor:
    """2-bit fields: each run of ``group`` bytes gives its bits 0-1, 2-3, 4-5, 6-7 in turn.
    ``(n, bytes)`` → ``(n, bytes // group, 4, group)`` uint8 in 0..3."""
    n = data.shape[0]
    split = data.reshape(n, -1, 1, group) >> shifts((0, 2, 4, 6), data, (1, 1, 4, 1))
    return split & 0x03


def bitplanes(data: torch.Tensor, group: int) -> torch.Tensor:
    """1-bit fields: each run of ``group`` bytes gives bit 0, then bit 1, … bit 7.
    ``(n, bytes)`` → ``(n, bytes // group, 8, group)`` uint8 in 0..1."""
    n = data.shape[0]
    split = data.reshape(n, -1, 1, group) >> shifts(range(8), data, (1, 1, 8, 1))
    return split & 0x01


def lookup(table: tuple[int, ...] | tuple[float, ...], index: torch.Tensor,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``table[index]`` elementwise, with the table on ``index``'s device."""
    values = torch.tensor(table, dtype=dtype, device=index.device)
    return values[index.to(torch.int64)]
