"""``weightlift.diffusers`` against diffusers' own loading, on tiny random pipelines saved here.

Every parameter and buffer must equal what diffusers' ``from_pretrained`` (or
``from_single_file``) gives, bit for bit, and a pipeline's output for a fixed seed too: an SD-style
UNet pipeline (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, a CLIP tokenizer from a vocab
written here, a DDIM scheduler) and a Flux-style one (FluxTransformer2DModel, AutoencoderKL, CLIP
and T5 text encoders), sharded and as fp16 variant files; a Wan transformer for
``_keep_in_fp32_modules``; an LTX-Video transformer as single files (original layout, GGUF); a VAE
saved with the deprecated attention-block names diffusers renames on load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import shutil
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed "
                                "(pip install 'weightlift[diffusers]')")
transformers = pytest.importorskip("transformers", reason="diffusers pipelines need transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

import pagecache  # noqa: E402
import weightlift  # noqa: E402
from weightlift.diffusers import from_pretrained, load_model, load_single_file  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def write_clip_tokenizer(folder: Path) -> transformers.CLIPTokenizer:
    """A CLIP BPE tokenizer over single letters (no network, no sentencepiece)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", *LETTERS, *(c + "</w>" for c in LETTERS)]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                      model_max_length=77)


def clip_encoder(hidden: int = 8) -> transformers.CLIPTextModel:
    config = transformers.CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                         hidden_size=hidden, intermediate_size=16,
                                         num_attention_heads=2, num_hidden_layers=2,
                                         vocab_size=54, projection_dim=hidden,
                                         max_position_embeddings=77)
    return transformers.CLIPTextModel(config).eval()


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Stable-Diffusion-style pipeline: sharded float32 files and an fp16 variant next to them."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
        norm_num_groups=4, attention_head_dim=2)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                  norm_num_groups=4, sample_size=16)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", clip_sample=False,
                                        set_alpha_to_one=False)
    root = tmp_path_factory.mktemp("sd")
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=clip_encoder(),
        tokenizer=write_clip_tokenizer(root / "vocab"), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(root / "pipe", variant="fp16")
    pipe.to(torch.float32).save_pretrained(root / "pipe", max_shard_size="20KB")
    return root / "pipe"


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Flux-style pipeline: transformer, VAE, CLIP and T5 encoders, sharded."""
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8])
    vae = diffusers.AutoencoderKL(sample_size=32, in_channels=3, out_channels=3,
                                  block_out_channels=(4,), layers_per_block=1, latent_channels=1,
                                  norm_num_groups=1, use_quant_conv=False,
                                  use_post_quant_conv=False, shift_factor=0.0609,
                                  scaling_factor=1.5035)
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, vocab_size=54,
        decoder_start_token_id=0, pad_token_id=1, eos_token_id=1)).eval()
    root = tmp_path_factory.mktemp("flux")
    tokenizer = write_clip_tokenizer(root / "vocab")
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=clip_encoder(32), tokenizer=tokenizer, text_encoder_2=t5,
        tokenizer_2=tokenizer, transformer=transformer)
    pipe.save_pretrained(root / "pipe", max_shard_size="40KB")
    return root / "pipe"


def assert_same_tensors(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Every parameter and buffer (persistent or not) equal, bit for bit, with the same dtype."""
    mine = dict([*ours.named_parameters(), *ours.named_buffers()])
    reference = dict([*theirs.named_parameters(), *theirs.named_buffers()])
    assert mine.keys() == reference.keys()
    for name, tensor in reference.items():
        got = mine[name]
        assert got.dtype == tensor.dtype, name
        assert got.device == tensor.device, name
        assert torch.equal(got, tensor), name
    assert ours.training == theirs.training


def assert_same_pipelines(ours, theirs) -> None:
    assert type(ours) is type(theirs)
    assert ours.components.keys() == theirs.components.keys()
    for name, component in theirs.components.items():
        if isinstance(component, torch.nn.Module):
            assert type(ours.components[name]) is type(component), name
            assert_same_tensors(ours.components[name], component)
        elif component is not None:
            assert type(ours.components[name]) is type(component), name


