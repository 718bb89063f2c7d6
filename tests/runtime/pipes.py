"""Tiny real diffusers pipelines (random weights, built in memory from configs) for the runtime-feature tests.

`sd()` is the demo's Stable-Diffusion architecture (UNet, VAE, CLIP text encoder and the shipped local
tokenizer); `flux()` is a FluxPipeline around the coverage sweep's tiny Flux transformer with a tiny VAE,
run from precomputed prompt embeddings (its T5/CLIP tokenizers are not available offline).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch

from attntrace.bundled import DATA

SD_STEPS = 2
SIZE = 64


def _cfg(name: str) -> dict[str, Any]:
    return json.loads((DATA / name / "config.json").read_text())


def sd(seed: int = 0) -> Any:
    """A tiny StableDiffusionPipeline (UNet with 5 self + 5 cross-attention sites)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(_cfg("unet"))
    vae = AutoencoderKL.from_config(dict(_cfg("vae"), block_out_channels=[8, 8, 8, 8], norm_num_groups=4))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(DATA / "text_encoder"))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(DATA / "tokenizer"), unet=unet,
        scheduler=DDIMScheduler.from_pretrained(DATA / "scheduler"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    for c in (unet, vae, text_encoder):
        c.eval()
    return pipe


def sd_call(pipe: Any, **kw: Any) -> torch.Tensor:
    """Two DDIM steps with classifier-free guidance (one batched UNet forward per step), decoded."""
    args: dict[str, Any] = {"prompt": "a cat sitting on a mat", "num_inference_steps": SD_STEPS, "height": SIZE,
                            "width": SIZE, "guidance_scale": 7.5, "output_type": "pt",
                            "generator": torch.Generator().manual_seed(0)}  # fmt: skip
    args.update(kw)
    with torch.no_grad():
        return pipe(**args).images


def flux_transformer(seed: int = 0, layers: int = 2, single: int = 2) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=layers, num_single_layers=single, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    ).eval()  # fmt: skip


def flux(seed: int = 0, layers: int = 2, single: int = 2) -> Any:
    """A tiny FluxPipeline (2 double-stream + 2 single-stream blocks), no text encoders."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    transformer = flux_transformer(seed, layers, single)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=2, block_out_channels=(8, 8), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, shift_factor=0.0, scaling_factor=1.0, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()  # fmt: skip
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=transformer,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


FLUX_STEPS = 2


def flux_call(pipe: Any, steps: int = FLUX_STEPS, **kw: Any) -> torch.Tensor:
    """`steps` flow-matching steps at 16x16 px (4x4 latent tokens after packing), 6 text tokens."""
    g = torch.Generator().manual_seed(0)
    dtype = pipe.transformer.dtype if pipe.transformer.dtype != torch.float8_e4m3fn else pipe.vae.dtype
    args: dict[str, Any] = {
        "prompt_embeds": torch.randn(1, 6, 16, generator=g).to(dtype),
        "pooled_prompt_embeds": torch.randn(1, 16, generator=g).to(dtype),
        "num_inference_steps": steps, "height": 16, "width": 16, "output_type": "pt",
        "generator": torch.Generator().manual_seed(1), "guidance_scale": 1.0,
    }  # fmt: skip
    args.update(kw)
    with torch.no_grad():
        return pipe(**args).images


def sd3(seed: int = 0) -> Any:
    """A tiny StableDiffusion3Pipeline (the coverage sweep's SD3 transformer, 2 joint blocks), no text encoders."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
    ).eval()  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, shift_factor=0.0, scaling_factor=1.0, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()  # fmt: skip
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_call(pipe: Any, steps: int = 2, **kw: Any) -> torch.Tensor:
    """`steps` steps with classifier-free guidance at 16x16 px (8x8 latent, 16 image tokens), 7 text tokens."""
    g = torch.Generator().manual_seed(0)
    dtype = pipe.transformer.dtype
    args: dict[str, Any] = {
        "prompt_embeds": torch.randn(1, 7, 32, generator=g).to(dtype),
        "negative_prompt_embeds": torch.randn(1, 7, 32, generator=g).to(dtype),
        "pooled_prompt_embeds": torch.randn(1, 16, generator=g).to(dtype),
        "negative_pooled_prompt_embeds": torch.randn(1, 16, generator=g).to(dtype),
        "num_inference_steps": steps, "height": 16, "width": 16, "output_type": "pt",
        "generator": torch.Generator().manual_seed(1), "guidance_scale": 5.0,
    }  # fmt: skip
    args.update(kw)
    with torch.no_grad():
        return pipe(**args).images


PIPES: dict[str, tuple[Callable[..., Any], Callable[..., torch.Tensor]]] = {
    "sd": (sd, sd_call),
    "flux": (flux, flux_call),
    "sd3": (sd3, sd3_call),
}
