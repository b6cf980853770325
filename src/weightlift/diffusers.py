"""``weightlift.diffusers``: diffusers pipelines and models, their weights read by weightlift.

    from weightlift.diffusers import from_pretrained, load_model, load_single_file
    pipe = from_pretrained("hf://black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16,
                           device="cuda", max_host_memory="1GB")
    unet = load_model(UNet2DConditionModel, "sd15/", subfolder="unet", variant="fp16")

Every torch component of a pipeline (UNet or transformer, VAE, ControlNet, text encoders) is built
from its config with its parameters on the ``meta`` device (buffers on the CPU, as diffusers builds
them), then filled by ``weightlift.load`` straight on ``device``; text encoders go through
``weightlift.transformers``. What diffusers applies on load is applied the same way, with its own
code where it has a function for it: the variant's files, ``_keep_in_fp32_modules``, the
deprecated attention-block key renames (``_fix_state_dict_keys_on_load``), sharded components,
tied weights. Schedulers, tokenizers and processors are loaded by diffusers, which also assembles
the pipeline (``Pipeline.from_pretrained(directory, unet=..., ...)``), so it is diffusers' own.

Not done here, refused with a message naming the option: a quantizer (``quantization_config``),
``device_map``/offload, tensor parallelism, FlashPack, pickled ``.bin`` weights and downloads
(a local directory or an ``hf://`` entry of the local Hugging Face cache only). GGUF transformers:
``load_single_file(FluxTransformer2DModel, "flux-Q4_0.gguf", quantization_config=...)``.
diffusers is imported only when one of these functions runs (``pip install 'weightlift[diffusers]'``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .api import load
from .api import open as open_checkpoint
from .errors import CheckpointError, PlacementError, WeightliftError
from .formats.records import TensorInfo
from .load_into import check_tensor, module_slots, put
from .place import parse_device
from .sources.hub import resolve_source
from .transformers import from_pretrained as transformers_from_pretrained

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import DiffusionPipeline, ModelMixin

#: diffusers' file names for a model's weights (``diffusers.utils.constants``).
WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"

#: Options of diffusers' loaders that weightlift does not carry out, and what to do instead.
REFUSED = {
    "device_map": "weightlift places every weight on one device= (no accelerate dispatch or "
                  "offload); for offload load with diffusers",
    "max_memory": "it sizes a device_map, which weightlift does not do",
    "offload_folder": "weightlift does not offload to disk",
    "offload_state_dict": "weightlift does not offload to disk",
    "quantization_config": "weightlift does not quantize while loading (a GGUF transformer is "
                           "the exception: weightlift.diffusers.load_single_file(cls, "
                           "'model.gguf', quantization_config=GGUFQuantizationConfig(...)))",
    "low_cpu_mem_usage": "weightlift always builds on the meta device (low_cpu_mem_usage=True)",
    "use_safetensors": "weightlift reads safetensors only",
    "use_flashpack": "FlashPack files are not read by weightlift",
    "parallel_config": "tensor-parallel loading is weightlift.distributed's, not this module's",
    "disable_mmap": "weightlift maps files only with strategy='mmap'; choose strategy= instead",
    "output_loading_info": "missing and unexpected keys are raised or warned about instead",
    "ignore_mismatched_sizes": "a shape mismatch is an error",
    "custom_pipeline": "custom pipeline code is loaded by diffusers only",
    "trust_remote_code": "remote code is loaded by diffusers only",
    "force_download": "weightlift never downloads: snapshot_download first, then pass the "
                      "directory or hf://org/name",
    "proxies": "weightlift never downloads",
    "token": "weightlift never downloads",
    "revision": "name the revision in the source: hf://org/name@revision",
    "cache_dir": "weightlift reads the default Hugging Face cache (HF_HUB_CACHE) through hf://",
}
#: Options diffusers' ``from_pretrained`` accepts that mean nothing when nothing is downloaded.
IGNORED = ("local_files_only",)


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError as exc:
        raise WeightliftError("weightlift.diffusers needs the diffusers package: "
                              "pip install 'weightlift[diffusers]'") from exc
    return diffusers


#: Values of refused options that ask for what weightlift does anyway: accepted.
HARMLESS = {"low_cpu_mem_usage": (True,), "use_safetensors": (True, None),
            "disable_mmap": (False,)}


def _refuse(options: dict[str, Any], what: str, ignored: tuple[str, ...] = IGNORED) -> None:
    """Drop the options that mean nothing here; raise on one weightlift does not carry out."""
    for name in ignored:
        options.pop(name, None)
    for name, reason in REFUSED.items():
        if name not in options:
            continue
        value = options.pop(name)
        if value not in HARMLESS.get(name, ()):
            raise PlacementError(f"{what}: {name}={value!r} is not supported by "
                                 f"weightlift.diffusers ({reason})")


def pipeline_directory(source: str | os.PathLike[str]) -> Path:
    """The local directory of a pipeline or model: a path, or ``hf://org/name[@rev]`` and
    ``models--org--name`` folders of the local Hugging Face cache."""
    path = resolve_source(source) or Path(source)
    if not path.exists():
        raise CheckpointError("no such file or directory", path=path)
    return path


# ---- one diffusers model -------------------------------------------------------------------------

def weights_file(directory: Path, name: str = WEIGHTS, variant: str | None = None) -> Path:
    """The file to read in a model folder, as diffusers picks it: the (variant) index of a
    sharded model (or a variant's index under its legacy name), else the single (variant) file;
    a ``CheckpointError`` listing what is there when none exists."""
    add_variant = _diffusers().utils._add_variant
    index = directory / add_variant(f"{name}.index.json", variant)
    if index.is_file():
        return index
    legacy = directory / f"{name}.{variant}.index.json"  # its deprecated name
    if variant is not None and legacy.is_file():
        return legacy
    single = directory / add_variant(name, variant)
    if single.is_file():
        return single
    held = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    pickled = [n for n in held if n.endswith((".bin", ".ckpt", ".pt"))]
    hint = (f"; it holds pickled weights ({', '.join(pickled)}), which weightlift does not read: "
            "convert them to safetensors or load with diffusers" if pickled else
            f"; it holds: {', '.join(held) or 'nothing'}")
    kind = f" (variant {variant!r})" if variant else ""
    raise CheckpointError(f"holds neither {single.name} nor {index.name}{kind}{hint}",
                          path=directory)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build with every parameter on ``meta`` and buffers where they are made, as diffusers does
    (``accelerate.init_empty_weights()``), so computed buffers hold their values."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            kind = type(module._parameters[name])
            extra = {**module._parameters[name].__dict__, "requires_grad": param.requires_grad}
            module._parameters[name] = kind(module._parameters[name].to("meta"), **extra)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_on_meta(model_class: Any, config: dict[str, Any], torch_dtype: torch.dtype | None,
                  **overrides: Any) -> ModelMixin:
    """``model_class.from_config(config)`` under diffusers' own build settings: in ``torch_dtype``
    (the default dtype while building), no weight initialisation, parameters on ``meta``."""
    no_init_weights = _diffusers().models.modeling_utils.no_init_weights
    original = model_class._set_default_torch_dtype(torch_dtype) if torch_dtype else None
    try:
        with no_init_weights(), _parameters_on_meta():
            return model_class.from_config(config, **overrides)
    finally:
        if original is not None:
            torch.set_default_dtype(original)


def _keep_in_fp32(model_class: Any) -> list[str]:
    kept = getattr(model_class, "_keep_in_fp32_modules", None) or []
    return [kept] if isinstance(kept, str) else list(kept)


def load_model(model_class: Any, source: str | os.PathLike[str], subfolder: str | None = None, *,
               torch_dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               strategy: str = "auto", max_host_memory: int | str | None = None,
               variant: str | None = None, **kwargs: Any) -> Any:
    """One model, like ``model_class.from_pretrained(source, subfolder=...)`` (eval mode), its
    weights read by weightlift straight on ``device``.

        unet = load_model(UNet2DConditionModel, "sd15/", subfolder="unet", variant="fp16")
        te = load_model(CLIPTextModel, "hf://org/sd", subfolder="text_encoder")

    A diffusers ``ModelMixin`` is built from ``config.json`` on ``meta`` and filled; a transformers
    model goes through ``weightlift.transformers.from_pretrained``. ``torch_dtype`` as in diffusers
    (``None``: diffusers models in float32; transformers models as the config says), with
    ``_keep_in_fp32_modules`` kept in float32. ``variant="fp16"`` reads
    ``diffusion_pytorch_model.fp16.safetensors`` (or its sharded index). ``strategy`` and
    ``max_host_memory`` are weightlift's (see ``weightlift.load``); other keyword arguments
    override config entries, as in diffusers. Refused: see ``REFUSED``.
    """
    options = dict(kwargs)
    _refuse(options, str(getattr(model_class, "__name__", model_class)))
    directory = pipeline_directory(source)
    folder = directory / subfolder if subfolder else directory
    if torch_dtype is not None and not isinstance(torch_dtype, torch.dtype):
        raise PlacementError(f"torch_dtype must be a torch.dtype, not {torch_dtype!r}")
    if _is_transformers_class(model_class):
        weights = weights_file(folder, TRANSFORMERS_WEIGHTS, variant)
        return transformers_from_pretrained(weights, model_class=model_class, dtype=torch_dtype,
                                            device=device, strategy=strategy,
                                            max_host_memory=max_host_memory, **options)
    diffusers = _diffusers()
    if not (isinstance(model_class, type) and issubclass(model_class, diffusers.ModelMixin)):
        raise PlacementError(f"{model_class!r} is neither a diffusers ModelMixin nor a "
                             "transformers PreTrainedModel; load it with its own from_pretrained")
    if torch_dtype is not None and torch_dtype.itemsize == 1:
        raise PlacementError(f"torch_dtype={torch_dtype} (float8) is cast after loading by "
                             "diffusers; load in bfloat16 and call model.to() yourself")
    if not (folder / "config.json").is_file():
        raise CheckpointError("has no config.json, so the model cannot be built", path=folder)
    config, overrides = model_class.load_config(os.fspath(folder), return_unused_kwargs=True,
                                                local_files_only=True, **options)
    if issubclass(model_class, diffusers.models.modeling_utils.LegacyModelMixin):
        remap = diffusers.models.model_loading_utils._fetch_remapped_cls_from_config
        model_class = remap(config, model_class)
    weights = weights_file(folder, WEIGHTS, variant)
    model = build_on_meta(model_class, config, torch_dtype, **overrides)
    fill(model, weights, torch_dtype=torch_dtype, device=device, strategy=strategy,
         max_host_memory=max_host_memory)
    model.register_to_config(_name_or_path=os.fspath(source))
    model.eval()
    return model


def _is_transformers_class(model_class: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)


def fill(model: Any, weights: Path, *, torch_dtype: torch.dtype | None,
         device: str | torch.device = "cpu", strategy: str = "auto",
         max_host_memory: int | str | None = None) -> None:
    """Read ``weights`` into a diffusers model built by ``build_on_meta``, converting dtypes as
    diffusers' ``load_model_dict_into_meta`` does; then every tensor is on ``device``.

    On the CPU the tensors ``weightlift.load`` returns become the parameters (no second copy:
    views of the page cache under ``mmap``, as diffusers' default load leaves them; anonymous
    memory filled by parallel reads otherwise); on an accelerator each arrives in its one device
    tensor. Missing parameters are an error naming them; unused checkpoint tensors a warning.
    """
    target = parse_device(device)
    with open_checkpoint(weights) as checkpoint:
        infos = {name: checkpoint.layout.entries[name].info for name in checkpoint.keys()}
        sharded = checkpoint.layout.index_path is not None
    model_names = _model_names(model, infos, sharded)
    kept = _keep_in_fp32(type(model)) if torch_dtype is not None else []
    groups: dict[torch.dtype | None, dict[str, Any]] = {}
    missing, problems, used = [], [], set()
    for slot in module_slots(model):
        if not slot.persistent:
            continue  # computed while building, on the CPU
        present = [name for name in slot.names if name in model_names]
        if not present:
            if slot.tensor.is_meta:
                missing.extend(slot.names)
            continue
        stored = model_names[present[0]]
        used.update(model_names[name] for name in present)
        problem = check_tensor(present[0], infos[stored], slot.tensor)
        if problem:
            problems.append(problem)
            continue
        dtype = _dtype_for(present[0], infos[stored], slot.tensor, torch_dtype, kept)
        groups.setdefault(dtype, {})[stored] = slot
    kind = type(model).__name__
    if problems:
        raise PlacementError(f"cannot load into {kind}: " + "; ".join(problems), path=weights)
    if missing:
        raise CheckpointError(f"lacks {len(missing)} weight(s) of {kind}: {_names(missing)}; "
                              "is this the right subfolder and variant?", path=weights)
    for dtype, chosen in groups.items():
        state = load(weights, keys=list(chosen), dtype=dtype, device=target, strategy=strategy,
                     max_host_memory=max_host_memory)
        for name, slot in chosen.items():
            put(slot, state.pop(name))
    for slot in module_slots(model):  # buffers built on the CPU, not in the checkpoint
        if slot.tensor.device != target:
            put(slot, slot.tensor.to(target))
    _warn_unused(model, weights, sorted(set(infos) - used))


def _model_names(model: Any, infos: dict[str, TensorInfo], sharded: bool) -> dict[str, str]:
    """The model's name of each checkpoint tensor → its checkpoint name. Like diffusers, only an
    unsharded file has its deprecated attention-block names (``query`` → ``to_q``, ...) renamed,
    by the model's own ``_fix_state_dict_keys_on_load``."""
    names = {name: name for name in infos}
    if not sharded:
        model._fix_state_dict_keys_on_load(names)
    return names


def _dtype_for(name: str, info: TensorInfo, tensor: torch.Tensor, torch_dtype: torch.dtype | None,
               kept: list[str]) -> torch.dtype | None:
    """The dtype diffusers gives a weight: float32 inside ``_keep_in_fp32_modules``, else
    ``torch_dtype``, for floating weights; the model's own otherwise."""
    if torch_dtype is not None and info.dtype.torch.is_floating_point:
        parts = name.split(".")
        return torch.float32 if any(module in parts for module in kept) else torch_dtype
    return tensor.dtype if tensor.dtype.is_floating_point else None


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _warn_unused(model: Any, weights: Path, unused: list[str]) -> None:
    for pattern in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []:
        unused = [name for name in unused if re.search(pattern, name) is None]
    if unused:
        warnings.warn(f"{weights}: checkpoint tensors {type(model).__name__} does not use: "
                      f"{_names(unused)}", UserWarning, stacklevel=3)


# ---- a whole pipeline ----------------------------------------------------------------------------

def from_pretrained(source: str | os.PathLike[str], *, pipeline_class: Any = None,
                    torch_dtype: torch.dtype | dict[str, torch.dtype] | None = None,
                    device: str | torch.device = "cpu", strategy: str = "auto",
                    max_host_memory: int | str | None = None, variant: str | None = None,
                    **kwargs: Any) -> DiffusionPipeline:
    """A diffusers pipeline, like ``DiffusionPipeline.from_pretrained(source, ...)``, with every
    torch component read by weightlift straight on ``device``.

        pipe = from_pretrained("hf://stabilityai/sdxl-turbo", torch_dtype=torch.float16,
                               variant="fp16", device="cuda")
        image = pipe("a cat", num_inference_steps=1).images[0]

    ``source``: a directory with ``model_index.json`` or ``hf://org/name`` in the local cache.
    ``pipeline_class``: default the one ``model_index.json`` names. ``torch_dtype``: a dtype or
    diffusers' per-component dict (``{"transformer": torch.bfloat16, "default": ...}``).
    ``variant``: read each component's variant files where its folder has them (as diffusers).
    Components passed as keyword arguments (``safety_checker=None``, ``unet=my_unet``) are used
    as they are; other keyword arguments go to diffusers' ``from_pretrained``, which loads the
    schedulers, tokenizers and processors and builds the pipeline.
    """
    diffusers = _diffusers()
    options = dict(kwargs)
    _refuse(options, "from_pretrained")
    directory = pipeline_directory(source)
    index = directory / "model_index.json"
    if not index.is_file():
        raise CheckpointError("has no model_index.json: not a diffusers pipeline (a single model "
                              "loads with weightlift.diffusers.load_model)", path=directory)
    try:
        config = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot be read: {exc}", path=index) from exc
    loading = diffusers.pipelines.pipeline_loading_utils
    cls = loading._get_pipeline_class(pipeline_class or diffusers.DiffusionPipeline,
                                      config=config)
    variants = loading._identify_model_variants(os.fspath(directory), variant, config)
    if variant is not None and not variants:
        raise CheckpointError(f"has no files of variant {variant!r} in any component folder",
                              path=directory)
    expected, _ = cls._get_signature_keys(cls)
    components = {}
    for name in expected:
        if name in options or not isinstance(config.get(name), list):
            continue
        library, class_name = config[name]
        model_class = _component_class(diffusers, library, class_name)
        if not _is_torch_model(diffusers, model_class):
            continue  # schedulers, tokenizers, processors: diffusers loads them
        dtype = (torch_dtype.get(name, torch_dtype.get("default", torch.float32))
                 if isinstance(torch_dtype, dict) else torch_dtype)
        if not (directory / name).is_dir():
            raise CheckpointError(f"has no folder for the pipeline's {name} ({class_name}) "
                                  "listed in model_index.json", path=directory)
        components[name] = load_model(model_class, directory, subfolder=name, torch_dtype=dtype,
                                      device=device, strategy=strategy,
                                      max_host_memory=max_host_memory, variant=variants.get(name))
    return cls.from_pretrained(os.fspath(directory), **components, **options,
                               **({"torch_dtype": torch_dtype} if torch_dtype is not None else {}))


def _component_class(diffusers: Any, library: str, class_name: str) -> Any:
    """The class ``model_index.json`` names: in diffusers, a pipeline module of it (like
    ``stable_diffusion``'s safety checker) or another library (transformers)."""
    if library is None:
        return None
    import importlib

    module = getattr(diffusers.pipelines, library, None) if library != "diffusers" else diffusers
    try:
        module = module or importlib.import_module(library)
    except ImportError:
        return None  # diffusers will say what is missing
    return getattr(module, class_name, None)


def _is_torch_model(diffusers: Any, model_class: Any) -> bool:
    return isinstance(model_class, type) and (issubclass(model_class, diffusers.ModelMixin)
                                              or _is_transformers_class(model_class))


# ---- single files: original layouts, GGUF ---------------------------------------------------------

def load_single_file(model_class: Any, path: str | os.PathLike[str], *,
                     torch_dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                     strategy: str = "auto", max_host_memory: int | str | None = None,
                     **kwargs: Any) -> Any:
    """``model_class.from_single_file(path, ...)`` with the file read by weightlift: an
    original-layout ``.safetensors`` (most community checkpoints) or a GGUF file.

        unet = load_single_file(UNet2DConditionModel, "v1-5-pruned.safetensors",
                                config="sd15/", subfolder="unet")
        flux = load_single_file(FluxTransformer2DModel, "flux1-dev-Q4_0.gguf", config="flux/",
                                subfolder="transformer",
                                quantization_config=GGUFQuantizationConfig(torch.bfloat16))

    The tensors are read into memory (no mapping unless ``strategy="mmap"``, never one whole-file
    ``read()``) and handed to diffusers' ``from_single_file`` as a state dict, so diffusers' own
    conversion to its layout runs on them: host memory is the converted model plus the budget.
    GGUF tensors arrive packed, as diffusers' ``GGUFParameter`` with their quantization type, for
    diffusers' GGUF quantizer. Keyword arguments (``config``, ``subfolder``, ``original_config``,
    ``quantization_config``) go to ``from_single_file``; ``device`` is its ``device``.
    """
    options = dict(kwargs)
    quantization = options.pop("quantization_config", None)
    _refuse(options, f"load_single_file({getattr(model_class, '__name__', model_class)})",
            ignored=())  # local_files_only stays: diffusers may fetch the config
    if quantization is not None:
        options["quantization_config"] = quantization  # diffusers' GGUF quantizer, on our reads
    file = Path(resolve_source(path) or path)
    if not file.is_file():
        raise CheckpointError("no such file", path=file)
    if file.name.endswith(".gguf"):
        state = _gguf_state(file, strategy, max_host_memory)
    else:
        state = load(file, strategy=strategy, max_host_memory=max_host_memory)
    target = parse_device(device)
    return model_class.from_single_file(state, torch_dtype=torch_dtype,
                                        device=None if target.type == "cpu" else target,
                                        **options)


def _gguf_state(file: Path, strategy: str, max_host_memory: int | str | None
                ) -> dict[str, torch.Tensor]:
    """A GGUF file as diffusers' ``load_gguf_checkpoint`` returns it: F32/F16 tensors as they
    are, every other type (BF16 included) as ``GGUFParameter`` rows of packed bytes."""
    utils = _quantizer_utils()
    with open_checkpoint(file) as checkpoint:
        types = {name: checkpoint.ggml_type(name) for name in checkpoint.keys()}
    for name, kind in types.items():
        if kind is not None and kind.name not in ("F32", "F16") \
                and kind.id not in {int(t) for t in utils.SUPPORTED_GGUF_QUANT_TYPES}:
            raise PlacementError(f"tensor {name!r} has GGML type {kind.name}, which diffusers' "
                                 "GGUF quantizer does not support", path=file)
    state = load(file, strategy=strategy, max_host_memory=max_host_memory)
    import gguf

    for name, kind in types.items():
        if kind is None or kind.name in ("F32", "F16"):
            continue
        packed = state[name]
        if packed.dtype != torch.uint8:  # BF16 loads as bfloat16: its bytes, as gguf-py gives them
            packed = packed.view(torch.uint8)
        state[name] = utils.GGUFParameter(packed, quant_type=gguf.GGMLQuantizationType(kind.id))
    return state


def _quantizer_utils() -> Any:
    _diffusers()
    try:
        import gguf  # noqa: F401 - diffusers' GGUF quantizer needs it
        from diffusers.quantizers.gguf import utils
    except ImportError as exc:
        raise WeightliftError("loading a GGUF transformer needs the gguf package: "
                              "pip install gguf") from exc
    return utils


__all__ = ["REFUSED", "build_on_meta", "fill", "from_pretrained", "load_model",
           "load_single_file", "pipeline_directory", "weights_file"]
