"""Synthetic Llama-shaped checkpoints: sharded, bf16, deterministic, cached on disk.

The benchmark needs a realistic checkpoint on any machine without a download: the same tensor
names, shapes and shard layout a Hugging Face Llama has (so per-tensor overheads and shard
boundaries look real), scaled to a requested size. Content is pseudo-random but a pure function
of ``(seed, tensor name)``, so two machines benchmark the same bytes. Values are finite bf16 of
weight-like magnitude (no NaN), so any comparison works on them.

The files are written by a small streaming writer (a tensor at a time, never a whole shard in
memory) with only numpy, so ``weightlift demo`` runs where the safetensors package is absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Bumped whenever the layout or content changes, so stale caches are never reused.
VERSION = 1
#: Hidden sizes tried from the largest down; the first giving enough layers wins.
HIDDEN_SIZES = (8192, 4096, 3072, 2048, 1536, 1024, 768, 512, 384, 256, 128, 64)
#: A checkpoint has at least this many layers when the size allows it.
MIN_LAYERS = 8
#: Roughly one shard per this many bytes, and between 2 and 8 shards.
SHARD_TARGET = 1000**3
#: Random content is generated this many bf16 elements at a time. Any even count gives the same
#: bytes (numpy draws uint16 in pairs from 32-bit outputs); an odd one would not.
CHUNK_ELEMENTS = 8 << 20
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
BF16_ONE = 0x3F80

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Config:
    """The model dimensions a checkpoint of a given size gets."""

    hidden: int
    layers: int
    vocab: int

    @property
    def kv(self) -> int:
        """Key/value width: grouped-query attention with 4 query heads per KV head (Llama 3)."""
        return self.hidden // 4

    @property
    def intermediate(self) -> int:
        return self.hidden * 7 // 2


@dataclass(frozen=True)
class Spec:
    """One tensor of the checkpoint, in file order."""

    name: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return 2 * int(np.prod(self.shape))


def vocab_for(hidden: int) -> int:
    """Llama 2's 32000 tokens for real hidden sizes; smaller toy models get a smaller vocabulary
    so the embeddings don't swallow the whole size."""
    return 32000 if hidden >= 1024 else max(256, 32 * hidden)


def _layer_bytes(hidden: int) -> int:
    c = Config(hidden, 1, vocab_for(hidden))
    return sum(s.nbytes for s in layer_specs(c, 0))


def _fixed_bytes(hidden: int) -> int:
    vocab = vocab_for(hidden)
    return 2 * (2 * vocab * hidden + hidden)


def config_for(size: int) -> Config:
    """The largest hidden size that still gives ``MIN_LAYERS`` layers within ``size`` bytes."""
    for hidden in HIDDEN_SIZES:
        layers = round((size - _fixed_bytes(hidden)) / _layer_bytes(hidden))
        if layers >= MIN_LAYERS:
            return Config(hidden, layers, vocab_for(hidden))
    hidden = HIDDEN_SIZES[-1]
    layers = max(1, round((size - _fixed_bytes(hidden)) / _layer_bytes(hidden)))
    return Config(hidden, layers, vocab_for(hidden))


def layer_specs(config: Config, i: int) -> list[Spec]:
    h, kv, inter = config.hidden, config.kv, config.intermediate
    p = f"model.layers.{i}."
    return [
        Spec(p + "input_layernorm.weight", (h,)),
        Spec(p + "self_attn.q_proj.weight", (h, h)),
        Spec(p + "self_attn.k_proj.weight", (kv, h)),
        Spec(p + "self_attn.v_proj.weight", (kv, h)),
        Spec(p + "self_attn.o_proj.weight", (h, h)),
        Spec(p + "post_attention_layernorm.weight", (h,)),
        Spec(p + "mlp.gate_proj.weight", (inter, h)),
        Spec(p + "mlp.up_proj.weight", (inter, h)),
        Spec(p + "mlp.down_proj.weight", (h, inter)),
    ]


def head_dim(hidden: int) -> int:
    """Attention head width: Llama's 128, narrower for toy sizes so there are 8+ heads (a multiple
    of 4, as the key/value width is a quarter of the hidden size)."""
    return min(128, hidden // 8)


def model_config(config: Config) -> dict[str, object]:
    """A ``LlamaConfig``-compatible ``config.json`` for the checkpoint's shapes, so transformers
    (and ``weightlift.transformers.from_pretrained``) can build the model it holds."""
    heads = config.hidden // head_dim(config.hidden)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": config.hidden, "intermediate_size": config.intermediate,
        "num_hidden_layers": config.layers, "num_attention_heads": heads,
        "num_key_value_heads": heads // 4, "head_dim": head_dim(config.hidden),
        "vocab_size": config.vocab, "max_position_embeddings": 4096, "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
        "dtype": "bfloat16", "torch_dtype": "bfloat16",
    }


