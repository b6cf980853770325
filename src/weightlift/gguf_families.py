"""GGUF → transformers, as data: how llama.cpp's converter wrote each model family, so what
``load_into`` undoes to load a GGUF file into a transformers model.

    family = family_of(layout.metadata, path)       # by general.architecture
    family.hf_name("blk.3.ffn_up.weight")          # "model.layers.3.mlp.up_proj.weight"
    family.transform("blk.0.attn_q.weight")        # UNPERMUTE_Q for llama, None for qwen2

llama.cpp renames tensors (``blk.0.attn_q.weight`` for ``model.layers.0.self_attn.q_proj.weight``)
and, for the ``llama`` architecture (Llama and Mistral), permutes the rows of the q and k
projections for its rotary layout. A ``Family`` holds the name tables and, per tensor kind, the
named ``Transform`` that undoes such a layout change exactly as transformers' own GGUF loader
does (``modeling_gguf_pytorch_utils.LlamaTensorProcessor``), so the logits match
``from_pretrained(dir, gguf_file=...)``. A new family is a new entry in ``FAMILIES``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import PlacementError


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation (``convert_hf_to_gguf.LlamaModel.permute``)."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def unpermute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of ``permute_qk`` (transformers' ``_reverse_permute_weights``)."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


@dataclass(frozen=True)
class Transform:
    """A layout change llama.cpp made on export, undone on load by ``undo(tensor, n)``, with
    ``n`` read from the metadata key ``{architecture}.{key}`` (else ``.{fallback}``)."""

    name: str
    undo: Callable[[torch.Tensor, int], torch.Tensor]
    key: str
    fallback: str | None = None

    def argument(self, meta: Mapping[str, Any], architecture: str, path: str) -> int:
        """``n`` for this file; a ``PlacementError`` naming the key when it has none."""
        key = f"{architecture}.{self.key}"
        if key not in meta and self.fallback is not None:
            key = f"{architecture}.{self.fallback}"
        try:
            return int(meta[key])
        except (KeyError, TypeError, ValueError):
            raise PlacementError(f"has no usable {key!r}: cannot undo llama.cpp's {self.name}",
                                 path=path) from None


#: The q projection's rows, permuted by llama.cpp per attention head.
UNPERMUTE_Q = Transform("q permutation", unpermute_qk, "attention.head_count")
#: The k projection's rows, permuted per key/value head (grouped-query attention).
UNPERMUTE_K = Transform("k permutation", unpermute_qk, "attention.head_count_kv",
                        fallback="attention.head_count")

_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_HF_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


@dataclass(frozen=True)
class Family:
    """One GGUF ``general.architecture``'s rules: names, layout changes, tensors to skip."""

    architecture: str
    #: Whole-model tensors: GGUF name → transformers name.
    global_names: Mapping[str, str]
    #: Per-block tensors: ``blk.N.<kind>.(weight|bias)`` → ``model.layers.N.<hf>.(weight|bias)``.
    block_names: Mapping[str, str]
    #: Block tensor kind → the layout change to undo when loading it.
    transforms: Mapping[str, Transform] = field(default_factory=dict)
    #: Tensors transformers recomputes from the config (llama 3's rope scaling factors).
    ignored: frozenset[str] = frozenset()

    def hf_name(self, name: str) -> str | None:
        """The transformers name of GGUF tensor ``name`` (``blk.3.ffn_up.weight`` →
        ``model.layers.3.mlp.up_proj.weight``), None for a name outside the map."""
        if name in self.global_names:
            return self.global_names[name]
        match = _BLOCK.match(name)
        if match is None or match[2] not in self.block_names:
            return None
        return f"model.layers.{match[1]}.{self.block_names[match[2]]}.{match[3]}"

    def gguf_name(self, name: str) -> str | None:
        """The inverse of ``hf_name`` (for writers and tests)."""
        for gguf, hf in self.global_names.items():
            if hf == name:
                return gguf
        match = _HF_BLOCK.match(name)
        if match is None:
            return None
        for gguf, hf in self.block_names.items():
            if hf == match[2]:
                return f"blk.{match[1]}.{gguf}.{match[3]}"
        return None

    def transform(self, name: str) -> Transform | None:
        """The layout change to undo on GGUF tensor ``name``, if any."""
        match = _BLOCK.match(name)
        return None if match is None else self.transforms.get(match[2])


#: The names llama.cpp gives the tensors of Llama-like models (every family below).
LLAMA_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LLAMA_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_ROPE_FREQS = frozenset({"rope_freqs.weight"})

#: Every architecture ``load_into`` maps, by ``general.architecture``. llama.cpp writes Mistral
#: models as ``llama`` (permuted); only ``llama`` has its q/k rows permuted.
FAMILIES: dict[str, Family] = {family.architecture: family for family in (
    Family("llama", LLAMA_GLOBAL_NAMES, LLAMA_BLOCK_NAMES,
           {"attn_q": UNPERMUTE_Q, "attn_k": UNPERMUTE_K}, _ROPE_FREQS),
    Family("mistral", LLAMA_GLOBAL_NAMES, LLAMA_BLOCK_NAMES, ignored=_ROPE_FREQS),
    Family("qwen2", LLAMA_GLOBAL_NAMES, LLAMA_BLOCK_NAMES, ignored=_ROPE_FREQS),
)}


def family_of(meta: Mapping[str, Any] | None, path: str) -> Family:
    """The family of a GGUF file's metadata, or a ``PlacementError`` listing those known."""
    architecture = str((meta or {}).get("general.architecture", ""))
    family = FAMILIES.get(architecture)
    if family is None:
        raise PlacementError(f"GGUF architecture {architecture!r} has no name map into "
                             f"transformers models (supported: {', '.join(FAMILIES)}); load it "
                             "with weightlift.load and rename the tensors yourself", path=path)
    return family


def hf_name(name: str, architecture: str = "llama") -> str | None:
    """``FAMILIES[architecture].hf_name(name)``."""
    return FAMILIES[architecture].hf_name(name)


def gguf_name(name: str, architecture: str = "llama") -> str | None:
    """``FAMILIES[architecture].gguf_name(name)``."""
    return FAMILIES[architecture].gguf_name(name)


__all__ = ["FAMILIES", "UNPERMUTE_K", "UNPERMUTE_Q", "Family", "Transform", "family_of",
           "gguf_name", "hf_name", "permute_qk", "unpermute_qk"]
