"""``load_into`` for GGUF checkpoints: llama.cpp tensor names → transformers names, and back.

    model = LlamaForCausalLM(config)                 # or built on the meta device
    weightlift.load_into(model, "llama-3-8b.F16.gguf")

llama.cpp's converter renames tensors (``blk.0.attn_q.weight`` for
``model.layers.0.self_attn.q_proj.weight``) and, for the ``llama`` architecture (Llama and
Mistral), permutes the rows of the q and k projections for its rotary layout. Loading maps the
names back and undoes that permutation exactly as transformers' own GGUF loader does
(``modeling_gguf_pytorch_utils.LlamaTensorProcessor``), so the logits match
``from_pretrained(dir, gguf_file=...)``. Plain tensors go straight into the module's storage
through the usual load path; permuted or quantized ones pass through ``stream()`` one at a time
(host memory: the budget plus one tensor) and are dequantized by ``weightlift.dequant``.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from . import api
from .errors import PlacementError
from .formats.ggml import GGMLType
from .formats.records import DTYPES, TensorInfo
from .sources.records import Entry, Layout

if TYPE_CHECKING:
    from .load_into import LoadIntoResult

#: GGUF ``general.architecture`` values whose tensors map onto these transformers families.
FAMILIES = ("llama", "mistral", "qwen2")
#: Architectures whose q/k rows llama.cpp permuted (transformers reverses exactly these).
PERMUTED = ("llama",)
#: Whole-model tensors.
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
#: Per-block tensors: ``blk.N.<gguf>.(weight|bias)`` → ``model.layers.N.<hf>.(weight|bias)``.
BLOCK_NAMES = {
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
#: Tensors transformers recomputes from the config (llama 3's rope scaling factors).
IGNORED = frozenset({"rope_freqs.weight"})
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_name(name: str) -> str | None:
    """The transformers name of GGUF tensor ``name`` (``blk.3.ffn_up.weight`` →
    ``model.layers.3.mlp.up_proj.weight``), None for a name outside the map."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    match = _BLOCK.match(name)
    if match is None or match[2] not in BLOCK_NAMES:
        return None
    return f"model.layers.{match[1]}.{BLOCK_NAMES[match[2]]}.{match[3]}"


def gguf_name(name: str) -> str | None:
    """The inverse of ``hf_name`` (for writers and tests)."""
    for gguf, hf in GLOBAL_NAMES.items():
        if hf == name:
            return gguf
    match = re.match(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    if match is None:
        return None
    for gguf, hf in BLOCK_NAMES.items():
        if hf == match[2]:
            return f"blk.{match[1]}.{gguf}.{match[3]}"
    return None


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


def dequantize(packed: torch.Tensor, kind: GGMLType, dtype: torch.dtype, tensor: str
               ) -> torch.Tensor:
    """The hook for quantized tensors: ``weightlift.dequant`` (imported when first needed)."""
    try:
        from .dequant import dequantize as kernel  # type: ignore[import-not-found]
    except ImportError:
        raise PlacementError(f"is {kind.name}: loading it into a module needs dequantization, "
                             "which this weightlift build lacks (weightlift.dequant); load it "
                             "packed with weightlift.load and dequantize it yourself, or use an "
                             "F32/F16/BF16 GGUF", tensor=tensor) from None
    return kernel(packed, kind, dtype)


def _prefix(module: torch.nn.Module) -> str:
    """``"model."`` for a *ForCausalLM, ``""`` for a bare LlamaModel-like module."""
    names = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    return "" if "embed_tokens.weight" in names and "model.embed_tokens.weight" not in names \
        else "model."


def _heads(meta: Any, arch: str, path: str) -> tuple[int, int]:
    try:
        heads = int(meta[f"{arch}.attention.head_count"])
        kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    except (KeyError, TypeError, ValueError):
        raise PlacementError(f"has no usable '{arch}.attention.head_count': cannot undo "
                             "llama.cpp's q/k permutation", path=path) from None
    return heads, kv_heads


def load_gguf_into(module: torch.nn.Module, layout: Layout, *, strict: bool, strategy: str,
                   target: torch.device | None) -> LoadIntoResult:
    """``load_into`` on a GGUF layout (called by ``weightlift.load_into``)."""
    from .load_into import LoadIntoResult, _install, _match, _read, module_slots

    meta = layout.metadata or {}
    arch = str(meta.get("general.architecture", ""))
    if arch not in FAMILIES:
        raise PlacementError(f"GGUF architecture {arch!r} has no name map into transformers "
                             f"models (supported: {', '.join(FAMILIES)}); load it with "
                             "weightlift.load and rename the tensors yourself", path=layout.root)
    heads = _heads(meta, arch, layout.root) if arch in PERMUTED else None
    prefix = _prefix(module)
    renamed: dict[str, Entry] = {}
    #: transformers name → (GGUF name, the real record, heads to unpermute by, or 0).
    special: dict[str, tuple[str, TensorInfo, int]] = {}
    for name, entry in layout.entries.items():
        if name in IGNORED:
            continue
        mapped = hf_name(name)
        if mapped is None:
            new = name  # left as it is: reported as unexpected
        elif mapped.startswith("model."):
            new = prefix + mapped.removeprefix("model.")
        else:
            new = mapped
        info = entry.info
        n_head = 0
        if heads is not None and ".attn_q." in name:
            n_head = heads[0]
        elif heads is not None and ".attn_k." in name:
            n_head = heads[1]
        quantized = info.ggml is not None and info.ggml.quantized
        if quantized or n_head:
            special[new] = (name, info, n_head)
            if quantized:  # matched against the module as the floats it will become
                info = replace(info, dtype=DTYPES["F32"], shape=info.ggml_shape or info.shape)
        renamed[new] = Entry(entry.shard, replace(info, name=new))
    view = Layout(layout.root, layout.shards, renamed, layout.metadata, layout.index_path)
    plan = _match(module, module_slots(module), view, target, strict)
    for device, destinations in plan.by_device.items():
        plain = {n: d for n, d in destinations.items() if n not in special}
        if plain:
            _read(view, plain, torch.device(device), strategy)
        wanted = {special[n][0]: (n, d) for n, d in destinations.items() if n in special}
        if wanted:
            _fill(layout, wanted, special, strategy)
    _install(plan, target)
    return LoadIntoResult(plan.missing, plan.unexpected)


def _fill(layout: Layout, wanted: dict[str, tuple[str, torch.Tensor]],
          special: dict[str, tuple[str, TensorInfo, int]], strategy: str) -> None:
    """Stream the tensors that need work, one at a time, into their destinations."""
    with torch.no_grad():
        for name, tensor in api.run_load(layout, keys=list(wanted), device="cpu",
                                         strategy=strategy, dtype=None, streaming=True):
            new, dest = wanted[name]
            _, info, n_head = special[new]
            value = tensor
            if info.ggml is not None and info.ggml.quantized:
                value = dequantize(tensor, info.ggml, torch.float32, name)
            if n_head:
                value = unpermute_qk(value, n_head)
            dest.copy_(value)


__all__ = ["FAMILIES", "gguf_name", "hf_name", "load_gguf_into", "permute_qk", "unpermute_qk"]
