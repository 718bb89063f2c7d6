"""Tiny real diffusers pipelines built from configs (random weights) for generation and editing tests.

`sd15()` has SD1.5's UNet architecture (three cross-attention down blocks, a down block, the mirrored
up blocks, a cross-attention mid block) at tiny widths; with 256 px images the latents are 32x32, so
self-attention maps come at 32², 16² and 8² queries (P2P's <= 16² rule selects some, not all).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

DEMO = Path(__file__).resolve().parents[1] / "attntrace" / "data" / "demo"


def clip_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(DEMO / "tokenizer"))


T5_WORDS = ["a", "red", "dog", "cat", "on", "the", "grass", "photo", "of", "blue", "car", "tiger", "big", "house",
            "riding", "bicycle", "sitting", "in", "field"]  # fmt: skip


def t5_tokenizer() -> Any:
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in T5_WORDS]
    vocab += [(c, -5.0) for c in string.ascii_lowercase + ",.!?'"] + [("▁", -3.0)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def clip_text(hidden: int = 32, projection: int = 32, seed: int = 0) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=619, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=projection,
                         bos_token_id=617, eos_token_id=618, pad_token_id=618)  # fmt: skip
    return CLIPTextModel(cfg).eval(), CLIPTextModelWithProjection(cfg).eval()


def t5_text(d_model: int = 32, seed: int = 0) -> Any:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=64, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=2,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)  # fmt: skip
    return T5EncoderModel(cfg).eval()


def vae(channels: int = 4, scaling: float = 0.18215, blocks: int = 4, shift: float | None = None) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8,) * blocks, down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, latent_channels=channels, norm_num_groups=4,
                         layers_per_block=1, scaling_factor=scaling, shift_factor=shift).eval()  # fmt: skip


def sd15(classic: bool = False) -> Any:
    """SD1.5 architecture, tiny: 256 px -> 32x32 latents; DDIM scheduler as prompt-to-prompt uses."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32, 32, 32), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, sample_size=32, norm_num_groups=8,
    ).eval()  # fmt: skip
    if classic:
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    text, _ = clip_text()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    pipe = StableDiffusionPipeline(vae=vae(), text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl() -> Any:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=64, attention_head_dim=(2, 4),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), transformer_layers_per_block=(1, 1),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32,
        use_linear_projection=True, sample_size=16, norm_num_groups=8,
    ).eval()  # fmt: skip
    t1, _ = clip_text(32, 32, seed=1)
    _, t2 = clip_text(32, 32, seed=2)
    pipe = StableDiffusionXLPipeline(vae=vae(blocks=3), text_encoder=t1, text_encoder_2=t2,
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
                                     scheduler=EulerDiscreteScheduler())  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                               pooled_projection_dim=32, out_channels=4).eval()  # fmt: skip
    _, t1 = clip_text(32, 16, seed=1)
    _, t2 = clip_text(16, 16, seed=2)
    t3 = t5_text(32, seed=3)
    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=vae(scaling=1.5, blocks=3, shift=0.0), text_encoder=t1,
                                    tokenizer=clip_tokenizer(),
                                    text_encoder_2=t2, tokenizer_2=clip_tokenizer(), text_encoder_3=t3,
                                    tokenizer_3=t5_tokenizer())  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                axes_dims_rope=(2, 2, 4)).eval()  # fmt: skip
    t1, _ = clip_text(32, 32, seed=1)
    pipe = FluxPipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(4, blocks=3, shift=0.0),
                        text_encoder=t1, tokenizer=clip_tokenizer(),
                        text_encoder_2=t5_text(32, seed=2), tokenizer_2=t5_tokenizer())  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart() -> Any:
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    tr = PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                  num_attention_heads=2, in_channels=4, out_channels=8, cross_attention_dim=16,
                                  caption_channels=32, norm_num_groups=8).eval()  # fmt: skip
    pipe = PixArtAlphaPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_text(32, seed=2), vae=vae(blocks=3),
                               transformer=tr, scheduler=DDIMScheduler())  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan() -> Any:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16,
                               out_channels=16, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2,
                               rope_max_seq_len=32).eval()  # fmt: skip
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(2)
    te = UMT5EncoderModel(
        UMT5Config(
            vocab_size=64,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    ).eval()
    torch.manual_seed(0)
    v = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False,
                         True, True]).eval()  # fmt: skip
    pipe = WanPipeline(tokenizer=t5_tokenizer(), text_encoder=te, transformer=tr, vae=v,
                       scheduler=FlowMatchEulerDiscreteScheduler())  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(pipe: Any, images: int = 1, seed: int = 0, side: int = 32) -> torch.Tensor:
    """One start latent (from `seed`) expanded to `images` rows, as prompt-to-prompt's init_latent does."""
    g = torch.Generator().manual_seed(seed)
    ch = pipe.unet.config.in_channels if hasattr(pipe, "unet") else pipe.transformer.config.in_channels
    return torch.randn((1, ch, side, side), generator=g).expand(images, ch, side, side).contiguous()
