"""Tiny Stable-Diffusion pipelines with the real architectures' layout (random weights, built in memory).

`sd15()` has SD1.5's UNet layout: three cross-attention down blocks and three up blocks with two and
three transformer blocks each, a cross-attention mid block (16 transformer blocks in all, as MasaCtrl
counts them), 8 heads, a CLIP text encoder with 77 positions; only the widths are shrunk. `sdxl()` has
SDXL's layout at a smaller depth: two text encoders/tokenizers, text-time conditioning, and
cross-attention only in the two lower-resolution levels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

DEMO = Path(__file__).resolve().parents[1] / "attntrace" / "data" / "demo"


def _cfg(name: str) -> dict[str, Any]:
    return json.loads((DEMO / name / "config.json").read_text())


def _text_parts(projection: bool = False) -> tuple[Any, Any]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    config = CLIPTextConfig.from_pretrained(DEMO / "text_encoder")
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()
    return model, CLIPTokenizer.from_pretrained(DEMO / "tokenizer")


def _scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_pretrained(DEMO / "scheduler")


def sd15(seed: int = 0) -> Any:
    """An SD1.5-architecture `StableDiffusionPipeline` (random weights from `seed`); latents 4x16x16."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()  # fmt: skip
    vae = AutoencoderKL.from_config(_cfg("vae")).eval()
    text_encoder, tokenizer = _text_parts()
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl(seed: int = 0) -> Any:
    """An SDXL-architecture `StableDiffusionXLPipeline` (random weights); latents 4x16x16."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    text_encoder, tokenizer = _text_parts()
    text_encoder_2, tokenizer_2 = _text_parts(projection=True)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=64,
        attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 2, 2), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=8, use_linear_projection=True,
        projection_class_embeddings_input_dim=8 * 6 + 32,
    ).eval()  # fmt: skip
    vae = AutoencoderKL.from_config(_cfg("vae")).eval()
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=_scheduler(), force_zeros_for_empty_prompt=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe: Any, n: int, seed: int = 0) -> torch.Tensor:
    """`n` copies of one initial latent (an edit group shares its starting noise)."""
    g = torch.Generator().manual_seed(seed)
    size = pipe.unet.config.sample_size
    one = torch.randn(1, pipe.unet.config.in_channels, size, size, generator=g)
    return one.expand(n, -1, -1, -1).clone()
