"""Synthetic GGUF checkpoints: a Llama-shaped Q4_K_M-like file, deterministic, cached on disk.

Like ``synthetic.py`` for safetensors: the tensor names, shapes and type mix of a llama.cpp
``Q4_K_M`` export (Q4_K for most matrices, Q6_K for ``attn_v``, ``ffn_down`` and ``output``, F32
norms), scaled to a requested size, with a 128k-token vocabulary in the metadata as real files
carry. Blocks are random bytes with finite fp16 scales (valid blocks: they dequantize to finite
values), a pure function of ``(seed, tensor name)``, written a chunk at a time with numpy.

    path = synthetic_gguf(4 * 1000**3)      # ~4 GB, cached under ~/.cache/weightlift
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..formats.ggml import GGML_TYPES_BY_NAME, GGMLType
from . import synthetic

VERSION = 1
ALIGNMENT = 32
HIDDEN_SIZES = (8192, 4096, 3072, 2048, 1536, 1024, 768, 512, 256)
MIN_LAYERS = 8
#: Bytes generated per numpy call.
CHUNK_BYTES = 32 << 20
Q4_K, Q6_K, F32 = (GGML_TYPES_BY_NAME[n] for n in ("Q4_K", "Q6_K", "F32"))
#: Byte offsets of the fp16 scales in a block, set to small finite values.
SCALE_FIELDS = {"Q4_K": (0, 2), "Q6_K": (208,)}

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Config(synthetic.Config):
    """``synthetic.Config`` with the feed-forward width rounded to whole 256-element blocks."""

    @property
    def intermediate(self) -> int:
        return -(-self.hidden * 7 // 2 // 256) * 256


@dataclass(frozen=True)
class Spec:
    """One GGUF tensor: name, logical shape in torch order, GGML type."""

    name: str
    shape: tuple[int, ...]
    kind: GGMLType

    @property
    def nbytes(self) -> int:
        count = int(np.prod(self.shape))
        return count // self.kind.block_size * self.kind.type_size


def vocab_for(hidden: int) -> int:
    return 128256 if hidden >= 2048 else 32 * hidden


def layer_specs(c: Config, i: int) -> list[Spec]:
    h, kv, inter, p = c.hidden, c.kv, c.intermediate, f"blk.{i}."
    return [
        Spec(p + "attn_norm.weight", (h,), F32),
        Spec(p + "attn_q.weight", (h, h), Q4_K),
        Spec(p + "attn_k.weight", (kv, h), Q4_K),
        Spec(p + "attn_v.weight", (kv, h), Q6_K),
        Spec(p + "attn_output.weight", (h, h), Q4_K),
        Spec(p + "ffn_norm.weight", (h,), F32),
        Spec(p + "ffn_gate.weight", (inter, h), Q4_K),
        Spec(p + "ffn_up.weight", (inter, h), Q4_K),
        Spec(p + "ffn_down.weight", (h, inter), Q6_K),
    ]


def tensor_specs(c: Config) -> list[Spec]:
    specs = [Spec("token_embd.weight", (c.vocab, c.hidden), Q4_K)]
    for i in range(c.layers):
        specs.extend(layer_specs(c, i))
    specs.append(Spec("output_norm.weight", (c.hidden,), F32))
    specs.append(Spec("output.weight", (c.vocab, c.hidden), Q6_K))
    return specs


def config_for(size: int) -> Config:
    """The largest hidden size giving ``MIN_LAYERS`` layers within ``size`` bytes."""
    for hidden in HIDDEN_SIZES:
        probe = Config(hidden, 1, vocab_for(hidden))
        layer = sum(s.nbytes for s in layer_specs(probe, 0))
        fixed = sum(s.nbytes for s in tensor_specs(probe)) - layer
        layers = round((size - fixed) / layer)
        if layers >= MIN_LAYERS:
            return Config(hidden, layers, vocab_for(hidden))
    hidden = HIDDEN_SIZES[-1]
    return Config(hidden, 1, vocab_for(hidden))


def planned_bytes(size: int) -> int:
    return sum(s.nbytes for s in tensor_specs(config_for(size)))


def _rng(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.sha256(f"weightlift-gguf-v{VERSION}:{seed}:{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def tensor_chunks(spec: Spec, seed: int) -> Iterator[bytes]:
    """The tensor's bytes in chunks of whole blocks."""
    rng = _rng(seed, spec.name)
    if not spec.kind.quantized:  # norms: ones, as in a fresh model
        yield np.ones(int(np.prod(spec.shape)), dtype="<f4").tobytes()
        return
    size = spec.kind.type_size
    per_chunk = max(1, CHUNK_BYTES // size)
    blocks = spec.nbytes // size
    for first in range(0, blocks, per_chunk):
        n = min(per_chunk, blocks - first)
        words = rng.bit_generator.random_raw(-(-n * size // 8)).astype("<u8", copy=False)
        data = words.view(np.uint8)[:n * size].reshape(n, size)
        # fp16 scales in [2^-14, 2^-7): exponent bits 1..7, random mantissa, positive.
        for at in SCALE_FIELDS[spec.kind.name]:
            bits = rng.integers(0x0400, 0x2000, n, dtype=np.uint16).astype("<u2")
            data[:, at:at + 2] = bits.view(np.uint8).reshape(n, 2)
        yield data.tobytes()


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv_u32(key: str, value: int) -> bytes:
    return _string(key) + struct.pack("<II", 4, value)


def _kv_f32(key: str, value: float) -> bytes:
    return _string(key) + struct.pack("<If", 6, value)


def header(c: Config, specs: list[Spec]) -> tuple[bytes, list[int]]:
    """The GGUF header (metadata, tensor infos, padding) and each tensor's data offset."""
    kvs = [
        _string("general.architecture") + struct.pack("<I", 8) + _string("llama"),
        _string("general.name") + struct.pack("<I", 8) + _string("weightlift-synthetic"),
        _kv_u32("general.alignment", ALIGNMENT),
        _kv_u32("llama.context_length", 8192),
        _kv_u32("llama.block_count", c.layers),
        _kv_u32("llama.embedding_length", c.hidden),
        _kv_u32("llama.feed_forward_length", c.intermediate),
        _kv_u32("llama.attention.head_count", max(1, c.hidden // 128)),
        _kv_u32("llama.attention.head_count_kv", max(1, c.kv // 128)),
        _kv_u32("llama.rope.dimension_count", 128 if c.hidden >= 128 else c.hidden),
        _kv_f32("llama.rope.freq_base", 500000.0),
        _kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5),
        _kv_u32("llama.vocab_size", c.vocab),
        _kv_u32("general.file_type", 15),  # MOSTLY_Q4_K_M
        _string("tokenizer.ggml.model") + struct.pack("<I", 8) + _string("gpt2"),
        _string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, c.vocab)
        + b"".join(_string(f"tok{i}") for i in range(c.vocab)),
    ]
    infos = []
    offsets = []
    offset = 0
    for spec in specs:
        ne = tuple(reversed(spec.shape))
        infos.append(_string(spec.name) + struct.pack(f"<I{len(ne)}Q", len(ne), *ne)
                     + struct.pack("<IQ", spec.kind.id, offset))
        offsets.append(offset)
        offset += -(-spec.nbytes // ALIGNMENT) * ALIGNMENT
    raw = b"GGUF" + struct.pack("<IQQ", 3, len(specs), len(kvs)) + b"".join(kvs) + b"".join(infos)
    raw += b"\0" * (-len(raw) % ALIGNMENT)
    return raw, offsets


def write_gguf(path: Path, size: int, *, seed: int = 0,
               on_progress: ProgressCallback | None = None) -> Path:
    """Write the synthetic GGUF for ``size`` at ``path`` (fsync'ed, so it can be evicted)."""
    config = config_for(size)
    specs = tensor_specs(config)
    total = sum(s.nbytes for s in specs)
    raw, _ = header(config, specs)
    done = 0
    with open(path, "wb") as f:
        f.write(raw)
        for spec in specs:
            for chunk in tensor_chunks(spec, seed):
                f.write(chunk)
                done += len(chunk)
                if on_progress is not None:
                    on_progress(done, total)
            f.write(b"\0" * (-spec.nbytes % ALIGNMENT))
        f.flush()
        os.fsync(f.fileno())
    return path


def synthetic_gguf(size: int, *, seed: int = 0, cache_dir: Path | None = None,
                   on_progress: ProgressCallback | None = None) -> Path:
    """The cached synthetic GGUF for ``size``, written on first use (atomically renamed)."""
    root = cache_dir if cache_dir is not None else synthetic.cache_root()
    config = config_for(size)
    target = root / (f"synthetic-gguf-v{VERSION}-h{config.hidden}-l{config.layers}-seed{seed}"
                     "-Q4_K_M.gguf")
    if target.is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=".writing-", suffix=".gguf", dir=root)
    os.close(fd)
    try:
        write_gguf(Path(staging), size, seed=seed, on_progress=on_progress)
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return target


__all__ = ["config_for", "planned_bytes", "synthetic_gguf", "tensor_specs", "write_gguf"]