def write_model_config(directory: Path, config: Config) -> None:
    """``config.json``, written whole or not at all (checkpoints cached before it existed get it
    on their next use without being rewritten)."""
    staging = directory / f".{CONFIG_NAME}.{os.getpid()}"
    staging.write_text(json.dumps(model_config(config), indent=2))
    staging.rename(directory / CONFIG_NAME)


def tensor_specs(config: Config) -> list[Spec]:
    """Every tensor of a Llama (untied embeddings), in the order transformers saves them."""
    specs = [Spec("model.embed_tokens.weight", (config.vocab, config.hidden))]
    for i in range(config.layers):
        specs.extend(layer_specs(config, i))
    specs.append(Spec("model.norm.weight", (config.hidden,)))
    specs.append(Spec("lm_head.weight", (config.vocab, config.hidden)))
    return specs


def shard_specs(specs: list[Spec]) -> list[list[Spec]]:
    """Split into shards the way ``save_pretrained`` does: in order, a new shard when the next
    tensor would pass the target size."""
    total = sum(s.nbytes for s in specs)
    count = min(8, max(2, round(total / SHARD_TARGET)))
    target = total / count
    shards: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > target and len(shards) < count:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _rng(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.sha256(f"weightlift-synthetic-v{VERSION}:{seed}:{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def tensor_chunks(spec: Spec, seed: int) -> Iterator[np.ndarray]:
    """The tensor's bf16 bit patterns (uint16), in chunks. Norm weights are ones, as in a fresh
    model; matrices are random with magnitudes in [2^-10, 2^-2): sign, 3 exponent bits and the
    7-bit mantissa come from the generator, the rest is fixed, so no value is NaN or Inf."""
    count = int(np.prod(spec.shape))
    if len(spec.shape) == 1:
        yield np.full(count, BF16_ONE, dtype=np.uint16)
        return
    rng = _rng(seed, spec.name)
    for start in range(0, count, CHUNK_ELEMENTS):
        bits = rng.integers(0, 1 << 16, min(CHUNK_ELEMENTS, count - start), dtype=np.uint16)
        exponent = ((bits >> 7) & 7) + 117
        yield (bits & 0x807F) | (exponent << 7).astype(np.uint16)


def tensor_data(spec: Spec, seed: int) -> np.ndarray:
    """A whole tensor's bit patterns (for tests and small tensors)."""
    return np.concatenate(list(tensor_chunks(spec, seed))).reshape(spec.shape)


def _header(specs: list[Spec]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": "BF16", "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header so data starts 8-aligned
    return struct.pack("<Q", len(raw)) + raw


def shard_name(i: int, count: int) -> str:
    return f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def write_checkpoint(directory: Path, size: int, *, seed: int = 0,
                     on_progress: ProgressCallback | None = None) -> Path:
    """Write a checkpoint of about ``size`` bytes into ``directory`` (which must exist): shards
    plus the HF index; each shard is fsync'ed so it can be evicted from the page cache."""
    config = config_for(size)
    shards = shard_specs(tensor_specs(config))
    total = sum(s.nbytes for shard in shards for s in shard)
    weight_map: dict[str, str] = {}
    done = 0
    for i, specs in enumerate(shards):
        name = shard_name(i, len(shards))
        with open(directory / name, "wb") as f:
            f.write(_header(specs))
            for spec in specs:
                weight_map[spec.name] = name
                for chunk in tensor_chunks(spec, seed):
                    f.write(chunk.astype("<u2", copy=False).tobytes())
                    done += chunk.nbytes
                    if on_progress is not None:
                        on_progress(done, total)
            f.flush()
            os.fsync(f.fileno())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2))
    write_model_config(directory, config)
    return directory


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/weightlift`` or ``~/.cache/weightlift``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "weightlift"


def planned_bytes(size: int) -> int:
    """Tensor bytes the checkpoint for ``size`` will hold (close to, not exactly, ``size``)."""
    return sum(s.nbytes for s in tensor_specs(config_for(size)))


def synthetic_checkpoint(size: int, *, seed: int = 0, cache_dir: Path | None = None,
                         on_progress: ProgressCallback | None = None) -> Path:
    """The directory of the cached synthetic checkpoint for ``size``, written on first use.

    Written into a temporary sibling and renamed into place, so an interrupted run never leaves a
    half-written checkpoint that a later run would trust.
    """
    root = cache_dir if cache_dir is not None else cache_root()
    config = config_for(size)
    target = root / (f"synthetic-llama-v{VERSION}-h{config.hidden}-l{config.layers}"
                     f"-seed{seed}")
    if (target / INDEX_NAME).is_file():
        if not (target / CONFIG_NAME).is_file():
            write_model_config(target, config)
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".writing-", dir=root))
    try:
        write_checkpoint(staging, size, seed=seed, on_progress=on_progress)
        try:
            staging.rename(target)
        except OSError:
            if not (target / INDEX_NAME).is_file():  # not a concurrent writer that won the race
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def shard_paths(directory: Path) -> list[Path]:
    """The checkpoint's shard files in index order."""
    index = json.loads((directory / INDEX_NAME).read_text())
    return [directory / name for name in dict.fromkeys(index["weight_map"].values())]