def sd_image(pipe) -> torch.Tensor:
    return pipe("a cat", num_inference_steps=2, height=16, width=16, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def test_sd_pipeline_equals_diffusers(sd_dir: Path) -> None:
    assert list((sd_dir / "unet").glob("*.safetensors.index.json"))  # sharded
    reference = diffusers.DiffusionPipeline.from_pretrained(sd_dir)
    for strategy in ("auto", "stream"):
        ours = from_pretrained(sd_dir, strategy=strategy, max_host_memory="64MB")
        assert_same_pipelines(ours, reference)
        assert torch.equal(sd_image(ours), sd_image(reference))


def test_sd_variant_and_dtype_equal_diffusers(sd_dir: Path) -> None:
    assert (sd_dir / "vae" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (sd_dir / "text_encoder" / "model.fp16.safetensors").is_file()
    for dtype in (None, torch.float16):
        reference = diffusers.StableDiffusionPipeline.from_pretrained(sd_dir, variant="fp16",
                                                                      torch_dtype=dtype)
        ours = from_pretrained(sd_dir, variant="fp16", torch_dtype=dtype,
                               pipeline_class=diffusers.StableDiffusionPipeline)
        assert_same_pipelines(ours, reference)
    assert ours.unet.dtype == torch.float16
    reference.to(torch.float32), ours.to(torch.float32)
    assert torch.equal(sd_image(ours), sd_image(reference))


def test_flux_pipeline_equals_diffusers(flux_dir: Path) -> None:
    assert list((flux_dir / "transformer").glob("*.safetensors.index.json"))
    dtypes = {"transformer": torch.bfloat16, "default": torch.float32}  # diffusers' per-component
    reference = diffusers.FluxPipeline.from_pretrained(flux_dir, torch_dtype=dtypes)
    ours = from_pretrained(flux_dir, torch_dtype=dtypes)
    assert ours.transformer.dtype == torch.bfloat16 and ours.vae.dtype == torch.float32
    assert_same_pipelines(ours, reference)
    reference = diffusers.FluxPipeline.from_pretrained(flux_dir, torch_dtype=torch.bfloat16)
    ours = from_pretrained(flux_dir, torch_dtype=torch.bfloat16)
    assert_same_pipelines(ours, reference)

    def image(pipe):
        return pipe("a cat", num_inference_steps=2, height=8, width=8, max_sequence_length=8,
                    output_type="pt", generator=torch.Generator().manual_seed(0)).images

    assert torch.equal(image(ours), image(reference))


def test_pipeline_from_the_hub_cache(sd_dir: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``hf://org/name``: the snapshot the local cache's ``refs/main`` names, never a download."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny-sd"
    shutil.copytree(sd_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    pipe = from_pretrained("hf://org/tiny-sd")
    reference = diffusers.DiffusionPipeline.from_pretrained(repo / "snapshots" / commit)
    assert_same_pipelines(pipe, reference)


def test_components_passed_are_used_as_they_are(sd_dir: Path) -> None:
    vae = diffusers.AutoencoderKL.from_pretrained(sd_dir, subfolder="vae")
    pipe = from_pretrained(sd_dir, vae=vae)
    assert pipe.vae is vae


def test_single_model_equals_diffusers(sd_dir: Path) -> None:
    for model_class, folder in ((diffusers.UNet2DConditionModel, "unet"),
                                (diffusers.AutoencoderKL, "vae"),
                                (transformers.CLIPTextModel, "text_encoder")):
        reference = model_class.from_pretrained(sd_dir, subfolder=folder)
        ours = load_model(model_class, sd_dir, subfolder=folder, strategy="direct")
        assert_same_tensors(ours, reference)


def test_mmap_parameters_are_views_of_the_populated_files(flux_dir: Path) -> None:
    """``strategy="mmap"`` with no dtype to convert: every parameter is a view of its shard's
    mapping, populated during the load, none copied into anonymous memory (the memory diffusers'
    default load leaves its parameters in)."""
    model = load_model(diffusers.FluxTransformer2DModel, flux_dir, subfolder="transformer",
                       strategy="mmap")
    shards = sorted((flux_dir / "transformer").glob("*.safetensors"))
    maps = [found for shard in shards for found in pagecache.file_mappings(shard)]
    assert len(maps) == len(shards) and all(anonymous == 0 for *_, anonymous in maps)
    parameters = dict(model.named_parameters())
    for name, parameter in parameters.items():
        start, end = parameter.data_ptr(), parameter.data_ptr() + parameter.nbytes
        assert any(lo <= start and end <= hi for lo, hi, _, _ in maps), name
    assert sum(rss for _, _, rss, _ in maps) >= sum(p.nbytes for p in parameters.values())
    assert_same_tensors(model, diffusers.FluxTransformer2DModel.from_pretrained(
        flux_dir, subfolder="transformer"))


def test_sharded_variant_index_and_its_legacy_name(sd_dir: Path, tmp_path: Path) -> None:
    """``diffusion_pytorch_model.safetensors.index.fp16.json`` and its deprecated name
    ``diffusion_pytorch_model.safetensors.fp16.index.json``, which diffusers still finds."""
    cls = diffusers.UNet2DConditionModel
    unet = cls.from_pretrained(sd_dir, subfolder="unet").to(torch.float16)
    unet.save_pretrained(tmp_path / "unet", variant="fp16", max_shard_size="20KB")
    index = tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json"
    assert index.is_file()
    for _ in ("current", "legacy"):
        reference = cls.from_pretrained(tmp_path / "unet", variant="fp16")
        assert_same_tensors(load_model(cls, tmp_path / "unet", variant="fp16"), reference)
        index = index.rename(index.with_name("diffusion_pytorch_model.safetensors.fp16.index.json"))


def test_keep_in_fp32_modules(tmp_path: Path) -> None:
    torch.manual_seed(0)
    wan = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2,
                                          attention_head_dim=12, in_channels=4, out_channels=4,
                                          text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                          rope_max_seq_len=32)
    wan.save_pretrained(tmp_path / "wan")
    reference = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / "wan",
                                                                torch_dtype=torch.bfloat16)
    ours = load_model(diffusers.WanTransformer3DModel, tmp_path / "wan",
                      torch_dtype=torch.bfloat16)
    assert_same_tensors(ours, reference)
    assert ours.scale_shift_table.dtype == torch.float32  # kept in float32 by the class
    assert ours.proj_out.weight.dtype == torch.bfloat16


def test_deprecated_attention_names_are_renamed(sd_dir: Path, tmp_path: Path) -> None:
    """A VAE saved before diffusers renamed its attention block (``query``, ``proj_attn``)."""
    folder = tmp_path / "vae"
    shutil.copytree(sd_dir / "vae", folder,
                    ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = weightlift.load(sd_dir / "vae")
    renamed = {}
    for name, tensor in state.items():
        for new, legacy in old.items():
            name = name.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
        renamed[name] = tensor
    assert any(".proj_attn." in name for name in renamed)
    save_file(renamed, folder / "diffusion_pytorch_model.safetensors")
    reference = diffusers.AutoencoderKL.from_pretrained(folder)
    assert_same_tensors(load_model(diffusers.AutoencoderKL, folder), reference)


def test_missing_component_names_it(sd_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "pipe"
    shutil.copytree(sd_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(weightlift.CheckpointError, match=r"vae \(AutoencoderKL\)"):
        from_pretrained(broken)
    (broken / "vae").mkdir()
    shutil.copy(sd_dir / "vae" / "config.json", broken / "vae")
    with pytest.raises(weightlift.CheckpointError,
                       match=r"vae.*holds neither diffusion_pytorch_model.safetensors"):
        from_pretrained(broken)


def test_truncated_shard_names_file_and_tensor(sd_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "pipe"
    shutil.copytree(sd_dir, broken)
    shard = sorted((broken / "unet").glob("diffusion_pytorch_model-0000*.safetensors"))[-1]
    with weightlift.open(shard) as checkpoint:
        last = max(checkpoint.keys(), key=lambda name: checkpoint.info(name).offset)
    data = shard.read_bytes()
    shard.write_bytes(data[:-8])
    with pytest.raises(weightlift.WeightliftError) as caught:
        from_pretrained(broken)
    assert shard.name in str(caught.value)
    assert last in str(caught.value)


def test_missing_weights_and_refused_options(sd_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "vae"
    shutil.copytree(sd_dir / "vae", folder,
                    ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    state = weightlift.load(sd_dir / "vae")
    del state["decoder.conv_out.weight"]
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(weightlift.CheckpointError, match=r"decoder\.conv_out\.weight"):
        load_model(diffusers.AutoencoderKL, folder)
    with pytest.raises(weightlift.PlacementError, match="device_map"):
        from_pretrained(sd_dir, device_map="balanced")
    with pytest.raises(weightlift.PlacementError, match="quantization_config"):
        load_model(diffusers.AutoencoderKL, sd_dir, subfolder="vae", quantization_config=object())
    with pytest.raises(weightlift.CheckpointError, match="variant 'bf16'"):
        from_pretrained(sd_dir, variant="bf16")


# ---- single files ------------------------------------------------------------------------------

#: diffusers' LTX-Video names → the original checkpoint's (the inverse of
#: ``convert_ltx_transformer_checkpoint_to_diffusers``; the fixture checks it with diffusers' own).
LTX_ORIGINAL = [("proj_in", "patchify_proj"), ("time_embed", "adaln_single"),
                ("norm_q", "q_norm"), ("norm_k", "k_norm")]


def original_ltx_name(name: str) -> str:
    for new, old in LTX_ORIGINAL:
        name = name.replace(new, old)
    return "model.diffusion_model." + name


@pytest.fixture(scope="module")
def ltx_single(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An LTX-Video transformer's config folder and its weights as one original-layout file."""
    torch.manual_seed(0)
    ltx = diffusers.LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1,
                                               patch_size_t=1, num_attention_heads=4,
                                               attention_head_dim=8, cross_attention_dim=32,
                                               num_layers=1, caption_channels=32)
    root = tmp_path_factory.mktemp("ltx")
    ltx.save_pretrained(root / "transformer")
    original = {original_ltx_name(n): t.contiguous() for n, t in ltx.state_dict().items()}
    convert = diffusers.loaders.single_file_utils.convert_ltx_transformer_checkpoint_to_diffusers
    assert convert(dict(original)).keys() == ltx.state_dict().keys()  # the file really converts
    save_file(original, root / "ltx_original.safetensors")
    return root, root / "ltx_original.safetensors"


def ltx_forward(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return model(hidden_states=torch.randn(1, 4, 8), encoder_hidden_states=torch.randn(1, 3, 32),
                     timestep=torch.tensor([500]), encoder_attention_mask=torch.ones(1, 3),
                     num_frames=1, height=2, width=2, return_dict=False)[0]


def test_single_file_equals_from_single_file(ltx_single: tuple[Path, Path]) -> None:
    root, file = ltx_single
    cls = diffusers.LTXVideoTransformer3DModel
    for dtype in (None, torch.float16):
        reference = cls.from_single_file(str(file), config=str(root), subfolder="transformer",
                                         torch_dtype=dtype)
        ours = load_single_file(cls, file, config=str(root), subfolder="transformer",
                                torch_dtype=dtype, strategy="stream")
        assert_same_tensors(ours, reference)
    ours.float(), reference.float()
    expected = ltx_forward(reference)
    assert torch.equal(ltx_forward(ours), expected)


def test_gguf_transformer_equals_diffusers(ltx_single: tuple[Path, Path], tmp_path: Path) -> None:
    """A Q8_0/BF16/F32 GGUF of the original layout, for diffusers' GGUF quantizer."""
    gguf = pytest.importorskip("gguf", reason="gguf-py writes the GGUF file")
    root, file = ltx_single
    writer = gguf.GGUFWriter(tmp_path / "ltx.gguf", arch="ltxv")
    for name, tensor in load_file(file).items():
        array = tensor.float().numpy()
        if tensor.ndim == 2 and tensor.shape[1] % 32 == 0 and name.endswith(".weight"):
            kind = gguf.GGMLQuantizationType.Q8_0
        elif tensor.ndim == 2 and name.endswith(".weight"):
            kind = gguf.GGMLQuantizationType.BF16
        else:
            kind = gguf.GGMLQuantizationType.F32
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name.removeprefix("model.diffusion_model."), array)
        else:
            writer.add_tensor(name.removeprefix("model.diffusion_model."),
                              gguf.quants.quantize(array, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = diffusers.GGUFQuantizationConfig(compute_dtype=torch.float32)
    cls = diffusers.LTXVideoTransformer3DModel
    reference = cls.from_single_file(str(tmp_path / "ltx.gguf"), config=str(root),
                                     subfolder="transformer", quantization_config=config)
    ours = load_single_file(cls, tmp_path / "ltx.gguf", config=str(root), subfolder="transformer",
                            quantization_config=config)
    assert_same_tensors(ours, reference)
    kinds = {getattr(p, "quant_type", None) for p in ours.parameters()}
    assert {gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.BF16} <= kinds
    for (name, mine), theirs in zip(ours.named_parameters(), reference.parameters()):
        assert getattr(mine, "quant_type", None) == getattr(theirs, "quant_type", None), name
    expected = ltx_forward(reference)
    assert torch.equal(ltx_forward(ours), expected)


def test_importing_weightlift_does_not_import_diffusers() -> None:
    code = ("import sys, weightlift, weightlift.diffusers; "
            "assert 'diffusers' not in sys.modules, 'diffusers imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ,
                   "PYTHONPATH": os.pathsep.join(sys.path)})
